//! What to do with each topic of a plan, decided from what Kafka holds and
//! who owns it. Pure: the reconciler observes, this decides, the reconciler acts.
//!
//! Ownership. Kafka has no labels and refuses unknown topic configs, so the
//! operator records which Pipeline created a topic in a ledger ConfigMap in
//! its own namespace (`keystone-topic-owners`, see `ledger.rs`): key
//! `<cluster>.<topic>`, value `<namespace>/<pipeline>`. A claim is written
//! before the topic is created, so a crash between the two never leaves an
//! unowned topic behind. A topic claimed by another pipeline is a conflict,
//! never a takeover. A topic that already exists without a claim was made by
//! someone else: the pipeline uses it as it is and never changes or deletes it.

use std::collections::BTreeMap;
use std::fmt;

use keystone_crds::plan::{Partitions, Plan, TopicRole};

/// A Pipeline, as the owner of topics.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Owner {
    pub fn parse(text: &str) -> Option<Owner> {
        let (namespace, name) = text.split_once('/')?;
        Some(Owner {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

/// A topic of the plan, with its cluster resolved to a configured name.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredTopic {
    pub cluster: String,
    pub name: String,
    pub role: TopicRole,
    pub create: bool,
    pub partitions: Option<Partitions>,
    pub replication_factor: Option<i32>,
    pub config: BTreeMap<String, String>,
}

/// The least uncompacted history a changelog keeps, however short the checkpoint
/// window: one hour. The window (`checkpointInterval × (checkpointRetention + 1)`)
/// assumes checkpoints succeed on time; failed or skipped checkpoints (a pipeline
/// that is not Running takes none) and the checkpoint an upgrade pins age past it,
/// and an upgrade's health window plus a rollback's restore take minutes. An hour
/// of changelog history costs little disk next to the source's own retention.
pub const MIN_CHANGELOG_HISTORY_MS: u64 = 3_600_000;

/// `min.compaction.lag.ms` of a changelog topic: restoring a checkpoint undoes the
/// state changes written after it by writing back each key's value as of the
/// checkpoint, so that value must survive compaction until the checkpoint is no
/// longer retained. The cleaner drops a record only once a later record of the same
/// key is older than the lag, so a lag covering the age of the oldest retained
/// checkpoint (`interval × (retention + 1)`, one interval of slack for a late
/// checkpoint) keeps every restorable state; never less than
/// [`MIN_CHANGELOG_HISTORY_MS`].
pub fn changelog_compaction_lag_ms(checkpoint_interval_ms: u64, retention: i32) -> u64 {
    let window = checkpoint_interval_ms.saturating_mul(retention.max(1) as u64 + 1);
    window.max(MIN_CHANGELOG_HISTORY_MS)
}

/// The plan's topics with clusters resolved, or the cluster names that are not
/// configured. Changelogs get the history a restore of any of the
/// `checkpoint_retention` retained checkpoints needs ([`changelog_compaction_lag_ms`]).
pub fn desired_topics(
    plan: &Plan,
    checkpoint_retention: i32,
    resolve: impl Fn(Option<&str>) -> Option<String>,
) -> Result<Vec<DesiredTopic>, Vec<String>> {
    let mut unknown = Vec::new();
    let mut out = Vec::new();
    for topic in &plan.topics {
        let mut config = topic.config.clone();
        if topic.role == TopicRole::Changelog {
            config.insert(
                "min.compaction.lag.ms".to_owned(),
                changelog_compaction_lag_ms(plan.checkpoint_interval_ms, checkpoint_retention)
                    .to_string(),
            );
        }
        match resolve(topic.cluster.as_deref()) {
            Some(cluster) => out.push(DesiredTopic {
                cluster,
                name: topic.name.clone(),
                role: topic.role,
                create: topic.create,
                partitions: topic.partitions.clone(),
                replication_factor: topic.replication_factor,
                config,
            }),
            None => {
                let name = topic
                    .cluster
                    .clone()
                    .unwrap_or_else(|| "(default)".to_owned());
                if !unknown.contains(&name) {
                    unknown.push(name);
                }
            }
        }
    }
    if unknown.is_empty() {
        Ok(out)
    } else {
        Err(unknown)
    }
}

/// What Kafka holds for a topic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObservedTopic {
    pub partitions: i32,
    /// The topic's dynamic (per-topic) configs; read only for topics this pipeline owns.
    pub config: Option<BTreeMap<String, String>>,
}

/// Who the ledger says owns a topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    Mine,
    Other(Owner),
    Unclaimed,
}

