//! Parsing one event's bytes into a document, with the limits that make every
//! later walk over it safe: a nesting limit (checked before the recursive parser
//! runs), no duplicate keys, and numbers kept exactly.
//!
//! One linear scan over the bytes comes first. It measures the nesting depth
//! without recursion and notes the number literals a 64-bit parse would not
//! keep (18 or more significant digits, or an exponent of 3 or more digits)
//! and the literal `-0`. Only events with such numbers are parsed another way
//! (numbers kept as their text). The scan jumps over string contents with
//! `memchr`, and compares each object's names as it passes them: only a
//! document where it finds a repeated name (or cannot be sure: escaped names,
//! objects of many members) gets a walk over the parsed objects, which decides
//! and names the key and its object.

use std::borrow::Cow;
use std::fmt::Write as _;

use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value};

/// Deepest nesting of objects and arrays an event may have; the event object
/// itself is level 1. serde_json's default recursion limit, far beyond what
/// events carry (a handful of levels), and low enough that every recursive walk
/// over a document (CEL conversion, serialization, schema checks, drop) stays
/// within a small stack.
pub const MAX_DEPTH: usize = 128;

/// Largest event accepted, in bytes: librdkafka's default largest message
/// (`message.max.bytes`, 1,000,000). Brokers take batches of up to 1 MiB by
/// default, so an accepted event still fits with its key, headers and some
/// growth when a sink writes it, and the dead letter of a larger one (its
/// original bytes) still fits when the broker took it as input. Larger events
/// are dead-lettered unparsed.
pub const MAX_EVENT_BYTES: usize = 1_000_000;

/// The UTF-8 byte order mark, which RFC 8259 lets parsers ignore.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The document in `bytes` (a leading byte order mark ignored), or why there is none.
pub(crate) fn parse_document(bytes: &[u8], max_depth: usize) -> Result<Value, String> {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    // JSON is UTF-8 (RFC 8259). sonic-rs checks it when it builds numbers as
    // values but not with raw numbers (found by fuzzing: a key with a stray
    // 0xD4 byte became a `str` that is not UTF-8, and formatting it panicked),
    // so every document is checked here, once.
    if let Err(error) = std::str::from_utf8(bytes) {
        return Err(format!(
            "not valid UTF-8: invalid byte sequence at byte {}",
            error.valid_up_to()
        ));
    }
    let scan = scan(bytes, max_depth, true);
    let names_unsure = scan.names_unsure;
    if scan.too_deep {
        return Err(format!(
            "nested deeper than the limit of {max_depth} levels of objects and arrays, at {}",
            deep_pointer(bytes, max_depth)
        ));
    }
    let value = parse_scanned(bytes, scan).map_err(|e| {
        // sonic-rs appends a multi-line excerpt; the first line says it all.
        let message = e.to_string();
        let first = message.lines().next().unwrap_or_default().to_owned();
        format!("invalid JSON: {first}")
    })?;
    if let Some((pointer, key)) = names_unsure.then(|| duplicate_key(&value)).flatten() {
        return Err(format!(
            "duplicate key {key:?} in the object at {}",
            if pointer.is_empty() {
                "the top level"
            } else {
                &pointer
            }
        ));
    }
    Ok(value)
}

/// A document the runtime wrote itself (an event with a step's writes), parsed
/// back keeping its numbers as they were. Writes nest values at most a few
/// levels below an event within [`MAX_DEPTH`]; the wider limit (within which
/// every walk is tested to fit a thread's stack) only keeps the parser's
/// recursion bounded whatever happens.
pub(crate) fn reparse(bytes: &[u8]) -> Option<Value> {
    let scan = scan(bytes, 2 * MAX_DEPTH, false);
    if scan.too_deep {
        return None;
    }
    parse_scanned(bytes, scan).ok()
}

fn parse_scanned(bytes: &[u8], scan: Scan) -> sonic_rs::Result<Value> {
    // `-0` is the integer 0 (sonic-rs would make it the float -0.0): the sign is
    // blanked, which keeps every offset.
    let bytes: Cow<[u8]> = if scan.negative_zeros.is_empty() {
        Cow::Borrowed(bytes)
    } else {
        let mut owned = bytes.to_vec();
        for at in scan.negative_zeros {
            owned[at] = b' ';
        }
        Cow::Owned(owned)
    };
    if scan.wide_numbers {
        // Every number kept as its text: numbers read as 64-bit values where they
        // fit, and written back exactly as they came.
        let mut de = sonic_rs::Deserializer::from_slice(&bytes).use_rawnumber();
        de.deserialize::<Value>().and_then(|v| de.end().map(|()| v))
    } else {
        sonic_rs::from_slice::<Value>(&bytes)
    }
}

