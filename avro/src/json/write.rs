//! JSON events as Avro values, read from whatever document model holds the
//! event ([`Document`]): `serde_json`'s here, the runtime's own there, so that
//! an event is not written out as JSON text and parsed again to be encoded.

use apache_avro::schema::{RecordSchema, UnionSchema};
use apache_avro::types::Value as Avro;
use apache_avro::{Days, Decimal, Duration, Millis, Months, Schema, Uuid};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use num_bigint::BigInt;
use serde_json::Value;

use super::{Names, Path, ValueError};

/// The JSON type of a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Null,
    Boolean,
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    /// As messages name it.
    fn named(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Boolean => "a boolean",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::Array => "an array",
            Kind::Object => "an object",
        }
    }
}

/// A JSON document model an event is written to Avro from. A marker type
/// implements it for the model's value type, so that a crate can implement it
/// for a value type of another crate.
pub trait Document {
    type Value;

    fn kind(value: &Self::Value) -> Kind;
    fn as_bool(value: &Self::Value) -> Option<bool>;
    /// An integer within `i64` (not a float, even a whole one).
    fn as_i64(value: &Self::Value) -> Option<i64>;
    /// A non-negative integer within `u64`.
    fn as_u64(value: &Self::Value) -> Option<u64>;
    /// Any number, as the nearest `f64`.
    fn as_f64(value: &Self::Value) -> Option<f64>;
    fn as_str(value: &Self::Value) -> Option<&str>;
    /// The decimal text of a number (read as a decimal: exact where the model
    /// keeps it exact).
    fn number_text(value: &Self::Value) -> Option<String>;
    fn items(value: &Self::Value) -> Option<impl Iterator<Item = &Self::Value>>;
    fn members(value: &Self::Value) -> Option<impl Iterator<Item = (&str, &Self::Value)>>;
    /// The member `name` of an object; `None` for anything else.
    fn get<'v>(value: &'v Self::Value, name: &str) -> Option<&'v Self::Value>;
    /// The value's compact JSON text.
    fn text(value: &Self::Value) -> String;
}

/// `serde_json`'s document model (schema defaults are `serde_json` values).
pub struct SerdeJson;

impl Document for SerdeJson {
    type Value = Value;

    fn kind(value: &Value) -> Kind {
        match value {
            Value::Null => Kind::Null,
            Value::Bool(_) => Kind::Boolean,
            Value::Number(_) => Kind::Number,
            Value::String(_) => Kind::String,
            Value::Array(_) => Kind::Array,
            Value::Object(_) => Kind::Object,
        }
    }

    fn as_bool(value: &Value) -> Option<bool> {
        value.as_bool()
    }

    fn as_i64(value: &Value) -> Option<i64> {
        value.as_i64()
    }

    fn as_u64(value: &Value) -> Option<u64> {
        value.as_u64()
    }

    fn as_f64(value: &Value) -> Option<f64> {
        value.as_f64()
    }

    fn as_str(value: &Value) -> Option<&str> {
        value.as_str()
    }

