//! A `postgres` source's schema comes from its capture: the envelope's
//! fields always, the table's columns once the capture described the table,
//! so steps are checked against the real columns and a column added or
//! dropped is an upgrade the classifier judges. The capture alone compiles
//! without the steps, for the operator to run it before the table is known.

use keystone_crds::pipeline::capture::{SourceColumn, SourceTable};
use keystone_crds::schema::{FieldType, SchemaSpec};
use keystone_crds::upgrade::{ChangeClass, classify};
use keystone_crds::{
    ContractErrors, ErrorKind, Plan, compile_capture, compile_with_source, parse_manifests,
};

fn pipeline(schema: &str, steps: &str) -> keystone_crds::Pipeline {
    let text = format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: orders-cdc, namespace: shop}}
spec:
  source:
    topic: orders.cdc
    key: [id]
    postgres:
      host: db.shop.svc
      database: shop
      credentialsSecret: shop-db
      tables: [orders]
{schema}
  steps:
{steps}
  sinks:
    - name: out
      kafka: {{topic: orders.out}}
"#
    );
    let mut manifests = parse_manifests("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    manifests.pipelines.remove(0)
}

const BIG_ORDERS: &str = r#"    - name: big
      filter: {expression: 'after.quantity > 10'}"#;

fn orders(extra: &[(&str, &str, FieldType)]) -> SourceTable {
    let mut columns = vec![
        ("id", "bigint", FieldType::Integer),
        ("status", "text", FieldType::String),
        ("quantity", "integer", FieldType::Integer),
    ];
    columns.extend_from_slice(extra);
    SourceTable {
        name: "public.orders".into(),
        columns: columns
            .into_iter()
            .map(|(name, sql_type, field_type)| SourceColumn {
                name: name.into(),
                sql_type: sql_type.into(),
                field_type,
                nullable: name != "id",
                primary_key: name == "id",
            })
            .collect(),
    }
}

fn compile(
    p: &keystone_crds::Pipeline,
    table: Option<&SourceTable>,
) -> Result<Plan, ContractErrors> {
    compile_with_source(p, &[], table)
}

fn field(schema: &SchemaSpec, name: &str) -> Option<(FieldType, bool)> {
    schema
        .fields
        .iter()
        .find(|f| f.name == name)
        .map(|f| (f.field_type, f.optional))
}

#[test]
fn without_a_schema_the_steps_are_checked_against_the_tables_columns() {
    let p = pipeline("", BIG_ORDERS);
    let unknown = compile(&p, None).expect_err("the key is unknown without the table");
    assert!(
        unknown.0.iter().any(|e| e.path == "spec.source.key[0]"
            && e.message.contains("\"id\"")
            && e.message
                .contains("declare the key to check without the database")),
        "{unknown}"
    );

    let plan = compile(&p, Some(&orders(&[]))).unwrap_or_else(|e| panic!("{e}"));
    let schema = &plan.source.schema;
    assert_eq!(field(schema, "id"), Some((FieldType::Integer, false)));
    assert_eq!(field(schema, "op"), Some((FieldType::String, false)));
    assert_eq!(field(schema, "ts"), Some((FieldType::Timestamp, false)));
    assert_eq!(
        field(schema, "source.lsn"),
        Some((FieldType::String, false))
    );
    // Inserts have no before, deletes no after: the columns there are optional.
    assert_eq!(
        field(schema, "after.quantity"),
        Some((FieldType::Integer, true))
    );
    assert_eq!(
        field(schema, "before.status"),
        Some((FieldType::String, true))
    );
    assert_eq!(
        field(schema, "status"),
        None,
        "only the key at the top level"
    );
}

#[test]
fn a_step_that_needs_another_type_than_the_column_is_refused() {
    let p = pipeline(
        "",
        r#"    - name: paid
      filter: {expression: 'after.status > 10'}"#,
    );
    let errors = compile(&p, Some(&orders(&[]))).expect_err("status is text");
    assert!(
        errors.0.iter().any(|e| e.path.starts_with("spec.steps[0]")
            && matches!(e.kind, ErrorKind::WrongType | ErrorKind::InvalidExpression)
            && e.message.contains("after.status")),
        "{errors}"
    );
}

