//! What must hold for any record and any pointer or field path: shared by the
//! proptest target `runtime/tests/fuzz_event.rs` and the cargo-fuzz targets
//! `fuzz/fuzz_targets/event_parser.rs` and `pointers.rs`.

use keystone_runtime::event::{Event, FieldPath, Pointer};
use keystone_runtime::expr::{from_cel, to_cel};
use sonic_rs::{JsonValueTrait, Value};

/// Every parse result is a clear Ok or Err; what parses writes back to text
/// that parses to the same document, and every walk over it is safe.
pub fn check_any(bytes: &[u8]) {
    match Event::parse(bytes.to_vec()) {
        Ok(event) => {
            assert_eq!(event.raw, bytes);
            assert!(event.value.is_object());
            let mut line = Vec::new();
            event.write_json_line(&mut line);
            let again = Event::parse(line[..line.len() - 1].to_vec())
                .unwrap_or_else(|(_, reason)| panic!("the written event does not parse: {reason}"));
            assert_eq!(again.value, event.value);
            let _ = from_cel(&to_cel(&event.value));
        }
        Err((raw, reason)) => {
            assert_eq!(raw, bytes);
            assert!(!reason.is_empty());
        }
    }
}

/// `text` as a pointer (if it is one) and as a field path against the
/// document in `document` (an empty object if it is none): reading is safe,
/// and a field path reads back what it set.
pub fn check_pointer_and_path(text: &str, document: &[u8]) {
    let mut value = match Event::parse(document.to_vec()) {
        Ok(event) => event.value,
        Err(_) => sonic_rs::from_str("{}").expect("an empty object"),
    };
    if let Some(pointer) = Pointer::parse(text) {
        let _ = pointer.get(&value);
    }
    let path = FieldPath::new(text);
    let _ = path.get(&value);
    path.set(&mut value, Value::from(true));
    assert_eq!(
        path.get(&value).and_then(|v| v.as_bool()),
        Some(true),
        "{text:?}"
    );
}
