//! One pod: its containers as processes, their probes, restarts and status.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource as _};
use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::env::{self, PodFacts};
use super::probe::{self, ProbeKind, ProbeResult};
use super::process::{self, Exec};
use super::sockets;
use super::volumes::{self, VolumeContext};
use super::{FailureKind, PodFailure, Shared, delete_now};

const TICK: Duration = Duration::from_millis(250);
const VOLUME_REFRESH: Duration = Duration::from_secs(5);
/// A container that ran this long before exiting restarts without backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// How long the kubelet's own shutdown waits for pod processes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long after a start the kubelet looks for wildcard listeners.
const WILDCARD_WATCH: Duration = Duration::from_secs(30);
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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

pub struct PodWorker {
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

    /// Everything the process kubelet cannot do, reported instead of ignored.
    fn check_supported(&self) -> Result<(), PodFailure> {
        let spec = self
            .pod
            .spec
            .as_ref()
            .ok_or_else(|| PodFailure::unsupported("pod has no spec"))?;
        let mut problems = Vec::new();
        for c in spec.init_containers.iter().flatten() {
            if c.restart_policy.as_deref() == Some("Always") {
                problems.push(format!(
                    "sidecar init container {:?} (restartPolicy Always)",
                    c.name
                ));
            }
        }
        if spec
            .ephemeral_containers
            .as_ref()
            .is_some_and(|c| !c.is_empty())
        {
            problems.push("ephemeralContainers".to_owned());
        }
        if spec.host_network == Some(true) {
            problems.push("hostNetwork".to_owned());
        }
        for v in spec.volumes.iter().flatten() {
            if !volumes::supported(v) {
                problems.push(format!(
                    "volume {:?} (only configMap, secret, emptyDir, downwardAPI, projected)",
                    v.name
                ));
            }
        }
        for c in &self.containers {
            let image = c.spec.image.as_deref().unwrap_or("");
            if c.binary.is_none() {
                problems.push(format!(
                    "image {image:?} of container {:?} maps to no local binary (kubelet --image PREFIX=PATH)",
                    c.spec.name
                ));
            }
            for (kind, p) in [
                ("readiness", &c.spec.readiness_probe),
                ("liveness", &c.spec.liveness_probe),
                ("startup", &c.spec.startup_probe),
            ] {
                if let Some(what) = p.as_ref().and_then(probe::unsupported) {
                    problems.push(format!(
                        "{what} ({kind} probe of container {:?})",
                        c.spec.name
                    ));
                }
            }
            if let Some(l) = &c.spec.lifecycle
                && (l.post_start.is_some() || l.pre_stop.is_some())
            {
                problems.push(format!("lifecycle hooks (container {:?})", c.spec.name));
            }
            for m in c.spec.volume_mounts.iter().flatten() {
                if m.sub_path_expr.as_deref().is_some_and(|s| !s.is_empty()) {
                    problems.push(format!("subPathExpr (container {:?})", c.spec.name));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PodFailure::unsupported(format!(
                "not supported by the keystone process kubelet: {}",
                problems.join("; ")
            )))
        }
    }

    pub async fn run(mut self, mut rx: watch::Receiver<Option<Pod>>) {
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

    async fn sync(&mut self) {
        if self.unsupported.is_some() {
            return;
        }
        if self.ip.is_none() {
            let previous = self
                .pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|s| s.parse().ok());
            self.ip = self
                .shared
                .ips
                .lock()
                .ok()
                .and_then(|mut p| p.allocate(previous));
            if self.ip.is_none() {
                self.unsupported = Some(PodFailure::unsupported("no free loopback pod IP left"));
                return;
            }
            if let Err(e) = std::fs::create_dir_all(self.dir.join("volumes")) {
                tracing::warn!(pod = %self.key(), error = %e, "cannot create pod folder");
            }
        }

        if self.volumes.is_none() || self.volumes_at.elapsed() >= VOLUME_REFRESH {
            self.volumes_at = Instant::now();
            let facts = self.facts();
            let ctx = VolumeContext {
                client: &self.shared.client,
                pod: &self.pod,
                facts: &facts,
                ca_cert: self.shared.config.ca_file.as_deref(),
                tokens: &self.tokens,
            };
            match volumes::materialize(&ctx, &self.dir.join("volumes")).await {
                Ok(v) => self.volumes = Some(v),
                Err(f) if f.kind == FailureKind::Unsupported => {
                    self.unsupported = Some(f);
                    return;
                }
                Err(f) => {
                    // Keep running containers on the old content; block new starts.
                    if self.volumes.is_none() {
                        for c in self.containers.iter_mut().filter(|c| !c.running()) {
                            c.state = waiting(f.reason(), Some(f.message.clone()));
                        }
                        return;
                    }
                }
            }
        }

        let policy = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".to_owned());
        for i in 0..self.containers.len() {
            // Each init container must complete before the next container
            // (init or regular) starts.
            if i > 0 && self.containers[i - 1].init && !self.init_completed(i - 1) {
                break;
            }
            self.check_exit(i, &policy);
            let c = &mut self.containers[i];
            if let (Some(at), Some(pid)) = (c.kill_at, c.pid)
                && Instant::now() >= at
            {
                process::signal_group(pid, Signal::SIGKILL);
                c.kill_at = None;
            }
            if let (Some(pid), Some(started)) = (c.pid, c.started_instant)
                && !c.wildcard_reported
                && started.elapsed() < WILDCARD_WATCH
            {
                let ports = sockets::wildcard_listen_ports(pid);
                if !ports.is_empty() {
                    c.wildcard_reported = true;
                    let note = format!(
                        "container {} listens on 0.0.0.0/[::] port(s) {ports:?}: in the testbed all pods share the host network, so it takes these ports from every pod; bind the pod IP (env from fieldRef status.podIP) instead",
                        c.spec.name
                    );
                    tracing::warn!(pod = %self.key(), "{note}");
                    self.events
                        .push((EventType::Warning, "WildcardListen", note));
                }
            }
            let c = &mut self.containers[i];
            if !c.running() && !c.done && Instant::now() >= c.next_start {
                self.start(i).await;
            }
        }
    }

    fn check_exit(&mut self, i: usize, policy: &str) {
        let key = self.key();
        let c = &mut self.containers[i];
        let Some(child) = c.child.as_mut() else {
            return;
        };
        let status = match child.try_wait() {
            Ok(Some(status)) => status,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(pod = %key, container = %c.spec.name, error = %e, "wait failed");
                return;
            }
        };
        use std::os::unix::process::ExitStatusExt as _;
        let signal = status.signal();
        let exit_code = status.code().unwrap_or_else(|| 128 + signal.unwrap_or(0));
        tracing::info!(pod = %key, container = %c.spec.name, exit_code, ?signal, "container exited");
        let reason = c.kill_reason.take().unwrap_or_else(|| {
            if exit_code == 0 {
                "Completed".to_owned()
            } else {
                "Error".to_owned()
            }
        });
        let terminated = ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code,
                signal,
                reason: Some(reason),
                started_at: c.started_at.clone(),
                finished_at: Some(now()),
                container_id: c.pid.map(|p| format!("process://{p}")),
                ..Default::default()
            }),
            ..Default::default()
        };
        remove_pid_file(&self.shared.config.state_dir, &self.uid, &c.spec.name);
        c.child = None;
        c.pid = None;
        c.kill_at = None;
        c.ready = false;
        c.started = false;
        c.stop_probes();
        let restart = match policy {
            // Init containers of restartPolicy Always pods restart on failure.
            _ if c.init => exit_code != 0 && policy != "Never",
            "Never" => false,
            "OnFailure" => exit_code != 0,
            _ => true,
        };
        if restart {
            let ran = c.started_instant.map_or(Duration::ZERO, |s| s.elapsed());
            if ran >= BACKOFF_RESET {
                c.crash_streak = 0;
            }
            let backoff = Duration::from_secs(1 << c.crash_streak.min(5)).min(MAX_BACKOFF);
            c.crash_streak += 1;
            c.next_start = Instant::now() + backoff;
            self.events.push((
                EventType::Warning,
                "BackOff",
                format!(
                    "container {} exited with code {exit_code}; restarting in {backoff:?}",
                    c.spec.name
                ),
            ));
            c.last_state = Some(terminated);
            c.state = waiting(
                "CrashLoopBackOff",
                Some(format!(
                    "back-off {backoff:?} restarting failed container {}",
                    c.spec.name
                )),
            );
        } else {
            c.done = true;
            c.state = terminated;
        }
    }

    /// The program and arguments: the image's binary is the entrypoint;
    /// `command[0]` naming that binary (by path or file name) means the
    /// binary, any other `command` runs from the host (e.g. `sh`).
    fn program(c: &ContainerRun, vars: &[(String, String)]) -> (PathBuf, Vec<String>) {
        let binary = c.binary.clone().unwrap_or_default();
        let args: Vec<String> = c
            .spec
            .args
            .iter()
            .flatten()
            .map(|a| env::expand(a, vars))
            .collect();
        let command: Vec<String> = c
            .spec
            .command
            .iter()
            .flatten()
            .map(|a| env::expand(a, vars))
            .collect();
        match command.split_first() {
            None => (binary, args),
            Some((first, rest)) => {
                let file = |p: &str| Path::new(p).file_name().map(|f| f.to_os_string());
                let program = if file(first) == binary.file_name().map(|f| f.to_os_string()) {
                    binary
                } else {
                    PathBuf::from(first)
                };
                (program, rest.iter().cloned().chain(args).collect())
            }
        }
    }

    async fn start(&mut self, i: usize) {
        let facts = self.facts();
        let key = self.key();
        let spec = self.containers[i].spec.clone();
        let resolved = match env::resolve(&self.shared.client, &self.pod, &spec, &facts).await {
            Ok(v) => v,
            Err(f) => return self.start_failed(i, f),
        };
        let mounts = match volumes::mounts(&spec, self.volumes.as_ref().unwrap_or(&HashMap::new()))
        {
            Ok(m) => m,
            Err(f) => return self.start_failed(i, f),
        };
        let mut vars: Vec<(String, String)> = vec![
            ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
            ("HOSTNAME".to_owned(), self.name.clone()),
            // Not the host user's home: nothing (e.g. ~/.kube/config) leaks in.
            ("HOME".to_owned(), self.dir.display().to_string()),
            (
                "KUBERNETES_SERVICE_HOST".to_owned(),
                self.shared.config.api_server_host.clone(),
            ),
            (
                "KUBERNETES_SERVICE_PORT".to_owned(),
                self.shared.config.api_server_port.to_string(),
            ),
            (
                "KUBERNETES_SERVICE_PORT_HTTPS".to_owned(),
                self.shared.config.api_server_port.to_string(),
            ),
        ];
        for (k, v) in resolved {
            if let Some(slot) = vars.iter_mut().find(|(n, _)| *n == k) {
                slot.1 = v;
            } else {
                vars.push((k, v));
            }
        }
        let c = &mut self.containers[i];
        let (program, args) = Self::program(c, &vars);
        if c.binary.as_deref() == Some(program.as_path()) && !program.is_file() {
            let f = PodFailure::config(format!(
                "image {:?} maps to {}, which does not exist yet (build it with cargo)",
                spec.image.as_deref().unwrap_or(""),
                program.display()
            ));
            return self.start_failed(i, f);
        }
        let cwd = match spec.working_dir.as_deref().filter(|w| !w.is_empty()) {
            Some(w) => PathBuf::from(w),
            None => self.dir.clone(),
        };
        let exec = Exec {
            program: program.clone(),
            args,
            env: vars,
            mounts,
            cwd,
        };
        let log = self.dir.join(format!("{}.log", spec.name));
        let header = format!(
            "==> keystone-process-kubelet: start #{} of {} at {}: {} {:?}\n",
            c.starts + 1,
            spec.name,
            Timestamp::now(),
            program.display(),
            exec.args
        );
        if let Err(e) = append(&log, &header) {
            tracing::warn!(pod = %key, error = %e, "cannot write container log");
        }
        let child = match exec.spawn(&log) {
            Ok(child) => child,
            Err(e) => {
                let f = PodFailure::config(format!("starting {}: {e}", program.display()));
                c.crash_streak += 1;
                return self.start_failed(i, f);
            }
        };
        let pid = child.id().unwrap_or_default();
        if let Some(start) = process::start_time(pid) {
            write_pid_file(
                &self.shared.config.state_dir,
                &self.uid,
                &spec.name,
                pid,
                &start,
            );
        }
        tracing::info!(pod = %key, container = %spec.name, pid, program = %program.display(), "container started");
        self.events.push((
            EventType::Normal,
            "Started",
            format!(
                "Started container {} (pid {pid}, {})",
                spec.name,
                program.display()
            ),
        ));
        let c = &mut self.containers[i];
        c.last_failure = None;
        c.wildcard_reported = false;
        c.child = Some(child);
        c.pid = Some(pid);
        c.starts += 1;
        c.started_at = Some(now());
        c.started_instant = Some(Instant::now());
        c.state = ContainerState {
            running: Some(ContainerStateRunning {
                started_at: c.started_at.clone(),
            }),
            ..Default::default()
        };
        c.generation += 1;
        c.exec = Some(exec);
        c.started = spec.startup_probe.is_none();
        c.ready = spec.readiness_probe.is_none() && c.started;
        if let Some(p) = spec.startup_probe.clone() {
            self.spawn_probe(i, ProbeKind::Startup, p);
        } else {
            self.spawn_regular_probes(i);
        }
    }

    /// Init container `i` exited 0 (and stays done).
    fn init_completed(&self, i: usize) -> bool {
        let c = &self.containers[i];
        c.done
            && c.state
                .terminated
                .as_ref()
                .is_some_and(|t| t.exit_code == 0)
    }

    fn start_failed(&mut self, i: usize, f: PodFailure) {
        let c = &mut self.containers[i];
        tracing::warn!(pod = %format!("{}/{}", self.ns, self.name), container = %c.spec.name, reason = %f, "cannot start container");
        c.state = waiting(f.reason(), Some(f.message.clone()));
        c.next_start = Instant::now() + Duration::from_secs(1);
        if c.last_failure.as_deref() != Some(f.message.as_str()) {
            c.last_failure = Some(f.message.clone());
            self.events
                .push((EventType::Warning, "Failed", f.message.clone()));
        }
        if f.kind == FailureKind::Unsupported {
            self.unsupported = Some(f);
        }
    }

    fn spawn_regular_probes(&mut self, i: usize) {
        let spec = &self.containers[i].spec;
        let readiness = spec.readiness_probe.clone();
        let liveness = spec.liveness_probe.clone();
        if let Some(p) = readiness {
            self.spawn_probe(i, ProbeKind::Readiness, p);
        }
        if let Some(p) = liveness {
            self.spawn_probe(i, ProbeKind::Liveness, p);
        }
    }

    fn spawn_probe(&mut self, i: usize, kind: ProbeKind, p: k8s_openapi::api::core::v1::Probe) {
        let c = &mut self.containers[i];
        let Some(exec) = c.exec.clone() else { return };
        let target = probe::Target {
            pod_ip: IpAddr::V4(self.ip.unwrap_or(Ipv4Addr::LOCALHOST)),
            container: c.spec.clone(),
            exec,
        };
        let handle = tokio::spawn(probe::run(
            kind,
            p,
            target,
            i,
            c.generation,
            self.probe_tx.clone(),
        ));
        c.probes.push(handle);
    }

    fn apply_probe(&mut self, r: ProbeResult) {
        let key = self.key();
        let grace = self.grace();
        let Some(c) = self.containers.get_mut(r.container) else {
            return;
        };
        if r.generation != c.generation || !c.running() {
            return;
        }
        tracing::info!(pod = %key, container = %c.spec.name, kind = ?r.kind, healthy = r.healthy, message = %r.message, "probe verdict");
        if !r.healthy {
            let note = format!(
                "{:?} probe of container {} failed: {}",
                r.kind, c.spec.name, r.message
            );
            self.events.push((EventType::Warning, "Unhealthy", note));
        }
        let Some(c) = self.containers.get_mut(r.container) else {
            return;
        };
        match (r.kind, r.healthy) {
            (ProbeKind::Readiness, ready) => c.ready = ready && c.started,
            (ProbeKind::Startup, true) => {
                c.started = true;
                c.ready = c.spec.readiness_probe.is_none();
                self.spawn_regular_probes(r.container);
            }
            (ProbeKind::Liveness | ProbeKind::Startup, false) => {
                // Like the kubelet: kill, then the restart policy decides.
                c.ready = false;
                c.kill_reason = Some(format!("{:?}ProbeFailed: {}", r.kind, r.message));
                if let Some(pid) = c.pid {
                    process::signal_group(pid, Signal::SIGTERM);
                    c.kill_at = Some(Instant::now() + grace);
                }
                let note = format!(
                    "Container {} failed its {:?} probe, will be restarted",
                    c.spec.name, r.kind
                );
                self.events.push((EventType::Normal, "Killing", note));
            }
            (ProbeKind::Liveness, true) => {}
        }
    }

    /// SIGTERM to every running container, SIGKILL after `grace`.
    async fn terminate_all(&mut self, grace: Duration) {
        for c in &mut self.containers {
            c.stop_probes();
            if let Some(pid) = c.pid {
                process::signal_group(pid, Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        loop {
            let mut alive = false;
            for c in &mut self.containers {
                if let Some(child) = c.child.as_mut() {
                    match child.try_wait() {
                        Ok(None) => alive = true,
                        _ => {
                            c.child = None;
                        }
                    }
                }
            }
            if !alive {
                break;
            }
            if Instant::now() >= deadline {
                for c in &mut self.containers {
                    if let (Some(pid), Some(_)) = (c.pid, c.child.as_ref()) {
                        tracing::info!(pod = %format!("{}/{}", self.ns, self.name), container = %c.spec.name, pid, "grace period over: SIGKILL");
                        process::signal_group(pid, Signal::SIGKILL);
                    }
                }
                for c in &mut self.containers {
                    if let Some(mut child) = c.child.take() {
                        let _ = child.wait().await;
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for c in &mut self.containers {
            // The group may hold children that outlived their parent.
            if let Some(pid) = c.pid.take() {
                process::signal_group(pid, Signal::SIGKILL);
            }
            remove_pid_file(&self.shared.config.state_dir, &self.uid, &c.spec.name);
        }
    }

    fn release(&mut self) {
        if let Some(ip) = self.ip.take()
            && let Ok(mut pool) = self.shared.ips.lock()
        {
            pool.release(ip);
        }
        // Volumes go; logs stay for post-mortems until `e2e/testbed down`.
        let _ = std::fs::remove_dir_all(self.dir.join("volumes"));
    }

    fn condition(
        &mut self,
        type_: &str,
        ok: bool,
        reason: Option<&str>,
        message: Option<String>,
    ) -> PodCondition {
        let status = if ok { "True" } else { "False" }.to_owned();
        let entry = self
            .transitions
            .entry(type_.to_owned())
            .or_insert_with(|| (status.clone(), now()));
        if entry.0 != status {
            *entry = (status.clone(), now());
        }
        PodCondition {
            type_: type_.to_owned(),
            status,
            reason: reason.map(str::to_owned),
            message,
            last_transition_time: Some(entry.1.clone()),
            ..Default::default()
        }
    }

    fn status(&mut self) -> PodStatus {
        let policy_always = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .is_none_or(|p| p == "Always");
        let regular = || self.containers.iter().filter(|c| !c.init);
        let failed_exit = |c: &ContainerRun| {
            c.done
                && c.state
                    .terminated
                    .as_ref()
                    .is_some_and(|t| t.exit_code != 0)
        };
        let init_failed = self.containers.iter().any(|c| c.init && failed_exit(c));
        let initialized = self
            .containers
            .iter()
            .filter(|c| c.init)
            .all(|c| c.done && !failed_exit(c));
        let all_done = regular().all(|c| c.done);
        let phase = if self.unsupported.is_some() {
            "Pending"
        } else if init_failed {
            "Failed"
        } else if !initialized {
            "Pending"
        } else if all_done && !policy_always {
            if regular().any(failed_exit) {
                "Failed"
            } else {
                "Succeeded"
            }
        } else if regular().any(|c| c.starts > 0) {
            "Running"
        } else {
            "Pending"
        };
        let all_ready = regular().count() > 0 && regular().all(|c| c.ready);
        let not_ready: Vec<&str> = regular()
            .filter(|c| !c.ready)
            .map(|c| c.spec.name.as_str())
            .collect();
        let unready_msg = (!all_ready)
            .then(|| format!("containers with unready status: [{}]", not_ready.join(" ")));
        let unsupported = self.unsupported.clone();
        let (ready_reason, ready_msg) = match &unsupported {
            Some(f) => (Some("Unsupported"), Some(f.message.clone())),
            None => (
                (!all_ready).then_some("ContainersNotReady"),
                unready_msg.clone(),
            ),
        };
        let mut conditions = vec![
            self.condition("PodReadyToStartContainers", self.ip.is_some(), None, None),
            self.condition(
                "Initialized",
                initialized,
                (!initialized).then_some("ContainersNotInitialized"),
                None,
            ),
            self.condition(
                "Ready",
                all_ready && phase == "Running",
                ready_reason,
                ready_msg,
            ),
            self.condition(
                "ContainersReady",
                all_ready,
                (!all_ready).then_some("ContainersNotReady"),
                unready_msg,
            ),
            self.condition("PodScheduled", true, None, None),
        ];
        if let Some(f) = &unsupported {
            conditions.push(self.condition(
                "keystone.dev/ProcessKubeletSupported",
                false,
                Some("Unsupported"),
                Some(f.message.clone()),
            ));
        }
        let statuses: Vec<(bool, ContainerStatus)> = self
            .containers
            .iter()
            .map(|c| {
                let mut state = c.state.clone();
                if !c.init && c.starts == 0 && !initialized {
                    state = waiting("PodInitializing", None);
                }
                if let Some(f) = &unsupported
                    && !c.running()
                {
                    let reason = if c.binary.is_none() {
                        "ImageNotMapped"
                    } else {
                        "Unsupported"
                    };
                    state = waiting(reason, Some(f.message.clone()));
                }
                let status = ContainerStatus {
                    name: c.spec.name.clone(),
                    image: c.spec.image.clone().unwrap_or_default(),
                    image_id: c
                        .binary
                        .as_ref()
                        .map(|b| format!("process://{}", b.display()))
                        .unwrap_or_default(),
                    container_id: c.pid.map(|p| format!("process://{p}")),
                    ready: c.ready,
                    started: Some(c.running() && c.started),
                    restart_count: (c.starts - 1).max(0),
                    state: Some(state),
                    last_state: c.last_state.clone(),
                    ..Default::default()
                };
                (c.init, status)
            })
            .collect();
        let (init_statuses, container_statuses): (Vec<_>, Vec<_>) =
            statuses.into_iter().partition(|(init, _)| *init);
        let strip =
            |v: Vec<(bool, ContainerStatus)>| v.into_iter().map(|(_, s)| s).collect::<Vec<_>>();
        let init_statuses = strip(init_statuses);
        let container_statuses = strip(container_statuses);
        let ip = self.ip.map(|i| i.to_string());
        PodStatus {
            phase: Some(phase.to_owned()),
            conditions: Some(conditions),
            container_statuses: Some(container_statuses),
            init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
            host_ip: Some("127.0.0.1".to_owned()),
            host_ips: Some(vec![k8s_openapi::api::core::v1::HostIP {
                ip: "127.0.0.1".to_owned(),
            }]),
            pod_ip: ip.clone(),
            pod_ips: ip.map(|ip| vec![PodIP { ip }]),
            start_time: Some(self.start_time.clone()),
            reason: unsupported.as_ref().map(|_| "Unsupported".to_owned()),
            message: unsupported.map(|f| f.message),
            ..Default::default()
        }
    }

    async fn publish_events(&mut self) {
        if self.events.is_empty() {
            return;
        }
        let reference = self.pod.object_ref(&());
        for (type_, reason, note) in std::mem::take(&mut self.events) {
            let event = Event {
                type_,
                reason: reason.to_owned(),
                note: Some(note),
                action: reason.to_owned(),
                secondary: None,
            };
            if let Err(e) = self.shared.recorder.publish(&event, &reference).await {
                tracing::debug!(pod = %self.key(), error = %e, "publishing an event failed");
            }
        }
    }

    async fn report(&mut self) {
        self.publish_events().await;
        let status = self.status();
        let patch = serde_json::json!({ "status": status });
        if self.last_reported.as_ref() == Some(&patch) {
            return;
        }
        let api: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.shared.client.clone(), &self.ns);
        match api
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => self.last_reported = Some(patch),
            Err(e) => tracing::warn!(pod = %self.key(), error = %e, "pod status update failed"),
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

fn pid_file(state: &Path, uid: &str, container: &str) -> PathBuf {
    state.join("pids").join(format!("{uid}_{container}.pid"))
}

/// Recorded so `e2e/testbed down` can stop processes a killed kubelet left.
fn write_pid_file(state: &Path, uid: &str, container: &str, pid: u32, start: &str) {
    if let Err(e) = std::fs::write(pid_file(state, uid, container), format!("{pid} {start}\n")) {
        tracing::warn!(error = %e, "cannot write pid file");
    }
}

fn remove_pid_file(state: &Path, uid: &str, container: &str) {
    let _ = std::fs::remove_file(pid_file(state, uid, container));
}

fn append(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(command: &[&str], args: &[&str]) -> ContainerRun {
        let spec: Container = serde_json::from_value(serde_json::json!({
            "name": "c",
            "image": "keystone/runtime:dev",
            "command": command,
            "args": args,
        }))
        .unwrap();
        ContainerRun::new(
            spec,
            Some(PathBuf::from("/repo/target/debug/keystone-runtime")),
            false,
        )
    }

    #[test]
    fn the_mapped_binary_is_the_entrypoint() {
        let vars = vec![("STAGE".to_owned(), "s0".to_owned())];
        let bin = PathBuf::from("/repo/target/debug/keystone-runtime");
        // No command: binary + args, with $(VAR) expanded.
        let (p, a) = PodWorker::program(&run(&[], &["serve", "--stage", "$(STAGE)"]), &vars);
        assert_eq!(
            (p, a),
            (
                bin.clone(),
                vec!["serve".into(), "--stage".into(), "s0".into()]
            )
        );
        // A command naming the binary (by file name or path) runs it.
        let (p, a) = PodWorker::program(&run(&["keystone-runtime", "serve"], &["-v"]), &vars);
        assert_eq!((p, a), (bin.clone(), vec!["serve".into(), "-v".into()]));
        let (p, _) = PodWorker::program(&run(&["/usr/local/bin/keystone-runtime"], &[]), &vars);
        assert_eq!(p, bin);
        // Any other command runs from the host.
        let (p, a) = PodWorker::program(&run(&["sh", "-c"], &["echo hi"]), &vars);
        assert_eq!(
            (p, a),
            (PathBuf::from("sh"), vec!["-c".into(), "echo hi".into()])
        );
    }
}
