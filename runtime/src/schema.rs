//! Checking events against declared fields: the source schema at the pipeline's
//! entry and each step's `requires` before the step. An event that fails goes to
//! the dead-letter output with the message, instead of failing inside an operator.

use keystone_crds::processor::RequiredField;
use keystone_crds::schema::{FieldType, SchemaSpec};
use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value};

use crate::event::{FieldPath, conforms, type_name};

struct Field {
    path: FieldPath,
    field_type: FieldType,
    optional: bool,
}

/// The first declared field an event fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field's dotted name as declared (`meta.seq`).
    pub field: String,
    /// Says what is wrong, naming the field and whose requirement it is.
    pub message: String,
}

/// A list of fields an event must carry, with their types.
pub struct Validator {
    fields: Vec<Field>,
    /// The declared paths as a tree of member names (node 0 is the event), so that
    /// one pass over an event's members finds every declared field, instead of a
    /// linear key scan per field.
    nodes: Vec<Node>,
    /// Whose requirement it is, for messages: "the source schema" or "the step".
    owner: &'static str,
}

/// Fields up to this many are looked up in one pass with the values on the stack;
/// longer lists fall back to one look-up per field.
const ONE_PASS_MAX: usize = 64;

/// The members of one object level that some declared path names.
#[derive(Default)]
struct Node {
    members: Vec<Member>,
    /// Bit `n` set when some member's name is `n` bytes long (`n < 64`; longer
    /// names set bit 63): most undeclared members are rejected by their length.
    lengths: u64,
}

struct Member {
    name: String,
    /// The fields whose path ends here (a name may be declared more than once).
    fields: Vec<usize>,
    /// The node of the paths that continue below this member.
    below: Option<usize>,
}

fn length_bit(len: usize) -> u64 {
    1 << len.min(63)
}

impl Node {
    /// The member named `name`; `hint` is tried first (the member after the one
    /// the previous key matched: events usually list members in declared order).
    #[inline]
    fn find(&self, name: &str, hint: usize) -> Option<usize> {
        if let Some(member) = self.members.get(hint)
            && member.name == name
        {
            return Some(hint);
        }
        if self.lengths & length_bit(name.len()) == 0 {
            return None;
        }
        self.members.iter().position(|m| m.name == name)
    }
}

fn build_nodes(fields: &[Field]) -> Vec<Node> {
    let mut nodes = vec![Node::default()];
    for (index, field) in fields.iter().enumerate() {
        let mut node = 0;
        let segments: Vec<&str> = field.path.dotted.split('.').collect();
        for (depth, segment) in segments.iter().enumerate() {
            let member = match nodes[node].members.iter().position(|m| m.name == *segment) {
                Some(m) => m,
                None => {
                    nodes[node].lengths |= length_bit(segment.len());
                    nodes[node].members.push(Member {
                        name: (*segment).to_owned(),
                        fields: Vec::new(),
                        below: None,
                    });
                    nodes[node].members.len() - 1
                }
            };
            if depth + 1 == segments.len() {
                nodes[node].members[member].fields.push(index);
            } else {
                node = match nodes[node].members[member].below {
                    Some(below) => below,
                    None => {
                        nodes.push(Node::default());
                        let below = nodes.len() - 1;
                        nodes[node].members[member].below = Some(below);
                        below
                    }
                };
            }
        }
    }
    nodes
}

impl Validator {
    /// A step's required fields. A required field may not be null unless its type is `any`.
    pub fn for_step(requires: &[RequiredField]) -> Self {
        Self::new(
            requires
                .iter()
                .map(|r| Field {
                    path: FieldPath::new(&r.name),
                    field_type: r.field_type,
                    optional: false,
                })
                .collect(),
            "the step",
        )
    }

    /// The source schema: every non-optional field present with its type; optional
    /// fields may be absent or null. Undeclared fields are not checked (an open
    /// schema lets them through; a closed one only promises steps nothing more).
    pub fn for_source(schema: &SchemaSpec) -> Self {
        Self::new(
            schema
                .fields
                .iter()
                .map(|f| Field {
                    path: FieldPath::new(&f.name),
                    field_type: f.field_type,
                    optional: f.optional,
                })
                .collect(),
            "the source schema",
        )
    }

