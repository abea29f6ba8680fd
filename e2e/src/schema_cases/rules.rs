//! The wide base manifests, which set every field, and the explicit cases for
//! what no generic mutation can be relied on to break: the CEL rules,
//! metadata and status.

use serde_json::{Value as Json, json};

use super::mutations::edited;
use super::{Case, Edit};

/// A base with every Pipeline field set, so that the walk reaches every node.
pub(super) const WIDE_PIPELINE: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: wide, labels: {team: data}}
spec:
  source:
    cluster: main
    topic: orders
    format: json
    key: [id]
    startFrom: Latest
    schema:
      open: false
      fields:
        - {name: id, type: string}
        - {name: seq, type: integer, optional: true}
  steps:
    - {name: f, filter: {expression: 'true'}, parallelism: 2}
    - {name: m, map: {fields: [{name: total, expression: '1', type: integer}]}}
    - {name: p, project: {fields: [{name: id, from: /id, optional: true}]}}
    - {name: x, extract: {fields: [{name: y, from: /y}]}}
    - {name: d, dedup: {key: [id], window: 10m, eventTimeField: ts}}
    - name: o
      order: {key: [id], sequence: seq, maxDelay: 5s, maxBuffered: 10, contiguous: true, firstSequence: 0, onStale: DeadLetter}
    - name: j
      join:
        table:
          name: t
          topic: customers
          cluster: main
          key: [id]
          schema: {open: true, fields: [{name: id, type: string}]}
          replicated: true
        lookupKey: [id]
        kind: Left
        fields: [name]
        into: customer
    - name: e
      enrich:
        table: {name: t2, topic: regions, key: [id], schema: {fields: [{name: id, type: string}]}}
        lookupKey: [id]
        fields: [name]
        into: extra
    - {name: r, rekey: {key: [id]}}
    - {name: pr, processorRef: {name: proc}}
  sinks:
    - name: k
      kafka:
        cluster: main
        topic: out
        key: [id]
        create: true
        partitions: 3
        replicationFactor: 1
        config: {retention.ms: "1000"}
        preserveOrder: true
    - name: es
      elasticsearch:
        endpoint: https://search:9200
        index: orders
        idFields: [id]
        versionField: seq
        deleteWhen: op == "d"
        createIndex: false
        indexSettings: {number_of_replicas: "0"}
        credentialsSecret: es-credentials
        caSecret: es-ca
        bulkSize: 10
        bulkBytes: 2048
        maxInFlightBytes: 4096
    - name: ice
      iceberg:
        catalog: {type: rest, uri: "http://catalog", warehouse: "s3://w", credentialsSecret: cat}
        namespace: analytics
        table: orders
        partitionBy: [id]
        commitInterval: 1m
    - name: pq
      parquet: {path: "s3://b/p", partitionBy: [id], rollInterval: 1m, credentialsSecret: store}
  parallelism: 2
  delivery: AtLeastOnce
  commitInterval: 2s
  checkpointInterval: 1m
  checkpointTrigger: "123"
  checkpointRetention: 3
  state: Suspended
  restore: {checkpoint: c1, nonce: n}
  deadLetter: {topic: dlq, retention: 7d}
  allowRepartition: false
  upgrade:
    mode: Stateless
    strategy: Recreate
    allowStateReset: true
    rollbackOnFailure: false
    healthWindow: 1m
    healthGate: {maxRestarts: 0, maxDeadLetterPercent: 5, maxConsumerLag: 100}
    startFrom: Latest
  topicDeletionPolicy: Delete
  runtimeImage: "registry.example/keystone:1"
  resources:
    limits: {cpu: "1", memory: 1Gi}
    requests: {cpu: 500m, memory: 1}
    claims: [{name: gpu, request: r}]
"#;

/// A base with every Processor field set.
pub(super) const WIDE_PROCESSOR: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Processor
metadata: {name: wide-proc}
spec:
  description: reorders
  order: {key: [id], sequence: seq, maxDelay: 5s}
  contract:
    requires: [{name: id, type: string}]
    schema: {effect: Adds, fields: [{name: z, type: integer, optional: true}]}
    keys: {effect: Rekeys, key: [id], requiresOrderBy: [id]}
    state: {keyedBy: [id]}
"#;

