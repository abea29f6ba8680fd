//! Pure: an event becomes a bulk action (its id, version, index or delete, and
//! its NDJSON lines).

use std::fmt;

use sonic_rs::{JsonValueTrait, Value};

use super::SearchError;
use super::config::SearchConfig;
use crate::event::{FieldPath, type_name};
use crate::expr::{Bindings, Expr, cel_type_name};

/// Elasticsearch and OpenSearch refuse longer ids, and they do so by failing
/// the whole bulk request (HTTP 400, `action_request_validation_exception`),
/// which would stall every other document of the request: such an event is
/// refused here instead.
pub(crate) const MAX_ID_BYTES: usize = 512;

/// What a bulk action does with its document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActionKind {
    Index,
    Delete,
}

/// One document's bulk action, ready to be sent.
#[derive(Clone, Debug)]
pub(crate) struct Action {
    pub id: String,
    /// The action line and, for an index, the source line; each ends in `\n`.
    pub ndjson: Vec<u8>,
    /// The bytes the event arrived as, for a dead letter if the cluster refuses it.
    pub original: Vec<u8>,
}

/// Why an event cannot become a bulk action (the reason of its dead letter).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Refusal {
    MissingId {
        index: String,
        field: String,
    },
    IdType {
        index: String,
        field: String,
        found: &'static str,
    },
    EmptyId {
        index: String,
    },
    IdTooLong {
        index: String,
        bytes: usize,
    },
    MissingVersion {
        index: String,
        field: String,
    },
    BadVersion {
        index: String,
        field: String,
        found: String,
    },
    DeleteWhenFailed {
        expression: String,
        message: String,
    },
    DeleteWhenNotBool {
        expression: String,
        found: &'static str,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::MissingId { index, field } => write!(
                f,
                "no document id for search index {index}: id field {field:?} is missing or null"
            ),
            Refusal::IdType {
                index,
                field,
                found,
            } => write!(
                f,
                "no document id for search index {index}: id field {field:?} is of type {found}, not a string, number or boolean"
            ),
            Refusal::EmptyId { index } => {
                write!(
                    f,
                    "no document id for search index {index}: the id is empty"
                )
            }
            Refusal::IdTooLong { index, bytes } => write!(
                f,
                "no document id for search index {index}: the id has {bytes} bytes, more than the {MAX_ID_BYTES} the index accepts"
            ),
            Refusal::MissingVersion { index, field } => write!(
                f,
                "no document version for search index {index}: version field {field:?} is missing or null"
            ),
            Refusal::BadVersion {
                index,
                field,
                found,
            } => write!(
                f,
                "no document version for search index {index}: version field {field:?} is {found}, not an integer from 0 to 9223372036854775807"
            ),
            Refusal::DeleteWhenFailed {
                expression,
                message,
            } => write!(f, "deleteWhen expression {expression:?} failed: {message}"),
            Refusal::DeleteWhenNotBool { expression, found } => write!(
                f,
                "deleteWhen expression {expression:?} returned a {found}, not a bool"
            ),
        }
    }
}

/// How deletes are recognised. A versioned delete leaves a tombstone with its
/// version, so an older write replayed later is refused as a conflict; the
/// index keeps tombstones for `index.gc_deletes` (60 s by default), so a
/// replay that reaches further back than that can bring a deleted document
/// back (raise the setting through `indexSettings` where replays can be long).
enum DeleteRule {
    /// A top-level `op` field equal to the string `d` (Debezium's convention).
    OpField,
    /// `deleteWhen`, compiled once.
    Expression(Box<(Expr, Bindings)>),
}

/// Builds the bulk actions of one sink.
pub(crate) struct ActionBuilder {
    index: String,
    id_fields: Vec<FieldPath>,
    version_field: Option<FieldPath>,
    delete: DeleteRule,
}

impl ActionBuilder {
    pub(crate) fn new(config: &SearchConfig) -> Result<Self, SearchError> {
        let delete = match config.delete_when.as_deref() {
            None => DeleteRule::OpField,
            Some(source) => {
                let expr = Expr::compile(source).map_err(|source| SearchError::DeleteWhen {
                    source: Box::new(source),
                })?;
                let bindings = Bindings::new([&expr]);
                DeleteRule::Expression(Box::new((expr, bindings)))
            }
        };
        Ok(Self {
            index: config.index.clone(),
            id_fields: config.id_fields.clone(),
            version_field: config.version_field.clone(),
            delete,
        })
    }

