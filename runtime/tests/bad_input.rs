//! Hostile input in local mode: records nested 20,000 levels deep (at the top
//! level and inside a field a CEL filter reads), oversized records, duplicate
//! keys, numbers beyond 64 bits, `-0`, a byte order mark and far-future event
//! times. Each is dead-lettered with its reason or passes unchanged, and the
//! events after it are processed.

use std::sync::Arc;

use keystone_crds::Reading;
use keystone_runtime::ManualClock;
use keystone_runtime::event::{DeadLetter, Event, MAX_DEPTH, MAX_EVENT_BYTES};
use keystone_runtime::local::{self, LocalPipeline};

const START_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

const PIPELINE: &str = r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata:
  name: bad-input
  namespace: tests
spec:
  source:
    topic: in
    schema:
      fields:
        - {name: id, type: string}
        - {name: payload, type: any}
        - {name: n, type: integer, optional: true}
        - {name: ts, type: timestamp}
  steps:
    - name: keep
      filter:
        expression: 'payload != null && id != "skip"'
    - name: once
      dedup:
        key: [id]
        window: 1h
        eventTimeField: ts
    - name: tag
      map:
        fields:
          - {name: tag, expression: 'id + "!"', type: string}
  sinks:
    - name: out
      kafka: {topic: out}
"#;

fn pipeline() -> LocalPipeline {
    // Read from the text, not a file: tests run in parallel, and a shared file
    // rewritten by one test could be read empty by another.
    let manifests = Reading::parse("pipeline.yaml", PIPELINE);
    assert!(
        manifests.diagnostics.is_empty(),
        "{:?}",
        manifests.diagnostics
    );
    let plan = local::compile_pipeline(&manifests, None).unwrap();
    let clock = ManualClock::new(START_MS);
    LocalPipeline::new(&plan, &Default::default(), Arc::new(clock)).unwrap()
}

fn run(lines: &[Vec<u8>]) -> (Vec<String>, Vec<DeadLetter>) {
    let mut pipeline = pipeline();
    let (mut events, mut dead) = pipeline.push_lines(lines.to_vec());
    let (e, d) = pipeline.finish();
    events.extend(e);
    dead.extend(d);
    let events = events.iter().map(json_line).collect();
    (events, dead)
}

fn json_line(event: &Event) -> String {
    let mut out = Vec::new();
    event.write_json_line(&mut out);
    String::from_utf8(out).unwrap().trim_end().to_owned()
}

fn nested(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

fn event(id: &str, payload: &str) -> Vec<u8> {
    format!(r#"{{"id":"{id}","payload":{payload},"ts":"2026-01-01T00:00:00Z"}}"#).into_bytes()
}

#[test]
fn records_nested_too_deep_are_dead_letters_and_the_input_goes_on() {
    let deep_top = format!(
        r#"{{"id":"top","payload":1,"ts":"2026-01-01T00:00:00Z","x":{}}}"#,
        nested(20_000)
    );
    assert!(deep_top.len() > 40_000);
    let lines = vec![
        event("first", "{}"),
        deep_top.into_bytes(),
        // 2,000 levels inside the field the filter reads.
        event("in-filtered-field", &nested(2_000)),
        // The deepest accepted: the event is level 1, the payload levels 2 to 128.
        event("at-the-limit", &nested(MAX_DEPTH - 1)),
        event("one-too-deep", &nested(MAX_DEPTH)),
        event("last", "{}"),
    ];
    let (events, dead) = run(&lines);
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e.split('"').nth(3).unwrap())
        .collect();
    assert_eq!(ids, ["first", "at-the-limit", "last"]);
    assert_eq!(
        events[1],
        String::from_utf8(lines[3].clone()).unwrap().replace(
            r#""ts":"2026-01-01T00:00:00Z"}"#,
            r#""ts":"2026-01-01T00:00:00Z","tag":"at-the-limit!"}"#,
        )
    );
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    let prefix = "nested deeper than the limit of 128 levels of objects and arrays, at ";
    assert_eq!(dead.len(), 3, "{reasons:?}");
    assert!(
        reasons[0].starts_with(&format!("{prefix}/x/0/0/0")),
        "{}",
        reasons[0]
    );
    assert!(
        reasons[1].starts_with(&format!("{prefix}/payload/0/0")),
        "{}",
        reasons[1]
    );
    assert!(
        reasons[2].starts_with(&format!("{prefix}/payload/0/0")),
        "{}",
        reasons[2]
    );
    for (letter, line) in dead.iter().zip([&lines[1], &lines[2], &lines[4]]) {
        assert_eq!(letter.step, "source");
        assert_eq!(&letter.original, line, "the original bytes are kept");
    }
}

#[test]
fn events_larger_than_the_limit_are_dead_letters_with_the_size() {
    let filler = "x".repeat(MAX_EVENT_BYTES);
    let large = format!(r#"{{"id":"large","payload":"{filler}","ts":"2026-01-01T00:00:00Z"}}"#);
    let just_fits = format!(
        r#"{{"id":"fits","payload":"{}","ts":"2026-01-01T00:00:00Z"}}"#,
        "x".repeat(MAX_EVENT_BYTES - 60)
    );
    assert!(just_fits.len() <= MAX_EVENT_BYTES);
    let (events, dead) = run(&[large.clone().into_bytes(), just_fits.into_bytes()]);
    assert_eq!(events.len(), 1);
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].reason,
        format!(
            "the event is {} bytes, larger than the limit of 1000000 bytes",
            large.len()
        )
    );
    assert_eq!(dead[0].original, large.as_bytes());
}

