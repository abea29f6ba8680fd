//! Processing contracts from registered Avro schemas, and Avro schemas from
//! output contracts.
//!
//! Reading (a source's registered schema as the input contract):
//!
//! | Avro                                   | contract                         |
//! |----------------------------------------|----------------------------------|
//! | `record`                               | `object`, its fields listed by dotted path |
//! | `["null", T]` (either order)           | `T`, `optional`                  |
//! | other unions                           | `any` (optional when `null` is a branch) |
//! | `int`, `long`                          | `integer`                        |
//! | `float`, `double`                      | `number`                         |
//! | `boolean`                              | `boolean`                        |
//! | `string`, `enum`, `uuid`               | `string`                         |
//! | `bytes`, `fixed`                       | `string` (base64)                |
//! | `decimal`, `big-decimal`               | `string` (the exact decimal, `"12.50"`) |
//! | `date`, `time-*`, `local-timestamp-*`  | `string` (ISO 8601)              |
//! | `timestamp-millis`/`-micros`/`-nanos`  | `timestamp`                      |
//! | `array`                                | `array`                          |
//! | `map`, `duration`                      | `object` (members not listed)    |
//!
//! A record that contains itself (a linked list, a tree) is refused: its
//! events have no bound on their depth. The contract of a record is closed:
//! the reader schema's fields are all an event has after schema resolution.
//!
//! Writing (a Kafka sink's `schema: fromContract`): the columns of
//! [`keystone_lake::columns::columns_of`] become the fields of a record, nested objects
//! records of their own named after their path; `optional` fields are
//! `["null", T]` with default null; `timestamp` is `long` `timestamp-micros`;
//! `array`, `any` and objects whose members are not listed are `string`s of
//! JSON text, as in a lake table.

use std::collections::BTreeSet;

use apache_avro::Schema;
use apache_avro::schema::{Name, RecordSchema};
use keystone_crds::schema::{FieldSpec, FieldType, SchemaSpec};
use keystone_lake::columns::{Column, ColumnKind, ColumnsError, columns_of};
use serde_json::{Map, Value, json};

/// Why a schema is not a contract, or a contract not a schema.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContractError {
    #[error(
        "the registered schema is {kind}, not a record: Keystone reads events that are records"
    )]
    NotARecord { kind: String },
    #[error(
        "the schema's type {name} contains itself: Keystone does not read recursive records (their depth has no bound)"
    )]
    Recursive { name: String },
    #[error("the schema refers to {name}, which it does not define")]
    UnknownName { name: String },
    #[error("the record has {count} fields (with nested ones); a contract lists at most {max}")]
    TooManyFields { count: usize, max: usize },
    #[error(transparent)]
    Columns(#[from] ColumnsError),
    #[error("the derived Avro schema does not parse: {0}")]
    Derived(String),
    #[error(
        "key field {path} is not in the output contract: an Avro key's schema is derived from the key fields' types there (declare it)"
    )]
    KeyField { path: String },
    #[error("an Avro key needs key fields, and the sink has none")]
    NoKeyFields,
    #[error("key fields {first} and {second} would both be field {name} of the key record")]
    KeyFieldNames {
        first: String,
        second: String,
        name: String,
    },
}

/// The most fields a contract lists (the CRD's limit).
pub const MAX_FIELDS: usize = 512;
/// The longest description a contract's field has (the CRD's limit), in characters.
pub const MAX_DESCRIPTION: usize = 1024;

/// `text` cut to at most `max` characters.
fn within(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => text[..end].to_owned(),
        None => text.to_owned(),
    }
}

/// The input contract of events written with `schema` (a record).
pub fn contract_of(schema: &Schema) -> Result<SchemaSpec, ContractError> {
    let Schema::Record(record) = schema else {
        return Err(ContractError::NotARecord {
            kind: kind_name(schema),
        });
    };
    if let Some(name) = recursive_type(schema) {
        return Err(ContractError::Recursive { name });
    }
    let mut walk = Walk {
        fields: Vec::new(),
        root: schema,
    };
    walk.record(record, "", false)?;
    if walk.fields.len() > MAX_FIELDS {
        return Err(ContractError::TooManyFields {
            count: walk.fields.len(),
            max: MAX_FIELDS,
        });
    }
    Ok(SchemaSpec {
        fields: walk.fields,
        open: false,
    })
}

struct Walk<'s> {
    fields: Vec<FieldSpec>,
    root: &'s Schema,
}

