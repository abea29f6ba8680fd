//! The deterministic input generator. One seed, the same bytes for every engine.
//!
//! - `events.jsonl`: click/purchase events of about 300 bytes. `ts` (epoch ms)
//!   grows by 0-2 ms per original event. A share of lines (`dup_per_mille`) are
//!   byte-identical redeliveries of one of the last [`DUP_HORIZON`] original events
//!   (so a duplicate arrives at most a few tens of seconds of event time after its
//!   original, well inside a 10-minute dedup window). 5% of events name a customer
//!   that the table does not hold.
//! - `customers.jsonl`: the join table, `table_rows` rows keyed by `id`.
//! - `cdc.jsonl`: change events of orders: `seq` runs 1, 2, ... per `order_id`
//!   (1 to 20 changes per order, [`ACTIVE_ORDERS`] orders interleaved at a time);
//!   the stream is then shuffled within a window of [`DISORDER_WINDOW`] positions
//!   (no event moves further than that), and 5% of lines are byte-identical
//!   redeliveries of one of the previous [`REDELIVERY_HORIZON`] lines.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

pub const DUP_HORIZON: usize = 50_000;
pub const ACTIVE_ORDERS: usize = 1_000;
pub const DISORDER_WINDOW: u64 = 2_000;
pub const REDELIVERY_HORIZON: usize = 1_000;
const BASE_TS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const TARGET_EVENT_BYTES: usize = 300;
const TARGET_CDC_BYTES: usize = 280;

/// What to generate. Part of the cache folder's name, so every setting has its own files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenConfig {
    pub seed: u64,
    pub events: u64,
    pub cdc: u64,
    pub table_rows: u64,
    pub dup_per_mille: u64,
}

impl GenConfig {
    pub fn id(&self) -> String {
        format!(
            "v1-seed{}-ev{}-cdc{}-rows{}-dup{}",
            self.seed, self.events, self.cdc, self.table_rows, self.dup_per_mille
        )
    }
}

/// The generated files.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Dataset {
    pub dir: PathBuf,
    pub config: GenConfig,
    pub events: PathBuf,
    pub cdc: PathBuf,
    pub table: PathBuf,
}

/// The cache folder: `$KEYSTONE_BENCH_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/keystone-bench`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KEYSTONE_BENCH_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("keystone-bench")
}

