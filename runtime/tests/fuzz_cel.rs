//! Fuzzing of CEL expressions from source to result (proptest, so a bounded run
//! is part of `cargo test` on stable Rust): compiling within the limits, the
//! checker's typing and cost estimate (as a filter of a pipeline), and, for
//! every expression the checker accepts, evaluation on small random events
//! with the runtime's conversion of JSON to CEL. Nothing may panic or overflow
//! the stack. Expressions are generated from CEL's grammar over the fields of
//! a schema, and as arbitrary text over CEL's tokens. `PROPTEST_CASES` sets
//! how many cases each target runs (docs/RELIABILITY.md records the long runs).

use proptest::prelude::*;
use serde_json::{Value, json};

// Shared with the cargo-fuzz target `fuzz/fuzz_targets/cel.rs`.
#[path = "properties/cel.rs"]
mod properties;

/// A small JSON value of any shape.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-z ]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An event: mostly of the schema's types, sometimes not, sometimes lacking a field.
fn event() -> impl Strategy<Value = Value> {
    (
        prop_oneof![3 => any::<i64>().prop_map(Value::from), 1 => json_value()],
        prop_oneof![3 => (-1e9f64..1e9).prop_map(Value::from), 1 => json_value()],
        prop_oneof![3 => "[a-z]{0,8}".prop_map(Value::from), 1 => json_value()],
        prop_oneof![3 => any::<bool>().prop_map(Value::from), 1 => json_value()],
        prop_oneof![
            2 => (0i64..4_000_000_000_000).prop_map(Value::from),
            1 => Just(Value::from("2024-05-01T10:00:00Z")),
            1 => json_value()
        ],
        proptest::collection::vec(json_value(), 0..5),
        ("[a-z]{0,5}", json_value()),
        json_value(),
        any::<u8>(),
    )
        .prop_map(|(n, x, s, b, ts, tags, (k, extra), any, drop)| {
            let mut event = json!({
                "n": n, "x": x, "s": s, "b": b, "ts": ts, "tags": tags,
                "o": {"k": k, "extra": extra}, "opt": null, "any": any
            });
            // Now and then a field is missing.
            if drop < 40 {
                let names = ["n", "x", "s", "b", "ts", "tags", "o", "opt", "any"];
                event
                    .as_object_mut()
                    .unwrap()
                    .remove(names[drop as usize % names.len()]);
            }
            event
        })
}

/// A CEL expression from the grammar, over the schema's fields.
fn expression() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        prop_oneof![
            Just("n"),
            Just("x"),
            Just("s"),
            Just("b"),
            Just("ts"),
            Just("tags"),
            Just("o"),
            Just("o.k"),
            Just("opt"),
            Just("any"),
            Just("event"),
            Just("missing"),
            Just("e"),
        ]
        .prop_map(str::to_owned),
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|u| format!("{u}u")),
        (-1e3f64..1e3).prop_map(|d| format!("{d:?}")),
        "[a-z ]{0,5}".prop_map(|s| format!("'{s}'")),
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("b'ab'".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
    ];
    leaf.prop_recursive(5, 40, 3, |inner| {
        let binary = prop_oneof![
            Just("+"),
            Just("-"),
            Just("*"),
            Just("/"),
            Just("%"),
            Just("=="),
            Just("!="),
            Just("<"),
            Just("<="),
            Just(">"),
            Just(">="),
            Just("&&"),
            Just("||"),
            Just("in"),
        ];
        let macro_name = prop_oneof![
            Just("all"),
            Just("exists"),
            Just("exists_one"),
            Just("map"),
            Just("filter"),
        ];
        let function = prop_oneof![
            Just("size"),
            Just("string"),
            Just("int"),
            Just("uint"),
            Just("double"),
            Just("bool"),
            Just("bytes"),
            Just("timestamp"),
            Just("duration"),
            Just("type"),
            Just("dyn"),
            Just("has"),
        ];
        let method = prop_oneof![
            Just("contains"),
            Just("startsWith"),
            Just("endsWith"),
            Just("matches"),
            Just("size"),
            Just("getFullYear"),
            Just("getHours"),
            Just("orValue"),
        ];
        prop_oneof![
            (inner.clone(), binary, inner.clone()).prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            inner.clone().prop_map(|a| format!("!{a}")),
            inner.clone().prop_map(|a| format!("-{a}")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| format!("({c} ? {a} : {b})")),
            (inner.clone(), macro_name, inner.clone())
                .prop_map(|(range, m, body)| format!("{range}.{m}(e, {body})")),
            (function, inner.clone()).prop_map(|(f, a)| format!("{f}({a})")),
            (inner.clone(), method, inner.clone()).prop_map(|(t, m, a)| format!("{t}.{m}({a})")),
            (inner.clone(), inner.clone()).prop_map(|(a, i)| format!("{a}[{i}]")),
            (inner.clone(), "[a-z]{1,3}").prop_map(|(a, f)| format!("{a}.{f}")),
            proptest::collection::vec(inner.clone(), 0..3)
                .prop_map(|items| format!("[{}]", items.join(", "))),
            (inner.clone(), inner).prop_map(|(k, v)| format!("{{{k}: {v}}}")),
        ]
    })
}