#[test]
fn declared_fields_win_and_json_members_stay_the_users() {
    let p = pipeline(
        r#"    schema:
      fields:
        - {name: after.meta.kind, type: string, optional: true}
        - {name: ts, type: integer}"#,
        BIG_ORDERS,
    );
    let table = orders(&[("meta", "jsonb", FieldType::Any)]);
    let plan = compile(&p, Some(&table)).unwrap_or_else(|e| panic!("{e}"));
    let schema = &plan.source.schema;
    assert_eq!(field(schema, "ts"), Some((FieldType::Integer, false)));
    assert_eq!(
        field(schema, "after.meta"),
        None,
        "the declared members describe the json column"
    );
    assert_eq!(
        field(schema, "after.meta.kind"),
        Some((FieldType::String, true))
    );
    assert_eq!(
        field(schema, "before.meta"),
        Some((FieldType::Any, true)),
        "undeclared there"
    );
    assert_eq!(
        schema.fields.iter().filter(|f| f.name == "ts").count(),
        1,
        "declared once, not derived again"
    );
}

#[test]
fn a_column_added_or_dropped_is_an_upgrade_and_a_used_one_dropped_is_refused() {
    let p = pipeline("", BIG_ORDERS);
    let before = compile(&p, Some(&orders(&[]))).unwrap();
    let added = compile(&p, Some(&orders(&[("note", "text", FieldType::String)]))).unwrap();
    assert_ne!(before.hash(), added.hash());
    // The same table described again changes nothing.
    assert_eq!(
        compile(&p, Some(&orders(&[]))).unwrap().hash(),
        before.hash()
    );
    match classify(&before, &added) {
        ChangeClass::Upgrade { reasons } => {
            // The new column flows through to the sink too.
            assert!(
                reasons.contains(&"the source schema changed".to_owned()),
                "{reasons:?}"
            );
        }
        other => panic!("adding a column: {other:?}"),
    }
    // A step that needs the column, once the table has dropped it.
    let p = pipeline(
        "",
        r#"    - name: quantities
      project:
        fields:
          - {name: id, from: /id}
          - {name: quantity, from: /after/quantity}"#,
    );
    compile(&p, Some(&orders(&[]))).unwrap_or_else(|e| panic!("{e}"));
    let mut without_quantity = orders(&[]);
    without_quantity.columns.retain(|c| c.name != "quantity");
    let errors = compile(&p, Some(&without_quantity)).expect_err("the step needs quantity");
    assert!(
        errors
            .0
            .iter()
            .any(|e| e.path.starts_with("spec.steps[0]") && e.message.contains("after.quantity")),
        "{errors}"
    );
}

#[test]
fn a_table_the_spec_does_not_capture_is_not_used() {
    let p = pipeline("", BIG_ORDERS);
    let mut other = orders(&[]);
    other.name = "public.customers".into();
    assert!(compile(&p, Some(&other)).is_err());
}

#[test]
fn the_capture_compiles_alone_without_the_steps_or_the_table() {
    // The steps need columns nobody declared; the capture does not.
    let p = pipeline("", BIG_ORDERS);
    let plan = compile_capture(&p).unwrap_or_else(|e| panic!("{e}"));
    assert!(plan.stages.is_empty() && plan.sinks.is_empty());
    assert_eq!(plan.topics.len(), 1);
    assert_eq!(plan.topics[0].name, "orders.cdc");
    assert!(plan.topics[0].create);
    let capture = plan.capture.expect("the capture");
    assert_eq!(capture.tables, vec!["orders".to_owned()]);

    // Its own problems are still refused.
    let mut keyless = p.clone();
    keyless.spec.source.key.clear();
    let errors = compile_capture(&keyless).expect_err("no key");
    assert!(
        errors.0.iter().any(|e| e.path == "spec.source.key"),
        "{errors}"
    );
    let mut plain = p;
    plain.spec.source.postgres = None;
    assert!(compile_capture(&plain).is_err(), "no capture to run");
}
