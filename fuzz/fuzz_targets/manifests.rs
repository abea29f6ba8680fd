//! Any text as a manifest file: read, validated as the API server would,
//! checked and compiled without a panic; every diagnostic lies in the file,
//! every plan serializes and reads back equal, and compiling is a function of
//! the manifests.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../crds/tests/properties/manifests.rs"]
mod properties;

fuzz_target!(|bytes: &[u8]| properties::read_and_check(&String::from_utf8_lossy(bytes)));
