//! Avro values as JSON: one walk over the value and its schema, which builds a
//! `serde_json` value or writes the JSON text straight away.

use std::borrow::Cow;

use apache_avro::Schema;
use apache_avro::schema::DecimalSchema;
use apache_avro::types::Value as Avro;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, NaiveDate, NaiveTime, SecondsFormat};
use num_bigint::BigInt;
use serde_json::{Map, Number, Value};

use super::{Names, Path, ValueError};

/// A JSON value other than an array or an object.
pub(super) enum Scalar<'a> {
    Null,
    Bool(bool),
    Int(i64),
    /// Always finite.
    Float(f64),
    Str(Cow<'a, str>),
}

/// Where the JSON form of an Avro value goes.
pub(super) trait Out: Sized {
    fn scalar(&mut self, value: Scalar<'_>);

    /// An array of `items`, each given by `item`.
    fn array<T>(
        &mut self,
        items: &[T],
        item: impl FnMut(&mut Self, usize, &T) -> Result<(), ValueError>,
    ) -> Result<(), ValueError>;

    /// An object of `members` in their order, each value given by `member`.
    fn object<T>(
        &mut self,
        members: &[(&str, T)],
        member: impl FnMut(&mut Self, &str, &T) -> Result<(), ValueError>,
    ) -> Result<(), ValueError>;
}

/// Builds a `serde_json` value.
pub(super) struct Tree(pub(super) Value);

impl Out for Tree {
    fn scalar(&mut self, value: Scalar<'_>) {
        self.0 = match value {
            Scalar::Null => Value::Null,
            Scalar::Bool(b) => Value::Bool(b),
            Scalar::Int(i) => Value::from(i),
            Scalar::Float(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
            Scalar::Str(s) => Value::String(s.into_owned()),
        };
    }

    fn array<T>(
        &mut self,
        items: &[T],
        mut item: impl FnMut(&mut Self, usize, &T) -> Result<(), ValueError>,
    ) -> Result<(), ValueError> {
        let mut built = Vec::with_capacity(items.len());
        for (i, t) in items.iter().enumerate() {
            let mut one = Tree(Value::Null);
            item(&mut one, i, t)?;
            built.push(one.0);
        }
        self.0 = Value::Array(built);
        Ok(())
    }

    fn object<T>(
        &mut self,
        members: &[(&str, T)],
        mut member: impl FnMut(&mut Self, &str, &T) -> Result<(), ValueError>,
    ) -> Result<(), ValueError> {
        let mut built = Map::new();
        for (name, t) in members {
            let mut one = Tree(Value::Null);
            member(&mut one, name, t)?;
            built.insert((*name).to_owned(), one.0);
        }
        self.0 = Value::Object(built);
        Ok(())
    }
}

/// Writes compact JSON text: what `serde_json` writes of the value [`Tree`]
/// builds, but for the order of a record's members (a `serde_json` map sorts
/// them; the text keeps the schema's order, as Avro tools print a record).
pub(super) struct Text<'a>(pub(super) &'a mut Vec<u8>);

// Writing to a vector cannot fail, nor can serializing a string or a finite
// number: the results of `serde_json::to_writer` are ignored.
impl Out for Text<'_> {
    fn scalar(&mut self, value: Scalar<'_>) {
        match value {
            Scalar::Null => self.0.extend_from_slice(b"null"),
            Scalar::Bool(true) => self.0.extend_from_slice(b"true"),
            Scalar::Bool(false) => self.0.extend_from_slice(b"false"),
            Scalar::Int(i) => {
                let _ = serde_json::to_writer(&mut *self.0, &i);
            }
            Scalar::Float(f) => {
                let _ = serde_json::to_writer(&mut *self.0, &f);
            }
            Scalar::Str(s) => {
                let _ = serde_json::to_writer(&mut *self.0, s.as_ref());
            }
        }
    }

    fn array<T>(
        &mut self,
        items: &[T],
        mut item: impl FnMut(&mut Self, usize, &T) -> Result<(), ValueError>,
    ) -> Result<(), ValueError> {
        self.0.push(b'[');
        for (i, t) in items.iter().enumerate() {
            if i > 0 {
                self.0.push(b',');
            }
            item(self, i, t)?;
        }
        self.0.push(b']');
        Ok(())
    }

    fn object<T>(
        &mut self,
        members: &[(&str, T)],
        mut member: impl FnMut(&mut Self, &str, &T) -> Result<(), ValueError>,
    ) -> Result<(), ValueError> {
        self.0.push(b'{');
        for (i, (name, t)) in members.iter().enumerate() {
            if i > 0 {
                self.0.push(b',');
            }
            let _ = serde_json::to_writer(&mut *self.0, name);
            self.0.push(b':');
            member(self, name, t)?;
        }
        self.0.push(b'}');
        Ok(())
    }
}

/// Members ordered by name, as a `serde_json` object (a sorted map) has them.
fn sorted<T>(mut members: Vec<(&str, T)>) -> Vec<(&str, T)> {
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    members
}

