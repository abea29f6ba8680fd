//! `spec.source.postgres`: the capture topic and configuration in the plan,
//! and what the checker refuses before any database is reached.

use keystone_crds::pipeline::capture::{Envelope, SourceColumn, SourceTable};
use keystone_crds::plan::{Partitions, TopicRole};
use keystone_crds::schema::FieldType;
use keystone_crds::{ContractErrors, Plan, compile_with_source, parse_manifests};

fn compile_source(source: &str, name: &str) -> Result<Plan, ContractErrors> {
    compile_in("shop", source, name)
}

fn compile_in(namespace: &str, source: &str, name: &str) -> Result<Plan, ContractErrors> {
    compile_in_with(namespace, source, name, None)
}

fn compile_in_with(
    namespace: &str,
    source: &str,
    name: &str,
    table: Option<&SourceTable>,
) -> Result<Plan, ContractErrors> {
    let text = format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  source:
{source}
  sinks:
    - name: out
      kafka: {{topic: orders.out}}
"#
    );
    let manifests = parse_manifests("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    compile_with_source(&manifests.pipelines[0], &[], table)
}

const KEYSTONE_SOURCE: &str = r#"    topic: orders.cdc
    key: [id]
    postgres:
      host: db.shop.svc
      database: shop
      credentialsSecret: shop-db
      tables: [public.orders]
      partitions: 3
      retention: 7d
      snapshot: {chunkSize: 500}
    schema:
      fields:
        - {name: id, type: integer}
        - {name: op, type: string}
        - {name: seq, type: integer}
        - {name: after, type: object, optional: true}
        - {name: after.status, type: string, optional: true}"#;

#[test]
fn the_capture_topic_is_created_compacted_and_the_capture_is_in_the_plan() {
    let plan = compile_source(KEYSTONE_SOURCE, "orders-cdc").unwrap_or_else(|e| panic!("{e}"));
    let source = plan
        .topics
        .iter()
        .find(|t| t.role == TopicRole::Source)
        .unwrap();
    assert_eq!(source.name, "orders.cdc");
    assert!(source.create, "the operator creates the capture topic");
    assert_eq!(source.partitions, Some(Partitions::Fixed(3)));
    assert_eq!(source.config["cleanup.policy"], "compact,delete");
    assert_eq!(source.config["retention.ms"], "604800000");
    let capture = plan.capture.expect("the plan carries the capture");
    assert_eq!(capture.topic, "orders.cdc");
    assert_eq!(capture.slot, "keystone_shop_orders_cdc");
    assert_eq!(capture.publication, "keystone_shop_orders_cdc");
    assert!(capture.create_slot && capture.create_publication);
    assert_eq!(capture.snapshot.chunk_size, 500);
    assert_eq!(capture.envelope, Envelope::Keystone);
    assert_eq!(
        capture.postgres.user, None,
        "the user comes from the Secret"
    );
    assert_eq!(capture.postgres.port, 5432);
}

#[test]
fn a_topic_source_has_no_capture_and_is_not_created() {
    let plan = compile_source(
        "    topic: orders\n    schema: {fields: [{name: id, type: string}]}",
        "plain",
    )
    .unwrap();
    assert!(plan.capture.is_none());
    assert!(
        !plan
            .topics
            .iter()
            .find(|t| t.role == TopicRole::Source)
            .unwrap()
            .create
    );
}

#[test]
fn a_keystone_envelope_needs_the_key_and_the_envelope_types() {
    let source = KEYSTONE_SOURCE
        .replace("    key: [id]\n", "")
        .replace("{name: op, type: string}", "{name: op, type: integer}");
    let errors = compile_source(&source, "orders-cdc")
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("spec.source.key: the capture topic is keyed by the table's primary key"),
        "{errors}"
    );
    assert!(
        errors.contains("field \"op\" is declared Integer, but the capture writes it as String"),
        "{errors}"
    );
}

#[test]
fn a_debezium_envelope_takes_no_key() {
    let source = KEYSTONE_SOURCE.replace(
        "      partitions: 3\n",
        "      partitions: 3\n      envelope: debezium\n",
    );
    let errors = compile_source(&source, "orders-cdc")
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("with envelope debezium the records' key is a JSON object"),
        "{errors}"
    );
}

#[test]
fn derived_names_past_postgres_limits_must_be_given() {
    let namespace = "a-team-namespace-with-a-name-long-enough-to-overflow";
    let errors = compile_in(namespace, KEYSTONE_SOURCE, "orders-cdc")
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("spec.source.postgres.publication"),
        "{errors}"
    );
    let given = KEYSTONE_SOURCE.replace(
        "      partitions: 3\n",
        "      partitions: 3\n      publication: orders_pub\n",
    );
    let plan = compile_in(namespace, &given, "orders-cdc").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.capture.unwrap().slot, "orders_pub");
}