/// Cases for the CEL rules, metadata and status, per base kind (pointers into the wide bases).
pub(super) fn rule_cases(pipeline: &Json, processor: &Json) -> Vec<Case> {
    let p = |name: &str, edits: &[Edit], boundary: bool| Case {
        name: format!("rule: {name}"),
        kind: "Pipeline",
        document: edits.iter().fold(pipeline.clone(), |d, e| edited(&d, e)),
        boundary,
    };
    let set = |pointer: &str, v: Json| Edit::Set(pointer.to_owned(), v);
    let remove = |pointer: &str| Edit::Remove(pointer.to_owned());
    let mut cases = vec![
        p(
            "duplicate step names",
            &[set("/spec/steps/1/name", json!("f"))],
            false,
        ),
        p(
            "source topic as a Kafka sink on the same cluster",
            &[set("/spec/sinks/0/kafka/topic", json!("orders"))],
            false,
        ),
        p(
            "source topic as a Kafka sink, both on the default cluster",
            &[
                set("/spec/sinks/0/kafka/topic", json!("orders")),
                remove("/spec/sinks/0/kafka/cluster"),
                remove("/spec/source/cluster"),
            ],
            false,
        ),
        p(
            "source topic as a Kafka sink on another cluster",
            &[
                set("/spec/sinks/0/kafka/topic", json!("orders")),
                set("/spec/sinks/0/kafka/cluster", json!("other")),
            ],
            true,
        ),
        p(
            "a step with two operators",
            &[set("/spec/steps/0/rekey", json!({"key": ["id"]}))],
            false,
        ),
        p(
            "a step with no operator",
            &[remove("/spec/steps/0/filter")],
            false,
        ),
        p(
            "a step with its operator null",
            &[set("/spec/steps/0/filter", Json::Null)],
            false,
        ),
        p(
            "a step with a second operator null",
            &[set("/spec/steps/0/rekey", Json::Null)],
            true,
        ),
        p(
            "a sink with two kinds",
            &[set("/spec/sinks/0/parquet", json!({"path": "s3://b"}))],
            false,
        ),
        p("a sink of no kind", &[remove("/spec/sinks/0/kafka")], false),
        p(
            "a sink with a second kind null",
            &[set("/spec/sinks/0/parquet", Json::Null)],
            true,
        ),
        p("no steps at all", &[remove("/spec/steps")], true),
        // Metadata.
        p(
            "name with capitals",
            &[set("/metadata/name", json!("Wide"))],
            false,
        ),
        p(
            "name too long",
            &[set("/metadata/name", json!("a".repeat(254)))],
            false,
        ),
        p(
            "name of 253 characters",
            &[set("/metadata/name", json!("a".repeat(253)))],
            true,
        ),
        p(
            "name with dots (Keystone refuses it, the server does not)",
            &[set("/metadata/name", json!("a.b"))],
            true,
        ),
        p("no name", &[remove("/metadata/name")], false),
        p(
            "generateName instead of a name",
            &[
                remove("/metadata/name"),
                set("/metadata/generateName", json!("wide-")),
            ],
            true,
        ),
        p(
            "a label value with a space",
            &[set("/metadata/labels/team", json!("a b"))],
            false,
        ),
        p(
            "a label key with two slashes",
            &[set("/metadata/labels/a~1b~1c", json!("x"))],
            false,
        ),
        p(
            "an unknown metadata field",
            &[set("/metadata/nmae", json!("x"))],
            false,
        ),
        p(
            "an annotation",
            &[set(
                "/metadata/annotations",
                json!({"example.com/note": "any text"}),
            )],
            true,
        ),
        // Status: a create drops it, after strict field validation.
        p(
            "an unknown status field",
            &[set("/status", json!({"phaze": "Running"}))],
            false,
        ),
        p(
            "a status value outside its enum",
            &[set("/status", json!({"phase": "Nonsense"}))],
            true,
        ),
    ];
    let q = |name: &str, edits: &[Edit], boundary: bool| Case {
        name: format!("rule: {name}"),
        kind: "Processor",
        document: edits.iter().fold(processor.clone(), |d, e| edited(&d, e)),
        boundary,
    };
    cases.push(q(
        "a processor with two operators",
        &[set("/spec/filter", json!({"expression": "true"}))],
        false,
    ));
    cases.push(q(
        "a processor with no operator",
        &[remove("/spec/order")],
        false,
    ));
    cases.push(q(
        "a processor with dots in its name",
        &[set("/metadata/name", json!("a.b"))],
        true,
    ));
    cases
}
