//! Stopping the processes and giving back the pod's IP and volumes.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::PodWorker;
use super::start;
use crate::kubelet::process;

impl PodWorker {
    /// SIGTERM to every running container, SIGKILL after `grace`.
    pub(super) async fn terminate_all(&mut self, grace: Duration) {
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
            start::remove_pid_file(&self.shared.config.state_dir, &self.uid, &c.spec.name);
        }
    }

    pub(super) fn release(&mut self) {
        if let Some(ip) = self.ip.take()
            && let Ok(mut pool) = self.shared.ips.lock()
        {
            pool.release(ip);
        }
        // Volumes go; logs stay for post-mortems until `e2e/testbed down`.
        let _ = std::fs::remove_dir_all(self.dir.join("volumes"));
    }
}
