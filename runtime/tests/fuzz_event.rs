//! Property tests (fuzzing on stable) of the event parser, JSON pointers and
//! field paths: arbitrary bytes, mutated documents and generated documents
//! (deep, with repeated keys, numbers of any width, strings full of brackets and
//! quotes) never panic, and give a clear `Ok` or `Err`:
//!
//! - a generated document parses exactly when it is within the nesting limit and
//!   has no repeated key, and then writes back as the same text;
//! - whatever parses writes back to text that parses to the same document;
//! - a pointer built from a path in a document reads the value there; any text
//!   is a pointer or not, and reading it never panics; a field path reads what
//!   it wrote.
//!
//! `PROPTEST_CASES=N` runs N cases per property (256 by default); the longer
//! runs and their results are in docs/RELIABILITY.md. A failure prints the
//! smallest input found: keep it as a case in `regressions()`.

use keystone_runtime::event::{Event, MAX_DEPTH, Pointer};
use proptest::prelude::*;
use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value};

// Shared with the cargo-fuzz targets `fuzz/fuzz_targets/{event_parser,pointers}.rs`.
#[path = "properties/event.rs"]
mod properties;
use properties::{check_any, check_pointer_and_path};

/// A generated document, rendered as canonical JSON text by [`render`].
#[derive(Clone, Debug)]
enum Doc {
    Null,
    Bool(bool),
    /// The literal, of any width.
    Number(String),
    Str(String),
    Array(Vec<Doc>),
    Object(Vec<(String, Doc)>),
}

fn leaf() -> impl Strategy<Value = Doc> {
    prop_oneof![
        Just(Doc::Null),
        any::<bool>().prop_map(Doc::Bool),
        "-?[1-9][0-9]{0,40}".prop_map(Doc::Number),
        "-?[1-9][0-9]{0,20}\\.[0-9]{1,25}".prop_map(Doc::Number),
        Just(Doc::Number("0".into())),
        "[a-z\\[\\]{}\",:\\\\/~ é😀0-9]{0,12}".prop_map(Doc::Str),
    ]
}

fn doc() -> impl Strategy<Value = Doc> {
    leaf().prop_recursive(8, 96, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Doc::Array),
            // Keys from a small alphabet, so that some objects repeat one.
            prop::collection::vec(("[ab~/.]{1,2}", inner), 0..6).prop_map(Doc::Object),
        ]
    })
}

fn render(doc: &Doc, out: &mut String) {
    match doc {
        Doc::Null => out.push_str("null"),
        Doc::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Doc::Number(n) => out.push_str(n),
        Doc::Str(s) => render_str(s, out),
        Doc::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                render(item, out);
            }
            out.push(']');
        }
        Doc::Object(members) => {
            out.push('{');
            for (i, (name, value)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                render_str(name, out);
                out.push(':');
                render(value, out);
            }
            out.push('}');
        }
    }
}

fn render_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Levels of objects and arrays.
fn depth(doc: &Doc) -> usize {
    match doc {
        Doc::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Doc::Object(members) => 1 + members.iter().map(|(_, v)| depth(v)).max().unwrap_or(0),
        _ => 0,
    }
}

fn has_repeated_key(doc: &Doc) -> bool {
    match doc {
        Doc::Array(items) => items.iter().any(has_repeated_key),
        Doc::Object(members) => {
            let mut names: Vec<&str> = members.iter().map(|(n, _)| n.as_str()).collect();
            names.sort_unstable();
            names.windows(2).any(|w| w[0] == w[1])
                || members.iter().any(|(_, v)| has_repeated_key(v))
        }
        _ => false,
    }
}

/// Whether `value` (inside `extra` arrays) is `doc`: integers and decimals of
/// 18 or more significant digits written back as the same text, shorter
/// decimals as the same double.
fn same(doc: &Doc, value: &Value, extra: usize) -> bool {
    if extra > 0 {
        return value
            .as_array()
            .is_some_and(|a| a.len() == 1 && same(doc, &a[0], extra - 1));
    }
    match doc {
        Doc::Null => value.is_null(),
        Doc::Bool(b) => value.as_bool() == Some(*b),
        Doc::Number(literal) => {
            let written = sonic_rs::to_string(value).unwrap();
            let significant = literal
                .trim_start_matches(['-', '0', '.'])
                .chars()
                .filter(char::is_ascii_digit)
                .count();
            if literal.contains('.') && significant < 18 {
                written.parse::<f64>().ok() == literal.parse::<f64>().ok()
            } else {
                written == *literal
            }
        }
        Doc::Str(s) => value.as_str() == Some(s.as_str()),
        Doc::Array(items) => value.as_array().is_some_and(|a| {
            a.len() == items.len() && items.iter().zip(a.iter()).all(|(d, v)| same(d, v, 0))
        }),
        Doc::Object(members) => value.as_object().is_some_and(|o| {
            o.len() == members.len()
                && members
                    .iter()
                    .zip(o.iter())
                    .all(|((dn, dv), (n, v))| dn == n && same(dv, v, 0))
        }),
    }
}

/// `doc` with only the first member of each name.
fn without_repeats(doc: &Doc) -> Doc {
    match doc {
        Doc::Array(items) => Doc::Array(items.iter().map(without_repeats).collect()),
        Doc::Object(members) => {
            let mut kept: Vec<(String, Doc)> = Vec::new();
            for (name, value) in members {
                if !kept.iter().any(|(n, _)| n == name) {
                    kept.push((name.clone(), without_repeats(value)));
                }
            }
            Doc::Object(kept)
        }
        other => other.clone(),
    }
}