/// Text over CEL's tokens, most of it not an expression.
fn cel_text() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        "[a-z_]{1,4}",
        "[0-9]{1,3}",
        Just(" ".to_owned()),
        Just(".".to_owned()),
        Just("(".to_owned()),
        Just(")".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just(",".to_owned()),
        Just(":".to_owned()),
        Just("?".to_owned()),
        Just("'".to_owned()),
        Just("\"".to_owned()),
        Just("'''".to_owned()),
        Just("\\".to_owned()),
        Just("r'".to_owned()),
        Just("b'".to_owned()),
        Just("+".to_owned()),
        Just("-".to_owned()),
        Just("!".to_owned()),
        Just("==".to_owned()),
        Just("&&".to_owned()),
        Just("||".to_owned()),
        Just(".?".to_owned()),
        Just("[?".to_owned()),
        Just("0x".to_owned()),
        Just("1e".to_owned()),
        Just("u".to_owned()),
        Just(".map(".to_owned()),
        Just(".exists(".to_owned()),
        any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(token, 0..60).prop_map(|tokens| tokens.concat())
}

/// Checks `source` as a filter and evaluates it on `events` (see
/// [`properties::check_and_evaluate`]).
fn check_and_evaluate(source: &str, events: &[Value]) {
    let events: Vec<sonic_rs::Value> = events
        .iter()
        .map(|e| sonic_rs::from_str(&e.to_string()).unwrap())
        .collect();
    properties::check_and_evaluate(source, &events);
}

proptest! {
    // 32 cases a target in `cargo test`; `PROPTEST_CASES` for a long run.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(32)
    ))]

    #[test]
    fn grammatical_expressions_check_and_evaluate_without_panicking(
        source in expression(),
        events in proptest::collection::vec(event(), 1..4),
    ) {
        check_and_evaluate(&source, &events);
    }

    #[test]
    fn arbitrary_text_checks_and_evaluates_without_panicking(
        source in cel_text(),
        events in proptest::collection::vec(event(), 1..3),
    ) {
        check_and_evaluate(&source, &events);
    }
}

/// Cases the fuzzers found, kept as regressions.
#[test]
fn regressions() {
    let events = [
        json!({"n": 1, "x": 1.5, "s": "a", "b": true, "ts": 0, "tags": [1, "a"],
        "o": {"k": "v"}, "opt": null, "any": [[]]}),
    ];
    for source in ["tags.map(e, e)", "o.all(e, e == 'k')"] {
        check_and_evaluate(source, &events);
    }
}
