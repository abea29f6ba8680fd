//! The form half of the editor, drawn from the CRD's own OpenAPI schema: every
//! operator, source and sink the API accepts gets its fields (with the CRD's
//! descriptions as help) without a form written per kind, and a field added to
//! the API appears here by itself.
//!
//! Inputs are named by their manifest path (`spec.steps[2].dedup.key`), the
//! same paths the checker reports, so a problem is shown at its field.
//! Structure travels in marker fields: `PATH#present` for an optional object
//! shown, `PATH#count` for a list of objects, `PATH#yaml` for a free-form map.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use kube::CustomResourceExt;
use maud::{Markup, html};
use serde_json::{Map, Value};

use keystone_crds::{Pipeline, Processor};

/// The `spec` schema of a kind, from the CRD this build serves.
pub fn spec_schema(kind: Kind) -> &'static Value {
    static PIPELINE: OnceLock<Value> = OnceLock::new();
    static PROCESSOR: OnceLock<Value> = OnceLock::new();
    let (cell, crd) = match kind {
        Kind::Pipeline => (&PIPELINE, Pipeline::crd as fn() -> _),
        Kind::Processor => (&PROCESSOR, Processor::crd as fn() -> _),
    };
    cell.get_or_init(|| {
        let crd = serde_json::to_value(crd()).expect("a CRD serializes");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pipeline,
    Processor,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pipeline => "Pipeline",
            Kind::Processor => "Processor",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "Pipeline" => Some(Kind::Pipeline),
            "Processor" => Some(Kind::Processor),
            _ => None,
        }
    }
}

/// Problems by the manifest path they name.
#[derive(Default)]
pub struct Problems(pub BTreeMap<String, Vec<String>>);

impl Problems {
    pub fn add(&mut self, path: &str, message: String) {
        self.0.entry(path.to_owned()).or_default().push(message);
    }

    fn at(&self, path: &str) -> &[String] {
        self.0.get(path).map(Vec::as_slice).unwrap_or_default()
    }

    /// Problems under `path` whose field is not drawn (a required field the
    /// user has not added yet), shown on the nearest drawn object.
    fn under_absent(&self, path: &str, drawn: &dyn Fn(&str) -> bool) -> Vec<&String> {
        self.0
            .iter()
            .filter(|(p, _)| {
                p.strip_prefix(path)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .map(|rest| {
                        let first = rest.split(['.', '[']).next().unwrap_or(rest);
                        !drawn(first)
                    })
                    .unwrap_or(false)
            })
            .flat_map(|(_, messages)| messages)
            .collect()
    }
}

/// An HTML id for a manifest path.
pub fn field_id(path: &str) -> String {
    let mut id = String::from("f-");
    for c in path.chars() {
        id.push(if c.is_ascii_alphanumeric() || c == '-' {
            c
        } else {
            '_'
        });
    }
    id
}

fn description(schema: &Value) -> Option<String> {
    let text = schema.get("description")?.as_str()?;
    // The first paragraph, on one line: the rest is for `kubectl explain`.
    let first = text.split("\n\n").next().unwrap_or(text);
    Some(first.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn properties(schema: &Value) -> Option<&Map<String, Value>> {
    schema.get("properties")?.as_object()
}

fn required(schema: &Value) -> Vec<&str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn type_of(schema: &Value) -> &str {
    schema.get("type").and_then(Value::as_str).unwrap_or("")
}

/// A map or free-form value: edited as YAML text.
fn is_free_form(schema: &Value) -> bool {
    schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true))
        || schema.get("additionalProperties").is_some()
        || (type_of(schema) == "object" && properties(schema).is_none())
        || (type_of(schema).is_empty() && properties(schema).is_none())
}

