//! The checker's schema against the events the runtime really produces.
//!
//! Each case compiles a pipeline (the checker propagates the schema to the
//! sink: `PlanSink.schema`), runs events through it in local mode and checks
//! every output event against that schema: each listed field that is not
//! optional is there, each field that is there has the listed type, a listed
//! nested field sits in an object, and a closed schema lists every field the
//! event has. A checker that forgets what a step really writes fails here.

use std::collections::BTreeMap;
use std::sync::Arc;

use keystone_crds::schema::{FieldType, SchemaSpec};
use keystone_crds::{ErrorKind, Plan, compile, parse_manifests};
use keystone_runtime::ManualClock;
use keystone_runtime::local::LocalPipeline;
use keystone_runtime::ops::Table;
use serde_json::Value;

fn plan(pipeline: &str, processors: &str) -> Result<Plan, keystone_crds::ContractErrors> {
    let mut manifests = parse_manifests("pipeline.yaml", pipeline).unwrap();
    if !processors.is_empty() {
        manifests.extend(parse_manifests("processors.yaml", processors).unwrap());
    }
    compile(&manifests.pipelines[0], &manifests.processors)
}

/// Runs `input` through the compiled pipeline; `rows` fill its tables by name.
fn run(plan: &Plan, rows: &[(&str, &[&str])], input: &[&str]) -> Vec<Value> {
    let mut tables = BTreeMap::new();
    for step in plan.stages.iter().flat_map(|s| &s.steps) {
        let spec = match step.operator.single() {
            Some(keystone_crds::ops::Operator::Join(j)) => &j.table,
            Some(keystone_crds::ops::Operator::Enrich(e)) => &e.table,
            _ => continue,
        };
        let mut table = Table::new(spec);
        for (name, lines) in rows {
            if *name == spec.name {
                for line in *lines {
                    table.upsert(sonic_rs::from_str(line).unwrap()).unwrap();
                }
            }
        }
        tables.insert(spec.name.clone(), table);
    }
    let clock = ManualClock::new(1_767_225_600_000);
    let mut pipeline = LocalPipeline::new(plan, &tables, Arc::new(clock)).unwrap();
    let (mut events, dead) =
        pipeline.push_lines(input.iter().map(|l| l.as_bytes().to_vec()).collect());
    let (more, more_dead) = pipeline.finish();
    events.extend(more);
    assert!(
        dead.is_empty() && more_dead.is_empty(),
        "no event of these cases is a dead letter: {:?}",
        dead.iter()
            .chain(&more_dead)
            .map(|d| &d.reason)
            .collect::<Vec<_>>()
    );
    events
        .iter()
        .map(|e| serde_json::from_str(&sonic_rs::to_string(&e.value).unwrap()).unwrap())
        .collect()
}

fn has_type(value: &Value, field_type: FieldType) -> bool {
    match field_type {
        FieldType::String => value.is_string(),
        FieldType::Integer => value.is_i64() || value.is_u64(),
        FieldType::Number => value.is_number(),
        FieldType::Boolean => value.is_boolean(),
        FieldType::Timestamp => value.is_string() || value.is_i64(),
        FieldType::Object => value.is_object(),
        FieldType::Array => value.is_array(),
        FieldType::Any => true,
    }
}

fn get<'a>(event: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(event, |value, name| value.get(name))
}

/// Every leaf and object path of an event.
fn paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Some(object) = value.as_object() {
        for (name, member) in object {
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            out.push(path.clone());
            paths(member, &path, out);
        }
    }
}

