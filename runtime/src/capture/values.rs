//! Column values from PostgreSQL's text format (what `pgoutput` sends and what
//! the simple query protocol returns) to JSON, by the column's type, and the
//! contract type each column maps to.
//!
//! Both connections pin `DateStyle=ISO`, `TimeZone=UTC`, `IntervalStyle=iso_8601`
//! and `extra_float_digits=3` (see `source::SESSION_OPTIONS`), so a row read by a
//! snapshot chunk and the same row read from the log render identically.

use keystone_crds::schema::FieldType;
use serde_json::Value;

pub use keystone_crds::pipeline::capture::DecimalHandling;

// Type OIDs from pg_type.dat: fixed since PostgreSQL 7 and never reused.
const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const NUMERIC: u32 = 1700;
const JSONB: u32 = 3802;
const DATE: u32 = 1082;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;

/// The contract type of a column of type `oid`.
pub fn field_type(oid: u32, decimals: DecimalHandling) -> FieldType {
    match oid {
        BOOL => FieldType::Boolean,
        INT2 | INT4 | INT8 | OID => FieldType::Integer,
        FLOAT4 | FLOAT8 => FieldType::Number,
        NUMERIC => match decimals {
            DecimalHandling::String => FieldType::String,
            DecimalHandling::Number => FieldType::Number,
        },
        // Dates and times keep PostgreSQL's ISO text; timestamps with a zone
        // render in UTC as `2026-12-04 10:00:00+00`, which RFC 3339 readers
        // accept with a space, but the contract promises only a string.
        DATE | TIMESTAMP | TIMESTAMPTZ => FieldType::String,
        JSON | JSONB => FieldType::Any,
        _ => FieldType::String,
    }
}

/// The JSON value of a column of type `oid` whose text is `text`.
///
/// Nothing is lost: a value that does not fit the mapped JSON type (a float
/// `NaN` or `Infinity`, an integer past 64 bits, JSON that does not parse)
/// stays a string with its text.
pub fn to_json(oid: u32, text: &str, decimals: DecimalHandling) -> Value {
    match oid {
        BOOL => match text {
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
            other => Value::String(other.to_owned()),
        },
        INT2 | INT4 | INT8 | OID => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_owned())),
        FLOAT4 | FLOAT8 => finite_number(text),
        NUMERIC if decimals == DecimalHandling::Number => finite_number(text),
        JSON | JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        _ => Value::String(text.to_owned()),
    }
}

fn finite_number(text: &str) -> Value {
    text.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or_else(|| Value::String(text.to_owned()), Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars_map_to_their_json_types() {
        let d = DecimalHandling::String;
        assert_eq!(to_json(BOOL, "t", d), json!(true));
        assert_eq!(to_json(BOOL, "f", d), json!(false));
        assert_eq!(to_json(INT8, "-9223372036854775808", d), json!(i64::MIN));
        assert_eq!(to_json(INT4, "42", d), json!(42));
        assert_eq!(to_json(FLOAT8, "1.5", d), json!(1.5));
        assert_eq!(to_json(25, "héllo", d), json!("héllo"));
        assert_eq!(to_json(JSONB, r#"{"a": [1, 2]}"#, d), json!({"a": [1, 2]}));
    }

    #[test]
    fn numerics_are_exact_strings_unless_numbers_are_asked_for() {
        assert_eq!(
            to_json(NUMERIC, "12345678901234567890.50", DecimalHandling::String),
            json!("12345678901234567890.50")
        );
        assert_eq!(
            to_json(NUMERIC, "12.50", DecimalHandling::Number),
            json!(12.5)
        );
        assert_eq!(
            field_type(NUMERIC, DecimalHandling::String),
            FieldType::String
        );
        assert_eq!(
            field_type(NUMERIC, DecimalHandling::Number),
            FieldType::Number
        );
    }

    #[test]
    fn values_json_cannot_hold_stay_text() {
        let d = DecimalHandling::Number;
        assert_eq!(to_json(FLOAT8, "NaN", d), json!("NaN"));
        assert_eq!(to_json(FLOAT4, "Infinity", d), json!("Infinity"));
        assert_eq!(to_json(NUMERIC, "NaN", d), json!("NaN"));
        assert_eq!(to_json(JSON, "{not json", d), json!("{not json"));
    }
}
