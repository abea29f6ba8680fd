//! The `keystone-runtime` binary: `check` exit codes on the bundled samples and on
//! broken manifests, and `run` on a sample in local mode.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_keystone-runtime"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn samples() -> Vec<PathBuf> {
    let dir = repo().join("config/samples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("processors.yaml"))
        .collect();
    files.sort();
    files
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn scratch(name: &str, content: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path
}

fn check(files: &[&Path]) -> Output {
    bin().arg("check").args(files).output().unwrap()
}

#[test]
fn check_accepts_every_sample() {
    let processors = repo().join("config/samples/processors.yaml");
    let files = samples();
    assert!(!files.is_empty());
    for sample in files {
        let out = check(&[&sample, &processors]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            sample.display(),
            text(&out.stderr)
        );
        let stdout = text(&out.stdout);
        assert!(stdout.starts_with("pipeline "), "{stdout}");
        assert!(
            stdout.contains("stages:") && stdout.contains("topics:"),
            "{stdout}"
        );
    }
}

const BROKEN: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: broken}
spec:
  source:
    topic: in
    schema:
      fields:
        - {name: id, type: string}
        - {name: seq, type: string}
  steps:
    - name: once
      dedup: {key: [event_id], window: 1m}
    - name: in-order
      order: {key: [id], sequence: seq, maxDelay: 1s}
  sinks:
    - name: out
      kafka: {topic: out}
"#;

#[test]
fn check_prints_contract_errors_one_per_line_with_status_1() {
    let file = scratch("broken.yaml", BROKEN);
    let out = check(&[&file]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with("spec.steps[0] (once): needs field \"event_id\""),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("spec.steps[1].order.sequence (in-order):"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn check_reports_yaml_errors_with_line_and_column_and_status_2() {
    let file = scratch(
        "syntax.yaml",
        "apiVersion: keystone.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: [x\n",
    );
    let out = check(&[&file]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("syntax.yaml:4:1:"), "{stderr}");

    let unknown = scratch(
        "unknown.yaml",
        &BROKEN.replace("topic: in", "topic: in\n    partitons: 3"),
    );
    let out = check(&[&unknown]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("unknown field spec.source.partitons"),
        "{}",
        text(&out.stderr)
    );

    let missing = check(&[Path::new("/nonexistent/pipeline.yaml")]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn run_a_sample_locally() {
    let dir = repo().join("config/samples");
    let output = scratch("cdc-out.jsonl", "");
    let dead = scratch("cdc-dead.jsonl", "");
    let out = bin()
        .args(["run"])
        .arg(dir.join("orders-cdc-to-search.yaml"))
        .arg("--input")
        .arg(dir.join("data/orders-cdc.jsonl"))
        .arg("--output")
        .arg(&output)
        .arg("--dead-letters")
        .arg(&dead)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let summary = text(&out.stderr);
    for step in [
        "source",
        "drop-redeliveries",
        "in-order",
        "to-document",
        "events/s",
    ] {
        assert!(summary.contains(step), "{summary}");
    }
    let events = std::fs::read_to_string(&output).unwrap();
    assert!(events.lines().count() > 0);
    for line in events.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["order_id"].is_string() && v["seq"].is_i64(), "{line}");
    }
    for line in std::fs::read_to_string(&dead).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["reason"].is_string() && v["step"].is_string() && v["original"].is_string());
    }
}

#[test]
fn run_reads_stdin_and_refuses_invalid_pipelines() {
    use std::io::Write;
    let pipeline = scratch(
        "pass.yaml",
        "apiVersion: keystone.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: pass}\nspec:\n  source:\n    topic: in\n    schema: {fields: [{name: id, type: integer}]}\n  steps:\n    - name: big\n      filter: {expression: 'id > 1'}\n  sinks:\n    - name: out\n      kafka: {topic: out}\n",
    );
    let mut child = bin()
        .arg("run")
        .arg(&pipeline)
        .args(["--input", "-", "--output", "-", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"id\":1}\n{\"id\":2}\n{\"id\":\"x\"}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "{\"id\":2}\n");
    assert!(
        text(&out.stderr).contains("\"step\":\"source\""),
        "dead letters go to stderr"
    );

    let broken = scratch("broken-run.yaml", BROKEN);
    let out = bin()
        .arg("run")
        .arg(&broken)
        .args(["--input", "-"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("needs field \"event_id\""));
}
