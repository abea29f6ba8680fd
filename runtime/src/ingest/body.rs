//! An ingest request's body, from bytes on the wire to checked events: its
//! content encoding undone within the body limit, split into records (one
//! JSON object, a JSON array of objects, or NDJSON), each record parsed with
//! the limits every event has and checked against the source contract.
//!
//! Whatever the body holds, the outcome is a [`Refusal`] with a status in the
//! 4xx range or a list of records: no input makes this panic or allocate past
//! the body limit (a compressed body is inflated at most to that limit).

use std::io::Read;

use sonic_rs::{JsonContainerTrait, JsonValueMutTrait, JsonValueTrait, Value};

use crate::event::{
    Event, FieldPath, MAX_DEPTH, MAX_EVENT_BYTES, parse_nested, parse_value, type_name,
    unstorable_number,
};
use crate::schema::Validator;

/// How the records are laid out in the body, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `application/json`: one object, or an array of objects.
    Json,
    /// `application/x-ndjson` (or `ndjson`, `jsonl`): one object per line.
    Ndjson,
}

/// The body's `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

/// Why a request is refused whole: the HTTP status and a message naming what
/// is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

impl Refusal {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

/// What is wrong with one record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// The record's position in the batch, from 0 (the line's, for NDJSON,
    /// not counting blank lines).
    pub index: usize,
    /// The declared field the record fails, when the fault is one field's.
    pub field: Option<String>,
    pub reason: String,
}

/// One record of a batch: an event ready to produce, or what is wrong with it.
pub type Checked = Result<Event, RecordError>;

/// The limits a request is held to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most bytes of a body, after its content encoding is undone.
    pub max_body_bytes: usize,
    /// The most records in one request.
    pub max_records: usize,
}

impl Framing {
    /// The framing a `Content-Type` names; JSON when there is none. A charset
    /// other than UTF-8 is refused: JSON on the wire is UTF-8.
    pub fn from_content_type(header: Option<&str>) -> Result<Framing, Refusal> {
        let Some(header) = header else {
            return Ok(Framing::Json);
        };
        let mut parts = header.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        for parameter in parts {
            let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
            let value = value.trim().trim_matches('"');
            if name.trim().eq_ignore_ascii_case("charset") && !value.eq_ignore_ascii_case("utf-8") {
                return Err(Refusal::new(
                    415,
                    format!("charset {value:?} is not supported: send UTF-8"),
                ));
            }
        }
        match media.as_str() {
            "application/json" => Ok(Framing::Json),
            "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines" => Ok(Framing::Ndjson),
            _ => Err(Refusal::new(
                415,
                format!(
                    "content type {media:?} is not supported: send application/json (an object or an array of objects) or application/x-ndjson (an object per line)"
                ),
            )),
        }
    }
}

impl Encoding {
    /// The encoding a `Content-Encoding` names; identity when there is none.
    pub fn from_header(header: Option<&str>) -> Result<Encoding, Refusal> {
        match header.map(|h| h.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("identity") => Ok(Encoding::Identity),
            Some("gzip") | Some("x-gzip") => Ok(Encoding::Gzip),
            Some("zstd") => Ok(Encoding::Zstd),
            Some(other) => Err(Refusal::new(
                415,
                format!("content encoding {other:?} is not supported: send identity, gzip or zstd"),
            )),
        }
    }
}

