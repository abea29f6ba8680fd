//! Shared helpers of the operator and Helm tests: CRDs installed, an operator
//! process scoped to one test namespace, Kafka topic inspection, waits on
//! Pipeline conditions. Every helper panics with what it saw: a missing
//! testbed or binary fails the test, it never skips.
#![allow(dead_code)]

pub mod capture;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use keystone_crds::Pipeline;
use keystone_e2e::{TestNamespace, Testbed, wait_for};
use kube::Api;
use kube::api::{ObjectMeta, PostParams};
use rdkafka::ClientConfig;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;

pub const WAIT: Duration = Duration::from_secs(90);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The operator binary the tests run (and the process kubelet maps `keystone/operator*` to).
pub fn operator_binary() -> PathBuf {
    let path = repo().join("target/debug/keystone-operator");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p keystone-operator` before the e2e tests",
        path.display()
    );
    path
}

pub async fn testbed() -> Testbed {
    let tb = Testbed::from_env()
        .await
        .expect("the testbed is not running: start it with `e2e/testbed up`");
    tb.client()
        .expect("the testbed has no Kubernetes control plane");
    tb.kafka_bootstrap_servers()
        .expect("the testbed has no Kafka");
    tb
}

/// Applies crds/*.yaml (idempotent) and waits until they are established.
pub fn install_crds(tb: &Testbed) {
    let mut apply = tb.kubectl().expect("kubectl");
    apply.args([
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=keystone-e2e",
        "-f",
    ]);
    apply.arg(repo().join("crds"));
    run_ok(apply);
    let mut wait = tb.kubectl().expect("kubectl");
    wait.args([
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/pipelines.keystone.dev",
        "crd/processors.keystone.dev",
    ]);
    run_ok(wait);
}

pub fn run_ok(mut cmd: Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

pub fn run_with_stdin(mut cmd: Command, input: &str) -> (bool, String) {
    use std::io::Write;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A namespace for the operator's own objects (Lease, ownership ledger),
/// deleted (without waiting) when the guard drops.
pub struct OperatorNamespace {
    name: String,
    kubeconfig: PathBuf,
}

impl OperatorNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for OperatorNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl Drop for OperatorNamespace {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The Pod Security Standard every namespace of these tests enforces: the
/// API server refuses any pod (runtime or operator) that does not meet it.
pub const POD_SECURITY: (&str, &str) = ("pod-security.kubernetes.io/enforce", "restricted");

/// A test namespace for pipelines, enforcing Pod Security "restricted".
pub async fn pipeline_namespace(tb: &Testbed, prefix: &str) -> TestNamespace {
    let ns = tb.namespace(prefix).await.expect("namespace");
    let api: Api<Namespace> = Api::all(tb.client().expect("client"));
    api.patch(
        ns.name(),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({
            "metadata": {"labels": {POD_SECURITY.0: POD_SECURITY.1}}
        })),
    )
    .await
    .unwrap_or_else(|e| panic!("labelling namespace {} restricted: {e}", ns.name()));
    ns
}

pub async fn operator_namespace(tb: &Testbed, test: &TestNamespace) -> OperatorNamespace {
    let name = format!("{}-op", test.name());
    let api: Api<Namespace> = Api::all(tb.client().expect("client"));
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([
                ("keystone.dev/e2e".to_owned(), "true".to_owned()),
                (POD_SECURITY.0.to_owned(), POD_SECURITY.1.to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
    OperatorNamespace {
        name,
        kubeconfig: tb.kubeconfig().expect("kubeconfig"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// An operator process run by the test with the testbed's admin kubeconfig,
/// watching one namespace. Killed when dropped.
pub struct OperatorProcess {
    child: Child,
    kubeconfig: PathBuf,
    watch: String,
    pub log: PathBuf,
    pub metrics_port: u16,
    pub identity: String,
}

impl OperatorProcess {
    pub fn start(tb: &Testbed, watch: &str, operator_ns: &str, identity: &str) -> Self {
        Self::start_with(tb, watch, operator_ns, identity, &[])
    }

    /// As `start`, with extra environment (overrides included).
    pub fn start_with(
        tb: &Testbed,
        watch: &str,
        operator_ns: &str,
        identity: &str,
        env: &[(&str, &str)],
    ) -> Self {
        let log = tb
            .state_dir()
            .join(format!("e2e-operator-{watch}-{identity}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let metrics_port = free_port();
        let child = Command::new(operator_binary())
            .env("KUBECONFIG", tb.kubeconfig().expect("kubeconfig"))
            .env(
                "KAFKA_BOOTSTRAP_SERVERS",
                tb.kafka_bootstrap_servers().expect("kafka"),
            )
            .env("WATCH_NAMESPACES", watch)
            .env("POD_NAMESPACE", operator_ns)
            .env("POD_NAME", identity)
            .env("KEYSTONE_LEASE_NAME", "keystone-operator")
            .env("KEYSTONE_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("KEYSTONE_RUNTIME_IMAGE", "keystone/runtime:e2e")
            // Pods of the process kubelet share the host's ports: bind the pod's own address.
            .env("KEYSTONE_RUNTIME_BIND_ADDRESS", "$(POD_IP)")
            .env("KEYSTONE_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,kube=warn,keystone_operator=debug")
            .envs(env.iter().copied())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("start keystone-operator");
        Self {
            child,
            kubeconfig: tb.kubeconfig().expect("kubeconfig"),
            watch: watch.to_owned(),
            log,
            metrics_port,
            identity: identity.to_owned(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: no graceful shutdown, as a crash would be.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGKILL through a shared reference (the process may be held by
    /// something that only lends it out); a no-op once it has exited.
    pub fn sigkill(&self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    pub async fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args([
                "-sf",
                &format!("http://127.0.0.1:{}/metrics", self.metrics_port),
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for OperatorProcess {
    /// Kills the operator, then strips the finalizer from the Pipelines it
    /// watched, so a failed test never leaves a namespace stuck terminating
    /// (a test that wants the operator's cleanup deletes before this).
    fn drop(&mut self) {
        self.kill();
        let list = Command::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .args([
                "get",
                "pipelines.keystone.dev",
                "-n",
                &self.watch,
                "-o",
                "name",
            ])
            .output();
        let Ok(list) = list else { return };
        for pipeline in String::from_utf8_lossy(&list.stdout).lines() {
            let _ = Command::new("kubectl")
                .env("KUBECONFIG", &self.kubeconfig)
                .args([
                    "patch",
                    pipeline,
                    "-n",
                    &self.watch,
                    "--type=merge",
                    "-p",
                    r#"{"metadata":{"finalizers":null}}"#,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

pub fn condition<'a>(
    p: &'a Pipeline,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

pub fn condition_is(p: &Pipeline, type_: &str, status: &str) -> bool {
    condition(p, type_).is_some_and(|c| c.status == status)
        && p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation
}

/// Waits until the condition has the status for the current generation.
pub async fn wait_condition(
    api: &Api<Pipeline>,
    name: &str,
    type_: &str,
    status: &str,
) -> Pipeline {
    wait_for(api, name, WAIT, &format!("{type_}={status}"), |p| {
        condition_is(p, type_, status)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

pub async fn apply_yaml(tb: &Testbed, yaml: &str) {
    let mut cmd = tb.kubectl().expect("kubectl");
    cmd.args([
        "apply",
        "--server-side",
        "--field-manager=e2e-user",
        "--force-conflicts",
        "-f",
        "-",
    ]);
    let (ok, text) = run_with_stdin(cmd, yaml);
    assert!(ok, "kubectl apply failed:\n{text}\n---\n{yaml}");
}

/// Kafka, inspected directly (not through the operator).
pub struct Kafka {
    admin: AdminClient<DefaultClientContext>,
}

impl Kafka {
    pub fn new(tb: &Testbed) -> Self {
        let admin = ClientConfig::new()
            .set(
                "bootstrap.servers",
                tb.kafka_bootstrap_servers().expect("kafka"),
            )
            .create()
            .expect("admin client");
        Self { admin }
    }

    pub async fn create(&self, topic: &str, partitions: i32) {
        let results = self
            .admin
            .create_topics(
                &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
            )
            .await
            .expect("create topics");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    pub fn partitions(&self, topic: &str) -> Option<i32> {
        let metadata = self
            .admin
            .inner()
            // All topics: a request naming a missing topic may auto-create it.
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata");
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
    }

    pub fn exists(&self, topic: &str) -> bool {
        let metadata = self
            .admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata");
        metadata.topics().iter().any(|t| t.name() == topic)
    }

    pub async fn raise_partitions(&self, topic: &str, total: usize) {
        let results = self
            .admin
            .create_partitions(&[NewPartitions::new(topic, total)], &AdminOptions::new())
            .await
            .expect("create partitions");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("raise partitions of {t}: {e}"));
        }
    }

    pub async fn dynamic_config(&self, topic: &str) -> BTreeMap<String, String> {
        let results = self
            .admin
            .describe_configs(&[ResourceSpecifier::Topic(topic)], &AdminOptions::new())
            .await
            .expect("describe configs");
        let mut out = BTreeMap::new();
        for r in results {
            for e in r.expect("config resource").entries {
                if e.source == ConfigSource::DynamicTopic
                    && let Some(v) = e.value
                {
                    out.insert(e.name, v);
                }
            }
        }
        out
    }

    pub async fn set_config(&self, topic: &str, config: &[(&str, &str)]) {
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
        for (k, v) in config {
            alter = alter.set(k, v);
        }
        let results = self
            .admin
            .alter_configs(&[alter], &AdminOptions::new())
            .await
            .expect("alter configs");
        for r in results {
            r.unwrap_or_else(|(t, e)| panic!("alter config of {t:?}: {e}"));
        }
    }

    /// Polls until `check` holds for the topic's partitions (None: absent).
    pub async fn wait_partitions(
        &self,
        topic: &str,
        what: &str,
        check: impl Fn(Option<i32>) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let now = self.partitions(topic);
            if check(now) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for topic {topic}: {what}; partitions now {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A Pipeline manifest in `ns` reading `source`, with one keyed dedup step (a
/// second stage with a repartition and a changelog topic) and a Kafka sink.
pub fn pipeline_yaml(
    ns: &str,
    name: &str,
    source: &str,
    sink: &str,
    sink_partitions: i32,
    policy: &str,
) -> String {
    format!(
        r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: {name}
  namespace: {ns}
spec:
  source:
    topic: {source}
    key: [session_id]
    schema:
      fields:
        - {{name: session_id, type: string}}
        - {{name: user, type: string}}
        - {{name: action, type: string}}
  steps:
    - name: per-user
      dedup: {{key: [user], window: 1m}}
  parallelism: 2
  topicDeletionPolicy: {policy}
  sinks:
    - name: out
      kafka:
        topic: {sink}
        partitions: {sink_partitions}
        config: {{retention.ms: "3600000"}}
"#
    )
}

pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Panics unless the runtime binary the kubelet maps `keystone/runtime*` to is built.
pub fn require_runtime_binary() {
    let path = repo().join("target/debug/keystone-runtime");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p keystone-runtime` before the e2e tests",
        path.display()
    );
}

