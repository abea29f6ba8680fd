//! A CEL expression (the input up to its first newline) as a pipeline's
//! filter over a typed source schema, and an event (the rest): the checker
//! never panics; what it accepts the runtime compiles, and evaluating it on
//! the event (when the event parses) returns a value or an error.
#![no_main]

use keystone_runtime::event::Event;
use libfuzzer_sys::fuzz_target;

#[path = "../../runtime/tests/properties/cel.rs"]
mod properties;

fuzz_target!(|bytes: &[u8]| {
    let split = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    let source = String::from_utf8_lossy(&bytes[..split]);
    let events: Vec<_> = Event::parse(bytes.get(split + 1..).unwrap_or_default().to_vec())
        .map(|event| event.value)
        .into_iter()
        .collect();
    properties::check_and_evaluate(&source, &events);
});
