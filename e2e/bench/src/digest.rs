//! Output digests. Every engine's output is compared with the reference by digest,
//! never by bytes: each line is parsed and re-serialized canonically (object keys
//! sorted, no whitespace, numbers as JSON numbers: an integral float such as `5.0`
//! is written `5`, since JSON has one number type), then hashed (SHA-256).
//!
//! - [`Mode::Multiset`]: the order of lines does not matter (S1, S2, S4): the digest
//!   is the hash of the sorted line hashes.
//! - [`Mode::PerKey`]: lines are grouped by a key field and each key's lines must
//!   come in the same order (S3): the digest is the hash of the sorted
//!   `(key, hash of that key's lines in order)` pairs. Order across keys is free.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::BufRead;

use anyhow::{Context, bail};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    Multiset,
    PerKey(String),
}

/// A digest and the number of lines it covers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputDigest {
    pub lines: u64,
    pub sha256: String,
}

/// Canonical JSON text of a value.
pub fn canonical(value: &Value) -> String {
    let mut out = String::with_capacity(256);
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => {
                let _ = write!(out, "{i}");
            }
            (None, Some(u), _) => {
                let _ = write!(out, "{u}");
            }
            (None, None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => {
                let _ = write!(out, "{}", f as i64);
            }
            _ => {
                let _ = write!(out, "{n}");
            }
        },
        Value::String(s) => out.push_str(&Value::String(s.clone()).to_string()),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
    }
}

/// Accumulates a digest line by line.
pub struct Digester {
    mode: Mode,
    lines: u64,
    hashes: Vec<[u8; 32]>,
    per_key: HashMap<String, Sha256>,
}

impl Digester {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            lines: 0,
            hashes: Vec::new(),
            per_key: HashMap::new(),
        }
    }

    pub fn add_value(&mut self, value: &Value) -> anyhow::Result<()> {
        let text = canonical(value);
        self.lines += 1;
        match &self.mode {
            Mode::Multiset => self.hashes.push(Sha256::digest(text.as_bytes()).into()),
            Mode::PerKey(field) => {
                let key = match value.get(field) {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => canonical(other),
                    None => bail!("output line without key field {field:?}: {text}"),
                };
                let h = self.per_key.entry(key).or_default();
                h.update(text.as_bytes());
                h.update(b"\n");
            }
        }
        Ok(())
    }

    pub fn add_line(&mut self, line: &str) -> anyhow::Result<()> {
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("output is not JSON: {line}"))?;
        self.add_value(&value)
    }

    pub fn finish(self) -> OutputDigest {
        let mut total = Sha256::new();
        match self.mode {
            Mode::Multiset => {
                let mut hashes = self.hashes;
                hashes.sort_unstable();
                for h in &hashes {
                    total.update(h);
                }
            }
            Mode::PerKey(_) => {
                let mut keys: Vec<(String, [u8; 32])> = self
                    .per_key
                    .into_iter()
                    .map(|(k, h)| (k, h.finalize().into()))
                    .collect();
                keys.sort_unstable();
                for (k, h) in &keys {
                    total.update(k.as_bytes());
                    total.update([0u8]);
                    total.update(h);
                }
            }
        }
        OutputDigest {
            lines: self.lines,
            sha256: hex(&total.finalize()),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Digests JSON-lines files (a peer with parallelism > 1 writes one file per subtask).
pub fn digest_files(paths: &[std::path::PathBuf], mode: Mode) -> anyhow::Result<OutputDigest> {
    let mut d = Digester::new(mode);
    for path in paths {
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        for line in std::io::BufReader::with_capacity(1 << 20, file).lines() {
            let line = line?;
            if !line.trim().is_empty() {
                d.add_line(&line)?;
            }
        }
    }
    Ok(d.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_form_sorts_keys_and_normalizes_numbers() {
        let a: Value = serde_json::from_str(r#"{"b":5.0,"a":{"y":[1,2.50],"x":"é\"q"}}"#).unwrap();
        let b = json!({"a": {"x": "é\"q", "y": [1, 2.5]}, "b": 5});
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(canonical(&b), r#"{"a":{"x":"é\"q","y":[1,2.5]},"b":5}"#);
    }

    #[test]
    fn multiset_ignores_order_and_per_key_does_not() {
        let lines = [
            r#"{"k":"a","v":1}"#,
            r#"{"k":"b","v":2}"#,
            r#"{"k":"a","v":3}"#,
        ];
        let run = |order: &[usize], mode: Mode| {
            let mut d = Digester::new(mode);
            for &i in order {
                d.add_line(lines[i]).unwrap();
            }
            d.finish()
        };
        assert_eq!(
            run(&[0, 1, 2], Mode::Multiset),
            run(&[2, 0, 1], Mode::Multiset)
        );
        let per_key = || Mode::PerKey("k".into());
        // Across keys the order is free; within key `a` it is not.
        assert_eq!(run(&[0, 1, 2], per_key()), run(&[1, 0, 2], per_key()));
        assert_ne!(run(&[0, 1, 2], per_key()), run(&[2, 1, 0], per_key()));
    }
}
