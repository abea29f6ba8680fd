//! The properties every manifest file must have, whatever its bytes: shared by
//! the proptest target `crds/tests/fuzz_manifests.rs` and the cargo-fuzz target
//! `fuzz/fuzz_targets/manifests.rs`.

use keystone_crds::manifest::{self, Reading};
use keystone_crds::{Plan, compile};

/// Reads and checks `text`: the properties every input must have.
pub fn read_and_check(text: &str) {
    let reading = Reading::parse("fuzz.yaml", text);
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
    // Every plan the checker accepts is one the runtime can read, and the
    // compiler is a function of the manifests.
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
}
