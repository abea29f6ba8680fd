//! `spec.source.http`: the ingest endpoint in the plan, its topic created by
//! the operator, the idempotency field in the source schema, and what the
//! checker and the schema refuse.

use keystone_crds::plan::{Partitions, TopicRole};
use keystone_crds::schema::FieldType;
use keystone_crds::{ContractErrors, Plan, compile, parse_manifests};

fn manifest(source: &str, steps: &str) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: clicks, namespace: web}}
spec:
  source:
{source}
  steps:
{steps}
  sinks:
    - name: out
      kafka: {{topic: clicks.out}}
"#
    )
}

fn compile_source(source: &str, steps: &str) -> Result<Plan, ContractErrors> {
    let manifests =
        parse_manifests("p.yaml", &manifest(source, steps)).unwrap_or_else(|e| panic!("{e}"));
    compile(&manifests.pipelines[0], &[])
}

const HTTP_SOURCE: &str = r#"    topic: web.clicks
    key: [user]
    http:
      path: /v1/clicks
      tokensSecret: clicks-tokens
      idempotencyField: rid
      partitions: 6
      rateLimit: {recordsPerSecond: 1000}
    schema:
      fields:
        - {name: user, type: string}
        - {name: page, type: string}"#;

const DEDUP: &str = "    - name: once\n      dedup: {key: [rid], window: 10m}";

#[test]
fn the_endpoint_is_in_the_plan_and_its_topic_is_created() {
    let plan = compile_source(HTTP_SOURCE, DEDUP).unwrap_or_else(|e| panic!("{e}"));
    let ingest = plan.ingest.as_ref().expect("the plan's ingest");
    assert_eq!(ingest.path, "/v1/clicks");
    assert_eq!(ingest.tokens_secret, "clicks-tokens");
    assert_eq!(ingest.max_body_bytes, 10 << 20, "defaulted");
    assert_eq!(ingest.replicas, 2, "defaulted");
    let topic = plan
        .topics
        .iter()
        .find(|t| t.role == TopicRole::Source)
        .expect("a source topic");
    assert_eq!(topic.name, "web.clicks");
    assert!(topic.create, "the operator creates an HTTP source's topic");
    assert_eq!(topic.partitions, Some(Partitions::Fixed(6)));
    // The stamped field is a string on every record: steps may key on it.
    let rid = plan
        .source
        .schema
        .fields
        .iter()
        .find(|f| f.name == "rid")
        .expect("rid in the source schema");
    assert_eq!((rid.field_type, rid.optional), (FieldType::String, false));
}

#[test]
fn a_topic_source_has_no_endpoint() {
    let source = "    topic: web.clicks\n    key: [user]\n    schema: {fields: [{name: user, type: string}]}";
    let plan = compile_source(source, "    []").unwrap_or_else(|e| panic!("{e}"));
    assert!(plan.ingest.is_none());
    assert!(
        plan.topics
            .iter()
            .all(|t| t.role != TopicRole::Source || !t.create)
    );
}

#[test]
fn an_idempotency_field_declared_other_than_a_string_is_refused() {
    let source = HTTP_SOURCE.replace(
        "        - {name: page, type: string}",
        "        - {name: page, type: string}\n        - {name: rid, type: integer}",
    );
    let error = compile_source(&source, "    []")
        .expect_err("refused")
        .to_string();
    assert!(
        error.contains("spec.source.http.idempotencyField")
            && error.contains("declare it a string"),
        "{error}"
    );
}

#[test]
fn postgres_and_http_together_are_refused_by_the_schema() {
    let source = HTTP_SOURCE.replace(
        "    http:",
        "    postgres: {host: db, database: shop, credentialsSecret: s, tables: [orders]}\n    http:",
    );
    let refused = parse_manifests("p.yaml", &manifest(&source, "    []"))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        refused.contains("set at most one of postgres and http"),
        "{refused:?}"
    );
}
