//! Avro records as Keystone's JSON events, and JSON events as Avro records.
//!
//! Reading follows the contract types of [`crate::contract`]: logical types
//! become the JSON a contract of that type holds (timestamps RFC 3339 in UTC,
//! dates and times ISO 8601, decimals the exact decimal as a string, bytes
//! base64). Writing takes what reading gives, and what a JSON event naturally
//! holds: a timestamp may also be epoch milliseconds, a decimal a number, and
//! a `string` field takes any other JSON value as its JSON text (the columns
//! that hold arrays, `any` values and objects whose members are not listed).

use std::collections::HashMap;
use std::fmt;

use apache_avro::schema::{DecimalSchema, Name, RecordSchema, ResolvedSchema, UnionSchema};
use apache_avro::types::Value as Avro;
use apache_avro::{Days, Decimal, Duration, Millis, Months, Schema, Uuid};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, Timelike};
use num_bigint::BigInt;
use serde_json::{Map, Number, Value};

/// What is wrong with a value, and where in the record.
#[derive(Debug, PartialEq, Eq)]
pub struct ValueError {
    /// Dotted path of the field; empty for the record itself.
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "field {}: {}", self.path, self.reason)
        }
    }
}

impl std::error::Error for ValueError {}

/// Named types of a schema by full name, for its references.
struct Names(HashMap<String, Schema>);

impl Names {
    fn of(schema: &Schema) -> Result<Self, ValueError> {
        let resolved = ResolvedSchema::try_from(schema).map_err(|e| ValueError {
            path: String::new(),
            reason: format!("the schema's named types do not resolve: {e}"),
        })?;
        Ok(Self(
            resolved
                .get_names()
                .iter()
                .map(|(name, schema)| (name.fullname(None), (*schema).clone()))
                .collect(),
        ))
    }

    fn get(&self, name: &Name, path: &str) -> Result<&Schema, ValueError> {
        self.0.get(&name.fullname(None)).ok_or_else(|| {
            err(
                path,
                format!(
                    "the schema refers to {}, which it does not define",
                    name.fullname(None)
                ),
            )
        })
    }
}

/// A schema ready to convert values with: its named types are indexed once
/// here, not for every record.
pub struct Shape {
    schema: Schema,
    names: Names,
    has_decimals: bool,
}

impl Shape {
    pub fn new(schema: Schema) -> Result<Self, ValueError> {
        let names = Names::of(&schema)?;
        let has_decimals = !crate::compat::decimals(&schema).is_empty();
        Ok(Self {
            schema,
            names,
            has_decimals,
        })
    }

    /// Whether the schema has decimals anywhere (resolution treats them).
    pub(crate) fn has_decimals(&self) -> bool {
        self.has_decimals
    }

    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The JSON event of an Avro value read with (or resolved to) this schema.
    pub fn to_json(&self, value: &Avro) -> Result<Value, ValueError> {
        read(value, &self.schema, &self.names, "")
    }

    /// The Avro value of a JSON event, to be written with this schema.
    pub fn from_json(&self, event: &Value) -> Result<Avro, ValueError> {
        write(event, &self.schema, &self.names, "")
    }
}

