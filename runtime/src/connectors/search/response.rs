//! Pure: what a bulk response says about each action, and which actions to
//! send again.

use std::collections::HashSet;

use serde::Deserialize;

/// The answer for one bulk item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ItemOutcome {
    Created,
    Updated,
    /// Deleted, or a delete of a document the index does not hold (404
    /// `not_found`): either way the document is gone.
    Deleted,
    /// 409 `version_conflict_engine_exception`: the index already holds this or
    /// a newer version (a replay, or an older change arriving late). Not an error.
    VersionConflict,
    /// Refused for now (429, 5xx, a full write queue): send it again.
    Retry {
        status: u16,
        error: String,
    },
    /// Refused for good (the document does not fit the mapping, ...): a dead letter.
    Refused {
        error_type: String,
        reason: String,
    },
}

/// Why a bulk response could not be used (the request is sent again).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ResponseError {
    Malformed(String),
    /// The response lists another number of items than the request held.
    ItemCount {
        sent: usize,
        answered: usize,
    },
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseError::Malformed(e) => write!(f, "the bulk response is not valid: {e}"),
            ResponseError::ItemCount { sent, answered } => write!(
                f,
                "the bulk response answers {answered} items for the {sent} sent"
            ),
        }
    }
}

#[derive(Deserialize)]
struct BulkResponse {
    items: Vec<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct Item {
    status: u16,
    #[serde(default)]
    result: Option<String>,
    #[serde(default)]
    error: Option<ItemError>,
}

#[derive(Deserialize)]
struct ItemError {
    #[serde(default, rename = "type")]
    error_type: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    caused_by: Option<Box<ItemError>>,
}

impl ItemError {
    fn type_name(&self) -> String {
        self.error_type
            .clone()
            .unwrap_or_else(|| "unknown".to_owned())
    }

