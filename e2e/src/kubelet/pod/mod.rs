//! One pod: its containers as processes, their probes, restarts and status.

mod probes;
mod start;
mod status;
mod stop;
mod supported;
mod sync;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateWaiting, ContainerStatus, Pod,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::env::PodFacts;
use super::probe::ProbeResult;
use super::process::Exec;
use super::{PodFailure, Shared, delete_now};

const TICK: Duration = Duration::from_millis(250);
/// How long the kubelet's own shutdown waits for pod processes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

struct ContainerRun {
    spec: Container,
    /// An init container: runs to completion before the regular ones.
    init: bool,
    binary: Option<PathBuf>,
    child: Option<Child>,
    pid: Option<u32>,
    started_at: Option<Time>,
    started_instant: Option<Instant>,
    /// Starts so far; restartCount is starts - 1.
    starts: i32,
    state: ContainerState,
    last_state: Option<ContainerState>,
    ready: bool,
    /// Startup probe passed (or there is none).
    started: bool,
    next_start: Instant,
    crash_streak: u32,
    probes: Vec<JoinHandle<()>>,
    generation: u64,
    /// SIGKILL is due at this instant (SIGTERM was sent).
    kill_at: Option<Instant>,
    /// Why we are killing it (liveness, startup), for the terminated reason.
    kill_reason: Option<String>,
    /// Exited and will not restart.
    done: bool,
    exec: Option<Exec>,
    /// The last start failure reported as an event (not repeated each try).
    last_failure: Option<String>,
    /// Whether a wildcard listen was reported for this start.
    wildcard_reported: bool,
}

impl ContainerRun {
    fn new(spec: Container, binary: Option<PathBuf>, init: bool) -> Self {
        Self {
            spec,
            init,
            binary,
            child: None,
            pid: None,
            started_at: None,
            started_instant: None,
            starts: 0,
            state: waiting("ContainerCreating", None),
            last_state: None,
            ready: false,
            started: false,
            next_start: Instant::now(),
            crash_streak: 0,
            probes: Vec::new(),
            generation: 0,
            kill_at: None,
            kill_reason: None,
            done: false,
            exec: None,
            last_failure: None,
            wildcard_reported: false,
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn stop_probes(&mut self) {
        for p in self.probes.drain(..) {
            p.abort();
        }
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_owned()),
            message,
        }),
        ..Default::default()
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

pub(super) struct PodWorker {
    shared: Arc<Shared>,
    pod: Pod,
    ns: String,
    name: String,
    uid: String,
    dir: PathBuf,
    ip: Option<Ipv4Addr>,
    containers: Vec<ContainerRun>,
    /// Set when the pod uses something unsupported; nothing runs then.
    unsupported: Option<PodFailure>,
    volumes: Option<HashMap<String, PathBuf>>,
    volumes_at: Instant,
    tokens: std::sync::Mutex<HashMap<String, (String, Instant)>>,
    start_time: Time,
    /// type -> (status, lastTransitionTime), so the times only move on change.
    transitions: HashMap<String, (String, Time)>,
    last_reported: Option<serde_json::Value>,
    probe_tx: mpsc::Sender<ProbeResult>,
    probe_rx: mpsc::Receiver<ProbeResult>,
    /// Events to publish with the next status report.
    events: Vec<(EventType, &'static str, String)>,
}

impl PodWorker {
    pub(super) fn new(shared: Arc<Shared>, pod: Pod) -> Self {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let dir = shared
            .config
            .state_dir
            .join("pods")
            .join(format!("{ns}_{name}_{uid}"));
        let (probe_tx, probe_rx) = mpsc::channel(64);
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .unwrap_or_else(now);
        let spec = pod.spec.clone().unwrap_or_default();
        // Init containers first, in order; `sync` runs them one by one.
        let inits = spec.init_containers.iter().flatten().map(|c| (c, true));
        let containers = inits
            .chain(spec.containers.iter().map(|c| (c, false)))
            .map(|(c, init)| {
                let binary = c
                    .image
                    .as_deref()
                    .and_then(|i| shared.config.images.resolve(i))
                    .map(Path::to_path_buf);
                let mut run = ContainerRun::new(c.clone(), binary, init);
                // After a kubelet restart, keep counting restarts where the
                // previous kubelet left off.
                if let Some(previous) = previous_status(&pod, &c.name, init)
                    && (previous.state.as_ref().is_some_and(|s| s.waiting.is_none())
                        || previous.last_state.is_some())
                {
                    run.starts = previous.restart_count + 1;
                    run.last_state = previous.last_state.clone();
                }
                run
            })
            .collect();
        let mut worker = Self {
            shared,
            pod,
            ns,
            name,
            uid,
            dir,
            ip: None,
            containers,
            unsupported: None,
            volumes: None,
            volumes_at: Instant::now(),
            tokens: std::sync::Mutex::new(HashMap::new()),
            start_time,
            transitions: HashMap::new(),
            last_reported: None,
            probe_tx,
            probe_rx,
            events: Vec::new(),
        };
        worker.unsupported = worker.check_supported().err();
        worker
    }

    fn key(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }

    pub(super) async fn run(mut self, mut rx: watch::Receiver<Option<Pod>>) {
        tracing::info!(pod = %self.key(), "pod worker started");
        if let Some(f) = &self.unsupported {
            tracing::warn!(pod = %self.key(), reason = %f, "pod cannot run");
            let message = f.message.clone();
            self.events
                .push((EventType::Warning, "Unsupported", message));
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = rx.changed() => {
                    if changed.is_err() {
                        // The kubelet is shutting down; the pod stays.
                        self.terminate_all(SHUTDOWN_GRACE).await;
                        self.release();
                        return;
                    }
                    let latest = rx.borrow_and_update().clone();
                    match latest {
                        Some(pod) => self.pod = pod,
                        None => {
                            // Deleted behind our back (force delete).
                            self.terminate_all(self.grace()).await;
                            self.release();
                            tracing::info!(pod = %self.key(), "pod gone; processes stopped");
                            return;
                        }
                    }
                }
                Some(result) = self.probe_rx.recv() => self.apply_probe(result),
            }
            if self.pod.metadata.deletion_timestamp.is_some() {
                let grace = self.grace();
                tracing::info!(pod = %self.key(), ?grace, "pod deleted: stopping processes");
                self.terminate_all(grace).await;
                self.publish_events().await;
                delete_now(&self.shared.client, &self.pod).await;
                self.release();
                return;
            }
            self.sync().await;
            self.report().await;
        }
    }

    fn grace(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(secs.max(0)).unwrap_or(0))
    }

    fn facts(&self) -> PodFacts {
        PodFacts {
            pod_ip: self.ip.map(|i| i.to_string()).unwrap_or_default(),
            host_ip: "127.0.0.1".to_owned(),
            node_name: self.shared.config.node_name.clone(),
        }
    }
}

fn previous_status<'a>(pod: &'a Pod, name: &str, init: bool) -> Option<&'a ContainerStatus> {
    let status = pod.status.as_ref()?;
    let list = if init {
        &status.init_container_statuses
    } else {
        &status.container_statuses
    };
    list.as_ref()?.iter().find(|s| s.name == name)
}
