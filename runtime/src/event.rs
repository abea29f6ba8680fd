//! Events as the runtime carries them, and how fields are reached in them.

mod document;

use keystone_crds::schema::FieldType;
use sonic_rs::{JsonContainerTrait, JsonType, JsonValueMutTrait, JsonValueTrait, Object, Value};

pub use document::{MAX_DEPTH, MAX_EVENT_BYTES};

/// One event: the bytes it arrived as and the document parsed from them once per stage.
#[derive(Clone, Debug)]
pub struct Event {
    /// The JSON object every step reads and writes.
    pub value: Value,
    /// The bytes the event arrived as (a source line or Kafka record value); dead
    /// letters carry them so that nothing is lost.
    pub raw: Vec<u8>,
    /// The pipeline source record the event comes from, on Kafka.
    pub source: Option<Provenance>,
}

/// Where an event came from: a partition and offset of the pipeline's source
/// topic. Steps carry it along unchanged and sink records name it in headers, so
/// that a replay can tell which events a sink already holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Provenance {
    pub partition: i32,
    pub offset: i64,
}

/// Why an event that left the steps is too large to be written as one record
/// (`bytes` serialized), if it is: a step can make an event larger than any
/// input (a `map` adding fields), and a broker refuses a record over its
/// limit, which would fail the batch and, retried, stop the stage. The bound
/// is the one for input, so whatever a stage writes another stage can read.
pub fn too_large_to_write(bytes: usize) -> Option<String> {
    (bytes > MAX_EVENT_BYTES).then(|| {
        format!(
            "the event is {bytes} bytes after the steps, larger than the limit of {MAX_EVENT_BYTES} bytes for a record a stage writes"
        )
    })
}

impl Event {
    /// An event of a document and the bytes it was read from, of no known source record.
    pub fn new(value: Value, raw: Vec<u8>) -> Event {
        Event {
            value,
            raw,
            source: None,
        }
    }

    /// Parses `raw` as one JSON object. On failure the reason is returned with the
    /// bytes: larger than [`MAX_EVENT_BYTES`], not JSON, nested deeper than
    /// [`MAX_DEPTH`], an object with a repeated key, or not an object. A leading
    /// UTF-8 byte order mark is ignored.
    pub fn parse(raw: Vec<u8>) -> Result<Event, (Vec<u8>, String)> {
        if raw.len() > MAX_EVENT_BYTES {
            let reason = format!(
                "the event is {} bytes, larger than the limit of {MAX_EVENT_BYTES} bytes",
                raw.len()
            );
            return Err((raw, reason));
        }
        match document::parse_document(&raw, MAX_DEPTH) {
            Ok(value) if value.is_object() => Ok(Event::new(value, raw)),
            Ok(value) => {
                let reason = format!(
                    "not a JSON object: the event is a JSON {}",
                    type_name(&value)
                );
                Err((raw, reason))
            }
            Err(reason) => Err((raw, reason)),
        }
    }

    /// An event built from a document; its `raw` bytes are the serialized document.
    pub fn from_value(value: Value) -> Event {
        let raw = sonic_rs::to_vec(&value).unwrap_or_default();
        Event::new(value, raw)
    }

    /// Writes the document as one line of JSON.
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        // Serializing a parsed document cannot fail: keys are strings and numbers finite.
        let _ = sonic_rs::to_writer(&mut *out, &self.value);
        out.push(b'\n');
    }
}

/// Parses a document that is not an event (a table row, a record key) with the
/// limits events have: nesting within [`MAX_DEPTH`], no repeated key, numbers
/// kept exactly, a leading byte order mark ignored.
pub fn parse_value(bytes: &[u8]) -> Result<Value, String> {
    document::parse_document(bytes, MAX_DEPTH)
}

/// As [`parse_value`], with nesting within `max_depth` (a batch of events one
/// level above them).
pub fn parse_nested(bytes: &[u8], max_depth: usize) -> Result<Value, String> {
    document::parse_document(bytes, max_depth)
}

/// Parses back a document the runtime wrote or checked before (a stored row, a
/// waiting event in a changelog), keeping numbers as they were.
pub(crate) fn reparse(bytes: &[u8]) -> Option<Value> {
    document::reparse(bytes)
}

/// An event that could not be processed, with why and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The step that refused it; `source` for input that failed to parse or to match
    /// the source schema.
    pub step: String,
    pub reason: String,
    /// The bytes the event arrived as.
    pub original: Vec<u8>,
}