    fn number_text(value: &Value) -> Option<String> {
        match value {
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    fn items(value: &Value) -> Option<impl Iterator<Item = &Value>> {
        value.as_array().map(|items| items.iter())
    }

    fn members(value: &Value) -> Option<impl Iterator<Item = (&str, &Value)>> {
        value
            .as_object()
            .map(|object| object.iter().map(|(k, v)| (k.as_str(), v)))
    }

    fn get<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
        value.get(name)
    }

    fn text(value: &Value) -> String {
        value.to_string()
    }
}

fn expected<D: Document>(value: &D::Value, what: &str, path: &Path<'_>) -> ValueError {
    path.error(format!("expected {what}, found {}", D::kind(value).named()))
}

/// The Avro value of `value`, to be written with `schema`. Recursion follows
/// the schema where the value has it too, so its depth is the value's.
pub(super) fn write<D: Document>(
    value: &D::Value,
    schema: &Schema,
    names: &Names,
    path: &Path<'_>,
) -> Result<Avro, ValueError> {
    path.check_depth()?;
    match schema {
        Schema::Ref { name } => write::<D>(value, names.get(name, path)?, names, path),
        Schema::Union(union) => write_union::<D>(value, union, names, path),
        Schema::Array(array) => Ok(Avro::Array(
            D::items(value)
                .ok_or_else(|| expected::<D>(value, "an array", path))?
                .enumerate()
                .map(|(i, item)| write::<D>(item, &array.items, names, &path.index(i)))
                .collect::<Result<_, _>>()?,
        )),
        Schema::Map(map) => Ok(Avro::Map(
            D::members(value)
                .ok_or_else(|| expected::<D>(value, "an object", path))?
                .map(|(k, v)| {
                    Ok((
                        k.to_owned(),
                        write::<D>(v, &map.types, names, &path.field(k))?,
                    ))
                })
                .collect::<Result<_, ValueError>>()?,
        )),
        Schema::Record(record) => write_record::<D>(value, record, names, path),
        other => write_scalar::<D>(value, other, path),
    }
}

/// The Avro value of `value` for a schema that holds no other values: apart
/// from [`write`], so that the frame of each level of recursion stays small.
fn write_scalar<D: Document>(
    value: &D::Value,
    schema: &Schema,
    path: &Path<'_>,
) -> Result<Avro, ValueError> {
    let wrong = |what: &str| expected::<D>(value, what, path);
    Ok(match schema {
        Schema::Null => match D::kind(value) {
            Kind::Null => Avro::Null,
            _ => return Err(wrong("null")),
        },
        Schema::Boolean => Avro::Boolean(D::as_bool(value).ok_or_else(|| wrong("a boolean"))?),
        Schema::Int => Avro::Int(
            D::as_i64(value)
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| wrong("a 32-bit integer"))?,
        ),
        Schema::Long => Avro::Long(D::as_i64(value).ok_or_else(|| wrong("an integer"))?),
        #[expect(
            clippy::cast_possible_truncation,
            reason = "a float field holds floats"
        )]
        Schema::Float => Avro::Float(D::as_f64(value).ok_or_else(|| wrong("a number"))? as f32),
        Schema::Double => Avro::Double(D::as_f64(value).ok_or_else(|| wrong("a number"))?),
        Schema::String => Avro::String(match D::as_str(value) {
            Some(s) => s.to_owned(),
            None => D::text(value),
        }),
        Schema::Bytes => Avro::Bytes(base64_of::<D>(value, path)?),
        Schema::Fixed(fixed) => {
            let bytes = base64_of::<D>(value, path)?;
            if bytes.len() != fixed.size {
                return Err(path.error(format!(
                    "{} bytes, the fixed type holds {}",
                    bytes.len(),
                    fixed.size
                )));
            }
            Avro::Fixed(fixed.size, bytes)
        }
        Schema::Enum(e) => {
            let symbol = D::as_str(value).ok_or_else(|| wrong("a string"))?;
            let index = e.symbols.iter().position(|s| s == symbol).ok_or_else(|| {
                path.error(format!(
                    "{symbol:?} is not one of the enum's symbols {:?}",
                    e.symbols
                ))
            })?;
            Avro::Enum(index as u32, symbol.to_owned())
        }
        Schema::Decimal(decimal) => Avro::Decimal(decimal_of::<D>(
            value,
            decimal.precision,
            decimal.scale,
            path,
        )?),
        Schema::BigDecimal => {
            return Err(
                path.error("big-decimal fields are not written; declare a decimal with a scale")
            );
        }
        Schema::Uuid => Avro::Uuid(
            D::as_str(value)
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| wrong("a UUID string"))?,
        ),
        Schema::Date => Avro::Date(match (D::kind(value), D::as_str(value)) {
            (Kind::Number, _) => D::as_i64(value)
                .and_then(|d| i32::try_from(d).ok())
                .ok_or_else(|| wrong("days since 1970"))?,
            (_, Some(s)) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map(|d| d.to_epoch_days())
                .map_err(|e| path.error(format!("{s:?} is not a date (YYYY-MM-DD): {e}")))?,
            _ => return Err(wrong("a date (YYYY-MM-DD)")),
        }),
        Schema::TimeMillis => Avro::TimeMillis(
            i32::try_from(time_nanos::<D>(value, path)? / 1_000_000)
                .map_err(|_| path.error("a time of day beyond 24 hours"))?,
        ),
        Schema::TimeMicros => Avro::TimeMicros(time_nanos::<D>(value, path)? / 1_000),
        Schema::TimestampMillis => Avro::TimestampMillis(epoch::<D>(value, path, Unit::Millis)?),
        Schema::TimestampMicros => Avro::TimestampMicros(epoch::<D>(value, path, Unit::Micros)?),
        Schema::TimestampNanos => Avro::TimestampNanos(epoch::<D>(value, path, Unit::Nanos)?),
        Schema::LocalTimestampMillis => {
            Avro::LocalTimestampMillis(local_epoch::<D>(value, path, Unit::Millis)?)
        }
        Schema::LocalTimestampMicros => {
            Avro::LocalTimestampMicros(local_epoch::<D>(value, path, Unit::Micros)?)
        }
        Schema::LocalTimestampNanos => {
            Avro::LocalTimestampNanos(local_epoch::<D>(value, path, Unit::Nanos)?)
        }
        Schema::Duration => {
            let part = |name: &str| {
                D::get(value, name)
                    .and_then(D::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| wrong("an object of months, days and millis"))
            };
            Avro::Duration(Duration::new(
                Months::new(part("months")?),
                Days::new(part("days")?),
                Millis::new(part("millis")?),
            ))
        }
        Schema::Ref { .. }
        | Schema::Union(_)
        | Schema::Array(_)
        | Schema::Map(_)
        | Schema::Record(_) => {
            return Err(path.error(format!(
                "the schema's {schema} holds other values: a defect, it is written elsewhere"
            )));
        }
    })
}

