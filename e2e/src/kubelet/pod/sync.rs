//! The periodic sync: pod IP, volumes, exits, restarts and starts.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated};
use kube::runtime::events::EventType;
use nix::sys::signal::Signal;

use super::start;
use super::{PodWorker, now, waiting};

const VOLUME_REFRESH: Duration = Duration::from_secs(5);
/// A container that ran this long before exiting restarts without backoff.
const BACKOFF_RESET: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// How long after a start the kubelet looks for wildcard listeners.
const WILDCARD_WATCH: Duration = Duration::from_secs(30);
use crate::kubelet::process;
use crate::kubelet::sockets;
use crate::kubelet::volumes::{self, VolumeContext};
use crate::kubelet::{FailureKind, PodFailure};

impl PodWorker {
    pub(super) async fn sync(&mut self) {
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
        start::remove_pid_file(&self.shared.config.state_dir, &self.uid, &c.spec.name);
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

    /// Init container `i` exited 0 (and stays done).
    fn init_completed(&self, i: usize) -> bool {
        let c = &self.containers[i];
        c.done
            && c.state
                .terminated
                .as_ref()
                .is_some_and(|t| t.exit_code == 0)
    }
}
