//! What must hold for any CEL expression: shared by the proptest target
//! `runtime/tests/fuzz_cel.rs` and the cargo-fuzz target `fuzz/fuzz_targets/cel.rs`.

use keystone_crds::{Pipeline, compile};
use keystone_runtime::expr::{Bindings, Expr};
use serde_json::json;

/// The source schema of the pipeline each expression filters.
pub fn pipeline(expression: &str) -> Pipeline {
    serde_json::from_value(json!({
        "apiVersion": "keystone.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": "fuzz", "namespace": "test"},
        "spec": {
            "source": {
                "topic": "in",
                "schema": {"fields": [
                    {"name": "n", "type": "integer"},
                    {"name": "x", "type": "number"},
                    {"name": "s", "type": "string"},
                    {"name": "b", "type": "boolean"},
                    {"name": "ts", "type": "timestamp"},
                    {"name": "tags", "type": "array"},
                    {"name": "o", "type": "object"},
                    {"name": "o.k", "type": "string"},
                    {"name": "opt", "type": "string", "optional": true},
                    {"name": "any", "type": "any"}
                ]}
            },
            "steps": [{"name": "f", "filter": {"expression": expression}}],
            "sinks": [{"name": "out", "kafka": {"topic": "out"}}]
        }
    }))
    .expect("the fuzz pipeline deserializes")
}

/// Checks `source` as a filter of [`pipeline`] and, when the checker accepts
/// it, compiles it in the runtime (which must succeed) and evaluates it on
/// `events` as the runtime does. Nothing may panic or overflow the stack.
pub fn check_and_evaluate(source: &str, events: &[sonic_rs::Value]) {
    let checked = compile(&pipeline(source), &[]);
    let runtime = Expr::compile(source);
    let Ok(_plan) = checked else {
        return;
    };
    // What the checker accepts, the runtime compiles.
    let expr = runtime.unwrap_or_else(|e| panic!("{source}: checked, but {e}"));
    let bindings = Bindings::new([&expr]);
    for event in events {
        let _ = bindings.with_scope(event, |scope| expr.execute(scope));
    }
}
