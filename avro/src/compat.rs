//! Whether records written with one schema can be read with another.
//!
//! Avro's resolution rules as the codec implements them, with two additions:
//! the codec's check stops at decimals ("inconclusive"), so decimals are
//! compared here (the same scale and precision at the same place: a decimal's
//! value is its unscaled integer at the schema's scale) and the rest of the
//! schema is checked with decimals as their underlying bytes or fixed; and
//! schemas whose records have no bound are refused before any record is read.

use std::collections::BTreeMap;

use apache_avro::Schema;
use apache_avro::schema::DecimalSchema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use serde_json::Value;

use crate::contract::{self, ContractError};

/// Whether data written with `writer` can be read as `reader`, and if not why.
/// Refused besides: recursive writer schemas (their records could nest deeper
/// than any stack) and arrays of items that take no bytes (a count alone could
/// make millions of them).
pub fn can_read(writer: &Schema, reader: &Schema) -> Result<(), String> {
    if let Some(name) = contract::recursive_type(writer) {
        return Err(ContractError::Recursive { name }.to_string());
    }
    if let Some(path) = contract::array_of_empty_items(writer) {
        return Err(format!(
            "the writer schema's array {path} holds items that take no bytes (null or empty records): Keystone does not read such arrays"
        ));
    }
    let (written, read) = (decimals(writer), decimals(reader));
    for (path, (w_precision, w_scale)) in &written {
        if let Some((r_precision, r_scale)) = read.get(path)
            && (w_scale != r_scale || r_precision < w_precision)
        {
            return Err(format!(
                "field {path}: the writer's decimal({w_precision}, {w_scale}) cannot be read as the reader's decimal({r_precision}, {r_scale})"
            ));
        }
    }
    SchemaCompatibility::can_read(&without_decimals(writer)?, &without_decimals(reader)?)
        .map_err(|e| e.to_string())
}

/// Why `candidate` breaks the compatibility rule `level` (the registry's
/// names: BACKWARD, FORWARD, FULL and their `_TRANSITIVE` forms, NONE) against
/// `latest`, version `version` of the subject: Keystone's own reading, for
/// registries that answer the check without reasons. Transitive rules are
/// explained against the latest version only. Empty when it does not break it.
pub fn explain(level: &str, latest: &Schema, version: u32, candidate: &Schema) -> Vec<String> {
    let level = level.trim_end_matches("_TRANSITIVE");
    let mut reasons = Vec::new();
    if matches!(level, "BACKWARD" | "FULL")
        && let Err(reason) = can_read(latest, candidate)
    {
        reasons.push(format!(
            "consumers using the new schema cannot read records written with version {version}: {reason}"
        ));
    }
    if matches!(level, "FORWARD" | "FULL")
        && let Err(reason) = can_read(candidate, latest)
    {
        reasons.push(format!(
            "consumers still using version {version} cannot read records written with the new schema: {reason}"
        ));
    }
    reasons
}

/// Every decimal of `schema` by its path (fields by name, `[]` for array
/// items, `{}` for map values): (precision, scale).
pub(crate) fn decimals(schema: &Schema) -> BTreeMap<String, (usize, usize)> {
    let mut found = BTreeMap::new();
    collect(schema, schema, "", &mut found, &mut Vec::new());
    found
}

fn collect(
    schema: &Schema,
    root: &Schema,
    path: &str,
    found: &mut BTreeMap<String, (usize, usize)>,
    expanding: &mut Vec<String>,
) {
    match schema {
        Schema::Decimal(DecimalSchema {
            precision, scale, ..
        }) => {
            found.insert(path.to_owned(), (*precision, *scale));
        }
        Schema::Record(record) => {
            let name = record.name.fullname(None);
            if expanding.contains(&name) {
                return;
            }
            expanding.push(name);
            for field in &record.fields {
                let field_path = if path.is_empty() {
                    field.name.clone()
                } else {
                    format!("{path}.{}", field.name)
                };
                collect(&field.schema, root, &field_path, found, expanding);
            }
            expanding.pop();
        }
        Schema::Ref { name } => {
            let full = name.fullname(None);
            if !expanding.contains(&full)
                && let Some(defined) = contract::find_named(root, &full, &None)
            {
                collect(defined, root, path, found, expanding);
            }
        }
        Schema::Union(union) => {
            for variant in union.variants() {
                collect(variant, root, path, found, expanding);
            }
        }
        Schema::Array(array) => collect(&array.items, root, &format!("{path}[]"), found, expanding),
        Schema::Map(map) => collect(&map.types, root, &format!("{path}{{}}"), found, expanding),
        _ => {}
    }
}

