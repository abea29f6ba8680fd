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
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("Warning"),
        "applying crds/ warned: {}",
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
async fn sink_partitions_can_be_raised_and_a_lower_value_is_left_to_the_operator() {
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
    // Going back to a lower value is what a GitOps sync does after someone
    // raised it by hand: the API server takes it and the operator reports
    // that the topic keeps its partitions (operator_pipeline tests that).
    let lowered = apply(
        &testbed,
        ns.name(),
        &VALID.replace("partitions: 3", "partitions: 2"),
        false,
    );
    assert!(
        lowered.status.success(),
        "lowering partitions was refused: {}",
        text(&lowered)
    );
    ns.delete().await.unwrap();
}

/// Writing the CRDs prints no warning, as a server-side apply and as the
/// whole-object update a client-side apply (Argo CD's default) sends: an
/// unknown `format` such as "uint32" printed one on every apply.
#[tokio::test]
async fn applying_the_crds_prints_no_warning() {
    let testbed = Testbed::from_env().await.expect("testbed");
    install_crds(&testbed).await;
    for verb in [
        &["apply", "--server-side", "--force-conflicts"][..],
        &["replace"][..],
    ] {
        let mut write = testbed.kubectl().unwrap();
        write.args(verb).args(["--dry-run=server", "-f"]);
        write.arg(repo().join("crds"));
        let out = run(write, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{verb:?}: {}", text(&out));
        assert!(
            stderr.trim().is_empty(),
            "kubectl {verb:?} of crds/ printed: {stderr}"
        );
    }
}

// ---- `check` and the API server cannot drift ----
//
// The cases come from `keystone_e2e::schema_cases`, which generates them from
// the CRDs' openAPIV3Schema (see its documentation).

use keystone_crds::validate::{Origin, crd_schema, validate};
use keystone_e2e::schema_cases::{Case, dry_run_create, generate_cases};

#[tokio::test]
async fn check_refuses_exactly_what_the_api_server_refuses_on_cases_generated_from_the_schema() {
    use futures::StreamExt;

    let testbed = Testbed::from_env().await.expect("testbed");
    install_crds(&testbed).await;
    let ns = testbed.namespace("crd-drift").await.unwrap();
    let client = testbed.client().unwrap();
    let cases = generate_cases(crd_schema);
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
