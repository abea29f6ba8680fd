//! The CRDs on a real kube-apiserver: they install, every sample is accepted
//! with server-side field validation, and invalid manifests are rejected with
//! the messages of the schema and its CEL rules.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use keystone_e2e::Testbed;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(mut cmd: Command, stdin: Option<&str>) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl runs");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn install_crds(testbed: &Testbed) {
    let mut apply = testbed.kubectl().unwrap();
    apply.args([
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=keystone-e2e",
        "-f",
    ]);
    apply.arg(repo().join("crds"));
    let out = run(apply, None);
    assert!(
        out.status.success(),
        "applying crds/ failed: {}",
        text(&out)
    );
    let mut wait = testbed.kubectl().unwrap();
    wait.args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/pipelines.keystone.dev",
        "crd/processors.keystone.dev",
    ]);
    let out = run(wait, None);
    assert!(out.status.success(), "CRDs not established: {}", text(&out));
}

/// `kubectl apply --server-side` of `manifest` into `namespace`.
fn apply(testbed: &Testbed, namespace: &str, manifest: &str, dry_run: bool) -> Output {
    let mut cmd = testbed.kubectl().unwrap();
    cmd.args([
        "apply",
        "--server-side",
        "--field-manager=keystone-e2e",
        "--validate=strict",
        "-n",
        namespace,
        "-f",
        "-",
    ]);
    if dry_run {
        cmd.arg("--dry-run=server");
    }
    run(cmd, Some(manifest))
}

fn in_namespace(manifest: &str, namespace: &str) -> String {
    manifest.replace("namespace: default", &format!("namespace: {namespace}"))
}

#[tokio::test]
async fn every_sample_is_accepted_by_the_api_server() {
    let testbed = Testbed::from_env().await.expect("testbed");
    install_crds(&testbed).await;
    let ns = testbed.namespace("crd-samples").await.unwrap();
    let samples = repo().join("config/samples");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&samples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    names.sort();
    assert!(names.len() >= 5, "samples: {names:?}");
    for path in names {
        let manifest = in_namespace(&std::fs::read_to_string(&path).unwrap(), ns.name());
        let out = apply(&testbed, ns.name(), &manifest, false);
        assert!(
            out.status.success(),
            "{} rejected: {}",
            path.display(),
            text(&out)
        );
    }
    // `kubectl get` shows the printer columns.
    let mut get = testbed.kubectl().unwrap();
    get.args(["get", "pipelines", "-n", ns.name()]);
    let out = run(get, None);
    let listing = text(&out);
    for column in [
        "NAME",
        "PHASE",
        "READY",
        "SOURCE",
        "CHECKPOINT",
        "AGE",
        "orders.cdc",
    ] {
        assert!(
            listing.contains(column),
            "`kubectl get pipelines` lacks {column}:\n{listing}"
        );
    }
    // Short names and the category work.
    for resource in ["ksp", "ksproc", "keystone"] {
        let mut get = testbed.kubectl().unwrap();
        get.args(["get", resource, "-n", ns.name(), "-o", "name"]);
        let out = run(get, None);
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "kubectl get {resource}: {}",
            text(&out)
        );
    }
    ns.delete().await.unwrap();
}

const VALID: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: p
spec:
  source:
    topic: in
    key: [id]
    schema:
      fields: [{name: id, type: string}, {name: seq, type: integer}]
  steps:
    - name: dedup
      dedup: {key: [id], window: 10m}
  sinks:
    - name: out
      kafka: {topic: out, partitions: 3}
"#;

