//! The Kafka records of row changes: Keystone's event shape (what the samples
//! and the `order`/`dedup` steps expect) or Debezium's envelope.

use serde_json::{Map, Value, json};

use crate::capture::changes::{Cell, Change, Row};

pub use keystone_crds::pipeline::capture::Envelope;

/// Names of the Keystone envelope: a primary key column cannot take one.
pub const ENVELOPE_FIELDS: [&str; 7] =
    ["op", "seq", "ts", "before", "after", "source", "unchanged"];

/// Where and when a change was committed.
#[derive(Clone, Copy, Debug)]
pub struct Commit<'a> {
    pub database: &'a str,
    /// The commit LSN of the transaction (for a snapshot's rows, of the
    /// chunk's high watermark): every change of a row has a larger one than
    /// the row's previous change.
    pub lsn: u64,
    pub xid: Option<u32>,
    /// Commit time, milliseconds since the Unix epoch.
    pub time_ms: i64,
}

/// PostgreSQL's text form of an LSN, `16/B374D848`.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// The record's key and value.
pub fn render(change: &Change, commit: &Commit<'_>, envelope: Envelope) -> (Vec<u8>, Vec<u8>) {
    match envelope {
        Envelope::Keystone => (keystone_key(change), keystone_value(change, commit)),
        Envelope::Debezium => (debezium_key(change), debezium_value(change, commit)),
    }
}

/// As the runtime keys records (`event::record_key`): a single
/// string key as its text, other single values as JSON, several as a JSON
/// array, so that the topic is partitioned as a Keystone stage would have it.
fn keystone_key(change: &Change) -> Vec<u8> {
    match change.key.as_slice() {
        [(_, Value::String(text))] => text.as_bytes().to_vec(),
        [(_, value)] => value.to_string().into_bytes(),
        many => {
            let values: Vec<&Value> = many.iter().map(|(_, v)| v).collect();
            serde_json::to_vec(&values).unwrap_or_default()
        }
    }
}

fn keystone_value(change: &Change, commit: &Commit<'_>) -> Vec<u8> {
    let mut event = Map::new();
    for (name, value) in &change.key {
        event.insert(name.to_string(), value.clone());
    }
    event.insert("op".into(), json!(change.op.code()));
    event.insert("seq".into(), json!(commit.lsn));
    event.insert("ts".into(), json!(commit.time_ms));
    if let Some(before) = &change.before {
        event.insert("before".into(), row_object(before));
    }
    if let Some(after) = &change.after {
        event.insert("after".into(), row_object(after));
        let unchanged: Vec<&str> = after
            .iter()
            .filter(|(_, cell)| *cell == Cell::Unchanged)
            .map(|(name, _)| &**name)
            .collect();
        if !unchanged.is_empty() {
            event.insert("unchanged".into(), json!(unchanged));
        }
    }
    let mut source = json!({
        "db": commit.database,
        "schema": change.table.schema,
        "table": change.table.name,
        "lsn": lsn_text(commit.lsn),
        "snapshot": change.op == crate::capture::changes::Op::Read,
    });
    if let Some(xid) = commit.xid {
        source["txid"] = json!(xid);
    }
    event.insert("source".into(), source);
    serde_json::to_vec(&Value::Object(event)).unwrap_or_default()
}

/// A row as a JSON object; unchanged TOAST values are left out.
fn row_object(row: &Row) -> Value {
    let mut object = Map::with_capacity(row.len());
    for (name, cell) in row {
        match cell {
            Cell::Null => {
                object.insert(name.to_string(), Value::Null);
            }
            Cell::Value(value) => {
                object.insert(name.to_string(), value.clone());
            }
            Cell::Unchanged => {}
        }
    }
    Value::Object(object)
}

fn debezium_key(change: &Change) -> Vec<u8> {
    let key: Map<String, Value> = change
        .key
        .iter()
        .map(|(name, value)| (name.to_string(), value.clone()))
        .collect();
    serde_json::to_vec(&key).unwrap_or_default()
}

fn debezium_value(change: &Change, commit: &Commit<'_>) -> Vec<u8> {
    let snapshot = change.op == crate::capture::changes::Op::Read;
    let value = json!({
        "before": change.before.as_ref().map(row_object),
        "after": change.after.as_ref().map(row_object),
        "source": {
            "version": env!("CARGO_PKG_VERSION"),
            "connector": "postgresql",
            "name": "keystone",
            "ts_ms": commit.time_ms,
            "snapshot": if snapshot { "true" } else { "false" },
            "db": commit.database,
            "schema": change.table.schema,
            "table": change.table.name,
            "txId": commit.xid,
            "lsn": commit.lsn,
        },
        "op": change.op.code(),
        "ts_ms": commit.time_ms,
    });
    serde_json::to_vec(&value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::capture::changes::{Op, TableName};

    fn change(op: Op, key: Vec<(&str, Value)>, after: Option<Row>) -> Change {
        Change {
            table: Arc::new(TableName::parse("shop.orders").unwrap()),
            op,
            key: key.into_iter().map(|(k, v)| (k.into(), v)).collect(),
            before: None,
            after,
        }
    }

    const COMMIT: Commit<'static> = Commit {
        database: "shop",
        lsn: 0x16_B374_D848,
        xid: Some(771),
        time_ms: 1_767_225_600_000,
    };

    #[test]
    fn keystone_events_put_the_key_on_top_and_order_by_commit_lsn() {
        let after = vec![
            ("order_id".into(), Cell::Value(json!("o-1"))),
            ("status".into(), Cell::Value(json!("paid"))),
            ("notes".into(), Cell::Unchanged),
        ];
        let c = change(Op::Update, vec![("order_id", json!("o-1"))], Some(after));
        let (key, value) = render(&c, &COMMIT, Envelope::Keystone);
        assert_eq!(key, b"o-1");
        let value: Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(
            value,
            json!({
                "order_id": "o-1", "op": "u", "seq": 0x16_B374_D848_u64, "ts": 1_767_225_600_000_i64,
                "after": {"order_id": "o-1", "status": "paid"},
                "unchanged": ["notes"],
                "source": {"db": "shop", "schema": "shop", "table": "orders", "lsn": "16/B374D848", "snapshot": false, "txid": 771}
            })
        );
    }

    #[test]
    fn composite_and_numeric_keys_encode_as_the_runtime_keys_records() {
        let c = change(Op::Delete, vec![("a", json!(1)), ("b", json!("x"))], None);
        assert_eq!(render(&c, &COMMIT, Envelope::Keystone).0, br#"[1,"x"]"#);
        let c = change(Op::Delete, vec![("a", json!(7))], None);
        assert_eq!(render(&c, &COMMIT, Envelope::Keystone).0, b"7");
    }

    #[test]
    fn debezium_envelopes_carry_before_after_source_and_op() {
        let after = vec![
            ("id".into(), Cell::Value(json!(5))),
            ("v".into(), Cell::Null),
        ];
        let c = change(Op::Read, vec![("id", json!(5))], Some(after));
        let (key, value) = render(&c, &COMMIT, Envelope::Debezium);
        assert_eq!(
            serde_json::from_slice::<Value>(&key).unwrap(),
            json!({"id": 5})
        );
        let value: Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(value["op"], json!("r"));
        assert_eq!(value["before"], Value::Null);
        assert_eq!(value["after"], json!({"id": 5, "v": null}));
        assert_eq!(value["source"]["snapshot"], json!("true"));
        assert_eq!(value["source"]["lsn"], json!(0x16_B374_D848_u64));
        assert_eq!(value["source"]["table"], json!("orders"));
    }
}
