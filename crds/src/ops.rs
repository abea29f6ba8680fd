//! Built-in operators and their configuration, shared by inline pipeline steps
//! and by Processors.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::schema::{FieldType, SchemaSpec};

/// Keeps the events for which a CEL expression is true.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FilterSpec {
    /// A CEL expression that evaluates to a boolean. Top-level fields are variables
    /// (`amount > 100 && status == "paid"`); `event` is the whole event
    /// (`event["order-id"]`). An event for which the expression fails or is not a
    /// boolean goes to the dead-letter topic.
    #[schemars(length(min = 1, max = 4096))]
    pub expression: String,
}

/// Adds or overwrites fields computed by CEL expressions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MapSpec {
    /// The fields to compute, in order; a later expression does not see earlier results.
    #[schemars(length(min = 1, max = 128))]
    pub fields: Vec<ComputedField>,
}

/// One computed field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputedField {
    /// Dotted path of the field to write, for example `total` or `customer.tier`.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// A CEL expression over the input event (same variables as `filter`).
    #[schemars(length(min = 1, max = 4096))]
    pub expression: String,
    /// The type the expression produces; downstream steps are checked against it.
    #[serde(rename = "type", default = "any_type")]
    pub field_type: FieldType,
}

fn any_type() -> FieldType {
    FieldType::Any
}

/// Builds a new event shape from JSON pointers into the input event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSpec {
    /// The output fields, each read from a JSON pointer into the input event.
    #[schemars(length(min = 1, max = 256))]
    pub fields: Vec<ProjectedField>,
}

/// One output field of `project` or `extract`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectedField {
    /// Dotted path of the output field.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// RFC 6901 JSON pointer into the input event, for example `/payload/after/id`.
    #[schemars(length(min = 2, max = 1024), regex(pattern = "^/.+"))]
    pub from: String,
    /// When true, an event without the value gets no output field instead of being
    /// dead-lettered.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

/// Drops repeated events: the first event for a key within the window passes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DedupSpec {
    /// Fields whose values together identify an event (for example `[event_id]`).
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub key: Vec<String>,
    /// How long a key is remembered after its first event.
    pub window: Duration,
    /// A timestamp or epoch-milliseconds field to measure the window in event time.
    /// Without it the window runs on processing time. An event whose time is
    /// more than 1 hour ahead of processing time is dead-lettered (one event
    /// far in the future would otherwise expire every remembered key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub event_time_field: Option<String>,
}

/// What happens to an event whose sequence is not above the last one emitted for its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StalePolicy {
    /// Drop it and count it in the step's `dropped` metric.
    #[default]
    Drop,
    /// Send it to the dead-letter topic with reason `stale`.
    DeadLetter,
}

/// Re-orders change events per key by a sequence field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderSpec {
    /// Fields identifying the entity whose events must stay in order (for example `[order_id]`).
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub key: Vec<String>,
    /// An integer field that increases with every change of an entity (a CDC log
    /// position or version).
    #[schemars(length(min = 1, max = 256))]
    pub sequence: String,
    /// How long an event may wait for a gap before it is released anyway.
    pub max_delay: Duration,
    /// The most events buffered per key; past it the lowest sequence is released.
    /// Over all keys, an instance whose waiting events take more than half its
    /// memory limit stops reading input until enough of them have left.
    #[serde(default = "default_max_buffered")]
    #[schemars(range(min = 1, max = 1_000_000))]
    // Kubernetes knows no "uint32" format (kubectl warns on apply).
    #[schemars(extend("format" = "int64"))]
    pub max_buffered: u32,
    /// Whether sequences are contiguous (each change is the previous plus one). When
    /// true, an event is released as soon as its predecessor was; otherwise events wait
    /// for `maxDelay` so that late predecessors can overtake them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub contiguous: bool,
    /// With `contiguous`, the sequence of each key's first change (1 for most CDC
    /// versions, 0 for some). It leaves at once; a key whose first event has
    /// another sequence waits up to `maxDelay` for its predecessors.
    #[serde(default = "default_first_sequence")]
    pub first_sequence: i64,
    /// What to do with stale events (sequence not above the last emitted one for the key).
    #[serde(default)]
    pub on_stale: StalePolicy,
}

fn default_first_sequence() -> i64 {
    1
}

fn default_max_buffered() -> u32 {
    1000
}

/// Inner drops stream events without a table match; left keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum JoinKind {
    #[default]
    Inner,
    Left,
}

/// A table materialized from a compacted Kafka topic (or, in local mode, a JSON-lines file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TableSpec {
    /// The table's name; in local mode `--table NAME=FILE` supplies its rows.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The compacted topic holding the latest row per key.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[A-Za-z0-9._\-]+$"))]
    pub topic: String,
    /// The Kafka cluster of the topic, from the operator's configuration; the default cluster when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Fields of a row that form its key.
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub key: Vec<String>,
    /// The schema of the rows.
    pub schema: SchemaSpec,
    /// Replicate the whole table to every instance instead of partitioning it like the
    /// stream. Suits small tables; removes the need to repartition the stream by the join key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replicated: bool,
}

