//! The structural-schema part of the API server's validation of a custom
//! resource: strict field validation, null pruning, defaulting, and the OpenAPI
//! keywords the Keystone CRDs use (type, nullable, required, properties,
//! additionalProperties, enum, minimum/maximum, minLength/maxLength, pattern,
//! minItems/maxItems, x-kubernetes-int-or-string,
//! x-kubernetes-preserve-unknown-fields and x-kubernetes-list-type).
//! `format` is not checked: the CRDs' spec uses only int32, int64 and uint32,
//! which the API server does not enforce (date-time appears only in status,
//! which a create drops).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use regex::Regex;
use serde_json::{Map, Value as Json};

use super::{Violation, child_path};

fn preserves_unknown(schema: &Json) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Json::Bool(true))
}

fn nullable(schema: &Json) -> bool {
    schema.get("nullable") == Some(&Json::Bool(true))
}

/// The schema of `key` in an object of `schema`: a property, else additionalProperties.
fn member_schema<'s>(schema: &'s Json, key: &str) -> Option<&'s Json> {
    schema
        .get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))
}

/// Strict field validation: every field the schema does not declare. At the root,
/// `apiVersion`, `kind` and `metadata` are always declared.
pub(super) fn unknown_fields(value: &Json, schema: &Json, path: &str, out: &mut Vec<Violation>) {
    if preserves_unknown(schema) {
        return;
    }
    match value {
        Json::Object(map) => {
            for (key, child) in map {
                if path.is_empty() && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let child_path = child_path(path, key);
                match member_schema(schema, key) {
                    Some(child_schema) => unknown_fields(child, child_schema, &child_path, out),
                    // additionalProperties: true keeps everything.
                    None if schema.get("additionalProperties") == Some(&Json::Bool(true)) => {}
                    None => out.push(Violation::new(
                        &child_path,
                        format!("unknown field {child_path}"),
                    )),
                }
            }
        }
        Json::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    unknown_fields(item, item_schema, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// The API server removes null values of fields that are neither nullable nor
/// defaulted before it applies defaults (a null of a defaulted field gets the
/// default). Array items are not pruned: a null item fails its type.
pub(super) fn prune_nulls(value: &mut Json, schema: &Json) {
    match value {
        Json::Object(map) => {
            map.retain(|key, child| {
                !(child.is_null()
                    && member_schema(schema, key)
                        .is_some_and(|s| !nullable(s) && s.get("default").is_none()))
            });
            for (key, child) in map.iter_mut() {
                if let Some(child_schema) = member_schema(schema, key) {
                    prune_nulls(child, child_schema);
                }
            }
        }
        Json::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    prune_nulls(item, item_schema);
                }
            }
        }
        _ => {}
    }
}

/// `default:` of every absent (or non-nullable null) field, recursively: a
/// defaulted object gets the defaults of its own fields too.
pub(super) fn apply_defaults(value: &mut Json, schema: &Json) {
    match value {
        Json::Object(map) => {
            if let Some(properties) = schema.get("properties").and_then(Json::as_object) {
                for (key, property) in properties {
                    let Some(default) = property.get("default") else {
                        continue;
                    };
                    let missing = match map.get(key) {
                        None => true,
                        Some(Json::Null) => !nullable(property),
                        Some(_) => false,
                    };
                    if missing {
                        map.insert(key.clone(), default.clone());
                    }
                }
            }
            for (key, child) in map.iter_mut() {
                if let Some(child_schema) = member_schema(schema, key) {
                    apply_defaults(child, child_schema);
                }
            }
        }
        Json::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    if item.is_null()
                        && !nullable(item_schema)
                        && let Some(default) = item_schema.get("default")
                    {
                        *item = default.clone();
                    }
                    apply_defaults(item, item_schema);
                }
            }
        }
        _ => {}
    }
}

