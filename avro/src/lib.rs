//! Keystone's Avro: records framed in the schema registry's wire format,
//! read as Keystone's JSON events and written from them, and the processing
//! contracts that registered schemas give.
//!
//! - [`wire`]: the Confluent framing (magic byte, schema id, datum).
//! - [`json`]: Avro values as JSON events and back, logical types included.
//! - [`contract`]: a registered schema as an input contract; an output
//!   contract as the schema a sink registers.
//! - [`registry`]: a client of a Confluent-compatible schema registry.
//! - [`plan`]: a pipeline plan's Avro parts, resolved against a registry.
//! - [`decode`] and [`encode`]: one framed record each way, with the writer
//!   schema resolved against the reader's by Avro's resolution rules;
//!   [`decode_json`] and [`encode_document`] the same for an event held in
//!   another document model than `serde_json`'s.

mod compat;
pub mod contract;
pub mod json;
pub mod plan;
pub mod registry;
pub mod wire;

use std::fmt;
use std::io::{self, Read};

use apache_avro::headers::HeaderBuilder;
use apache_avro::types::Value as AvroValue;
use apache_avro::{GenericSingleObjectReader, GenericSingleObjectWriter, Schema};

pub use apache_avro::Schema as AvroSchema;
pub use compat::{can_read, explain};
pub use json::Shape;

/// Why a record could not be read or written. Each is the record's fault, not
/// the registry's: the reader dead-letters it with this reason.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("the record does not decode with its writer schema (id {id}): {reason}")]
    Undecodable { id: u32, reason: String },
    #[error("the record's writer schema (id {id}) cannot be read as the reader schema: {reason}")]
    Unresolvable { id: u32, reason: String },
    #[error("{extra} bytes follow the record written with schema id {id}")]
    TrailingBytes { id: u32, extra: usize },
    #[error("{0}")]
    Value(#[from] json::ValueError),
    #[error("the value does not fit the sink's schema: {0}")]
    Encode(String),
}

/// The longest string, bytes or sequence count a record may declare. The
/// codec allocates what a length prefix declares before it reads the data, so
/// a poison record could otherwise ask for gigabytes; a Kafka record is far
/// smaller than this.
pub const MAX_DECLARED_LENGTH: usize = 32 << 20;

/// Caps what the codec allocates for one declared length. The codec's limit is
/// process-wide and set by its first use: a process calls this before it
/// reads anything Avro (an Iceberg manifest included); [`decode`] calls it too.
/// Returns the limit in force.
pub fn limit_allocations() -> usize {
    apache_avro::util::max_allocation_bytes(MAX_DECLARED_LENGTH)
}

/// A datum read to its end and no further. The codec reads a string or a
/// union cut short by the end of its input as null (it reads streams that may
/// end there); past the end of a datum this reader fails instead, so a
/// truncated record is an error and not a record with nulls.
struct Datum<'a>(&'a [u8]);

impl Read for Datum<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() && !buf.is_empty() {
            return Err(io::Error::other(
                "the datum ends inside a field (truncated)",
            ));
        }
        self.0.read(buf)
    }
}

/// The JSON event of a datum written with `writer` (schema id `id`), read as
/// `reader`. The caller checks [`can_read`] once per writer schema; a datum
/// that still fails to resolve is reported as unresolvable.
pub fn decode(
    id: u32,
    datum: &[u8],
    writer: &Schema,
    reader: &Shape,
) -> Result<serde_json::Value, RecordError> {
    Ok(reader.to_json(&resolved(id, datum, writer, reader)?)?)
}

/// A writer schema prepared once for the many datums written with it: the
/// codec's per-datum entry points resolve a schema's named types on every
/// call, this resolves them once; and whether it is the reader's own schema
/// (see [`is_reader_schema`]), whose datums need no resolution.
pub struct WriterSchema {
    decoder: GenericSingleObjectReader,
    is_reader: bool,
}

/// The single-object reader's header, which Confluent-framed datums lack
/// (their frame is split off before decoding).
struct NoHeader;

impl HeaderBuilder for NoHeader {
    fn build_header(&self) -> Vec<u8> {
        Vec::new()
    }
}