#[tokio::test]
async fn invalid_manifests_are_rejected_with_messages_that_say_what_to_fix() {
    let testbed = Testbed::from_env().await.expect("testbed");
    install_crds(&testbed).await;
    let ns = testbed.namespace("crd-invalid").await.unwrap();

    let ok = apply(&testbed, ns.name(), VALID, true);
    assert!(
        ok.status.success(),
        "the valid base is rejected: {}",
        text(&ok)
    );

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "duplicate step names",
            VALID.replace(
                "  sinks:\n",
                "    - name: dedup\n      filter: {expression: 'true'}\n  sinks:\n",
            ),
            "step names must be unique within a pipeline",
        ),
        (
            "source topic is also a sink",
            VALID.replace("kafka: {topic: out, partitions: 3}", "kafka: {topic: in}"),
            "the source topic cannot also be a Kafka sink topic",
        ),
        (
            "two operators in one step",
            VALID.replace(
                "      dedup: {key: [id], window: 10m}\n",
                "      dedup: {key: [id], window: 10m}\n      filter: {expression: 'true'}\n",
            ),
            "each step sets exactly one of processorRef, filter, map, project, extract, dedup, order, join, enrich or rekey",
        ),
        (
            "a sink of no kind",
            VALID.replace("      kafka: {topic: out, partitions: 3}\n", ""),
            "each sink sets exactly one of kafka, elasticsearch, iceberg or parquet",
        ),
        (
            "a malformed duration",
            VALID.replace("window: 10m", "window: 10 minutes"),
            "spec.steps[0].dedup.window: Invalid value: \"10 minutes\": spec.steps[0].dedup.window in body should match '^([0-9]+(ms|s|m|h|d))+$'",
        ),
        (
            "parallelism below one",
            VALID.replace("  sinks:\n", "  parallelism: 0\n  sinks:\n"),
            "spec.parallelism: Invalid value: 0: spec.parallelism in body should be greater than or equal to 1",
        ),
        (
            "an unknown delivery mode",
            VALID.replace("  sinks:\n", "  delivery: ExactlyTwice\n  sinks:\n"),
            "spec.delivery: Unsupported value: \"ExactlyTwice\"",
        ),
        (
            "a misspelled field (strict field validation)",
            VALID.replace("partitions: 3", "partitons: 3"),
            ".spec.sinks[name=\"out\"].kafka.partitons: field not declared in schema",
        ),
        (
            "duplicate sink names",
            VALID.replace(
                "      kafka: {topic: out, partitions: 3}\n",
                "      kafka: {topic: out, partitions: 3}\n    - name: out\n      kafka: {topic: other}\n",
            ),
            ".spec.sinks: duplicate entries for key [name=\"out\"]",
        ),
    ];
    let mut failures = Vec::new();
    for (name, manifest, expected) in &cases {
        let out = apply(&testbed, ns.name(), manifest, true);
        let message = text(&out);
        if out.status.success() || !message.contains(expected) {
            failures.push(format!(
                "{name}: expected rejection containing {expected:?}, got (success={}): {message}",
                out.status.success()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    ns.delete().await.unwrap();
}

#[tokio::test]
async fn sink_partitions_can_be_raised_but_never_lowered() {
    let testbed = Testbed::from_env().await.expect("testbed");
    install_crds(&testbed).await;
    let ns = testbed.namespace("crd-partitions").await.unwrap();
    let created = apply(&testbed, ns.name(), VALID, false);
    assert!(created.status.success(), "{}", text(&created));

    let raised = apply(
        &testbed,
        ns.name(),
        &VALID.replace("partitions: 3", "partitions: 6"),
        false,
    );
    assert!(
        raised.status.success(),
        "raising partitions was rejected: {}",
        text(&raised)
    );

    let lowered = apply(
        &testbed,
        ns.name(),
        &VALID.replace("partitions: 3", "partitions: 2"),
        false,
    );
    let message = text(&lowered);
    assert!(
        !lowered.status.success(),
        "lowering partitions was accepted: {message}"
    );
    assert!(
        message.contains("partitions can only be raised: Kafka cannot remove partitions without losing their data"),
        "{message}"
    );
    ns.delete().await.unwrap();
}

// ---- `check` and the API server cannot drift ----
//
// Cases are generated from the CRDs' openAPIV3Schema: for every node of a set
// of valid base manifests (the samples and two bases that set every field), one
// mutation per constraint that violates it (null, wrong type, outside the enum,
// too short, too long, pattern mismatch, below the minimum, above the maximum,
// a fraction for an integer, too few or too many items, a duplicate map-list
// key, a missing required field, an unknown field) and one per bound that sits
// exactly on it. The CEL rules, which no generic mutation can be relied on to
// break, come from an explicit table (`rule_cases`), as do metadata and status.
// Each case is sent to the API server as a dry-run create with strict field
// validation, and `keystone_crds::validate::validate` must refuse exactly the
// cases the server refuses.

use keystone_crds::validate::{Origin, crd_schema, validate};
use serde_json::{Value as Json, json};

/// A base with every Pipeline field set, so that the walk reaches every node.
const WIDE_PIPELINE: &str = r#"
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
const WIDE_PROCESSOR: &str = r#"
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

#[derive(Clone, Debug)]
enum Edit {
    Set(String, Json),
    Remove(String),
}

#[derive(Clone, Debug)]
struct Case {
    name: String,
    kind: &'static str,
    document: Json,
    /// Constructed to satisfy the bound it sits on (the server should accept it).
    boundary: bool,
}

fn yaml_documents(text: &str) -> Vec<Json> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
        .filter(|d: &Json| !d.is_null())
        .collect()
}

fn kind_of(document: &Json) -> &'static str {
    match document["kind"].as_str() {
        Some("Pipeline") => "Pipeline",
        Some("Processor") => "Processor",
        other => panic!("not a Keystone kind: {other:?}"),
    }
}

/// The valid bases: every sample and the two wide bases, without a namespace
/// (the test's namespace is the request's).
fn bases() -> Vec<(String, Json)> {
    let mut bases = Vec::new();
    let samples = repo().join("config/samples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&samples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        for (i, document) in yaml_documents(&text).into_iter().enumerate() {
            bases.push((format!("{stem}#{i}"), document));
        }
    }
    bases.push((
        "wide-pipeline".into(),
        yaml_documents(WIDE_PIPELINE).remove(0),
    ));
    bases.push((
        "wide-processor".into(),
        yaml_documents(WIDE_PROCESSOR).remove(0),
    ));
    for (_, base) in &mut bases {
        base["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("namespace");
    }
    bases
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn edited(document: &Json, edit: &Edit) -> Json {
    let mut document = document.clone();
    let (pointer, value) = match edit {
        Edit::Set(p, v) => (p, Some(v.clone())),
        Edit::Remove(p) => (p, None),
    };
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let key = key.replace("~1", "/").replace("~0", "~");
    match (document.pointer_mut(parent).unwrap(), value) {
        (Json::Object(map), Some(v)) => {
            map.insert(key, v);
        }
        (Json::Object(map), None) => {
            map.remove(&key);
        }
        (Json::Array(items), Some(v)) => items[key.parse::<usize>().unwrap()] = v,
        (Json::Array(items), None) => {
            items.remove(key.parse::<usize>().unwrap());
        }
        (other, _) => panic!("{pointer}: parent is {other}"),
    }
    document
}

/// A string of exactly `n` characters that matches `pattern`, if one of a few
/// shapes does; without a pattern, two-byte characters, so that a length the
/// server counts in characters is told apart from one in bytes.
fn fill(n: usize, pattern: Option<&regex::Regex>) -> Option<String> {
    let Some(pattern) = pattern else {
        return Some("é".repeat(n));
    };
    let candidates = [
        "a".repeat(n),
        format!("{}s", "1".repeat(n.saturating_sub(1))),
        format!("/{}", "a".repeat(n.saturating_sub(1))),
        format!("http://{}", "a".repeat(n.saturating_sub(7))),
    ];
    candidates
        .into_iter()
        .find(|c| c.chars().count() == n && pattern.is_match(c))
}

/// A value of another type than `schema` declares.
fn wrong_type(schema: &Json) -> Json {
    match schema.get("type").and_then(Json::as_str) {
        Some("string") => json!(12345),
        Some("integer") | Some("number") | Some("boolean") | Some("object") | Some("array") => {
            json!("not-this-type")
        }
        _ => json!(true),
    }
}

fn member_schema<'s>(schema: &'s Json, key: &str) -> Option<&'s Json> {
    schema
        .get("properties")
        .and_then(|p| p.get(key))
        .or_else(|| schema.get("additionalProperties").filter(|a| a.is_object()))
}