/// The body with its content encoding undone, at most `limit` bytes of it.
pub fn decode(body: Vec<u8>, encoding: Encoding, limit: usize) -> Result<Vec<u8>, Refusal> {
    let too_large = || {
        Refusal::new(
            413,
            format!("the body is larger than the limit of {limit} bytes"),
        )
    };
    let inflate = |reader: &mut dyn Read, name: &str| -> Result<Vec<u8>, Refusal> {
        let mut out = Vec::new();
        // One byte past the limit tells a body at the limit from a larger one.
        reader
            .take(limit as u64 + 1)
            .read_to_end(&mut out)
            .map_err(|e| Refusal::new(400, format!("the {name} body cannot be decoded: {e}")))?;
        if out.len() > limit {
            return Err(too_large());
        }
        Ok(out)
    };
    match encoding {
        Encoding::Identity if body.len() > limit => Err(too_large()),
        Encoding::Identity => Ok(body),
        Encoding::Gzip => inflate(&mut flate2::read::MultiGzDecoder::new(&body[..]), "gzip"),
        Encoding::Zstd => {
            let mut decoder = zstd::stream::read::Decoder::new(&body[..])
                .map_err(|e| Refusal::new(400, format!("the zstd body cannot be decoded: {e}")))?;
            inflate(&mut decoder, "zstd")
        }
    }
}

/// The contract records are checked against at the edge: the source schema
/// and the key fields the topic is partitioned by.
pub struct Contract {
    validator: Validator,
    key: Vec<FieldPath>,
}

impl Contract {
    pub fn new(validator: Validator, key: &[String]) -> Self {
        Contract {
            validator,
            key: key.iter().map(|k| FieldPath::new(k)).collect(),
        }
    }

    /// The key fields records are partitioned by.
    pub fn key(&self) -> &[FieldPath] {
        &self.key
    }

    fn check(&self, index: usize, value: Value, raw: Vec<u8>) -> Checked {
        if may_hold_wide_numbers(&raw)
            && let Some((place, number)) = first_wide_number(&value, &mut String::new())
        {
            return Err(RecordError {
                index,
                reason: format!(
                    "field {place:?} is the number {number}, which does not fit in 64 bits: sinks cannot store it; send it as a string"
                ),
                field: Some(place),
            });
        }
        if let Err(violation) = self.validator.violation(&value) {
            return Err(RecordError {
                index,
                field: Some(violation.field),
                reason: violation.message,
            });
        }
        for field in &self.key {
            match field.get(&value) {
                Some(v) if !v.is_null() => {}
                _ => {
                    return Err(RecordError {
                        index,
                        field: Some(field.dotted.clone()),
                        reason: format!(
                            "missing key field {:?}: records are partitioned by it",
                            field.dotted
                        ),
                    });
                }
            }
        }
        Ok(Event::new(value, raw))
    }
}

/// The idempotency key of a request, written into each of its records as
/// `<key>/<index>` before they are checked (the field may be declared).
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    pub field: &'a str,
    pub key: &'a str,
}

/// Splits a decoded body into records, stamps them, and checks each against
/// `contract`. A body that is not a batch at all (malformed JSON around an
/// array, more records than the limit) is refused whole.
pub fn records(
    bytes: &[u8],
    framing: Framing,
    limits: Limits,
    contract: &Contract,
    stamp: Option<Stamp<'_>>,
) -> Result<Vec<Checked>, Refusal> {
    let parsed = match framing {
        Framing::Json => json_records(bytes, limits.max_records)?,
        Framing::Ndjson => ndjson_records(bytes, limits.max_records)?,
    };
    Ok(parsed
        .into_iter()
        .enumerate()
        .map(|(index, record)| {
            let (mut value, mut raw) = record.map_err(|reason| RecordError {
                index,
                field: None,
                reason,
            })?;
            if let Some(stamp) = stamp
                && let Some(object) = value.as_object_mut()
            {
                let key = format!("{}/{index}", stamp.key);
                object.insert(stamp.field, Value::from(key.as_str()));
                raw = sonic_rs::to_vec(&value).map_err(|e| RecordError {
                    index,
                    field: None,
                    reason: e.to_string(),
                })?;
            }
            contract.check(index, value, raw)
        })
        .collect())
}

/// A parsed record and its bytes, or why it is not an event.
type Parsed = Result<(Value, Vec<u8>), String>;

