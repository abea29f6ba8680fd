//! `map`: adds or overwrites fields computed by CEL expressions.
//!
//! Every expression sees the input event (a later field does not see an earlier
//! result); results are written after all expressions succeeded, at their dotted
//! paths (parents created as objects). A result must have the declared type:
//! `integer` takes CEL int/uint, `number` any number, `timestamp` a CEL timestamp
//! (written as RFC 3339), an RFC 3339 string or an int (epoch ms), `object` a map,
//! `array` a list, `any` anything with a JSON form. A failing expression or a
//! result of another type sends the event to the dead-letter output unchanged.

use keystone_crds::ops::MapSpec;
use keystone_crds::schema::FieldType;

use crate::error::RuntimeError;
use crate::event::{Event, FieldPath, with_writes};
use crate::expr::{Bindings, Expr, cel_type_name, from_cel};
use crate::operator::{Ctx, Operator, Output};

struct Computed {
    path: FieldPath,
    expr: Expr,
    field_type: FieldType,
}

pub struct MapOp {
    fields: Vec<Computed>,
    bindings: Bindings,
    buf: Vec<u8>,
}

impl MapOp {
    pub fn new(spec: &MapSpec) -> Result<Self, RuntimeError> {
        let fields = spec
            .fields
            .iter()
            .map(|f| {
                Ok(Computed {
                    path: FieldPath::new(&f.name),
                    expr: Expr::compile(&f.expression)?,
                    field_type: f.field_type,
                })
            })
            .collect::<Result<Vec<_>, RuntimeError>>()?;
        let bindings = Bindings::new(fields.iter().map(|f| &f.expr));
        Ok(Self {
            fields,
            bindings,
            buf: Vec::with_capacity(512),
        })
    }

    fn compute(&self, event: &Event) -> Result<Vec<sonic_rs::Value>, String> {
        self.bindings.with_scope(&event.value, |scope| {
            self.fields
                .iter()
                .map(|field| {
                    let result = field.expr.execute(scope).map_err(|e| {
                        format!(
                            "map field {:?}: expression {:?} failed: {e}",
                            field.path.dotted, field.expr.source
                        )
                    })?;
                    if !matches_type(&result, field.field_type) {
                        return Err(format!(
                            "map field {:?}: expression returned a {}, but the field is declared {}",
                            field.path.dotted,
                            cel_type_name(&result),
                            field.field_type
                        ));
                    }
                    from_cel(&result)
                        .map_err(|e| format!("map field {:?}: {e}", field.path.dotted))
                })
                .collect()
        })
    }
}

fn matches_type(value: &cel::Value, expected: FieldType) -> bool {
    use cel::Value as V;
    match expected {
        FieldType::String => matches!(value, V::String(_)),
        FieldType::Integer => matches!(value, V::Int(_) | V::UInt(_)),
        FieldType::Number => matches!(value, V::Int(_) | V::UInt(_) | V::Float(_)),
        FieldType::Boolean => matches!(value, V::Bool(_)),
        FieldType::Timestamp => match value {
            V::Timestamp(_) | V::Int(_) => true,
            V::String(s) => chrono::DateTime::parse_from_rfc3339(s).is_ok(),
            _ => false,
        },
        FieldType::Object => matches!(value, V::Map(_)),
        FieldType::Array => matches!(value, V::List(_)),
        FieldType::Any => true,
    }
}

impl Operator for MapOp {
    fn process(&mut self, mut event: Event, _ctx: &Ctx, out: &mut Output) {
        match self.compute(&event) {
            Ok(values) => {
                let writes: Vec<(&FieldPath, sonic_rs::Value)> =
                    self.fields.iter().map(|f| &f.path).zip(values).collect();
                event.value = with_writes(&event.value, &writes, &mut self.buf);
                out.emit(event);
            }
            Err(reason) => out.dead_letter(event, reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testing::{events, run};
    use keystone_crds::ops::ComputedField;

    fn field(name: &str, expression: &str, field_type: FieldType) -> ComputedField {
        ComputedField {
            name: name.into(),
            expression: expression.into(),
            field_type,
        }
    }

    #[test]
    fn computes_from_the_input_event() {
        let mut map = MapOp::new(&MapSpec {
            fields: vec![
                field("total", "price * qty", FieldType::Number),
                field("price", "price + 1.0", FieldType::Number),
                field("tags.big", "price * qty > 10.0", FieldType::Boolean),
            ],
        })
        .unwrap();
        let out = run(&mut map, events(&[r#"{"price":2.5,"qty":5.0}"#]));
        assert_eq!(
            out.json(),
            vec![r#"{"price":3.5,"qty":5.0,"tags":{"big":true},"total":12.5}"#]
        );
    }

    #[test]
    fn wrong_result_types_are_dead_letters() {
        let mut map = MapOp::new(&MapSpec {
            fields: vec![field("n", "'x'", FieldType::Integer)],
        })
        .unwrap();
        let out = run(&mut map, events(&[r#"{"a":1}"#]));
        assert_eq!(
            out.dead[0].reason,
            r#"map field "n": expression returned a string, but the field is declared integer"#
        );
        assert_eq!(out.dead[0].original, br#"{"a":1}"#);
    }
}
