//! What the process kubelet cannot run, found before anything starts.

use super::PodWorker;
use crate::kubelet::PodFailure;
use crate::kubelet::probe;
use crate::kubelet::volumes;

impl PodWorker {
    /// Everything the process kubelet cannot do, reported instead of ignored.
    pub(super) fn check_supported(&self) -> Result<(), PodFailure> {
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
}
