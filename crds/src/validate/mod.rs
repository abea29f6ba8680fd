//! Validation of a manifest against the CRDs' own OpenAPI schema, as the API
//! server validates a custom resource on create, so that `check` refuses what
//! `kubectl apply` refuses.
//!
//! The steps and their order follow the API server's handling of a create with
//! strict field validation: unknown fields are reported (everywhere, `status`
//! included), `status` is then dropped (the CRDs have a status subresource, so a
//! create cannot set it), null values of non-nullable fields without a default are
//! pruned, `default:`s are applied, and the result is checked against the
//! structural schema, its list types and, unless a value had the wrong type, its
//! CEL rules. `metadata` is checked as the API server checks a custom resource's
//! ObjectMeta. One rule is Keystone's own (see [`Origin::Keystone`]).

use std::sync::OnceLock;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde_json::Value as Json;

use crate::pipeline::Pipeline;
use crate::processor::Processor;

mod meta;
mod rules;
mod schema;
#[cfg(test)]
mod tests;

pub use meta::{MAX_PIPELINE_NAME, pipeline_name_problem};

/// One way a document breaks its CRD's schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The field, as `spec.steps[2].dedup.key`.
    pub path: String,
    /// What is wrong and, where obvious, what to do.
    pub message: String,
    /// Whose rule it is: the API server's, or Keystone's own.
    pub origin: Origin,
}

/// Who refuses a document for a [`Violation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The API server refuses it (the CRD schema, its CEL rules, ObjectMeta validation).
    ApiServer,
    /// The API server accepts it, but Keystone could not run it (for example a
    /// Pipeline name that cannot prefix its stage Services' names).
    Keystone,
}

impl Violation {
    fn new(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            message: message.into(),
            origin: Origin::ApiServer,
        }
    }
}

/// The violations of one document of `kind` (`Pipeline` or `Processor`), all of
/// them, in document order; other kinds have none here (the manifest reader
/// refuses them).
pub fn validate(kind: &str, document: &Json) -> Vec<Violation> {
    let Some(schema) = crd_schema(kind) else {
        return Vec::new();
    };
    let mut violations = Vec::new();
    let Some(object) = document.as_object() else {
        violations.push(Violation::new(
            "",
            format!(
                "a {kind} is an object, not {}",
                schema::json_type_name(document)
            ),
        ));
        return violations;
    };
    violations.extend(meta::validate_metadata(kind, object.get("metadata")));

    // Strict field validation: the API server reports unknown fields while
    // decoding, before anything else, and status is decoded like the rest.
    let mut body = document.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("metadata");
    }
    schema::unknown_fields(&body, schema, "", &mut violations);
    if let Some(map) = body.as_object_mut() {
        map.remove("status");
    }
    schema::prune_nulls(&mut body, schema);
    schema::apply_defaults(&mut body, schema);

    let mut structural = schema::Report::default();
    schema::validate_value(&body, schema, "", &mut structural);
    violations.extend(structural.violations);
    // Like the API server, the CEL rules run only when no violation blocks them
    // (see `schema::Report`).
    if !structural.blocking {
        rules::validate_rules(&body, schema, "", &mut violations);
    }
    violations
}

/// Paths of fields in `value` that the structural `schema` does not define, as the
/// API server's strict field validation would report them.
pub fn unknown_fields(value: &Json, schema: &Json) -> Vec<String> {
    let mut violations = Vec::new();
    schema::unknown_fields(value, schema, "", &mut violations);
    violations.into_iter().map(|v| v.path).collect()
}

/// The `openAPIV3Schema` of the CRD of `kind`, generated once.
pub fn crd_schema(kind: &str) -> Option<&'static Json> {
    static PIPELINE: OnceLock<Json> = OnceLock::new();
    static PROCESSOR: OnceLock<Json> = OnceLock::new();
    let (cell, crd): (_, fn() -> CustomResourceDefinition) = match kind {
        "Pipeline" => (&PIPELINE, Pipeline::crd),
        "Processor" => (&PROCESSOR, Processor::crd),
        _ => return None,
    };
    Some(cell.get_or_init(|| {
        crd()
            .spec
            .versions
            .first()
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .expect("the generated CRD has an openAPIV3Schema")
    }))
}

/// `parent.key`, or `key` at the root.
fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}
