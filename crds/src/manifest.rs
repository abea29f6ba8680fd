//! Reading Pipeline and Processor manifests from YAML, with errors that say
//! where: the line and column of a syntax or type error, the path of an unknown field.

use kube::CustomResourceExt;
use serde::Deserialize;
use serde_json::Value as Json;

use crate::pipeline::Pipeline;
use crate::processor::Processor;

/// Everything read from one or more manifest files.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    pub pipelines: Vec<Pipeline>,
    pub processors: Vec<Processor>,
}

impl Manifests {
    pub fn extend(&mut self, other: Manifests) {
        self.pipelines.extend(other.pipelines);
        self.processors.extend(other.processors);
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: document {document}: {message}")]
    Document {
        file: String,
        document: usize,
        message: String,
    },
}

const API_VERSION: &str = "keystone.dev/v1alpha1";

/// Parses every YAML document in `text` (named `file` in errors). Documents of
/// other kinds are an error: a manifest given to Keystone should hold only its kinds.
pub fn parse_manifests(file: &str, text: &str) -> Result<Manifests, ManifestError> {
    let mut manifests = Manifests::default();
    let documents = serde_yaml_ng::Deserializer::from_str(text);
    for (index, document) in documents.enumerate() {
        let number = index + 1;
        let value =
            serde_yaml_ng::Value::deserialize(document).map_err(|e| located(file, number, &e))?;
        if value.is_null() {
            continue;
        }
        let json: Json = serde_json::to_value(&value).map_err(|e| ManifestError::Document {
            file: file.to_owned(),
            document: number,
            message: format!("not a JSON-compatible document: {e}"),
        })?;
        let kind = json.get("kind").and_then(Json::as_str).unwrap_or_default();
        let api_version = json
            .get("apiVersion")
            .and_then(Json::as_str)
            .unwrap_or_default();
        let doc_error = |message: String| ManifestError::Document {
            file: file.to_owned(),
            document: number,
            message,
        };
        if api_version != API_VERSION {
            return Err(doc_error(format!(
                "apiVersion is {api_version:?}, expected {API_VERSION:?} (kind {kind:?})"
            )));
        }
        let unknown = match kind {
            "Pipeline" => unknown_fields(&json, &crd_schema(&Pipeline::crd())),
            "Processor" => unknown_fields(&json, &crd_schema(&Processor::crd())),
            other => {
                return Err(doc_error(format!(
                    "kind {other:?} is not a Keystone kind: expected Pipeline or Processor"
                )));
            }
        };
        if let Some(path) = unknown.first() {
            return Err(doc_error(format!(
                "unknown field {path}{}",
                if unknown.len() > 1 {
                    format!(
                        " (and {} more: {})",
                        unknown.len() - 1,
                        unknown[1..].join(", ")
                    )
                } else {
                    String::new()
                }
            )));
        }
        // Deserialize straight from the YAML value so that type errors name the field.
        match kind {
            "Pipeline" => manifests
                .pipelines
                .push(serde_path_to_error(&value).map_err(&doc_error)?),
            _ => manifests
                .processors
                .push(serde_path_to_error(&value).map_err(&doc_error)?),
        }
    }
    Ok(manifests)
}

fn located(file: &str, document: usize, error: &serde_yaml_ng::Error) -> ManifestError {
    match error.location() {
        Some(location) => ManifestError::Syntax {
            file: file.to_owned(),
            line: location.line(),
            column: location.column(),
            message: error.to_string(),
        },
        None => ManifestError::Document {
            file: file.to_owned(),
            document,
            message: error.to_string(),
        },
    }
}

/// Deserializes and, on failure, says which field was wrong.
fn serde_path_to_error<T: serde::de::DeserializeOwned>(
    value: &serde_yaml_ng::Value,
) -> Result<T, String> {
    T::deserialize(value.clone()).map_err(|e| e.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    const PIPELINE: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: p
spec:
  source:
    topic: in
    schema:
      fields:
        - {name: id, type: string}
  sinks:
    - name: out
      kafka: {topic: out}
"#;

    #[test]
    fn reads_a_pipeline() {
        let manifests = parse_manifests("p.yaml", PIPELINE).unwrap();
        assert_eq!(manifests.pipelines.len(), 1);
        assert_eq!(manifests.pipelines[0].spec.sinks[0].name, "out");
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let err = parse_manifests(
            "bad.yaml",
            "apiVersion: keystone.dev/v1alpha1\nkind: [Pipeline\n",
        )
        .unwrap_err();
        match err {
            ManifestError::Syntax { line, .. } => assert!(line >= 2, "line {line}"),
            other => panic!("expected a syntax error, got {other}"),
        }
    }

    #[test]
    fn unknown_fields_are_named_by_path() {
        let text = PIPELINE.replace("kafka: {topic: out}", "kafka: {topic: out, partitons: 3}");
        let err = parse_manifests("p.yaml", &text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "p.yaml: document 1: unknown field spec.sinks[0].kafka.partitons"
        );
    }

    #[test]
    fn wrong_types_name_the_problem() {
        let text = PIPELINE.replace(
            "kafka: {topic: out}",
            "kafka: {topic: out, partitions: many}",
        );
        let err = parse_manifests("p.yaml", &text).unwrap_err().to_string();
        assert!(
            err.contains("invalid type") && err.contains("many"),
            "{err}"
        );
    }

    #[test]
    fn other_kinds_are_rejected() {
        let err = parse_manifests("x.yaml", "apiVersion: v1\nkind: ConfigMap\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.yaml: document 1: apiVersion is \"v1\", expected \"keystone.dev/v1alpha1\" (kind \"ConfigMap\")"
        );
    }
}