/// The mutations of the node at `pointer` (value `value`, schema `schema`) and of
/// every node below it, as (label, edit, boundary).
fn mutations(value: &Json, schema: &Json, pointer: &str, out: &mut Vec<(String, Edit, bool)>) {
    let mut push = |label: &str, edit: Edit, boundary: bool| {
        out.push((format!("{pointer} {label}"), edit, boundary));
    };
    let set = |v: Json| Edit::Set(pointer.to_owned(), v);
    push("null", set(Json::Null), false);
    push("wrong type", set(wrong_type(schema)), false);
    if schema.get("enum").is_some() {
        push("not in enum", set(json!("NotInTheEnum")), false);
    }
    let number = |key: &str| schema.get(key).and_then(Json::as_f64);
    match value {
        Json::String(_) => {
            let pattern = schema
                .get("pattern")
                .and_then(Json::as_str)
                .map(|p| regex::Regex::new(p).unwrap());
            if pattern.is_some() {
                push("pattern mismatch", set(json!("no match!")), false);
            }
            let p = pattern.as_ref();
            if let Some(min) = number("minLength").map(|m| m as usize) {
                if min > 0
                    && let Some(s) = fill(min - 1, p).or_else(|| fill(min - 1, None))
                {
                    push(
                        &format!("length {} < minLength", min - 1),
                        set(json!(s)),
                        false,
                    );
                }
                if let Some(s) = fill(min, p).filter(|_| min > 0) {
                    push(&format!("length {min} = minLength"), set(json!(s)), true);
                }
            }
            if let Some(max) = number("maxLength").map(|m| m as usize) {
                if let Some(s) = fill(max, p) {
                    push(&format!("length {max} = maxLength"), set(json!(s)), true);
                }
                if let Some(s) = fill(max + 1, p).or_else(|| fill(max + 1, None)) {
                    push(
                        &format!("length {} > maxLength", max + 1),
                        set(json!(s)),
                        false,
                    );
                }
            }
        }
        Json::Number(_) => {
            let integer = schema.get("type").and_then(Json::as_str) == Some("integer");
            if let Some(min) = number("minimum") {
                push("minimum - 1", set(json!(min as i64 - 1)), false);
                push("= minimum", set(json!(min as i64)), true);
            }
            if let Some(max) = number("maximum") {
                push("= maximum", set(json!(max as i64)), true);
                push("maximum + 1", set(json!(max as i64 + 1)), false);
            }
            if integer {
                push("a fraction", set(json!(2.5)), false);
                push(
                    "an integral float",
                    set(json!(2.0)),
                    number("minimum").is_none_or(|m| m <= 2.0)
                        && number("maximum").is_none_or(|m| m >= 2.0),
                );
            }
        }
        Json::Array(items) => {
            let resized = |n: usize| -> Option<Json> {
                let template = items.first()?;
                Some(Json::Array(
                    (0..n)
                        .map(|i| {
                            let mut item = items.get(i).unwrap_or(template).clone();
                            // Keep names unique (map-list keys, step names).
                            if i >= items.len()
                                && let Some(name) = item.get_mut("name")
                                && name.is_string()
                            {
                                *name = json!(format!("n{i}"));
                            }
                            item
                        })
                        .collect(),
                ))
            };
            if let Some(min) = number("minItems").map(|m| m as usize)
                && min > 0
            {
                push(
                    &format!("{} < minItems", min - 1),
                    set(Json::Array(items[..min - 1].to_vec())),
                    false,
                );
            }
            if let Some(max) = number("maxItems").map(|m| m as usize) {
                if let Some(v) = resized(max) {
                    push(&format!("{max} = maxItems"), set(v), true);
                }
                if let Some(v) = resized(max + 1) {
                    push(&format!("{} > maxItems", max + 1), set(v), false);
                }
            }
            if schema.get("x-kubernetes-list-type").and_then(Json::as_str) == Some("map")
                && let Some(first) = items.first()
            {
                let mut doubled = items.clone();
                doubled.push(first.clone());
                push("duplicate map key", set(Json::Array(doubled)), false);
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    mutations(item, item_schema, &format!("{pointer}/{i}"), out);
                }
            }
        }
        Json::Object(map) => {
            for key in schema
                .get("required")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
                .filter_map(Json::as_str)
            {
                if map.contains_key(key) {
                    out.push((
                        format!("{pointer}/{key} removed (required)"),
                        Edit::Remove(format!("{pointer}/{}", escape(key))),
                        false,
                    ));
                }
            }
            if schema.get("x-kubernetes-preserve-unknown-fields") != Some(&Json::Bool(true)) {
                // An unknown field, or in a map an entry of the wrong type.
                out.push((
                    format!("{pointer} unknown field"),
                    Edit::Set(format!("{pointer}/unknownField"), json!(true)),
                    false,
                ));
            }
            for (key, child) in map {
                if let Some(child_schema) = member_schema(schema, key) {
                    mutations(
                        child,
                        child_schema,
                        &format!("{pointer}/{}", escape(key)),
                        out,
                    );
                }
            }
        }
        Json::Bool(_) | Json::Null => {}
    }
}