#[test]
fn numbers_keys_zero_and_byte_order_marks() {
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend(event("bom", "{}"));
    let lines = vec![
        bom,
        event(
            "wide",
            r#"{"n":1180591620717411303424,"f":3.14159265358979323846264338327950288,"small":0.1,"neg":-1180591620717411303424}"#,
        ),
        br#"{"id":"zero","payload":{},"n":-0,"ts":"2026-01-01T00:00:00Z"}"#.to_vec(),
        br#"{"id":"n-wide","payload":{},"n":18446744073709551616,"ts":"2026-01-01T00:00:00Z"}"#
            .to_vec(),
        br#"{"id":"dup","payload":{},"id":"other","ts":"2026-01-01T00:00:00Z"}"#.to_vec(),
        event("dup-nested", r#"{"a":{"k":1,"k":2}}"#),
    ];
    let (events, dead) = run(&lines);
    assert_eq!(
        events,
        [
            r#"{"id":"bom","payload":{},"ts":"2026-01-01T00:00:00Z","tag":"bom!"}"#,
            r#"{"id":"wide","payload":{"n":1180591620717411303424,"f":3.14159265358979323846264338327950288,"small":0.1,"neg":-1180591620717411303424},"ts":"2026-01-01T00:00:00Z","tag":"wide!"}"#,
            r#"{"id":"zero","payload":{},"n":0,"ts":"2026-01-01T00:00:00Z","tag":"zero!"}"#,
        ]
    );
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    assert_eq!(
        reasons,
        [
            r#"field "n" is integer beyond 64 bits, but the source schema requires integer"#,
            r#"duplicate key "id" in the object at the top level"#,
            r#"duplicate key "k" in the object at /payload/a"#,
        ]
    );
}

#[test]
fn a_far_future_event_time_does_not_let_redeliveries_through() {
    let at =
        |id: &str, ts: &str| format!(r#"{{"id":"{id}","payload":{{}},"ts":{ts}}}"#).into_bytes();
    let lines = vec![
        at("a", &START_MS.to_string()),
        at("b", &(START_MS + 1).to_string()),
        at("far", &i64::MAX.to_string()),
        at("a", &START_MS.to_string()),
        at("b", &(START_MS + 1).to_string()),
    ];
    let (events, dead) = run(&lines);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].step, "once");
    assert!(
        dead[0]
            .reason
            .contains("more than 1 hour ahead of processing time"),
        "{}",
        dead[0].reason
    );
}
