//! Any bytes as a Kafka record's value: a clear Ok or Err, never a panic or a
//! stack overflow; what parses is written back to text that parses to the
//! same document, and converts to CEL and back.
#![no_main]

use keystone_runtime::event::Event;
use keystone_runtime::expr::{from_cel, to_cel};
use libfuzzer_sys::fuzz_target;
use sonic_rs::JsonValueTrait as _;

fuzz_target!(|bytes: &[u8]| {
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
});