impl DeadLetter {
    /// `{"reason": ..., "step": ..., "original": ...}` as one line; `original` is the
    /// input text (invalid UTF-8 replaced by U+FFFD).
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        #[derive(serde::Serialize)]
        struct Record<'a> {
            reason: &'a str,
            step: &'a str,
            original: std::borrow::Cow<'a, str>,
        }
        let record = Record {
            reason: &self.reason,
            step: &self.step,
            original: String::from_utf8_lossy(&self.original),
        };
        let _ = serde_json::to_writer(&mut *out, &record);
        out.push(b'\n');
    }
}

/// The JSON type of a value, as messages name it.
pub fn type_name(value: &Value) -> &'static str {
    match value.get_type() {
        JsonType::Null => "null",
        JsonType::Boolean => "boolean",
        JsonType::Number if value.is_i64() || value.is_u64() => "integer",
        JsonType::Number if document::wide_number(value).is_some_and(|n| is_integer_text(&n)) => {
            "integer beyond 64 bits"
        }
        JsonType::Number => "number",
        JsonType::String => "string",
        JsonType::Object => "object",
        JsonType::Array => "array",
    }
}

/// The text of a number no sink can store, if `value` is one: an integer
/// beyond the 64-bit range, or a float beyond a double's.
pub(crate) fn unstorable_number(value: &Value) -> Option<String> {
    let number = document::wide_number(value)?;
    let text = number.as_str();
    (is_integer_text(&number) || !text.parse::<f64>().is_ok_and(f64::is_finite))
        .then(|| text.to_owned())
}

fn is_integer_text(number: &sonic_rs::RawNumber) -> bool {
    !number.as_str().contains(['.', 'e', 'E'])
}

/// Whether `value` is of the schema type `expected`.
pub fn conforms(value: &Value, expected: FieldType) -> bool {
    match expected {
        FieldType::String => value.is_str(),
        FieldType::Integer => value.is_i64() || value.is_u64(),
        FieldType::Number => value.is_number(),
        FieldType::Boolean => value.is_boolean(),
        FieldType::Timestamp => timestamp_ms(value).is_some(),
        FieldType::Object => value.is_object(),
        FieldType::Array => value.is_array(),
        FieldType::Any => true,
    }
}

/// A timestamp value as epoch milliseconds: an integer is taken as epoch
/// milliseconds, a string must be RFC 3339.
pub fn timestamp_ms(value: &Value) -> Option<i64> {
    if let Some(ms) = value.as_i64() {
        return Some(ms);
    }
    let text = value.as_str()?;
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// A dotted field path (`customer.id`), split once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath {
    pub dotted: String,
    segments: Vec<String>,
}

impl FieldPath {
    pub fn new(dotted: &str) -> Self {
        Self {
            dotted: dotted.to_owned(),
            segments: dotted.split('.').map(str::to_owned).collect(),
        }
    }

    /// The first segment: the top-level field the path starts at.
    pub fn top(&self) -> &str {
        &self.segments[0]
    }

    pub fn get<'a>(&self, value: &'a Value) -> Option<&'a Value> {
        let mut current = value;
        for segment in &self.segments {
            current = current.as_object()?.get(segment)?;
        }
        Some(current)
    }

    /// Sets the field, creating (or replacing non-object) parents as objects.
    pub fn set(&self, root: &mut Value, new: Value) {
        let mut current = root;
        let (last, parents) = self.segments.split_last().expect("a path has a segment");
        for segment in parents {
            if !current.is_object() {
                *current = Value::from(Object::new());
            }
            let object = current.as_object_mut().expect("made an object above");
            if !object.contains_key(segment) {
                object.insert(segment, Value::from(Object::new()));
            }
            current = object.get_mut(segment).expect("inserted above");
            if !current.is_object() {
                *current = Value::from(Object::new());
            }
        }
        if !current.is_object() {
            *current = Value::from(Object::new());
        }
        current
            .as_object_mut()
            .expect("an object")
            .insert(last, new);
    }
}

/// A new object with `members` in the given order. sonic-rs keeps member order
/// only in parsed documents (a mutable object is a hash map), so the object is
/// written as text and parsed back: for a few members that is about as cheap as
/// inserting them into a map.
pub fn ordered_object<'a>(
    members: impl IntoIterator<Item = (&'a str, &'a Value)>,
    buf: &mut Vec<u8>,
) -> Value {
    buf.clear();
    buf.push(b'{');
    for (i, (name, value)) in members.into_iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        let _ = sonic_rs::to_writer(&mut *buf, name);
        buf.push(b':');
        let _ = sonic_rs::to_writer(&mut *buf, value);
    }
    buf.push(b'}');
    document::reparse(buf).unwrap_or_else(|| Value::from(Object::new()))
}

