//! The `Processor` custom resource: a reusable processing step with its contract.

// Several printer columns share `type_ = "string"`; clippy reads that as a duplicated attribute.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ops::OperatorSpec;
use crate::schema::{FieldSpec, FieldType};

/// A reusable processing step: a built-in operator, its configuration, and the
/// contract it promises to the steps around it. Pipelines use it with `processorRef`.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "keystone.dev",
    version = "v1alpha1",
    kind = "Processor",
    namespaced,
    status = "ProcessorStatus",
    shortname = "ksproc",
    category = "keystone",
    printcolumn(name = "Operator", type_ = "string", json_path = ".status.operator"),
    printcolumn(
        name = "Valid",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"ContractValid\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.filter), has(self.map), has(self.project), has(self.extract), has(self.dedup), has(self.order), has(self.join), has(self.enrich), has(self.rekey)].filter(x, x).size() == 1",
     "message": "set exactly one operator: filter, map, project, extract, dedup, order, join, enrich or rekey"}
]))]
#[serde(rename_all = "camelCase")]
pub struct ProcessorSpec {
    /// What the processor does, for people reading `kubectl describe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// The built-in operator this processor runs and its configuration.
    #[serde(flatten)]
    pub operator: OperatorSpec,
    /// The processor's contract. The checker derives what it can from the operator;
    /// declare here what the operator's configuration cannot say (for example the
    /// types of computed fields, or that it needs events in order per key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<ContractSpec>,
}

/// A processing contract: what a step needs and what it does to the stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContractSpec {
    /// Fields, with their types, that must reach the step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub requires: Vec<RequiredField>,
    /// What the step does to the event schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<SchemaEffectSpec>,
    /// What the step does to keys and per-key order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<KeyEffectSpec>,
    /// The state the step keeps, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<StateContractSpec>,
}

/// A field a step needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequiredField {
    /// Dotted path of the field.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// The type it must have; `any` accepts every type.
    #[serde(rename = "type", default = "any_type")]
    pub field_type: FieldType,
}

fn any_type() -> FieldType {
    FieldType::Any
}

/// How a step changes the schema of the events passing through it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SchemaEffect {
    /// Events leave with the schema they arrived with.
    #[default]
    Passthrough,
    /// The listed fields are added (or overwritten) and the rest is kept.
    Adds,
    /// The listed fields are removed and the rest is kept.
    Removes,
    /// Events leave with exactly the listed fields.
    Replaces,
}

/// The schema effect of a step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchemaEffectSpec {
    /// Passthrough, Adds, Removes or Replaces.
    #[serde(default)]
    pub effect: SchemaEffect,
    /// The fields added (Adds), removed (Removes, types ignored) or produced (Replaces).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 512))]
    pub fields: Vec<FieldSpec>,
}

/// How a step changes the key of the stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum KeyEffect {
    /// Events keep their key.
    #[default]
    Preserves,
    /// Events leave keyed by `key`.
    Rekeys,
}

/// The key and ordering effect of a step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyEffectSpec {
    /// Preserves or Rekeys.
    #[serde(default)]
    pub effect: KeyEffect,
    /// The new key fields (Rekeys).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 256)))]
    pub key: Vec<String>,
    /// The step needs the events of each value of these fields in their original order
    /// (for example a step that applies change events to a store).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 256)))]
    pub requires_order_by: Vec<String>,
}

/// The state a step keeps.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateContractSpec {
    /// The fields the state is keyed by. The stream must be partitioned by them.
    #[schemars(length(min = 1, max = 8), inner(length(min = 1, max = 256)))]
    pub keyed_by: Vec<String>,
}

/// What the operator last saw of a Processor.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProcessorStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The built-in operator the processor runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// Conditions: `ContractValid` says whether the declared contract agrees with the operator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Pipelines in the namespace that reference this processor.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
}