/// Where a property comes in reading order: the name first, then a
/// pipeline's source, steps and sinks in the order events flow, then the
/// required fields, then the rest alphabetically.
fn rank(required: &[&str], name: &str) -> (u8, String) {
    const FLOW: [&str; 3] = ["source", "steps", "sinks"];
    let class = if name == "name" {
        0
    } else if let Some(i) = FLOW.iter().position(|f| *f == name) {
        1 + i as u8
    } else if required.contains(&name) {
        10
    } else {
        20
    };
    (class, name.to_owned())
}

/// Properties in reading order (see [`rank`]).
fn ordered(schema: &Value) -> Vec<(&String, &Value)> {
    let required = required(schema);
    let mut props: Vec<_> = properties(schema).into_iter().flatten().collect();
    props.sort_by_key(|(name, _)| rank(&required, name));
    props
}

/// A manifest as YAML with its fields in the form's order (a JSON map sorts
/// them alphabetically, which would put `sinks` before `source`).
pub fn to_yaml(manifest: &Value, kind: Kind) -> String {
    const TOP: [&str; 4] = ["apiVersion", "kind", "metadata", "spec"];
    let Value::Object(map) = manifest else {
        return serde_yaml_ng::to_string(manifest).unwrap_or_default();
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_by_key(|k| {
        (
            TOP.iter().position(|t| t == k).unwrap_or(TOP.len()),
            k.to_string(),
        )
    });
    let mut out = serde_yaml_ng::Mapping::new();
    for key in keys {
        let schema = (key == "spec").then(|| spec_schema(kind));
        out.insert(key.as_str().into(), yaml_in_order(&map[key], schema));
    }
    serde_yaml_ng::to_string(&out).unwrap_or_default()
}

fn yaml_in_order(value: &Value, schema: Option<&Value>) -> serde_yaml_ng::Value {
    match value {
        Value::Object(map) => {
            let required = schema.map(required).unwrap_or_default();
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by_key(|k| rank(&required, k));
            let mut out = serde_yaml_ng::Mapping::new();
            for key in keys {
                let child = schema
                    .and_then(properties)
                    .and_then(|p| p.get(key.as_str()));
                out.insert(key.as_str().into(), yaml_in_order(&map[key], child));
            }
            serde_yaml_ng::Value::Mapping(out)
        }
        Value::Array(items) => {
            let child = schema.and_then(|s| s.get("items"));
            serde_yaml_ng::Value::Sequence(items.iter().map(|i| yaml_in_order(i, child)).collect())
        }
        other => serde_yaml_ng::to_value(other).unwrap_or(serde_yaml_ng::Value::Null),
    }
}

/// The form for `value` (a `spec`) at `path`.
pub fn render(schema: &Value, value: &Value, problems: &Problems, path: &str) -> Markup {
    object_fields(schema, value, problems, path)
}

fn object_fields(schema: &Value, value: &Value, problems: &Problems, path: &str) -> Markup {
    let required = required(schema);
    let present = |name: &str| value.get(name).is_some_and(|v| !v.is_null());
    let props = ordered(schema);
    let addable: Vec<&String> = props
        .iter()
        .filter(|(name, _)| !present(name) && !required.contains(&name.as_str()))
        .map(|(name, _)| *name)
        .collect();
    let drawn = |name: &str| present(name) || required.contains(&name);
    let stray = problems.under_absent(path, &drawn);
    // A pipeline's tuning (intervals, delivery, upgrade policy, …), which the
    // API server fills with defaults, folds away below what it reads and writes.
    let settings: Vec<&str> =
        if path == "spec" && properties(schema).is_some_and(|p| p.contains_key("steps")) {
            props
                .iter()
                .map(|(name, _)| name.as_str())
                .filter(|name| present(name) && !matches!(*name, "source" | "steps" | "sinks"))
                .collect()
        } else {
            Vec::new()
        };
    let settings_have_problems = settings.iter().any(|name| {
        problems
            .0
            .keys()
            .any(|p| p.starts_with(&format!("{path}.{name}")))
    });
    html! {
        @for message in problems.at(path) { p.problem role="alert" { (message) } }
        @for message in &stray { p.problem role="alert" { (message) } }
        @for (name, child) in &props {
            @if drawn(name) && !settings.contains(&name.as_str()) {
                (node(child, value.get(name.as_str()).unwrap_or(&Value::Null), problems,
                      &format!("{path}.{name}"), name, required.contains(&name.as_str())))
            }
        }
        @if !settings.is_empty() {
            details open[settings_have_problems] {
                summary { "Settings (" (settings.len()) ")" }
                @for (name, child) in &props {
                    @if settings.contains(&name.as_str()) {
                        (node(child, value.get(name.as_str()).unwrap_or(&Value::Null), problems,
                              &format!("{path}.{name}"), name, false))
                    }
                }
            }
        }
        @if !addable.is_empty() {
            @let select_id = field_id(&format!("{path}#add"));
            div.toolbar {
                label for=(select_id) { "Add a field to " code { (path) } }
                select id=(select_id) name=(format!("{path}#add")) {
                    @for name in &addable { option value=(name) { (name) } }
                }
                // Named apart from the other objects' Add buttons.
                button type="submit" name="op" value=(format!("addprop:{path}"))
                    aria-label=(format!("Add the chosen field to {path}")) { "Add" }
            }
        }
    }
}

fn node(
    schema: &Value,
    value: &Value,
    problems: &Problems,
    path: &str,
    label: &str,
    required: bool,
) -> Markup {
    let id = field_id(path);
    let help = description(schema);
    let help_id = format!("{id}-help");
    // Screen readers read a control's problems and help with it.
    let described: Option<String> = {
        let ids: Vec<String> = [
            (!problems.at(path).is_empty()).then(|| format!("{id}-problem")),
            help.as_ref().map(|_| help_id.clone()),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!ids.is_empty()).then(|| ids.join(" "))
    };
    let remove = (!required).then(|| {
        html! {
            button type="submit" name="op" value=(format!("remove:{path}"))
                aria-label=(format!("Remove {path}")) { "Remove" }
        }
    });
    if is_free_form(schema) {
        let text = if value.is_null() {
            String::new()
        } else {
            serde_yaml_ng::to_string(value).unwrap_or_default()
        };
        return html! {
            div.field {
                label for=(id) { (label) " (YAML)" }
                div {
                    textarea id=(id) name=(format!("{path}#yaml")) rows="4"
                        aria-describedby=[described.as_deref()] { (text) }
                    (remove.clone().unwrap_or_default())
                }
                (problem_lines(&id, problems.at(path)))
                @if let Some(help) = &help { span.help id=(help_id) { (help) } }
            }
        };
    }
    match type_of(schema) {
        "object" => {
            let invalid = !problems.at(path).is_empty();
            html! {
                fieldset id=(id) class=[invalid.then_some("invalid")] {
                    legend { (label) }
                    input type="hidden" name=(format!("{path}#present")) value="1";
                    @if let Some(help) = &help { p.help.muted { (help) } }
                    (object_fields(schema, value, problems, path))
                    (remove.unwrap_or_default())
                }
            }
        }
        "array" if type_of(&schema["items"]) == "object" && !is_free_form(&schema["items"]) => {
            let items = value.as_array().map(Vec::as_slice).unwrap_or_default();
            html! {
                fieldset id=(id) {
                    legend { (label) }
                    input type="hidden" name=(format!("{path}#count")) value=(items.len());
                    @if let Some(help) = &help { p.help.muted { (help) } }
                    @for message in problems.at(path) { p.problem role="alert" { (message) } }
                    @for (i, item) in items.iter().enumerate() {
                        @let item_path = format!("{path}[{i}]");
                        @let title = item.get("name").and_then(Value::as_str).map(|n| format!("{label} {n}"))
                            .unwrap_or_else(|| format!("{label} {}", i + 1));
                        fieldset id=(field_id(&item_path)) class=[(!problems.at(&item_path).is_empty()).then_some("invalid")] {
                            legend { (title) }
                            (object_fields(&schema["items"], item, problems, &item_path))
                            button type="submit" name="op" value=(format!("remove:{item_path}"))
                                aria-label=(format!("Remove {title}")) { "Remove" }
                        }
                    }
                    button type="submit" name="op" value=(format!("add:{path}"))
                        // The name starts with the visible text ("Add step"),
                        // which speech input users say.
                        aria-label=(format!("Add {} to {path}", singular(label))) { "Add " (singular(label)) }
                }
            }
        }
        kind => {
            let invalid = (!problems.at(path).is_empty()).then_some("true");
            let control = scalar_control(
                schema,
                kind,
                value,
                &id,
                path,
                invalid,
                described.as_deref(),
            );
            scalar(
                &id,
                label,
                path,
                problems,
                help.as_deref(),
                &help_id,
                remove,
                control,
            )
        }
    }
}

/// A value as a person types it: text without quotes.
fn plain(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The input of a scalar, an enum or boolean (a select), or a list of
/// scalars (comma-separated text).
fn scalar_control(
    schema: &Value,
    kind: &str,
    value: &Value,
    id: &str,
    path: &str,
    invalid: Option<&str>,
    described: Option<&str>,
) -> Markup {
    if kind == "array" {
        let text = value
            .as_array()
            .map(|items| items.iter().map(plain).collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        return html! {
            input id=(id) type="text" name=(path) value=(text) placeholder="comma, separated"
                aria-invalid=[invalid] aria-describedby=[described];
        };
    }
    let current = plain(value);
    let choices: Option<Vec<String>> = if kind == "boolean" {
        Some(vec!["true".into(), "false".into()])
    } else {
        schema
            .get("enum")
            .and_then(Value::as_array)
            .map(|e| e.iter().map(plain).collect())
    };
    match choices {
        Some(choices) => html! {
            select id=(id) name=(path) aria-invalid=[invalid] aria-describedby=[described] {
                option value="" selected[current.is_empty()] { "(default)" }
                @for choice in &choices {
                    option value=(choice) selected[*choice == current] { (choice) }
                }
            }
        },
        None => {
            let input_type = if matches!(kind, "integer" | "number") {
                "number"
            } else {
                "text"
            };
            html! {
                input id=(id) type=(input_type) name=(path) value=(current)
                    step=[(kind == "number").then_some("any")]
                    aria-invalid=[invalid] aria-describedby=[described];
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn scalar(
    id: &str,
    label: &str,
    path: &str,
    problems: &Problems,
    help: Option<&str>,
    help_id: &str,
    remove: Option<Markup>,
    control: Markup,
) -> Markup {
    html! {
        div.field {
            label for=(id) { (label) }
            div { (control) " " (remove.unwrap_or_default()) }
            (problem_lines(id, problems.at(path)))
            @if let Some(help) = help { span.help id=(help_id) { (help) } }
        }
    }
}

fn problem_lines(id: &str, messages: &[String]) -> Markup {
    html! {
        @if !messages.is_empty() {
            span.problem role="alert" id=(format!("{id}-problem")) {
                @for (i, message) in messages.iter().enumerate() {
                    @if i > 0 { br; }
                    (message)
                }
            }
        }
    }
}

fn singular(label: &str) -> &str {
    label.strip_suffix('s').unwrap_or(label)
}

/// Posted fields; the last value of a name wins.
pub type Fields = HashMap<String, String>;

/// Reads the form back into a `spec`; `None` when nothing at `path` was posted.
pub fn read(schema: &Value, fields: &Fields, path: &str) -> Value {
    read_object(schema, fields, path)
}

fn read_object(schema: &Value, fields: &Fields, path: &str) -> Value {
    let mut object = Map::new();
    for (name, child) in ordered(schema) {
        if let Some(value) = read_node(child, fields, &format!("{path}.{name}")) {
            object.insert(name.clone(), value);
        }
    }
    Value::Object(object)
}

fn read_node(schema: &Value, fields: &Fields, path: &str) -> Option<Value> {
    if is_free_form(schema) {
        let text = fields.get(&format!("{path}#yaml"))?;
        if text.trim().is_empty() {
            return None;
        }
        // Text that is not YAML stays text: the checker names the field.
        return Some(
            serde_yaml_ng::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.clone())),
        );
    }
    match type_of(schema) {
        "object" => {
            fields.get(&format!("{path}#present"))?;
            Some(read_object(schema, fields, path))
        }
        "array" if type_of(&schema["items"]) == "object" && !is_free_form(&schema["items"]) => {
            let count: usize = fields.get(&format!("{path}#count"))?.parse().ok()?;
            Some(Value::Array(
                (0..count)
                    .map(|i| read_object(&schema["items"], fields, &format!("{path}[{i}]")))
                    .collect(),
            ))
        }
        "array" => {
            let items: Vec<Value> = fields
                .get(path)?
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| typed(&schema["items"], s))
                .collect();
            (!items.is_empty()).then_some(Value::Array(items))
        }
        _ => {
            let text = fields.get(path)?.trim();
            (!text.is_empty()).then(|| typed(schema, text))
        }
    }
}

/// A scalar of the schema's type; text that is not one stays text, for the
/// checker to report at its field.
fn typed(schema: &Value, text: &str) -> Value {
    match type_of(schema) {
        "integer" => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| text.into()),
        "number" => text
            .parse::<f64>()
            .ok()
            .and_then(|n| serde_json::Number::from_f64(n).map(Value::Number))
            .unwrap_or_else(|| text.into()),
        "boolean" => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            other => other.into(),
        },
        _ => Value::String(text.to_owned()),
    }
}

/// One step of a manifest path.
#[derive(Debug, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn segments(path: &str) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if !key.is_empty() {
            out.push(Segment::Key(key.to_owned()));
        }
        while !rest.is_empty() {
            let (index, after) = rest.split_once(']')?;
            out.push(Segment::Index(index.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    Some(out)
}

fn schema_at<'a>(schema: &'a Value, segments: &[Segment]) -> Option<&'a Value> {
    let mut at = schema;
    for segment in segments {
        at = match segment {
            Segment::Key(key) => properties(at)?.get(key)?,
            Segment::Index(_) => at.get("items")?,
        };
    }
    Some(at)
}

fn value_at<'a>(value: &'a mut Value, segments: &[Segment]) -> Option<&'a mut Value> {
    let mut at = value;
    for segment in segments {
        at = match segment {
            Segment::Key(key) => at.as_object_mut()?.get_mut(key)?,
            Segment::Index(i) => at.as_array_mut()?.get_mut(*i)?,
        };
    }
    Some(at)
}