    /// The bulk action for `value`, whose serialized form is `source` and
    /// whose original bytes are `original`.
    pub(crate) fn build(
        &self,
        value: &Value,
        source: &[u8],
        original: &[u8],
    ) -> Result<Action, Refusal> {
        let id = self.document_id(value)?;
        let version = self.version(value)?;
        let kind = if self.is_delete(value)? {
            ActionKind::Delete
        } else {
            ActionKind::Index
        };
        let mut ndjson = Vec::with_capacity(source.len() + id.len() + self.index.len() + 96);
        write_action_line(&mut ndjson, kind, &self.index, &id, version);
        if kind == ActionKind::Index {
            write_source_line(&mut ndjson, value, source);
        }
        Ok(Action {
            id,
            ndjson,
            original: original.to_vec(),
        })
    }

    /// The id fields' values joined with `:`: strings as they are, numbers and
    /// booleans as their JSON text.
    pub(crate) fn document_id(&self, value: &Value) -> Result<String, Refusal> {
        let mut id = String::new();
        for (i, field) in self.id_fields.iter().enumerate() {
            if i > 0 {
                id.push(':');
            }
            let part =
                field
                    .get(value)
                    .filter(|v| !v.is_null())
                    .ok_or_else(|| Refusal::MissingId {
                        index: self.index.clone(),
                        field: field.dotted.clone(),
                    })?;
            if let Some(text) = part.as_str() {
                id.push_str(text);
            } else if part.is_number() || part.is_boolean() {
                // Serializing a number or a boolean cannot fail.
                id.push_str(&sonic_rs::to_string(part).unwrap_or_default());
            } else {
                return Err(Refusal::IdType {
                    index: self.index.clone(),
                    field: field.dotted.clone(),
                    found: type_name(part),
                });
            }
        }
        if id.is_empty() {
            return Err(Refusal::EmptyId {
                index: self.index.clone(),
            });
        }
        if id.len() > MAX_ID_BYTES {
            return Err(Refusal::IdTooLong {
                index: self.index.clone(),
                bytes: id.len(),
            });
        }
        Ok(id)
    }

    /// The external version, when `versionField` is set.
    pub(crate) fn version(&self, value: &Value) -> Result<Option<i64>, Refusal> {
        let Some(field) = &self.version_field else {
            return Ok(None);
        };
        let found =
            field
                .get(value)
                .filter(|v| !v.is_null())
                .ok_or_else(|| Refusal::MissingVersion {
                    index: self.index.clone(),
                    field: field.dotted.clone(),
                })?;
        match found.as_i64() {
            Some(version) if version >= 0 => Ok(Some(version)),
            _ => {
                let found = if found.is_number() {
                    sonic_rs::to_string(found).unwrap_or_default()
                } else {
                    format!("of type {}", type_name(found))
                };
                Err(Refusal::BadVersion {
                    index: self.index.clone(),
                    field: field.dotted.clone(),
                    found,
                })
            }
        }
    }

    pub(crate) fn is_delete(&self, value: &Value) -> Result<bool, Refusal> {
        match &self.delete {
            DeleteRule::OpField => Ok(value.get("op").and_then(|op| op.as_str()) == Some("d")),
            DeleteRule::Expression(compiled) => {
                let (expr, bindings) = &**compiled;
                match bindings.with_scope(value, |scope| expr.execute(scope)) {
                    Ok(cel::Value::Bool(delete)) => Ok(delete),
                    Ok(other) => Err(Refusal::DeleteWhenNotBool {
                        expression: expr.source.clone(),
                        found: cel_type_name(&other),
                    }),
                    Err(message) => Err(Refusal::DeleteWhenFailed {
                        expression: expr.source.clone(),
                        message,
                    }),
                }
            }
        }
    }
}

/// `{"index":{"_index":...,"_id":...[,"version":N,"version_type":"external"]}}`.
fn write_action_line(
    out: &mut Vec<u8>,
    kind: ActionKind,
    index: &str,
    id: &str,
    version: Option<i64>,
) {
    out.extend_from_slice(match kind {
        ActionKind::Index => b"{\"index\":{\"_index\":",
        ActionKind::Delete => b"{\"delete\":{\"_index\":",
    });
    write_json_str(out, index);
    out.extend_from_slice(b",\"_id\":");
    write_json_str(out, id);
    if let Some(version) = version {
        out.extend_from_slice(b",\"version\":");
        out.extend_from_slice(version.to_string().as_bytes());
        out.extend_from_slice(b",\"version_type\":\"external\"");
    }
    out.extend_from_slice(b"}}\n");
}

