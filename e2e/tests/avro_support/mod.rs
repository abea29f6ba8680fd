//! Helpers of the tests against the testbed's schema registry: its client,
//! and confluent-kafka's serializers through `e2e/readers/avro_registry.py`.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

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

/// A TCP forwarder to the registry that can be shut: while shut it refuses
/// new connections and has cut the open ones (a network partition).
pub struct Gate {
    pub port: u16,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Gate {
    /// The registry's URL through the gate.
    pub fn url(&self) -> String {
        let (_, path) = registry_address();
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn start(target: SocketAddr) -> Self {
        let listener = StdListener::bind("127.0.0.1:0").expect("bind the gate");
        let port = listener.local_addr().expect("address").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let open = Arc::new(AtomicBool::new(true));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (task_open, task_connections) = (open.clone(), connections.clone());
        // Its own runtime and thread: the test's thread blocks on Kafka.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    if !task_open.load(Ordering::SeqCst) {
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    task_connections
                        .lock()
                        .expect("lock")
                        .push(task.abort_handle());
                }
            });
        });
        Self {
            port,
            open,
            connections,
        }
    }

    pub fn shut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for connection in self.connections.lock().expect("lock").drain(..) {
            connection.abort();
        }
    }

    pub fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// The registry's address and API path, from the testbed's URL.
pub fn registry_address() -> (SocketAddr, String) {
    let url = var("KEYSTONE_TESTBED_REGISTRY_URL");
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').expect("a path");
    (host.parse().expect("host:port"), format!("/{path}"))
}