/// A new value for `schema`: its required fields, empty.
fn blank(schema: &Value, siblings: usize) -> Value {
    match type_of(schema) {
        "object" if !is_free_form(schema) => {
            let mut object = Map::new();
            for name in required(schema) {
                let child = &schema["properties"][name];
                let value = if name == "name" && type_of(child) == "string" {
                    Value::String(format!("item-{}", siblings + 1))
                } else {
                    blank(child, 0)
                };
                object.insert(name.to_owned(), value);
            }
            Value::Object(object)
        }
        "object" => Value::Object(Map::new()),
        "array" => Value::Array(Vec::new()),
        "boolean" => Value::Bool(false),
        "integer" | "number" => schema.get("minimum").cloned().unwrap_or(Value::from(0)),
        _ => Value::String(String::new()),
    }
}

/// Applies a structural button: `add:PATH` (a new item in a list),
/// `remove:PATH`, `addprop:PATH` (the field chosen in `PATH#add`).
/// `spec` is the value read from the form, rooted at `root` (`spec`).
pub fn apply_op(schema: &Value, spec: &mut Value, root: &str, op: &str, fields: &Fields) {
    let Some((verb, path)) = op.split_once(':') else {
        return;
    };
    let Some(relative) = path.strip_prefix(root) else {
        return;
    };
    let Some(segs) = segments(relative.trim_start_matches('.')) else {
        return;
    };
    match verb {
        "add" => {
            let Some(list_schema) = schema_at(schema, &segs) else {
                return;
            };
            let item_schema = &list_schema["items"];
            if value_at(spec, &segs).is_none() {
                insert(spec, &segs, Value::Array(Vec::new()));
            }
            if let Some(Value::Array(items)) = value_at(spec, &segs) {
                let item = blank(item_schema, items.len());
                items.push(item);
            }
        }
        "addprop" => {
            let Some(name) = fields.get(&format!("{path}#add")) else {
                return;
            };
            let Some(child_schema) =
                schema_at(schema, &segs).and_then(|s| properties(s)?.get(name))
            else {
                return;
            };
            let value = blank(child_schema, 0);
            if let Some(Value::Object(object)) = value_at(spec, &segs) {
                object.insert(name.clone(), value);
            }
        }
        "remove" => {
            let Some((last, parent)) = segs.split_last() else {
                return;
            };
            match (value_at(spec, parent), last) {
                (Some(Value::Object(object)), Segment::Key(key)) => {
                    object.remove(key);
                }
                (Some(Value::Array(items)), Segment::Index(i)) if *i < items.len() => {
                    items.remove(*i);
                }
                _ => {}
            }
        }
        _ => {}
    }
}

