//! The processing-contract checker and plan compiler.
//!
//! Checking propagates the source schema, the stream key, the partitioning and
//! the per-key order guarantee through every step. Each step's requirements must
//! hold on what reaches it; its contract says what leaves it. Stages are cut where
//! a stateful step needs another partitioning or a step asks for its own
//! parallelism. All errors are collected, not only the first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::ops::{Operator, OperatorSpec};
use crate::pipeline::{Pipeline, StepSpec};
use crate::plan::{
    PLAN_VERSION, Partitions, Plan, PlanSource, PlanStage, PlanState, PlanStep, PlanTopic,
    StageInput, StageOutput, TopicRole,
};
use crate::processor::{
    ContractSpec, KeyEffect, Processor, RequiredField, SchemaEffect, SchemaEffectSpec,
};
use crate::schema::{FieldInfo, FieldType, Schema, pointer_to_path};

mod sinks;

pub use sinks::WRITABLE_SINKS;

/// What kind of contract violation an error is; stable, for tests and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    DuplicateName,
    InvalidOperator,
    UnknownProcessor,
    InvalidProcessorContract,
    MissingField,
    WrongType,
    InvalidExpression,
    RepartitionNotAllowed,
    OrderNotGuaranteed,
    TopicCycle,
    InvalidSink,
    /// A sink of a kind this version cannot write (see [`WRITABLE_SINKS`]).
    UnsupportedSink,
    /// A field that may be absent where every event must carry it (a search
    /// sink's document id or external version).
    OptionalField,
}

/// One contract violation, located in the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContractError {
    pub kind: ErrorKind,
    /// Where in the manifest, for example `spec.steps[2]`.
    pub path: String,
    /// The step or sink the error is about.
    pub subject: Option<String>,
    pub message: String,
}

impl fmt::Display for ContractError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subject {
            Some(subject) => write!(f, "{} ({subject}): {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

impl std::error::Error for ContractError {}

/// All the errors found in one pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContractErrors(pub Vec<ContractError>);

impl fmt::Display for ContractErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ContractErrors {}

type KeySet = BTreeSet<String>;

fn key_set(fields: &[String]) -> KeySet {
    fields.iter().cloned().collect()
}

fn show_key(fields: &[String]) -> String {
    format!("[{}]", fields.join(", "))
}

fn show_set(set: &KeySet) -> String {
    let fields: Vec<String> = set.iter().cloned().collect();
    show_key(&fields)
}

/// What the checker knows about the stream between two steps.
#[derive(Clone, Debug)]
struct StreamState {
    schema: Schema,
    /// The logical key (the Kafka record key of output).
    key: Vec<String>,
    /// The fields the current stage's input is partitioned by; `None` when unknown.
    partitioned_by: Option<KeySet>,
    /// Events with equal values of these fields are in their original order; `None` when no order is known.
    ordered_by: Option<KeySet>,
    /// The step that last changed the key, for messages.
    rekeyed_by: Option<String>,
}

/// The effective contract of one step, derived from its operator and the
/// Processor's declared contract.
struct StepContract {
    requires: Vec<Requirement>,
    state_key: Option<Vec<String>>,
    requires_order_by: Option<Vec<String>>,
}

struct Requirement {
    field: String,
    field_type: FieldType,
    /// What the step needs it for, such as "the dedup key".
    purpose: String,
}

struct Checker<'a> {
    pipeline: &'a Pipeline,
    processors: BTreeMap<&'a str, &'a Processor>,
    errors: Vec<ContractError>,
    namespace: String,
    name: String,
}

/// Checks a pipeline against the processors it may reference and compiles it.
pub fn compile(pipeline: &Pipeline, processors: &[Processor]) -> Result<Plan, ContractErrors> {
    let mut checker = Checker {
        pipeline,
        processors: processors
            .iter()
            .filter_map(|p| p.metadata.name.as_deref().map(|name| (name, p)))
            .collect(),
        errors: Vec::new(),
        namespace: pipeline
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: pipeline
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| "pipeline".to_owned()),
    };
    let plan = checker.run();
    if checker.errors.is_empty() {
        Ok(plan)
    } else {
        Err(ContractErrors(checker.errors))
    }
}