/// A change to make in Kafka.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicStep {
    Create {
        partitions: i32,
        replication_factor: i32,
        config: BTreeMap<String, String>,
    },
    RaisePartitions {
        from: i32,
        to: i32,
    },
    /// Sets the whole dynamic config set (the admin API replaces it).
    CorrectConfig {
        config: BTreeMap<String, String>,
        drift: Vec<String>,
    },
}

/// Why a topic is not as the plan wants it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicProblem {
    /// A topic the pipeline reads or writes but does not create is absent.
    Missing,
    /// Another pipeline created (owns) the topic.
    Conflict(Owner),
    /// The topic has more partitions than the spec asks: Kafka cannot remove them.
    DecreaseRefused { actual: i32, desired: i32 },
    /// Its partition count follows a topic that does not exist (yet).
    Unresolved { follows: String },
    /// Kafka refused the change the spec asks for (an unknown config, a
    /// replication factor above the broker count): a spec problem, not an outage.
    Rejected { error: String },
}

impl TopicProblem {
    /// Whether the runtime cannot run with it (the topic is absent or not ours to write).
    pub fn blocks_runtime(&self) -> bool {
        !matches!(self, TopicProblem::DecreaseRefused { .. })
    }

    pub fn reason(&self) -> &'static str {
        match self {
            TopicProblem::Missing => "TopicMissing",
            TopicProblem::Conflict(_) => "TopicConflict",
            TopicProblem::DecreaseRefused { .. } => "PartitionDecreaseRefused",
            TopicProblem::Unresolved { .. } => "TopicMissing",
            TopicProblem::Rejected { .. } => "TopicRejected",
        }
    }

    pub fn describe(&self, topic: &str) -> String {
        match self {
            TopicProblem::Missing => {
                format!("topic {topic:?} does not exist and the pipeline does not create it")
            }
            TopicProblem::Conflict(owner) => format!(
                "topic {topic:?} was created by pipeline {owner}; a pipeline never takes over another's topic (use another topic, or create: false to share it)"
            ),
            TopicProblem::DecreaseRefused { actual, desired } => format!(
                "topic {topic:?} has {actual} partitions and the spec asks for {desired}: Kafka cannot remove partitions, so the topic keeps {actual}; set partitions to {actual} or more in the spec (in git, when the pipeline is synced from there)"
            ),
            TopicProblem::Unresolved { follows } => format!(
                "topic {topic:?} gets as many partitions as {follows:?}, which does not exist"
            ),
            TopicProblem::Rejected { error } => {
                format!("Kafka refused what the spec asks for topic {topic:?}: {error}")
            }
        }
    }
}

/// The decision for one topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicDecision {
    pub steps: Vec<TopicStep>,
    pub problem: Option<TopicProblem>,
    /// Whether this pipeline owns the topic (claims it before creating it).
    pub owned: bool,
    /// The partition count once the steps are done.
    pub partitions: Option<i32>,
}