/// Cases for the CEL rules, metadata and status, per base kind (pointers into the wide bases).
fn rule_cases(pipeline: &Json, processor: &Json) -> Vec<Case> {
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

fn generate_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let bases = bases();
    for (base_name, base) in &bases {
        let kind = kind_of(base);
        cases.push(Case {
            name: format!("{base_name}: as it is"),
            kind,
            document: base.clone(),
            boundary: true,
        });
        let schema = crd_schema(kind).unwrap();
        let mut found = Vec::new();
        mutations(
            &base["spec"],
            &schema["properties"]["spec"],
            "/spec",
            &mut found,
        );
        for (label, edit, boundary) in found {
            cases.push(Case {
                name: format!("{base_name}: {label}"),
                kind,
                document: edited(base, &edit),
                boundary,
            });
        }
    }
    let wide = |name: &str| &bases.iter().find(|(n, _)| n == name).unwrap().1;
    cases.extend(rule_cases(wide("wide-pipeline"), wide("wide-processor")));
    cases
}

/// A dry-run create with strict field validation: Ok, or the server's refusal.
async fn dry_run_create(client: &kube::Client, namespace: &str, case: &Case) -> Result<(), String> {
    let plural = match case.kind {
        "Pipeline" => "pipelines",
        _ => "processors",
    };
    let url = format!("/apis/keystone.dev/v1alpha1/namespaces/{namespace}/{plural}");
    let params = kube::api::PostParams {
        dry_run: true,
        field_manager: None,
    };
    let body = serde_json::to_vec(&case.document).unwrap();
    let mut request = kube::core::Request::new(url).create(&params, body).unwrap();
    // PostParams has no field validation; without it the server would only warn.
    let uri = format!("{}&fieldValidation=Strict", request.uri());
    *request.uri_mut() = uri.parse().unwrap();
    match client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if matches!(status.code, 400 | 422) => Err(status.message),
        Err(e) => panic!("{}: the request failed: {e}", case.name),
    }
}

