//! Validation of a manifest against the CRDs' own OpenAPI schema, as the API
//! server would validate it, so that `check` refuses what `kubectl apply` refuses.

use kube::CustomResourceExt;
use serde_json::Value as Json;

use crate::pipeline::Pipeline;
use crate::processor::Processor;

/// One way a document breaks its CRD's schema.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The field, as `spec.steps[2].dedup.key`.
    pub path: String,
    /// What is wrong and, where obvious, what to do.
    pub message: String,
}

/// The violations of one document of `kind` (`Pipeline` or `Processor`); other
/// kinds have none here (the manifest reader refuses them).
pub fn validate(kind: &str, document: &Json) -> Vec<Violation> {
    let schema = match kind {
        "Pipeline" => crd_schema(&Pipeline::crd()),
        "Processor" => crd_schema(&Processor::crd()),
        _ => return Vec::new(),
    };
    unknown_fields(document, &schema)
        .into_iter()
        .map(|path| Violation {
            message: format!("unknown field {path}"),
            path,
        })
        .collect()
}

fn crd_schema(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Json {
    crd.spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Json::Null)
}

/// Paths of fields in `value` that the structural `schema` does not define, as the
/// API server's strict field validation would report them.
pub fn unknown_fields(value: &Json, schema: &Json) -> Vec<String> {
    let mut unknown = Vec::new();
    walk(value, schema, "", &mut unknown);
    unknown
}

fn walk(value: &Json, schema: &Json, path: &str, unknown: &mut Vec<String>) {
    if schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Json::Bool(true)) {
        return;
    }
    match value {
        Json::Object(map) => {
            let properties = schema.get("properties").and_then(Json::as_object);
            let additional = schema.get("additionalProperties");
            for (key, child) in map {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if path.is_empty() && (key == "apiVersion" || key == "kind" || key == "metadata") {
                    continue;
                }
                match (properties.and_then(|p| p.get(key)), additional) {
                    (Some(child_schema), _) => walk(child, child_schema, &child_path, unknown),
                    (None, Some(Json::Object(additional_schema))) => walk(
                        child,
                        &Json::Object(additional_schema.clone()),
                        &child_path,
                        unknown,
                    ),
                    (None, Some(Json::Bool(true))) => {}
                    (None, _) if properties.is_none() && additional.is_none() => {}
                    (None, _) => unknown.push(child_path),
                }
            }
        }
        Json::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(item, item_schema, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}
