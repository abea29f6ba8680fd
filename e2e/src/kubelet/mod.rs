//! The process kubelet: a node agent for the testbed, where there is no
//! container runtime. It registers a Ready Node, binds pending Pods to it and
//! runs each container whose image maps to a local binary as a process with
//! the pod's command, env and volumes, on its own loopback Pod IP, reporting
//! status and probes back like a kubelet. Test infrastructure, never shipped.

mod env;
mod images;
mod ips;
mod node;
mod pod;
mod probe;
mod process;
mod sockets;
mod volumes;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client, Resource as _};
use thiserror::Error;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use images::{ImageMap, InvalidMapping};

/// How the kubelet is set up (flags of `keystone-process-kubelet`).
#[derive(Debug, Clone)]
pub struct Config {
    pub kubeconfig: PathBuf,
    pub node_name: String,
    /// Pod folders (logs, volumes) and pid files live here.
    pub state_dir: PathBuf,
    pub images: ImageMap,
    /// Given to containers as KUBERNETES_SERVICE_HOST/PORT, so in-cluster
    /// clients (the operator) reach the API server.
    pub api_server_host: String,
    pub api_server_port: u16,
    /// The cluster CA, written as ca.crt next to mounted service-account tokens.
    pub ca_file: Option<PathBuf>,
    /// Pod IPs are 127.<pod_net>.x.y; testbeds sharing a machine differ here.
    pub pod_net: u8,
    pub started_at: Time,
}

impl Config {
    pub fn new(
        kubeconfig: PathBuf,
        node_name: String,
        state_dir: PathBuf,
        images: ImageMap,
    ) -> Self {
        Self {
            kubeconfig,
            node_name,
            state_dir,
            images,
            api_server_host: "127.0.0.1".to_owned(),
            api_server_port: 6443,
            ca_file: None,
            pod_net: 1,
            started_at: Time(Timestamp::now()),
        }
    }
}

/// Why a pod (or one of its containers) cannot run.
#[derive(Debug, Clone, Error)]
#[error("{message}")]
pub struct PodFailure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The pod uses something the process kubelet does not do; permanent.
    Unsupported,
    /// A referenced ConfigMap/Secret/key is missing; retried, like the
    /// kubelet's CreateContainerConfigError.
    Config,
}

impl PodFailure {
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Unsupported,
            message: message.into(),
        }
    }

    pub fn config(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Config,
            message: message.into(),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self.kind {
            FailureKind::Unsupported => "Unsupported",
            FailureKind::Config => "CreateContainerConfigError",
        }
    }
}

/// State shared by the pod workers.
struct Shared {
    client: Client,
    recorder: kube::runtime::events::Recorder,
    config: Config,
    ips: Mutex<ips::IpPool>,
}

struct Worker {
    tx: watch::Sender<Option<Pod>>,
}

