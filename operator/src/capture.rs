//! The database side of a deleted capture pipeline (`spec.source.postgres`
//! with `topicDeletionPolicy: Delete`): its replication slot is dropped, or
//! the database would keep WAL for it forever. The running capture drops it
//! (`POST /drop-slot` with the control token): it holds the credentials, so
//! the operator needs no access to the user's Secret, and a namespace
//! deletion that already removed the Secret does not stop it. The
//! publication stays: it holds no WAL and may be the user's.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use keystone_crds::Pipeline;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};

use crate::checkpoint::pod_post;
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
    let selector = format!("{LABEL_PIPELINE}={name},{LABEL_STAGE}={CAPTURE_COMPONENT}");
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default().labels(&selector))
        .await?;
    let ip = pods
        .items
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && pod_ready(pod))
        .find_map(|pod| pod.status.as_ref()?.pod_ip.clone())
        .ok_or_else(|| {
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
