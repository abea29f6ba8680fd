//! Any text as a manifest file: read, validated as the API server would,
//! checked and compiled without a panic; every diagnostic lies in the file,
//! every plan serializes and reads back equal, and compiling is a function of
//! the manifests.
#![no_main]

use keystone_crds::manifest::{self, Reading};
use keystone_crds::{Plan, compile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let text = String::from_utf8_lossy(bytes);
    let reading = Reading::parse("fuzz.yaml", &text);
    // Lines as YAML counts them: `\r\n`, `\r` and `\n` each end one.
    let lines = text
        .replace("\r\n", "\n")
        .replace('\r', "\n")
        .lines()
        .count()
        .max(1)
        + 1;
    let checked = manifest::check(&reading);
    for diagnostic in &checked.diagnostics {
        assert!(
            diagnostic.line >= 1 && diagnostic.line <= lines && diagnostic.column >= 1,
            "{diagnostic:?} is outside the file of {lines} lines"
        );
        assert!(!diagnostic.message.is_empty(), "{diagnostic:?}");
    }
    for plan in &checked.plans {
        let json = serde_json::to_string(plan).expect("a plan serializes");
        let back: Plan = serde_json::from_str(&json).expect("a plan reads back");
        assert_eq!(&back, plan);
    }
    for pipeline in &reading.manifests.pipelines {
        let first = compile(pipeline, &reading.manifests.processors);
        let second = compile(pipeline, &reading.manifests.processors);
        assert_eq!(first, second);
    }
});
