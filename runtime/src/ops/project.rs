//! `project` and `extract`: output fields read from JSON pointers.
//!
//! - `project` replaces the event by a new object holding only the listed fields.
//! - `extract` adds the fields to the event, keeping everything else.
//!
//! Every pointer is read from the input event before anything is written. A
//! field whose pointer finds no value is left out when `optional`, otherwise the
//! event goes to the dead-letter output. A JSON `null` is a value. Output names
//! are dotted paths; parents are created as objects.

use keystone_crds::ops::ProjectSpec;
use sonic_rs::{Object, Value};

use crate::error::RuntimeError;
use crate::event::{Event, FieldPath, Pointer, ordered_object, with_writes};
use crate::operator::{Ctx, Operator, Output};

struct Projected {
    name: FieldPath,
    from: Pointer,
    optional: bool,
}

pub struct Project {
    fields: Vec<Projected>,
    /// `extract` keeps the input event; `project` starts from an empty object.
    keep_input: bool,
    kind: &'static str,
    /// Every output name is top-level: the output can be built in spec order.
    flat: bool,
    buf: Vec<u8>,
}

impl Project {
    /// A `project` step: the output holds only the listed fields.
    pub fn replacing(spec: &ProjectSpec) -> Result<Self, RuntimeError> {
        Self::new(spec, false, "project")
    }

    /// An `extract` step: the listed fields are added to the event.
    pub fn extending(spec: &ProjectSpec) -> Result<Self, RuntimeError> {
        Self::new(spec, true, "extract")
    }

    fn new(spec: &ProjectSpec, keep_input: bool, kind: &'static str) -> Result<Self, RuntimeError> {
        let fields = spec
            .fields
            .iter()
            .map(|f| {
                let from = Pointer::parse(&f.from).ok_or_else(|| RuntimeError::InvalidStep {
                    step: kind.to_owned(),
                    message: format!("{:?} is not a JSON pointer", f.from),
                })?;
                Ok(Projected {
                    name: FieldPath::new(&f.name),
                    from,
                    optional: f.optional,
                })
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let flat = fields.iter().all(|f| !f.name.dotted.contains('.'));
        Ok(Self {
            fields,
            keep_input,
            kind,
            flat,
            buf: Vec::with_capacity(256),
        })
    }
}

impl Operator for Project {
    fn process(&mut self, mut event: Event, _ctx: &Ctx, out: &mut Output) {
        let mut values: Vec<Option<Value>> = Vec::with_capacity(self.fields.len());
        for field in &self.fields {
            match field.from.get(&event.value) {
                Some(v) => values.push(Some(v.clone())),
                None if field.optional => values.push(None),
                None => {
                    let reason = format!(
                        "{}: no value at {} for field {:?}",
                        self.kind, field.from.text, field.name.dotted
                    );
                    return out.dead_letter(event, reason);
                }
            }
        }
        if !self.keep_input && self.flat {
            let members = self
                .fields
                .iter()
                .zip(&values)
                .filter_map(|(f, v)| v.as_ref().map(|v| (f.name.dotted.as_str(), v)));
            event.value = ordered_object(members, &mut self.buf);
            return out.emit(event);
        }
        let writes: Vec<(&FieldPath, Value)> = self
            .fields
            .iter()
            .zip(values)
            .filter_map(|(f, v)| v.map(|v| (&f.name, v)))
            .collect();
        let base = if self.keep_input {
            event.value
        } else {
            Value::from(Object::new())
        };
        event.value = with_writes(&base, &writes, &mut self.buf);
        out.emit(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{events, run};
    use keystone_crds::ops::ProjectedField;

    fn spec(fields: &[(&str, &str, bool)]) -> ProjectSpec {
        ProjectSpec {
            fields: fields
                .iter()
                .map(|(name, from, optional)| ProjectedField {
                    name: (*name).into(),
                    from: (*from).into(),
                    optional: *optional,
                })
                .collect(),
        }
    }

    #[test]
    fn project_builds_a_new_shape() {
        let mut op = Project::replacing(&spec(&[
            ("id", "/payload/after/id", false),
            ("customer.name", "/payload/after/name", false),
            ("note", "/payload/note", true),
        ]))
        .unwrap();
        let out = run(
            &mut op,
            events(&[
                r#"{"payload":{"after":{"id":7,"name":"Ann"}},"x":1}"#,
                r#"{"payload":{"after":{"name":"Bob"}}}"#,
            ]),
        );
        assert_eq!(out.json(), vec![r#"{"customer":{"name":"Ann"},"id":7}"#]);
        assert_eq!(
            out.dead[0].reason,
            r#"project: no value at /payload/after/id for field "id""#
        );
    }

    #[test]
    fn extract_keeps_the_event() {
        let mut op = Project::extending(&spec(&[("first", "/items/0/sku", false)])).unwrap();
        let out = run(&mut op, events(&[r#"{"items":[{"sku":"a"}]}"#]));
        assert_eq!(out.json(), vec![r#"{"first":"a","items":[{"sku":"a"}]}"#]);
    }
}
