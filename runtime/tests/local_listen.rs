//! `keystone-runtime run --listen`: events `curl`ed into a local pipeline are
//! checked at the door, processed and written before the answer, and a stop
//! signal flushes the steps and prints the summary.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const MANIFEST: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: clicks}
spec:
  source:
    topic: clicks
    key: [user]
    schema:
      fields:
        - {name: user, type: string}
        - {name: action, type: string}
        - {name: seq, type: integer}
  steps:
    - name: buys
      filter: {expression: 'action == "buy"'}
    - name: in-order
      order: {key: [user], sequence: seq, maxDelay: 1s}
  sinks: [{name: out, kafka: {topic: buys}}]
"#;

fn scratch(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("local_listen")
        .join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), MANIFEST).unwrap();
    dir
}

/// The running binary and the URL its endpoint listens on.
struct Listening {
    child: Child,
    url: String,
    stderr: BufReader<std::process::ChildStderr>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn listen(dir: &Path) -> Listening {
    listen_with(dir, Command::new(env!("CARGO_BIN_EXE_keystone-runtime")))
}

/// `listen`, the binary run by `command` (`prlimit … BINARY`).
fn listen_with(dir: &Path, mut command: Command) -> Listening {
    let mut child = command
        .arg("run")
        .arg(dir.join("pipeline.yaml"))
        .args(["--listen", "127.0.0.1:0", "--output"])
        .arg(dir.join("out.jsonl"))
        .arg("--dead-letters")
        .arg(dir.join("dead.jsonl"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .trim_end_matches(':')
        .to_owned();
    Listening { child, url, stderr }
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn post(url: &str, content_type: &str, body: &str) -> (u16, Value) {
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .post(url)
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn events_posted_to_a_local_pipeline_are_processed_before_the_answer() {
    let dir = scratch("processed");
    let mut listening = listen(&dir);
    let body = concat!(
        "{\"user\":\"ann\",\"action\":\"buy\",\"seq\":1}\n",
        "{\"user\":\"ann\",\"action\":\"view\",\"seq\":2}\n",
        "{\"user\":\"bob\",\"action\":\"buy\",\"seq\":1}\n",
    );
    let (status, reply) = post(&listening.url, "application/x-ndjson", body).await;
    assert_eq!((status, reply), (200, json!({"accepted": 3})));
    // The order step holds events up to maxDelay; no dead letters and only
    // the buys, once released.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lines(&dir.join("out.jsonl")).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the buys never reached the output"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = lines(&dir.join("out.jsonl"));
    let users: Vec<&str> = out.iter().map(|e| e["user"].as_str().unwrap()).collect();
    assert_eq!(users.len(), 2, "{out:?}");
    assert!(users.contains(&"ann") && users.contains(&"bob"), "{out:?}");

    // Refused at the door: nothing of the batch enters the pipeline.
    let (status, reply) = post(
        &listening.url,
        "application/json",
        r#"[{"user":"cy","action":"buy","seq":1},{"user":"cy","action":"buy","seq":"two"}]"#,
    )
    .await;
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["errors"][0]["field"], "seq");
    assert_eq!(reply["errors"][0]["index"], 1);

    // A stop signal: the steps are flushed, the summary printed, exit 0.
    let stopped = Command::new("kill")
        .args(["-TERM", &listening.child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = listening.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no exit within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut listening.stderr, &mut rest).unwrap();
    assert!(
        rest.contains("3 events in, 2 out, 0 dead letters"),
        "{rest}"
    );
    assert!(lines(&dir.join("dead.jsonl")).is_empty());
}

#[tokio::test]
async fn a_manifests_http_source_sets_the_local_endpoints_path_and_idempotency_key() {
    let dir = scratch("http-source");
    let manifest = MANIFEST.replace(
        "    key: [user]\n",
        "    key: [user]\n    http: {path: /v1/clicks, tokensSecret: unused-locally, idempotencyField: rid}\n",
    );
    std::fs::write(dir.join("pipeline.yaml"), manifest).unwrap();
    let listening = listen(&dir);
    assert!(listening.url.ends_with("/v1/clicks"), "{}", listening.url);
    let one = r#"{"user":"ann","action":"buy","seq":1}"#;
    let (status, reply) = post(&listening.url, "application/json", one).await;
    assert_eq!(status, 400, "no Idempotency-Key: {reply}");
    let response = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
        .post(&listening.url)
        .header("idempotency-key", "r-9")
        .body(one)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lines(&dir.join("out.jsonl")).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the event never reached the output"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(lines(&dir.join("out.jsonl"))[0]["rid"], "r-9/0");
}

#[tokio::test]
async fn running_out_of_file_descriptors_refuses_connections_for_a_while_not_for_good() {
    let dir = scratch("descriptors");
    // Few descriptors: the connections below use them all up.
    let mut command = Command::new("prlimit");
    command
        .arg("--nofile=64:64")
        .arg(env!("CARGO_BIN_EXE_keystone-runtime"));
    let mut listening = listen_with(&dir, command);
    let address = listening
        .url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let mut held = Vec::new();
    for _ in 0..120 {
        if let Ok(stream) = tokio::net::TcpStream::connect(&address).await {
            held.push(stream);
        }
    }
    // Let the server try (and fail) to accept them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        listening.child.try_wait().unwrap().is_none(),
        "the endpoint exited when it ran out of descriptors"
    );
    drop(held);
    let body = "{\"user\":\"ann\",\"action\":\"buy\",\"seq\":1}\n";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
            .post(&listening.url)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await;
        if let Ok(response) = attempt
            && response.status() == 200
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the endpoint did not answer again once descriptors were free"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
