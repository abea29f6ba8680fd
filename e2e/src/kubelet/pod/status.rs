//! The pod status and events reported to the API server.

use k8s_openapi::api::core::v1::{ContainerStatus, PodCondition, PodIP, PodStatus};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::Event;
use kube::{Api, Resource as _};

use super::{ContainerRun, PodWorker, now, waiting};

impl PodWorker {
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

    pub(super) async fn publish_events(&mut self) {
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

    pub(super) async fn report(&mut self) {
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