/// Partition counts the plan wants, by topic name: fixed, or following another
/// topic (what it will have once created or raised, else what Kafka holds).
pub fn resolve_partitions(
    topics: &[DesiredTopic],
    observed: &BTreeMap<String, ObservedTopic>,
) -> BTreeMap<String, i32> {
    let mut resolved: BTreeMap<String, i32> = BTreeMap::new();
    // Chains are short (changelog -> repartition -> source); iterate to a fixed point.
    for _ in 0..=topics.len() {
        let mut changed = false;
        for topic in topics {
            let value = match &topic.partitions {
                Some(Partitions::Fixed(n)) => Some(*n),
                Some(Partitions::SameAs(other)) => resolved
                    .get(other)
                    .copied()
                    .or_else(|| observed.get(other).map(|o| o.partitions)),
                None => observed.get(&topic.name).map(|o| o.partitions),
            };
            if let Some(value) = value
                && resolved.get(&topic.name) != Some(&value)
            {
                resolved.insert(topic.name.clone(), value);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    resolved
}

/// Decides what to do with one topic.
pub fn decide(
    desired: &DesiredTopic,
    observed: Option<&ObservedTopic>,
    ownership: &Ownership,
    partitions: Option<i32>,
) -> TopicDecision {
    let done = |problem: Option<TopicProblem>, owned: bool| TopicDecision {
        steps: Vec::new(),
        problem,
        owned,
        partitions: observed.map(|o| o.partitions),
    };
    if !desired.create {
        return match observed {
            None => done(Some(TopicProblem::Missing), false),
            Some(_) => done(None, false),
        };
    }
    if let Ownership::Other(owner) = ownership {
        return done(Some(TopicProblem::Conflict(owner.clone())), false);
    }
    let Some(observed) = observed else {
        let Some(partitions) = partitions else {
            let follows = match &desired.partitions {
                Some(Partitions::SameAs(other)) => other.clone(),
                _ => desired.name.clone(),
            };
            return done(Some(TopicProblem::Unresolved { follows }), true);
        };
        return TopicDecision {
            steps: vec![TopicStep::Create {
                partitions,
                // -1: the broker's default.replication.factor.
                replication_factor: desired.replication_factor.unwrap_or(-1),
                config: desired.config.clone(),
            }],
            problem: None,
            owned: true,
            partitions: Some(partitions),
        };
    };
    if *ownership == Ownership::Unclaimed {
        // Made by someone else before this pipeline: used as it is.
        return done(None, false);
    }
    let mut decision = done(None, true);
    if let Some(want) = partitions {
        if want > observed.partitions {
            decision.steps.push(TopicStep::RaisePartitions {
                from: observed.partitions,
                to: want,
            });
            decision.partitions = Some(want);
        } else if want < observed.partitions {
            decision.problem = Some(TopicProblem::DecreaseRefused {
                actual: observed.partitions,
                desired: want,
            });
        }
    }
    if let Some(actual) = &observed.config {
        let drift = config_drift(&desired.config, actual);
        if !drift.is_empty() {
            decision.steps.push(TopicStep::CorrectConfig {
                config: desired.config.clone(),
                drift,
            });
        }
    }
    decision
}

/// How the dynamic config set differs from the desired one, one line per key.
pub fn config_drift(
    desired: &BTreeMap<String, String>,
    actual: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut drift = Vec::new();
    for (key, want) in desired {
        match actual.get(key) {
            Some(have) if have == want => {}
            Some(have) => drift.push(format!("{key}: {have} -> {want}")),
            None => drift.push(format!("{key}: (default) -> {want}")),
        }
    }
    for (key, have) in actual {
        if !desired.contains_key(key) {
            drift.push(format!("{key}: {have} -> (default)"));
        }
    }
    drift
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str, create: bool, partitions: Option<Partitions>) -> DesiredTopic {
        DesiredTopic {
            cluster: "default".into(),
            name: name.into(),
            role: TopicRole::Sink,
            create,
            partitions,
            replication_factor: None,
            config: BTreeMap::new(),
        }
    }

    fn observed(partitions: i32, config: &[(&str, &str)]) -> ObservedTopic {
        ObservedTopic {
            partitions,
            config: Some(
                config
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn same_as_follows_chains_and_planned_raises() {
        let topics = vec![
            topic("src", false, None),
            topic("changelog", true, Some(Partitions::SameAs("rep".into()))),
            topic("rep", true, Some(Partitions::SameAs("src".into()))),
            topic("sink", true, Some(Partitions::Fixed(3))),
        ];
        let mut seen = BTreeMap::new();
        seen.insert("src".to_owned(), observed(6, &[]));
        seen.insert("rep".to_owned(), observed(4, &[]));
        let resolved = resolve_partitions(&topics, &seen);
        assert_eq!(resolved["rep"], 6);
        assert_eq!(resolved["changelog"], 6);
        assert_eq!(resolved["sink"], 3);
    }

    #[test]
    fn missing_owned_topics_are_created_with_their_config() {
        let mut t = topic("out", true, Some(Partitions::Fixed(3)));
        t.config.insert("retention.ms".into(), "1000".into());
        let d = decide(&t, None, &Ownership::Unclaimed, Some(3));
        assert!(d.owned);
        assert_eq!(
            d.steps,
            vec![TopicStep::Create {
                partitions: 3,
                replication_factor: -1,
                config: t.config.clone()
            }]
        );
    }

    #[test]
    fn raise_is_done_and_decrease_refused() {
        let t = topic("out", true, Some(Partitions::Fixed(4)));
        let d = decide(&t, Some(&observed(2, &[])), &Ownership::Mine, Some(4));
        assert_eq!(d.steps, vec![TopicStep::RaisePartitions { from: 2, to: 4 }]);
        assert_eq!(d.partitions, Some(4));
        let d = decide(&t, Some(&observed(8, &[])), &Ownership::Mine, Some(4));
        assert!(d.steps.is_empty());
        assert_eq!(
            d.problem,
            Some(TopicProblem::DecreaseRefused {
                actual: 8,
                desired: 4
            })
        );
        assert!(!d.problem.as_ref().is_some_and(TopicProblem::blocks_runtime));
    }

    #[test]
    fn drift_is_corrected_with_the_whole_set() {
        let mut t = topic("out", true, Some(Partitions::Fixed(1)));
        t.config.insert("retention.ms".into(), "1000".into());
        let d = decide(
            &t,
            Some(&observed(1, &[("retention.ms", "5"), ("segment.ms", "9")])),
            &Ownership::Mine,
            Some(1),
        );
        let TopicStep::CorrectConfig { config, drift } = &d.steps[0] else {
            panic!("expected a config correction, got {:?}", d.steps);
        };
        assert_eq!(config, &t.config);
        assert_eq!(
            drift,
            &vec![
                "retention.ms: 5 -> 1000".to_owned(),
                "segment.ms: 9 -> (default)".to_owned()
            ]
        );
    }

    #[test]
    fn another_pipelines_topic_is_a_conflict_not_a_takeover() {
        let t = topic("out", true, Some(Partitions::Fixed(4)));
        let owner = Owner::parse("ns/other").expect("owner");
        let d = decide(
            &t,
            Some(&observed(1, &[])),
            &Ownership::Other(owner.clone()),
            Some(4),
        );
        assert!(d.steps.is_empty());
        assert!(!d.owned);
        assert_eq!(d.problem, Some(TopicProblem::Conflict(owner)));
        assert!(d.problem.as_ref().is_some_and(TopicProblem::blocks_runtime));
    }

    #[test]
    fn unclaimed_existing_topics_are_used_as_they_are() {
        let t = topic("out", true, Some(Partitions::Fixed(4)));
        let d = decide(
            &t,
            Some(&observed(1, &[("x", "y")])),
            &Ownership::Unclaimed,
            Some(4),
        );
        assert_eq!(
            d,
            TopicDecision {
                steps: vec![],
                problem: None,
                owned: false,
                partitions: Some(1)
            }
        );
    }

    #[test]
    fn topics_that_must_exist() {
        let t = topic("in", false, None);
        assert_eq!(
            decide(&t, None, &Ownership::Unclaimed, None).problem,
            Some(TopicProblem::Missing)
        );
        assert_eq!(
            decide(&t, Some(&observed(3, &[])), &Ownership::Unclaimed, None).problem,
            None
        );
    }

    #[test]
    fn unknown_clusters_are_listed() {
        let pipeline: keystone_crds::Pipeline = serde_yaml_ng::from_str(
            r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: p, namespace: n}
spec:
  source: {topic: in, cluster: elsewhere, schema: {fields: [{name: a, type: string}]}}
  sinks:
    - {name: here, kafka: {topic: out, cluster: elsewhere}}
    - {name: there, kafka: {topic: out2, cluster: elsewhere}}
"#,
        )
        .expect("pipeline");
        let plan = keystone_crds::compile(&pipeline, &[]).expect("valid");
        let resolve = |name: Option<&str>| match name {
            None | Some("main") => Some("main".to_owned()),
            Some(_) => None,
        };
        assert_eq!(
            desired_topics(&plan, 5, resolve),
            Err(vec!["elsewhere".to_owned()])
        );
        let all = desired_topics(&plan, 5, |_| Some("main".to_owned())).expect("resolved");
        assert!(all.iter().all(|t| t.cluster == "main"));
        assert!(all.iter().any(|t| t.name == "out" && t.create));
    }

    #[test]
    fn changelogs_keep_history_for_every_retained_checkpoint() {
        // The default 5 min × (5 + 1) is under the floor; a daily checkpoint is not.
        assert_eq!(
            changelog_compaction_lag_ms(300_000, 5),
            MIN_CHANGELOG_HISTORY_MS
        );
        assert_eq!(changelog_compaction_lag_ms(86_400_000, 3), 4 * 86_400_000);
        let pipeline: keystone_crds::Pipeline = serde_yaml_ng::from_str(
            r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: p, namespace: n}
spec:
  source: {topic: in, key: [a], schema: {fields: [{name: a, type: string}, {name: b, type: string}]}}
  steps:
    - {name: once, dedup: {key: [b], window: 1m}}
  checkpointInterval: 1h
  sinks:
    - {name: here, kafka: {topic: out}}
"#,
        )
        .expect("pipeline");
        let plan = keystone_crds::compile(&pipeline, &[]).expect("valid");
        let all = desired_topics(&plan, 2, |_| Some("main".to_owned())).expect("resolved");
        let changelog = all
            .iter()
            .find(|t| t.role == TopicRole::Changelog)
            .expect("a changelog");
        assert_eq!(changelog.config["cleanup.policy"], "compact");
        assert_eq!(changelog.config["min.compaction.lag.ms"], "10800000");
        assert!(
            all.iter()
                .filter(|t| t.role != TopicRole::Changelog)
                .all(|t| !t.config.contains_key("min.compaction.lag.ms"))
        );
    }
}
