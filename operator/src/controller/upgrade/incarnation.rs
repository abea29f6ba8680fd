//! Internal state belongs to one incarnation of a pipeline: one `metadata.uid`.
//!
//! Changelog topics and consumer groups are named after the pipeline, and a
//! `Retain` pipeline's topics outlive it, so a Pipeline deleted and created again
//! under the same name would find the old one's dedup and order state and its
//! committed offsets, and silently carry on from them. Before its first
//! deployment a pipeline therefore settles whose state it runs on:
//!
//! - nothing left by anyone: it starts empty (`StateOrigin`, reason `Fresh`);
//! - state left by an earlier incarnation: it starts empty, as a new pipeline
//!   would (a restore that empties every changelog and reads the source from
//!   the beginning; later stages skip what their input topics already hold),
//!   reason `Discarded`, naming the earlier UID when known;
//! - unless the Pipeline is created with the annotation
//!   `keystone.dev/adopt-state-from: <uid of the earlier incarnation>`
//!   (or `any`): then it continues from that state, reason `Adopted`. An
//!   annotation naming another UID than the one recorded holds the pipeline
//!   (`AdoptRefused`) rather than discard what the user meant to keep.
//!
//! The owning UID of each pipeline's state is recorded in the ConfigMaps
//! `keystone-state-owners-00` to `-31` of the operator's namespace
//! (`<namespace>.<pipeline>` = uid, in the one its key hashes to; the single
//! `keystone-state-owners` of earlier operators is still read), written after
//! the decision is in the status. Upgrades, rollbacks and restores of one Pipeline never come here:
//! they have a deployed plan. A pipeline deployed by an operator that predates
//! this record keeps its state and is recorded as the owner (reason `Existing`).

use std::time::Duration;

use keystone_crds::Plan;
use keystone_crds::pipeline::Pipeline;
use kube::ResourceExt;

use super::health::pipeline_pods;
use super::restore::write_restore;
use crate::checkpoint as ckpt;
use crate::context::Context;
use crate::controller::Observed;
use crate::error::Error;
use crate::rollout;
use crate::status::Cond;

/// The condition that says whose state the pipeline started from.
pub const STATE_ORIGIN: &str = "StateOrigin";
/// The opt-in to continue from an earlier incarnation's state.
pub const ANNOTATION_ADOPT_STATE: &str = "keystone.dev/adopt-state-from";
/// The annotation value that adopts whatever earlier state there is.
pub const ADOPT_ANY: &str = "any";
/// The ConfigMaps (operator namespace, `<this>-<nn>`, see [`crate::ledger::ShardedMap`])
/// recording which UID owns each pipeline's state.
pub const STATE_OWNERS: &str = "keystone-state-owners";
/// How often a pipeline waits for its previous incarnation's pods to exit.
const PREVIOUS_PODS_RECHECK: Duration = Duration::from_secs(5);

fn owner_key(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// What a new incarnation does with the state it finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to take over (or it is already this incarnation's).
    Fresh { adopt_ignored: bool },
    /// The state is this incarnation's already (recorded, or deployed before the record existed).
    Kept,
    /// Continue from the earlier state.
    Adopt { from: Option<String> },
    /// Start empty; the earlier state is emptied.
    Discard { from: Option<String> },
    /// The annotation names another incarnation than the one that left the state.
    Refuse {
        asked: String,
        found: Option<String>,
    },
}

/// The decision, from the recorded owner, whether any state was found in
/// Kafka, and the annotation.
pub fn decide(uid: &str, recorded: Option<&str>, found: bool, adopt: Option<&str>) -> Decision {
    if recorded == Some(uid) {
        return Decision::Kept;
    }
    let from = recorded.map(str::to_owned);
    // A record of another UID is state even when Kafka shows none right now
    // (a group whose offsets expired, a changelog not yet readable): emptying
    // nothing is harmless, keeping someone else's state is not.
    let leftovers = found || from.is_some();
    match adopt.map(str::trim).filter(|a| !a.is_empty()) {
        None if leftovers => Decision::Discard { from },
        None => Decision::Fresh {
            adopt_ignored: false,
        },
        Some(_) if !leftovers => Decision::Fresh {
            adopt_ignored: true,
        },
        Some(asked) if asked == ADOPT_ANY || from.as_deref() == Some(asked) => {
            Decision::Adopt { from }
        }
        Some(asked) => Decision::Refuse {
            asked: asked.to_owned(),
            found: from,
        },
    }
}