/// `{"v": doc}` inside `extra` more levels of arrays.
fn event_text(doc: &Doc, extra: usize) -> String {
    let mut inner = String::new();
    render(doc, &mut inner);
    format!(
        "{{\"v\":{}{inner}{}}}",
        "[".repeat(extra),
        "]".repeat(extra)
    )
}

/// The paths to every value in `value`, as pointer tokens.
fn paths(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(prefix.clone());
    if let Some(object) = value.as_object() {
        let mut seen = Vec::new();
        for (name, member) in object.iter() {
            // A repeated name is refused at parse; the first would be read.
            if seen.contains(&name) {
                continue;
            }
            seen.push(name);
            prefix.push(name.to_owned());
            paths(member, prefix, out);
            prefix.pop();
        }
    } else if let Some(array) = value.as_array() {
        for (i, item) in array.iter().enumerate() {
            prefix.push(i.to_string());
            paths(item, prefix, out);
            prefix.pop();
        }
    }
}

proptest! {
    // Failures are kept by hand in `regressions()`, not in a file beside the test.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn generated_documents_parse_exactly_when_within_the_limits(
        doc in doc(),
        extra in prop_oneof![0usize..4, 100usize..140, Just(20_000usize)],
        bom in any::<bool>(),
    ) {
        let text = event_text(&doc, extra);
        let levels = 1 + extra + depth(&doc);
        let repeated = has_repeated_key(&doc);
        let mut bytes = if bom { b"\xEF\xBB\xBF".to_vec() } else { Vec::new() };
        bytes.extend_from_slice(text.as_bytes());
        match Event::parse(bytes) {
            Ok(event) => {
                prop_assert!(levels <= MAX_DEPTH, "{levels} levels parsed");
                prop_assert!(!repeated);
                prop_assert!(same(&doc, &event.value["v"], extra), "{} became {}", text, sonic_rs::to_string(&event.value).unwrap());
            }
            Err((_, reason)) if levels > MAX_DEPTH => {
                prop_assert!(reason.starts_with("nested deeper than the limit of 128 levels"), "{}", reason);
            }
            Err((_, reason)) => {
                prop_assert!(repeated, "{}", reason);
                prop_assert!(reason.starts_with("duplicate key"), "{}", reason);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_any(&bytes);
    }

    #[test]
    fn arbitrary_json_like_text_never_panics(text in "[\\[\\]{}\",:0-9.eE+\\-a-z\\\\ ]{0,200}") {
        check_any(text.as_bytes());
        check_any(format!("{{\"a\":{text}}}").as_bytes());
    }

    #[test]
    fn mutated_documents_never_panic(
        doc in doc(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let mut bytes = event_text(&doc, 0).into_bytes();
        for (at, byte, kind) in edits {
            let i = at.index(bytes.len() + 1);
            match kind {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => {
                    bytes.remove(i);
                }
                _ => {}
            }
        }
        check_any(&bytes);
    }

    #[test]
    fn pointers_read_every_value_of_a_document(doc in doc().prop_map(|d| without_repeats(&d))) {
        let event = Event::parse(event_text(&doc, 0).into_bytes()).unwrap();
        let mut all = Vec::new();
        paths(&event.value, &mut Vec::new(), &mut all);
        for tokens in all.iter().filter(|t| !t.is_empty()) {
            let text: String = tokens
                .iter()
                .map(|t| format!("/{}", t.replace('~', "~0").replace('/', "~1")))
                .collect();
            let pointer = Pointer::parse(&text).unwrap();
            let found = pointer.get(&event.value);
            prop_assert!(found.is_some(), "{} finds nothing", text);
        }
    }

    #[test]
    fn any_pointer_or_field_path_is_safe(doc in doc(), text in "[/~01a-b.\\[\\]]{0,24}") {
        check_pointer_and_path(&text, event_text(&doc, 0).as_bytes());
    }
}

/// Inputs that once failed a property, kept as cases.
#[test]
fn regressions() {
    for bytes in [
        &b""[..],
        b"\xEF\xBB\xBF",
        b"\xEF\xBB",
        b"{\"a\":-0}",
        b"{\"a\":-}",
        b"{\"a\":1e99999}",
        b"{\"a\":\"\\",
        b"{\"a\":\"\\\"[[[[",
        b"{\"a\":18446744073709551616e1}",
        b"{\"a\":-0.0e-0}",
        // Found by cargo-fuzz: a repeated key holding a byte that is not UTF-8,
        // in a document with a wide number (sonic-rs's raw-number path does
        // not check UTF-8); formatting the key for the dead letter panicked.
        b"{\"a\xd4\":180.188888055521677,\"a\xd4\":1}",
        b"{\"ay{{.1\":180.1888880555216777,\"$.1\xd4\":180.1888880555216777,\"c\":180.1888880555216777,\"$.1\xd4\":180.1888880555216777,\"cp2rcneu:ayment_id,,p2rcneu:ayment_id,,,,,,,,,-606{{\x8c{t\":false}",
        b"{\"\xff\":1}",
        b"{\"a\":\"\xc3\x28\"}",
    ] {
        check_any(bytes);
    }
}

#[test]
fn bytes_that_are_not_utf8_are_refused_with_where() {
    for (bytes, at) in [
        (&b"{\"a\xd4\":180.188888055521677}"[..], 3),
        (b"{\"a\xd4\":1}", 3),
        (b"{\"a\":\"\xc3\x28\"}", 6),
    ] {
        let (_, reason) = Event::parse(bytes.to_vec()).expect_err("not UTF-8");
        assert_eq!(
            reason,
            format!("not valid UTF-8: invalid byte sequence at byte {at}")
        );
    }
}