/// `original` with `writes` applied (each sets a dotted path, parents created or
/// replaced by objects, later writes win), keeping the original member order and
/// appending new members in write order. Built as text and parsed back, because
/// sonic-rs keeps member order only in parsed documents.
pub fn with_writes(original: &Value, writes: &[(&FieldPath, Value)], buf: &mut Vec<u8>) -> Value {
    buf.clear();
    let paths: Vec<(&[String], &Value)> = writes
        .iter()
        .map(|(p, v)| (p.segments.as_slice(), v))
        .collect();
    write_merged(Some(original), &paths, buf);
    document::reparse(buf).unwrap_or_else(|| original.clone())
}

fn write_merged(original: Option<&Value>, writes: &[(&[String], &Value)], out: &mut Vec<u8>) {
    out.push(b'{');
    let mut first = true;
    let mut member = |out: &mut Vec<u8>, name: &str| {
        if !first {
            out.push(b',');
        }
        first = false;
        let _ = sonic_rs::to_writer(&mut *out, name);
        out.push(b':');
    };
    let object = original.and_then(|v| v.as_object());
    if let Some(object) = object {
        for (name, value) in object.iter() {
            member(out, name);
            write_member(Some(value), name, writes, out);
        }
    }
    let mut added: Vec<&str> = Vec::new();
    for (segments, _) in writes {
        let name = segments[0].as_str();
        let exists = object.is_some_and(|o| o.contains_key(&name));
        if !exists && !added.contains(&name) {
            added.push(name);
        }
    }
    for name in added {
        member(out, name);
        write_member(None, name, writes, out);
    }
    out.push(b'}');
}

/// Writes the value of member `name`: the last write of exactly this member, or
/// the original merged with the writes below it, or the original unchanged.
fn write_member(
    original: Option<&Value>,
    name: &str,
    writes: &[(&[String], &Value)],
    out: &mut Vec<u8>,
) {
    let mut replaced: Option<(usize, &Value)> = None;
    let mut nested: Vec<(usize, (&[String], &Value))> = Vec::new();
    for (index, (segments, value)) in writes.iter().enumerate() {
        if segments[0] != name {
            continue;
        }
        if segments.len() == 1 {
            replaced = Some((index, *value));
        } else {
            nested.push((index, (&segments[1..], *value)));
        }
    }
    // Nested writes before the last whole-member write are overwritten by it.
    let after = replaced.map_or(0, |(i, _)| i + 1);
    let nested: Vec<(&[String], &Value)> = nested
        .into_iter()
        .filter(|(i, _)| *i >= after)
        .map(|(_, w)| w)
        .collect();
    let base = match replaced {
        Some((_, value)) => Some(value),
        None => original,
    };
    if nested.is_empty() {
        match base {
            Some(value) => {
                let _ = sonic_rs::to_writer(&mut *out, value);
            }
            None => out.extend_from_slice(b"null"),
        }
    } else {
        write_merged(base.filter(|v| v.is_object()), &nested, out);
    }
}

/// An RFC 6901 JSON pointer, split and unescaped once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pointer {
    pub text: String,
    tokens: Vec<String>,
}

impl Pointer {
    /// `None` when `text` does not start with `/`.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix('/')?;
        Some(Self {
            text: text.to_owned(),
            tokens: rest
                .split('/')
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect(),
        })
    }

    /// Reads the value; a token indexes an array when it is a decimal index.
    pub fn get<'a>(&self, value: &'a Value) -> Option<&'a Value> {
        let mut current = value;
        for token in &self.tokens {
            current = if let Some(object) = current.as_object() {
                object.get(token)?
            } else if let Some(array) = current.as_array() {
                let index: usize = token.parse().ok()?;
                array.get(index)?
            } else {
                return None;
            };
        }
        Some(current)
    }
}

/// Appends a canonical, type-tagged encoding of the values of `fields` to `out`:
/// equal keys encode equally and `"1"`, `1` and `1.0` all differ. Returns the
/// first missing field.
pub fn encode_key<'p>(
    value: &Value,
    fields: &'p [FieldPath],
    out: &mut Vec<u8>,
) -> Result<(), &'p FieldPath> {
    for field in fields {
        let Some(v) = field.get(value) else {
            return Err(field);
        };
        encode_value(v, out);
        out.push(0xff);
    }
    Ok(())
}

fn encode_value(v: &Value, out: &mut Vec<u8>) {
    if let Some(s) = v.as_str() {
        out.push(b's');
        out.extend_from_slice(s.as_bytes());
    } else if let Some(i) = v.as_i64() {
        out.push(b'i');
        out.extend_from_slice(&i.to_be_bytes());
    } else {
        // Rare key types (floats, booleans, objects): their JSON text.
        out.push(b'j');
        let _ = sonic_rs::to_writer(&mut *out, v);
    }
}