/// The JSON form of `value`, read with `schema`, given to `out`.
pub(super) fn read<O: Out>(
    value: &Avro,
    schema: &Schema,
    names: &Names,
    path: &Path<'_>,
    out: &mut O,
) -> Result<(), ValueError> {
    path.check_depth()?;
    let schema = names.deref(schema, path)?;
    let scalar = match (value, schema) {
        (Avro::Union(index, inner), Schema::Union(union)) => {
            let branch = union
                .variants()
                .get(*index as usize)
                .ok_or_else(|| path.error(format!("union branch {index} is not in the schema")))?;
            return read(inner, branch, names, path, out);
        }
        (Avro::Union(_, inner), other) => return read(inner, other, names, path, out),
        (Avro::Array(items), Schema::Array(array)) => {
            return out.array(items, |out, i, item| {
                read(item, &array.items, names, &path.index(i), out)
            });
        }
        (Avro::Map(entries), Schema::Map(map)) => {
            let members = sorted(entries.iter().map(|(k, v)| (k.as_str(), v)).collect());
            return out.object(&members, |out, name, v| {
                read(v, &map.types, names, &path.field(name), out)
            });
        }
        (Avro::Record(fields), Schema::Record(record)) => {
            let mut members = Vec::with_capacity(fields.len());
            for (i, (name, v)) in fields.iter().enumerate() {
                // A decoded record has the schema's fields in its order: the
                // lookup by name is for values built any other way.
                let field_schema = match record.fields.get(i) {
                    Some(field) if field.name == *name => &field.schema,
                    _ => record
                        .lookup
                        .get(name)
                        .map(|&i| &record.fields[i].schema)
                        .ok_or_else(|| {
                            path.field(name).error("not a field of the record's schema")
                        })?,
                };
                members.push((name.as_str(), (v, field_schema)));
            }
            return out.object(&members, |out, name, (v, field_schema)| {
                read(v, field_schema, names, &path.field(name), out)
            });
        }
        (Avro::Duration(d), _) => {
            let parts = [
                ("days", u32::from(d.days())),
                ("millis", u32::from(d.millis())),
                ("months", u32::from(d.months())),
            ];
            return out.object(&parts, |out, _, n| {
                out.scalar(Scalar::Int(i64::from(*n)));
                Ok(())
            });
        }
        (Avro::Null, _) => Scalar::Null,
        (Avro::Boolean(b), _) => Scalar::Bool(*b),
        (Avro::Int(i), _) => Scalar::Int(i64::from(*i)),
        (Avro::Long(i), _) => Scalar::Int(*i),
        (Avro::Float(f), _) => finite(f64::from(*f), path)?,
        (Avro::Double(f), _) => finite(*f, path)?,
        (Avro::String(s), _) | (Avro::Enum(_, s), _) => Scalar::Str(Cow::Borrowed(s)),
        (Avro::Bytes(b), _) | (Avro::Fixed(_, b), _) => Scalar::Str(BASE64.encode(b).into()),
        (Avro::Uuid(u), _) => Scalar::Str(u.to_string().into()),
        (
            Avro::Decimal(d),
            Schema::Decimal(DecimalSchema {
                scale, precision, ..
            }),
        ) => Scalar::Str(decimal_text(&BigInt::from(d.clone()), *scale, *precision, path)?.into()),
        (Avro::BigDecimal(d), _) => Scalar::Str(d.to_string().into()),
        (Avro::Date(days), _) => Scalar::Str(
            NaiveDate::from_epoch_days(*days)
                .ok_or_else(|| path.error(format!("date {days} days from 1970 is out of range")))?
                .to_string()
                .into(),
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
        (value, schema) => {
            return Err(path.error(format!(
                "a {value:?} does not belong to the schema's {schema}"
            )));
        }
    };
    out.scalar(scalar);
    Ok(())
}

fn finite(f: f64, path: &Path<'_>) -> Result<Scalar<'static>, ValueError> {
    if f.is_finite() {
        Ok(Scalar::Float(f))
    } else {
        Err(path.error(format!("{f} has no JSON form (JSON numbers are finite)")))
    }
}

/// The text of a decimal, or why it is not of its schema: bytes hold any
/// number of digits, and one beyond the schema's precision could be written
/// by no sink.
fn decimal_text(
    unscaled: &BigInt,
    scale: usize,
    precision: usize,
    path: &Path<'_>,
) -> Result<String, ValueError> {
    let digits = unscaled.magnitude().to_string();
    let sign = if unscaled.sign() == num_bigint::Sign::Minus {
        "-"
    } else {
        ""
    };
    let text = if scale == 0 {
        format!("{sign}{digits}")
    } else {
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (whole, fraction) = padded.split_at(padded.len() - scale);
        format!("{sign}{whole}.{fraction}")
    };
    let significant = digits.trim_start_matches('0').len();
    if significant > precision {
        return Err(path.error(format!(
            "{text} has {significant} digits, the schema's precision is {precision}"
        )));
    }
    Ok(text)
}

fn time_of_day(nanos: i64, path: &Path<'_>) -> Result<Scalar<'static>, ValueError> {
    let secs = u32::try_from(nanos.div_euclid(1_000_000_000)).ok();
    let frac = u32::try_from(nanos.rem_euclid(1_000_000_000)).ok();
    secs.zip(frac)
        .and_then(|(s, n)| NaiveTime::from_num_seconds_from_midnight_opt(s, n))
        .map(|t| Scalar::Str(t.format("%H:%M:%S%.f").to_string().into()))
        .ok_or_else(|| path.error("a time of day beyond 24 hours"))
}

fn utc(
    at: Option<DateTime<chrono::Utc>>,
    raw: i64,
    path: &Path<'_>,
) -> Result<Scalar<'static>, ValueError> {
    at.map(|t| Scalar::Str(t.to_rfc3339_opts(SecondsFormat::AutoSi, true).into()))
        .ok_or_else(|| path.error(format!("timestamp {raw} is out of range")))
}

fn local(
    at: Option<DateTime<chrono::Utc>>,
    raw: i64,
    path: &Path<'_>,
) -> Result<Scalar<'static>, ValueError> {
    at.map(|t| {
        Scalar::Str(
            t.naive_utc()
                .format("%Y-%m-%dT%H:%M:%S%.f")
                .to_string()
                .into(),
        )
    })
    .ok_or_else(|| path.error(format!("timestamp {raw} is out of range")))
}