fn describe(from: Option<&str>) -> String {
    from.map_or_else(
        || "an earlier pipeline of this name (deleted before its owner was recorded)".to_owned(),
        |uid| format!("incarnation {uid}"),
    )
}

/// Before the first deployment: settles whose state this incarnation runs on
/// and records it (status first, then the owner record). Some(wait) holds the
/// deployment.
pub(super) async fn settle(
    pipeline: &Pipeline,
    ctx: &Context,
    plan: &Plan,
    observed: &mut Observed,
) -> Result<Option<Duration>, Error> {
    if settled(observed) {
        return Ok(None);
    }
    let uid = pipeline.uid().ok_or(Error::MissingField {
        kind: "Pipeline",
        field: "metadata.uid",
    })?;
    let key = owner_key(&observed.namespace, &observed.name);
    let recorded = ctx.state_owners.get(&key).await?;
    if recorded.as_deref() != Some(uid.as_str()) {
        // Pods of a deleted incarnation may still be finishing; they could
        // commit after whatever is decided here. A capture holds no stage
        // state (and this incarnation's may already run: it describes the
        // table before the first deployment).
        let previous = pipeline_pods(ctx, plan)
            .await?
            .iter()
            .filter(|pod| !crate::resources::is_source_pod(pod))
            .count();
        if previous > 0 {
            observed.set(&Cond::new(
                STATE_ORIGIN,
                false,
                "PreviousIncarnationRunning",
                format!(
                    "waiting for {previous} pod(s) of an earlier pipeline of this name to exit before deciding whose state to start from"
                ),
            ));
            return Ok(Some(PREVIOUS_PODS_RECHECK));
        }
    }
    let found = if recorded.is_some() {
        Vec::new()
    } else {
        ckpt::retained_state(ctx, plan)
            .await
            .map_err(|f| Error::Restore(f.reason))?
    };
    let adopt = pipeline.annotations().get(ANNOTATION_ADOPT_STATE).cloned();
    let decision = decide(
        &uid,
        recorded.as_deref(),
        !found.is_empty(),
        adopt.as_deref(),
    );
    let seen = if found.is_empty() {
        String::new()
    } else {
        format!(" ({})", found.join("; "))
    };
    let cond = match &decision {
        Decision::Kept => Cond::new(
            STATE_ORIGIN,
            true,
            "Kept",
            "the state is this incarnation's",
        ),
        Decision::Fresh { adopt_ignored } => Cond::new(
            STATE_ORIGIN,
            true,
            "Fresh",
            if *adopt_ignored {
                format!(
                    "started empty: {ANNOTATION_ADOPT_STATE} is set, but no earlier state of this pipeline exists"
                )
            } else {
                "started empty: no earlier state of this pipeline exists".to_owned()
            },
        ),
        Decision::Adopt { from } => Cond::new(
            STATE_ORIGIN,
            true,
            "Adopted",
            format!(
                "adopted the state of {}{seen}, as {ANNOTATION_ADOPT_STATE} asks",
                describe(from.as_deref())
            ),
        ),
        Decision::Discard { from } => Cond::new(
            STATE_ORIGIN,
            true,
            "Discarded",
            format!(
                "started empty: the state of {}{seen} was discarded (changelogs emptied, the source read from the beginning); to continue from an earlier incarnation's state instead, create the Pipeline with the annotation {ANNOTATION_ADOPT_STATE}: <its uid>",
                describe(from.as_deref())
            ),
        ),
        Decision::Refuse { asked, found } => {
            let message = format!(
                "{ANNOTATION_ADOPT_STATE} asks for the state of incarnation {asked}, but the state here is {}; nothing is deployed: set the annotation to that uid (or `{ADOPT_ANY}`) to adopt it, or remove it to start empty",
                describe(found.as_deref())
            );
            observed.set(&Cond::new(STATE_ORIGIN, false, "AdoptRefused", message));
            return Ok(Some(Duration::from_secs(60)));
        }
    };
    if let Decision::Discard { .. } = decision {
        let downstream = rollout::downstream_inputs(plan);
        let cluster = ctx.config.resolve_cluster(plan.source.cluster.as_deref());
        let ends = ckpt::end_offsets(ctx, cluster.as_deref(), &downstream)
            .await
            .map_err(|f| Error::Restore(f.reason))?;
        let id = format!("fresh-{}", uid.chars().take(8).collect::<String>());
        let restore = rollout::fresh_start(&id, plan, &ends);
        write_restore(
            pipeline,
            ctx,
            plan,
            &restore,
            "NewIncarnation",
            None,
            &mut observed.status,
        )
        .await?;
    }
    let event = matches!(decision, Decision::Adopt { .. } | Decision::Discard { .. });
    observed.set(&cond);
    // The decision is in the status before the record says the state is ours:
    // a crash in between decides again, the same way.
    observed.record(pipeline, ctx).await?;
    ctx.state_owners.set(&key, &uid).await?;
    if event {
        ctx.publish(
            pipeline,
            false,
            &format!("State{}", cond.reason),
            "Deploy",
            cond.message.clone(),
        )
        .await;
    }
    Ok(None)
}