fn err(path: &str, reason: impl Into<String>) -> ValueError {
    ValueError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn read(value: &Avro, schema: &Schema, names: &Names, path: &str) -> Result<Value, ValueError> {
    let schema = match schema {
        Schema::Ref { name } => names.get(name, path)?,
        other => other,
    };
    Ok(match (value, schema) {
        (Avro::Union(index, inner), Schema::Union(union)) => {
            let branch = union
                .variants()
                .get(*index as usize)
                .ok_or_else(|| err(path, format!("union branch {index} is not in the schema")))?;
            return read(inner, branch, names, path);
        }
        (Avro::Union(_, inner), other) => return read(inner, other, names, path),
        (Avro::Null, _) => Value::Null,
        (Avro::Boolean(b), _) => Value::Bool(*b),
        (Avro::Int(i), _) => Value::from(*i),
        (Avro::Long(i), _) => Value::from(*i),
        (Avro::Float(f), _) => finite(f64::from(*f), path)?,
        (Avro::Double(f), _) => finite(*f, path)?,
        (Avro::String(s), _) | (Avro::Enum(_, s), _) => Value::String(s.clone()),
        (Avro::Bytes(b), _) | (Avro::Fixed(_, b), _) => Value::String(BASE64.encode(b)),
        (Avro::Uuid(u), _) => Value::String(u.to_string()),
        (Avro::Array(items), Schema::Array(array)) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| read(item, &array.items, names, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        (Avro::Map(entries), Schema::Map(map)) => Value::Object(
            entries
                .iter()
                .map(|(k, v)| Ok((k.clone(), read(v, &map.types, names, &join(path, k))?)))
                .collect::<Result<Map<_, _>, ValueError>>()?,
        ),
        (Avro::Record(fields), Schema::Record(record)) => Value::Object(
            fields
                .iter()
                .map(|(name, v)| {
                    let field_path = join(path, name);
                    let field_schema = record
                        .lookup
                        .get(name)
                        .map(|&i| &record.fields[i].schema)
                        .ok_or_else(|| {
                        err(&field_path, "not a field of the record's schema")
                    })?;
                    Ok((name.clone(), read(v, field_schema, names, &field_path)?))
                })
                .collect::<Result<Map<_, _>, ValueError>>()?,
        ),
        (Avro::Decimal(d), Schema::Decimal(DecimalSchema { scale, .. })) => {
            Value::String(decimal_text(&BigInt::from(d.clone()), *scale))
        }
        (Avro::BigDecimal(d), _) => Value::String(d.to_string()),
        (Avro::Date(days), _) => Value::String(
            NaiveDate::from_epoch_days(*days)
                .ok_or_else(|| err(path, format!("date {days} days from 1970 is out of range")))?
                .to_string(),
        ),
        (Avro::TimeMillis(ms), _) => time_of_day(i64::from(*ms) * 1_000_000, path)?,
        (Avro::TimeMicros(us), _) => time_of_day(us.saturating_mul(1_000), path)?,
        (Avro::TimestampMillis(ms), _) => utc(DateTime::from_timestamp_millis(*ms), *ms, path)?,
        (Avro::TimestampMicros(us), _) => utc(DateTime::from_timestamp_micros(*us), *us, path)?,
        (Avro::TimestampNanos(ns), _) => utc(Some(DateTime::from_timestamp_nanos(*ns)), *ns, path)?,
        (Avro::LocalTimestampMillis(ms), _) => {
            local(DateTime::from_timestamp_millis(*ms), *ms, path)?
        }
        (Avro::LocalTimestampMicros(us), _) => {
            local(DateTime::from_timestamp_micros(*us), *us, path)?
        }
        (Avro::LocalTimestampNanos(ns), _) => {
            local(Some(DateTime::from_timestamp_nanos(*ns)), *ns, path)?
        }
        (Avro::Duration(d), _) => serde_json::json!({
            "months": u32::from(d.months()),
            "days": u32::from(d.days()),
            "millis": u32::from(d.millis()),
        }),
        (value, schema) => {
            return Err(err(
                path,
                format!("a {value:?} does not belong to the schema's {schema}"),
            ));
        }
    })
}

fn finite(f: f64, path: &str) -> Result<Value, ValueError> {
    Number::from_f64(f).map(Value::Number).ok_or_else(|| {
        err(
            path,
            format!("{f} has no JSON form (JSON numbers are finite)"),
        )
    })
}

fn decimal_text(unscaled: &BigInt, scale: usize) -> String {
    let digits = unscaled.magnitude().to_string();
    let sign = if unscaled.sign() == num_bigint::Sign::Minus {
        "-"
    } else {
        ""
    };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    format!("{sign}{whole}.{fraction}")
}

fn time_of_day(nanos: i64, path: &str) -> Result<Value, ValueError> {
    let secs = u32::try_from(nanos.div_euclid(1_000_000_000)).ok();
    let frac = u32::try_from(nanos.rem_euclid(1_000_000_000)).ok();
    secs.zip(frac)
        .and_then(|(s, n)| NaiveTime::from_num_seconds_from_midnight_opt(s, n))
        .map(|t| Value::String(t.format("%H:%M:%S%.f").to_string()))
        .ok_or_else(|| err(path, "a time of day beyond 24 hours"))
}

fn utc(at: Option<DateTime<chrono::Utc>>, raw: i64, path: &str) -> Result<Value, ValueError> {
    at.map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)))
        .ok_or_else(|| err(path, format!("timestamp {raw} is out of range")))
}

