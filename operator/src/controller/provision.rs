//! Topics: observe, claim, create, raise, correct; delete on `Delete`.

use super::*;
use crate::kafka::Admin;

pub(super) struct TopicsOutcome {
    pub(super) statuses: Vec<TopicStatus>,
    pub(super) condition: Cond,
    pub(super) blocked: bool,
}

pub(super) async fn reconcile_topics(
    pipeline: &Pipeline,
    ctx: &Context,
    owner: &Owner,
    desired: &[DesiredTopic],
) -> Result<TopicsOutcome, Error> {
    let mut by_cluster: BTreeMap<&str, Vec<&DesiredTopic>> = BTreeMap::new();
    for topic in desired {
        by_cluster
            .entry(topic.cluster.as_str())
            .or_default()
            .push(topic);
    }
    let mut ledger = ctx.ledger.read().await?;
    let mut statuses = Vec::new();
    let mut problems = Vec::new();
    for (cluster, topics) in by_cluster {
        let admin = ctx.admin(cluster).await?;
        let names: Vec<String> = topics.iter().map(|t| t.name.clone()).collect();
        let partitions = admin.partitions(&names).await?;
        let mut observed = BTreeMap::new();
        for topic in &topics {
            if let Some(&count) = partitions.get(&topic.name) {
                let mine = ledger.ownership(cluster, &topic.name, owner) == Ownership::Mine;
                observed.insert(
                    topic.name.clone(),
                    admin
                        .observe(&topic.name, count, topic.create && mine)
                        .await?,
                );
            }
        }
        let owned_topics: Vec<DesiredTopic> = topics.iter().map(|t| (*t).clone()).collect();
        let resolved = resolve_partitions(&owned_topics, &observed);
        // Claim before creating: a crash in between leaves a claim, never an orphan.
        let to_claim: Vec<String> = topics
            .iter()
            .filter(|t| {
                t.create
                    && !observed.contains_key(&t.name)
                    && ledger.ownership(cluster, &t.name, owner) == Ownership::Unclaimed
            })
            .map(|t| ledger_key(cluster, &t.name))
            .collect();
        if !to_claim.is_empty() {
            ledger = ctx.ledger.claim(&to_claim, owner).await?;
        }
        for topic in topics {
            let ownership = ledger.ownership(cluster, &topic.name, owner);
            let decision = decide(
                topic,
                observed.get(&topic.name),
                &ownership,
                resolved.get(&topic.name).copied(),
            );
            let mut rejected = None;
            for step in &decision.steps {
                match execute(pipeline, ctx, &admin, topic, step).await {
                    Ok(()) => {}
                    Err(error) if error.is_spec_rejection() => {
                        rejected = Some(TopicProblem::Rejected {
                            error: error.to_string(),
                        });
                        break;
                    }
                    Err(error) => return Err(error),
                }
            }
            if let Some(problem) = rejected.as_ref().or(decision.problem.as_ref()) {
                problems.push((topic.name.clone(), problem.clone()));
            }
            statuses.push(TopicStatus {
                name: topic.name.clone(),
                role: topic.role.as_str().to_owned(),
                partitions: decision.partitions,
                // Claimed but not created yet (its partitions unknown) is not "created".
                created: decision.owned && decision.partitions.is_some(),
            });
        }
    }
    // A missing topic explains the ones whose partitions follow it: say it once.
    if problems.iter().any(|(_, p)| *p == TopicProblem::Missing) {
        problems.retain(|(_, p)| !matches!(p, TopicProblem::Unresolved { .. }));
    }
    let blocked = problems.iter().any(|(_, p)| p.blocks_runtime());
    let condition = match problems.first() {
        None => Cond::new(
            TOPICS_READY,
            true,
            "TopicsReady",
            format!("{} topic(s) exist as the plan needs them", statuses.len()),
        ),
        Some((_, first)) => Cond::new(
            TOPICS_READY,
            false,
            first.reason(),
            problems
                .iter()
                .map(|(name, p)| p.describe(name))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    Ok(TopicsOutcome {
        statuses,
        condition,
        blocked,
    })
}

async fn execute(
    pipeline: &Pipeline,
    ctx: &Context,
    admin: &Admin,
    topic: &DesiredTopic,
    step: &TopicStep,
) -> Result<(), Error> {
    match step {
        TopicStep::Create {
            partitions,
            replication_factor,
            config,
        } => {
            admin
                .create(&topic.name, *partitions, *replication_factor, config)
                .await?;
            info!(topic = %topic.name, partitions, "created topic");
            ctx.metrics
                .topic_changes
                .with_label_values(&["created"])
                .inc();
            ctx.publish(
                pipeline,
                false,
                "TopicCreated",
                "CreateTopic",
                format!(
                    "created {} topic {:?} on cluster {:?} with {partitions} partition(s)",
                    topic.role.as_str(),
                    topic.name,
                    topic.cluster
                ),
            )
            .await;
        }
        TopicStep::RaisePartitions { from, to } => {
            admin.raise_partitions(&topic.name, *to).await?;
            info!(topic = %topic.name, from, to, "raised partitions");
            ctx.metrics
                .topic_changes
                .with_label_values(&["partitions_raised"])
                .inc();
            ctx.publish(
                pipeline,
                false,
                "PartitionsRaised",
                "RaisePartitions",
                format!(
                    "raised topic {:?} from {from} to {to} partitions",
                    topic.name
                ),
            )
            .await;
        }
        TopicStep::CorrectConfig { config, drift } => {
            admin.set_config(&topic.name, config).await?;
            info!(topic = %topic.name, ?drift, "corrected topic config drift");
            ctx.metrics
                .topic_changes
                .with_label_values(&["config_corrected"])
                .inc();
            ctx.publish(
                pipeline,
                true,
                "TopicConfigDrift",
                "CorrectTopicConfig",
                format!(
                    "topic {:?} config differed from the spec and was corrected: {}",
                    topic.name,
                    drift.join(", ")
                ),
            )
            .await;
        }
    }
    Ok(())
}

pub(super) async fn delete_owned_topics(
    pipeline: &Pipeline,
    ctx: &Context,
    owner: &Owner,
) -> Result<(), Error> {
    let ledger = ctx.ledger.read().await?;
    let owned = ledger.owned_by(owner);
    let mut released = Vec::new();
    for (cluster, topic) in owned {
        if ctx.config.kafka_clusters.contains_key(&cluster) {
            let admin = ctx.admin(&cluster).await?;
            admin.delete(&topic).await?;
            ctx.metrics
                .topic_changes
                .with_label_values(&["deleted"])
                .inc();
            ctx.publish(
                pipeline,
                false,
                "TopicDeleted",
                "DeleteTopic",
                format!(
                    "deleted topic {topic:?} on cluster {cluster:?} (topicDeletionPolicy: Delete)"
                ),
            )
            .await;
        } else {
            warn!(%cluster, %topic, "cluster no longer configured; releasing the claim without deleting");
        }
        released.push(ledger_key(&cluster, &topic));
    }
    if !released.is_empty() {
        ctx.ledger.release(&released, owner).await?;
    }
    Ok(())
}
