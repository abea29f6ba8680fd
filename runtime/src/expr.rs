//! CEL expressions over events, with the semantics the contract checker assumes:
//! each expression is compiled once per plan; the event's top-level fields are
//! variables by name, and `event` is the whole event unless the event has a
//! top-level field of that name. Only the variables a program references are bound,
//! in an inner scope of one base context per operator (a fresh context per event
//! would cost ~18 µs: it builds the function registry).

use std::collections::HashMap;
use std::sync::Arc;

use cel::objects::{Key, Map};
use cel::{Context, Program, Value as CelValue};
use keystone_crds::check::{EVENT_VARIABLE, compile_bounded};
use sonic_rs::{JsonContainerTrait, JsonType, JsonValueTrait, Object, Value};

use crate::error::RuntimeError;

/// A compiled expression and the variables it reads.
pub struct Expr {
    pub source: String,
    program: Program,
}

impl Expr {
    /// Compiles within the checker's limits (length, nesting), which keep the
    /// parser and the interpreter in the engine thread's stack even for a plan
    /// that did not come from the checker.
    pub fn compile(source: &str) -> Result<Self, RuntimeError> {
        let program = compile_bounded(source).map_err(|message| RuntimeError::Expression {
            // A refused expression may be megabytes long.
            expression: source.chars().take(200).collect(),
            message,
        })?;
        Ok(Self {
            source: source.to_owned(),
            program,
        })
    }

    pub fn variables(&self) -> Vec<String> {
        self.program
            .references()
            .variables()
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    pub fn execute(&self, scope: &Context) -> Result<CelValue, String> {
        self.program.execute(scope).map_err(|e| e.to_string())
    }
}

/// One base context and the union of the variables a set of expressions reads.
pub struct Bindings {
    base: Context<'static, 'static>,
    variables: Vec<String>,
}

impl Bindings {
    pub fn new<'a>(exprs: impl IntoIterator<Item = &'a Expr>) -> Self {
        let mut variables: Vec<String> = exprs.into_iter().flat_map(Expr::variables).collect();
        variables.sort();
        variables.dedup();
        Self {
            base: Context::default(),
            variables,
        }
    }

    /// Binds the referenced variables from `event` in a new inner scope and runs `f`
    /// with it. Fields the event lacks stay unbound: an expression that reads one
    /// fails with CEL's "undeclared reference" error.
    pub fn with_scope<R>(&self, event: &Value, f: impl FnOnce(&Context) -> R) -> R {
        let mut scope = self.base.new_inner_scope();
        let object = event.as_object();
        for name in &self.variables {
            match object.and_then(|o| o.get(name)) {
                Some(field) => scope.add_variable_from_value(name.as_str(), to_cel(field)),
                None if name == EVENT_VARIABLE => {
                    scope.add_variable_from_value(name.as_str(), to_cel(event))
                }
                None => {}
            }
        }
        f(&scope)
    }
}

/// JSON -> CEL: integers that fit i64 become `int`, larger ones `uint`, other
/// numbers `double`; objects become maps with string keys.
pub fn to_cel(value: &Value) -> CelValue {
    match value.get_type() {
        JsonType::Null => CelValue::Null,
        JsonType::Boolean => CelValue::Bool(value.is_true()),
        JsonType::Number => {
            if let Some(i) = value.as_i64() {
                CelValue::Int(i)
            } else if let Some(u) = value.as_u64() {
                CelValue::UInt(u)
            } else {
                CelValue::Float(value.as_f64().unwrap_or(f64::NAN))
            }
        }
        JsonType::String => CelValue::String(Arc::new(value.as_str().unwrap_or("").to_owned())),
        JsonType::Array => CelValue::List(Arc::new(
            value
                .as_array()
                .map(|a| a.iter().map(to_cel).collect())
                .unwrap_or_default(),
        )),
        JsonType::Object => {
            let mut map = HashMap::new();
            if let Some(object) = value.as_object() {
                for (key, member) in object.iter() {
                    map.insert(Key::String(Arc::new(key.to_owned())), to_cel(member));
                }
            }
            CelValue::Map(Map { map: Arc::new(map) })
        }
    }
}