/// Waits until the Pipeline is Ready=True: 180 s, as real runtime pods start,
/// join their consumer groups and restore state. Panics with the operator's log.
pub async fn wait_ready_with_runtime(
    api: &Api<Pipeline>,
    name: &str,
    operator: &OperatorProcess,
) -> Pipeline {
    keystone_e2e::wait_for(api, name, Duration::from_secs(180), "Ready=True", |p| {
        condition_is(p, "Ready", "True")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
}

/// A runtime pod's process stopped with SIGSTOP: its socket stays open, so
/// connections are accepted by the kernel, but nothing answers and nothing
/// is consumed. SIGCONT when dropped, so a failing test leaves no frozen pod.
/// The kubelet restarts a pod whose /healthz fails 3 times 10 s apart: keep
/// it frozen well below 30 s.
pub struct Frozen(nix::unistd::Pid);

impl Frozen {
    pub fn freeze(tb: &Testbed, pod: &k8s_openapi::api::core::v1::Pod) -> Self {
        use kube::ResourceExt as _;
        let pid_file = tb
            .state_dir()
            .join("kubelet/pids")
            .join(format!("{}_runtime.pid", pod.uid().expect("pod uid")));
        // "<pid> <start time>", as the process kubelet records it.
        let recorded = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
        let pid: i32 = recorded
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{}: {recorded:?}", pid_file.display()));
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// Creates Secret `name` in `ns` with `data` (as `stringData`).
pub async fn create_secret(ns: &TestNamespace, name: &str, data: &[(&str, &str)]) {
    use k8s_openapi::api::core::v1::Secret;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        string_data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..Default::default()
    };
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_or_else(|e| panic!("create Secret {name}: {e}"));
}

/// Waits (3 min) until Pipeline `name` is Ready=True for its generation;
/// panics with the operator's log otherwise.
pub async fn wait_ready(ns: &TestNamespace, name: &str, operator: &OperatorProcess) -> Pipeline {
    wait_for(
        &ns.api::<Pipeline>(),
        name,
        Duration::from_secs(180),
        "Ready=True",
        |p| condition_is(p, "Ready", "True"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()))
}

/// Produces every line of `input` to `topic`, keyed by `key_of(line)`.
pub async fn produce_lines(
    tb: &Testbed,
    topic: &str,
    input: &str,
    key_of: impl Fn(&str) -> String,
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set(
            "bootstrap.servers",
            tb.kafka_bootstrap_servers().expect("kafka"),
        )
        .create()
        .expect("producer");
    for line in input.lines() {
        let key = key_of(line);
        producer
            .send(
                FutureRecord::to(topic).key(&key).payload(line),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce: {e}"));
    }
}

/// A Helm release uninstalled when dropped (a failing test leaves none).
pub struct HelmRelease {
    pub helm: PathBuf,
    pub kubeconfig: PathBuf,
    pub name: String,
    pub namespace: String,
}

impl HelmRelease {
    pub fn new(tb: &Testbed, name: &str, namespace: &str) -> Self {
        Self {
            helm: tb.helm().expect("helm"),
            kubeconfig: tb.kubeconfig().expect("kubeconfig"),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        }
    }
}

impl Drop for HelmRelease {
    fn drop(&mut self) {
        let _ = Command::new(&self.helm)
            .env("KUBECONFIG", &self.kubeconfig)
            .args([
                "uninstall",
                &self.name,
                "--namespace",
                &self.namespace,
                "--ignore-not-found",
            ])
            .output();
    }
}