fn local(at: Option<DateTime<chrono::Utc>>, raw: i64, path: &str) -> Result<Value, ValueError> {
    at.map(|t| Value::String(t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.f").to_string()))
        .ok_or_else(|| err(path, format!("timestamp {raw} is out of range")))
}

fn write(value: &Value, schema: &Schema, names: &Names, path: &str) -> Result<Avro, ValueError> {
    let wrong = |expected: &str| {
        err(
            path,
            format!("expected {expected}, found {}", json_kind(value)),
        )
    };
    Ok(match schema {
        Schema::Ref { name } => return write(value, names.get(name, path)?, names, path),
        Schema::Union(union) => return write_union(value, union, names, path),
        Schema::Null => match value {
            Value::Null => Avro::Null,
            _ => return Err(wrong("null")),
        },
        Schema::Boolean => Avro::Boolean(value.as_bool().ok_or_else(|| wrong("a boolean"))?),
        Schema::Int => Avro::Int(
            value
                .as_i64()
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| wrong("a 32-bit integer"))?,
        ),
        Schema::Long => Avro::Long(value.as_i64().ok_or_else(|| wrong("an integer"))?),
        #[expect(
            clippy::cast_possible_truncation,
            reason = "a float field holds floats"
        )]
        Schema::Float => Avro::Float(value.as_f64().ok_or_else(|| wrong("a number"))? as f32),
        Schema::Double => Avro::Double(value.as_f64().ok_or_else(|| wrong("a number"))?),
        Schema::String => Avro::String(match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }),
        Schema::Bytes => Avro::Bytes(base64_of(value, path)?),
        Schema::Fixed(fixed) => {
            let bytes = base64_of(value, path)?;
            if bytes.len() != fixed.size {
                return Err(err(
                    path,
                    format!("{} bytes, the fixed type holds {}", bytes.len(), fixed.size),
                ));
            }
            Avro::Fixed(fixed.size, bytes)
        }
        Schema::Enum(e) => {
            let symbol = value.as_str().ok_or_else(|| wrong("a string"))?;
            let index = e.symbols.iter().position(|s| s == symbol).ok_or_else(|| {
                err(
                    path,
                    format!(
                        "{symbol:?} is not one of the enum's symbols {:?}",
                        e.symbols
                    ),
                )
            })?;
            Avro::Enum(index as u32, symbol.to_owned())
        }
        Schema::Array(array) => Avro::Array(
            value
                .as_array()
                .ok_or_else(|| wrong("an array"))?
                .iter()
                .enumerate()
                .map(|(i, item)| write(item, &array.items, names, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Schema::Map(map) => Avro::Map(
            value
                .as_object()
                .ok_or_else(|| wrong("an object"))?
                .iter()
                .map(|(k, v)| Ok((k.clone(), write(v, &map.types, names, &join(path, k))?)))
                .collect::<Result<_, ValueError>>()?,
        ),
        Schema::Record(record) => write_record(value, record, names, path)?,
        Schema::Decimal(decimal) => {
            Avro::Decimal(decimal_of(value, decimal.precision, decimal.scale, path)?)
        }
        Schema::BigDecimal => {
            return Err(err(
                path,
                "big-decimal fields are not written; declare a decimal with a scale",
            ));
        }
        Schema::Uuid => Avro::Uuid(
            value
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| wrong("a UUID string"))?,
        ),
        Schema::Date => Avro::Date(match value {
            Value::Number(n) => n
                .as_i64()
                .and_then(|d| i32::try_from(d).ok())
                .ok_or_else(|| wrong("days since 1970"))?,
            Value::String(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map(|d| d.to_epoch_days())
                .map_err(|e| err(path, format!("{s:?} is not a date (YYYY-MM-DD): {e}")))?,
            _ => return Err(wrong("a date (YYYY-MM-DD)")),
        }),
        Schema::TimeMillis => Avro::TimeMillis(
            i32::try_from(time_nanos(value, path)? / 1_000_000)
                .map_err(|_| err(path, "a time of day beyond 24 hours"))?,
        ),
        Schema::TimeMicros => Avro::TimeMicros(time_nanos(value, path)? / 1_000),
        Schema::TimestampMillis => Avro::TimestampMillis(epoch(value, path, Unit::Millis)?),
        Schema::TimestampMicros => Avro::TimestampMicros(epoch(value, path, Unit::Micros)?),
        Schema::TimestampNanos => Avro::TimestampNanos(epoch(value, path, Unit::Nanos)?),
        Schema::LocalTimestampMillis => {
            Avro::LocalTimestampMillis(local_epoch(value, path, Unit::Millis)?)
        }
        Schema::LocalTimestampMicros => {
            Avro::LocalTimestampMicros(local_epoch(value, path, Unit::Micros)?)
        }
        Schema::LocalTimestampNanos => {
            Avro::LocalTimestampNanos(local_epoch(value, path, Unit::Nanos)?)
        }
        Schema::Duration => {
            let part = |name: &str| {
                value
                    .get(name)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| wrong("an object of months, days and millis"))
            };
            Avro::Duration(Duration::new(
                Months::new(part("months")?),
                Days::new(part("days")?),
                Millis::new(part("millis")?),
            ))
        }
    })
}