#[tokio::test]
async fn check_refuses_exactly_what_the_api_server_refuses_on_cases_generated_from_the_schema() {
    use futures::StreamExt;

    let testbed = Testbed::from_env().await.expect("testbed");
    install_crds(&testbed).await;
    let ns = testbed.namespace("crd-drift").await.unwrap();
    let client = testbed.client().unwrap();
    let cases = generate_cases();
    let started = std::time::Instant::now();
    let results: Vec<(Case, Result<(), String>)> = futures::stream::iter(cases)
        .map(|case| {
            let client = client.clone();
            let namespace = ns.name().to_owned();
            async move {
                let result = dry_run_create(&client, &namespace, &case).await;
                (case, result)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;

    let mut mismatches = Vec::new();
    let (mut refused, mut boundary_accepted, mut boundary_refused) = (0, 0, 0);
    for (case, server) in &results {
        let local: Vec<String> = validate(case.kind, &case.document)
            .into_iter()
            .filter(|v| v.origin == Origin::ApiServer)
            .map(|v| format!("{}: {}", v.path, v.message))
            .collect();
        refused += usize::from(server.is_err());
        if case.boundary {
            if server.is_ok() {
                boundary_accepted += 1;
            } else {
                boundary_refused += 1;
            }
        }
        if server.is_err() == local.is_empty() {
            mismatches.push(format!(
                "{}\n    server: {}\n    check:  {}",
                case.name,
                match server {
                    Ok(()) => "accepted".to_owned(),
                    Err(message) => format!("refused: {message}"),
                },
                if local.is_empty() {
                    "accepted".to_owned()
                } else {
                    format!("refused: {}", local.join(" | "))
                }
            ));
        }
    }
    println!(
        "{} cases in {:.1?}: the server refused {refused}; {boundary_accepted} boundary cases accepted, {boundary_refused} refused; {} mismatches",
        results.len(),
        started.elapsed(),
        mismatches.len()
    );
    mismatches.sort();
    assert!(
        mismatches.is_empty(),
        "check and the API server disagree on {} of {} cases:\n{}",
        mismatches.len(),
        results.len(),
        mismatches.join("\n")
    );
    // The generator must keep producing both kinds of case, or the test proves nothing.
    assert!(results.len() > 1000, "only {} cases", results.len());
    assert!(
        refused > 500 && boundary_accepted > 100,
        "refused {refused}, boundary accepted {boundary_accepted}"
    );
    ns.delete().await.unwrap();
}
