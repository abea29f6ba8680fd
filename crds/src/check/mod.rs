//! The processing-contract checker and plan compiler.
//!
//! Checking propagates the source schema, the stream key, the partitioning and
//! the per-key order guarantee through every step. Each step's requirements must
//! hold on what reaches it; its contract says what leaves it. Stages are cut where
//! a stateful step needs another partitioning or a step asks for its own
//! parallelism. All errors are collected, not only the first.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::pipeline::capture::SourceTable;
use crate::pipeline::{Delivery, Pipeline};
use crate::plan::{MAX_TRANSACTIONAL_COMMIT_INTERVAL, Plan};
use crate::processor::Processor;
use crate::schema::{FieldType, Schema};

mod avro;
mod capture;
mod contracts;
mod expressions;
mod graph;
mod lake;
pub mod limits;
mod sinks;
mod stages;
mod steps;
mod topics;
mod typing;

pub use avro::{INLINE_SCHEMA_PATH, INLINE_VERSION, RegisteredSource};
pub use contracts::check_processor;
pub use expressions::{EVENT_VARIABLE, compile_bounded, expression_variables, parse_error_message};
pub use graph::{CycleError, PipelineId, topic_cycles};
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
    /// A sink or table on another Kafka cluster than the source: one
    /// transaction (and one set of clients) cannot span clusters.
    CrossCluster,
    /// A setting the runtime cannot honour as given (an exactly-once commit
    /// interval longer than Kafka lets a transaction stay open).
    InvalidSetting,
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
    /// Fields an earlier step removed, by path: a step that needs one is told
    /// where it went, not only that it is missing.
    removed_by: BTreeMap<String, Removal>,
}

/// How a field left the stream, for the message of a step that needs it.
#[derive(Clone, Debug)]
struct Removal {
    /// For example `step "slim" (project)`.
    by: String,
    /// What to change, for example `keep it in that step's fields`.
    remedy: String,
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
    /// The captured table as its capture last described it, for a
    /// `postgres` source: its columns join the source schema, and the
    /// declared fields are checked against it.
    source_table: Option<&'a SourceTable>,
    /// The registered schema an Avro source is read with.
    registered_source: Option<&'a RegisteredSource>,
    processors: BTreeMap<&'a str, &'a Processor>,
    errors: Vec<ContractError>,
    namespace: String,
    name: String,
    /// Missing fields already reported, by field and cause: the index of the
    /// error and the later steps that need the same field, which are named in
    /// that one error rather than each getting a copy of it.
    missing_reported: BTreeMap<(String, String), (usize, Vec<String>)>,
    /// Processors whose own contract errors were reported (at the first step
    /// that references each).
    processors_reported: BTreeSet<String>,
}

/// Checks a pipeline against the processors it may reference and compiles it.
pub fn compile(pipeline: &Pipeline, processors: &[Processor]) -> Result<Plan, ContractErrors> {
    compile_with_source(pipeline, processors, None)
}

/// [`compile`], with the table a `postgres` source captures as its capture
/// described it (`status.capture.table`): the source schema's declared
/// fields and key are then checked against the table's columns.
pub fn compile_with_source(
    pipeline: &Pipeline,
    processors: &[Processor],
    source_table: Option<&SourceTable>,
) -> Result<Plan, ContractErrors> {
    compile_with_facts(
        pipeline,
        processors,
        &SourceFacts {
            table: source_table,
            registered: None,
        },
    )
}

/// What is known about the source besides its manifest: the table a
/// capture described, the registered schema an Avro source is read with.
#[derive(Clone, Copy, Debug, Default)]
pub struct SourceFacts<'a> {
    pub table: Option<&'a SourceTable>,
    pub registered: Option<&'a RegisteredSource>,
}

