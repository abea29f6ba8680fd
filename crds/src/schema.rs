//! Event schemas: which fields an event has and of what type.
//!
//! Field paths are dotted (`customer.id`); a nested object's fields are listed by
//! their full path. The checker propagates a [`Schema`] through the steps.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The type of a field in an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FieldType {
    /// A JSON string.
    String,
    /// A JSON number without a fractional part (64-bit signed).
    Integer,
    /// Any JSON number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// An RFC 3339 timestamp string, or epoch milliseconds as an integer.
    Timestamp,
    /// A JSON object; list its members as separate fields with dotted paths.
    Object,
    /// A JSON array.
    Array,
    /// Any JSON value; steps that need a specific type do not accept it.
    Any,
}

impl FieldType {
    /// Whether a value declared as `self` satisfies a requirement for `required`.
    pub fn satisfies(self, required: FieldType) -> bool {
        use FieldType::*;
        match (self, required) {
            (_, Any) => true,
            (a, b) if a == b => true,
            (Integer, Number) => true,
            _ => false,
        }
    }

    pub fn is_numeric(self) -> bool {
        matches!(self, FieldType::Integer | FieldType::Number)
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            FieldType::String => "string",
            FieldType::Integer => "integer",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::Timestamp => "timestamp",
            FieldType::Object => "object",
            FieldType::Array => "array",
            FieldType::Any => "any",
        };
        f.write_str(name)
    }
}

/// One field of an event schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldSpec {
    /// Dotted path of the field from the event root, for example `customer.id`.
    #[schemars(
        length(min = 1, max = 256),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")
    )]
    pub name: String,
    /// The field's type.
    #[serde(rename = "type")]
    pub field_type: FieldType,
    /// Whether events may lack the field. Events that lack a field a step needs
    /// are sent to the dead-letter topic with the reason.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
    /// What the field means, for the people who read the data. It travels
    /// with the field through the steps that pass it on unchanged (filters,
    /// a projection's copy) and becomes the field's `doc` in the Avro schema
    /// Keystone derives for a Kafka sink (`format: avro`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

/// The schema of the events on a stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaSpec {
    /// The fields every event carries (or may carry, when `optional`).
    #[serde(default)]
    #[schemars(length(max = 512))]
    pub fields: Vec<FieldSpec>,
    /// Whether events may carry fields beyond those listed. When false, steps can
    /// rely on the listed fields being the whole event.
    #[serde(default = "default_true")]
    pub open: bool,
}

fn default_true() -> bool {
    true
}

/// What the checker knows about one field at a point of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldInfo {
    pub field_type: FieldType,
    pub optional: bool,
}

/// A schema as the checker propagates it: dotted path -> what is known.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    pub fields: BTreeMap<String, FieldInfo>,
    /// Events may carry fields not listed (an open schema).
    pub open: bool,
    /// The declared descriptions of fields, by path: kept while a field
    /// passes on unchanged, dropped when a step writes it anew.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub descriptions: BTreeMap<String, String>,
}

impl Schema {
    pub fn from_spec(spec: &SchemaSpec) -> Self {
        let mut fields = BTreeMap::new();
        let mut descriptions = BTreeMap::new();
        for field in &spec.fields {
            if let Some(description) = &field.description {
                descriptions.insert(field.name.clone(), description.clone());
            }
            fields.insert(
                field.name.clone(),
                FieldInfo {
                    field_type: field.field_type,
                    optional: field.optional,
                },
            );
        }
        // Parents of nested fields are objects even when not listed.
        let parents: Vec<String> = fields.keys().flat_map(|path| parent_paths(path)).collect();
        for parent in parents {
            fields.entry(parent).or_insert(FieldInfo {
                field_type: FieldType::Object,
                optional: false,
            });
        }
        Self {
            fields,
            open: spec.open,
            descriptions,
        }
    }

    pub fn get(&self, path: &str) -> Option<FieldInfo> {
        self.fields.get(path).copied()
    }

    pub fn insert(&mut self, path: &str, info: FieldInfo) {
        for parent in parent_paths(path) {
            self.fields.entry(parent).or_insert(FieldInfo {
                field_type: FieldType::Object,
                optional: info.optional,
            });
        }
        self.fields.insert(path.to_owned(), info);
    }

