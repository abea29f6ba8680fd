//! Operator throughput on one core, against the raw JSON ceiling.
//!
//! `cargo bench -p keystone-runtime --bench operators` (add `-- --quick` for one
//! round). Each scenario runs in a child process pinned to one core (`taskset -c
//! 1` when available), so that its peak memory is its own. Rounds alternate the
//! scenarios (A B C ... A B C ...); the report gives the median, min and max
//! events/s over the rounds and the ratio of medians to the ceiling.
//!
//! Scenarios (events of about 300 bytes from one seeded generator):
//! - `ceiling`: sonic-rs parse to a document and serialize it, nothing else.
//! - `serde_json`, `simd-json`: the same loop with those crates (simd-json parses
//!   in place, so it gets a copy of each line), to justify the choice of sonic-rs.
//! - `avro`: the Avro counterpart of `ceiling`: the same events as Avro records
//!   in the registry's wire format, each read to an event as a Kafka source reads
//!   it (decoded, written as JSON text, parsed with the event's checks) and
//!   written back as a record of the same schema as an Avro sink writes it. Its
//!   ratio to `ceiling` is what Avro costs against JSON before any step runs.
//! - `passthrough`: the runtime with no steps (parse, source-schema check, serialize).
//! - `filter+project`: a CEL filter passing about half, then a 3-field projection.
//! - `dedup`: 1.25M events over 1M distinct ids (20% duplicates), 10 min window.
//! - `order`: about 1.05M changes of about 95k orders as the project's S3 input
//!   (e2e/bench): 1 to 20 changes per order, 1,000 orders interleaved, shuffled
//!   within 2,000 positions, 5% redeliveries (stale, dropped); contiguous, max
//!   delay 2 s; 1 ms of processing time passes per input batch (256 events).

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use keystone_runtime::task::{StageTask, TaskOptions};
use keystone_runtime::{Clock, ManualClock};

// The same allocator as the `keystone-runtime` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SCENARIOS: [&str; 8] = [
    "ceiling",
    "serde_json",
    "simd-json",
    "avro",
    "passthrough",
    "filter+project",
    "dedup",
    "order",
];
const BATCH: usize = keystone_runtime::local::BATCH_LINES;
const ROUNDS: usize = 5;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64: a deterministic generator, so every run reads the same bytes.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn event(rng: &mut Rng, event_id: u64, order: u64, seq: u64) -> Vec<u8> {
    let statuses = ["paid", "created", "shipped", "paid"];
    let status = statuses[(rng.next() % 4) as usize];
    let amount = (rng.next() % 20_000) as f64 / 100.0;
    let tiers = ["gold", "silver", "bronze"];
    format!(
        concat!(
            r#"{{"event_id":"e-{:012}","order_id":"order-{:08}","seq":{},"op":"u","ts":{},"#,
            r#""status":"{}","amount":{:.2},"currency":"EUR","customer":{{"id":"c-{:06}","tier":"{}","country":"FR"}},"#,
            r#""items":[{{"sku":"SKU-{:05}","qty":{},"price":12.5}}],"source":"checkout-service","trace":"{:032x}"}}"#
        ),
        event_id,
        order,
        seq,
        1_767_225_600_000u64 + event_id,
        status,
        amount,
        rng.next() % 1_000_000,
        tiers[(rng.next() % 3) as usize],
        rng.next() % 100_000,
        1 + rng.next() % 5,
        (rng.next() as u128) << 64 | rng.next() as u128,
    )
    .into_bytes()
}

const SCHEMA: &str = r#"
    schema:
      fields:
        - {name: event_id, type: string}
        - {name: order_id, type: string}
        - {name: seq, type: integer}
        - {name: status, type: string}
        - {name: amount, type: number}
        - {name: customer.id, type: string}"#;

fn pipeline(key: &str, steps: &str) -> String {
    format!(
        "apiVersion: keystone.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: bench}}\nspec:\n  source:\n    topic: in\n    key: [{key}]{SCHEMA}\n  steps:{steps}\n  sinks:\n    - name: out\n      kafka: {{topic: out}}\n"
    )
}