#[derive(Default)]
struct Scan {
    too_deep: bool,
    /// Some number literal may not fit a 64-bit integer or float exactly.
    wide_numbers: bool,
    /// Offsets of `-0` literals.
    negative_zeros: Vec<usize>,
    /// Some object may have a name twice: the parsed document is walked.
    names_unsure: bool,
}

/// Members past which an object's names are left to the walk (which sorts
/// them) instead of compared pairwise during the scan.
const NAMES_COMPARED: usize = 16;

/// The names of the objects the scan is in, compared as it passes them.
struct Names {
    /// Per open object or array: where the object's names start in `seen`
    /// (`None` for an array).
    open: Vec<Option<usize>>,
    /// The names of the open objects: fingerprint and byte range.
    seen: Vec<(u64, usize, usize)>,
    /// When the next string is a name (just after `{` or a `,` in an
    /// object): where its object's names start in `seen`.
    name_next: Option<usize>,
}

impl Names {
    fn new() -> Self {
        Names {
            open: Vec::with_capacity(8),
            seen: Vec::with_capacity(32),
            name_next: None,
        }
    }

    fn enter(&mut self, object: bool) {
        self.name_next = object.then_some(self.seen.len());
        self.open.push(self.name_next);
    }

    fn leave(&mut self) {
        if let Some(Some(start)) = self.open.pop() {
            self.seen.truncate(start);
        }
        self.name_next = None;
    }

    fn comma(&mut self) {
        self.name_next = self.open.last().copied().flatten();
    }

    /// The name in `bytes[start..end]` of the object whose names start at
    /// `first`; false when the walk has to decide.
    fn name(
        &mut self,
        first: usize,
        bytes: &[u8],
        start: usize,
        end: usize,
        escaped: bool,
    ) -> bool {
        self.name_next = None;
        // Escaped names may spell one another ("\u0061" is "a").
        if escaped || self.seen.len() - first >= NAMES_COMPARED {
            return false;
        }
        let name = &bytes[start..end];
        let print = fingerprint(name);
        let repeated = self.seen[first..]
            .iter()
            .any(|&(seen, from, to)| seen == print && &bytes[from..to] == name);
        self.seen.push((print, start, end));
        !repeated
    }
}

/// A name's length and some of its first and last bytes: names that differ
/// here differ, so most pairs are told apart without comparing their bytes.
fn fingerprint(name: &[u8]) -> u64 {
    let mut print = [0u8; 8];
    // Only a byte of the length: a collision costs a comparison, nothing more.
    print[0] = name.len() as u8;
    let head = name.len().min(4);
    print[1..1 + head].copy_from_slice(&name[..head]);
    let tail = name.len().min(3);
    print[5..5 + tail].copy_from_slice(&name[name.len() - tail..]);
    u64::from_ne_bytes(print)
}

/// The end of the string whose opening quote is just before `from`, past its
/// closing quote (`None` when there is none), and whether it has escapes.
fn string_end(bytes: &[u8], mut from: usize) -> (Option<usize>, bool) {
    let mut escaped = false;
    while let Some(k) = memchr::memchr2(b'"', b'\\', &bytes[from.min(bytes.len())..]) {
        let at = from + k;
        if bytes[at] == b'"' {
            return (Some(at + 1), escaped);
        }
        escaped = true;
        from = at + 2; // an escape and the character it escapes
    }
    (None, escaped)
}