/// `schema` with every decimal as its underlying bytes or fixed.
fn without_decimals(schema: &Schema) -> Result<Schema, String> {
    let mut json = serde_json::to_value(schema).map_err(|e| e.to_string())?;
    strip(&mut json);
    Schema::parse(&json).map_err(|e| e.to_string())
}

fn strip(json: &mut Value) {
    match json {
        Value::Object(object) => {
            if matches!(
                object.get("logicalType").and_then(Value::as_str),
                Some("decimal" | "big-decimal")
            ) {
                object.remove("logicalType");
                object.remove("precision");
                object.remove("scale");
            }
            object.values_mut().for_each(strip);
        }
        Value::Array(items) => items.iter_mut().for_each(strip),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_amount(decimal: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type": "record", "name": "P", "fields": [
              {{"name": "amount", "type": {decimal}}},
              {{"name": "history", "type": {{"type": "array", "items": ["null", {decimal}]}}}}
            ]}}"#
        ))
        .expect("schema")
    }

    const BYTES_10_2: &str =
        r#"{"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}"#;

    #[test]
    fn the_same_decimals_are_readable() {
        let schema = with_amount(BYTES_10_2);
        assert_eq!(can_read(&schema, &schema), Ok(()));
        let wider = with_amount(&BYTES_10_2.replace("10", "12"));
        assert_eq!(can_read(&schema, &wider), Ok(()), "more precision reads");
        let fixed = with_amount(
            r#"{"type": "fixed", "name": "Money", "size": 8, "logicalType": "decimal", "precision": 10, "scale": 2}"#,
        );
        assert_eq!(can_read(&fixed, &fixed), Ok(()));
    }

    #[test]
    fn another_scale_or_less_precision_is_named() {
        let schema = with_amount(BYTES_10_2);
        assert_eq!(
            can_read(&schema, &with_amount(&BYTES_10_2.replace("\"scale\": 2", "\"scale\": 3"))),
            Err("field amount: the writer's decimal(10, 2) cannot be read as the reader's decimal(10, 3)".into())
        );
        assert_eq!(
            can_read(&schema, &with_amount(&BYTES_10_2.replace("10", "8"))),
            Err("field amount: the writer's decimal(10, 2) cannot be read as the reader's decimal(8, 2)".into())
        );
    }

    #[test]
    fn a_broken_rule_is_explained_by_field() {
        let v1 = Schema::parse_str(
            r#"{"type": "record", "name": "U", "fields": [{"name": "id", "type": "long"}]}"#,
        )
        .expect("v1");
        let required = Schema::parse_str(
            r#"{"type": "record", "name": "U", "fields": [
              {"name": "id", "type": "long"}, {"name": "email", "type": "string"}]}"#,
        )
        .expect("v2");
        let backward = explain("BACKWARD", &v1, 3, &required);
        assert_eq!(backward.len(), 1, "{backward:?}");
        assert!(
            backward[0].starts_with(
                "consumers using the new schema cannot read records written with version 3: "
            ) && backward[0].contains("email"),
            "{backward:?}"
        );
        // Old consumers ignore the new field: FORWARD holds.
        assert_eq!(
            explain("FORWARD_TRANSITIVE", &v1, 3, &required),
            Vec::<String>::new()
        );
        assert_eq!(explain("FULL", &v1, 3, &required).len(), 1);
        assert_eq!(explain("NONE", &v1, 3, &required), Vec::<String>::new());
        // Removing a field without a default breaks FORWARD.
        let forward = explain("FORWARD", &required, 4, &v1);
        assert!(
            forward.len() == 1 && forward[0].contains("email"),
            "{forward:?}"
        );
    }

    #[test]
    fn the_rest_of_the_schema_is_still_checked() {
        let writer = with_amount(BYTES_10_2);
        let reader = Schema::parse_str(&format!(
            r#"{{"type": "record", "name": "P", "fields": [
              {{"name": "amount", "type": {BYTES_10_2}}},
              {{"name": "required", "type": "string"}}
            ]}}"#
        ))
        .expect("schema");
        let reason = can_read(&writer, &reader).unwrap_err();
        assert!(reason.contains("required"), "{reason}");
    }
}
