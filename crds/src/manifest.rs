//! Reading Pipeline and Processor manifests from YAML, with errors that say
//! where: the line and column of a syntax or type error, the path of an unknown field.

use serde::Deserialize;
use serde_json::Value as Json;

use crate::pipeline::Pipeline;
use crate::processor::Processor;
use crate::validate::validate;

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
        let problems: Vec<String> = match kind {
            // A message that names its field is printed as it is, others after the field.
            "Pipeline" | "Processor" => validate(kind, &json)
                .into_iter()
                .map(|v| {
                    if v.message.contains(&v.path) {
                        v.message
                    } else {
                        format!("{}: {}", v.path, v.message)
                    }
                })
                .collect(),
            other => {
                return Err(doc_error(format!(
                    "kind {other:?} is not a Keystone kind: expected Pipeline or Processor"
                )));
            }
        };
        if let Some(first) = problems.first() {
            return Err(doc_error(format!(
                "{first}{}",
                if problems.len() > 1 {
                    format!(
                        " (and {} more: {})",
                        problems.len() - 1,
                        problems[1..].join("; ")
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
            err.contains("spec.sinks[0].kafka.partitions")
                && err.contains("must be of type integer")
                && err.contains("many"),
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