impl Walk<'_> {
    fn record(
        &mut self,
        record: &RecordSchema,
        prefix: &str,
        optional: bool,
    ) -> Result<(), ContractError> {
        let namespace = record.name.namespace.clone();
        for field in &record.fields {
            let path = if prefix.is_empty() {
                field.name.clone()
            } else {
                format!("{prefix}.{}", field.name)
            };
            self.field(
                &field.schema,
                &path,
                optional,
                &namespace,
                field.doc.as_deref(),
            )?;
        }
        Ok(())
    }

    fn field(
        &mut self,
        schema: &Schema,
        path: &str,
        optional: bool,
        namespace: &Option<String>,
        doc: Option<&str>,
    ) -> Result<(), ContractError> {
        let (schema, optional) = match schema {
            Schema::Union(union) => match non_null_branches(union.variants()) {
                (Some(only), 1, nullable) => (only, optional || nullable),
                (_, _, nullable) => {
                    self.push(path, FieldType::Any, optional || nullable, doc);
                    return Ok(());
                }
            },
            other => (other, optional),
        };
        match schema {
            Schema::Record(record) => {
                self.push(path, FieldType::Object, optional, doc);
                self.record(record, path, optional)
            }
            Schema::Ref { name } => {
                let full = name.fullname(namespace.clone());
                let defined = find_named(self.root, &full, &None)
                    .ok_or(ContractError::UnknownName { name: full.clone() })?;
                let defined_namespace = Name::new(&full).map(|n| n.namespace).unwrap_or_default();
                self.field(defined, path, optional, &defined_namespace, doc)
            }
            other => {
                self.push(path, scalar_type(other), optional, doc);
                Ok(())
            }
        }
    }

    /// A field of the contract; the Avro field's `doc` is its description.
    fn push(&mut self, path: &str, field_type: FieldType, optional: bool, doc: Option<&str>) {
        self.fields.push(FieldSpec {
            name: path.to_owned(),
            field_type,
            optional,
            description: doc.map(|d| within(d, MAX_DESCRIPTION)),
        });
    }
}

/// The named type of `schema` that contains itself, if one does.
pub fn recursive_type(schema: &Schema) -> Option<String> {
    recursion(schema, schema, &mut Vec::new(), &None)
}

fn recursion(
    schema: &Schema,
    root: &Schema,
    expanding: &mut Vec<String>,
    namespace: &Option<String>,
) -> Option<String> {
    match schema {
        Schema::Record(record) => {
            let name = record.name.fullname(namespace.clone());
            if expanding.contains(&name) {
                return Some(name);
            }
            let inner = Name::new(&name).ok().and_then(|n| n.namespace);
            expanding.push(name);
            let found = record
                .fields
                .iter()
                .find_map(|f| recursion(&f.schema, root, expanding, &inner));
            expanding.pop();
            found
        }
        Schema::Ref { name } => {
            let full = name.fullname(namespace.clone());
            if expanding.contains(&full) {
                return Some(full);
            }
            // A reference to a type defined elsewhere in the schema: follow
            // it (an undefined one is reported by whoever reads the schema).
            let defined = find_named(root, &full, &None)?;
            let defined_namespace = Name::new(&full).ok().and_then(|n| n.namespace);
            recursion(defined, root, expanding, &defined_namespace)
        }
        Schema::Array(a) => recursion(&a.items, root, expanding, namespace),
        Schema::Map(m) => recursion(&m.types, root, expanding, namespace),
        Schema::Union(u) => u
            .variants()
            .iter()
            .find_map(|v| recursion(v, root, expanding, namespace)),
        _ => None,
    }
}

/// The path of an array in `schema` whose items can take no bytes, if any.
pub fn array_of_empty_items(schema: &Schema) -> Option<String> {
    empty_items(schema, "", &mut Vec::new())
}

fn empty_items(schema: &Schema, path: &str, seen: &mut Vec<String>) -> Option<String> {
    match schema {
        Schema::Record(record) => {
            let name = record.name.fullname(None);
            if seen.contains(&name) {
                return None;
            }
            seen.push(name);
            record.fields.iter().find_map(|f| {
                let field_path = if path.is_empty() {
                    f.name.clone()
                } else {
                    format!("{path}.{}", f.name)
                };
                empty_items(&f.schema, &field_path, seen)
            })
        }
        Schema::Array(array) if takes_no_bytes(&array.items) => Some(path.to_owned()),
        Schema::Array(array) => empty_items(&array.items, path, seen),
        Schema::Map(map) => empty_items(&map.types, path, seen),
        Schema::Union(union) => union
            .variants()
            .iter()
            .find_map(|v| empty_items(v, path, seen)),
        _ => None,
    }
}

