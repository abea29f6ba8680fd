//! The reference semantics of S1-S4, written plainly so that each engine's output
//! can be checked against them (see README.md for the definitions).

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::path::Path;

use anyhow::Context;
use serde_json::{Map, Value};

use crate::digest::{Digester, Mode, OutputDigest};

/// The dedup window of S2.
pub const DEDUP_WINDOW_MS: i64 = 10 * 60 * 1000;

fn lines(path: &Path) -> anyhow::Result<impl Iterator<Item = anyhow::Result<Value>>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    Ok(std::io::BufReader::with_capacity(1 << 20, file)
        .lines()
        .map(|l| -> anyhow::Result<Value> { Ok(serde_json::from_str(&l?)?) }))
}

/// S1: keep `!bot && (action == "view" || action == "purchase")`, then project
/// `event_id`, `user_id`, `amount`.
pub fn s1(events: &Path) -> anyhow::Result<OutputDigest> {
    let mut d = Digester::new(Mode::Multiset);
    for ev in lines(events)? {
        let ev = ev?;
        let action = ev["action"].as_str().unwrap_or_default();
        if ev["bot"].as_bool() == Some(false) && (action == "view" || action == "purchase") {
            let mut out = Map::new();
            for f in ["event_id", "user_id", "amount"] {
                out.insert(f.to_owned(), ev[f].clone());
            }
            d.add_value(&Value::Object(out))?;
        }
    }
    Ok(d.finish())
}

/// S2: the first event per `event_id` passes; a later one with `ts < t0 + 10 min`
/// is dropped (`t0` = the ts of the last event that passed for the id).
pub fn s2(events: &Path) -> anyhow::Result<OutputDigest> {
    dedup(events, |ev| ev.clone())
}

/// S5 and S6 (Kafka): S2's dedup, then S1's projection (`event_id`, `user_id`,
/// `amount`).
pub fn s5(events: &Path) -> anyhow::Result<OutputDigest> {
    dedup(events, |ev| {
        let mut out = Map::new();
        for f in ["event_id", "user_id", "amount"] {
            out.insert(f.to_owned(), ev[f].clone());
        }
        Value::Object(out)
    })
}

/// S2's rule; each event that passes is digested as `output` makes it.
fn dedup(events: &Path, output: impl Fn(&Value) -> Value) -> anyhow::Result<OutputDigest> {
    let mut d = Digester::new(Mode::Multiset);
    let mut first: HashMap<String, i64> = HashMap::new();
    for ev in lines(events)? {
        let ev = ev?;
        let id = ev["event_id"].as_str().context("event_id")?.to_owned();
        let ts = ev["ts"].as_i64().context("ts")?;
        match first.get(&id) {
            Some(t0) if ts < t0 + DEDUP_WINDOW_MS => {}
            _ => {
                first.insert(id, ts);
                d.add_value(&output(&ev))?;
            }
        }
    }
    Ok(d.finish())
}

/// S3: per `order_id`, every distinct `seq` once (its first arrival), ascending.
/// With the generator's bounded disorder and a max delay far above the time the
/// disorder window takes to read, nothing is released before a lower sequence of
/// its key arrives, so nothing but redeliveries is stale.
pub fn s3(cdc: &Path) -> anyhow::Result<OutputDigest> {
    let mut keys: HashMap<String, BTreeMap<i64, Value>> = HashMap::new();
    for ev in lines(cdc)? {
        let ev = ev?;
        let key = ev["order_id"].as_str().context("order_id")?.to_owned();
        let seq = ev["seq"].as_i64().context("seq")?;
        keys.entry(key).or_default().entry(seq).or_insert(ev);
    }
    let mut d = Digester::new(Mode::PerKey("order_id".into()));
    for events in keys.values() {
        for ev in events.values() {
            d.add_value(ev)?;
        }
    }
    Ok(d.finish())
}

/// S4: inner join on `customer_id` = table `id`; the row's `name` and `tier` go
/// under `customer`; events without a row are dropped.
pub fn s4(events: &Path, table: &Path) -> anyhow::Result<OutputDigest> {
    let mut rows: HashMap<String, Value> = HashMap::new();
    for row in lines(table)? {
        let row = row?;
        let id = row["id"].as_str().context("id")?.to_owned();
        let mut c = Map::new();
        c.insert("name".into(), row["name"].clone());
        c.insert("tier".into(), row["tier"].clone());
        rows.insert(id, Value::Object(c));
    }
    let mut d = Digester::new(Mode::Multiset);
    for ev in lines(events)? {
        let mut ev = ev?;
        let Some(row) = ev["customer_id"].as_str().and_then(|c| rows.get(c)) else {
            continue;
        };
        let row = row.clone();
        ev.as_object_mut()
            .context("event object")?
            .insert("customer".into(), row);
        d.add_value(&ev)?;
    }
    Ok(d.finish())
}
