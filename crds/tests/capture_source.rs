//! `spec.source.postgres`: the capture topic and configuration in the plan,
//! and what the checker refuses before any database is reached.

use keystone_crds::pipeline::capture::Envelope;
use keystone_crds::plan::{Partitions, TopicRole};
use keystone_crds::{ContractErrors, Plan, compile, parse_manifests};

fn compile_source(source: &str, name: &str) -> Result<Plan, ContractErrors> {
    compile_in("shop", source, name)
}

fn compile_in(namespace: &str, source: &str, name: &str) -> Result<Plan, ContractErrors> {
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
    compile(&manifests.pipelines[0], &[])
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