/// [`compile`], with what is known about the source: a `format: avro`
/// source's schema is then the registered schema's, and every step is
/// checked against what producers really send. Without it the declared
/// schema stands in.
pub fn compile_with_facts(
    pipeline: &Pipeline,
    processors: &[Processor],
    facts: &SourceFacts<'_>,
) -> Result<Plan, ContractErrors> {
    Checker::new(pipeline, processors, facts.table)
        .with_registered(facts.registered)
        .finish(Checker::run)
}

/// The plan of a `postgres` source's capture alone (its topic and
/// configuration; no stages, no sinks), checked without the steps. The
/// operator runs it before the rest when the steps need the table's columns,
/// which the capture describes once it runs.
pub fn compile_capture(pipeline: &Pipeline) -> Result<Plan, ContractErrors> {
    Checker::new(pipeline, &[], None).finish(Checker::capture_plan)
}

impl<'a> Checker<'a> {
    fn new(
        pipeline: &'a Pipeline,
        processors: &'a [Processor],
        source_table: Option<&'a SourceTable>,
    ) -> Self {
        let id = PipelineId::of(pipeline);
        Checker {
            pipeline,
            source_table,
            registered_source: None,
            processors: processors
                .iter()
                .filter_map(|p| p.metadata.name.as_deref().map(|name| (name, p)))
                .collect(),
            errors: Vec::new(),
            namespace: id.namespace,
            name: id.name,
            missing_reported: BTreeMap::new(),
            processors_reported: BTreeSet::new(),
        }
    }

    fn with_registered(mut self, registered: Option<&'a RegisteredSource>) -> Self {
        self.registered_source = registered;
        self
    }

    fn finish(mut self, build: impl FnOnce(&mut Self) -> Plan) -> Result<Plan, ContractErrors> {
        self.check_commit_interval();
        let plan = build(&mut self);
        self.finish_errors();
        if self.errors.is_empty() {
            Ok(plan)
        } else {
            Err(ContractErrors(self.errors))
        }
    }

    /// A transactional pipeline's commit interval must fit in a transaction
    /// the broker accepts.
    fn check_commit_interval(&mut self) {
        let spec = &self.pipeline.spec;
        let transactional =
            spec.delivery == Delivery::ExactlyOnce || spec.source.postgres.is_some();
        let longest = MAX_TRANSACTIONAL_COMMIT_INTERVAL;
        if transactional && spec.commit_interval > longest {
            let commits = if spec.delivery == Delivery::ExactlyOnce {
                "delivery: ExactlyOnce"
            } else {
                "a postgres source's capture"
            };
            self.error(
                ErrorKind::InvalidSetting,
                "spec.commitInterval",
                None,
                format!(
                    "{} is longer than {longest}, the most a pipeline whose commits are Kafka transactions ({commits}) may wait between commits: a transaction stays open for a whole interval, and brokers refuse to keep one open longer than 15 minutes by default (transaction.max.timeout.ms)",
                    spec.commit_interval
                ),
            );
        }
    }

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

    /// Names the later steps in the first report of a missing field, and drops
    /// exact repeats (same kind, place and message): one problem, one error.
    fn finish_errors(&mut self) {
        for (index, also) in self.missing_reported.values() {
            if also.is_empty() {
                continue;
            }
            let steps: Vec<String> = also.iter().map(|s| format!("{s:?}")).collect();
            let plural = if also.len() == 1 { "" } else { "s" };
            self.errors[*index].message.push_str(&format!(
                " (step{plural} {} need{} it too)",
                steps.join(", "),
                if also.len() == 1 { "s" } else { "" }
            ));
        }
        let mut seen = BTreeSet::new();
        self.errors.retain(|e| {
            seen.insert((
                format!("{:?}", e.kind),
                e.path.clone(),
                e.subject.clone(),
                e.message.clone(),
            ))
        });
    }

    fn topic_name(&self, role: &str, suffix: Option<&str>) -> String {
        match suffix {
            Some(suffix) => format!("keystone.{}.{}.{role}.{suffix}", self.namespace, self.name),
            None => format!("keystone.{}.{}.{role}", self.namespace, self.name),
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
}
