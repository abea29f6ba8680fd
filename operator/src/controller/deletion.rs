//! A deleted Pipeline: the finalizer that holds its deletion while its
//! topics, capture slot and Kafka principal go, and the cleanup itself.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use keystone_crds::pipeline::{Pipeline, TopicDeletionPolicy};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::key_of;
use super::provision::delete_owned_topics;
use crate::context::Context;
use crate::error::Error;
use crate::topics::Owner;

/// Present only on Pipelines with `topicDeletionPolicy: Delete`: deleting them
/// must wait until their topics are gone. `Retain` pipelines carry none, so
/// their namespace is never held up.
pub const FINALIZER: &str = "keystone.dev/delete-topics";
/// How long a deleted pipeline's topic cleanup may fail before the finalizer
/// is dropped anyway (with a Warning), so a namespace deletion never hangs
/// on an unreachable Kafka.
const CLEANUP_GRACE: Duration = Duration::from_secs(600);

/// Adds the finalizer when the pipeline deletes its topics or has its own
/// Kafka principal (removed with it), removes it otherwise.
pub(super) async fn sync_finalizer(
    pipeline: &Pipeline,
    api: &Api<Pipeline>,
    has_principal: bool,
) -> Result<(), Error> {
    let wants = pipeline.spec.topic_deletion_policy == TopicDeletionPolicy::Delete || has_principal;
    let has = pipeline.finalizers().iter().any(|f| f == FINALIZER);
    if wants == has {
        return Ok(());
    }
    let mut finalizers: Vec<String> = pipeline
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if wants {
        finalizers.push(FINALIZER.to_owned());
    }
    // The resourceVersion makes the patch fail, not clobber, if the list changed meanwhile.
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": pipeline.resource_version(),
        }
    });
    api.patch(
        &pipeline.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// A cleanup step of a deleted pipeline that failed: retried (the error) until
/// [`CLEANUP_GRACE`] after the deletion, then given up with a warning event so
/// that the deletion can finish.
async fn retry_or_give_up(
    pipeline: &Pipeline,
    ctx: &Context,
    error: Error,
    (reason, action, what): (&str, &str, &str),
) -> Result<(), Error> {
    let since = pipeline
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| Timestamp::now().duration_since(t.0).unsigned_abs())
        .unwrap_or_default();
    if since < CLEANUP_GRACE {
        return Err(error);
    }
    ctx.publish(
        pipeline,
        true,
        reason,
        action,
        format!(
            "gave up {what} after {}s so that deletion can finish: {error}; do it by hand",
            since.as_secs()
        ),
    )
    .await;
    Ok(())
}

/// A deleted pipeline: with `Delete`, its created topics go; its Kafka
/// principal and ACLs, when it has them; then the finalizer.
pub(super) async fn cleanup(pipeline: &Pipeline, ctx: &Context) -> Result<Action, Error> {
    let key = key_of(pipeline);
    ctx.metrics.set_phase(&key, None).await;
    if !pipeline.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let namespace = pipeline.namespace().unwrap_or_default();
    let api: Api<Pipeline> = Api::namespaced(ctx.client.clone(), &namespace);
    if pipeline.spec.topic_deletion_policy == TopicDeletionPolicy::Delete {
        let owner = Owner {
            namespace: namespace.clone(),
            name: pipeline.name_any(),
        };
        // The slot first: the capture commits what it holds into its topic
        // before it drops the slot, and cannot once the topic is gone.
        if let Err(error) = crate::capture::drop_slot(pipeline, ctx).await {
            let step = (
                "SlotNotDropped",
                "DropSlot",
                "dropping the capture's replication slot",
            );
            retry_or_give_up(pipeline, ctx, error, step).await?;
        }
        if let Err(error) = delete_owned_topics(pipeline, ctx, &owner).await {
            let step = (
                "TopicsNotDeleted",
                "DeleteTopics",
                "deleting the pipeline's topics",
            );
            retry_or_give_up(pipeline, ctx, error, step).await?;
        }
    }
    if let Err(error) = crate::acls::revoke_pipeline(ctx, pipeline).await {
        let step = (
            "PrincipalNotRemoved",
            "RevokeAcls",
            "removing the pipeline's Kafka principal and ACLs",
        );
        retry_or_give_up(pipeline, ctx, error, step).await?;
    }
    let finalizers: Vec<String> = pipeline
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let patch = json!({ "metadata": { "finalizers": finalizers, "resourceVersion": pipeline.resource_version() } });
    match api
        .patch(
            &pipeline.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}