    /// Writes a whole field, as the runtime writes a value at a path: the old
    /// value and everything nested under it are gone, and an ancestor that held a
    /// non-object value becomes an object (the runtime builds a fresh object
    /// there). `children` are the new value's nested fields, relative to `path`.
    pub fn write(&mut self, path: &str, info: FieldInfo, children: &[(String, FieldInfo)]) {
        self.remove(path);
        for parent in parent_paths(path) {
            match self.fields.get(&parent) {
                Some(existing) if existing.field_type == FieldType::Object => {}
                Some(_) => {
                    // The scalar is replaced, so whatever was listed under it is stale.
                    self.remove(&parent);
                    self.fields.insert(
                        parent,
                        FieldInfo {
                            field_type: FieldType::Object,
                            optional: info.optional,
                        },
                    );
                }
                None => {
                    self.fields.insert(
                        parent,
                        FieldInfo {
                            field_type: FieldType::Object,
                            optional: info.optional,
                        },
                    );
                }
            }
        }
        self.fields.insert(path.to_owned(), info);
        for (nested, nested_info) in children {
            self.fields.insert(format!("{path}.{nested}"), *nested_info);
        }
    }

    /// Removes a field and everything nested under it (with their descriptions).
    pub fn remove(&mut self, path: &str) {
        let nested = format!("{path}.");
        let gone = |name: &String| name == path || name.starts_with(&nested);
        self.fields.retain(|name, _| !gone(name));
        self.descriptions.retain(|name, _| !gone(name));
    }

    /// The descriptions of the field at `path` and of those nested under it,
    /// with paths relative to it (the field's own under "").
    pub fn descriptions_under(&self, path: &str) -> Vec<(String, String)> {
        let prefix = format!("{path}.");
        self.descriptions
            .iter()
            .filter_map(|(name, description)| {
                let relative = if name == path {
                    ""
                } else {
                    name.strip_prefix(&prefix)?
                };
                Some((relative.to_owned(), description.clone()))
            })
            .collect()
    }

    /// Drops the descriptions of the field at `path` and of those under it.
    pub fn forget_descriptions(&mut self, path: &str) {
        let nested = format!("{path}.");
        self.descriptions
            .retain(|name, _| name != path && !name.starts_with(&nested));
    }

    /// Gives the field at `path` (and those nested under it) the descriptions
    /// [`Schema::descriptions_under`] read elsewhere: a copied value means what
    /// its source meant.
    pub fn describe_under(&mut self, path: &str, descriptions: Vec<(String, String)>) {
        for (relative, description) in descriptions {
            let full = if relative.is_empty() {
                path.to_owned()
            } else {
                format!("{path}.{relative}")
            };
            if self.fields.contains_key(&full) {
                self.descriptions.insert(full, description);
            }
        }
    }

    /// Every field nested under `path`, with paths relative to it.
    pub fn nested(&self, path: &str) -> Vec<(String, FieldInfo)> {
        let prefix = format!("{path}.");
        self.fields
            .iter()
            .filter_map(|(name, info)| {
                name.strip_prefix(&prefix)
                    .map(|rest| (rest.to_owned(), *info))
            })
            .collect()
    }

    /// A short list of the available field names, for error messages.
    pub fn describe(&self) -> String {
        if self.fields.is_empty() {
            return "no declared fields".to_owned();
        }
        let names: Vec<String> = self
            .fields
            .iter()
            .map(|(name, info)| format!("{name}: {}", info.field_type))
            .collect();
        names.join(", ")
    }

    pub fn to_spec(&self) -> SchemaSpec {
        SchemaSpec {
            fields: self
                .fields
                .iter()
                .map(|(name, info)| FieldSpec {
                    name: name.clone(),
                    field_type: info.field_type,
                    optional: info.optional,
                    description: self.descriptions.get(name).cloned(),
                })
                .collect(),
            open: self.open,
        }
    }
}

/// `a.b.c` -> [`a`, `a.b`].
fn parent_paths(path: &str) -> Vec<String> {
    path.match_indices('.')
        .map(|(i, _)| path[..i].to_owned())
        .collect()
}

