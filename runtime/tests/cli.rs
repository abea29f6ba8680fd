//! The `keystone-runtime` binary: `check` exit codes on the bundled samples and on
//! broken manifests, its located diagnostics as text and JSON, `plan`, and `run`
//! on a sample in local mode.

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
        // An Avro source is checked against its reader schema: the sample's
        // own, as `data/<sample>.avsc` (no registry is reachable here).
        let avro = std::fs::read_to_string(&sample)
            .unwrap()
            .contains("format: avro");
        let out = if avro {
            let stem = sample.file_stem().unwrap().to_string_lossy().into_owned();
            let schema = repo().join(format!("config/samples/data/{stem}.avsc"));
            bin()
                .arg("check")
                .args([&sample, &processors])
                .arg("--schema-file")
                .arg(&schema)
                .output()
                .unwrap()
        } else {
            check(&[&sample, &processors])
        };
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
        assert_eq!(
            stdout.contains("source schema: the Avro schema"),
            avro,
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
    let at = |line: usize, column: usize| format!("{}:{line}:{column}: ", file.display());
    assert!(
        lines[0].starts_with(&format!(
            "{}spec.steps[0] (once): needs field \"event_id\"",
            at(13, 7)
        )),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with(&format!(
            "{}spec.steps[1].order.sequence (in-order):",
            at(16, 36)
        )),
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
    // At the bracket left open, not at the end of the file where it is noticed.
    assert_eq!(
        stderr,
        format!("{}:3:18: unclosed bracket '['\n", file.display())
    );

    let missing = check(&[Path::new("/nonexistent/pipeline.yaml")]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr).starts_with("/nonexistent/pipeline.yaml:1:1: cannot read: "),
        "{}",
        text(&missing.stderr)
    );
}

/// BROKEN with, in its source: a misspelt field.
fn misspelt() -> String {
    BROKEN.replace("topic: in", "topic: in\n    startFrm: Earliest")
}