fn write_union<D: Document>(
    value: &D::Value,
    union: &UnionSchema,
    names: &Names,
    path: &Path<'_>,
) -> Result<Avro, ValueError> {
    let is_null = D::kind(value) == Kind::Null;
    let mut reasons = Vec::new();
    for (index, branch) in union.variants().iter().enumerate() {
        if is_null != matches!(branch, Schema::Null) {
            continue;
        }
        match write::<D>(value, branch, names, path) {
            Ok(v) => return Ok(Avro::Union(index as u32, Box::new(v))),
            Err(e) => reasons.push(e.reason),
        }
    }
    Err(path.error(if reasons.is_empty() {
        format!("{} fits no branch of the union", D::kind(value).named())
    } else {
        format!("fits no branch of the union: {}", reasons.join("; "))
    }))
}

fn write_record<D: Document>(
    value: &D::Value,
    record: &RecordSchema,
    names: &Names,
    path: &Path<'_>,
) -> Result<Avro, ValueError> {
    if D::kind(value) != Kind::Object {
        return Err(expected::<D>(value, "an object", path));
    }
    let mut fields = Vec::with_capacity(record.fields.len());
    for field in &record.fields {
        let field_path = path.field(&field.name);
        let given = D::get(value, &field.name).filter(|v| D::kind(v) != Kind::Null);
        // Defaults are the schema's own JSON (`serde_json` values).
        let written = match (given, &field.default) {
            (Some(v), _) => write::<D>(v, &field.schema, names, &field_path)?,
            // A default of a union is of its first branch (the spec's rule).
            (None, Some(default)) => match &field.schema {
                Schema::Union(union) => {
                    let first = union
                        .variants()
                        .first()
                        .ok_or_else(|| field_path.error("an empty union"))?;
                    Avro::Union(
                        0,
                        Box::new(write::<SerdeJson>(default, first, names, &field_path)?),
                    )
                }
                other => write::<SerdeJson>(default, other, names, &field_path)?,
            },
            (None, None) => match &field.schema {
                Schema::Union(union) if union.is_nullable() => {
                    write_union::<SerdeJson>(&Value::Null, union, names, &field_path)?
                }
                _ => {
                    return Err(
                        field_path.error("missing, and the schema requires it (no default)")
                    );
                }
            },
        };
        fields.push((field.name.clone(), written));
    }
    Ok(Avro::Record(fields))
}

