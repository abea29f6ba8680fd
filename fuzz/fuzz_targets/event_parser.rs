//! Any bytes as a Kafka record's value: a clear Ok or Err, never a panic or a
//! stack overflow; what parses is written back to text that parses to the
//! same document, and converts to CEL and back.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../runtime/tests/properties/event.rs"]
#[allow(dead_code)]
mod properties;

fuzz_target!(|bytes: &[u8]| properties::check_any(bytes));
