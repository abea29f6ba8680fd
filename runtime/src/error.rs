//! The runtime library's errors.

use std::path::PathBuf;

use keystone_crds::{ContractErrors, ManifestErrors};

use crate::state::StateError;

/// Everything that stops the runtime (as opposed to an event that fails, which
/// becomes a dead letter and never stops anything).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Problems in manifests, each located (one per line).
    #[error(transparent)]
    Manifest(#[from] ManifestErrors),
    #[error("{0}")]
    Contract(#[source] ContractErrors),
    #[error("{0}")]
    Usage(String),
    #[error("plan version {found} is not supported by this runtime (expected {expected})")]
    PlanVersion { found: u32, expected: u32 },
    #[error("step {step:?}: {message}")]
    InvalidStep { step: String, message: String },
    #[error("expression {expression:?} does not compile: {message}")]
    Expression { expression: String, message: String },
    #[error("table {table:?}, {file}:{line}: {message}")]
    Table {
        table: String,
        file: String,
        line: usize,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("step {step:?}: {source}")]
    State {
        step: String,
        #[source]
        source: StateError,
    },
}

impl RuntimeError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }

    /// A stable label for a failure counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RuntimeError::Manifest(_) => "manifest",
            RuntimeError::Contract(_) => "contract",
            RuntimeError::Usage(_) => "usage",
            RuntimeError::PlanVersion { .. } => "plan_version",
            RuntimeError::InvalidStep { .. } => "invalid_step",
            RuntimeError::Expression { .. } => "expression",
            RuntimeError::Table { .. } => "table",
            RuntimeError::Io { .. } => "io",
            RuntimeError::State { .. } => "state",
        }
    }

    /// The process exit status `keystone-runtime` uses for it: 1 for contract and
    /// schema errors, 2 for manifests and arguments that cannot be read, 3 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            RuntimeError::Contract(_) => 1,
            RuntimeError::Manifest(errors) => errors.exit_status(),
            RuntimeError::Usage(_) | RuntimeError::Table { .. } => 2,
            _ => 3,
        }
    }
}
