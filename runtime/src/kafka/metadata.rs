//! The metadata an instance writes with each committed input offset.
//!
//! Two facts travel there, `;`-separated (topic names cannot hold `;`, `=`,
//! `@` or `,`):
//!
//! - `keystone.restore=<id>`: the restore this partition has applied (every
//!   commit carries it while `--restore` is given).
//! - `keystone.changelog=<topic>@<position>,...` (at-least-once only): where
//!   each changelog partition of the input partition stood when the offset was
//!   committed. Under at-least-once a changelog record can be acknowledged while
//!   the output of the same event is not; the restart restores the state as of
//!   these positions (undoing later records with compensations), so the events
//!   read again are not taken for duplicates of themselves. Exactly-once needs
//!   none: the transaction commits the changelog with the offsets.
//! - `keystone.staged=<sink>:<epochs>+<epochs>,...`: the epochs each two-phase
//!   sink staged and had not published when the offset was committed (see
//!   `connectors::lake`); whoever reads the partition next publishes them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use keystone_crds::checkpoint::RESTORE_METADATA_PREFIX;

use crate::connectors::StagedEpochs;

const CHANGELOG_PREFIX: &str = "keystone.changelog=";
const STAGED_PREFIX: &str = "keystone.staged=";

/// Brokers' default `offset.metadata.max.bytes`.
const MAX_COMMIT_METADATA_BYTES: usize = 4096;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitMetadata {
    /// The id of the restore applied.
    pub restore: Option<String>,
    /// Changelog topic to the position (next offset) committed with the input offset.
    pub changelog: BTreeMap<String, i64>,
    /// Sink name to the epochs it staged and had not published.
    pub staged: BTreeMap<String, Vec<StagedEpochs>>,
}

impl CommitMetadata {
    /// Reads what it can: an unknown field or a malformed position is ignored, so
    /// metadata written by another version only loses what this one cannot read.
    pub fn parse(text: &str) -> Self {
        let mut metadata = Self::default();
        for field in text.split(';') {
            if let Some(id) = field.strip_prefix(RESTORE_METADATA_PREFIX) {
                metadata.restore = Some(id.to_owned());
            } else if let Some(positions) = field.strip_prefix(CHANGELOG_PREFIX) {
                for entry in positions.split(',') {
                    if let Some((topic, position)) = entry.rsplit_once('@')
                        && let Ok(position) = position.parse()
                    {
                        metadata.changelog.insert(topic.to_owned(), position);
                    }
                }
            } else if let Some(sinks) = field.strip_prefix(STAGED_PREFIX) {
                for entry in sinks.split(',') {
                    if let Some((sink, epochs)) = entry.split_once(':') {
                        let epochs: Vec<StagedEpochs> =
                            epochs.split('+').filter_map(StagedEpochs::parse).collect();
                        if !epochs.is_empty() {
                            metadata.staged.insert(sink.to_owned(), epochs);
                        }
                    }
                }
            }
        }
        metadata
    }

