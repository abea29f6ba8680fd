//! The walk through the steps that builds the plan: stage boundaries where a
//! stateful step needs another partitioning or a step its own parallelism, and
//! the repartition, changelog, table and dead-letter topics they add.

use std::collections::BTreeMap;

use super::{Checker, ErrorKind, StreamState, key_set, show_key, show_set};
use crate::ops::Operator;
use crate::plan::{
    PLAN_VERSION, Partitions, Plan, PlanSource, PlanStage, PlanState, PlanStep, PlanTopic,
    StageInput, StageOutput, TopicRole,
};
use crate::processor::RequiredField;
use crate::schema::Schema;

impl Checker<'_> {
    pub(super) fn run(&mut self) -> Plan {
        let spec = &self.pipeline.spec;
        let source = &spec.source;
        let source_key = source.key.clone();
        let source_schema = self.source_schema();
        let mut stream = StreamState {
            schema: Schema::from_spec(&source_schema),
            key: source_key.clone(),
            partitioned_by: (!source_key.is_empty()).then(|| key_set(&source_key)),
            ordered_by: (!source_key.is_empty()).then(|| key_set(&source_key)),
            rekeyed_by: None,
            removed_by: BTreeMap::new(),
        };
        self.check_capture(&stream.schema);
        self.check_avro_source();
        // Without the database a capture's columns are unknown: the operator
        // adds them from the table, an offline check needs them declared.
        let columns_unknown = source.postgres.is_some() && self.captured_table().is_none();
        for (i, key_field) in source_key.iter().enumerate() {
            if stream.schema.get(key_field).is_none() {
                let hint = if columns_unknown {
                    "; the operator adds the table's columns once the capture has described it, so declare the key to check without the database".to_owned()
                } else {
                    self.source_origin_note()
                };
                self.error(
                    ErrorKind::MissingField,
                    format!("spec.source.key[{i}]"),
                    None,
                    format!(
                        "key field {key_field:?} is not in the source schema ({}){hint}",
                        stream.schema.describe()
                    ),
                );
            }
        }

        self.check_unique_names();

        let dead_letter_topic = spec
            .dead_letter
            .topic
            .clone()
            .unwrap_or_else(|| self.topic_name("dlq", None));
        let mut topics = vec![self.source_topic()];
        let mut dlq_config = BTreeMap::new();
        if let Some(retention) = &spec.dead_letter.retention {
            dlq_config.insert("retention.ms".to_owned(), retention.as_millis().to_string());
        }
        topics.push(PlanTopic {
            name: dead_letter_topic.clone(),
            cluster: source.cluster.clone(),
            role: TopicRole::DeadLetter,
            create: true,
            partitions: Some(Partitions::SameAs(source.topic.clone())),
            replication_factor: None,
            config: dlq_config,
        });

        let mut stages: Vec<PlanStage> = Vec::new();
        let mut current = PlanStage {
            name: "s0".to_owned(),
            parallelism: spec.parallelism,
            input: StageInput {
                topic: source.topic.clone(),
                cluster: source.cluster.clone(),
                partitioned_by: source_key.clone(),
            },
            steps: Vec::new(),
            output: StageOutput::Sinks,
            consumer_group: String::new(),
        };

        let mut isolate_next = false;
        for (index, step) in spec.steps.iter().enumerate() {
            let path = format!("spec.steps[{index}]");
            let Some((operator, processor)) = self.resolve_step(step, &path) else {
                continue;
            };
            let op = operator
                .single()
                .expect("resolve_step returns a single operator");
            let declared = processor.and_then(|p| p.spec.contract.as_ref());
            let contract = self.step_contract(step, op, declared, &stream, &path);

            // A stage boundary before this step: a stateful step keyed differently from
            // the partitioning, a step with its own parallelism, or the step after one.
            let step_parallelism = step.parallelism.unwrap_or(spec.parallelism);
            let own_parallelism = step_parallelism != spec.parallelism;
            let needs_partitioning = contract.state_key.clone().filter(|key| {
                !stream
                    .partitioned_by
                    .as_ref()
                    .is_some_and(|p| !p.is_empty() && p.is_subset(&key_set(key)))
            });
            if let Some(key) = &needs_partitioning
                && !spec.allow_repartition
            {
                let partitioned = match &stream.partitioned_by {
                    Some(p) => format!("partitioned by {}", show_set(p)),
                    None => "not partitioned by any known key".to_owned(),
                };
                // A rekey changes the key records are written with, not the
                // partitions events already are in: say so, or the message reads
                // as if the rekey had produced the old key.
                let rekeyed = match &stream.rekeyed_by {
                    Some(by)
                        if key_set(&stream.key)
                            != stream.partitioned_by.clone().unwrap_or_default() =>
                    {
                        format!(
                            " (step {by:?} re-keyed the stream by {}: that sets the key of the records \
                         written after it, it does not move events to other partitions)",
                            show_key(&stream.key)
                        )
                    }
                    _ => String::new(),
                };
                self.error(
                    ErrorKind::RepartitionNotAllowed,
                    &path,
                    Some(&step.name),
                    format!(
                        "the step keeps state keyed by {}, but the stream is {partitioned}{rekeyed}; \
                         it needs a repartition topic and spec.allowRepartition is false: \
                         set it to true, or partition the source topic by fields of the state key",
                        show_key(key)
                    ),
                );
            }
            let starts_stage = !current.steps.is_empty() && (own_parallelism || isolate_next);
            // Partition by the stream's own key when that serves the state (it is
            // part of the state key), so the records keep the key the user chose.
            let partition_key = needs_partitioning.map(|state_key| {
                let stream_key = key_set(&stream.key);
                if !stream_key.is_empty() && stream_key.is_subset(&key_set(&state_key)) {
                    stream.key.clone()
                } else {
                    state_key
                }
            });
            let boundary_key = partition_key.or_else(|| starts_stage.then(|| stream.key.clone()));
            isolate_next = own_parallelism;
            if let Some(key) = boundary_key {
                let topic = self.topic_name("repartition", Some(&step.name));
                // A partitioned table must be co-partitioned with the stream that joins it.
                let partitions_like = match table_of(op) {
                    Some((table_topic, _)) if contract.state_key.is_some() => {
                        table_topic.to_owned()
                    }
                    _ => source.topic.clone(),
                };
                topics.push(PlanTopic {
                    name: topic.clone(),
                    cluster: source.cluster.clone(),
                    role: TopicRole::Repartition,
                    create: true,
                    partitions: Some(Partitions::SameAs(partitions_like)),
                    replication_factor: None,
                    config: BTreeMap::new(),
                });
                stream = repartitioned(stream, &key);
                let next = PlanStage {
                    name: format!("s{}", stages.len() + 1),
                    parallelism: step_parallelism,
                    input: StageInput {
                        topic: topic.clone(),
                        cluster: source.cluster.clone(),
                        partitioned_by: key.clone(),
                    },
                    steps: Vec::new(),
                    output: StageOutput::Sinks,
                    consumer_group: String::new(),
                };
                let mut finished = std::mem::replace(&mut current, next);
                finished.output = StageOutput::Repartition { topic, key };
                stages.push(finished);
            } else if current.steps.is_empty() {
                current.parallelism = step_parallelism;
            }

            self.check_requirements(&contract, &stream, &path, &step.name);
            if let Some(order_key) = &contract.requires_order_by {
                let needed = key_set(order_key);
                if !stream
                    .ordered_by
                    .as_ref()
                    .is_some_and(|o| o.is_subset(&needed))
                {
                    let have = match &stream.ordered_by {
                        Some(o) => format!("only in order per {}", show_set(o)),
                        None => "in no known per-key order".to_owned(),
                    };
                    self.error(
                        ErrorKind::OrderNotGuaranteed,
                        &path,
                        Some(&step.name),
                        format!(
                            "the step needs events in order per {}, but they arrive {have}; \
                             add an order step keyed by {} before it",
                            show_key(order_key),
                            show_key(order_key)
                        ),
                    );
                }
            }

            let state = contract.state_key.as_ref().map(|key| {
                // A table's compacted topic already holds its latest rows: it is the
                // changelog, as for a Kafka Streams KTable. Other state gets its own.
                if let Some((table_topic, _)) = table_of(op) {
                    return PlanState {
                        key: key.clone(),
                        changelog_topic: table_topic.to_owned(),
                    };
                }
                let changelog = self.topic_name("changelog", Some(&step.name));
                let mut config = BTreeMap::new();
                config.insert("cleanup.policy".to_owned(), "compact".to_owned());
                topics.push(PlanTopic {
                    name: changelog.clone(),
                    cluster: source.cluster.clone(),
                    role: TopicRole::Changelog,
                    create: true,
                    partitions: Some(Partitions::SameAs(current.input.topic.clone())),
                    replication_factor: None,
                    config,
                });
                PlanState {
                    key: key.clone(),
                    changelog_topic: changelog,
                }
            });
            if let Some((table_topic, cluster)) = table_of(op)
                && !topics
                    .iter()
                    .any(|t| t.name == table_topic && t.role == TopicRole::Table)
            {
                topics.push(PlanTopic {
                    name: table_topic.to_owned(),
                    cluster: cluster.or(source.cluster.clone()),
                    role: TopicRole::Table,
                    create: false,
                    partitions: None,
                    replication_factor: None,
                    config: BTreeMap::new(),
                });
            }

            stream = self.apply_step(stream, op, declared, step, &path);
            current.steps.push(PlanStep {
                name: step.name.clone(),
                processor: step.processor_ref.as_ref().map(|r| r.name.clone()),
                operator: operator.clone(),
                requires: contract
                    .requires
                    .iter()
                    .map(|r| RequiredField {
                        name: r.field.clone(),
                        field_type: r.field_type,
                    })
                    .collect(),
                key_after: stream.key.clone(),
                state,
            });
        }
        stages.push(current);
        for stage in &mut stages {
            stage.consumer_group =
                format!("keystone.{}.{}.{}", self.namespace, self.name, stage.name);
        }

        let sinks = self.check_sinks(&stream, &mut topics, &dead_letter_topic);
        self.check_topic_names(&topics);

        Plan {
            version: PLAN_VERSION,
            namespace: self.namespace.clone(),
            pipeline: self.name.clone(),
            source: PlanSource {
                cluster: source.cluster.clone(),
                topic: source.topic.clone(),
                key: source_key,
                start_from: source.start_from,
                schema: source_schema,
                avro: None,
            },
            delivery: spec.delivery,
            commit_interval_ms: spec.commit_interval.as_millis(),
            checkpoint_interval_ms: spec.checkpoint_interval.as_millis(),
            dead_letter_topic,
            stages,
            sinks,
            topics,
            capture: self.capture_config(),
            ingest: source.http.clone(),
            schema_registry: None,
        }
    }
}

/// The stream after it was written to a topic partitioned by `key` and read back.
fn repartitioned(mut stream: StreamState, key: &[String]) -> StreamState {
    let new_key = key_set(key);
    // Per-key order survives only if every new key's events came from one upstream
    // partition, that is if the old partitioning key is part of the new key.
    let same_upstream_partition = stream
        .partitioned_by
        .as_ref()
        .is_some_and(|p| !p.is_empty() && p.is_subset(&new_key));
    stream.ordered_by = match (&stream.ordered_by, same_upstream_partition) {
        (Some(order), true) => Some(order.union(&new_key).cloned().collect()),
        _ => None,
    };
    stream.partitioned_by = (!new_key.is_empty()).then_some(new_key);
    // The logical key (the sinks' record key) stays the user's: partitioning for
    // state does not re-key the stream.
    stream
}

fn table_of(op: Operator<'_>) -> Option<(&str, Option<String>)> {
    match op {
        Operator::Join(j) => Some((&j.table.topic, j.table.cluster.clone())),
        Operator::Enrich(e) => Some((&e.table.topic, e.table.cluster.clone())),
        _ => None,
    }
}