/// Whether a value of `schema` can be written in no bytes.
fn takes_no_bytes(schema: &Schema) -> bool {
    match schema {
        Schema::Null => true,
        Schema::Fixed(fixed) => fixed.size == 0,
        Schema::Record(record) => record.fields.iter().all(|f| takes_no_bytes(&f.schema)),
        _ => false,
    }
}

/// The one branch of a union other than `null`, how many there are, and
/// whether `null` is a branch.
fn non_null_branches(variants: &[Schema]) -> (Option<&Schema>, usize, bool) {
    let non_null: Vec<&Schema> = variants
        .iter()
        .filter(|v| !matches!(v, Schema::Null))
        .collect();
    let nullable = non_null.len() < variants.len();
    (non_null.first().copied(), non_null.len(), nullable)
}

fn scalar_type(schema: &Schema) -> FieldType {
    match schema {
        Schema::Int | Schema::Long => FieldType::Integer,
        Schema::Float | Schema::Double => FieldType::Number,
        Schema::Boolean => FieldType::Boolean,
        Schema::TimestampMillis | Schema::TimestampMicros | Schema::TimestampNanos => {
            FieldType::Timestamp
        }
        Schema::Array(_) => FieldType::Array,
        Schema::Map(_) | Schema::Duration | Schema::Record(_) => FieldType::Object,
        Schema::Null | Schema::Union(_) | Schema::Ref { .. } => FieldType::Any,
        Schema::String
        | Schema::Enum(_)
        | Schema::Uuid
        | Schema::Bytes
        | Schema::Fixed(_)
        | Schema::Decimal(_)
        | Schema::BigDecimal
        | Schema::Date
        | Schema::TimeMillis
        | Schema::TimeMicros
        | Schema::LocalTimestampMillis
        | Schema::LocalTimestampMicros
        | Schema::LocalTimestampNanos => FieldType::String,
    }
}

/// The definition of the named type `full` within `schema`.
pub(crate) fn find_named<'s>(
    schema: &'s Schema,
    full: &str,
    namespace: &Option<String>,
) -> Option<&'s Schema> {
    match schema {
        Schema::Record(record) => {
            let own = record.name.fullname(namespace.clone());
            if own == full {
                return Some(schema);
            }
            let inner = Name::new(&own).ok().and_then(|n| n.namespace);
            record
                .fields
                .iter()
                .find_map(|f| find_named(&f.schema, full, &inner))
        }
        Schema::Enum(e) if e.name.fullname(namespace.clone()) == full => Some(schema),
        Schema::Fixed(f) if f.name.fullname(namespace.clone()) == full => Some(schema),
        Schema::Decimal(d) => find_named(&d.inner, full, namespace),
        Schema::Array(a) => find_named(&a.items, full, namespace),
        Schema::Map(m) => find_named(&m.types, full, namespace),
        Schema::Union(u) => u
            .variants()
            .iter()
            .find_map(|v| find_named(v, full, namespace)),
        _ => None,
    }
}

fn kind_name(schema: &Schema) -> String {
    match schema {
        Schema::Union(_) => "a union".into(),
        Schema::Array(_) => "an array".into(),
        Schema::Map(_) => "a map".into(),
        Schema::Enum(_) => "an enum".into(),
        other => format!(
            "of type {}",
            format!("{:?}", apache_avro::schema::SchemaKind::from(other)).to_lowercase()
        ),
    }
}

/// A schema derived from an output contract: parsed, and the JSON text to
/// register (with its docs, which the parsed form does not keep).
#[derive(Clone, Debug)]
pub struct OutputSchema {
    pub schema: Schema,
    pub text: String,
}

/// The Avro schema of a Kafka sink's values from its output contract: a record
/// named `name` in `namespace`.
pub fn schema_for_output(
    contract: &SchemaSpec,
    namespace: &str,
    name: &str,
) -> Result<OutputSchema, ContractError> {
    let columns = columns_of(contract)?;
    let mut names = BTreeSet::new();
    let mut json = record_json(&columns, name, &mut names);
    json["namespace"] = json!(namespace);
    let schema = Schema::parse(&json).map_err(|e| ContractError::Derived(e.to_string()))?;
    Ok(OutputSchema {
        schema,
        text: json.to_string(),
    })
}

