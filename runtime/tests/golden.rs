//! Golden tests in local mode: each directory under `tests/golden/` holds a
//! `pipeline.yaml` (plus optional `processors.yaml`), `input.jsonl`, optional
//! `tables/NAME.jsonl` and `tick-ms` (processing time advanced before each input
//! line; the clock is otherwise fixed), and the expected `expected.jsonl` and
//! `expected-dead-letters.jsonl`. Events are compared as JSON values line by line
//! (member order of objects a step modified is not part of the contract).
//! `BLESS=1 cargo test -p keystone-runtime --test golden` rewrites the expected files.

mod golden_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use golden_support::{Case, Outcome, START_MS, cases, input_lines, parse_lines};
use keystone_runtime::ManualClock;
use keystone_runtime::local::{self, LocalPipeline};

fn run_case(dir: &Path) -> Outcome {
    Case::load(dir).run(input_lines(dir).into_iter().map(|(_, line)| Some(line)))
}

fn compare(dir: &Path, file: &str, actual: &[String]) {
    let path = dir.join(file);
    let actual_text = if actual.is_empty() {
        String::new()
    } else {
        actual.join("\n") + "\n"
    };
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &actual_text).unwrap();
        return;
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        parse_lines(&actual_text),
        parse_lines(&expected),
        "{} differs; actual:\n{actual_text}",
        path.display()
    );
}

#[test]
fn golden_cases() {
    for dir in cases() {
        let outcome = run_case(&dir);
        compare(&dir, "expected.jsonl", &outcome.events);
        compare(&dir, "expected-dead-letters.jsonl", &outcome.dead_letters);
        for letter in parse_lines(&outcome.dead_letters.join("\n")) {
            let reason = letter["reason"].as_str().unwrap_or_default();
            assert!(
                !reason.is_empty(),
                "{}: dead letter without a reason",
                dir.display()
            );
            assert!(letter["step"].is_string() && letter["original"].is_string());
        }
    }
}

fn field<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    &v[name]
}

/// The CDC case: per key, output sequences ascend strictly, and every valid input
/// (distinct order and sequence, after dropping redeliveries) reaches the output.
#[test]
fn cdc_output_is_ordered_unique_and_complete() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/cdc-dedup-order");
    let outcome = run_case(&dir);
    let output = parse_lines(&outcome.events.join("\n"));
    let mut last: HashMap<String, i64> = HashMap::new();
    let mut seen = BTreeSet::new();
    for event in &output {
        let key = field(event, "order_id").as_str().unwrap().to_owned();
        let seq = field(event, "seq").as_i64().unwrap();
        if let Some(previous) = last.insert(key.clone(), seq) {
            assert!(seq > previous, "{key}: {seq} after {previous}");
        }
        seen.insert((key, seq));
    }
    let input = std::fs::read_to_string(dir.join("input.jsonl")).unwrap();
    let mut valid = BTreeSet::new();
    for line in input.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if let (Some(key), Some(seq)) = (event["order_id"].as_str(), event["seq"].as_i64()) {
            valid.insert((key.to_owned(), seq));
        }
    }
    assert_eq!(
        seen, valid,
        "every valid change reaches the output exactly once"
    );
}

/// The same properties at scale: 20,000 changes over 500 keys, shuffled within a
/// window, 10% redelivered, with poison lines; the order step is contiguous with a
/// processing-time clock that advances 1 ms per line, and a maxDelay that covers
/// the disorder, so no gap is given up on.
#[test]
fn order_at_scale_is_ascending_unique_and_lossless() {
    let text = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: scale}
spec:
  source:
    topic: cdc
    key: [k]
    schema:
      fields:
        - {name: k, type: integer}
        - {name: seq, type: integer}
        - {name: id, type: string}
  steps:
    - name: dedup
      dedup: {key: [id], window: 1h}
    - name: order
      order: {key: [k], sequence: seq, maxDelay: 5s, maxBuffered: 64, contiguous: true, onStale: DeadLetter}
  sinks:
    - name: out
      kafka: {topic: out}
"#;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("order-scale");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pipeline.yaml"), text).unwrap();
    let manifests = local::read_manifests(&[dir.join("pipeline.yaml")]).unwrap();
    let plan = local::compile_pipeline(&manifests, None).unwrap();
    let clock = ManualClock::new(START_MS);
    let mut pipeline =
        LocalPipeline::new(&plan, &BTreeMap::new(), Arc::new(clock.clone())).unwrap();

    // Deterministic generator (splitmix64).
    let mut state = 42u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let keys = 500u64;
    let per_key = 40u64;
    let mut changes: Vec<(u64, u64, u64)> = Vec::new();
    for seq in 1..=per_key {
        for k in 0..keys {
            // Sort position: sequence order plus a disorder of up to 3 sequences.
            let position = seq * 1000 + next() % 3000;
            changes.push((position, k, seq));
        }
    }
    changes.sort();
    let mut lines = Vec::new();
    for (i, (_, k, seq)) in changes.iter().enumerate() {
        let line = format!(r#"{{"k":{k},"seq":{seq},"id":"{k}-{seq}","pad":"xxxxxxxx"}}"#);
        if next() % 10 == 0 {
            lines.push(line.clone());
        }
        lines.push(line);
        if i % 997 == 0 {
            lines.push("{not json".to_owned());
        }
    }
    let mut output = Vec::new();
    let mut dead = Vec::new();
    for chunk in lines.chunks(100) {
        clock.advance(100);
        let (e, d) = pipeline.push_lines(chunk.iter().map(|l| l.as_bytes().to_vec()).collect());
        output.extend(e);
        dead.extend(d);
    }
    let (e, d) = pipeline.finish();
    output.extend(e);
    dead.extend(d);

    let mut last: HashMap<i64, i64> = HashMap::new();
    let mut count = 0usize;
    for event in &output {
        let v: serde_json::Value = serde_json::from_slice(&{
            let mut b = Vec::new();
            event.write_json_line(&mut b);
            b
        })
        .unwrap();
        let (k, seq) = (v["k"].as_i64().unwrap(), v["seq"].as_i64().unwrap());
        if let Some(previous) = last.insert(k, seq) {
            assert!(seq > previous, "key {k}: {seq} after {previous}");
        }
        count += 1;
    }
    let stale = dead
        .iter()
        .filter(|d| d.reason.starts_with("stale"))
        .count();
    let poison = dead.iter().filter(|d| d.step == "source").count();
    assert_eq!(poison, changes.len().div_ceil(997));
    // Every change leaves once, or (only if its gap was given up on) as a stale dead letter.
    assert_eq!(
        count + stale,
        (keys * per_key) as usize,
        "nothing valid is lost"
    );
    assert_eq!(stale, 0, "no gap is given up on");
}