fn write_json_str(out: &mut Vec<u8>, text: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = sonic_rs::to_writer(&mut *out, text);
}

/// The document as one line. `source` is the event as the host serialized it;
/// a bulk body breaks on a line break inside a document, so anything but
/// compact JSON is serialized again.
fn write_source_line(out: &mut Vec<u8>, value: &Value, source: &[u8]) {
    let trimmed = source.trim_ascii_end();
    if !trimmed.is_empty() && !trimmed.contains(&b'\n') && !trimmed.contains(&b'\r') {
        out.extend_from_slice(trimmed);
    } else {
        let _ = sonic_rs::to_writer(&mut *out, value);
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use keystone_crds::schema::SchemaSpec;

    use super::super::config::testing::{test_sink, test_spec};
    use super::*;

    fn builder(
        id_fields: &[&str],
        version: Option<&str>,
        delete_when: Option<&str>,
    ) -> ActionBuilder {
        let mut spec = test_spec("http://h:9200", "orders", id_fields);
        spec.version_field = version.map(str::to_owned);
        spec.delete_when = delete_when.map(str::to_owned);
        let config = SearchConfig::offline(&test_sink("s", spec, SchemaSpec::default())).unwrap();
        ActionBuilder::new(&config).unwrap()
    }

    fn doc(text: &str) -> Value {
        sonic_rs::from_str(text).unwrap()
    }

    fn action(builder: &ActionBuilder, text: &str) -> Result<Action, Refusal> {
        builder.build(&doc(text), text.as_bytes(), text.as_bytes())
    }

    #[test]
    fn ids_join_the_fields_as_text() {
        let b = builder(&["tenant", "order.id", "flag"], None, None);
        let value = doc(r#"{"tenant":"acme","order":{"id":42},"flag":true}"#);
        assert_eq!(b.document_id(&value).unwrap(), "acme:42:true");
        let single = builder(&["id"], None, None);
        assert_eq!(single.document_id(&doc(r#"{"id":"a:b"}"#)).unwrap(), "a:b");
        assert_eq!(single.document_id(&doc(r#"{"id":-1.5}"#)).unwrap(), "-1.5");
    }

    #[test]
    fn missing_null_or_odd_ids_are_refused_naming_the_field() {
        let b = builder(&["tenant", "order.id"], None, None);
        for text in [
            r#"{"tenant":"a"}"#,
            r#"{"tenant":"a","order":{"id":null}}"#,
            r#"{"tenant":"a","order":7}"#,
        ] {
            let refusal = b.document_id(&doc(text)).unwrap_err();
            assert_eq!(
                refusal.to_string(),
                r#"no document id for search index orders: id field "order.id" is missing or null"#,
                "{text}"
            );
        }
        let refusal = b
            .document_id(&doc(r#"{"tenant":{"x":1},"order":{"id":1}}"#))
            .unwrap_err();
        assert_eq!(
            refusal.to_string(),
            r#"no document id for search index orders: id field "tenant" is of type object, not a string, number or boolean"#
        );
        let single = builder(&["id"], None, None);
        assert!(matches!(
            single.document_id(&doc(r#"{"id":""}"#)),
            Err(Refusal::EmptyId { .. })
        ));
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(MAX_ID_BYTES + 1));
        assert!(matches!(
            single.document_id(&doc(&long)),
            Err(Refusal::IdTooLong { bytes: 513, .. })
        ));
    }

    #[test]
    fn versions_are_non_negative_integers() {
        let b = builder(&["id"], Some("meta.v"), None);
        assert_eq!(b.version(&doc(r#"{"meta":{"v":7}}"#)), Ok(Some(7)));
        assert_eq!(b.version(&doc(r#"{"meta":{"v":0}}"#)), Ok(Some(0)));
        let reason = |text: &str| b.version(&doc(text)).unwrap_err().to_string();
        assert!(reason(r#"{"meta":{}}"#).contains(r#""meta.v" is missing"#));
        assert!(reason(r#"{"meta":{"v":-1}}"#).contains("is -1, not an integer"));
        assert!(reason(r#"{"meta":{"v":1.5}}"#).contains("is 1.5, not an integer"));
        assert!(reason(r#"{"meta":{"v":"7"}}"#).contains("is of type string, not an integer"));
        assert!(reason(r#"{"meta":{"v":18446744073709551615}}"#).contains("not an integer"));
        assert_eq!(builder(&["id"], None, None).version(&doc("{}")), Ok(None));
    }

    #[test]
    fn deletes_default_to_op_d() {
        let b = builder(&["id"], None, None);
        assert_eq!(b.is_delete(&doc(r#"{"op":"d"}"#)), Ok(true));
        assert_eq!(b.is_delete(&doc(r#"{"op":"u"}"#)), Ok(false));
        assert_eq!(b.is_delete(&doc(r#"{"op":1}"#)), Ok(false));
        assert_eq!(b.is_delete(&doc(r#"{"after":{"op":"d"}}"#)), Ok(false));
    }

    #[test]
    fn deletes_by_expression() {
        let b = builder(&["id"], None, Some("status == 'gone' || deleted"));
        assert_eq!(b.is_delete(&doc(r#"{"status":"gone"}"#)), Ok(true));
        assert_eq!(
            b.is_delete(&doc(r#"{"status":"ok","deleted":false}"#)),
            Ok(false)
        );
        assert_eq!(
            b.is_delete(&doc(r#"{"op":"d","status":"ok","deleted":false}"#)),
            Ok(false)
        );
        let failed = b
            .is_delete(&doc(r#"{"status":"ok"}"#))
            .unwrap_err()
            .to_string();
        assert!(failed.starts_with("deleteWhen expression"), "{failed}");
        assert!(failed.contains("deleted"), "{failed}");
        let not_bool = builder(&["id"], None, Some("status"));
        assert_eq!(
            not_bool
                .is_delete(&doc(r#"{"status":"x"}"#))
                .unwrap_err()
                .to_string(),
            r#"deleteWhen expression "status" returned a string, not a bool"#
        );
    }

    #[test]
    fn a_broken_expression_is_a_build_error() {
        let mut spec = test_spec("http://h:9200", "orders", &["id"]);
        spec.delete_when = Some("status ==".into());
        let config = SearchConfig::offline(&test_sink("s", spec, SchemaSpec::default())).unwrap();
        let err = ActionBuilder::new(&config).err().unwrap().to_string();
        assert!(err.contains("status =="), "{err}");
    }

    #[test]
    fn actions_are_ndjson_lines() {
        let b = builder(&["id"], Some("v"), None);
        let index = action(&b, r#"{"id":"a\"b","v":3,"x":[1]}"#).unwrap();
        assert_eq!(
            String::from_utf8(index.ndjson).unwrap(),
            "{\"index\":{\"_index\":\"orders\",\"_id\":\"a\\\"b\",\"version\":3,\"version_type\":\"external\"}}\n\
             {\"id\":\"a\\\"b\",\"v\":3,\"x\":[1]}\n"
        );
        let delete = action(&b, r#"{"id":1,"v":4,"op":"d"}"#).unwrap();
        assert_eq!(
            String::from_utf8(delete.ndjson).unwrap(),
            "{\"delete\":{\"_index\":\"orders\",\"_id\":\"1\",\"version\":4,\"version_type\":\"external\"}}\n"
        );
        let unversioned = builder(&["id"], None, None);
        let plain = action(&unversioned, r#"{"id":1}"#).unwrap();
        assert_eq!(
            String::from_utf8(plain.ndjson).unwrap(),
            "{\"index\":{\"_index\":\"orders\",\"_id\":\"1\"}}\n{\"id\":1}\n"
        );
    }

    #[test]
    fn a_multi_line_source_is_compacted() {
        let b = builder(&["id"], None, None);
        let value = doc(r#"{"id":1,"t":"a\nb"}"#);
        let pretty = b"{\n  \"id\": 1,\n  \"t\": \"a\\nb\"\n}\n";
        let built = b.build(&value, pretty, pretty).unwrap();
        let text = String::from_utf8(built.ndjson).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.ends_with("{\"id\":1,\"t\":\"a\\nb\"}\n"), "{text}");
        assert_eq!(built.original, pretty);
    }

    #[test]
    fn deep_documents_do_not_break_the_builder() {
        // The builder itself never recurses into the document (sonic-rs's own
        // parser overflows a test thread's stack in debug builds near depth 100,
        // before any sink sees the event).
        let depth = 40;
        let text = format!(
            r#"{{"id":1,"d":{}1{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let b = builder(&["id"], None, None);
        assert!(action(&b, &text).is_ok());
        let deep_id = format!(r#"{{"id":{}1{}}}"#, "[".repeat(depth), "]".repeat(depth));
        assert!(matches!(
            action(&b, &deep_id),
            Err(Refusal::IdType { found: "array", .. })
        ));
    }
}
