//! One problem found in a manifest, located: the file, line and column, the field
//! path, and a hint where the fix is obvious. `keystone-runtime check` prints
//! these as text or JSON; the fields and `kind` values are stable for tooling.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::check::ErrorKind;

/// What kind of problem a diagnostic is. Contract errors use their
/// [`ErrorKind`] in kebab case (`missing-field`, `order-not-guaranteed`, ...).
pub mod kinds {
    /// The file cannot be read.
    pub const IO: &str = "io";
    /// The YAML is malformed.
    pub const SYNTAX: &str = "syntax";
    /// The document breaks its CRD's schema (unknown field, wrong apiVersion or kind, ...).
    pub const SCHEMA: &str = "schema";
    /// A value does not read as its field's type (a malformed duration, an unknown
    /// enum value, a string for a number, a missing required field).
    pub const TYPE: &str = "type";
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Diagnostic {
    pub file: String,
    /// 1-based, counted from the start of the file (not of the document).
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// The field, as `spec.steps[2].dedup.key`; none for a syntax error.
    pub path: Option<String>,
    /// The step or sink the problem is about.
    pub step: Option<String>,
    /// See [`kinds`].
    pub kind: String,
    pub message: String,
    /// What to do about it, when that is obvious.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// Whether the file could not be read as manifests at all (exit status 2),
    /// as opposed to manifests that were read and are wrong (exit status 1).
    pub fn is_unreadable(&self) -> bool {
        self.kind == kinds::IO || self.kind == kinds::SYNTAX
    }

    /// A problem with a whole file, such as one that cannot be opened.
    pub fn file(file: impl Into<String>, kind: &str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            file: file.into(),
            line: 1,
            column: 1,
            path: None,
            step: None,
            kind: kind.to_owned(),
            message: message.into(),
            hint: None,
        }
    }

    /// The exit status for a set of diagnostics: 0 for none, 2 when a file could
    /// not be read, 1 otherwise.
    pub fn exit_status(diagnostics: &[Diagnostic]) -> i32 {
        if diagnostics.is_empty() {
            0
        } else if diagnostics.iter().any(Diagnostic::is_unreadable) {
            2
        } else {
            1
        }
    }
}

/// `file:line:column: path (step): message`, then `  hint: ...` on a line of its own.
impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        match (&self.path, &self.step) {
            (Some(path), Some(step)) => write!(f, "{path} ({step}): ")?,
            (Some(path), None) => write!(f, "{path}: ")?,
            (None, Some(step)) => write!(f, "({step}): ")?,
            (None, None) => {}
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

/// The stable name of a contract error kind: `MissingField` is `missing-field`.
pub fn contract_kind(kind: ErrorKind) -> String {
    let name = format!("{kind:?}");
    let mut kebab = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                kebab.push('-');
            }
            kebab.push(c.to_ascii_lowercase());
        } else {
            kebab.push(c);
        }
    }
    kebab
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diagnostic() -> Diagnostic {
        Diagnostic {
            file: "p.yaml".into(),
            line: 12,
            column: 7,
            path: Some("spec.steps[0].dedup.key".into()),
            step: Some("once".into()),
            kind: contract_kind(ErrorKind::MissingField),
            message: "needs field \"event_id\"".into(),
            hint: Some("add it to the source schema".into()),
        }
    }

    #[test]
    fn text_format() {
        assert_eq!(
            diagnostic().to_string(),
            "p.yaml:12:7: spec.steps[0].dedup.key (once): needs field \"event_id\"\n  hint: add it to the source schema"
        );
        let bare = Diagnostic::file("x.yaml", kinds::IO, "cannot read: gone");
        assert_eq!(bare.to_string(), "x.yaml:1:1: cannot read: gone");
    }

    #[test]
    fn json_fields_are_camel_case_and_always_present() {
        let json = serde_json::to_value(Diagnostic {
            hint: None,
            ..diagnostic()
        })
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "file": "p.yaml", "line": 12, "column": 7,
                "path": "spec.steps[0].dedup.key", "step": "once",
                "kind": "missing-field", "message": "needs field \"event_id\"", "hint": null
            })
        );
    }

    #[test]
    fn kinds_in_kebab_case() {
        assert_eq!(contract_kind(ErrorKind::TopicCycle), "topic-cycle");
        assert_eq!(
            contract_kind(ErrorKind::RepartitionNotAllowed),
            "repartition-not-allowed"
        );
    }

    #[test]
    fn exit_status() {
        let contract = diagnostic();
        let syntax = Diagnostic {
            kind: kinds::SYNTAX.into(),
            ..diagnostic()
        };
        assert_eq!(Diagnostic::exit_status(&[]), 0);
        assert_eq!(Diagnostic::exit_status(std::slice::from_ref(&contract)), 1);
        assert_eq!(Diagnostic::exit_status(&[contract, syntax]), 2);
    }
}