fn base64_of<D: Document>(value: &D::Value, path: &Path<'_>) -> Result<Vec<u8>, ValueError> {
    let text = D::as_str(value).ok_or_else(|| expected::<D>(value, "base64 text", path))?;
    BASE64
        .decode(text)
        .map_err(|e| path.error(format!("not base64: {e}")))
}

fn decimal_of<D: Document>(
    value: &D::Value,
    precision: usize,
    scale: usize,
    path: &Path<'_>,
) -> Result<Decimal, ValueError> {
    let text = match (D::as_str(value), D::number_text(value)) {
        (Some(s), _) => s.to_owned(),
        (None, Some(n)) => n,
        (None, None) => return Err(expected::<D>(value, "a decimal", path)),
    };
    let not_decimal = || path.error(format!("{text:?} is not a decimal number"));
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
        return Err(path.error(format!(
            "{text} has {} decimal places, the schema's scale is {scale}",
            significant.len()
        )));
    }
    let digits = format!(
        "{whole}{fraction:0<scale$}",
        fraction = &fraction[..fraction.len().min(scale)]
    );
    let significant_digits = digits.trim_start_matches('0').len();
    if significant_digits > precision {
        return Err(path.error(format!(
            "{text} has {significant_digits} digits, the schema's precision is {precision}"
        )));
    }
    let mut unscaled: BigInt = digits.parse().map_err(|_| not_decimal())?;
    if negative {
        unscaled = -unscaled;
    }
    Ok(Decimal::from(unscaled.to_signed_bytes_be()))
}

fn time_nanos<D: Document>(value: &D::Value, path: &Path<'_>) -> Result<i64, ValueError> {
    let text =
        D::as_str(value).ok_or_else(|| expected::<D>(value, "a time of day (HH:MM:SS)", path))?;
    let time = NaiveTime::parse_from_str(text, "%H:%M:%S%.f")
        .map_err(|e| path.error(format!("{text:?} is not a time of day (HH:MM:SS): {e}")))?;
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
fn epoch<D: Document>(value: &D::Value, path: &Path<'_>, unit: Unit) -> Result<i64, ValueError> {
    let at = match (D::kind(value), D::as_str(value)) {
        (Kind::Number, _) => D::as_i64(value)
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(|| {
                path.error(format!(
                    "{} is not epoch milliseconds in range",
                    D::text(value)
                ))
            })?
            .naive_utc(),
        (_, Some(s)) => DateTime::parse_from_rfc3339(s)
            .map_err(|e| path.error(format!("{s:?} is not an RFC 3339 timestamp: {e}")))?
            .naive_utc(),
        _ => return Err(expected::<D>(value, "a timestamp", path)),
    };
    since_epoch(&at, unit).ok_or_else(|| path.error(format!("{} is out of range", D::text(value))))
}

fn local_epoch<D: Document>(
    value: &D::Value,
    path: &Path<'_>,
    unit: Unit,
) -> Result<i64, ValueError> {
    let text =
        D::as_str(value).ok_or_else(|| expected::<D>(value, "a local date and time", path))?;
    let at = NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .map_err(|e| path.error(format!("{text:?} is not a local date and time: {e}")))?;
    since_epoch(&at, unit).ok_or_else(|| path.error(format!("{text:?} is out of range")))
}