impl WriterSchema {
    /// `schema` prepared for datums read as `reader`; `Err` with the reason
    /// when its named types do not resolve.
    pub fn new(schema: &Schema, reader: &Shape) -> Result<Self, String> {
        let decoder = GenericSingleObjectReader::new_with_header_builder(schema.clone(), NoHeader)
            .map_err(|e| {
                format!(
                    "the schema's named types do not resolve: {}",
                    error_chain(&e)
                )
            })?;
        Ok(Self {
            is_reader: is_reader_schema(schema, reader),
            decoder,
        })
    }

    pub fn is_reader(&self) -> bool {
        self.is_reader
    }
}

impl fmt::Debug for WriterSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriterSchema")
            .field("is_reader", &self.is_reader)
            .finish_non_exhaustive()
    }
}

/// As [`decode`], the event appended to `out` as its JSON text (what
/// `serde_json` writes of it), for a reader whose documents are parsed from
/// text: no `serde_json` value is built on the way. A datum written with the
/// reader's own schema skips resolution: it already has the reader's shape.
pub fn decode_json(
    id: u32,
    datum: &[u8],
    writer: &WriterSchema,
    reader: &Shape,
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    let value = read_prepared(id, datum, writer)?;
    let value = if writer.is_reader {
        value
    } else {
        resolve(id, value, reader)?
    };
    Ok(reader.write_json(&value, out)?)
}

/// Whether `writer` is the reader's own schema, logical types, defaults
/// and all (what a producer writing with the version a pipeline reads with
/// sends): its records then need no resolution.
pub fn is_reader_schema(writer: &Schema, reader: &Shape) -> bool {
    // The parsing canonical form drops logical types, which resolution
    // would apply: compare the whole schemas.
    match (
        serde_json::to_value(writer),
        serde_json::to_value(reader.schema()),
    ) {
        (Ok(writer), Ok(reader)) => writer == reader,
        _ => false,
    }
}

/// The datum's value as written, with the writer's names resolved once.
fn read_prepared(id: u32, datum: &[u8], writer: &WriterSchema) -> Result<AvroValue, RecordError> {
    read_to_end(id, datum, |rest| writer.decoder.read_value(rest))
}

/// The datum's value as written.
fn read_datum(id: u32, datum: &[u8], writer: &Schema) -> Result<AvroValue, RecordError> {
    read_to_end(id, datum, |rest| {
        apache_avro::from_avro_datum(writer, rest, None)
    })
}