fn number_end(bytes: &[u8], from: usize) -> usize {
    bytes[from..]
        .iter()
        .position(|b| !matches!(b, b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E'))
        .map_or(bytes.len(), |k| from + k)
}

/// Whether a number literal may not survive a parse into a 64-bit value: 18 or
/// more significant digits (i64 holds any integer of 17, f64 gives back any
/// decimal of up to 15 and every one a 64-bit writer prints in up to 17), or an
/// exponent of 3 or more digits (beyond f64's range or precision).
fn is_wide(literal: &[u8]) -> bool {
    let (mantissa, exponent) = match literal.iter().position(|b| matches!(b, b'e' | b'E')) {
        Some(e) => (&literal[..e], &literal[e + 1..]),
        None => (literal, &[][..]),
    };
    let significant = mantissa
        .iter()
        .skip_while(|b| matches!(b, b'-' | b'0' | b'.'))
        .filter(|b| b.is_ascii_digit())
        .count();
    let exponent_digits = exponent.iter().filter(|b| b.is_ascii_digit()).count();
    significant >= 18 || exponent_digits >= 3
}

/// `check_names`: compare each object's names (see [`Names`]); without it
/// `names_unsure` stays false.
fn scan(bytes: &[u8], max_depth: usize, check_names: bool) -> Scan {
    let mut scan = Scan::default();
    let mut names = check_names.then(Names::new);
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let (end, escaped) = string_end(bytes, i + 1);
                let Some(end) = end else {
                    break; // unterminated: the parser says so
                };
                if let Some(checking) = names.as_mut()
                    && let Some(first) = checking.name_next
                    && !checking.name(first, bytes, i + 1, end - 1, escaped)
                {
                    scan.names_unsure = true;
                    names = None;
                }
                i = end;
            }
            open @ (b'{' | b'[') => {
                depth += 1;
                if depth > max_depth {
                    scan.too_deep = true;
                    return scan;
                }
                if let Some(names) = names.as_mut() {
                    names.enter(open == b'{');
                }
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                if let Some(names) = names.as_mut() {
                    names.leave();
                }
                i += 1;
            }
            b',' => {
                if let Some(names) = names.as_mut() {
                    names.comma();
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let end = number_end(bytes, i);
                let literal = &bytes[i..end];
                if literal == b"-0" {
                    scan.negative_zeros.push(i);
                // Shorter literals have neither 18 digits nor a 3-digit exponent.
                } else if literal.len() >= 5 && is_wide(literal) {
                    scan.wide_numbers = true;
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    scan
}

/// One level of the path the scan is at.
enum Level {
    Object(Option<String>),
    Array(usize),
}

/// The JSON pointer of the first value nested deeper than `max_depth` (only
/// called when there is one), with middle levels left out when it is long.
fn deep_pointer(bytes: &[u8], max_depth: usize) -> String {
    let mut levels: Vec<Level> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                let end = string_end(bytes, i + 1).0.unwrap_or(bytes.len());
                if let Some(Level::Object(key)) = levels.last_mut()
                    && key.is_none()
                {
                    let text = &bytes[i..end];
                    *key = Some(sonic_rs::from_slice::<String>(text).unwrap_or_else(|_| {
                        String::from_utf8_lossy(&text[1..text.len().saturating_sub(1)]).into_owned()
                    }));
                }
                i = end;
            }
            b'{' | b'[' => {
                if levels.len() == max_depth {
                    break;
                }
                levels.push(if bytes[i] == b'{' {
                    Level::Object(None)
                } else {
                    Level::Array(0)
                });
                i += 1;
            }
            b'}' | b']' => {
                levels.pop();
                i += 1;
            }
            b',' => {
                match levels.last_mut() {
                    Some(Level::Object(key)) => *key = None,
                    Some(Level::Array(index)) => *index += 1,
                    None => {}
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    let segments: Vec<String> = levels
        .iter()
        .map(|level| match level {
            Level::Object(key) => escape_token(key.as_deref().unwrap_or("")),
            Level::Array(index) => index.to_string(),
        })
        .collect();
    pointer_text(&segments)
}

/// RFC 6901 escaping of one reference token.
fn escape_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// A pointer of `segments`; beyond about 200 characters the middle segments are
/// replaced by `/…(N levels)…`, and a very long key is cut.
fn pointer_text(segments: &[String]) -> String {
    const KEEP: usize = 100;
    let cut = |s: &str| -> String {
        if s.len() <= KEEP {
            return s.to_owned();
        }
        let mut end = KEEP;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    };
    let whole: usize = segments.iter().map(|s| s.len() + 1).sum();
    let mut out = String::new();
    if whole <= 2 * KEEP {
        for segment in segments {
            out.push('/');
            out.push_str(segment);
        }
        return out;
    }
    let (mut head, mut head_len) = (0, 0);
    while head < segments.len() && head_len + segments[head].len() < KEEP {
        head_len += segments[head].len() + 1;
        head += 1;
    }
    let (mut tail, mut tail_len) = (segments.len(), 0);
    while tail > head + 1 && tail_len + segments[tail - 1].len() < KEEP {
        tail_len += segments[tail - 1].len() + 1;
        tail -= 1;
    }
    for segment in &segments[..head] {
        out.push('/');
        out.push_str(&cut(segment));
    }
    if tail > head {
        let _ = write!(out, "/…({} levels)…", tail - head);
    }
    for segment in &segments[tail..] {
        out.push('/');
        out.push_str(&cut(segment));
    }
    out
}

/// The first key that appears twice in one object, with the pointer of that
/// object. Recursive: only called on documents within the nesting limit.
fn duplicate_key(value: &Value) -> Option<(String, String)> {
    if let Some(object) = value.as_object() {
        if let Some(key) = repeated_name(object) {
            return Some((String::new(), key.to_owned()));
        }
        for (name, member) in object.iter() {
            if let Some((below, key)) = duplicate_key(member) {
                return Some((format!("/{}{below}", escape_token(name)), key));
            }
        }
    } else if let Some(array) = value.as_array() {
        for (index, item) in array.iter().enumerate() {
            if let Some((below, key)) = duplicate_key(item) {
                return Some((format!("/{index}{below}"), key));
            }
        }
    }
    None
}

fn repeated_name(object: &sonic_rs::Object) -> Option<&str> {
    // Pairwise for the usual small objects, sorted for large ones.
    const SMALL: usize = 16;
    if object.len() <= SMALL {
        let mut names: [&str; SMALL] = [""; SMALL];
        for (i, (name, _)) in object.iter().enumerate() {
            if names[..i].contains(&name) {
                return Some(name);
            }
            names[i] = name;
        }
        return None;
    }
    let mut names: Vec<&str> = object.iter().map(|(name, _)| name).collect();
    names.sort_unstable();
    names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// Whether a number was kept as text because it has no exact 64-bit form; the
/// text when so.
pub(crate) fn wide_number(value: &Value) -> Option<sonic_rs::RawNumber> {
    let raw = value.as_raw_number()?;
    (!value.is_i64() && !value.is_u64()).then_some(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checker bounds an expression's cost by the largest event it can
    /// see: no event the runtime accepts may be larger.
    #[test]
    fn accepted_events_fit_the_checkers_cost_bound() {
        assert!(MAX_EVENT_BYTES as u64 <= keystone_crds::check::limits::MAX_EVENT_BYTES);
    }

    fn parse(text: &str) -> Result<String, String> {
        parse_document(text.as_bytes(), MAX_DEPTH).map(|v| sonic_rs::to_string(&v).unwrap())
    }

    fn nested(levels: usize, open: &str, close: &str, inner: &str) -> String {
        format!("{}{inner}{}", open.repeat(levels), close.repeat(levels))
    }

    #[test]
    fn depth_is_limited_before_parsing() {
        let at_limit = nested(MAX_DEPTH, "[", "]", "1");
        assert!(parse(&at_limit).is_ok());
        let too_deep = nested(20_000, "[", "]", "1");
        let err = parse(&too_deep).unwrap_err();
        assert!(
            err.starts_with(
                "nested deeper than the limit of 128 levels of objects and arrays, at /0/0/0/"
            ),
            "{err}"
        );
        assert!(err.contains("levels)…"), "{err}");
        // Brackets in strings are not nesting.
        let in_string = format!(r#"{{"s":"{}"}}"#, "[".repeat(1000));
        assert!(parse(&in_string).is_ok());
        let escaped = format!(r#"{{"s":"\"{}"}}"#, "[".repeat(1000));
        assert!(parse(&escaped).is_ok());
    }

    #[test]
    fn the_deep_path_names_keys_and_indexes() {
        let inner = nested(200, r#"{"x":"#, "}", "1");
        let text = format!(r#"{{"a":1,"b~/":[0,{{"c":{inner}}}]}}"#);
        let err = parse(&text).unwrap_err();
        assert!(err.contains("at /b~0~1/1/c/x/x/"), "{err}");
    }

    #[test]
    fn wide_numbers_round_trip_exactly() {
        for text in [
            r#"{"n":1180591620717411303424}"#,
            r#"{"n":-1180591620717411303424}"#,
            r#"{"n":3.14159265358979323846264338327950288}"#,
            r#"{"n":1e400}"#,
            r#"{"n":[18446744073709551616,1,2.5]}"#,
        ] {
            assert_eq!(parse(text).as_deref(), Ok(text));
        }
        let value =
            parse_document(br#"{"a":18446744073709551616,"b":7,"c":2.5}"#, MAX_DEPTH).unwrap();
        assert!(wide_number(&value["a"]).is_some());
        assert_eq!(value["b"].as_i64(), Some(7));
        assert_eq!(value["c"].as_f64(), Some(2.5));
        // 64-bit numbers take the usual path and keep their form.
        assert_eq!(
            parse(r#"{"a":18446744073709551615,"b":-9223372036854775808,"c":0.1}"#).as_deref(),
            Ok(r#"{"a":18446744073709551615,"b":-9223372036854775808,"c":0.1}"#)
        );
    }

    #[test]
    fn negative_zero_is_the_integer_zero() {
        let value = parse_document(br#"{"z":-0,"f":-0.0,"a":[-0]}"#, MAX_DEPTH).unwrap();
        assert_eq!(value["z"].as_i64(), Some(0));
        assert!(value["f"].is_f64());
        assert_eq!(value["a"][0].as_i64(), Some(0));
    }

    #[test]
    fn duplicate_keys_are_refused_with_their_path() {
        assert_eq!(
            parse(r#"{"a":1,"a":2}"#),
            Err(r#"duplicate key "a" in the object at the top level"#.into())
        );
        assert_eq!(
            parse(r#"{"a":[{"x":1},{"y":1,"y":2}]}"#),
            Err(r#"duplicate key "y" in the object at /a/1"#.into())
        );
        let many: Vec<String> = (0..40).map(|i| format!(r#""k{}":1"#, i % 39)).collect();
        let err = parse(&format!("{{{}}}", many.join(","))).unwrap_err();
        assert!(err.contains(r#""k0""#), "{err}");
        // Escapes are compared as the keys they spell.
        assert!(parse(r#"{"a":1,"\u0061":2}"#).is_err());
        assert!(parse(r#"{"x":{"\u0061":1},"a":{"a":2}}"#).is_ok());
        // Names alike in length, head and tail are told apart by their bytes.
        assert!(parse(r#"{"abcd-1-xyz":1,"abcd-2-xyz":2,"":3,"é":{"é":1}}"#).is_ok());
        assert_eq!(
            parse(r#"{"n":{"abcd-1-xyz":1,"abcd-2-xyz":2,"abcd-1-xyz":3}}"#),
            Err(r#"duplicate key "abcd-1-xyz" in the object at /n"#.into())
        );
        // A name is one object's: the same name in sibling and nested objects,
        // or as a string value, is no duplicate.
        assert!(
            parse(r#"{"a":"a","b":{"a":1,"b":[{"a":1},{"a":2,"b":"a"}]},"c":[["a"],{"a":0}]}"#)
                .is_ok()
        );
        // A duplicate in this object is found before one further down.
        assert_eq!(
            parse(r#"{"a":{"b":1,"b":2},"c":1,"c":2}"#),
            Err(r#"duplicate key "c" in the object at the top level"#.into())
        );
        assert_eq!(
            parse(r#"{"a":[1,{"x":1, "y" : 2 ,"x":3}]}"#),
            Err(r#"duplicate key "x" in the object at /a/1"#.into())
        );
    }

    /// The scan's verdict agrees with the walk over the parsed document, which
    /// decides whenever the scan is unsure.
    #[test]
    fn the_scan_finds_every_repeated_name_the_walk_finds() {
        let cases = [
            r#"{"a":1,"b":2}"#,
            r#"{"a":1,"a":2}"#,
            r#"{"a":{"b":1},"b":{"b":1}}"#,
            r#"{"a":{"b":1,"c":{"b":2}},"d":[{"e":1,"e":2}]}"#,
            r#"[{"a":1},{"a":1},[{"b":2,"c":3}]]"#,
            r#"{ "a" : [ ] , "a" : { } }"#,
            r#"{"k":"\"a\"","a":1}"#,
        ];
        for case in cases {
            let scan = scan(case.as_bytes(), MAX_DEPTH, true);
            let value: Value = sonic_rs::from_str(case).unwrap();
            assert_eq!(scan.names_unsure, duplicate_key(&value).is_some(), "{case}");
        }
    }

    #[test]
    fn a_leading_byte_order_mark_is_ignored() {
        assert_eq!(parse("\u{feff}{\"a\":1}").as_deref(), Ok(r#"{"a":1}"#));
    }
}
