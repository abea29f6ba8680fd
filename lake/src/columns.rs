//! The columns of a lake table, derived from the pipeline's output contract.
//!
//! | contract type | column                                   |
//! |---------------|------------------------------------------|
//! | `string`      | string                                   |
//! | `integer`     | 64-bit integer                           |
//! | `number`      | 64-bit float                             |
//! | `boolean`     | boolean                                  |
//! | `timestamp`   | timestamp, microseconds, UTC             |
//! | `object`      | struct of its listed members; JSON text when none are listed |
//! | `array`, `any`| JSON text                                |
//!
//! A field is a required column unless the contract marks it `optional`.
//! Fields beyond the contract (open schemas) have no column and are not
//! written: a table's columns are fixed, and the contract names them.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema as ArrowSchema, TimeUnit};
use keystone_crds::schema::{FieldType, SchemaSpec};

/// The time zone of timestamp columns (Iceberg's `timestamptz`).
pub const UTC: &str = "+00:00";

/// What a column holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnKind {
    String,
    Long,
    Double,
    Boolean,
    /// Microseconds since the epoch, UTC.
    Timestamp,
    /// Any JSON value, as its text.
    Json,
    Struct(Vec<Column>),
}

/// One column: a top-level field of the contract, or a member of a struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    /// The member name (the last segment of the dotted path).
    pub name: String,
    /// The dotted path from the event root, for messages.
    pub path: String,
    pub kind: ColumnKind,
    pub optional: bool,
    /// The contract's description of the field.
    pub description: Option<String>,
}

/// Why a contract cannot be a table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ColumnsError {
    #[error(
        "the output contract lists no fields, so there are no columns: declare the output schema (spec.output.schema or the last processor's contract)"
    )]
    NoFields,
}

/// The columns of `schema`, top-level fields in the contract's order.
pub fn columns_of(schema: &SchemaSpec) -> Result<Vec<Column>, ColumnsError> {
    if schema.fields.is_empty() {
        return Err(ColumnsError::NoFields);
    }
    // path -> (type, optional); parents of dotted paths are objects, optional
    // when every member under them is (fixed below).
    let mut listed: BTreeMap<&str, (FieldType, bool)> = BTreeMap::new();
    let described: BTreeMap<&str, &str> = schema
        .fields
        .iter()
        .filter_map(|f| Some((f.name.as_str(), f.description.as_deref()?)))
        .collect();
    let mut order: Vec<&str> = Vec::new();
    for field in &schema.fields {
        for (i, _) in field.name.match_indices('.') {
            let parent = &field.name[..i];
            if !listed.contains_key(parent) {
                listed.insert(parent, (FieldType::Object, false));
                order.push(parent);
            }
        }
        if !listed.contains_key(field.name.as_str()) {
            order.push(&field.name);
        }
        listed.insert(&field.name, (field.field_type, field.optional));
    }
    let explicit: Vec<&str> = schema.fields.iter().map(|f| f.name.as_str()).collect();
    for parent in order.iter().filter(|p| !explicit.contains(p)) {
        let prefix = format!("{parent}.");
        let all_optional = explicit
            .iter()
            .filter(|path| path.starts_with(&prefix))
            .all(|path| listed[path].1);
        if let Some(entry) = listed.get_mut(parent) {
            entry.1 = all_optional;
        }
    }
    Ok(children_of("", &listed, &described, &order))
}

fn children_of(
    parent: &str,
    listed: &BTreeMap<&str, (FieldType, bool)>,
    described: &BTreeMap<&str, &str>,
    order: &[&str],
) -> Vec<Column> {
    order
        .iter()
        .filter(|path| match path.rsplit_once('.') {
            Some((p, _)) => p == parent,
            None => parent.is_empty(),
        })
        .map(|path| {
            let (field_type, optional) = listed[path];
            let name = path.rsplit_once('.').map_or(*path, |(_, n)| n).to_owned();
            let kind = match field_type {
                FieldType::String => ColumnKind::String,
                FieldType::Integer => ColumnKind::Long,
                FieldType::Number => ColumnKind::Double,
                FieldType::Boolean => ColumnKind::Boolean,
                FieldType::Timestamp => ColumnKind::Timestamp,
                FieldType::Object => {
                    let members = children_of(path, listed, described, order);
                    if members.is_empty() {
                        ColumnKind::Json
                    } else {
                        ColumnKind::Struct(members)
                    }
                }
                FieldType::Array | FieldType::Any => ColumnKind::Json,
            };
            Column {
                name,
                path: (*path).to_owned(),
                kind,
                optional,
                description: described.get(path).map(|d| (*d).to_owned()),
            }
        })
        .collect()
}