/// A pipeline deployed before state ownership was recorded (an operator
/// upgrade): its state is its own; record that once.
pub(super) async fn record_existing(
    pipeline: &Pipeline,
    ctx: &Context,
    observed: &mut Observed,
) -> Result<(), Error> {
    if settled(observed) {
        return Ok(());
    }
    let Some(uid) = pipeline.uid() else {
        return Ok(());
    };
    let key = owner_key(&observed.namespace, &observed.name);
    ctx.state_owners.set(&key, &uid).await?;
    observed.set(&Cond::new(
        STATE_ORIGIN,
        true,
        "Existing",
        "the state is this incarnation's: it was deployed before state ownership was recorded",
    ));
    Ok(())
}

fn settled(observed: &Observed) -> bool {
    observed
        .status
        .conditions
        .iter()
        .any(|c| c.type_ == STATE_ORIGIN && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_incarnation_starts_empty_unless_it_adopts_the_state_it_names() {
        let me = "uid-new";
        assert_eq!(decide(me, Some(me), true, None), Decision::Kept);
        assert_eq!(
            decide(me, None, false, None),
            Decision::Fresh {
                adopt_ignored: false
            }
        );
        assert_eq!(
            decide(me, None, false, Some("uid-old")),
            Decision::Fresh {
                adopt_ignored: true
            }
        );
        // Found in Kafka, owner unknown (deleted before the record existed).
        assert_eq!(
            decide(me, None, true, None),
            Decision::Discard { from: None }
        );
        // A record of another incarnation is enough, even if Kafka shows nothing.
        assert_eq!(
            decide(me, Some("uid-old"), false, None),
            Decision::Discard {
                from: Some("uid-old".into())
            }
        );
        assert_eq!(
            decide(me, Some("uid-old"), true, Some("uid-old")),
            Decision::Adopt {
                from: Some("uid-old".into())
            }
        );
        assert_eq!(
            decide(me, None, true, Some(ADOPT_ANY)),
            Decision::Adopt { from: None }
        );
        assert_eq!(
            decide(me, Some("uid-old"), true, Some("uid-other")),
            Decision::Refuse {
                asked: "uid-other".into(),
                found: Some("uid-old".into())
            }
        );
        // An empty annotation is no opt-in.
        assert_eq!(
            decide(me, Some("uid-old"), true, Some(" ")),
            Decision::Discard {
                from: Some("uid-old".into())
            }
        );
    }
}