/// The Kafka record key of an event: the single key field's text (strings as
/// is, other values as JSON), or a JSON array of the key values. `None` when a
/// key field is missing or there are no key fields.
pub fn record_key(event: &Event, fields: &[FieldPath]) -> Option<Vec<u8>> {
    match fields {
        [] => None,
        [single] => {
            let value = single.get(&event.value)?;
            Some(match value.as_str() {
                Some(text) => text.as_bytes().to_vec(),
                None => sonic_rs::to_vec(value).ok()?,
            })
        }
        many => {
            let mut values = Vec::with_capacity(many.len());
            for field in many {
                values.push(field.get(&event.value)?.clone());
            }
            sonic_rs::to_vec(&values).ok()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Value {
        sonic_rs::from_str(text).unwrap()
    }

    #[test]
    fn paths_read_and_write_nested_fields() {
        let mut value = doc(r#"{"a":{"b":1},"c":2}"#);
        assert_eq!(FieldPath::new("a.b").get(&value).unwrap().as_i64(), Some(1));
        FieldPath::new("a.d.e").set(&mut value, Value::from(true));
        FieldPath::new("c.x").set(&mut value, Value::new_i64(3));
        let expected: Value =
            sonic_rs::from_str(r#"{"a":{"b":1,"d":{"e":true}},"c":{"x":3}}"#).unwrap();
        assert_eq!(value, expected);
    }

    #[test]
    fn writes_keep_member_order() {
        let original = doc(r#"{"z":1,"a":{"y":2,"b":3},"m":"x"}"#);
        let writes = [
            (&FieldPath::new("a.b"), Value::new_i64(4)),
            (&FieldPath::new("new"), Value::from(true)),
            (&FieldPath::new("m.k"), Value::new_i64(5)),
            (&FieldPath::new("a.c.d"), Value::new_i64(6)),
            (&FieldPath::new("z"), Value::new_i64(0)),
        ];
        let refs: Vec<(&FieldPath, Value)> = writes.iter().map(|(p, v)| (*p, v.clone())).collect();
        let merged = with_writes(&original, &refs, &mut Vec::new());
        assert_eq!(
            sonic_rs::to_string(&merged).unwrap(),
            r#"{"z":0,"a":{"y":2,"b":4,"c":{"d":6}},"m":{"k":5},"new":true}"#
        );
    }

    #[test]
    fn pointers_index_objects_and_arrays() {
        let value = doc(r#"{"a":[{"x/y":5}],"m~n":1}"#);
        assert_eq!(
            Pointer::parse("/a/0/x~1y")
                .unwrap()
                .get(&value)
                .unwrap()
                .as_i64(),
            Some(5)
        );
        assert_eq!(
            Pointer::parse("/m~0n")
                .unwrap()
                .get(&value)
                .unwrap()
                .as_i64(),
            Some(1)
        );
        assert!(Pointer::parse("/a/1").unwrap().get(&value).is_none());
        assert!(Pointer::parse("a").is_none());
    }

    #[test]
    fn keys_are_typed() {
        let fields = [FieldPath::new("k")];
        let encode = |text: &str| {
            let mut out = Vec::new();
            encode_key(&doc(text), &fields, &mut out).unwrap();
            out
        };
        assert_ne!(encode(r#"{"k":"1"}"#), encode(r#"{"k":1}"#));
        assert_ne!(encode(r#"{"k":1}"#), encode(r#"{"k":1.0}"#));
        assert_eq!(encode(r#"{"k":1,"x":2}"#), encode(r#"{"x":3,"k":1}"#));
    }

    #[test]
    fn types_and_timestamps() {
        assert!(conforms(&doc("1"), FieldType::Number));
        assert!(!conforms(&doc("1.5"), FieldType::Integer));
        assert!(conforms(
            &doc(r#""2026-01-01T00:00:00Z""#),
            FieldType::Timestamp
        ));
        assert!(!conforms(&doc(r#""yesterday""#), FieldType::Timestamp));
        assert_eq!(timestamp_ms(&doc(r#""1970-01-01T00:00:01Z""#)), Some(1000));
        assert_eq!(type_name(&doc("[1]")), "array");
    }

    #[test]
    fn parse_failures_keep_the_bytes() {
        let (raw, reason) = Event::parse(b"{oops".to_vec()).unwrap_err();
        assert_eq!(raw, b"{oops");
        assert!(reason.starts_with("invalid JSON"), "{reason}");
        let (_, reason) = Event::parse(b"[1]".to_vec()).unwrap_err();
        assert_eq!(reason, "not a JSON object: the event is a JSON array");
    }
}
