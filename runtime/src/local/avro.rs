//! Avro container files in local mode: `--input FILE.avro` reads each record
//! as an event (its JSON form, as `keystone-avro` reads Avro: logical types
//! as the contract's types), and `--output FILE.avro` writes the events with
//! the schema derived from the pipeline's output contract, so that the same
//! manifest runs on the files a team already keeps.

use std::io::{self, Read, Write};
use std::path::Path;

use apache_avro::types::Value as AvroValue;
use apache_avro::{Codec, DeflateSettings, Reader, Schema, Writer};
use keystone_avro::Shape;
use keystone_avro::contract::schema_for_output;
use keystone_crds::Plan;

use crate::error::RuntimeError;

/// Whether `path` names an Avro container file.
pub fn is_avro(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("avro"))
}

/// The records of an Avro container file as JSON lines, for the line reader
/// of local mode.
pub struct AvroLines<R: Read> {
    records: Reader<'static, R>,
    /// The file's writer schema.
    shape: Shape,
    line: Vec<u8>,
    at: usize,
    /// The index of the next record, for messages.
    index: u64,
}

impl<R: Read> AvroLines<R> {
    /// Reads the file's header (its writer schema).
    pub fn new(input: R, name: &Path) -> Result<Self, RuntimeError> {
        keystone_avro::limit_allocations();
        let records = Reader::new(input).map_err(|e| {
            RuntimeError::Usage(format!(
                "{} is not an Avro container file: {e}",
                name.display()
            ))
        })?;
        let shape = Shape::new(records.writer_schema().clone())
            .map_err(|e| RuntimeError::Usage(format!("the schema of {}: {e}", name.display())))?;
        Ok(Self {
            records,
            shape,
            line: Vec::new(),
            at: 0,
            index: 0,
        })
    }

    fn next_line(&mut self) -> io::Result<bool> {
        let Some(record) = self.records.next() else {
            return Ok(false);
        };
        let index = self.index;
        self.index += 1;
        let invalid = |reason: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("Avro record {index}: {reason}"),
            )
        };
        let record = record.map_err(|e| invalid(e.to_string()))?;
        let event = self
            .shape
            .to_json(&record)
            .map_err(|e| invalid(e.to_string()))?;
        self.line.clear();
        serde_json::to_writer(&mut self.line, &event).map_err(|e| invalid(e.to_string()))?;
        self.line.push(b'\n');
        self.at = 0;
        Ok(true)
    }
}

impl<R: Read> Read for AvroLines<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.line.len() && !self.next_line()? {
            return Ok(0);
        }
        let n = (self.line.len() - self.at).min(buf.len());
        buf[..n].copy_from_slice(&self.line[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The Avro schema of a run's `--output`: the sinks' input contract (every
/// sink receives the same events), as a record named after the pipeline.
pub fn output_schema(plan: &Plan) -> Result<Schema, RuntimeError> {
    let contract = plan.sinks.first().map(|s| &s.schema).ok_or_else(|| {
        RuntimeError::Usage("the pipeline has no sink, so --output has no schema".into())
    })?;
    let name = avro_name(&plan.pipeline);
    let namespace = format!("dev.keystone.{}", avro_name(&plan.namespace));
    let output = schema_for_output(contract, &namespace, &name).map_err(|e| {
        RuntimeError::Usage(format!(
            "--output as Avro needs the output contract as a schema: {e}"
        ))
    })?;
    Ok(output.schema)
}

/// A Kubernetes name (`orders-v2`) as an Avro name (`orders_v2`).
fn avro_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.insert(0, '_');
    }
    out
}

/// Writes the JSON lines local mode produces as records of an Avro container
/// file (deflate blocks).
pub struct AvroRecords<W: Write> {
    records: Writer<'static, W>,
    shape: &'static Shape,
    pending: Vec<u8>,
    /// The index of the next record, for messages.
    index: u64,
}

impl<W: Write> AvroRecords<W> {
    /// `schema`: the record schema; kept for the run (a run writes one file).
    pub fn new(output: W, schema: Schema) -> Result<Self, RuntimeError> {
        let shape = Shape::new(schema)
            .map_err(|e| RuntimeError::Usage(format!("the output's Avro schema: {e}")))?;
        // The writer borrows its schema for as long as it lives; one schema
        // per run is leaked so that the writer can be boxed with the output.
        let shape: &'static Shape = Box::leak(Box::new(shape));
        let records = Writer::with_codec(
            shape.schema(),
            output,
            Codec::Deflate(DeflateSettings::default()),
        );
        Ok(Self {
            records,
            shape,
            pending: Vec::new(),
            index: 0,
        })
    }

    fn append(&mut self, line: &[u8]) -> io::Result<()> {
        let index = self.index;
        self.index += 1;
        let invalid = |reason: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("output event {index} does not fit the Avro schema: {reason}"),
            )
        };
        let event: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| invalid(e.to_string()))?;
        let record: AvroValue = self
            .shape
            .from_json(&event)
            .map_err(|e| invalid(e.to_string()))?;
        self.records
            .append(record)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(())
    }
}

