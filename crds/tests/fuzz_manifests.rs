//! Fuzzing of manifest reading, the checker and the plan compiler (proptest, so
//! a bounded run is part of `cargo test` on stable Rust).
//!
//! Whatever the bytes, `Reading::parse` and `manifest::check` return
//! diagnostics, never panic, and place every diagnostic in the file; a plan
//! they accept serializes, reads back, and compiles again to the same plan.
//! Inputs are arbitrary text over YAML's punctuation, and the sample manifests
//! mutated line by line and value by value. `PROPTEST_CASES` sets how many
//! cases each target runs (docs/RELIABILITY.md records the long runs); every
//! crash found is kept below as a regression case.

use std::path::Path;

use keystone_crds::manifest::{self, Reading};
use proptest::prelude::*;

// Shared with the cargo-fuzz target `fuzz/fuzz_targets/manifests.rs`.
#[path = "properties/manifests.rs"]
mod properties;
use properties::read_and_check;

/// The sample manifests, each pipeline with the sample processors: real
/// manifests to mutate.
fn samples() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples");
    let processors = std::fs::read_to_string(dir.join("processors.yaml")).unwrap();
    let mut texts: Vec<String> = std::fs::read_dir(&dir)
        .expect("config/samples exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .filter(|path| !path.ends_with("processors.yaml"))
        .map(|path| std::fs::read_to_string(path).unwrap() + "---\n" + &processors)
        .collect();
    texts.sort();
    assert!(
        texts.len() >= 4,
        "expected the samples in {}",
        dir.display()
    );
    texts
}

/// Text over the characters that make YAML's structure, with some words.
fn yamlish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("\n".to_owned()),
        Just("  ".to_owned()),
        Just("- ".to_owned()),
        Just(": ".to_owned()),
        Just("---\n".to_owned()),
        Just("[".to_owned()),
        Just("]".to_owned()),
        Just("{".to_owned()),
        Just("}".to_owned()),
        Just(", ".to_owned()),
        Just("&a ".to_owned()),
        Just("*a".to_owned()),
        Just("!!str ".to_owned()),
        Just("|\n".to_owned()),
        Just("'".to_owned()),
        Just("\"".to_owned()),
        Just("#".to_owned()),
        Just("? ".to_owned()),
        Just("kind: Pipeline\n".to_owned()),
        Just("apiVersion: keystone.dev/v1alpha1\n".to_owned()),
        Just("spec:\n".to_owned()),
        "[a-z]{1,8}",
        "[0-9.e+-]{1,6}",
        any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..200).prop_map(|pieces| pieces.concat())
}

/// Values worth putting where a sample has a scalar.
const VALUES: &[&str] = &[
    "",
    "''",
    "null",
    "~",
    "-1",
    "0",
    "-0",
    "1e400",
    "18446744073709551616",
    "9223372036854775807",
    "true",
    "[]",
    "{}",
    "[[[[]]]]",
    "0s",
    "1x",
    "99999999999h",
    "'a b'",
    "\"\\u0000\"",
    "ümlaut",
    "x > 1",
    "'amount > '",
    "size(tags) > 0",
    "tags.exists(t, tags.exists(u, t == u))",
    "/a/b~1c",
    "/",
    "in",
    "Pipeline",
];

/// One change to a sample, by line.
#[derive(Clone, Debug)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    /// Replaces the value after the line's first `: ` or `- `.
    Value(usize, usize),
    /// Inserts a character at a fraction of the line.
    Insert(usize, u8, char),
    Indent(usize, bool),
    Swap(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Duplicate),
        (any::<usize>(), 0..VALUES.len()).prop_map(|(l, v)| Mutation::Value(l, v)),
        (
            any::<usize>(),
            any::<u8>(),
            prop_oneof![
                Just(':'),
                Just('-'),
                Just('['),
                Just('{'),
                Just(' '),
                Just('\''),
                Just('"'),
                Just('#'),
                Just('\t'),
                any::<char>()
            ]
        )
            .prop_map(|(l, at, c)| Mutation::Insert(l, at, c)),
        (any::<usize>(), any::<bool>()).prop_map(|(l, deeper)| Mutation::Indent(l, deeper)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for mutation in mutations {
        if lines.is_empty() {
            break;
        }
        let n = lines.len();
        match mutation {
            Mutation::Delete(l) => {
                lines.remove(l % n);
            }
            Mutation::Duplicate(l) => {
                let line = lines[l % n].clone();
                lines.insert(l % n, line);
            }
            Mutation::Value(l, v) => {
                let line = &mut lines[l % n];
                if let Some(at) = line.find(": ").or_else(|| line.find("- ")) {
                    line.truncate(at + 2);
                    line.push_str(VALUES[*v]);
                }
            }
            Mutation::Insert(l, at, c) => {
                let line = &mut lines[l % n];
                let chars: Vec<char> = line.chars().collect();
                let index = (*at as usize * (chars.len() + 1)) / 256;
                let mut edited: String = chars[..index].iter().collect();
                edited.push(*c);
                edited.extend(&chars[index..]);
                *line = edited;
            }
            Mutation::Indent(l, deeper) => {
                let line = &mut lines[l % n];
                if *deeper {
                    line.insert_str(0, "  ");
                } else if line.starts_with("  ") {
                    line.replace_range(..2, "");
                }
            }
            Mutation::Swap(a, b) => lines.swap(a % n, b % n),
        }
    }
    lines.join("\n") + "\n"
}

proptest! {
    // 32 cases a target in `cargo test`; `PROPTEST_CASES` for a long run.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(32)
    ))]

    #[test]
    fn arbitrary_text_is_read_without_panicking(text in yamlish()) {
        read_and_check(&text);
    }

    #[test]
    fn arbitrary_bytes_are_read_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        read_and_check(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn mutated_samples_are_checked_without_panicking(
        sample in any::<prop::sample::Index>(),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let samples = samples();
        let text = sample.get(&samples);
        read_and_check(&mutate(text, &mutations));
    }
}

/// Inputs the fuzzers found, kept as regressions.
#[test]
fn regressions() {
    // A lone carriage return ends a line in YAML (the diagnostic was on a line
    // the documents, cut by `\n`, did not have).
    read_and_check("\r\r\0");
    read_and_check("a: 1\r---\rb: [\r");
}

/// The samples, unmutated, are valid: the mutations start from real manifests.
#[test]
fn the_samples_are_accepted() {
    for text in samples() {
        let reading = Reading::parse("sample.yaml", &text);
        let checked = manifest::check(&reading);
        assert!(checked.diagnostics.is_empty(), "{:?}", checked.diagnostics);
        read_and_check(&text);
    }
}