fn orders_table(columns: &[(&str, &str, FieldType, bool)]) -> SourceTable {
    SourceTable {
        name: "public.orders".into(),
        columns: columns
            .iter()
            .map(|&(name, sql_type, field_type, primary_key)| SourceColumn {
                name: name.into(),
                sql_type: sql_type.into(),
                field_type,
                nullable: !primary_key,
                primary_key,
            })
            .collect(),
    }
}

fn compile_against(source: &str, table: &SourceTable) -> Result<Plan, ContractErrors> {
    compile_in_with("shop", source, "orders-cdc", Some(table))
}

#[test]
fn the_declared_schema_is_checked_against_the_captured_table() {
    use FieldType::*;
    let table = orders_table(&[
        ("id", "bigint", Integer, true),
        ("status", "text", String, false),
    ]);
    let plan = compile_against(KEYSTONE_SOURCE, &table).unwrap_or_else(|e| panic!("{e}"));
    let without_table = compile_source(KEYSTONE_SOURCE, "orders-cdc").unwrap();
    assert_eq!(
        plan.stages, without_table.stages,
        "a table that agrees changes only the source schema (its columns are added)"
    );
    assert_eq!(plan.topics, without_table.topics);

    // The column the schema declares was dropped: named, with the table's columns.
    let dropped = orders_table(&[
        ("id", "bigint", Integer, true),
        ("note", "text", String, false),
    ]);
    let errors = compile_against(KEYSTONE_SOURCE, &dropped)
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains(r#"spec.source.schema.fields[4]: after.status is declared, but public.orders has no column "status" (its columns: id, note)"#),
        "{errors}"
    );

    // Retyped: status is now an integer.
    let retyped = orders_table(&[
        ("id", "bigint", Integer, true),
        ("status", "integer", Integer, false),
    ]);
    let errors = compile_against(KEYSTONE_SOURCE, &retyped)
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("after.status is declared string, but column status of public.orders is integer, which the capture writes as integer"),
        "{errors}"
    );

    // Another primary key than the declared key.
    let rekeyed = orders_table(&[
        ("id", "bigint", Integer, false),
        ("order_no", "text", String, true),
        ("status", "text", String, false),
    ]);
    let errors = compile_against(KEYSTONE_SOURCE, &rekeyed)
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("spec.source.key: the capture keys events by public.orders's primary key [order_no], but key is [id]"),
        "{errors}"
    );
    assert!(
        errors
            .contains(r#""id" is a column of public.orders but not of its primary key [order_no]"#),
        "{errors}"
    );

    // A table of another name (the spec moved on) is not held against it.
    let mut other = dropped.clone();
    other.name = "public.invoices".into();
    compile_against(KEYSTONE_SOURCE, &other).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn integer_columns_satisfy_number_fields_and_json_columns_hold_nested_ones() {
    use FieldType::*;
    let source = r#"    topic: orders.cdc
    key: [id]
    postgres: {host: db, database: shop, credentialsSecret: shop-db, tables: [orders]}
    schema:
      fields:
        - {name: id, type: number}
        - {name: after.payload.customer, type: string, optional: true}
        - {name: after.total.cents, type: integer, optional: true}"#;
    let table = orders_table(&[
        ("id", "bigint", Integer, true),
        ("payload", "jsonb", Any, false),
        ("total", "numeric(12,2)", String, false),
    ]);
    let errors = compile_against(source, &table).unwrap_err().to_string();
    assert!(
        !errors.contains("fields[0]") && !errors.contains("fields[1]"),
        "{errors}"
    );
    assert!(
        errors.contains("spec.source.schema.fields[2]: after.total.cents is declared integer, but column total of public.orders is numeric(12,2), which the capture writes as string"),
        "{errors}"
    );
}

#[test]
fn table_changes_are_described_column_by_column() {
    use FieldType::*;
    let old = orders_table(&[
        ("id", "bigint", Integer, true),
        ("status", "text", String, false),
        ("note", "text", String, false),
    ]);
    let new = orders_table(&[
        ("id", "bigint", Integer, true),
        ("status", "varchar(20)", String, false),
        ("discount", "numeric(12,2)", String, false),
    ]);
    assert_eq!(
        new.changes_since(&old),
        vec![
            "column status changed from text to varchar(20)",
            "column discount numeric(12,2) added",
            "column note dropped",
        ]
    );
    assert!(old.changes_since(&old).is_empty());
}