fn json_records(bytes: &[u8], max_records: usize) -> Result<Vec<Parsed>, Refusal> {
    let text = strip_bom(bytes).trim_ascii();
    if text.first() != Some(&b'[') {
        return Ok(vec![one_record(text.to_vec())]);
    }
    // The array adds a level above its events.
    let array = parse_nested(text, MAX_DEPTH + 1)
        .map_err(|reason| Refusal::new(400, format!("the body is not a JSON array: {reason}")))?;
    let Some(items) = array.into_array() else {
        return Err(Refusal::new(400, "the body is not a JSON array"));
    };
    if items.len() > max_records {
        return Err(too_many(items.len(), max_records));
    }
    // The items are taken out of the array, not copied.
    Ok(items
        .into_iter()
        .map(|item| {
            if !item.is_object() {
                return Err(format!(
                    "not a JSON object: the record is a JSON {}",
                    type_name(&item)
                ));
            }
            let raw = sonic_rs::to_vec(&item).map_err(|e| e.to_string())?;
            if raw.len() > MAX_EVENT_BYTES {
                return Err(format!(
                    "the record is {} bytes, larger than the limit of {MAX_EVENT_BYTES} bytes",
                    raw.len()
                ));
            }
            Ok((item, raw))
        })
        .collect())
}

fn ndjson_records(bytes: &[u8], max_records: usize) -> Result<Vec<Parsed>, Refusal> {
    let lines: Vec<&[u8]> = strip_bom(bytes)
        .split(|b| *b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|line| !line.is_empty())
        .collect();
    if lines.len() > max_records {
        return Err(too_many(lines.len(), max_records));
    }
    Ok(lines
        .into_iter()
        .map(|line| one_record(line.to_vec()))
        .collect())
}

fn one_record(raw: Vec<u8>) -> Parsed {
    if raw.len() > MAX_EVENT_BYTES {
        return Err(format!(
            "the record is {} bytes, larger than the limit of {MAX_EVENT_BYTES} bytes",
            raw.len()
        ));
    }
    let value = parse_value(&raw)?;
    if !value.is_object() {
        return Err(format!(
            "not a JSON object: the record is a JSON {}",
            type_name(&value)
        ));
    }
    Ok((value, raw))
}

fn too_many(count: usize, max: usize) -> Refusal {
    Refusal::new(
        413,
        format!("the request has {count} records, more than the limit of {max}"),
    )
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// Whether `raw` may hold a number without a 64-bit form: an integer of 19 or
/// more digits, or an exponent of 3 or more digits. One pass over the bytes,
/// so that ordinary records skip the walk of [`first_wide_number`].
fn may_hold_wide_numbers(raw: &[u8]) -> bool {
    let mut digits = 0;
    let mut bytes = raw.iter().peekable();
    while let Some(&byte) = bytes.next() {
        if byte.is_ascii_digit() {
            digits += 1;
            if digits >= 19 {
                return true;
            }
            continue;
        }
        if digits > 0 && (byte == b'e' || byte == b'E') {
            bytes.next_if(|b| **b == b'+' || **b == b'-');
            let mut exponent = 0;
            while bytes.next_if(|b| b.is_ascii_digit()).is_some() {
                exponent += 1;
            }
            if exponent >= 3 {
                return true;
            }
        }
        digits = 0;
    }
    false
}

/// The place (`a.b[2]`) and text of the first number in `value` that is
/// neither a 64-bit integer nor a finite double.
fn first_wide_number(value: &Value, pointer: &mut String) -> Option<(String, String)> {
    if value.is_number() {
        return unstorable_number(value).map(|text| (pointer.clone(), text));
    }
    let length = pointer.len();
    let found = if let Some(object) = value.as_object() {
        object.iter().find_map(|(name, member)| {
            pointer.truncate(length);
            if length > 0 {
                pointer.push('.');
            }
            pointer.push_str(name);
            first_wide_number(member, pointer)
        })
    } else if let Some(items) = value.as_array() {
        items.iter().enumerate().find_map(|(i, item)| {
            pointer.truncate(length);
            pointer.push_str(&format!("[{i}]"));
            first_wide_number(item, pointer)
        })
    } else {
        None
    };
    pointer.truncate(length);
    found
}