fn scenario_input(name: &str) -> (Vec<Vec<u8>>, String, u64) {
    let mut rng = Rng(0x5eed);
    match name {
        "ceiling" | "serde_json" | "simd-json" | "avro" | "passthrough" | "filter+project" => {
            let lines = (0..1_000_000)
                .map(|i| event(&mut rng, i, i % 50_000, i / 50_000))
                .collect();
            let steps = match name {
                "filter+project" => {
                    "\n    - name: paid\n      filter: {expression: 'status == \"paid\" && amount > 50.0'}\n    - name: shape\n      project:\n        fields:\n          - {name: id, from: /event_id}\n          - {name: amount, from: /amount}\n          - {name: customer, from: /customer/id}"
                }
                _ => " []",
            };
            (lines, pipeline("order_id", steps), 0)
        }
        "dedup" => {
            // 1M distinct ids, 250k of them sent twice; a duplicate follows its
            // original within 64k events.
            let distinct = 1_000_000u64;
            let mut ids: Vec<u64> = (0..distinct).collect();
            let mut lines = Vec::with_capacity(1_250_000);
            let mut pending: Vec<u64> = Vec::new();
            for (i, id) in ids.drain(..).enumerate() {
                lines.push(event(&mut rng, id, id % 50_000, 1));
                if i % 4 == 0 {
                    pending.push(id);
                }
                if pending.len() > 16_384 || (i as u64 == distinct - 1) {
                    for dup in pending.drain(..) {
                        lines.push(event(&mut rng, dup, dup % 50_000, 1));
                    }
                }
            }
            let steps = "\n    - name: once\n      dedup: {key: [event_id], window: 10m}";
            (lines, pipeline("event_id", steps), distinct)
        }
        "order" => {
            // The project's S3 input shape (e2e/bench): orders with 1 to 20 changes,
            // 1,000 orders interleaved, no change moved more than 2,000 positions,
            // 5% redeliveries of one of the previous 1,000 lines (stale, dropped).
            let total = 1_000_000usize;
            let mut active: Vec<(u64, u64, u64)> = Vec::new(); // (order, next seq, last seq)
            let mut next_order = 0u64;
            let mut changes: Vec<(u64, u64, u64)> = Vec::with_capacity(total);
            for position in 0..total as u64 {
                while active.len() < 1000 {
                    active.push((next_order, 1, 1 + rng.next() % 20));
                    next_order += 1;
                }
                let slot = (rng.next() % active.len() as u64) as usize;
                let (order, seq, last) = active[slot];
                changes.push((position + rng.next() % 2000, order, seq));
                if seq == last {
                    active.swap_remove(slot);
                } else {
                    active[slot].1 += 1;
                }
            }
            changes.sort_unstable();
            let mut lines: Vec<Vec<u8>> = Vec::with_capacity(total * 21 / 20);
            for (i, (_, order, seq)) in changes.iter().enumerate() {
                lines.push(event(&mut rng, i as u64, *order, *seq));
                if rng.next().is_multiple_of(20) && lines.len() > 1 {
                    let back = 1 + (rng.next() % 1000) as usize % (lines.len() - 1);
                    let copy = lines[lines.len() - 1 - back].clone();
                    lines.push(copy);
                }
            }
            let steps = "\n    - name: in-order\n      order: {key: [order_id], sequence: seq, maxDelay: 2s, maxBuffered: 1000, contiguous: true}";
            (lines, pipeline("order_id", steps), next_order)
        }
        other => panic!("unknown scenario {other}"),
    }
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One timed run; returns (events/s, events out, RSS growth in KiB, live state keys).
fn run_once(name: &str, lines: &[Vec<u8>], plan_yaml: &str) -> (f64, u64, u64, u64) {
    let mut out = Vec::with_capacity(1 << 20);
    if name == "ceiling" {
        let started = Instant::now();
        let mut count = 0u64;
        for line in lines {
            let value: sonic_rs::Value = sonic_rs::from_slice(line).expect("valid JSON");
            sonic_rs::to_writer(&mut out, &value).expect("serializes");
            out.push(b'\n');
            count += 1;
            if out.len() > (1 << 20) {
                out.clear();
            }
        }
        return (
            lines.len() as f64 / started.elapsed().as_secs_f64(),
            count,
            0,
            0,
        );
    }
    if name == "serde_json" {
        let started = Instant::now();
        for line in lines {
            let value: serde_json::Value = serde_json::from_slice(line).expect("valid JSON");
            serde_json::to_writer(&mut out, &value).expect("serializes");
            out.push(b'\n');
            if out.len() > (1 << 20) {
                out.clear();
            }
        }
        let rate = lines.len() as f64 / started.elapsed().as_secs_f64();
        return (rate, lines.len() as u64, 0, 0);
    }
    if name == "simd-json" {
        let started = Instant::now();
        for line in lines {
            let mut copy = line.clone();
            let value = simd_json::to_owned_value(&mut copy).expect("valid JSON");
            simd_json::to_writer(&mut out, &value).expect("serializes");
            out.push(b'\n');
            if out.len() > (1 << 20) {
                out.clear();
            }
        }
        let rate = lines.len() as f64 / started.elapsed().as_secs_f64();
        return (rate, lines.len() as u64, 0, 0);
    }
    if name == "avro" {
        return avro_round_trip(lines, &mut out);
    }
    let manifests = keystone_crds::parse_manifests("bench.yaml", plan_yaml).expect("manifest");
    let plan = keystone_crds::compile(&manifests.pipelines[0], &[]).expect("valid pipeline");
    // One stage: no repartition, so the whole chain runs in this task.
    assert_eq!(plan.stages.len(), 1, "the scenario's steps fit one stage");
    let clock = ManualClock::new(1_767_225_600_000);
    let shared: Arc<dyn Clock> = Arc::new(clock.clone());
    let mut task = StageTask::new(
        &plan.stages[0],
        Some(&plan.source.schema),
        &Default::default(),
        shared,
        TaskOptions {
            record_changes: false,
        },
    )
    .expect("stage builds");
    let before = rss_kib("VmRSS:");
    let mut emitted = 0u64;
    let started = Instant::now();
    for chunk in lines.chunks(BATCH) {
        clock.advance(1);
        // Local mode reads each line into its own buffer; so does this.
        task.push_raw(chunk.iter().cloned());
        for event in task.take_events() {
            event.write_json_line(&mut out);
            emitted += 1;
        }
        let dead = task.take_dead_letters();
        assert!(dead.is_empty(), "{:?}", dead.first());
        if out.len() > (1 << 20) {
            out.clear();
        }
    }
    task.finish();
    emitted += task.take_events().len() as u64;
    let rate = lines.len() as f64 / started.elapsed().as_secs_f64();
    let grown = rss_kib("VmRSS:").saturating_sub(before);
    let live: usize = task.state_entries().iter().map(|(_, n)| n).sum();
    (rate, emitted, grown, live as u64)
}

fn child(name: &str) {
    let (lines, plan, keys) = scenario_input(name);
    let bytes: usize = lines.iter().map(Vec::len).sum();
    // A first whole run warms up and measures how much the state grows (a fresh
    // process: the allocator has no freed pages to reuse yet); the second is timed.
    let (_, _, grown, live) = run_once(name, &lines, &plan);
    let (rate, emitted, _, _) = run_once(name, &lines, &plan);
    let keys = if live > 0 { live } else { keys };
    println!(
        "RESULT {name}\t{rate:.0}\t{}\t{emitted}\t{}\t{grown}\t{keys}\t{}",
        lines.len(),
        bytes / lines.len(),
        rss_kib("VmHWM:")
    );
}

/// The Avro schema of [`event`]'s events.
const AVRO_SCHEMA: &str = r#"{"type": "record", "name": "Change", "namespace": "bench", "fields": [
  {"name": "event_id", "type": "string"}, {"name": "order_id", "type": "string"},
  {"name": "seq", "type": "long"}, {"name": "op", "type": "string"}, {"name": "ts", "type": "long"},
  {"name": "status", "type": "string"}, {"name": "amount", "type": "double"},
  {"name": "currency", "type": "string"},
  {"name": "customer", "type": {"type": "record", "name": "Customer", "fields": [
    {"name": "id", "type": "string"}, {"name": "tier", "type": "string"},
    {"name": "country", "type": "string"}]}},
  {"name": "items", "type": {"type": "array", "items": {"type": "record", "name": "Item", "fields": [
    {"name": "sku", "type": "string"}, {"name": "qty", "type": "long"},
    {"name": "price", "type": "double"}]}}},
  {"name": "source", "type": "string"}, {"name": "trace", "type": "string"}]}"#;

