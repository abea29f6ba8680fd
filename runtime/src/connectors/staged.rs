//! The epochs a two-phase sink has staged and not yet published, as the host
//! commits them in the offset metadata (see [`super::lake`]). Outside the
//! lake module because the host reads them from every commit, whether or not
//! the binary has the lake sinks.

use std::fmt;
use std::ops::RangeInclusive;

/// A sink instance's staged, unpublished epochs: `<instance>.<first>-<last>`
/// in the offset metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StagedEpochs {
    /// The sink instance's id (hex).
    pub instance: String,
    pub first: u64,
    pub last: u64,
}

impl StagedEpochs {
    pub fn epochs(&self) -> RangeInclusive<u64> {
        self.first..=self.last
    }

    /// Reads a marker; `None` for text this version did not write.
    pub fn parse(text: &str) -> Option<StagedEpochs> {
        let (instance, range) = text.split_once('.')?;
        let (first, last) = range.split_once('-')?;
        let (first, last) = (first.parse().ok()?, last.parse().ok()?);
        let valid = !instance.is_empty()
            && instance.chars().all(|c| c.is_ascii_hexdigit())
            && first <= last;
        valid.then(|| StagedEpochs {
            instance: instance.to_owned(),
            first,
            last,
        })
    }
}

impl fmt::Display for StagedEpochs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}-{}", self.instance, self.first, self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_and_refuse_foreign_text() {
        let marker = StagedEpochs {
            instance: "0a1b2c3d4e5f".into(),
            first: 3,
            last: 7,
        };
        assert_eq!(marker.to_string(), "0a1b2c3d4e5f.3-7");
        assert_eq!(StagedEpochs::parse("0a1b2c3d4e5f.3-7"), Some(marker));
        for foreign in ["", "x.1-2", "ab.2-1", "ab.1", "ab1-2", "ab.-1-2"] {
            assert_eq!(StagedEpochs::parse(foreign), None, "{foreign:?}");
        }
    }
}