impl Column {
    /// The column as an Arrow field (nullable when optional).
    pub fn arrow_field(&self) -> Field {
        Field::new(&self.name, self.kind.arrow_type(), self.optional)
    }
}

impl ColumnKind {
    /// What a value of the column must be, for dead-letter reasons.
    pub fn describe(&self) -> &'static str {
        match self {
            ColumnKind::String => "string",
            ColumnKind::Long => "64-bit integer",
            ColumnKind::Double => "floating-point",
            ColumnKind::Boolean => "boolean",
            ColumnKind::Timestamp => "timestamp (RFC 3339 text or epoch milliseconds)",
            ColumnKind::Json => "JSON text",
            ColumnKind::Struct(_) => "struct (a JSON object)",
        }
    }

    pub fn arrow_type(&self) -> DataType {
        match self {
            ColumnKind::String | ColumnKind::Json => DataType::Utf8,
            ColumnKind::Long => DataType::Int64,
            ColumnKind::Double => DataType::Float64,
            ColumnKind::Boolean => DataType::Boolean,
            ColumnKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into())),
            ColumnKind::Struct(members) => DataType::Struct(Fields::from(
                members.iter().map(Column::arrow_field).collect::<Vec<_>>(),
            )),
        }
    }
}

/// The Arrow schema of `columns`.
pub fn arrow_schema(columns: &[Column]) -> Arc<ArrowSchema> {
    Arc::new(ArrowSchema::new(
        columns.iter().map(Column::arrow_field).collect::<Vec<_>>(),
    ))
}

#[cfg(test)]
mod tests {
    use keystone_crds::schema::FieldSpec;

    use super::*;

    fn field(name: &str, field_type: FieldType, optional: bool) -> FieldSpec {
        FieldSpec {
            name: name.to_owned(),
            field_type,
            optional,
            description: None,
        }
    }

    #[test]
    fn dotted_members_become_structs_in_contract_order() {
        let schema = SchemaSpec {
            fields: vec![
                field("id", FieldType::String, false),
                field("customer.id", FieldType::Integer, false),
                field("customer.tier", FieldType::String, true),
                field("at", FieldType::Timestamp, false),
                field("tags", FieldType::Array, true),
            ],
            open: true,
        };
        let columns = columns_of(&schema).unwrap();
        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["id", "customer", "at", "tags"]);
        let ColumnKind::Struct(members) = &columns[1].kind else {
            panic!("customer is not a struct: {:?}", columns[1].kind);
        };
        assert_eq!(members[0].path, "customer.id");
        assert_eq!(members[0].kind, ColumnKind::Long);
        assert!(members[1].optional);
        assert!(
            !columns[1].optional,
            "an unlisted parent of required members is required"
        );
        let optional_only = SchemaSpec {
            fields: vec![field("user.name", FieldType::String, true)],
            open: true,
        };
        assert!(
            columns_of(&optional_only).unwrap()[0].optional,
            "an unlisted parent of optional members only is optional"
        );
        assert_eq!(columns[3].kind, ColumnKind::Json);
        assert_eq!(
            arrow_schema(&columns).field(2).data_type(),
            &DataType::Timestamp(TimeUnit::Microsecond, Some(UTC.into()))
        );
    }

    #[test]
    fn an_object_without_members_is_json_text() {
        let schema = SchemaSpec {
            fields: vec![field("payload", FieldType::Object, false)],
            open: false,
        };
        assert_eq!(columns_of(&schema).unwrap()[0].kind, ColumnKind::Json);
    }

    #[test]
    fn a_contract_without_fields_has_no_columns() {
        assert_eq!(
            columns_of(&SchemaSpec::default()),
            Err(ColumnsError::NoFields)
        );
    }
}
