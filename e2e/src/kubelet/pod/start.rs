//! Starting a container as a process: program, environment, log, pid file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ContainerState, ContainerStateRunning};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;

use super::{ContainerRun, PodWorker, now, waiting};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
use crate::kubelet::env;
use crate::kubelet::probe::ProbeKind;
use crate::kubelet::process::{self, Exec};
use crate::kubelet::volumes;
use crate::kubelet::{FailureKind, PodFailure};

impl PodWorker {
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

    pub(super) async fn start(&mut self, i: usize) {
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

pub(super) fn remove_pid_file(state: &Path, uid: &str, container: &str) {
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
    use k8s_openapi::api::core::v1::Container;

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