fn write_union(
    value: &Value,
    union: &UnionSchema,
    names: &Names,
    path: &str,
) -> Result<Avro, ValueError> {
    let mut reasons = Vec::new();
    for (index, branch) in union.variants().iter().enumerate() {
        if value.is_null() != matches!(branch, Schema::Null) {
            continue;
        }
        match write(value, branch, names, path) {
            Ok(v) => return Ok(Avro::Union(index as u32, Box::new(v))),
            Err(e) => reasons.push(e.reason),
        }
    }
    Err(err(
        path,
        if reasons.is_empty() {
            format!("{} fits no branch of the union", json_kind(value))
        } else {
            format!("fits no branch of the union: {}", reasons.join("; "))
        },
    ))
}

fn write_record(
    value: &Value,
    record: &RecordSchema,
    names: &Names,
    path: &str,
) -> Result<Avro, ValueError> {
    let object = value.as_object().ok_or_else(|| {
        err(
            path,
            format!("expected an object, found {}", json_kind(value)),
        )
    })?;
    let mut fields = Vec::with_capacity(record.fields.len());
    for field in &record.fields {
        let field_path = join(path, &field.name);
        let given = object.get(&field.name).filter(|v| !v.is_null());
        let written = match (given, &field.default) {
            (Some(v), _) => write(v, &field.schema, names, &field_path)?,
            // A default of a union is of its first branch (the spec's rule).
            (None, Some(default)) => match &field.schema {
                Schema::Union(union) => {
                    let first = union
                        .variants()
                        .first()
                        .ok_or_else(|| err(&field_path, "an empty union"))?;
                    Avro::Union(0, Box::new(write(default, first, names, &field_path)?))
                }
                other => write(default, other, names, &field_path)?,
            },
            (None, None) => match &field.schema {
                Schema::Union(union) if union.is_nullable() => {
                    write_union(&Value::Null, union, names, &field_path)?
                }
                _ => {
                    return Err(err(
                        &field_path,
                        "missing, and the schema requires it (no default)",
                    ));
                }
            },
        };
        fields.push((field.name.clone(), written));
    }
    Ok(Avro::Record(fields))
}