/// CEL -> JSON. Timestamps become RFC 3339 strings; durations, bytes and
/// functions have no JSON form and are an error.
pub fn from_cel(value: &CelValue) -> Result<Value, String> {
    Ok(match value {
        CelValue::Null => Value::new_null(),
        CelValue::Bool(b) => Value::new_bool(*b),
        CelValue::Int(i) => Value::new_i64(*i),
        CelValue::UInt(u) => Value::new_u64(*u),
        CelValue::Float(f) => {
            Value::new_f64(*f).ok_or_else(|| format!("{f} is not a finite number"))?
        }
        CelValue::String(s) => Value::copy_str(s),
        CelValue::Timestamp(t) => Value::copy_str(&t.to_rfc3339()),
        CelValue::List(items) => {
            let mut array = sonic_rs::Array::with_capacity(items.len());
            for item in items.iter() {
                array.push(from_cel(item)?);
            }
            Value::from(array)
        }
        CelValue::Map(map) => {
            let mut object = Object::with_capacity(map.map.len());
            for (key, member) in map.map.iter() {
                let name = match key {
                    Key::String(s) => s.to_string(),
                    Key::Int(i) => i.to_string(),
                    Key::Uint(u) => u.to_string(),
                    Key::Bool(b) => b.to_string(),
                };
                object.insert(&name, from_cel(member)?);
            }
            Value::from(object)
        }
        other => return Err(format!("a CEL {} has no JSON form", cel_type_name(other))),
    })
}

/// The CEL type of a value, as messages name it.
pub fn cel_type_name(value: &CelValue) -> &'static str {
    match value {
        CelValue::List(_) => "list",
        CelValue::Map(_) => "map",
        CelValue::Function(..) => "function",
        CelValue::Int(_) => "int",
        CelValue::UInt(_) => "uint",
        CelValue::Float(_) => "double",
        CelValue::String(_) => "string",
        CelValue::Bytes(_) => "bytes",
        CelValue::Bool(_) => "bool",
        CelValue::Duration(_) => "duration",
        CelValue::Timestamp(_) => "timestamp",
        CelValue::Opaque(_) => "opaque",
        CelValue::Struct(_) => "struct",
        CelValue::Null => "null",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(expression: &str, event: &str) -> Result<CelValue, String> {
        let expr = Expr::compile(expression).unwrap();
        let bindings = Bindings::new([&expr]);
        let event: Value = sonic_rs::from_str(event).unwrap();
        bindings.with_scope(&event, |scope| expr.execute(scope))
    }

    #[test]
    fn top_level_fields_are_variables() {
        assert_eq!(
            eval(
                "amount > 100 && status == 'paid'",
                r#"{"amount":150,"status":"paid"}"#
            ),
            Ok(CelValue::Bool(true))
        );
        assert_eq!(
            eval("customer.tier", r#"{"customer":{"tier":"gold"}}"#),
            Ok(CelValue::String(Arc::new("gold".into())))
        );
    }

    #[test]
    fn event_is_the_whole_event_unless_a_field_is_named_so() {
        assert_eq!(
            eval("event['order-id'] == 7", r#"{"order-id":7}"#),
            Ok(CelValue::Bool(true))
        );
        assert_eq!(
            eval("event == 'x'", r#"{"event":"x"}"#),
            Ok(CelValue::Bool(true))
        );
    }

    #[test]
    fn missing_fields_fail() {
        let err = eval("amount > 1", r#"{"other":1}"#).unwrap_err();
        assert!(err.contains("amount"), "{err}");
    }

    /// Parsing limits events to `MAX_DEPTH` levels, so that these recursive walks
    /// are safe: at twice the limit they still fit the 2 MiB stack the engine
    /// thread (and a local run's steps thread) has, in debug builds too.
    #[test]
    fn walks_at_twice_the_nesting_limit_fit_an_engine_thread_stack() {
        let levels = 2 * crate::event::MAX_DEPTH;
        let inner = format!(
            "{}1{}",
            r#"{"a":["#.repeat(levels / 2 - 1),
            "]}".repeat(levels / 2 - 1)
        );
        let text = format!(r#"{{"deep":{inner},"id":"x"}}"#);
        let worker = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || {
                let event: Value = sonic_rs::from_str(&text).unwrap();
                let cel = to_cel(&event);
                assert_eq!(from_cel(&cel).unwrap(), event);
                let expr = Expr::compile("deep != null && event == event").unwrap();
                let bindings = Bindings::new([&expr]);
                let result = bindings.with_scope(&event, |scope| expr.execute(scope));
                assert_eq!(result, Ok(CelValue::Bool(true)));
                assert_eq!(sonic_rs::to_string(&event).unwrap(), text);
                let pointer = format!("/deep{}", "/a/0".repeat(levels / 2 - 1));
                let leaf = crate::event::Pointer::parse(&pointer).unwrap();
                assert_eq!(leaf.get(&event).and_then(|v| v.as_i64()), Some(1));
            })
            .unwrap();
        worker.join().unwrap();
    }

    #[test]
    fn values_round_trip() {
        let json: Value = sonic_rs::from_str(r#"{"a":[1,2.5,"x",null,true]}"#).unwrap();
        let back = from_cel(&to_cel(&json)).unwrap();
        assert_eq!(back, json);
    }
}