    /// The reason, with the first cause when there is one: for a mapping
    /// failure the cause says what was wrong with the value.
    fn describe(&self) -> String {
        let mut text = self.reason.clone().unwrap_or_default();
        if let Some(cause) = &self.caused_by {
            let cause_reason = cause.reason.as_deref().unwrap_or_default();
            text.push_str(&format!(
                " (caused by {}: {cause_reason})",
                cause.type_name()
            ));
        }
        text
    }
}

/// The outcome of each item of a bulk response, in request order. The
/// top-level `errors` flag is not trusted to skip the items: their results are
/// counted either way.
pub(crate) fn parse_bulk_response(
    body: &[u8],
    sent: usize,
) -> Result<Vec<ItemOutcome>, ResponseError> {
    // serde_json limits nesting, so an odd body is an error, never a crash.
    let response: BulkResponse =
        serde_json::from_slice(body).map_err(|e| ResponseError::Malformed(e.to_string()))?;
    if response.items.len() != sent {
        return Err(ResponseError::ItemCount {
            sent,
            answered: response.items.len(),
        });
    }
    response
        .items
        .into_iter()
        .map(|wrapper| {
            // Each item is `{"<action>": {...}}`.
            let inner = wrapper
                .into_iter()
                .next()
                .map(|(_, v)| v)
                .ok_or_else(|| ResponseError::Malformed("an empty item".to_owned()))?;
            let item: Item = serde_json::from_value(inner)
                .map_err(|e| ResponseError::Malformed(e.to_string()))?;
            Ok(classify(item))
        })
        .collect()
}

fn classify(item: Item) -> ItemOutcome {
    let Some(error) = item.error else {
        return match (item.status, item.result.as_deref()) {
            (_, Some("created")) => ItemOutcome::Created,
            (_, Some("deleted")) | (404, Some("not_found")) => ItemOutcome::Deleted,
            (200..=299, _) => ItemOutcome::Updated,
            (status, result) => ItemOutcome::Refused {
                error_type: format!("status_{status}"),
                reason: format!("result {}", result.unwrap_or("none")),
            },
        };
    };
    let error_type = error.type_name();
    // Elasticsearch names a full write queue `es_rejected_execution_exception`,
    // OpenSearch `rejected_execution_exception`; both come with 429 as well.
    let rejected = error_type.ends_with("rejected_execution_exception");
    // About the index or the credentials, not the document: a write block
    // (set by an administrator, or by the cluster itself at its flood-stage
    // disk watermark until space is freed), a closed index, a permission the
    // sink's user lacks. Every document would be refused alike, so the sink
    // waits (the stage commits nothing meanwhile) instead of dead-lettering
    // them all.
    let not_the_document = matches!(
        error_type.as_str(),
        "cluster_block_exception" | "index_closed_exception" | "security_exception"
    ) || matches!(item.status, 401 | 403);
    if item.status == 429 || item.status >= 500 || rejected || not_the_document {
        return ItemOutcome::Retry {
            status: item.status,
            error: format!("{error_type}: {}", error.describe()),
        };
    }
    if item.status == 409 && error_type == "version_conflict_engine_exception" {
        return ItemOutcome::VersionConflict;
    }
    ItemOutcome::Refused {
        reason: error.describe(),
        error_type,
    }
}

/// The dead-letter reason of a refused document.
pub(crate) fn refusal_reason(index: &str, error_type: &str, reason: &str) -> String {
    format!("search index {index} refused the document: {error_type}: {reason}")
}

/// Which actions to send again (indices into the request, in order), given
/// each one's id and whether it must be retried.
///
/// Without external versions the last write of an id wins, so a retried action
/// must not land after a later action for the same id that already succeeded:
/// those later actions are sent again too, after it (in the same retry
/// request, which the cluster applies in order). With versions the index
/// itself drops the older write, and only the retried actions go again.
pub(crate) fn retry_plan<'a>(
    ids: impl IntoIterator<Item = &'a str>,
    retry: &[bool],
    versioned: bool,
) -> Vec<usize> {
    let mut again = Vec::new();
    let mut retried_ids: HashSet<&str> = HashSet::new();
    for (i, id) in ids.into_iter().enumerate() {
        let must = retry.get(i).copied().unwrap_or(false);
        if must || (!versioned && retried_ids.contains(id)) {
            again.push(i);
            retried_ids.insert(id);
        }
    }
    again
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response as OpenSearch 2.19 answers it (shortened `_shards`).
    const RESPONSE: &str = r#"{"took":130,"errors":true,"items":[
      {"index":{"_index":"orders","_id":"1","_version":5,"result":"created","_shards":{"total":1,"successful":1,"failed":0},"_seq_no":0,"_primary_term":1,"status":201}},
      {"index":{"_index":"orders","_id":"3","_version":2,"result":"updated","_seq_no":3,"_primary_term":1,"status":200}},
      {"index":{"_index":"orders","_id":"1","status":409,"error":{"type":"version_conflict_engine_exception","reason":"[1]: version conflict, current version [5] is higher or equal to the one provided [4]","index":"orders","shard":"0","index_uuid":"4-1phJS2SYefVDVUGJjXWQ"}}},
      {"delete":{"_index":"orders","_id":"9","_version":3,"result":"not_found","_seq_no":1,"_primary_term":1,"status":404}},
      {"delete":{"_index":"orders","_id":"8","_version":4,"result":"deleted","_seq_no":2,"_primary_term":1,"status":200}},
      {"index":{"_index":"orders","_id":"2","status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [n] of type [long] in document with id '2'. Preview of field's value: 'abc'","caused_by":{"type":"illegal_argument_exception","reason":"For input string: \"abc\""}}}},
      {"index":{"_index":"orders","_id":"4","status":429,"error":{"type":"rejected_execution_exception","reason":"rejected execution of coordinating operation"}}},
      {"index":{"_index":"orders","_id":"5","status":503,"error":{"type":"unavailable_shards_exception","reason":"primary shard is not active"}}},
      {"delete":{"_index":"orders","_id":"6","status":404,"error":{"type":"index_not_found_exception","reason":"no such index [orders]"}}}
    ]}"#;

    #[test]
    fn a_realistic_response_is_classified() {
        let outcomes = parse_bulk_response(RESPONSE.as_bytes(), 9).unwrap();
        assert_eq!(outcomes[0], ItemOutcome::Created);
        assert_eq!(outcomes[1], ItemOutcome::Updated);
        assert_eq!(outcomes[2], ItemOutcome::VersionConflict);
        assert_eq!(outcomes[3], ItemOutcome::Deleted);
        assert_eq!(outcomes[4], ItemOutcome::Deleted);
        assert_eq!(
            outcomes[5],
            ItemOutcome::Refused {
                error_type: "mapper_parsing_exception".into(),
                reason: "failed to parse field [n] of type [long] in document with id '2'. Preview of field's value: 'abc' (caused by illegal_argument_exception: For input string: \"abc\")".into(),
            }
        );
        assert!(matches!(
            outcomes[6],
            ItemOutcome::Retry { status: 429, .. }
        ));
        assert!(matches!(
            outcomes[7],
            ItemOutcome::Retry { status: 503, .. }
        ));
        // A delete's 404 counts as deleted only when the index answered "not_found".
        assert!(matches!(
            &outcomes[8],
            ItemOutcome::Refused { error_type, .. } if error_type == "index_not_found_exception"
        ));
    }

    #[test]
    fn a_blocked_or_closed_index_or_a_missing_permission_is_retried_not_dead_lettered() {
        // As OpenSearch 2.19 answers a write to an index with
        // `index.blocks.write: true`, one at the flood-stage disk watermark, a
        // closed index, and a user without the index permission.
        let body = r#"{"errors":true,"items":[
          {"index":{"_index":"orders","_id":"1","status":403,"error":{"type":"cluster_block_exception","reason":"index [orders] blocked by: [FORBIDDEN/8/index write (api)];"}}},
          {"index":{"_index":"orders","_id":"2","status":429,"error":{"type":"cluster_block_exception","reason":"index [orders] blocked by: [TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has read-only-allow-delete block];"}}},
          {"index":{"_index":"orders","_id":"3","status":400,"error":{"type":"index_closed_exception","reason":"closed","index":"orders"}}},
          {"index":{"_index":"orders","_id":"4","status":403,"error":{"type":"security_exception","reason":"no permissions for [indices:data/write/bulk[s]] and User [name=writer]"}}}
        ]}"#;
        let outcomes = parse_bulk_response(body.as_bytes(), 4).unwrap();
        for (i, outcome) in outcomes.iter().enumerate() {
            assert!(
                matches!(outcome, ItemOutcome::Retry { .. }),
                "item {i}: {outcome:?}"
            );
        }
    }

    #[test]
    fn a_rejected_execution_is_retried_whatever_its_status() {
        let body = r#"{"errors":true,"items":[{"index":{"status":400,"error":{"type":"es_rejected_execution_exception","reason":"queue full"}}}]}"#;
        let outcomes = parse_bulk_response(body.as_bytes(), 1).unwrap();
        assert!(matches!(
            outcomes[0],
            ItemOutcome::Retry { status: 400, .. }
        ));
    }

    #[test]
    fn odd_responses_are_errors_not_panics() {
        assert!(matches!(
            parse_bulk_response(RESPONSE.as_bytes(), 3),
            Err(ResponseError::ItemCount {
                sent: 3,
                answered: 9
            })
        ));
        for body in [
            "",
            "null",
            "[]",
            r#"{"items":{}}"#,
            r#"{"items":[{}]}"#,
            r#"{"items":[{"index":{"status":"x"}}]}"#,
            r#"{"items":[{"index":{"status":70000}}]}"#,
        ] {
            assert!(parse_bulk_response(body.as_bytes(), 1).is_err(), "{body}");
        }
        let deep = format!(r#"{{"items":[{}]}}"#, "[".repeat(100_000));
        assert!(parse_bulk_response(deep.as_bytes(), 1).is_err());
    }

    #[test]
    fn refusals_name_the_index_and_the_error() {
        assert_eq!(
            refusal_reason("orders", "mapper_parsing_exception", "failed to parse"),
            "search index orders refused the document: mapper_parsing_exception: failed to parse"
        );
    }

    #[test]
    fn retries_keep_the_last_write_of_an_id_last() {
        let ids = ["a", "b", "a", "c", "b"];
        let retry = [true, false, false, false, false];
        // Unversioned: the later "a" (index 2) already succeeded but would be
        // overwritten by the retried older "a": it goes again after it.
        assert_eq!(retry_plan(ids, &retry, false), vec![0, 2]);
        // Versioned: the index keeps the newer version by itself.
        assert_eq!(retry_plan(ids, &retry, true), vec![0]);
        assert_eq!(
            retry_plan(ids, &[false, true, false, true, false], false),
            vec![1, 3, 4]
        );
        assert!(retry_plan(ids, &[false; 5], false).is_empty());
    }
}