/// Joins each event with the table row whose key equals the event's `on` fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JoinSpec {
    /// The table to join with.
    pub table: TableSpec,
    /// Event fields matched, in order, against the table's key fields. (Not `on`:
    /// YAML 1.1 parsers, kubectl's among them, read an unquoted `on` as `true`.)
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub lookup_key: Vec<String>,
    /// `Inner` drops events without a matching row; `Left` keeps them.
    #[serde(default)]
    pub kind: JoinKind,
    /// Table fields to copy into the event; all non-key fields when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 256)))]
    pub fields: Vec<String>,
    /// Where the copied fields go: under this object field when set (`customer`),
    /// at the top level otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub into: Option<String>,
}

/// Adds the matching table row's fields to each event under one field; events
/// without a match pass unchanged (a left join).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnrichSpec {
    /// The table to look up.
    pub table: TableSpec,
    /// Event fields matched, in order, against the table's key fields. (Not `on`:
    /// YAML 1.1 parsers, kubectl's among them, read an unquoted `on` as `true`.)
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub lookup_key: Vec<String>,
    /// Table fields to copy; all non-key fields when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1, max = 256)))]
    pub fields: Vec<String>,
    /// The object field that receives the copied fields, for example `customer`.
    #[schemars(length(min = 1, max = 256))]
    pub into: String,
}

/// Sets the key of the stream (and of Kafka output) to other fields. Stateful steps
/// after it that are keyed by the new key read from a repartition topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RekeySpec {
    /// The new key fields.
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub key: Vec<String>,
}

/// A built-in operator with its configuration. Exactly one is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperatorSpec {
    /// Keep events matching a CEL expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterSpec>,
    /// Add fields computed by CEL expressions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapSpec>,
    /// Replace each event by the fields read from JSON pointers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<ProjectSpec>,
    /// Add fields read from JSON pointers, keeping the rest of the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extract: Option<ProjectSpec>,
    /// Drop repeated events by key within a window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupSpec>,
    /// Re-order change events per key by a sequence field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<OrderSpec>,
    /// Join with a table from a compacted topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinSpec>,
    /// Enrich events with a table row placed under one field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrich: Option<EnrichSpec>,
    /// Re-key the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rekey: Option<RekeySpec>,
}

/// The one configured operator of an [`OperatorSpec`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Operator<'a> {
    Filter(&'a FilterSpec),
    Map(&'a MapSpec),
    Project(&'a ProjectSpec),
    Extract(&'a ProjectSpec),
    Dedup(&'a DedupSpec),
    Order(&'a OrderSpec),
    Join(&'a JoinSpec),
    Enrich(&'a EnrichSpec),
    Rekey(&'a RekeySpec),
}

impl Operator<'_> {
    pub fn kind(&self) -> &'static str {
        match self {
            Operator::Filter(_) => "filter",
            Operator::Map(_) => "map",
            Operator::Project(_) => "project",
            Operator::Extract(_) => "extract",
            Operator::Dedup(_) => "dedup",
            Operator::Order(_) => "order",
            Operator::Join(_) => "join",
            Operator::Enrich(_) => "enrich",
            Operator::Rekey(_) => "rekey",
        }
    }
}

/// The CEL rule that makes exactly one operator field required, as a list of field names.
pub const OPERATOR_FIELDS: [&str; 9] = [
    "filter", "map", "project", "extract", "dedup", "order", "join", "enrich", "rekey",
];

impl OperatorSpec {
    /// All operators that are set, in declaration order.
    pub fn configured(&self) -> Vec<Operator<'_>> {
        let mut ops = Vec::new();
        if let Some(s) = &self.filter {
            ops.push(Operator::Filter(s));
        }
        if let Some(s) = &self.map {
            ops.push(Operator::Map(s));
        }
        if let Some(s) = &self.project {
            ops.push(Operator::Project(s));
        }
        if let Some(s) = &self.extract {
            ops.push(Operator::Extract(s));
        }
        if let Some(s) = &self.dedup {
            ops.push(Operator::Dedup(s));
        }
        if let Some(s) = &self.order {
            ops.push(Operator::Order(s));
        }
        if let Some(s) = &self.join {
            ops.push(Operator::Join(s));
        }
        if let Some(s) = &self.enrich {
            ops.push(Operator::Enrich(s));
        }
        if let Some(s) = &self.rekey {
            ops.push(Operator::Rekey(s));
        }
        ops
    }

    /// The single configured operator, if exactly one is set.
    pub fn single(&self) -> Option<Operator<'_>> {
        match self.configured().as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }
}
