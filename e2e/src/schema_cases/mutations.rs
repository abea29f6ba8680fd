//! The generic mutations: for a node of a base manifest and its schema, one
//! edit per constraint that violates it and one per bound that sits on it.

use serde_json::{Value as Json, json};

use super::Edit;

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

pub(super) fn edited(document: &Json, edit: &Edit) -> Json {
    let mut document = document.clone();
    let (pointer, value) = match edit {
        Edit::Set(p, v) => (p, Some(v.clone())),
        Edit::Remove(p) => (p, None),
    };
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let key = key.replace("~1", "/").replace("~0", "~");
    match (document.pointer_mut(parent).unwrap(), value) {
        (Json::Object(map), Some(v)) => {
            map.insert(key, v);
        }
        (Json::Object(map), None) => {
            map.remove(&key);
        }
        (Json::Array(items), Some(v)) => items[key.parse::<usize>().unwrap()] = v,
        (Json::Array(items), None) => {
            items.remove(key.parse::<usize>().unwrap());
        }
        (other, _) => panic!("{pointer}: parent is {other}"),
    }
    document
}

/// A string of exactly `n` characters that matches `pattern`, if one of a few
/// shapes does; without a pattern, two-byte characters, so that a length the
/// server counts in characters is told apart from one in bytes.
fn fill(n: usize, pattern: Option<&regex::Regex>) -> Option<String> {
    let Some(pattern) = pattern else {
        return Some("é".repeat(n));
    };
    let candidates = [
        "a".repeat(n),
        format!("{}s", "1".repeat(n.saturating_sub(1))),
        format!("/{}", "a".repeat(n.saturating_sub(1))),
        format!("http://{}", "a".repeat(n.saturating_sub(7))),
    ];
    candidates
        .into_iter()
        .find(|c| c.chars().count() == n && pattern.is_match(c))
}

/// A value of another type than `schema` declares.
fn wrong_type(schema: &Json) -> Json {
    match schema.get("type").and_then(Json::as_str) {
        Some("string") => json!(12345),
        Some("integer") | Some("number") | Some("boolean") | Some("object") | Some("array") => {
            json!("not-this-type")
        }
        _ => json!(true),
    }
}

fn member_schema<'s>(schema: &'s Json, key: &str) -> Option<&'s Json> {
    schema
        .get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))
}

/// The mutations of the node at `pointer` (value `value`, schema `schema`) and of
/// every node below it, as (label, edit, boundary).
pub(super) fn mutations(
    value: &Json,
    schema: &Json,
    pointer: &str,
    out: &mut Vec<(String, Edit, bool)>,
) {
    let mut push = |label: &str, edit: Edit, boundary: bool| {
        out.push((format!("{pointer} {label}"), edit, boundary));
    };
    let set = |v: Json| Edit::Set(pointer.to_owned(), v);
    push("null", set(Json::Null), false);
    push("wrong type", set(wrong_type(schema)), false);
    if schema.get("enum").is_some() {
        push("not in enum", set(json!("NotInTheEnum")), false);
    }
    let number = |key: &str| schema.get(key).and_then(Json::as_f64);
    match value {
        Json::String(_) => {
            let pattern = schema
                .get("pattern")
                .and_then(Json::as_str)
                .map(|p| regex::Regex::new(p).unwrap());
            if pattern.is_some() {
                push("pattern mismatch", set(json!("no match!")), false);
            }
            let p = pattern.as_ref();
            if let Some(min) = number("minLength").map(|m| m as usize) {
                if min > 0
                    && let Some(s) = fill(min - 1, p).or_else(|| fill(min - 1, None))
                {
                    push(
                        &format!("length {} < minLength", min - 1),
                        set(json!(s)),
                        false,
                    );
                }
                if let Some(s) = fill(min, p).filter(|_| min > 0) {
                    push(&format!("length {min} = minLength"), set(json!(s)), true);
                }
            }
            if let Some(max) = number("maxLength").map(|m| m as usize) {
                if let Some(s) = fill(max, p) {
                    push(&format!("length {max} = maxLength"), set(json!(s)), true);
                }
                if let Some(s) = fill(max + 1, p).or_else(|| fill(max + 1, None)) {
                    push(
                        &format!("length {} > maxLength", max + 1),
                        set(json!(s)),
                        false,
                    );
                }
            }
        }
        Json::Number(_) => {
            let integer = schema.get("type").and_then(Json::as_str) == Some("integer");
            if let Some(min) = number("minimum") {
                push("minimum - 1", set(json!(min as i64 - 1)), false);
                push("= minimum", set(json!(min as i64)), true);
            }
            if let Some(max) = number("maximum") {
                push("= maximum", set(json!(max as i64)), true);
                push("maximum + 1", set(json!(max as i64 + 1)), false);
            }
            if integer {
                push("a fraction", set(json!(2.5)), false);
                push(
                    "an integral float",
                    set(json!(2.0)),
                    number("minimum").is_none_or(|m| m <= 2.0)
                        && number("maximum").is_none_or(|m| m >= 2.0),
                );
            }
        }
        Json::Array(items) => {
            let resized = |n: usize| -> Option<Json> {
                let template = items.first()?;
                Some(Json::Array(
                    (0..n)
                        .map(|i| {
                            let mut item = items.get(i).unwrap_or(template).clone();
                            // Keep names unique (map-list keys, step names).
                            if i >= items.len()
                                && let Some(name) = item.get_mut("name")
                                && name.is_string()
                            {
                                *name = json!(format!("n{i}"));
                            }
                            item
                        })
                        .collect(),
                ))
            };
            if let Some(min) = number("minItems").map(|m| m as usize)
                && min > 0
            {
                push(
                    &format!("{} < minItems", min - 1),
                    set(Json::Array(items[..min - 1].to_vec())),
                    false,
                );
            }
            if let Some(max) = number("maxItems").map(|m| m as usize) {
                if let Some(v) = resized(max) {
                    push(&format!("{max} = maxItems"), set(v), true);
                }
                if let Some(v) = resized(max + 1) {
                    push(&format!("{} > maxItems", max + 1), set(v), false);
                }
            }
            if schema.get("x-kubernetes-list-type").and_then(Json::as_str) == Some("map")
                && let Some(first) = items.first()
            {
                let mut doubled = items.clone();
                doubled.push(first.clone());
                push("duplicate map key", set(Json::Array(doubled)), false);
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    mutations(item, item_schema, &format!("{pointer}/{i}"), out);
                }
            }
        }
        Json::Object(map) => {
            for key in schema
                .get("required")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
                .filter_map(Json::as_str)
            {
                if map.contains_key(key) {
                    out.push((
                        format!("{pointer}/{key} removed (required)"),
                        Edit::Remove(format!("{pointer}/{}", escape(key))),
                        false,
                    ));
                }
            }
            if schema.get("x-kubernetes-preserve-unknown-fields") != Some(&Json::Bool(true)) {
                // An unknown field, or in a map an entry of the wrong type.
                out.push((
                    format!("{pointer} unknown field"),
                    Edit::Set(format!("{pointer}/unknownField"), json!(true)),
                    false,
                ));
            }
            for (key, child) in map {
                if let Some(child_schema) = member_schema(schema, key) {
                    mutations(
                        child,
                        child_schema,
                        &format!("{pointer}/{}", escape(key)),
                        out,
                    );
                }
            }
        }
        Json::Bool(_) | Json::Null => {}
    }
}
