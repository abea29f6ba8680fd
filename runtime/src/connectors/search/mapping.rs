//! Pure: the index a sink creates, from the pipeline's output schema.

use std::collections::BTreeMap;

use keystone_crds::schema::{FieldType, SchemaSpec};

use super::config::SearchConfig;

/// The `mappings` of a created index, from the output schema: string as
/// keyword, integer as long, number as double, boolean, timestamp as date
/// (RFC 3339 or epoch milliseconds, as Keystone timestamps are), objects with
/// their dotted children as `properties`. Arrays and `any` fields get no
/// explicit mapping (the index maps them from the first value it sees);
/// `dynamic` is left to the index's default.
pub(crate) fn index_mapping(schema: &SchemaSpec) -> serde_json::Value {
    let mut root = Node::default();
    for field in &schema.fields {
        let mut node = &mut root;
        for segment in field.name.split('.') {
            node = node.children.entry(segment.to_owned()).or_default();
        }
        node.declared = Some(field.field_type);
    }
    serde_json::json!({ "properties": root.properties() })
}

#[derive(Default)]
struct Node {
    declared: Option<FieldType>,
    children: BTreeMap<String, Node>,
}

impl Node {
    fn properties(&self) -> serde_json::Map<String, serde_json::Value> {
        self.children
            .iter()
            .filter_map(|(name, child)| child.mapping().map(|m| (name.clone(), m)))
            .collect()
    }

    fn mapping(&self) -> Option<serde_json::Value> {
        use serde_json::json;
        // Declared children make a field an object whatever its own type says
        // (the checker treats the parents of dotted fields as objects too; an
        // array of objects is mapped as its objects).
        if !self.children.is_empty() {
            return Some(json!({ "type": "object", "properties": self.properties() }));
        }
        Some(match self.declared? {
            FieldType::String => json!({ "type": "keyword" }),
            FieldType::Integer => json!({ "type": "long" }),
            FieldType::Number => json!({ "type": "double" }),
            FieldType::Boolean => json!({ "type": "boolean" }),
            FieldType::Timestamp => {
                json!({ "type": "date", "format": "strict_date_optional_time||epoch_millis" })
            }
            FieldType::Object => json!({ "type": "object" }),
            FieldType::Array | FieldType::Any => return None,
        })
    }
}

/// The body of `PUT /{index}`.
pub(crate) fn create_index_body(config: &SearchConfig) -> serde_json::Value {
    serde_json::json!({
        "settings": config.index_settings,
        "mappings": index_mapping(&config.schema),
    })
}

#[cfg(test)]
mod tests {
    use keystone_crds::schema::FieldSpec;

    use super::*;

    #[test]
    fn the_mapping_follows_the_schema() {
        let field = |name: &str, field_type| FieldSpec {
            name: name.into(),
            field_type,
            optional: false,
            description: None,
        };
        let schema = SchemaSpec {
            fields: vec![
                field("id", FieldType::String),
                field("amount", FieldType::Number),
                field("count", FieldType::Integer),
                field("paid", FieldType::Boolean),
                field("at", FieldType::Timestamp),
                field("tags", FieldType::Array),
                field("extra", FieldType::Any),
                field("meta", FieldType::Object),
                field("customer", FieldType::Object),
                field("customer.id", FieldType::Integer),
                field("customer.address.city", FieldType::String),
            ],
            open: true,
        };
        let expected = serde_json::json!({"properties": {
            "id": {"type": "keyword"},
            "amount": {"type": "double"},
            "count": {"type": "long"},
            "paid": {"type": "boolean"},
            "at": {"type": "date", "format": "strict_date_optional_time||epoch_millis"},
            "meta": {"type": "object"},
            "customer": {"type": "object", "properties": {
                "id": {"type": "long"},
                "address": {"type": "object", "properties": {"city": {"type": "keyword"}}}
            }}
        }});
        assert_eq!(index_mapping(&schema), expected);
        assert_eq!(
            index_mapping(&SchemaSpec::default()),
            serde_json::json!({"properties": {}})
        );
    }
}