/// `lines` as Avro records read to events and written back (the `avro` scenario).
fn avro_round_trip(lines: &[Vec<u8>], out: &mut Vec<u8>) -> (f64, u64, u64, u64) {
    use keystone_avro::{AvroSchema, FramedWriter, Shape};
    use keystone_runtime::avro::{AvroDecoder, Sonic};
    let schema = Arc::new(AvroSchema::parse_str(AVRO_SCHEMA).expect("schema"));
    let shape = || Shape::new(AvroSchema::clone(&schema)).expect("shape");
    let records: Vec<Vec<u8>> = lines
        .iter()
        .map(|line| {
            let event = serde_json::from_slice(line).expect("JSON");
            keystone_avro::encode(&event, &shape(), 1).expect("of the schema")
        })
        .collect();
    let decoder = AvroDecoder::new(shape());
    decoder.learn(1, Ok(schema.clone())).expect("readable");
    let mut writer = FramedWriter::new(shape(), 1).expect("writer");
    let started = Instant::now();
    for record in &records {
        let event = decoder.decode(record.clone()).expect("decodes");
        out.extend_from_slice(&writer.encode::<Sonic>(&event.value).expect("encodes"));
        if out.len() > (1 << 20) {
            out.clear();
        }
    }
    let rate = records.len() as f64 / started.elapsed().as_secs_f64();
    (rate, records.len() as u64, 0, 0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    values[values.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(position) = args.iter().position(|a| a == "--scenario") {
        child(&args[position + 1]);
        return;
    }
    let rounds = if args.iter().any(|a| a == "--quick") {
        1
    } else {
        ROUNDS
    };
    let exe = std::env::current_exe().expect("own path");
    let pin = Command::new("taskset").arg("--version").output().is_ok();
    let mut results: Vec<Vec<Vec<String>>> = vec![Vec::new(); SCENARIOS.len()];
    for round in 0..rounds {
        for (index, name) in SCENARIOS.iter().enumerate() {
            let output = if pin {
                Command::new("taskset")
                    .args(["-c", "1"])
                    .arg(&exe)
                    .args(["--scenario", name])
                    .output()
            } else {
                Command::new(&exe).args(["--scenario", name]).output()
            }
            .expect("child runs");
            let stdout = String::from_utf8_lossy(&output.stdout);
            let line = stdout
                .lines()
                .find(|l| l.starts_with("RESULT "))
                .unwrap_or_else(|| {
                    panic!("{name} failed: {}", String::from_utf8_lossy(&output.stderr))
                });
            let fields: Vec<String> = line["RESULT ".len()..]
                .split('\t')
                .map(str::to_owned)
                .collect();
            eprintln!("round {}: {name}: {} events/s", round + 1, fields[1]);
            results[index].push(fields);
        }
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average at the end: {}", load.trim());
    println!();
    println!(
        "| scenario | events | bytes/event | events out | median events/s | min | max | ratio to ceiling (median of per-round pairs) | CPU-s per 1M events | live state keys | RSS growth of the state | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let rate = |fields: &Vec<String>| fields[1].parse::<f64>().unwrap_or(0.0);
    for (index, name) in SCENARIOS.iter().enumerate() {
        let runs = &results[index];
        let mut rates: Vec<f64> = runs.iter().map(rate).collect();
        let (min, max) = (
            rates.iter().cloned().fold(f64::MAX, f64::min),
            rates.iter().cloned().fold(0.0, f64::max),
        );
        let med = median(&mut rates);
        // Each round's scenario against the same round's ceiling: the machine's
        // load drifts between rounds, so pairs are the fair comparison.
        let mut ratios: Vec<f64> = runs
            .iter()
            .zip(&results[0])
            .map(|(run, ceiling)| rate(run) / rate(ceiling))
            .collect();
        let ratio = median(&mut ratios);
        let last = &runs[runs.len() - 1];
        let grown_kib: f64 = last[5].parse().unwrap_or(0.0);
        let keys: f64 = last[6].parse().unwrap_or(0.0);
        let (live, state) = if keys > 0.0 {
            (
                format!("{keys:.0}"),
                format!(
                    "{:.1} MiB ({:.0} B/key, {:.0} MiB per 1M keys)",
                    grown_kib / 1024.0,
                    grown_kib * 1024.0 / keys,
                    grown_kib / 1024.0 * 1e6 / keys
                ),
            )
        } else {
            ("-".to_owned(), "-".to_owned())
        };
        println!(
            "| {name} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.3} | {live} | {state} | {:.0} MiB |",
            last[2],
            last[4],
            last[3],
            med,
            min,
            max,
            ratio,
            1e6 / med,
            last[7].parse::<f64>().unwrap_or(0.0) / 1024.0
        );
    }
}