/// Runs the kubelet until SIGTERM/SIGINT, then stops every pod process.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let kubeconfig = Kubeconfig::read_from(&config.kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", config.kubeconfig.display()))?;
    let client_config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    crate::install_crypto_provider();
    let client = Client::try_from(client_config)?;
    std::fs::create_dir_all(config.state_dir.join("pids"))?;
    std::fs::create_dir_all(config.state_dir.join("pods"))?;

    node::register(&client, &config)
        .await
        .context("registering the node")?;
    tracing::info!(node = %config.node_name, "node registered and Ready");
    let heartbeat = tokio::spawn(node::heartbeat(client.clone(), config.clone()));

    let pod_net = config.pod_net;
    let reporter = kube::runtime::events::Reporter {
        controller: "keystone-process-kubelet".to_owned(),
        instance: Some(config.node_name.clone()),
    };
    let shared = Arc::new(Shared {
        recorder: kube::runtime::events::Recorder::new(client.clone(), reporter),
        client: client.clone(),
        config,
        ips: Mutex::new(ips::IpPool::new(pod_net)),
    });
    let pods: Api<Pod> = Api::all(client);
    let mut events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut tasks: JoinSet<String> = JoinSet::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

    loop {
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { break };
                match event {
                    Ok(watcher::Event::Init) => seen.clear(),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let Some(uid) = pod.metadata.uid.clone() {
                            seen.insert(uid);
                        }
                        handle(&shared, &mut workers, &mut tasks, pod).await;
                    }
                    Ok(watcher::Event::InitDone) => {
                        // Pods deleted while the watch was down.
                        for (uid, w) in &workers {
                            if !seen.contains(uid) {
                                let _ = w.tx.send(None);
                            }
                        }
                    }
                    Ok(watcher::Event::Apply(pod)) => handle(&shared, &mut workers, &mut tasks, pod).await,
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some(w) = pod.metadata.uid.as_ref().and_then(|u| workers.get(u)) {
                            let _ = w.tx.send(None);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "pod watch error, retrying"),
                }
            }
            Some(done) = tasks.join_next() => {
                if let Ok(uid) = done {
                    workers.remove(&uid);
                }
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }

    tracing::info!(
        pods = workers.len(),
        "shutting down: stopping pod processes"
    );
    heartbeat.abort();
    // Dropping the senders tells each worker to stop its processes.
    workers.clear();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn handle(
    shared: &Arc<Shared>,
    workers: &mut HashMap<String, Worker>,
    tasks: &mut JoinSet<String>,
    pod: Pod,
) {
    let Some(uid) = pod.metadata.uid.clone() else {
        return;
    };
    let spec = pod.spec.as_ref();
    let node_name = spec.and_then(|s| s.node_name.as_deref()).unwrap_or("");
    let terminal = matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    if node_name.is_empty() {
        // We are the scheduler too, for pods meant for the default one.
        let scheduler = spec
            .and_then(|s| s.scheduler_name.as_deref())
            .unwrap_or("default-scheduler");
        if scheduler == "default-scheduler"
            && pod.metadata.deletion_timestamp.is_none()
            && !terminal
        {
            tokio::spawn(bind(shared.clone(), pod));
        }
        return;
    }
    if node_name != shared.config.node_name {
        return;
    }
    if let Some(w) = workers.get(&uid) {
        let _ = w.tx.send(Some(pod));
        return;
    }
    if pod.metadata.deletion_timestamp.is_some() {
        // Ours, but no process runs for it (e.g. it ended before a kubelet
        // restart): finish the deletion.
        delete_now(&shared.client, &pod).await;
        return;
    }
    if terminal {
        return;
    }
    let (tx, rx) = watch::channel(Some(pod.clone()));
    workers.insert(uid.clone(), Worker { tx });
    let shared = shared.clone();
    tasks.spawn(async move {
        pod::PodWorker::new(shared, pod).run(rx).await;
        uid
    });
}

async fn bind(shared: Arc<Shared>, pod: Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(shared.config.node_name.clone()),
            ..Default::default()
        },
    };
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    // No watch event follows a failed bind, so retry here (in the
    // background) until it is bound, gone, or we give up.
    for attempt in 1..=30 {
        match api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await
        {
            Ok(_) => {
                tracing::info!(pod = %format!("{ns}/{name}"), "bound to node");
                let event = kube::runtime::events::Event {
                    type_: kube::runtime::events::EventType::Normal,
                    reason: "Scheduled".to_owned(),
                    note: Some(format!(
                        "Successfully assigned {ns}/{name} to {}",
                        shared.config.node_name
                    )),
                    action: "Binding".to_owned(),
                    secondary: None,
                };
                let _ = shared.recorder.publish(&event, &pod.object_ref(&())).await;
                return;
            }
            // Already bound or gone: the watch tells the rest.
            Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => return,
            Err(e) => {
                tracing::warn!(pod = %format!("{ns}/{name}"), attempt, error = %e, "binding failed");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
}

/// Deletes a pod for good (grace 0), once its processes are gone; the uid
/// precondition protects a new pod that reuses the name.
async fn delete_now(client: &Client, pod: &Pod) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => tracing::info!(pod = %format!("{ns}/{name}"), "pod deleted"),
        Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => {}
        Err(e) => {
            tracing::warn!(pod = %format!("{ns}/{name}"), error = %e, "final pod deletion failed")
        }
    }
}
