//! The database side of a deleted capture pipeline (`spec.source.postgres`
//! with `topicDeletionPolicy: Delete`): its replication slot is dropped, or
//! the database would keep WAL for it forever. The running capture drops it
//! (`POST /drop-slot` with the control token): it holds the credentials, so
//! the operator needs no access to the user's Secret, and a namespace
//! deletion that already removed the Secret does not stop it. The
//! publication stays: it holds no WAL and may be the user's.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use keystone_crds::Pipeline;
use keystone_crds::pipeline::CaptureStatus;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};

use crate::checkpoint::{pod_get, pod_post};
use crate::context::Context;
use crate::error::Error;
use crate::resources::{
    CAPTURE_COMPONENT, HTTP_PORT, LABEL_PIPELINE, LABEL_STAGE, pod_ready, stage_object_name,
};

/// Has the capture drop its slot, then removes the capture. An error (no
/// capture running, the database refused) is retried by the caller until it
/// gives up with a warning that names the slot.
pub async fn drop_slot(pipeline: &Pipeline, ctx: &Context) -> Result<(), Error> {
    let Some(postgres) = &pipeline.spec.source.postgres else {
        return Ok(());
    };
    let namespace = pipeline.namespace().unwrap_or_default();
    let name = pipeline.name_any();
    let slot = postgres.slot_name(&namespace, &name);
    let ip = capture_pod_ip(ctx, &namespace, &name).await?.ok_or_else(|| {
            Error::Capture(format!(
                "no running capture to drop replication slot {slot}; drop it with SELECT pg_drop_replication_slot('{slot}') once nothing uses it"
            ))
        })?;
    let token = crate::control::token(ctx, &namespace, &name).await?;
    pod_post(&ip, HTTP_PORT, "/drop-slot", &token)
        .await
        .map_err(|e| Error::Capture(format!("dropping replication slot {slot}: {e}")))?;
    tracing::info!(%slot, pipeline = %name, "the capture dropped its replication slot");
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    match deployments
        .delete(
            &stage_object_name(&name, CAPTURE_COMPONENT),
            &DeleteParams::background(),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The IP of the pipeline's ready capture pod, if one runs.
async fn capture_pod_ip(
    ctx: &Context,
    namespace: &str,
    pipeline: &str,
) -> Result<Option<String>, Error> {
    let selector = format!("{LABEL_PIPELINE}={pipeline},{LABEL_STAGE}={CAPTURE_COMPONENT}");
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await?;
    Ok(pods
        .items
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && pod_ready(pod))
        .find_map(|pod| pod.status.as_ref()?.pod_ip.clone()))
}

/// The capture's progress from its metrics; `None` while no capture answers.
pub async fn status(ctx: &Context, namespace: &str, pipeline: &str) -> Option<CaptureStatus> {
    let ip = capture_pod_ip(ctx, namespace, pipeline).await.ok()??;
    let text = pod_get(&ip, HTTP_PORT, "/metrics").await.ok()?;
    Some(parse_status(&text))
}

fn parse_status(metrics: &str) -> CaptureStatus {
    let value = |name: &str| crate::rollout::metric_sum(metrics, name, None) as i64;
    let last_commit_ms = value("keystone_capture_last_commit_time_ms");
    CaptureStatus {
        snapshot_done: value("keystone_capture_snapshot_done") == 1,
        snapshot_rows: value("keystone_capture_snapshot_committed_rows"),
        snapshot_chunks: value("keystone_capture_snapshot_committed_chunks"),
        retained_wal_bytes: value("keystone_capture_retained_wal_bytes"),
        last_commit_time: (last_commit_ms > 0)
            .then(|| Timestamp::from_millisecond(last_commit_ms).ok())
            .flatten()
            .map(Time),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_reads_the_captures_metrics() {
        let metrics = r#"# HELP keystone_capture_snapshot_done 1 when no snapshot is in progress.
keystone_capture_snapshot_done{slot="s"} 0
keystone_capture_snapshot_committed_rows{slot="s"} 4096
keystone_capture_snapshot_committed_chunks{slot="s"} 1
keystone_capture_retained_wal_bytes{slot="s"} 81920
keystone_capture_last_commit_time_ms{slot="s"} 1796379076153
"#;
        let status = parse_status(metrics);
        assert!(!status.snapshot_done);
        assert_eq!((status.snapshot_rows, status.snapshot_chunks), (4096, 1));
        assert_eq!(status.retained_wal_bytes, 81920);
        assert_eq!(
            status.last_commit_time.unwrap().0.as_millisecond(),
            1_796_379_076_153
        );
        assert_eq!(parse_status("").last_commit_time, None);
    }
}