fn base64_of(value: &Value, path: &str) -> Result<Vec<u8>, ValueError> {
    let text = value.as_str().ok_or_else(|| {
        err(
            path,
            format!("expected base64 text, found {}", json_kind(value)),
        )
    })?;
    BASE64
        .decode(text)
        .map_err(|e| err(path, format!("not base64: {e}")))
}

fn decimal_of(
    value: &Value,
    precision: usize,
    scale: usize,
    path: &str,
) -> Result<Decimal, ValueError> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(err(
                path,
                format!("expected a decimal, found {}", json_kind(other)),
            ));
        }
    };
    let not_decimal = || err(path, format!("{text:?} is not a decimal number"));
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(&text)),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let digits_only = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !digits_only(whole) || !digits_only(fraction) {
        return Err(not_decimal());
    }
    let significant = fraction.trim_end_matches('0');
    if significant.len() > scale {
        return Err(err(
            path,
            format!(
                "{text} has {} decimal places, the schema's scale is {scale}",
                significant.len()
            ),
        ));
    }
    let digits = format!(
        "{whole}{fraction:0<scale$}",
        fraction = &fraction[..fraction.len().min(scale)]
    );
    let significant_digits = digits.trim_start_matches('0').len();
    if significant_digits > precision {
        return Err(err(
            path,
            format!(
                "{text} has {significant_digits} digits, the schema's precision is {precision}"
            ),
        ));
    }
    let mut unscaled: BigInt = digits.parse().map_err(|_| not_decimal())?;
    if negative {
        unscaled = -unscaled;
    }
    Ok(Decimal::from(unscaled.to_signed_bytes_be()))
}

fn time_nanos(value: &Value, path: &str) -> Result<i64, ValueError> {
    let text = value.as_str().ok_or_else(|| {
        err(
            path,
            format!(
                "expected a time of day (HH:MM:SS), found {}",
                json_kind(value)
            ),
        )
    })?;
    let time = NaiveTime::parse_from_str(text, "%H:%M:%S%.f").map_err(|e| {
        err(
            path,
            format!("{text:?} is not a time of day (HH:MM:SS): {e}"),
        )
    })?;
    Ok(i64::from(time.num_seconds_from_midnight()) * 1_000_000_000 + i64::from(time.nanosecond()))
}

/// The unit of an Avro timestamp.
#[derive(Clone, Copy)]
enum Unit {
    Millis,
    Micros,
    Nanos,
}

fn since_epoch(at: &NaiveDateTime, unit: Unit) -> Option<i64> {
    let utc = at.and_utc();
    match unit {
        Unit::Millis => Some(utc.timestamp_millis()),
        Unit::Micros => Some(utc.timestamp_micros()),
        Unit::Nanos => utc.timestamp_nanos_opt(),
    }
}

/// Epoch time in `unit`, from RFC 3339 text or epoch milliseconds (what a
/// contract's `timestamp` holds).
fn epoch(value: &Value, path: &str, unit: Unit) -> Result<i64, ValueError> {
    let at = match value {
        Value::Number(n) => n
            .as_i64()
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(|| err(path, format!("{n} is not epoch milliseconds in range")))?
            .naive_utc(),
        Value::String(s) => DateTime::parse_from_rfc3339(s)
            .map_err(|e| err(path, format!("{s:?} is not an RFC 3339 timestamp: {e}")))?
            .naive_utc(),
        other => {
            return Err(err(
                path,
                format!("expected a timestamp, found {}", json_kind(other)),
            ));
        }
    };
    since_epoch(&at, unit).ok_or_else(|| err(path, format!("{value} is out of range")))
}

fn local_epoch(value: &Value, path: &str, unit: Unit) -> Result<i64, ValueError> {
    let text = value.as_str().ok_or_else(|| {
        err(
            path,
            format!("expected a local date and time, found {}", json_kind(value)),
        )
    })?;
    let at = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .map_err(|e| err(path, format!("{text:?} is not a local date and time: {e}")))?;
    since_epoch(&at, unit).ok_or_else(|| err(path, format!("{text:?} is out of range")))
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
