//! Helpers of the tests against the testbed's schema registry: its client,
//! and confluent-kafka's serializers through `e2e/readers/avro_registry.py`.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Stdio};

use keystone_avro::registry::{Registry, RegistryConfig};

/// The clicks a producer writes: its first version.
pub const CLICK_V1: &str = r#"{"type": "record", "name": "Click", "namespace": "web", "fields": [
  {"name": "id", "type": "long"},
  {"name": "user", "type": "string"},
  {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}
]}"#;

/// V1 and a new optional field: BACKWARD compatible.
pub fn click_v2() -> String {
    CLICK_V1.replace(
        r#"{"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}}"#,
        r#"{"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
  {"name": "referrer", "type": ["null", "string"], "default": null}"#,
    )
}

pub fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: start the testbed (e2e/testbed up) and eval \"$(e2e/testbed env)\""
        )
    })
}

pub fn registry() -> Registry {
    Registry::new(&RegistryConfig {
        url: var("KEYSTONE_TESTBED_REGISTRY_URL"),
        ..Default::default()
    })
    .expect("registry client")
}

/// How long one run of the Python client may take.
const PYTHON_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `e2e/readers/avro_registry.py` with `args` (and the testbed's
/// registry, for the modes that use one), `input` lines on stdin; its stdout
/// lines.
pub fn python(args: &[&str], input: &[String]) -> Vec<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/readers/avro_registry.py");
    let mut command = Command::new(var("KEYSTONE_TESTBED_LAKE_PYTHON"));
    command.arg(script).args(args);
    if !args[0].ends_with("-container") {
        command.args(["--registry", &var("KEYSTONE_TESTBED_REGISTRY_URL")]);
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python");
    // A client that hangs (it did once, on its first registry call) fails
    // the test with what it printed instead of holding the suite.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (finished, finishing) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let timed_out = matches!(
            finishing.recv_timeout(PYTHON_TIMEOUT),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        );
        if timed_out {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        timed_out
    });
    {
        let mut stdin = child.stdin.take().expect("stdin");
        for line in input {
            writeln!(stdin, "{line}").expect("write");
        }
    }
    let output = child.wait_with_output().expect("python ran");
    drop(finished);
    let timed_out = watchdog.join().expect("watchdog");
    assert!(
        !timed_out,
        "avro_registry.py {args:?} did not finish within {PYTHON_TIMEOUT:?}; it printed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "avro_registry.py {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Avro records of `values` as confluent-kafka's AvroSerializer writes them
/// for `topic` with the schema `schema` (registering it under
/// `<topic>-value` when the registry lacks it).
pub fn serialized(topic: &str, schema: &str, values: &[serde_json::Value]) -> Vec<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!(
        "avro-schema-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("schema.avsc");
    std::fs::write(&file, schema).expect("schema file");
    let lines: Vec<String> = values.iter().map(ToString::to_string).collect();
    let schema_file = file.display().to_string();
    python(
        &["serialize", "--topic", topic, "--schema-file", &schema_file],
        &lines,
    )
    .iter()
    .map(|line| unhex(line))
    .collect()
}