    fn new(fields: Vec<Field>, owner: &'static str) -> Self {
        let nodes = build_nodes(&fields);
        Self {
            fields,
            nodes,
            owner,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// `Err(reason)` for the first field that is missing or of the wrong type.
    pub fn check(&self, event: &Value) -> Result<(), String> {
        self.violation(event).map_err(|v| v.message)
    }

    /// As [`Validator::check`], naming the field apart from the message.
    pub fn violation(&self, event: &Value) -> Result<(), Violation> {
        if self.fields.is_empty() {
            return Ok(());
        }
        if self.fields.len() > ONE_PASS_MAX {
            return self.check_found(|index| self.fields[index].path.get(event));
        }
        let mut found: [Option<&Value>; ONE_PASS_MAX] = [None; ONE_PASS_MAX];
        self.collect(0, event, &mut found);
        self.check_found(|index| found[index])
    }

    /// Records in `found` the value of every declared field under `object`, in one
    /// pass over its members (and over the members of declared nested objects). Like
    /// [`FieldPath::get`], the first member of a name wins.
    fn collect<'v>(&self, node: usize, object: &'v Value, found: &mut [Option<&'v Value>]) {
        let Some(object) = object.as_object() else {
            return;
        };
        let node = &self.nodes[node];
        // Members already met at this level (a repeated name is ignored).
        let mut seen: u64 = 0;
        let mut hint = 0;
        for (name, value) in object.iter() {
            let Some(index) = node.find(name, hint) else {
                continue;
            };
            hint = index + 1;
            if index < 64 {
                if seen & (1 << index) != 0 {
                    continue;
                }
                seen |= 1 << index;
            }
            let member = &node.members[index];
            for &field in &member.fields {
                found[field].get_or_insert(value);
            }
            if let Some(below) = member.below {
                self.collect(below, value, found);
            }
        }
    }

    fn check_found<'v>(&self, found: impl Fn(usize) -> Option<&'v Value>) -> Result<(), Violation> {
        for (index, field) in self.fields.iter().enumerate() {
            let violation = |message: String| Violation {
                field: field.path.dotted.clone(),
                message,
            };
            match found(index) {
                None if field.optional => {}
                None => {
                    return Err(violation(format!(
                        "missing field {:?} ({}) required by {}",
                        field.path.dotted, field.field_type, self.owner
                    )));
                }
                Some(v)
                    if v.is_null() && (field.optional || field.field_type == FieldType::Any) => {}
                Some(v) if !conforms(v, field.field_type) => {
                    let found = if field.field_type == FieldType::Timestamp && v.is_str() {
                        "a string that is not an RFC 3339 timestamp"
                    } else {
                        type_name(v)
                    };
                    return Err(violation(format!(
                        "field {:?} is {found}, but {} requires {}",
                        field.path.dotted, self.owner, field.field_type
                    )));
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
                    description: None,
                },
                FieldSpec {
                    name: "meta.seq".into(),
                    field_type: FieldType::Integer,
                    optional: true,
                    description: None,
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
    fn one_pass_agrees_with_a_look_up_per_field() {
        let field = |name: &str, field_type, optional| FieldSpec {
            name: name.into(),
            field_type,
            optional,
            description: None,
        };
        let schema = SchemaSpec {
            fields: vec![
                field("a", FieldType::Integer, false),
                field("d", FieldType::Object, false),
                field("d.x", FieldType::String, false),
                field("d.y.z", FieldType::Boolean, true),
                field("a", FieldType::Number, false),
                field("b", FieldType::String, true),
                field("long_member_name", FieldType::Any, false),
            ],
            open: true,
        };
        let validator = Validator::for_source(&schema);
        let per_field = |text: &str| {
            let value: Value = sonic_rs::from_str(text).unwrap();
            validator
                .check_found(|i| validator.fields[i].path.get(&value))
                .map_err(|v| v.message)
        };
        for text in [
            r#"{"a":1,"d":{"x":"s"},"long_member_name":null}"#,
            r#"{"long_member_name":0,"b":"q","d":{"y":{"z":true},"x":"s"},"a":2}"#,
            r#"{"a":1,"a":"dup","d":{"x":"s"},"long_member_name":1}"#,
            r#"{"a":"first","a":1,"d":{"x":"s"},"long_member_name":1}"#,
            r#"{"a":1,"d":"flat","d":{"x":"s"},"long_member_name":1}"#,
            r#"{"a":1,"d":{"x":"s"},"d":{"x":1},"long_member_name":1}"#,
            r#"{"a":1,"d":{"x":"s","y":{"z":"no"}},"long_member_name":1}"#,
            r#"{"zz":1,"a":1.5,"d":{"x":"s"},"long_member_name":1}"#,
            r#"{"a":1,"d":{"x":"s"}}"#,
            r#"{"other":{"a":1}}"#,
        ] {
            let value: Value = sonic_rs::from_str(text).unwrap();
            assert_eq!(validator.check(&value), per_field(text), "{text}");
        }
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