#[test]
fn check_reports_every_problem_of_every_document_and_file() {
    // a.yaml: a syntax error in its first document, an unknown field in its
    // second; b.yaml: a malformed duration, an unknown enum value, and a
    // pipeline whose contract is broken. Nothing hides anything else.
    let a = scratch(
        "every-a.yaml",
        &format!("kind: [Pipeline\n---{}", misspelt()),
    );
    let b = scratch(
        "every-b.yaml",
        &format!(
            "{}---{}---{}",
            BROKEN.replace("window: 1m", "window: 10 minutes"),
            BROKEN
                .replace("broken}", "unordered}")
                .replace("maxDelay: 1s}", "maxDelay: 1s, onStale: Dropp}"),
            BROKEN.replace("broken}", "broken-too}")
        ),
    );
    let out = check(&[&a, &b]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a syntax error: not all could be read"
    );
    let stderr = text(&out.stderr);
    let a = a.display().to_string();
    let b = b.display().to_string();
    let expected = [
        format!("{a}:1:7: unclosed bracket '['"),
        format!("{a}:9:5: spec.source.startFrm: unknown field"),
        "  hint: did you mean `startFrom`?".to_owned(),
        format!(
            "{b}:14:40: spec.steps[0].dedup.window: Invalid value: \"10 minutes\": should match "
        ),
        "  hint: a duration: a number and a unit (ms, s, m, h, d), for example 500ms".to_owned(),
        format!("{b}:35:64: spec.steps[1].order.onStale: Unsupported value: \"Dropp\""),
        "  hint: did you mean `Drop`? (allowed values: ".to_owned(),
        format!("{b}:51:7: spec.steps[0] (once): needs field \"event_id\""),
        format!("{b}:54:36: spec.steps[1].order.sequence (in-order): "),
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for (line, expected) in lines.iter().zip(&expected) {
        assert!(
            line.starts_with(expected.as_str()),
            "{line:?} should start with {expected:?}\n{stderr}"
        );
    }
}

#[test]
fn check_output_json() {
    let file = scratch("json.yaml", &misspelt());
    let out = bin()
        .args(["check", "--output", "json"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    // Fields in the documented order, for people reading it raw.
    assert!(
        text(&out.stdout).starts_with("{\"diagnostics\":[{\"file\":"),
        "{}",
        text(&out.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let diagnostics = report["diagnostics"].as_array().unwrap();
    assert_eq!(diagnostics.len(), 1, "{report}");
    assert_eq!(
        diagnostics[0],
        serde_json::json!({
            "file": file.display().to_string(),
            "line": 8,
            "column": 5,
            "path": "spec.source.startFrm",
            "step": null,
            "kind": "schema",
            "message": "unknown field",
            "hint": "did you mean `startFrom`?",
        })
    );

    // Contract errors name their step; fields with nothing to say are null.
    let file = scratch("json-contract.yaml", BROKEN);
    let out = bin()
        .args(["check", "--output", "json"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = &report["diagnostics"][0];
    assert_eq!(first["line"], 13);
    assert_eq!(first["column"], 7);
    assert_eq!(first["path"], "spec.steps[0]");
    assert_eq!(first["step"], "once");
    assert_eq!(first["kind"], "missing-field");
    assert!(first["hint"].is_null());
    let keys: Vec<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "column", "file", "hint", "kind", "line", "message", "path", "step"
        ]
    );

    // Valid manifests: an empty list, status 0.
    let processors = repo().join("config/samples/processors.yaml");
    let sample = repo().join("config/samples/orders-cdc-to-search.yaml");
    let out = bin()
        .args(["check", "--output", "json"])
        .arg(&sample)
        .arg(&processors)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report, serde_json::json!({"diagnostics": []}));
}

#[test]
fn plan_prints_what_serve_reads() {
    let sample = repo().join("config/samples/orders-cdc-to-search.yaml");
    let out = bin().arg("plan").arg(&sample).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let plan: keystone_crds::Plan = serde_json::from_slice(&out.stdout).unwrap();

    // The same plan the library compiles, and the operator's serialization of it.
    let text_of = std::fs::read_to_string(&sample).unwrap();
    let manifests = keystone_crds::parse_manifests("s.yaml", &text_of).unwrap();
    let compiled = keystone_crds::compile(&manifests.pipelines[0], &manifests.processors).unwrap();
    assert_eq!(plan.hash(), compiled.hash());
    assert_eq!(
        text(&out.stdout),
        format!("{}\n", serde_json::to_string_pretty(&compiled).unwrap())
    );

    // `serve --plan` reads it, for every stage.
    assert!(!plan.stages.is_empty());
    #[cfg(feature = "kafka")]
    {
        let file = scratch("plan.json", &text(&out.stdout));
        for stage in &plan.stages {
            let (loaded, found) = keystone_runtime::host::load_plan(&file, &stage.name)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(loaded.hash(), plan.hash());
            assert_eq!(found.name, stage.name);
        }
    }
}

#[test]
fn plan_needs_one_pipeline_and_a_valid_one() {
    let two = scratch(
        "two.yaml",
        &format!(
            "{}---{}",
            BROKEN,
            BROKEN
                .replace("broken}", "fine}")
                .replace("key: [event_id]", "key: [id]")
                .replace("{name: seq, type: string}", "{name: seq, type: integer}")
        ),
    );
    let out = bin().arg("plan").arg(&two).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("choose one with --pipeline"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());

    let out = bin()
        .args(["plan", "--pipeline", "fine"])
        .arg(&two)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let plan: keystone_crds::Plan = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan.pipeline, "fine");

    let out = bin()
        .args(["plan", "--pipeline", "broken"])
        .arg(&two)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(
        text(&out.stderr).starts_with(&format!("{}:13:7: spec.steps[0] (once): ", two.display())),
        "{}",
        text(&out.stderr)
    );
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

/// An output naming an input (directly, by a symlink or by a hard link) or
/// another output is refused before anything is written: the input is intact
/// and the exit status is 2.
#[test]
fn run_refuses_outputs_that_are_inputs() {
    let dir = repo().join("config/samples");
    let pipeline = dir.join("orders-cdc-to-search.yaml");
    let original = std::fs::read(dir.join("data/orders-cdc.jsonl")).unwrap();
    let input = scratch("same-input.jsonl", &text(&original));
    let scratch_dir = input.parent().unwrap().to_path_buf();
    let symlink = scratch_dir.join("same-input-symlink.jsonl");
    let hard = scratch_dir.join("same-input-hard.jsonl");
    let _ = std::fs::remove_file(&symlink);
    let _ = std::fs::remove_file(&hard);
    std::os::unix::fs::symlink(&input, &symlink).unwrap();
    std::fs::hard_link(&input, &hard).unwrap();
    let elsewhere = scratch_dir.join("same-elsewhere.jsonl");
    let run = |extra: &[&std::ffi::OsStr]| {
        bin()
            .arg("run")
            .arg(&pipeline)
            .arg("--input")
            .arg(&input)
            .args(extra)
            .output()
            .unwrap()
    };
    let cases: Vec<(Vec<&std::ffi::OsStr>, &str)> = vec![
        (vec!["--output".as_ref(), input.as_os_str()], "--output"),
        (vec!["-o".as_ref(), symlink.as_os_str()], "--output"),
        (
            vec!["--dead-letters".as_ref(), hard.as_os_str()],
            "--dead-letters",
        ),
        (vec!["-o".as_ref(), pipeline.as_os_str()], "--output"),
    ];
    for (extra, flag) in cases {
        let out = run(&extra);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(
            stderr.starts_with(flag) && stderr.contains("would destroy the input"),
            "{extra:?}: {stderr}"
        );
        assert_eq!(std::fs::read(&input).unwrap(), original, "{extra:?}");
    }
    let _ = std::fs::remove_file(&elsewhere);
    let out = run(&[
        "-o".as_ref(),
        elsewhere.as_os_str(),
        "--dead-letters".as_ref(),
        elsewhere.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("is the same file as --output"),
        "{}",
        text(&out.stderr)
    );
    assert!(!elsewhere.exists(), "nothing is created when refused");
    // Devices are not files to protect: both outputs may go to /dev/null.
    let out = run(&[
        "-o".as_ref(),
        "/dev/null".as_ref(),
        "--dead-letters".as_ref(),
        "/dev/null".as_ref(),
        "--quiet".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
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
    assert!(
        text(&out.stderr).starts_with(&format!(
            "{}:13:7: spec.steps[0] (once): needs field \"event_id\"",
            broken.display()
        )),
        "{}",
        text(&out.stderr)
    );

    // Manifest problems too, all of them, located.
    let misspelt = scratch("misspelt-run.yaml", &misspelt());
    let out = bin()
        .arg("run")
        .arg(&misspelt)
        .args(["--input", "-"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        format!(
            "{}:8:5: spec.source.startFrm: unknown field\n  hint: did you mean `startFrom`?\n",
            misspelt.display()
        )
    );
}

/// A step can make an event larger than any input (here a `map` doubling a
/// 600,000-byte field): such an event is a dead letter of step `sinks`, with
/// its size and original, whether it would go to `--output` or to a routed
/// sink, and the events after it are written.
#[test]
fn run_dead_letters_events_the_steps_grew_past_the_record_limit() {
    let pipeline = scratch(
        "grow.yaml",
        r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: grow, namespace: tests}
spec:
  source:
    topic: in
    schema:
      fields:
        - {name: id, type: string}
        - {name: payload, type: string}
  steps:
    - name: twice
      map:
        fields:
          - {name: payload, expression: 'payload + payload', type: string}
  sinks:
    - name: out
      kafka: {topic: out}
"#,
    );
    let large = format!(r#"{{"id":"large","payload":"{}"}}"#, "x".repeat(600_000));
    let input = scratch(
        "grow-in.jsonl",
        &format!(
            "{}\n{large}\n{}\n",
            r#"{"id":"before","payload":"ab"}"#, r#"{"id":"after","payload":"cd"}"#
        ),
    );
    for routed in [false, true] {
        let output = scratch(&format!("grow-out-{routed}.jsonl"), "");
        let dead = scratch(&format!("grow-dead-{routed}.jsonl"), "");
        let mut command = bin();
        command.arg("run").arg(&pipeline).arg("--input").arg(&input);
        if routed {
            command
                .arg("--sink")
                .arg(format!("out={}", output.display()));
        } else {
            command.arg("--output").arg(&output);
        }
        let out = command.arg("--dead-letters").arg(&dead).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let written: Vec<serde_json::Value> = std::fs::read_to_string(&output)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            written,
            [
                serde_json::json!({"id": "before", "payload": "abab"}),
                serde_json::json!({"id": "after", "payload": "cdcd"}),
            ],
            "routed: {routed}"
        );
        let letters: Vec<serde_json::Value> = std::fs::read_to_string(&dead)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(letters.len(), 1, "routed: {routed}");
        assert_eq!(letters[0]["step"], "sinks");
        assert_eq!(letters[0]["original"], large.as_str());
        let grown = r#"{"id":"large","payload":""}"#.len() + 1_200_000;
        assert_eq!(
            letters[0]["reason"],
            format!(
                "the event is {grown} bytes after the steps, larger than the limit of 1000000 bytes for a record a stage writes"
            ),
            "routed: {routed}"
        );
    }
}

/// A binary built without the lake sinks (the quick start's) runs a pipeline
/// with lake sinks locally, their events going to `--output`, but refuses to
/// connect one, naming the feature it lacks, before it reads any input.
#[cfg(not(feature = "lake"))]
#[test]
fn connecting_a_lake_sink_needs_the_lake_feature() {
    let dir = repo().join("config/samples");
    let run = |extra: &[&str]| {
        let output = scratch("lake-out.jsonl", "");
        let out = bin()
            .arg("run")
            .arg(dir.join("clickstream-etl.yaml"))
            .arg("--input")
            .arg(dir.join("data/clicks.jsonl"))
            .arg("--output")
            .arg(&output)
            .args(["--dead-letters", "-", "--quiet"])
            .args(extra)
            .output()
            .unwrap();
        (out, std::fs::read_to_string(&output).unwrap())
    };
    let (out, events) = run(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        events.lines().count() > 0,
        "the sinks' events reach --output"
    );

    let (out, events) = run(&["--connect", "lake"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let error = text(&out.stderr);
    assert!(
        error.contains("\"lake\" is a parquet sink") && error.contains("`lake` feature"),
        "{error}"
    );
    assert_eq!(events, "", "nothing is written");
}