/// Converts a JSON pointer (`/customer/id`) to a dotted path (`customer.id`),
/// or says what is wrong with it, in words for the user.
pub fn pointer_to_path(pointer: &str) -> Result<String, String> {
    if pointer.is_empty() {
        return Err(
            "the JSON pointer is empty: name the field to read, for example /payload/id".to_owned(),
        );
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!(
            "{pointer:?} is not a JSON pointer: it must start with '/' (for example /{})",
            pointer.replace('.', "/")
        ));
    };
    if rest.is_empty() {
        // RFC 6901 reads "/" as the member named "" of the root, which events do
        // not have; the whole event cannot be copied into one field either.
        return Err("\"/\" names a member with an empty name, not the whole event: a field is read from a pointer to it, for example /payload/id (the whole event cannot be copied into one field)".to_owned());
    }
    let mut parts = Vec::new();
    for segment in rest.split('/') {
        if segment.is_empty() {
            return Err(format!(
                "{pointer:?} has an empty segment (\"//\" or a trailing '/'): every segment between slashes must name a member"
            ));
        }
        let mut unescaped = String::with_capacity(segment.len());
        let mut chars = segment.chars();
        while let Some(c) = chars.next() {
            if c != '~' {
                unescaped.push(c);
                continue;
            }
            match chars.next() {
                Some('0') => unescaped.push('~'),
                Some('1') => unescaped.push('/'),
                _ => {
                    return Err(format!(
                        "{pointer:?} has a '~' that is not an escape: write ~0 for '~' and ~1 for '/' in a member name"
                    ));
                }
            }
        }
        parts.push(unescaped);
    }
    Ok(parts.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_fields_imply_object_parents() {
        let schema = Schema::from_spec(&SchemaSpec {
            fields: vec![FieldSpec {
                name: "customer.address.city".into(),
                field_type: FieldType::String,
                optional: false,
                description: None,
            }],
            open: true,
        });
        assert_eq!(
            schema.get("customer").unwrap().field_type,
            FieldType::Object
        );
        assert_eq!(
            schema.get("customer.address").unwrap().field_type,
            FieldType::Object
        );
        assert_eq!(schema.nested("customer").len(), 2);
    }

    #[test]
    fn type_compatibility() {
        assert!(FieldType::Integer.satisfies(FieldType::Number));
        assert!(!FieldType::Number.satisfies(FieldType::Integer));
        assert!(!FieldType::Any.satisfies(FieldType::String));
        assert!(FieldType::String.satisfies(FieldType::Any));
    }

    #[test]
    fn pointers_become_paths() {
        assert_eq!(pointer_to_path("/a/b").as_deref(), Ok("a.b"));
        assert_eq!(pointer_to_path("/a~1b").as_deref(), Ok("a/b"));
        assert_eq!(pointer_to_path("/a~0b").as_deref(), Ok("a~b"));
        assert!(
            pointer_to_path("a")
                .unwrap_err()
                .contains("must start with '/'")
        );
        assert!(
            pointer_to_path("/")
                .unwrap_err()
                .contains("not the whole event")
        );
        assert!(pointer_to_path("").unwrap_err().contains("empty"));
        assert!(
            pointer_to_path("/a//b")
                .unwrap_err()
                .contains("empty segment")
        );
        assert!(
            pointer_to_path("/a~2")
                .unwrap_err()
                .contains("not an escape")
        );
    }

    fn info(field_type: FieldType) -> FieldInfo {
        FieldInfo {
            field_type,
            optional: false,
        }
    }

    #[test]
    fn writing_a_field_drops_what_was_under_it() {
        let mut schema = Schema::default();
        schema.insert("a.x", info(FieldType::String));
        schema.write("a", info(FieldType::String), &[]);
        assert_eq!(schema.get("a"), Some(info(FieldType::String)));
        assert_eq!(schema.get("a.x"), None);
    }

    #[test]
    fn writing_under_a_scalar_makes_it_an_object() {
        let mut schema = Schema::default();
        schema.insert("a", info(FieldType::Integer));
        schema.write(
            "a.b.c",
            info(FieldType::String),
            &[("d".into(), info(FieldType::Boolean))],
        );
        assert_eq!(schema.get("a").unwrap().field_type, FieldType::Object);
        assert_eq!(schema.get("a.b").unwrap().field_type, FieldType::Object);
        assert_eq!(schema.get("a.b.c.d"), Some(info(FieldType::Boolean)));
    }
}
