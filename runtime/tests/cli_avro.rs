//! `check` and `plan` of a pipeline that reads Avro: its steps are checked
//! against the reader schema of `--schema-file` (or a registry's), the text
//! output names that schema, and an Avro source whose schema cannot be had
//! is a diagnostic, not a check against the declared schema.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keystone-runtime"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn scratch(name: &str, content: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_avro");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn run(args: &[&str], files: &[&Path]) -> Output {
    bin()
        .args(args)
        .args(files)
        // No credentials of the machine's environment reach the registry.
        .env_remove("KEYSTONE_REGISTRY_USERNAME")
        .env_remove("KEYSTONE_REGISTRY_TOKEN")
        .env_remove("KEYSTONE_REGISTRY_TOKEN_FILE")
        .output()
        .unwrap()
}

/// A pipeline on Avro `orders`, writing Avro, whose filter reads `field`;
/// `registry` is its `spec.schemaRegistry` line (or none).
fn pipeline(name: &str, field: &str, registry: &str) -> String {
    format!(
        r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: shop}}
spec:
{registry}
  source:
    topic: orders
    format: avro
    key: [id]
  steps:
    - {{name: big, filter: {{expression: '{field} > 100'}}}}
  sinks:
    - name: out
      kafka: {{topic: orders.big, format: avro, keyFormat: avro}}
"#
    )
}

const REGISTRY: &str = "  schemaRegistry: {url: \"http://registry.kafka.svc:8081\"}";

const ORDERS_AVSC: &str = r#"{"type": "record", "name": "Order", "namespace": "shop", "fields": [
  {"name": "id", "type": "string"},
  {"name": "amount", "type": "double"},
  {"name": "note", "type": ["null", "string"], "default": null}
]}"#;

/// The schema, in a file of its own for each test (they run in parallel).
fn schema_file(test: &str) -> PathBuf {
    scratch(&format!("{test}.avsc"), ORDERS_AVSC)
}

#[test]
fn a_field_the_schema_file_lacks_is_refused_naming_the_schema() {
    let file = scratch("total.yaml", &pipeline("orders", "total", REGISTRY));
    let avsc = schema_file("total");
    let avsc_arg = avsc.display().to_string();
    let out = run(
        &["check", "--schema-file", &avsc_arg, "--schema-version", "3"],
        &[&file],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:11:7: spec.steps[0] (big): needs field \"total\"",
            file.display()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "the source schema is the Avro schema orders-value version 3 (from file {avsc_arg})"
        )),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn a_valid_pipeline_passes_and_names_its_source_schema() {
    let file = scratch("amount.yaml", &pipeline("orders", "amount", REGISTRY));
    let avsc = schema_file("amount");
    let avsc_arg = avsc.display().to_string();
    let out = run(&["check", "--schema-file", &avsc_arg], &[&file]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(stdout.starts_with("pipeline shop/orders "), "{stdout}");
    assert!(
        stdout.lines().any(|line| line
            == format!(
                "orders: source schema: the Avro schema orders-value version 1 (from file {avsc_arg})"
            )),
        "{stdout}"
    );
    // Named for one pipeline, the same.
    let named = format!("orders={avsc_arg}");
    let out = run(&["check", "--schema-file", &named], &[&file]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // A name no pipeline has is a usage error.
    let out = run(
        &["check", "--schema-file", &format!("other={avsc_arg}")],
        &[&file],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no Pipeline named \"other\""),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_avro_source_without_its_schema_is_not_checked_against_the_declared_one() {
    let file = scratch("unreachable.yaml", &pipeline("orders", "amount", REGISTRY));
    // Nothing listens on port 9 of loopback.
    let out = run(&["check", "--registry", "http://127.0.0.1:9"], &[&file]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "no plan: {}", text(&out.stdout));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with(&format!(
            "{}:8:13: spec.source.format: format: avro: cannot get the Avro schema orders-value (the latest version): the schema registry at http://127.0.0.1:9/ is unavailable",
            file.display()
        )),
        "{stderr}"
    );
    assert!(
        lines[1].contains("hint: pass --schema-file") && lines[1].contains("--registry URL"),
        "{stderr}"
    );
    // As JSON, a diagnostic like the others.
    let out = run(
        &[
            "check",
            "--registry",
            "http://127.0.0.1:9",
            "--output",
            "json",
        ],
        &[&file],
    );
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let diagnostic = &report["diagnostics"][0];
    assert_eq!(diagnostic["path"], "spec.source.format");
    assert_eq!(diagnostic["kind"], "source-schema");
    // No file and no registry to ask at all.
    let file = scratch("no-registry.yaml", &pipeline("orders", "amount", ""));
    let out = run(&["check"], &[&file]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("spec.source.format: format: avro: the steps are checked against the source's reader schema, the Avro schema orders-value (the latest version), which cannot be had: no --schema-file is given, and neither --registry nor spec.schemaRegistry names a registry to ask"),
        "{stderr}"
    );
}

#[test]
fn plan_fills_the_avro_parts() {
    let file = scratch("plan.yaml", &pipeline("orders", "amount", REGISTRY));
    let avsc = schema_file("plan");
    let out = run(
        &[
            "plan",
            "--schema-file",
            &avsc.display().to_string(),
            "--schema-version",
            "2",
        ],
        &[&file],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let source = &plan["source"]["avro"];
    assert_eq!(source["readerSchema"], ORDERS_AVSC, "{plan:#}");
    assert_eq!(source["subject"], "orders-value");
    assert_eq!(source["version"], 2);
    assert_eq!(source["registryUrl"], "http://registry.kafka.svc:8081");
    let sink = &plan["sinks"][0]["avro"];
    assert_eq!(sink["subject"], "orders.big-value", "{plan:#}");
    let written: serde_json::Value = serde_json::from_str(
        sink["writer"]["register"]["schema"]
            .as_str()
            .unwrap_or_else(|| panic!("{plan:#}")),
    )
    .unwrap();
    assert_eq!(written["type"], "record");
    let fields: Vec<&str> = written["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["amount", "id", "note"]);
    // The key (the stream's, `id`) as the key field's type, under <topic>-key.
    let key = &plan["sinks"][0]["avroKey"];
    assert_eq!(key["subject"], "orders.big-key", "{plan:#}");
    assert_eq!(
        key["writer"]["register"]["schema"], r#""string""#,
        "{plan:#}"
    );
    // Without the schema, no plan.
    let out = run(&["plan", "--registry", "http://127.0.0.1:9"], &[&file]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).contains("spec.source.format"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_manifests_own_reader_schema_is_checked_without_a_file_or_registry() {
    // The schema written in the manifest, and no registry reachable here.
    let inline = |field: &str| {
        pipeline("orders", field, REGISTRY).replace(
            "    format: avro\n",
            &format!(
                "    format: avro\n    avro:\n      schema: '{}'\n",
                ORDERS_AVSC.replace('\n', " ")
            ),
        )
    };
    let passes = scratch("inline-amount.yaml", &inline("amount"));
    let out = run(&["check"], &[&passes]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout
            .lines()
            .any(|line| line == "orders: source schema: the Avro schema of spec.source.avro.schema"),
        "{stdout}"
    );
    let fails = scratch("inline-total.yaml", &inline("total"));
    let out = run(&["check"], &[&fails]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("spec.steps[0] (big): needs field \"total\"")
            && stderr.contains("the source schema is the Avro schema of spec.source.avro.schema"),
        "{stderr}"
    );
}