#[track_caller]
fn assert_schema_holds(schema: &SchemaSpec, events: &[Value]) {
    assert!(!events.is_empty(), "the case must produce events");
    let listed: BTreeMap<&str, (FieldType, bool)> = schema
        .fields
        .iter()
        .map(|f| (f.name.as_str(), (f.field_type, f.optional)))
        .collect();
    for path in listed.keys() {
        if let Some((parent, _)) = path.rsplit_once('.') {
            let parent_type = listed.get(parent).map(|(t, _)| *t);
            assert!(
                matches!(parent_type, Some(FieldType::Object | FieldType::Any)),
                "the schema lists {path:?} under {parent:?}, which it gives as {parent_type:?}"
            );
        }
    }
    for event in events {
        for (path, (field_type, optional)) in &listed {
            match get(event, path) {
                None => assert!(
                    *optional,
                    "the schema says every event has {path:?}, but {event} has not"
                ),
                Some(value) => assert!(
                    has_type(value, *field_type),
                    "the schema says {path:?} is {field_type}, but in {event} it is {value}"
                ),
            }
        }
        if !schema.open {
            let mut found = Vec::new();
            paths(event, "", &mut found);
            for path in found {
                assert!(
                    listed.contains_key(path.as_str()),
                    "the schema is closed but does not list {path:?} of {event}"
                );
            }
        }
    }
}