/// The Avro schema of a Kafka sink's keys (`keyFormat: avro`) from the key
/// fields' types in its output contract: the one field's type, or a record
/// named `name` in `namespace` with a field per key field, named after its
/// path (`customer.id` as `customer_id`), in the key's order.
pub fn schema_for_key(
    contract: &SchemaSpec,
    key: &[String],
    namespace: &str,
    name: &str,
) -> Result<OutputSchema, ContractError> {
    let columns = columns_of(contract)?;
    let mut key_columns = Vec::with_capacity(key.len());
    for path in key {
        let mut column = find_column(&columns, path)
            .ok_or_else(|| ContractError::KeyField { path: path.clone() })?;
        column.name = key_field_name(path);
        if let Some(other) = key_columns.iter().find(|c: &&Column| c.name == column.name) {
            return Err(ContractError::KeyFieldNames {
                first: other.path.clone(),
                second: path.clone(),
                name: column.name,
            });
        }
        key_columns.push(column);
    }
    let mut names = BTreeSet::new();
    let mut json = match key_columns.as_slice() {
        [] => return Err(ContractError::NoKeyFields),
        [single] => field_type(single, name, &mut names).0,
        many => record_json(many, name, &mut names),
    };
    // A record key (a key record, or one object field) carries the namespace.
    let is_record = |schema: &Value| schema.get("type").and_then(Value::as_str) == Some("record");
    match &mut json {
        Value::Array(branches) => {
            for branch in branches.iter_mut().filter(|b| is_record(b)) {
                branch["namespace"] = json!(namespace);
            }
        }
        record if is_record(record) => record["namespace"] = json!(namespace),
        _ => {}
    }
    let schema = Schema::parse(&json).map_err(|e| ContractError::Derived(e.to_string()))?;
    Ok(OutputSchema {
        schema,
        text: json.to_string(),
    })
}

/// The field of a key record ([`schema_for_key`]) that holds the key field
/// at `path`.
pub fn key_field_name(path: &str) -> String {
    path.replace('.', "_")
}

/// The column at a dotted path, optional when it or an object holding it is.
fn find_column(columns: &[Column], path: &str) -> Option<Column> {
    let mut level = columns;
    let mut optional = false;
    let mut segments = path.split('.').peekable();
    while let Some(segment) = segments.next() {
        let column = level.iter().find(|c| c.name == segment)?;
        optional |= column.optional;
        if segments.peek().is_none() {
            return Some(Column {
                optional,
                ..column.clone()
            });
        }
        let ColumnKind::Struct(members) = &column.kind else {
            return None;
        };
        level = members;
    }
    None
}

/// A column's Avro type (`["null", T]` when optional) and what its doc says.
fn field_type(
    column: &Column,
    nested_name: &str,
    names: &mut BTreeSet<String>,
) -> (Value, Option<&'static str>) {
    let (inner, doc) = match &column.kind {
        ColumnKind::String => (json!("string"), None),
        ColumnKind::Long => (json!("long"), None),
        ColumnKind::Double => (json!("double"), None),
        ColumnKind::Boolean => (json!("boolean"), None),
        ColumnKind::Timestamp => (
            json!({"type": "long", "logicalType": "timestamp-micros"}),
            None,
        ),
        ColumnKind::Json => (json!("string"), Some("JSON text")),
        ColumnKind::Struct(members) => (record_json(members, nested_name, names), None),
    };
    if column.optional {
        (json!(["null", inner]), doc)
    } else {
        (inner, doc)
    }
}

fn record_json(columns: &[Column], name: &str, names: &mut BTreeSet<String>) -> Value {
    // Nested records are named after their path (`Order_customer`), so the
    // names stay stable across versions and never collide.
    names.insert(name.to_owned());
    let fields: Vec<Value> = columns
        .iter()
        .map(|column| {
            let nested_name = format!("{name}_{}", column.name);
            let (schema, doc) = field_type(column, &nested_name, names);
            let mut field = Map::new();
            field.insert("name".into(), json!(column.name));
            field.insert("type".into(), schema);
            if column.optional {
                field.insert("default".into(), Value::Null);
            }
            // The contract's description, then how a JSON-text column holds its value.
            let representation = doc.map(|doc| format!("{}: {doc}", column.path));
            let doc = match (&column.description, representation) {
                (Some(description), Some(representation)) => {
                    Some(format!("{description} ({representation})"))
                }
                (Some(description), None) => Some(description.clone()),
                (None, representation) => representation,
            };
            if let Some(doc) = doc {
                field.insert("doc".into(), json!(doc));
            }
            Value::Object(field)
        })
        .collect();
    json!({"type": "record", "name": name, "fields": fields})
}

#[cfg(test)]
mod tests;