/// The OpenAPI type of a JSON value, as the API server names it: a number without
/// a fractional part is an integer.
pub(super) fn json_type_name(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(n) if is_integral(n) => "integer",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

fn is_integral(n: &serde_json::Number) -> bool {
    n.is_i64()
        || n.is_u64()
        || n.as_f64()
            .is_some_and(|f| f.is_finite() && f.fract() == 0.0)
}

/// Whether `value` has the type `schema` declares.
fn type_matches(value: &Json, schema: &Json) -> Result<(), String> {
    let actual = json_type_name(value);
    if schema.get("x-kubernetes-int-or-string") == Some(&Json::Bool(true)) {
        return match actual {
            "integer" | "string" => Ok(()),
            _ => Err("integer or string".to_owned()),
        };
    }
    let Some(expected) = schema.get("type").and_then(Json::as_str) else {
        return Ok(());
    };
    let ok = match expected {
        // An integer is a number; a number is an integer when it has no fraction.
        "number" => matches!(actual, "number" | "integer"),
        other => other == actual,
    };
    if ok { Ok(()) } else { Err(expected.to_owned()) }
}

/// A schema bound (stored as a float, `1.0`) as users wrote it (`1`).
fn bound(value: &Json) -> String {
    match value.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
        _ => value.to_string(),
    }
}

/// The violations of the structural schema, and whether one of them keeps the
/// API server from evaluating the CEL rules: a wrong type, a missing required
/// field, a value outside an enum, or a value too long or with too many items or
/// properties (the kinds of error a rule could not make sense of, or could cost too
/// much on). Bounds such as minimum, minLength, minItems or pattern do not block.
#[derive(Default)]
pub(super) struct Report {
    pub(super) violations: Vec<Violation>,
    pub(super) blocking: bool,
}

impl Report {
    fn push(&mut self, violation: Violation) {
        self.violations.push(violation);
    }

    fn block(&mut self, violation: Violation) {
        self.blocking = true;
        self.violations.push(violation);
    }
}