const CUSTOMERS: &str = "table:\n          name: customers\n          topic: customers\n          key: [id]\n          replicated: true\n          schema: {fields: [{name: id, type: string}, {name: tier, type: string}, {name: since, type: integer}]}";
const CUSTOMER_ROWS: &[&str] = &[r#"{"id":"c1","tier":"gold","since":2019}"#];

fn pipeline(fields: &str, steps: &str) -> String {
    format!(
        "apiVersion: keystone.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: p, namespace: t}}\nspec:\n  source:\n    topic: in\n    schema:\n      fields:\n{fields}  steps:\n{steps}  sinks:\n    - name: out\n      kafka: {{topic: out}}\n"
    )
}

const ORDER_FIELDS: &str = "        - {name: order_id, type: string}\n        - {name: customer_id, type: string}\n        - {name: amount, type: number}\n        - {name: customer.id, type: string}\n        - {name: customer.name, type: string}\n";
const ORDERS: &[&str] = &[
    r#"{"order_id":"o1","customer_id":"c1","amount":10.5,"customer":{"id":"c1","name":"Ann"}}"#,
    r#"{"order_id":"o2","customer_id":"c9","amount":3.5,"customer":{"id":"c9","name":"Bo"}}"#,
];

#[test]
fn enrich_into_an_existing_scalar_is_refused() {
    let errors = plan(
        &pipeline(
            ORDER_FIELDS,
            &format!("    - name: tiers\n      enrich:\n        {CUSTOMERS}\n        lookupKey: [customer_id]\n        into: amount\n"),
        ),
        "",
    )
    .unwrap_err();
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert_eq!(errors.0[0].kind, ErrorKind::WrongType);
    assert!(
        errors.0[0]
            .message
            .contains("field \"amount\", which is number"),
        "{errors}"
    );
}

#[test]
fn left_join_and_enrich_into_an_existing_object_and_a_new_field() {
    for kind in ["Left", "Inner"] {
        let plan = plan(
            &pipeline(
                ORDER_FIELDS,
                &format!(
                    "    - name: join\n      join:\n        {CUSTOMERS}\n        lookupKey: [customer_id]\n        kind: {kind}\n        into: customer\n    - name: again\n      enrich:\n        {CUSTOMERS}\n        lookupKey: [customer_id]\n        fields: [tier]\n        into: loyalty\n"
                ),
            ),
            "",
        )
        .unwrap();
        let events = run(&plan, &[("customers", CUSTOMER_ROWS)], ORDERS);
        assert_eq!(events.len(), if kind == "Left" { 2 } else { 1 });
        let schema = &plan.sinks[0].schema;
        assert_schema_holds(schema, &events);
        let tier = schema
            .fields
            .iter()
            .find(|f| f.name == "customer.tier")
            .unwrap();
        // The inner join only lets matched events through: they all have the tier.
        assert_eq!(tier.optional, kind == "Left", "{kind}");
    }
}

#[test]
fn join_without_into_replaces_fields_of_the_same_name() {
    // The table's `customer` object replaces the event's, with what is under it.
    let table = "table:\n          name: customers\n          topic: customers\n          key: [id]\n          replicated: true\n          schema: {fields: [{name: id, type: string}, {name: customer.tier, type: string}]}";
    let plan = plan(
        &pipeline(
            ORDER_FIELDS,
            &format!("    - name: join\n      join:\n        {table}\n        lookupKey: [customer_id]\n        kind: Inner\n"),
        ),
        "",
    )
    .unwrap();
    let events = run(
        &plan,
        &[("customers", &[r#"{"id":"c1","customer":{"tier":"gold"}}"#])],
        ORDERS,
    );
    assert_schema_holds(&plan.sinks[0].schema, &events);
    assert!(
        !plan.sinks[0]
            .schema
            .fields
            .iter()
            .any(|f| f.name == "customer.name"),
        "the old customer.name is gone: {:?}",
        plan.sinks[0].schema
    );
}

#[test]
fn map_overwriting_an_object_and_writing_under_a_scalar() {
    let plan = plan(
        &pipeline(
            ORDER_FIELDS,
            "    - name: flatten\n      map:\n        fields:\n          - {name: customer, expression: 'customer.name', type: string}\n          - {name: amount.cents, expression: 'amount * 100.0', type: number}\n",
        ),
        "",
    )
    .unwrap();
    let events = run(&plan, &[], ORDERS);
    let schema = &plan.sinks[0].schema;
    assert_schema_holds(schema, &events);
    assert!(!schema.fields.iter().any(|f| f.name == "customer.id"));
    let amount = schema.fields.iter().find(|f| f.name == "amount").unwrap();
    assert_eq!(amount.field_type, FieldType::Object);
}

#[test]
fn project_and_extract_of_an_object_carry_what_is_under_it() {
    let plan = plan(
        &pipeline(
            ORDER_FIELDS,
            "    - name: copy\n      extract: {fields: [{name: order_id, from: /customer}]}\n    - name: slim\n      project: {fields: [{name: who, from: /order_id}, {name: id, from: /order_id/id}, {name: note, from: /missing, optional: true}]}\n",
        ),
        "",
    )
    .unwrap();
    let events = run(&plan, &[], ORDERS);
    let schema = &plan.sinks[0].schema;
    assert!(!schema.open);
    assert_schema_holds(schema, &events);
    let names: Vec<&str> = schema.fields.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["id", "note", "who", "who.id", "who.name"]);
}

#[test]
fn a_field_a_processor_replaced_away_is_refused_where_needed_and_absent_in_events() {
    let processors = "apiVersion: keystone.dev/v1alpha1\nkind: Processor\nmetadata: {name: slim, namespace: t}\nspec:\n  project:\n    fields: [{name: order_id, from: /order_id}]\n  contract:\n    schema: {effect: Replaces, fields: [{name: order_id, type: string}]}\n";
    let uses = "    - name: shape\n      processorRef: {name: slim}\n";
    let errors = plan(
        &pipeline(
            ORDER_FIELDS,
            &format!("{uses}    - name: big\n      filter: {{expression: 'amount > 5.0'}}\n"),
        ),
        processors,
    )
    .unwrap_err();
    assert_eq!(errors.0.len(), 1, "{errors}");
    assert!(
        errors.0[0].message.contains("step \"shape\""),
        "the error names the step that removed the field: {errors}"
    );
    // Without the step that needs it, the events indeed lack the field.
    let plan = plan(&pipeline(ORDER_FIELDS, uses), processors).unwrap();
    let events = run(&plan, &[], ORDERS);
    assert_schema_holds(&plan.sinks[0].schema, &events);
    assert!(events.iter().all(|e| e.get("amount").is_none()));
}
