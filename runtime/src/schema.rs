//! Checking events against declared fields: the source schema at the pipeline's
//! entry and each step's `requires` before the step. An event that fails goes to
//! the dead-letter output with the message, instead of failing inside an operator.

use keystone_crds::processor::RequiredField;
use keystone_crds::schema::{FieldType, SchemaSpec};
use sonic_rs::{JsonValueTrait, Value};

use crate::event::{FieldPath, conforms, type_name};

struct Field {
    path: FieldPath,
    field_type: FieldType,
    optional: bool,
}

/// A list of fields an event must carry, with their types.
pub struct Validator {
    fields: Vec<Field>,
    /// Whose requirement it is, for messages: "the source schema" or "the step".
    owner: &'static str,
}

impl Validator {
    /// A step's required fields. A required field may not be null unless its type is `any`.
    pub fn for_step(requires: &[RequiredField]) -> Self {
        Self {
            fields: requires
                .iter()
                .map(|r| Field {
                    path: FieldPath::new(&r.name),
                    field_type: r.field_type,
                    optional: false,
                })
                .collect(),
            owner: "the step",
        }
    }

    /// The source schema: every non-optional field present with its type; optional
    /// fields may be absent or null. Undeclared fields are not checked (an open
    /// schema lets them through; a closed one only promises steps nothing more).
    pub fn for_source(schema: &SchemaSpec) -> Self {
        Self {
            fields: schema
                .fields
                .iter()
                .map(|f| Field {
                    path: FieldPath::new(&f.name),
                    field_type: f.field_type,
                    optional: f.optional,
                })
                .collect(),
            owner: "the source schema",
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// `Err(reason)` for the first field that is missing or of the wrong type.
    pub fn check(&self, event: &Value) -> Result<(), String> {
        for field in &self.fields {
            match field.path.get(event) {
                None if field.optional => {}
                None => {
                    return Err(format!(
                        "missing field {:?} ({}) required by {}",
                        field.path.dotted, field.field_type, self.owner
                    ));
                }
                Some(v)
                    if v.is_null() && (field.optional || field.field_type == FieldType::Any) => {}
                Some(v) if !conforms(v, field.field_type) => {
                    let found = if field.field_type == FieldType::Timestamp && v.is_str() {
                        "a string that is not an RFC 3339 timestamp"
                    } else {
                        type_name(v)
                    };
                    return Err(format!(
                        "field {:?} is {found}, but {} requires {}",
                        field.path.dotted, self.owner, field.field_type
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystone_crds::schema::FieldSpec;

    #[test]
    fn source_schema_checks_presence_and_types() {
        let validator = Validator::for_source(&SchemaSpec {
            fields: vec![
                FieldSpec {
                    name: "id".into(),
                    field_type: FieldType::String,
                    optional: false,
                },
                FieldSpec {
                    name: "meta.seq".into(),
                    field_type: FieldType::Integer,
                    optional: true,
                },
            ],
            open: true,
        });
        let check = |text: &str| validator.check(&sonic_rs::from_str(text).unwrap());
        assert_eq!(check(r#"{"id":"a"}"#), Ok(()));
        assert_eq!(check(r#"{"id":"a","meta":{"seq":null}}"#), Ok(()));
        assert_eq!(
            check(r#"{"id":1}"#),
            Err(r#"field "id" is integer, but the source schema requires string"#.into())
        );
        assert_eq!(
            check(r#"{"x":1}"#),
            Err(r#"missing field "id" (string) required by the source schema"#.into())
        );
        assert_eq!(
            check(r#"{"id":"a","meta":{"seq":"7"}}"#),
            Err(r#"field "meta.seq" is string, but the source schema requires integer"#.into())
        );
    }

    #[test]
    fn step_requirements_refuse_null_unless_any() {
        let validator = Validator::for_step(&[
            RequiredField {
                name: "k".into(),
                field_type: FieldType::Any,
            },
            RequiredField {
                name: "n".into(),
                field_type: FieldType::Integer,
            },
        ]);
        let check = |text: &str| validator.check(&sonic_rs::from_str(text).unwrap());
        assert_eq!(check(r#"{"k":null,"n":1}"#), Ok(()));
        assert_eq!(
            check(r#"{"k":1,"n":null}"#),
            Err(r#"field "n" is null, but the step requires integer"#.into())
        );
    }
}