/// The value `read` takes from the datum, which must read it to its end and
/// no further.
fn read_to_end(
    id: u32,
    datum: &[u8],
    read: impl FnOnce(&mut Datum<'_>) -> apache_avro::AvroResult<AvroValue>,
) -> Result<AvroValue, RecordError> {
    limit_allocations();
    let mut rest = Datum(datum);
    let value = read(&mut rest).map_err(|e| RecordError::Undecodable {
        id,
        reason: error_chain(&e),
    })?;
    if !rest.0.is_empty() {
        return Err(RecordError::TrailingBytes {
            id,
            extra: rest.0.len(),
        });
    }
    Ok(value)
}

/// The Avro value of a datum written with `writer`, resolved to `reader`.
fn resolved(
    id: u32,
    datum: &[u8],
    writer: &Schema,
    reader: &Shape,
) -> Result<AvroValue, RecordError> {
    resolve(id, read_datum(id, datum, writer)?, reader)
}

/// A datum's `value` resolved to `reader`.
fn resolve(id: u32, value: AvroValue, reader: &Shape) -> Result<AvroValue, RecordError> {
    // Only a reader with decimals meets the codec's decimal width check.
    let value = if reader.has_decimals() {
        widen_decimals(value)
    } else {
        value
    };
    value
        .resolve(reader.schema())
        .map_err(|e| RecordError::Unresolvable {
            id,
            reason: e.to_string(),
        })
}

/// The bytes every decimal is widened to before resolution: enough for 76
/// digits.
const DECIMAL_WIDTH: usize = 32;

/// Decimals sign-extended to [`DECIMAL_WIDTH`] bytes. Writers store a bytes
/// decimal in as few bytes as its value needs (`12.34` in two), and the
/// codec's resolution refuses one whose byte length could not hold the
/// schema's whole precision; the value is the same at any width.
fn widen_decimals(value: AvroValue) -> AvroValue {
    match value {
        AvroValue::Decimal(decimal) => {
            let unscaled = num_bigint::BigInt::from(decimal);
            let bytes = unscaled.to_signed_bytes_be();
            let fill = if unscaled.sign() == num_bigint::Sign::Minus {
                0xFF
            } else {
                0
            };
            let mut wide = vec![fill; DECIMAL_WIDTH.saturating_sub(bytes.len())];
            wide.extend_from_slice(&bytes);
            AvroValue::Decimal(apache_avro::Decimal::from(wide))
        }
        AvroValue::Union(index, inner) => AvroValue::Union(index, Box::new(widen_decimals(*inner))),
        AvroValue::Array(items) => {
            AvroValue::Array(items.into_iter().map(widen_decimals).collect())
        }
        AvroValue::Map(entries) => AvroValue::Map(
            entries
                .into_iter()
                .map(|(k, v)| (k, widen_decimals(v)))
                .collect(),
        ),
        AvroValue::Record(fields) => AvroValue::Record(
            fields
                .into_iter()
                .map(|(k, v)| (k, widen_decimals(v)))
                .collect(),
        ),
        other => other,
    }
}

/// An error with its sources: the codec's own message often leaves the cause
/// (a truncation) to its source.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// Writes events as framed records of one schema registered as one id, the
/// schema's named types resolved once: the codec's per-datum
/// `to_avro_datum` resolves them twice for every datum, which costs more
/// than encoding a small record.
pub struct FramedWriter {
    shape: Shape,
    single: GenericSingleObjectWriter,
}

/// The codec's single-object writer puts a header of 10 to 20 bytes (its
/// own format's) before each datum. The wire format's frame is 5: the
/// header is the frame behind [`HEADER_PAD`] bytes, cut off after writing.
struct PaddedFrame(u32);

const HEADER_PAD: usize = 5;

impl HeaderBuilder for PaddedFrame {
    fn build_header(&self) -> Vec<u8> {
        let mut header = vec![0; HEADER_PAD];
        header.extend_from_slice(&wire::frame(self.0, &[]));
        header
    }
}

impl FramedWriter {
    /// Records of `shape`'s schema, registered as `id`.
    pub fn new(shape: Shape, id: u32) -> Result<Self, RecordError> {
        let single = GenericSingleObjectWriter::new_with_capacity_and_header_builder(
            shape.schema(),
            64,
            PaddedFrame(id),
        )
        .map_err(|e| RecordError::Encode(error_chain(&e)))?;
        Ok(Self { shape, single })
    }

    /// The framed record of an event held in the document model `D`.
    pub fn encode<D: json::Document>(&mut self, event: &D::Value) -> Result<Vec<u8>, RecordError> {
        let value = self.shape.from_document::<D>(event)?;
        let mut framed = Vec::with_capacity(64);
        self.single
            .write_value_ref(&value, &mut framed)
            .map_err(|e| RecordError::Encode(error_chain(&e)))?;
        framed.drain(..HEADER_PAD);
        Ok(framed)
    }
}

/// A JSON event as a framed record of `shape`'s schema, registered as `id`.
pub fn encode(event: &serde_json::Value, shape: &Shape, id: u32) -> Result<Vec<u8>, RecordError> {
    encode_document::<json::SerdeJson>(event, shape, id)
}

/// As [`encode`], for an event held in the document model `D`.
pub fn encode_document<D: json::Document>(
    event: &D::Value,
    shape: &Shape,
    id: u32,
) -> Result<Vec<u8>, RecordError> {
    let value = shape.from_document::<D>(event)?;
    let datum = apache_avro::to_avro_datum(shape.schema(), value)
        .map_err(|e| RecordError::Encode(e.to_string()))?;
    Ok(wire::frame(id, &datum))
}

#[cfg(test)]
mod tests;