fn insert(spec: &mut Value, segs: &[Segment], value: Value) {
    let Some((Segment::Key(last), parent)) = segs.split_last() else {
        return;
    };
    if let Some(Value::Object(object)) = value_at(spec, parent) {
        object.insert(last.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn paths_split_into_keys_and_indexes() {
        assert_eq!(
            segments("steps[2].dedup.key").unwrap(),
            vec![
                Segment::Key("steps".into()),
                Segment::Index(2),
                Segment::Key("dedup".into()),
                Segment::Key("key".into())
            ]
        );
        assert!(segments("steps[x]").is_none());
    }

    #[test]
    fn a_rendered_spec_reads_back_the_same() {
        let schema = spec_schema(Kind::Pipeline);
        let spec = json!({
            "source": {"topic": "orders", "key": ["id"], "schema": {"fields": [
                {"name": "id", "type": "string"}, {"name": "amount", "type": "number"}]}},
            "steps": [
                {"name": "big", "filter": {"expression": "amount > 100"}},
                {"name": "once", "dedup": {"key": ["id"], "window": "1h"}}
            ],
            "sinks": [{"name": "out", "kafka": {"topic": "orders.big", "partitions": 3}}],
            "parallelism": 2
        });
        let html = render(schema, &spec, &Problems::default(), "spec").into_string();
        let posted = form_fields(&html);
        let read_back = read(schema, &posted, "spec");
        assert_eq!(read_back, spec, "from the fields {posted:#?}");
    }

    #[test]
    fn problems_appear_at_their_field_and_absent_fields_at_their_object() {
        let schema = spec_schema(Kind::Pipeline);
        let spec = json!({"source": {"topic": "t"}, "steps": [{"name": "s", "filter": {"expression": "x >"}}], "sinks": []});
        let mut problems = Problems::default();
        problems.add("spec.steps[0].filter.expression", "not CEL".into());
        problems.add("spec.steps[0].dedup.key", "needs a key".into());
        let html = render(schema, &spec, &problems, "spec").into_string();
        let at_field = html.find("not CEL").expect("the field's problem");
        let input = html
            .find("id=\"f-spec_steps_0__filter_expression\"")
            .expect("the input");
        assert!(at_field > input, "the problem follows its input");
        assert!(
            html.contains("needs a key"),
            "a problem of an absent field is shown on its step"
        );
        assert!(html.contains("aria-invalid=\"true\""));
    }

    #[test]
    fn buttons_add_and_remove_steps_and_fields() {
        let schema = spec_schema(Kind::Pipeline);
        let mut spec = json!({"source": {"topic": "t"}, "steps": [{"name": "a", "filter": {"expression": "true"}}], "sinks": []});
        apply_op(schema, &mut spec, "spec", "add:spec.steps", &Fields::new());
        assert_eq!(spec["steps"][1], json!({"name": "item-2"}));
        apply_op(
            schema,
            &mut spec,
            "spec",
            "addprop:spec.steps[1]",
            &fields(&[("spec.steps[1]#add", "dedup")]),
        );
        assert!(spec["steps"][1]["dedup"].is_object());
        apply_op(
            schema,
            &mut spec,
            "spec",
            "remove:spec.steps[0]",
            &Fields::new(),
        );
        assert_eq!(spec["steps"].as_array().unwrap().len(), 1);
        assert_eq!(spec["steps"][0]["name"], "item-2");
        apply_op(
            schema,
            &mut spec,
            "spec",
            "remove:spec.steps[0].dedup",
            &Fields::new(),
        );
        assert_eq!(spec["steps"][0], json!({"name": "item-2"}));
    }

    #[test]
    fn yaml_follows_the_forms_order() {
        let manifest = json!({"spec": {"sinks": [], "steps": [{"filter": {"expression": "true"}, "name": "a"}], "source": {"topic": "t"}, "parallelism": 2},
            "metadata": {"name": "p"}, "kind": "Pipeline", "apiVersion": "keystone.dev/v1alpha1"});
        let yaml = to_yaml(&manifest, Kind::Pipeline);
        let order: Vec<usize> = [
            "apiVersion",
            "kind",
            "metadata",
            "spec",
            "source",
            "steps",
            "- name: a",
            "filter",
            "sinks",
            "parallelism",
        ]
        .iter()
        .map(|k| yaml.find(k).unwrap_or_else(|| panic!("{k} in {yaml}")))
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{yaml}");
        let back: Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(back, manifest);
    }

    #[test]
    fn typed_values_keep_what_is_not_of_the_type() {
        let schema = json!({"type": "integer"});
        assert_eq!(typed(&schema, "3"), json!(3));
        assert_eq!(typed(&schema, "three"), json!("three"));
    }

    /// The fields a browser would post for the form: every named input and
    /// textarea with its value, every select with its selected option.
    fn form_fields(html: &str) -> Fields {
        let mut fields = Fields::new();
        let attr = |tag: &str, name: &str| -> Option<String> {
            let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
            let end = tag[start..].find('"')? + start;
            Some(
                tag[start..end]
                    .replace("&quot;", "\"")
                    .replace("&amp;", "&")
                    .replace("&lt;", "<")
                    .replace("&gt;", ">"),
            )
        };
        let mut rest = html;
        while let Some(open) = rest.find('<') {
            rest = &rest[open..];
            let close = rest.find('>').unwrap();
            let tag = &rest[..=close];
            if tag.starts_with("<input") {
                if let (Some(name), Some(value)) = (attr(tag, "name"), attr(tag, "value")) {
                    fields.insert(name, value);
                }
            } else if tag.starts_with("<textarea") {
                let end = rest.find("</textarea>").unwrap();
                if let Some(name) = attr(tag, "name") {
                    fields.insert(
                        name,
                        rest[close + 1..end]
                            .replace("&quot;", "\"")
                            .replace("&amp;", "&")
                            .replace("&lt;", "<")
                            .replace("&gt;", ">"),
                    );
                }
            } else if tag.starts_with("<select") {
                let end = rest.find("</select>").unwrap();
                let options = &rest[close..end];
                let name = attr(tag, "name").unwrap();
                let value = options
                    .split("<option")
                    .find(|o| o.contains(" selected"))
                    .and_then(|o| attr(o, "value"))
                    .unwrap_or_default();
                if !name.ends_with("#add") {
                    fields.insert(name, value);
                }
            }
            rest = &rest[close + 1..];
        }
        fields
    }
}