    /// The text to commit. Positions that would make it longer than brokers
    /// accept by default (`offset.metadata.max.bytes`, 4096) are left out, with a
    /// warning: the commit must not fail, and without them a restart restores the
    /// whole changelog (the behaviour before positions were recorded).
    pub fn encode_for_commit(&self) -> String {
        let text = self.encode();
        if text.len() <= MAX_COMMIT_METADATA_BYTES {
            return text;
        }
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                bytes = text.len(),
                "changelog positions do not fit in the offset metadata; not recorded"
            );
        }
        // Staged epochs must stay: without them a crash before publishing
        // would lose committed files. They are a few bytes a sink.
        Self {
            restore: self.restore.clone(),
            changelog: BTreeMap::new(),
            staged: self.staged.clone(),
        }
        .encode()
    }

    pub fn encode(&self) -> String {
        let mut fields = Vec::with_capacity(3);
        if let Some(id) = &self.restore {
            fields.push(format!("{RESTORE_METADATA_PREFIX}{id}"));
        }
        if !self.changelog.is_empty() {
            let positions: Vec<String> = self
                .changelog
                .iter()
                .map(|(topic, position)| format!("{topic}@{position}"))
                .collect();
            fields.push(format!("{CHANGELOG_PREFIX}{}", positions.join(",")));
        }
        if !self.staged.is_empty() {
            let sinks: Vec<String> = self
                .staged
                .iter()
                .map(|(sink, epochs)| {
                    let epochs: Vec<String> = epochs.iter().map(ToString::to_string).collect();
                    format!("{sink}:{}", epochs.join("+"))
                })
                .collect();
            fields.push(format!("{STAGED_PREFIX}{}", sinks.join(",")));
        }
        fields.join(";")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_marker_alone_reads_as_before() {
        let metadata = CommitMetadata::parse("keystone.restore=r1");
        assert_eq!(metadata.restore.as_deref(), Some("r1"));
        assert!(metadata.changelog.is_empty());
        assert_eq!(metadata.encode(), "keystone.restore=r1");
    }

    #[test]
    fn positions_and_marker_round_trip() {
        let metadata = CommitMetadata {
            restore: Some("r-2".to_owned()),
            changelog: BTreeMap::from([
                ("keystone.ns.p.changelog.a".to_owned(), 17),
                ("keystone.ns.p.changelog.b".to_owned(), 0),
            ]),
            staged: BTreeMap::new(),
        };
        let text = metadata.encode();
        assert_eq!(
            text,
            "keystone.restore=r-2;keystone.changelog=keystone.ns.p.changelog.a@17,keystone.ns.p.changelog.b@0"
        );
        assert_eq!(CommitMetadata::parse(&text), metadata);
    }

    #[test]
    fn positions_too_long_for_the_broker_are_left_out_and_the_marker_kept() {
        let topic = "t".repeat(249);
        let metadata = CommitMetadata {
            restore: Some("r1".to_owned()),
            changelog: (0..20).map(|n| (format!("{topic}{n}"), 1)).collect(),
            staged: BTreeMap::from([("lake".to_owned(), vec![epochs("ab12", 3, 4)])]),
        };
        assert!(metadata.encode().len() > MAX_COMMIT_METADATA_BYTES);
        assert_eq!(
            metadata.encode_for_commit(),
            "keystone.restore=r1;keystone.staged=lake:ab12.3-4"
        );
        let small = CommitMetadata {
            restore: None,
            changelog: BTreeMap::from([("log".to_owned(), 3)]),
            staged: BTreeMap::new(),
        };
        assert_eq!(small.encode_for_commit(), "keystone.changelog=log@3");
    }

    fn epochs(instance: &str, first: u64, last: u64) -> StagedEpochs {
        StagedEpochs {
            instance: instance.to_owned(),
            first,
            last,
        }
    }

    #[test]
    fn staged_epochs_of_each_sink_round_trip() {
        let metadata = CommitMetadata {
            restore: None,
            changelog: BTreeMap::new(),
            staged: BTreeMap::from([
                (
                    "lake".to_owned(),
                    vec![epochs("0a", 1, 1), epochs("ff01", 7, 9)],
                ),
                ("files".to_owned(), vec![epochs("b2", 2, 5)]),
            ]),
        };
        let text = metadata.encode();
        assert_eq!(text, "keystone.staged=files:b2.2-5,lake:0a.1-1+ff01.7-9");
        assert_eq!(CommitMetadata::parse(&text), metadata);
        let foreign = CommitMetadata::parse("keystone.staged=lake:zz.1-2+0a.3-1,files");
        assert!(foreign.staged.is_empty(), "{foreign:?}");
    }

    #[test]
    fn empty_unknown_and_malformed_metadata_carry_nothing() {
        assert_eq!(CommitMetadata::parse(""), CommitMetadata::default());
        assert_eq!(CommitMetadata::default().encode(), "");
        let metadata =
            CommitMetadata::parse("someone.else=1;keystone.changelog=a@x,b@5,c;keystone.future=2");
        assert_eq!(metadata.restore, None);
        assert_eq!(metadata.changelog, BTreeMap::from([("b".to_owned(), 5)]));
    }
}
