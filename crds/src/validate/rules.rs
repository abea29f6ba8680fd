//! The CRDs' CEL validation rules (`x-kubernetes-validations`), evaluated with the
//! `cel` crate the rest of Keystone uses, as the API server evaluates them on a
//! create: `self` is the value at the rule's node, a null value is not checked,
//! and a field that is absent or null is absent to `has()`.
//!
//! Not mirrored: the API server's cost limits (the rules are small; a rule too
//! costly for the server would be refused when the CRD is installed, which the
//! e2e tests do), and transition rules (see [`is_transition_rule`]).

use std::collections::HashMap;
use std::sync::Arc;

use cel::objects::{Key, Map};
use cel::{Context, Program, Value as Cel};
use serde_json::Value as Json;

use super::{Violation, child_path};

/// Evaluates every rule at and below `schema` on `value`.
pub(super) fn validate_rules(value: &Json, schema: &Json, path: &str, out: &mut Vec<Violation>) {
    if value.is_null() {
        // Rules check values; a rule about whether a value is set sits on its parent.
        return;
    }
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Json::as_array)
    {
        for rule in rules {
            if let Some(violation) = evaluate(rule, value, schema, path) {
                out.push(violation);
            }
        }
    }
    match value {
        Json::Object(map) => {
            let properties = schema.get("properties");
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                if let Some(child_schema) = properties.and_then(|p| p.get(key)).or(additional) {
                    validate_rules(child, child_schema, &child_path(path, key), out);
                }
            }
        }
        Json::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate_rules(item, item_schema, &format!("{path}[{i}]"), out);
                }
            }
        }
        _ => {}
    }
}

/// Whether a rule compares with the stored object (`oldSelf`). The API server
/// evaluates such transition rules only on an update, so a create (and `check`,
/// which sees one version of a manifest) skips them. The CRD tests make sure no
/// rule uses `optionalOldSelf`, which would make the server run it on create too.
pub fn is_transition_rule(program: &Program) -> bool {
    program.references().has_variable("oldSelf")
}

fn evaluate(rule: &Json, value: &Json, schema: &Json, path: &str) -> Option<Violation> {
    let source = rule.get("rule").and_then(Json::as_str)?;
    let program = match Program::compile(source) {
        Ok(program) => program,
        // Fail closed: a rule `check` cannot read would be a silent hole.
        Err(e) => {
            return Some(Violation::new(
                path,
                format!("the CRD rule `{source}` does not compile locally: {e}"),
            ));
        }
    };
    if is_transition_rule(&program) {
        return None;
    }
    let mut context = Context::default();
    context.add_variable_from_value("self", to_cel(value, schema));
    let failure = match program.execute(&context) {
        Ok(Cel::Bool(true)) => return None,
        Ok(Cel::Bool(false)) => message(rule, &context, source),
        Ok(other) => format!("rule `{source}` evaluated to {other:?}, not a boolean"),
        Err(e) => format!("rule `{source}` failed to evaluate: {e}"),
    };
    let path = match rule.get("fieldPath").and_then(Json::as_str) {
        Some(field) => format!("{path}{field}"),
        None => path.to_owned(),
    };
    let type_name = schema
        .get("type")
        .and_then(Json::as_str)
        .unwrap_or("object");
    let message = match rule.get("reason").and_then(Json::as_str) {
        Some("FieldValueForbidden") => format!("Forbidden: {failure}"),
        Some("FieldValueRequired") => format!("Required value: {failure}"),
        _ => format!("Invalid value: \"{type_name}\": {failure}"),
    };
    Some(Violation::new(&path, message))
}

/// The message of a failed rule as the API server picks it: `messageExpression`
/// when it yields a non-blank string, else `message`, else the rule itself.
fn message(rule: &Json, context: &Context, source: &str) -> String {
    let from_expression = rule
        .get("messageExpression")
        .and_then(Json::as_str)
        .and_then(|e| Program::compile(e).ok())
        .and_then(|p| p.execute(context).ok())
        .and_then(|v| match v {
            Cel::String(s) if !s.trim().is_empty() => Some(s.to_string()),
            _ => None,
        });
    from_expression
        .or_else(|| {
            rule.get("message")
                .and_then(Json::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("failed rule: {source}"))
}

/// JSON -> CEL by the schema: integers are `int` unless the schema says
/// `number` (then `double`), and an object's null fields are absent (the API
/// server treats a null nullable field like an unset one).
fn to_cel(value: &Json, schema: &Json) -> Cel {
    match value {
        Json::Null => Cel::Null,
        Json::Bool(b) => Cel::Bool(*b),
        Json::Number(n) => {
            let is_number = schema.get("type").and_then(Json::as_str) == Some("number");
            match n.as_i64() {
                Some(i) if !is_number => Cel::Int(i),
                _ => Cel::Float(n.as_f64().unwrap_or(f64::NAN)),
            }
        }
        Json::String(s) => Cel::String(Arc::new(s.clone())),
        Json::Array(items) => {
            let item_schema = schema.get("items").unwrap_or(&Json::Null);
            Cel::List(Arc::new(
                items.iter().map(|i| to_cel(i, item_schema)).collect(),
            ))
        }
        Json::Object(members) => {
            let properties = schema.get("properties");
            let additional = schema.get("additionalProperties");
            let mut map = HashMap::new();
            for (key, member) in members {
                if member.is_null() {
                    continue;
                }
                let member_schema = properties
                    .and_then(|p| p.get(key))
                    .or(additional)
                    .unwrap_or(&Json::Null);
                map.insert(
                    Key::String(Arc::new(key.clone())),
                    to_cel(member, member_schema),
                );
            }
            Cel::Map(Map { map: Arc::new(map) })
        }
    }
}