/// Checks `value` against `schema` and its descendants.
pub(super) fn validate_value(value: &Json, schema: &Json, path: &str, out: &mut Report) {
    if value.is_null() && nullable(schema) {
        return;
    }
    if let Err(expected) = type_matches(value, schema) {
        // The API server shows only the value's type; the value itself says more.
        let shown = match value {
            Json::Object(_) | Json::Array(_) => format!("\"{}\"", json_type_name(value)),
            scalar => scalar.to_string(),
        };
        out.block(Violation::new(
            path,
            format!(
                "Invalid value: {shown}: {path} in body must be of type {expected}: \"{}\"",
                json_type_name(value)
            ),
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Json::as_array)
        && !allowed.iter().any(|a| json_equal(a, value))
    {
        let supported: Vec<String> = allowed.iter().map(Json::to_string).collect();
        out.block(Violation::new(
            path,
            format!(
                "Unsupported value: {}: supported values: {}",
                value,
                supported.join(", ")
            ),
        ));
    }
    match value {
        Json::String(text) => validate_string(text, schema, path, out),
        Json::Number(number) => validate_number(number, schema, path, out),
        Json::Array(items) => validate_array(items, schema, path, out),
        Json::Object(map) => validate_object(map, schema, path, out),
        _ => {}
    }
}

fn validate_string(text: &str, schema: &Json, path: &str, out: &mut Report) {
    // Kubernetes counts characters (runes), not bytes.
    let length = text.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Json::as_u64)
        && length < min
    {
        out.push(Violation::new(
            path,
            format!(
                "Invalid value: {}: {path} in body should be at least {min} chars long",
                Json::from(text)
            ),
        ));
    }
    if let Some(max) = schema.get("maxLength").and_then(Json::as_u64)
        && length > max
    {
        out.block(Violation::new(
            path,
            format!("Too long: may not be more than {max} characters (it has {length})"),
        ));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Json::as_str) {
        match compiled(pattern) {
            Some(regex) if regex.is_match(text) => {}
            Some(_) => out.push(Violation::new(
                path,
                format!(
                    "Invalid value: {}: {path} in body should match '{pattern}'",
                    Json::from(text)
                ),
            )),
            None => out.push(Violation::new(
                path,
                format!("the schema's pattern '{pattern}' is not a valid regular expression"),
            )),
        }
    }
}

/// Patterns compiled once per process: a manifest run checks the same few many times.
fn compiled(pattern: &str) -> Option<Regex> {
    static CACHE: OnceLock<Mutex<HashMap<String, Option<Regex>>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    cache
        .entry(pattern.to_owned())
        .or_insert_with(|| Regex::new(pattern).ok())
        .clone()
}

fn validate_number(number: &serde_json::Number, schema: &Json, path: &str, out: &mut Report) {
    let Some(value) = number.as_f64() else {
        return;
    };
    let exclusive = |key: &str| schema.get(key) == Some(&Json::Bool(true));
    if let Some(min) = schema.get("minimum")
        && let Some(m) = min.as_f64()
    {
        let (fails, relation) = if exclusive("exclusiveMinimum") {
            (value <= m, "greater than")
        } else {
            (value < m, "greater than or equal to")
        };
        if fails {
            out.push(Violation::new(
                path,
                format!(
                    "Invalid value: {number}: {path} in body should be {relation} {}",
                    bound(min)
                ),
            ));
        }
    }
    if let Some(max) = schema.get("maximum")
        && let Some(m) = max.as_f64()
    {
        let (fails, relation) = if exclusive("exclusiveMaximum") {
            (value >= m, "less than")
        } else {
            (value > m, "less than or equal to")
        };
        if fails {
            out.push(Violation::new(
                path,
                format!(
                    "Invalid value: {number}: {path} in body should be {relation} {}",
                    bound(max)
                ),
            ));
        }
    }
    if let Some(factor) = schema.get("multipleOf").and_then(Json::as_f64)
        && factor > 0.0
        && (value / factor).fract() != 0.0
    {
        out.push(Violation::new(
            path,
            format!(
                "Invalid value: {number}: {path} in body should be a multiple of {}",
                bound(&schema["multipleOf"])
            ),
        ));
    }
}

fn validate_array(items: &[Json], schema: &Json, path: &str, out: &mut Report) {
    let count = items.len() as u64;
    if let Some(min) = schema.get("minItems").and_then(Json::as_u64)
        && count < min
    {
        out.push(Violation::new(
            path,
            format!("Invalid value: {count}: {path} in body should have at least {min} items"),
        ));
    }
    if let Some(max) = schema.get("maxItems").and_then(Json::as_u64)
        && count > max
    {
        out.block(Violation::new(
            path,
            format!("Too many: {count}: must have at most {max} items"),
        ));
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            validate_value(item, item_schema, &format!("{path}[{i}]"), out);
        }
    }
    match schema.get("x-kubernetes-list-type").and_then(Json::as_str) {
        Some("set") => {
            for (i, item) in items.iter().enumerate() {
                if items[..i].iter().any(|earlier| json_equal(earlier, item)) {
                    out.push(Violation::new(
                        &format!("{path}[{i}]"),
                        format!("Duplicate value: {item}"),
                    ));
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Json::as_array)
                .map(|k| k.iter().filter_map(Json::as_str).collect())
                .unwrap_or_default();
            let key_of = |item: &Json| -> Map<String, Json> {
                keys.iter()
                    .filter_map(|k| item.get(*k).map(|v| ((*k).to_owned(), v.clone())))
                    .collect()
            };
            for (i, item) in items.iter().enumerate() {
                let key = key_of(item);
                if items[..i].iter().any(|earlier| key_of(earlier) == key) {
                    out.push(Violation::new(
                        &format!("{path}[{i}]"),
                        format!(
                            "Duplicate value: {}: another item has the same {}",
                            Json::Object(key),
                            keys.join(", ")
                        ),
                    ));
                }
            }
        }
        _ => {}
    }
}

fn validate_object(map: &Map<String, Json>, schema: &Json, path: &str, out: &mut Report) {
    if let Some(required) = schema.get("required").and_then(Json::as_array) {
        for key in required.iter().filter_map(Json::as_str) {
            if !map.contains_key(key) {
                out.block(Violation::new(&child_path(path, key), "Required value"));
            }
        }
    }
    let count = map.len() as u64;
    if let Some(min) = schema.get("minProperties").and_then(Json::as_u64)
        && count < min
    {
        out.push(Violation::new(
            path,
            format!("Invalid value: {count}: {path} in body should have at least {min} properties"),
        ));
    }
    if let Some(max) = schema.get("maxProperties").and_then(Json::as_u64)
        && count > max
    {
        out.block(Violation::new(
            path,
            format!("Too many: {count}: must have at most {max} items"),
        ));
    }
    for (key, child) in map {
        // Unknown fields were reported already (and the API server prunes them).
        if let Some(child_schema) = member_schema(schema, key) {
            validate_value(child, child_schema, &child_path(path, key), out);
        }
    }
}

/// JSON equality with numbers compared by value (`1` equals `1.0`).
pub(super) fn json_equal(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => x.as_f64() == y.as_f64(),
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_equal(a, b))
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}
