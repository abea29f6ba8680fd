//! Probe tasks and what their verdicts do to a container.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use kube::runtime::events::EventType;
use nix::sys::signal::Signal;

use super::PodWorker;
use crate::kubelet::probe::{self, ProbeKind, ProbeResult};
use crate::kubelet::process;

impl PodWorker {
    pub(super) fn spawn_regular_probes(&mut self, i: usize) {
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

    pub(super) fn spawn_probe(
        &mut self,
        i: usize,
        kind: ProbeKind,
        p: k8s_openapi::api::core::v1::Probe,
    ) {
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

    pub(super) fn apply_probe(&mut self, r: ProbeResult) {
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
}