impl<W: Write> Write for AvroRecords<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        let mut start = 0;
        while let Some(end) = self.pending[start..].iter().position(|b| *b == b'\n') {
            let line = self.pending[start..start + end].to_vec();
            start += end + 1;
            if !line.iter().all(u8::is_ascii_whitespace) {
                self.append(&line)?;
            }
        }
        self.pending.drain(..start);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.records
            .flush()
            .map(drop)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_become_avro_names() {
        assert_eq!(avro_name("orders-v2"), "orders_v2");
        assert_eq!(avro_name("2fa.events"), "_2fa_events");
    }

    #[test]
    fn lines_written_are_records_read_back_as_the_same_lines() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "E", "fields": [
              {"name": "id", "type": "string"},
              {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
              {"name": "n", "type": ["null", "long"], "default": null}
            ]}"#,
        )
        .expect("schema");
        let mut file = Vec::new();
        {
            let mut records = AvroRecords::new(&mut file, schema).expect("writer");
            // Written in pieces that split lines, as a buffered writer does.
            let text = "{\"id\":\"a\",\"at\":\"2026-12-05T10:00:00Z\",\"n\":1}\n\n{\"id\":\"b\",\"at\":0}\n";
            let (first, rest) = text.split_at(17);
            records.write_all(first.as_bytes()).expect("write");
            records.write_all(rest.as_bytes()).expect("write");
            records.flush().expect("flush");
        }
        let mut lines = String::new();
        AvroLines::new(&file[..], Path::new("t.avro"))
            .expect("container")
            .read_to_string(&mut lines)
            .expect("read");
        let read: Vec<serde_json::Value> = lines
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(
            read,
            [
                serde_json::json!({"id": "a", "at": "2026-12-05T10:00:00Z", "n": 1}),
                serde_json::json!({"id": "b", "at": "1970-01-01T00:00:00Z", "n": null}),
            ]
        );
    }

    #[test]
    fn an_event_that_does_not_fit_names_the_field() {
        let schema = Schema::parse_str(
            r#"{"type": "record", "name": "E", "fields": [{"name": "id", "type": "long"}]}"#,
        )
        .expect("schema");
        let mut records = AvroRecords::new(Vec::new(), schema).expect("writer");
        let error = records.write_all(b"{\"id\":\"x\"}\n").unwrap_err();
        assert_eq!(
            error.to_string(),
            "output event 0 does not fit the Avro schema: field id: expected an integer, found a string"
        );
    }

    #[test]
    fn a_file_that_is_not_a_container_is_named() {
        let error = AvroLines::new(&b"{\"id\": 1}\n"[..], Path::new("in.avro"))
            .err()
            .expect("refused");
        assert!(
            error
                .to_string()
                .starts_with("in.avro is not an Avro container file: "),
            "{error}"
        );
    }
}