/// Generates the dataset once; later calls with the same config reuse the files.
pub fn ensure(config: &GenConfig) -> anyhow::Result<Dataset> {
    let dir = cache_dir().join("data").join(config.id());
    let dataset = Dataset {
        events: dir.join("events.jsonl"),
        cdc: dir.join("cdc.jsonl"),
        table: dir.join("customers.jsonl"),
        dir: dir.clone(),
        config: config.clone(),
    };
    let done = dir.join("complete");
    if done.exists() {
        return Ok(dataset);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    write_lines(&dataset.table, |out| table(config, out))?;
    write_lines(&dataset.events, |out| events(config, out))?;
    write_lines(&dataset.cdc, |out| cdc(config, out))?;
    std::fs::write(&done, serde_json::to_vec_pretty(config)?)?;
    Ok(dataset)
}

fn write_lines(
    path: &Path,
    body: impl FnOnce(&mut dyn FnMut(&str) -> std::io::Result<()>) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    let mut file = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    body(&mut |line: &str| {
        file.write_all(line.as_bytes())?;
        file.write_all(b"\n")
    })
    .with_context(|| format!("writing {}", tmp.display()))?;
    file.flush()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    Ok(())
}

const COUNTRIES: [&str; 8] = ["DE", "FR", "US", "GB", "NL", "ES", "IT", "SE"];
const TIERS: [&str; 4] = ["bronze", "silver", "gold", "platinum"];
const CURRENCIES: [&str; 3] = ["EUR", "USD", "GBP"];
const OSES: [&str; 3] = ["android", "ios", "web"];
const MODELS: [&str; 5] = ["pixel-8", "iphone-15", "galaxy-s24", "desktop", "tablet"];
const CATEGORIES: [&str; 6] = ["shoes", "books", "garden", "toys", "kitchen", "music"];
const STATUSES: [&str; 5] = ["created", "paid", "packed", "shipped", "delivered"];
const PAD: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

fn pad(rng: &mut SplitMix64, len: usize) -> String {
    (0..len)
        .map(|_| char::from(*rng.pick(PAD)))
        .collect::<String>()
}

/// Table rows: `{"id","name","country","tier","since","email"}`.
pub fn table(
    config: &GenConfig,
    out: &mut dyn FnMut(&str) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut rng = SplitMix64::new(config.seed ^ 0x0074_6162_6c65);
    for i in 0..config.table_rows {
        let line = format!(
            r#"{{"id":"c-{i:06}","name":"Customer {i:06}","country":"{}","tier":"{}","since":"20{:02}-{:02}-{:02}","email":"customer{i:06}@example.com"}}"#,
            rng.pick(&COUNTRIES),
            rng.pick(&TIERS),
            10 + rng.below(16),
            1 + rng.below(12),
            1 + rng.below(28),
        );
        out(&line)?;
    }
    Ok(())
}

/// Click and purchase events with duplicates.
pub fn events(
    config: &GenConfig,
    out: &mut dyn FnMut(&str) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut rng = SplitMix64::new(config.seed);
    let mut recent: VecDeque<String> = VecDeque::with_capacity(DUP_HORIZON);
    let mut ts = BASE_TS;
    let mut next_id: u64 = 0;
    let rows = config.table_rows.max(1);
    for _ in 0..config.events {
        if !recent.is_empty() && rng.chance(config.dup_per_mille) {
            let i = rng.below(recent.len() as u64) as usize;
            out(&recent[i])?;
            continue;
        }
        ts += rng.below(3) as i64;
        let id = next_id;
        next_id += 1;
        let customer = if rng.chance(50) {
            rows + rng.below(rows)
        } else {
            rng.below(rows)
        };
        let action = match rng.below(100) {
            0..55 => "view",
            55..75 => "click",
            75..90 => "add_to_cart",
            _ => "purchase",
        };
        let cents = rng.below(100_000);
        let mut line = format!(
            r#"{{"event_id":"e-{id:010}","ts":{ts},"user_id":"u-{:06}","session_id":"s-{:08}","customer_id":"c-{customer:06}","action":"{action}","page":"/catalog/{}/item-{:05}","amount":{}.{:02},"currency":"{}","country":"{}","bot":{},"device":{{"os":"{}","model":"{}","app":"4.{}.{}"}},"note":""#,
            rng.below(200_000),
            rng.below(10_000_000),
            rng.pick(&CATEGORIES),
            rng.below(100_000),
            cents / 100,
            cents % 100,
            rng.pick(&CURRENCIES),
            rng.pick(&COUNTRIES),
            rng.chance(100),
            rng.pick(&OSES),
            rng.pick(&MODELS),
            rng.below(20),
            rng.below(10),
        );
        let fill = TARGET_EVENT_BYTES.saturating_sub(line.len() + 2).max(4);
        line.push_str(&pad(&mut rng, fill));
        line.push_str("\"}");
        if recent.len() == DUP_HORIZON {
            recent.pop_front();
        }
        recent.push_back(line.clone());
        out(&line)?;
    }
    Ok(())
}

struct Order {
    id: u64,
    next_seq: u64,
    last_seq: u64,
    customer: u64,
}

/// CDC events of orders, shuffled within a bounded window, with redeliveries.
pub fn cdc(
    config: &GenConfig,
    out: &mut dyn FnMut(&str) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut rng = SplitMix64::new(config.seed ^ 0x0063_6463);
    // Redeliveries are 5% of the lines written; the rest are distinct changes.
    let total = config.cdc;
    let redelivery_per_mille = 50;
    let mut next_order: u64 = 0;
    let rows = config.table_rows.max(1);
    let mut new_order = |rng: &mut SplitMix64| {
        let o = Order {
            id: next_order,
            next_seq: 1,
            last_seq: 1 + rng.below(20),
            customer: rng.below(rows),
        };
        next_order += 1;
        o
    };
    let mut active: Vec<Order> = (0..ACTIVE_ORDERS).map(|_| new_order(&mut rng)).collect();
    // (sort position, line) for the bounded shuffle.
    let mut window: std::collections::BinaryHeap<std::cmp::Reverse<(u64, u64, String)>> =
        Default::default();
    let mut recent: VecDeque<String> = VecDeque::with_capacity(REDELIVERY_HORIZON);
    let mut written: u64 = 0;
    let mut ts = BASE_TS;
    let mut position: u64 = 0;
    let mut emit = |line: String,
                    rng: &mut SplitMix64,
                    recent: &mut VecDeque<String>,
                    written: &mut u64|
     -> std::io::Result<()> {
        if *written >= total {
            return Ok(());
        }
        out(&line)?;
        *written += 1;
        if recent.len() == REDELIVERY_HORIZON {
            recent.pop_front();
        }
        recent.push_back(line);
        if *written < total && rng.chance(redelivery_per_mille) {
            let i = rng.below(recent.len() as u64) as usize;
            let copy = recent[i].clone();
            out(&copy)?;
            *written += 1;
        }
        Ok(())
    };
    while written < total {
        let slot = rng.below(active.len() as u64) as usize;
        let order = &mut active[slot];
        let seq = order.next_seq;
        ts += rng.below(3) as i64;
        let status = STATUSES[((seq - 1) as usize).min(STATUSES.len() - 1)];
        let mut line = format!(
            r#"{{"event_id":"x-{position:010}","order_id":"o-{:08}","seq":{seq},"op":"{}","ts":{ts},"after":{{"status":"{status}","amount":{}.{:02},"customer_id":"c-{:06}","items":{},"warehouse":"wh-{:02}","note":""#,
            order.id,
            if seq == 1 { "c" } else { "u" },
            rng.below(5_000),
            rng.below(100),
            order.customer,
            1 + rng.below(9),
            rng.below(40),
        );
        let fill = TARGET_CDC_BYTES.saturating_sub(line.len() + 3).max(4);
        line.push_str(&pad(&mut rng, fill));
        line.push_str("\"}}");
        order.next_seq += 1;
        if order.next_seq > order.last_seq {
            active[slot] = new_order(&mut rng);
        }
        let key = position + rng.below(DISORDER_WINDOW);
        window.push(std::cmp::Reverse((key, position, line)));
        position += 1;
        // Every line still in the heap has key >= position - 1 - ... : release those
        // that no later line can precede (later keys are >= position).
        while let Some(std::cmp::Reverse((key, _, _))) = window.peek() {
            if *key >= position {
                break;
            }
            let std::cmp::Reverse((_, _, line)) = window.pop().expect("peeked");
            emit(line, &mut rng, &mut recent, &mut written)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> GenConfig {
        GenConfig {
            seed: 7,
            events: 2_000,
            cdc: 3_000,
            table_rows: 100,
            dup_per_mille: 200,
        }
    }

    fn collect(
        f: impl Fn(&GenConfig, &mut dyn FnMut(&str) -> std::io::Result<()>) -> std::io::Result<()>,
    ) -> Vec<String> {
        let mut lines = Vec::new();
        f(&small(), &mut |l: &str| {
            lines.push(l.to_owned());
            Ok(())
        })
        .expect("generate");
        lines
    }

    #[test]
    fn generation_is_deterministic() {
        assert_eq!(collect(events), collect(events));
        assert_eq!(collect(cdc), collect(cdc));
        assert_eq!(collect(table), collect(table));
    }

    #[test]
    fn events_have_the_asked_shape() {
        let lines = collect(events);
        assert_eq!(lines.len(), 2_000);
        let ids: std::collections::HashSet<&str> = lines
            .iter()
            .map(|l| &l[13..25])
            .collect::<std::collections::HashSet<_>>();
        let dups = lines.len() - ids.len();
        assert!((300..500).contains(&dups), "{dups} duplicates");
        let avg = lines.iter().map(String::len).sum::<usize>() / lines.len();
        assert!((290..=310).contains(&avg), "{avg} bytes");
        for l in &lines {
            let v: serde_json::Value = serde_json::from_str(l).expect("valid JSON");
            assert!(v["ts"].is_i64());
        }
    }

    #[test]
    fn cdc_disorder_is_bounded_per_key() {
        let lines = collect(cdc);
        assert_eq!(lines.len(), 3_000);
        let mut seen: std::collections::HashMap<String, Vec<(usize, i64)>> = Default::default();
        for (i, l) in lines.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(l).expect("valid JSON");
            let key = v["order_id"].as_str().expect("order_id").to_owned();
            seen.entry(key)
                .or_default()
                .push((i, v["seq"].as_i64().expect("seq")));
        }
        let mut inversions = 0;
        for events in seen.values() {
            for (a, b) in events.iter().zip(events.iter().skip(1)) {
                if b.1 < a.1 {
                    inversions += 1;
                    assert!(b.0 - a.0 < 2 * DISORDER_WINDOW as usize + REDELIVERY_HORIZON);
                }
            }
        }
        assert!(inversions > 0, "the shuffle must reorder some keys");
    }
}
