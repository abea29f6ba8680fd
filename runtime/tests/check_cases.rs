//! `keystone-runtime check` on broken manifests, one per file under `tests/check/`.
//!
//! Each file starts with comment lines that say what `check` must answer:
//! `# expect-exit: N` and, for every error it must find, `# expect: PATH @ LINE`
//! (`-` for a syntax error, which has no field path). Every expected error must
//! be among the diagnostics of `check --output json`; a file expecting exit 0
//! must get none. The human-readable output is pinned in `NAME.out` beside it:
//! `BLESS=1 cargo test -p keystone-runtime --test check_cases` rewrites those.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

struct Expected {
    exit: i32,
    errors: Vec<(String, u64)>,
}

fn expected(text: &str, file: &Path) -> Expected {
    let mut exit = None;
    let mut errors = Vec::new();
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        if let Some(code) = line.strip_prefix("# expect-exit: ") {
            exit = Some(code.trim().parse().expect("expect-exit is a number"));
        } else if let Some(rest) = line.strip_prefix("# expect: ") {
            let (path, at) = rest
                .rsplit_once(" @ ")
                .unwrap_or_else(|| panic!("{}: malformed {line:?}", file.display()));
            let path = if path == "-" { "" } else { path };
            errors.push((path.to_owned(), at.trim().parse().expect("a line number")));
        }
    }
    Expected {
        exit: exit.unwrap_or_else(|| panic!("{}: no # expect-exit", file.display())),
        errors,
    }
}

fn check(args: &[&str], file: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keystone-runtime"))
        .arg("check")
        .args(args)
        .arg(file)
        .output()
        .expect("keystone-runtime runs");
    (
        out.status.code().expect("exited, not killed by a signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The diagnostics of `--output json`: a JSON array, or an object holding one
/// under `diagnostics`.
fn diagnostics(stdout: &str) -> Vec<Value> {
    let value: Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("--output json printed no JSON ({e}): {stdout}"));
    match value {
        Value::Array(items) => items,
        Value::Object(mut object) => match object.remove("diagnostics") {
            Some(Value::Array(items)) => items,
            other => panic!("no diagnostics array: {other:?}"),
        },
        other => panic!("unexpected JSON: {other}"),
    }
}

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/check exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_broken_manifest_is_refused_at_its_field_and_line() {
    let files = cases();
    assert!(files.len() >= 60, "only {} cases", files.len());
    let bless = std::env::var_os("BLESS").is_some();
    let mut failures = Vec::new();
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(file).unwrap();
        let want = expected(&text, file);

        let (code, stdout, stderr) = check(&["--output", "json"], file);
        if code != want.exit {
            failures.push(format!(
                "{name}: exit {code}, expected {}\n{stdout}{stderr}",
                want.exit
            ));
            continue;
        }
        let found = diagnostics(&stdout);
        if want.exit == 0 && !found.is_empty() {
            failures.push(format!("{name}: expected no diagnostics, got {stdout}"));
        }
        for (path, line) in &want.errors {
            let hit = found.iter().any(|d| {
                d["path"].as_str().unwrap_or_default() == path
                    && d["line"].as_u64() == Some(*line)
                    && !d["message"].as_str().unwrap_or_default().is_empty()
            });
            if !hit {
                let seen: Vec<String> = found
                    .iter()
                    .map(|d| format!("{} @ {}: {}", d["path"], d["line"], d["message"]))
                    .collect();
                failures.push(format!(
                    "{name}: no diagnostic at {path} @ {line}; got:\n  {}",
                    seen.join("\n  ")
                ));
            }
        }

        // The human-readable answer, pinned: a change in wording is a visible decision.
        let (_, text_out, text_err) = check(&[], file);
        let shown = format!("{text_out}{text_err}")
            .replace(&file.display().to_string(), &format!("tests/check/{name}"));
        let golden = file.with_extension("out");
        if bless {
            std::fs::write(&golden, &shown).unwrap();
        } else {
            match std::fs::read_to_string(&golden) {
                Ok(pinned) if pinned == shown => {}
                Ok(pinned) => failures.push(format!(
                    "{name}: output differs from {}:\n--- pinned\n{pinned}--- now\n{shown}",
                    golden.display()
                )),
                Err(_) => failures.push(format!(
                    "{name}: no {} (BLESS=1 writes it)",
                    golden.display()
                )),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}
