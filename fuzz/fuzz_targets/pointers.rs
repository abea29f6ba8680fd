//! A JSON pointer or dotted field path (the input up to its first newline)
//! against a document (the rest): reading is safe whatever either holds, and
//! a field path reads back what it set.
#![no_main]

use keystone_runtime::event::{Event, FieldPath, Pointer};
use libfuzzer_sys::fuzz_target;
use sonic_rs::{JsonValueTrait, Value};

fuzz_target!(|bytes: &[u8]| {
    let split = bytes.iter().position(|&b| b == b'\n').unwrap_or(bytes.len());
    let text = String::from_utf8_lossy(&bytes[..split]);
    let document = bytes.get(split + 1..).unwrap_or_default();
    let mut value = match Event::parse(document.to_vec()) {
        Ok(event) => event.value,
        Err(_) => sonic_rs::from_str("{}").expect("an empty object"),
    };
    if let Some(pointer) = Pointer::parse(&text) {
        let _ = pointer.get(&value);
    }
    let path = FieldPath::new(&text);
    let _ = path.get(&value);
    path.set(&mut value, Value::from(true));
    assert_eq!(path.get(&value).and_then(|v| v.as_bool()), Some(true), "{text:?}");
});
