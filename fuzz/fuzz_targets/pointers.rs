//! A JSON pointer or dotted field path (the input up to its first newline)
//! against a document (the rest): reading is safe whatever either holds, and
//! a field path reads back what it set.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../runtime/tests/properties/event.rs"]
#[allow(dead_code)]
mod properties;

fuzz_target!(|bytes: &[u8]| {
    let split = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..split]);
    let document = bytes.get(split + 1..).unwrap_or_default();
    properties::check_pointer_and_path(&text, document);
});
