//! A CEL expression (the input up to its first newline) as a pipeline's
//! filter over a typed source schema, and an event (the rest): the checker
//! never panics; what it accepts the runtime compiles, and evaluating it on
//! the event (when the event parses) returns a value or an error.
#![no_main]

use keystone_crds::{Pipeline, compile};
use keystone_runtime::event::Event;
use keystone_runtime::expr::{Bindings, Expr};
use libfuzzer_sys::fuzz_target;

fn pipeline(expression: &str) -> Pipeline {
    serde_json::from_value(serde_json::json!({
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

fuzz_target!(|bytes: &[u8]| {
    let split = bytes.iter().position(|&b| b == b'\n').unwrap_or(bytes.len());
    let source = String::from_utf8_lossy(&bytes[..split]);
    let event = bytes.get(split + 1..).unwrap_or_default();
    let checked = compile(&pipeline(&source), &[]);
    let runtime = Expr::compile(&source);
    if checked.is_err() {
        return;
    }
    let expr = runtime.unwrap_or_else(|e| panic!("{source}: checked, but {e}"));
    let Ok(event) = Event::parse(event.to_vec()) else {
        return;
    };
    let bindings = Bindings::new([&expr]);
    let _ = bindings.with_scope(&event.value, |scope| expr.execute(scope));
});