/// Checks that a Processor's declared contract agrees with its operator.
pub fn check_processor(processor: &Processor) -> Result<(), ContractErrors> {
    let mut errors = Vec::new();
    let name = processor.metadata.name.clone();
    match processor.spec.operator.single() {
        None => errors.push(ContractError {
            kind: ErrorKind::InvalidOperator,
            path: "spec".to_owned(),
            subject: name,
            message: operator_count_message(&processor.spec.operator, false),
        }),
        Some(op) => {
            if let Some(contract) = &processor.spec.contract {
                for message in declared_contract_conflicts(op, contract) {
                    errors.push(ContractError {
                        kind: ErrorKind::InvalidProcessorContract,
                        path: "spec.contract".to_owned(),
                        subject: name.clone(),
                        message,
                    });
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ContractErrors(errors))
    }
}

fn operator_count_message(spec: &OperatorSpec, has_ref: bool) -> String {
    let mut set: Vec<&str> = spec.configured().iter().map(Operator::kind).collect();
    if has_ref {
        set.insert(0, "processorRef");
    }
    if set.is_empty() {
        "no operator is set: set exactly one of processorRef, filter, map, project, extract, dedup, order, join, enrich or rekey".to_owned()
    } else {
        format!(
            "more than one operator is set ({}): a step runs exactly one",
            set.join(", ")
        )
    }
}

/// The schema effect an operator has by itself.
fn derived_schema_effect(op: Operator<'_>) -> SchemaEffect {
    match op {
        Operator::Filter(_) | Operator::Dedup(_) | Operator::Order(_) | Operator::Rekey(_) => {
            SchemaEffect::Passthrough
        }
        Operator::Map(_) | Operator::Extract(_) | Operator::Join(_) | Operator::Enrich(_) => {
            SchemaEffect::Adds
        }
        Operator::Project(_) => SchemaEffect::Replaces,
    }
}

fn derived_state_key(op: Operator<'_>) -> Option<Vec<String>> {
    match op {
        Operator::Dedup(d) => Some(d.key.clone()),
        Operator::Order(o) => Some(o.key.clone()),
        Operator::Join(j) if !j.table.replicated => Some(j.lookup_key.clone()),
        Operator::Enrich(e) if !e.table.replicated => Some(e.lookup_key.clone()),
        _ => None,
    }
}

fn declared_contract_conflicts(op: Operator<'_>, contract: &ContractSpec) -> Vec<String> {
    let mut conflicts = Vec::new();
    if let Some(schema) = &contract.schema {
        let derived = derived_schema_effect(op);
        if schema.effect != derived {
            conflicts.push(format!(
                "the contract declares schema effect {:?}, but the {} operator {}",
                schema.effect,
                op.kind(),
                match derived {
                    SchemaEffect::Passthrough => "passes the schema through unchanged",
                    SchemaEffect::Adds => "adds fields",
                    SchemaEffect::Removes => "removes fields",
                    SchemaEffect::Replaces => "replaces the schema",
                }
            ));
        }
    }
    if let Some(keys) = &contract.keys {
        let rekeys = matches!(op, Operator::Rekey(_));
        if keys.effect == KeyEffect::Rekeys && !rekeys {
            conflicts.push(format!(
                "the contract declares that the step re-keys the stream, but the {} operator preserves the key",
                op.kind()
            ));
        }
        if keys.effect == KeyEffect::Preserves && rekeys && contract.keys.is_some() {
            conflicts.push("the contract declares that the key is preserved, but the rekey operator changes it".to_owned());
        }
        if let (KeyEffect::Rekeys, Operator::Rekey(r)) = (keys.effect, op)
            && !keys.key.is_empty()
            && keys.key != r.key
        {
            conflicts.push(format!(
                "the contract declares the new key {}, but the operator re-keys by {}",
                show_key(&keys.key),
                show_key(&r.key)
            ));
        }
    }
    if let Some(state) = &contract.state {
        match derived_state_key(op) {
            None => conflicts.push(format!(
                "the contract declares state keyed by {}, but the {} operator keeps no keyed state",
                show_key(&state.keyed_by),
                op.kind()
            )),
            Some(key) if key_set(&key) != key_set(&state.keyed_by) => conflicts.push(format!(
                "the contract declares state keyed by {}, but the operator keys its state by {}",
                show_key(&state.keyed_by),
                show_key(&key)
            )),
            Some(_) => {}
        }
    }
    conflicts
}

/// Names of comprehension variables (`items.all(x, ...)`), which CEL reports as
/// references but which are not event fields.
fn comprehension_variables(expression: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for macro_name in ["all(", "exists(", "exists_one(", "map(", "filter("] {
        for (index, _) in expression.match_indices(macro_name) {
            let preceded_by_dot = expression[..index].trim_end().ends_with('.');
            if !preceded_by_dot {
                continue;
            }
            let rest = &expression[index + macro_name.len()..];
            if let Some((var, _)) = rest.split_once(',') {
                let var = var.trim();
                if !var.is_empty() && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    names.insert(var.to_owned());
                }
            }
        }
    }
    names
}

/// The top-level names a CEL expression reads, or the parse error.
pub fn expression_variables(expression: &str) -> Result<BTreeSet<String>, String> {
    let program = cel::Program::compile(expression).map_err(|e| e.to_string())?;
    let iter_vars = comprehension_variables(expression);
    Ok(program
        .references()
        .variables()
        .into_iter()
        .filter(|name| !iter_vars.contains(*name))
        .map(str::to_owned)
        .collect())
}

/// The variable that holds the whole event in expressions.
pub const EVENT_VARIABLE: &str = "event";

impl<'a> Checker<'a> {
    fn error(
        &mut self,
        kind: ErrorKind,
        path: impl Into<String>,
        subject: Option<&str>,
        message: impl Into<String>,
    ) {
        self.errors.push(ContractError {
            kind,
            path: path.into(),
            subject: subject.map(str::to_owned),
            message: message.into(),
        });
    }

    fn topic_name(&self, role: &str, suffix: Option<&str>) -> String {
        match suffix {
            Some(suffix) => format!("keystone.{}.{}.{role}.{suffix}", self.namespace, self.name),
            None => format!("keystone.{}.{}.{role}", self.namespace, self.name),
        }
    }

    fn run(&mut self) -> Plan {
        let spec = &self.pipeline.spec;
        let source = &spec.source;
        let source_key = source.key.clone();
        let mut stream = StreamState {
            schema: Schema::from_spec(&source.schema),
            key: source_key.clone(),
            partitioned_by: (!source_key.is_empty()).then(|| key_set(&source_key)),
            ordered_by: (!source_key.is_empty()).then(|| key_set(&source_key)),
            rekeyed_by: None,
        };
        for (i, key_field) in source_key.iter().enumerate() {
            if stream.schema.get(key_field).is_none() {
                self.error(
                    ErrorKind::MissingField,
                    format!("spec.source.key[{i}]"),
                    None,
                    format!(
                        "key field {key_field:?} is not in the source schema ({})",
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
        let mut topics = vec![PlanTopic {
            name: source.topic.clone(),
            cluster: source.cluster.clone(),
            role: TopicRole::Source,
            create: false,
            partitions: None,
            replication_factor: None,
            config: BTreeMap::new(),
        }];
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
                let after = stream
                    .rekeyed_by
                    .as_ref()
                    .map(|s| format!(" after step {s:?} re-keyed it"))
                    .unwrap_or_default();
                self.error(
                    ErrorKind::RepartitionNotAllowed,
                    &path,
                    Some(&step.name),
                    format!(
                        "the step keeps state keyed by {}, but the stream is {partitioned}{after}; \
                         it needs a repartition topic and spec.allowRepartition is false",
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

            stream = self.apply_step(stream, op, declared, &step.name);
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
                schema: source.schema.clone(),
            },
            delivery: spec.delivery,
            commit_interval_ms: spec.commit_interval.as_millis(),
            checkpoint_interval_ms: spec.checkpoint_interval.as_millis(),
            dead_letter_topic,
            stages,
            sinks,
            topics,
        }
    }

    fn check_unique_names(&mut self) {
        let spec = &self.pipeline.spec;
        let mut seen = BTreeMap::new();
        for (i, step) in spec.steps.iter().enumerate() {
            if let Some(first) = seen.insert(step.name.clone(), i) {
                self.error(
                    ErrorKind::DuplicateName,
                    format!("spec.steps[{i}]"),
                    Some(&step.name),
                    format!("step name {:?} is already used by spec.steps[{first}]; step names must be unique", step.name),
                );
            }
        }
        let mut seen = BTreeMap::new();
        for (i, sink) in spec.sinks.iter().enumerate() {
            if let Some(first) = seen.insert(sink.name.clone(), i) {
                self.error(
                    ErrorKind::DuplicateName,
                    format!("spec.sinks[{i}]"),
                    Some(&sink.name),
                    format!("sink name {:?} is already used by spec.sinks[{first}]; sink names must be unique", sink.name),
                );
            }
        }
    }

    /// The operator a step runs and the Processor it comes from.
    fn resolve_step<'s>(
        &mut self,
        step: &'s StepSpec,
        path: &str,
    ) -> Option<(&'s OperatorSpec, Option<&'s Processor>)>
    where
        'a: 's,
    {
        let inline = step.operator.configured();
        match (&step.processor_ref, inline.len()) {
            (Some(reference), 0) => match self.processors.get(reference.name.as_str()).copied() {
                Some(processor) => {
                    if processor.spec.operator.single().is_none() {
                        self.error(
                            ErrorKind::InvalidOperator,
                            format!("{path}.processorRef"),
                            Some(&step.name),
                            format!(
                                "Processor {:?}: {}",
                                reference.name,
                                operator_count_message(&processor.spec.operator, false)
                            ),
                        );
                        return None;
                    }
                    if let Err(errors) = check_processor(processor) {
                        for error in errors.0 {
                            self.error(
                                ErrorKind::InvalidProcessorContract,
                                format!("{path}.processorRef"),
                                Some(&step.name),
                                format!("Processor {:?}: {}", reference.name, error.message),
                            );
                        }
                    }
                    Some((&processor.spec.operator, Some(processor)))
                }
                None => {
                    let known: Vec<&str> = self.processors.keys().copied().collect();
                    let known = if known.is_empty() {
                        "no Processors were given".to_owned()
                    } else {
                        format!("known Processors: {}", known.join(", "))
                    };
                    self.error(
                        ErrorKind::UnknownProcessor,
                        format!("{path}.processorRef"),
                        Some(&step.name),
                        format!(
                            "Processor {:?} not found in namespace {:?} ({known})",
                            reference.name, self.namespace
                        ),
                    );
                    None
                }
            },
            (None, 1) => Some((&step.operator, None)),
            (has_ref, _) => {
                self.error(
                    ErrorKind::InvalidOperator,
                    path,
                    Some(&step.name),
                    operator_count_message(&step.operator, has_ref.is_some()),
                );
                None
            }
        }
    }

    fn step_contract(
        &mut self,
        step: &StepSpec,
        op: Operator<'_>,
        declared: Option<&ContractSpec>,
        stream: &StreamState,
        path: &str,
    ) -> StepContract {
        let mut requires = Vec::new();
        let mut need = |field: &str, field_type: FieldType, purpose: String| {
            requires.push(Requirement {
                field: field.to_owned(),
                field_type,
                purpose,
            });
        };
        match op {
            Operator::Filter(f) => {
                self.expression_requirements(
                    &f.expression,
                    stream,
                    &format!("{path}.filter.expression"),
                    &step.name,
                    &mut need,
                );
            }
            Operator::Map(m) => {
                for (i, field) in m.fields.iter().enumerate() {
                    self.expression_requirements(
                        &field.expression,
                        stream,
                        &format!("{path}.map.fields[{i}].expression"),
                        &step.name,
                        &mut need,
                    );
                }
            }
            Operator::Project(p) | Operator::Extract(p) => {
                let which = if matches!(op, Operator::Project(_)) {
                    "project"
                } else {
                    "extract"
                };
                for (i, field) in p.fields.iter().enumerate() {
                    match pointer_to_path(&field.from) {
                        Some(source_path) if !field.optional => {
                            need(&source_path, FieldType::Any, format!("the source of output field {:?}", field.name))
                        }
                        Some(_) => {}
                        None => self.error(
                            ErrorKind::InvalidOperator,
                            format!("{path}.{which}.fields[{i}].from"),
                            Some(&step.name),
                            format!("{:?} is not a JSON pointer: it must start with '/' (for example /payload/id)", field.from),
                        ),
                    }
                }
            }
            Operator::Dedup(d) => {
                for key in &d.key {
                    need(key, FieldType::Any, "the dedup key".to_owned());
                }
                if let Some(time_field) = &d.event_time_field {
                    match stream.schema.get(time_field) {
                        Some(info) if !matches!(info.field_type, FieldType::Timestamp | FieldType::Integer) => self.error(
                            ErrorKind::WrongType,
                            format!("{path}.dedup.eventTimeField"),
                            Some(&step.name),
                            format!(
                                "field {time_field:?} is the event-time field and must be a timestamp or integer (epoch milliseconds), but it is {}",
                                info.field_type
                            ),
                        ),
                        _ => need(time_field, FieldType::Any, "the event-time field".to_owned()),
                    }
                }
            }
            Operator::Order(o) => {
                for key in &o.key {
                    need(key, FieldType::Any, "the order key".to_owned());
                }
                match stream.schema.get(&o.sequence) {
                    Some(info) if info.field_type != FieldType::Integer => self.error(
                        ErrorKind::WrongType,
                        format!("{path}.order.sequence"),
                        Some(&step.name),
                        format!(
                            "sequence field {:?} must be an integer so events can be ordered by it, but it is {}",
                            o.sequence, info.field_type
                        ),
                    ),
                    _ => need(&o.sequence, FieldType::Integer, "the order sequence".to_owned()),
                }
            }
            Operator::Join(j) => self.lookup_requirements(
                &j.table,
                &j.lookup_key,
                &j.fields,
                stream,
                &format!("{path}.join"),
                &step.name,
                &mut need,
            ),
            Operator::Enrich(e) => self.lookup_requirements(
                &e.table,
                &e.lookup_key,
                &e.fields,
                stream,
                &format!("{path}.enrich"),
                &step.name,
                &mut need,
            ),
            Operator::Rekey(r) => {
                for key in &r.key {
                    need(key, FieldType::Any, "the new key".to_owned());
                }
            }
        }
        let mut requires_order_by = None;
        if let Some(contract) = declared {
            for required in &contract.requires {
                need(
                    &required.name,
                    required.field_type,
                    "the processor's contract".to_owned(),
                );
            }
            if let Some(keys) = &contract.keys
                && !keys.requires_order_by.is_empty()
            {
                requires_order_by = Some(keys.requires_order_by.clone());
            }
        }
        StepContract {
            requires,
            state_key: derived_state_key(op),
            requires_order_by,
        }
    }

    fn expression_requirements(
        &mut self,
        expression: &str,
        stream: &StreamState,
        path: &str,
        step: &str,
        need: &mut impl FnMut(&str, FieldType, String),
    ) {
        match expression_variables(expression) {
            Err(parse_error) => self.error(
                ErrorKind::InvalidExpression,
                path,
                Some(step),
                format!("the CEL expression does not parse: {}", parse_error.trim()),
            ),
            Ok(variables) => {
                for variable in variables {
                    if variable == EVENT_VARIABLE && stream.schema.get(EVENT_VARIABLE).is_none() {
                        continue;
                    }
                    need(&variable, FieldType::Any, "the expression".to_owned());
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn lookup_requirements(
        &mut self,
        table: &crate::ops::TableSpec,
        on: &[String],
        fields: &[String],
        stream: &StreamState,
        path: &str,
        step: &str,
        need: &mut impl FnMut(&str, FieldType, String),
    ) {
        let table_schema = Schema::from_spec(&table.schema);
        if on.len() != table.key.len() {
            self.error(
                ErrorKind::InvalidOperator,
                format!("{path}.lookupKey"),
                Some(step),
                format!(
                    "the join matches {} event field(s) {} against table {:?}, whose key has {} field(s) {}",
                    on.len(),
                    show_key(on),
                    table.name,
                    table.key.len(),
                    show_key(&table.key)
                ),
            );
        }
        for (i, key) in table.key.iter().enumerate() {
            let Some(key_info) = table_schema.get(key) else {
                self.error(
                    ErrorKind::MissingField,
                    format!("{path}.table.key[{i}]"),
                    Some(step),
                    format!(
                        "table key field {key:?} is not in the table schema ({})",
                        table_schema.describe()
                    ),
                );
                continue;
            };
            if let Some(event_field) = on.get(i) {
                match stream.schema.get(event_field) {
                    Some(info) if !info.field_type.satisfies(key_info.field_type) && key_info.field_type != FieldType::Any => {
                        self.error(
                            ErrorKind::WrongType,
                            format!("{path}.lookupKey[{i}]"),
                            Some(step),
                            format!(
                                "event field {event_field:?} is {} but is matched against table key {key:?}, which is {}",
                                info.field_type, key_info.field_type
                            ),
                        )
                    }
                    _ => need(event_field, FieldType::Any, format!("the join key matched against table {:?}", table.name)),
                }
            }
        }
        for (i, field) in fields.iter().enumerate() {
            if table_schema.get(field).is_none() {
                self.error(
                    ErrorKind::MissingField,
                    format!("{path}.fields[{i}]"),
                    Some(step),
                    format!(
                        "table {:?} has no field {field:?} ({})",
                        table.name,
                        table_schema.describe()
                    ),
                );
            }
        }
    }

    fn check_requirements(
        &mut self,
        contract: &StepContract,
        stream: &StreamState,
        path: &str,
        step: &str,
    ) {
        // One error per missing field, even when several parts of the step need it.
        let mut reported = BTreeSet::new();
        for requirement in &contract.requires {
            match stream.schema.get(&requirement.field) {
                None if !reported.insert(requirement.field.as_str()) => {}
                None => {
                    let hint = if let Some(by) = &stream.rekeyed_by {
                        format!(" (the stream was last re-keyed by step {by:?})")
                    } else {
                        String::new()
                    };
                    self.error(
                        ErrorKind::MissingField,
                        path,
                        Some(step),
                        format!(
                            "needs field {:?} ({}) for {}, but it does not reach this step{hint}; available: {}",
                            requirement.field,
                            requirement.field_type,
                            requirement.purpose,
                            stream.schema.describe()
                        ),
                    );
                }
                Some(info) if !info.field_type.satisfies(requirement.field_type) => {
                    self.error(
                        ErrorKind::WrongType,
                        path,
                        Some(step),
                        format!(
                            "needs field {:?} to be {} for {}, but it arrives as {}",
                            requirement.field,
                            requirement.field_type,
                            requirement.purpose,
                            info.field_type
                        ),
                    );
                }
                Some(_) => {}
            }
        }
    }

    /// The stream after a step.
    fn apply_step(
        &mut self,
        mut stream: StreamState,
        op: Operator<'_>,
        declared: Option<&ContractSpec>,
        step: &str,
    ) -> StreamState {
        match op {
            Operator::Filter(_) | Operator::Dedup(_) => {}
            Operator::Order(o) => {
                // The order step emits each key's events in sequence order.
                stream.ordered_by = Some(key_set(&o.key));
            }
            Operator::Map(m) => {
                for field in &m.fields {
                    stream.schema.insert(
                        &field.name,
                        FieldInfo {
                            field_type: field.field_type,
                            optional: false,
                        },
                    );
                }
            }
            Operator::Project(p) | Operator::Extract(p) => {
                let mut out = if matches!(op, Operator::Project(_)) {
                    Schema {
                        fields: BTreeMap::new(),
                        open: false,
                    }
                } else {
                    stream.schema.clone()
                };
                for field in &p.fields {
                    let Some(source_path) = pointer_to_path(&field.from) else {
                        continue;
                    };
                    let info = stream.schema.get(&source_path).unwrap_or(FieldInfo {
                        field_type: FieldType::Any,
                        optional: true,
                    });
                    out.insert(
                        &field.name,
                        FieldInfo {
                            field_type: info.field_type,
                            optional: info.optional || field.optional,
                        },
                    );
                    for (nested, nested_info) in stream.schema.nested(&source_path) {
                        out.insert(&format!("{}.{nested}", field.name), nested_info);
                    }
                }
                if matches!(op, Operator::Project(_)) {
                    // Key fields that the projection dropped can no longer key the output.
                    stream.key.retain(|k| out.get(k).is_some());
                }
                stream.schema = out;
            }
            Operator::Join(j) => {
                let optional = j.kind == crate::ops::JoinKind::Left;
                add_table_fields(
                    &mut stream.schema,
                    &j.table,
                    &j.fields,
                    j.into.as_deref(),
                    optional,
                );
            }
            Operator::Enrich(e) => {
                add_table_fields(&mut stream.schema, &e.table, &e.fields, Some(&e.into), true)
            }
            Operator::Rekey(r) => {
                stream.key = r.key.clone();
                stream.rekeyed_by = Some(step.to_owned());
            }
        }
        // A Processor's declared schema effect refines what the operator alone tells
        // (for example the types of computed fields).
        if let Some(SchemaEffectSpec { effect, fields }) = declared.and_then(|c| c.schema.as_ref())
        {
            match effect {
                SchemaEffect::Passthrough => {}
                SchemaEffect::Adds => {
                    for field in fields {
                        stream.schema.insert(
                            &field.name,
                            FieldInfo {
                                field_type: field.field_type,
                                optional: field.optional,
                            },
                        );
                    }
                }
                SchemaEffect::Removes => {
                    for field in fields {
                        stream.schema.remove(&field.name);
                    }
                }
                SchemaEffect::Replaces => {
                    let mut replaced = crate::schema::SchemaSpec {
                        fields: fields.clone(),
                        open: false,
                    };
                    replaced.open = false;
                    stream.schema = Schema::from_spec(&replaced);
                }
            }
        }
        stream
    }

    fn check_topic_names(&mut self, topics: &[PlanTopic]) {
        let source = &self.pipeline.spec.source.topic;
        for topic in topics {
            if topic.role != TopicRole::Source
                && topic.role != TopicRole::Sink
                && topic.role != TopicRole::Table
                && &topic.name == source
            {
                self.error(
                    ErrorKind::TopicCycle,
                    "spec.deadLetter.topic",
                    None,
                    format!(
                        "topic {:?} is the pipeline's source and cannot also be its {} topic",
                        topic.name,
                        topic.role.as_str()
                    ),
                );
            }
            if topic.name.len() > 249 {
                self.error(
                    ErrorKind::InvalidOperator,
                    "metadata.name",
                    None,
                    format!("the internal topic name {:?} is longer than Kafka's limit of 249 characters; shorten the pipeline or step name", topic.name),
                );
            }
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

fn add_table_fields(
    schema: &mut Schema,
    table: &crate::ops::TableSpec,
    fields: &[String],
    into: Option<&str>,
    optional: bool,
) {
    let table_schema = Schema::from_spec(&table.schema);
    let chosen: Vec<(String, FieldInfo)> = table_schema
        .fields
        .iter()
        .filter(|(name, _)| {
            if fields.is_empty() {
                !table.key.contains(name)
            } else {
                fields
                    .iter()
                    .any(|f| f == *name || name.starts_with(&format!("{f}.")))
            }
        })
        .map(|(name, info)| (name.clone(), *info))
        .collect();
    for (name, info) in chosen {
        let path = match into {
            Some(into) => format!("{into}.{name}"),
            None => name,
        };
        schema.insert(
            &path,
            FieldInfo {
                field_type: info.field_type,
                optional: info.optional || optional,
            },
        );
    }
}
