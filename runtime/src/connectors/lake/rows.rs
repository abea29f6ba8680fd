//! Events into Arrow columns: each event is checked against the columns
//! first, so that one that does not fit is refused whole (a dead letter with
//! the column and the reason) and leaves the buffered rows as they were.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch, StructArray};
use arrow_buffer::NullBuffer;
use arrow_schema::{ArrowError, Fields, Schema as ArrowSchema};
use sonic_rs::{JsonValueTrait, Value};

use super::columns::{Column, ColumnKind, UTC, arrow_schema};
use crate::event::type_name;

/// Rows buffered for one file, column by column.
pub struct Rows {
    columns: Arc<Vec<Column>>,
    schema: Arc<ArrowSchema>,
    builders: Vec<ColumnBuilder>,
    len: usize,
    /// The bytes of the values taken (strings at their length, numbers at
    /// eight), a cheap measure of what the rows weigh in memory.
    bytes: usize,
}

enum ColumnBuilder {
    String(StringBuilder),
    Long(Int64Builder),
    Double(Float64Builder),
    Boolean(BooleanBuilder),
    Timestamp(TimestampMicrosecondBuilder),
    Struct {
        members: Vec<ColumnBuilder>,
        fields: Fields,
        valid: Vec<bool>,
    },
}

impl Rows {
    pub fn new(columns: Arc<Vec<Column>>) -> Self {
        let schema = arrow_schema(&columns);
        let builders = columns
            .iter()
            .map(|c| ColumnBuilder::new(&c.kind))
            .collect();
        Self {
            columns,
            schema,
            builders,
            len: 0,
            bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn schema(&self) -> &Arc<ArrowSchema> {
        &self.schema
    }

    /// Takes `event` as a row, or says why it does not fit (nothing taken).
    pub fn push(&mut self, event: &Value) -> Result<(), String> {
        for column in self.columns.iter() {
            check(column, event.get(column.name.as_str()))?;
        }
        for (column, builder) in self.columns.iter().zip(&mut self.builders) {
            self.bytes += builder.append(column, event.get(column.name.as_str()));
        }
        self.len += 1;
        Ok(())
    }

    /// The rows taken so far as one batch; the buffer starts empty again.
    pub fn take_batch(&mut self) -> Result<RecordBatch, ArrowError> {
        let arrays: Vec<ArrayRef> = self
            .builders
            .iter_mut()
            .map(ColumnBuilder::finish)
            .collect();
        self.len = 0;
        self.bytes = 0;
        RecordBatch::try_new(self.schema.clone(), arrays)
    }
}

/// A value counts as present unless missing or JSON `null`.
fn present(value: Option<&Value>) -> Option<&Value> {
    value.filter(|v| !v.is_null())
}

/// Why `value` cannot fill `column`, if it cannot.
fn check(column: &Column, value: Option<&Value>) -> Result<(), String> {
    let Some(value) = present(value) else {
        return if column.optional {
            Ok(())
        } else {
            Err(format!(
                "the event lacks {}, a required column of the table",
                column.path
            ))
        };
    };
    let fits = match &column.kind {
        ColumnKind::String => value.is_str(),
        ColumnKind::Long => value.is_i64(),
        ColumnKind::Double => value.is_number(),
        ColumnKind::Boolean => value.is_boolean(),
        ColumnKind::Timestamp => timestamp_micros(value).is_some(),
        ColumnKind::Json => true,
        ColumnKind::Struct(members) => {
            if !value.is_object() {
                false
            } else {
                for member in members {
                    check(member, value.get(member.name.as_str()))?;
                }
                true
            }
        }
    };
    if fits {
        Ok(())
    } else {
        Err(format!(
            "{} is {}, which a {} column cannot hold",
            column.path,
            describe(value),
            column.kind.describe()
        ))
    }
}

fn describe(value: &Value) -> &'static str {
    if value.is_i64() || !value.is_number() {
        type_name(value)
    } else if value.is_u64() {
        "an integer beyond 64 bits"
    } else {
        type_name(value)
    }
}

/// A timestamp value as epoch microseconds: an integer is epoch milliseconds,
/// a string RFC 3339 (kept to the microsecond).
pub fn timestamp_micros(value: &Value) -> Option<i64> {
    if let Some(ms) = value.as_i64() {
        return ms.checked_mul(1000);
    }
    let text = value.as_str()?;
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_micros())
}

impl ColumnBuilder {
    fn new(kind: &ColumnKind) -> Self {
        match kind {
            ColumnKind::String | ColumnKind::Json => ColumnBuilder::String(StringBuilder::new()),
            ColumnKind::Long => ColumnBuilder::Long(Int64Builder::new()),
            ColumnKind::Double => ColumnBuilder::Double(Float64Builder::new()),
            ColumnKind::Boolean => ColumnBuilder::Boolean(BooleanBuilder::new()),
            ColumnKind::Timestamp => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::new().with_timezone(UTC))
            }
            ColumnKind::Struct(members) => ColumnBuilder::Struct {
                members: members
                    .iter()
                    .map(|m| ColumnBuilder::new(&m.kind))
                    .collect(),
                fields: Fields::from(members.iter().map(Column::arrow_field).collect::<Vec<_>>()),
                valid: Vec::new(),
            },
        }
    }

    /// Appends a value `check` accepted (or a null); returns the bytes it
    /// weighs.
    fn append(&mut self, column: &Column, value: Option<&Value>) -> usize {
        const NUMBER: usize = 8;
        let value = present(value);
        match self {
            ColumnBuilder::String(b) => match value {
                Some(v) if matches!(column.kind, ColumnKind::Json) => {
                    let text = sonic_rs::to_string(v).unwrap_or_default();
                    b.append_value(&text);
                    text.len()
                }
                Some(v) => {
                    let text = v.as_str();
                    b.append_option(text);
                    text.map_or(0, str::len)
                }
                None => {
                    b.append_null();
                    0
                }
            },
            ColumnBuilder::Long(b) => {
                b.append_option(value.and_then(|v| v.as_i64()));
                NUMBER
            }
            ColumnBuilder::Double(b) => {
                b.append_option(value.and_then(|v| v.as_f64()));
                NUMBER
            }
            ColumnBuilder::Boolean(b) => {
                b.append_option(value.and_then(|v| v.as_bool()));
                1
            }
            ColumnBuilder::Timestamp(b) => {
                b.append_option(value.and_then(timestamp_micros));
                NUMBER
            }
            ColumnBuilder::Struct { members, valid, .. } => {
                let ColumnKind::Struct(columns) = &column.kind else {
                    return 0;
                };
                let mut bytes = 0;
                for (member, builder) in columns.iter().zip(members.iter_mut()) {
                    bytes +=
                        builder.append(member, value.and_then(|v| v.get(member.name.as_str())));
                }
                valid.push(value.is_some());
                bytes
            }
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            ColumnBuilder::String(b) => Arc::new(b.finish()),
            ColumnBuilder::Long(b) => Arc::new(b.finish()),
            ColumnBuilder::Double(b) => Arc::new(b.finish()),
            ColumnBuilder::Boolean(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b) => Arc::new(b.finish()),
            ColumnBuilder::Struct {
                members,
                fields,
                valid,
            } => {
                let arrays: Vec<ArrayRef> = members.iter_mut().map(ColumnBuilder::finish).collect();
                let valid = std::mem::take(valid);
                let nulls = valid.iter().any(|v| !v).then(|| NullBuffer::from(valid));
                Arc::new(StructArray::new(fields.clone(), arrays, nulls))
            }
        }
    }
}
