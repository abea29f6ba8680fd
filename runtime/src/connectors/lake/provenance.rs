//! Which source records a lake holds: per input partition, runs of offsets.
//! Each staged epoch records its runs beside its files, so that after a
//! rollback the replayed events the lake already holds are not appended
//! again (the lake's side of `RestorePlan.suppress`).

use std::collections::BTreeMap;

/// Offsets per input partition, as sorted, disjoint, inclusive runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runs {
    partitions: BTreeMap<i32, Vec<(i64, i64)>>,
}

impl Runs {
    pub fn is_empty(&self) -> bool {
        self.partitions.is_empty()
    }

    pub fn clear(&mut self) {
        self.partitions.clear();
    }

    /// Takes one offset; offsets of a partition come in increasing order, so a
    /// run grows at its end.
    pub fn record(&mut self, partition: i32, offset: i64) {
        let runs = self.partitions.entry(partition).or_default();
        match runs.last_mut() {
            Some((_, last)) if offset == *last + 1 => *last = offset,
            Some((first, last)) if (*first..=*last).contains(&offset) => {}
            _ => runs.push((offset, offset)),
        }
    }

    pub fn contains(&self, partition: i32, offset: i64) -> bool {
        let Some(runs) = self.partitions.get(&partition) else {
            return false;
        };
        let after = runs.partition_point(|(first, _)| *first <= offset);
        after > 0 && runs[after - 1].1 >= offset
    }

    /// Each partition's runs: (partition, first offset, last offset, text).
    pub fn by_partition(&self) -> impl Iterator<Item = (i32, i64, i64, String)> + '_ {
        self.partitions.iter().filter_map(|(partition, runs)| {
            let first = runs.first()?.0;
            let last = runs.last()?.1;
            let text: Vec<String> = runs.iter().map(|(a, b)| format!("{a}-{b}")).collect();
            Some((*partition, first, last, text.join(",")))
        })
    }

    /// Adds the runs of one partition written by [`Runs::by_partition`], from
    /// offset `from` on; false when the text is not such runs.
    pub fn add_text(&mut self, partition: i32, text: &str, from: i64) -> bool {
        let mut parsed = Vec::new();
        for run in text.trim().split(',').filter(|r| !r.is_empty()) {
            let Some((a, b)) = run.split_once('-') else {
                return false;
            };
            let (Ok(a), Ok(b)) = (a.parse::<i64>(), b.parse::<i64>()) else {
                return false;
            };
            if a > b {
                return false;
            }
            if b >= from {
                parsed.push((a.max(from), b));
            }
        }
        let runs = self.partitions.entry(partition).or_default();
        runs.extend(parsed);
        runs.sort_unstable();
        // Merge overlapping or adjacent runs (epochs of a replay overlap).
        let mut merged: Vec<(i64, i64)> = Vec::with_capacity(runs.len());
        for &(a, b) in runs.iter() {
            match merged.last_mut() {
                Some((_, last)) if a <= *last + 1 => *last = (*last).max(b),
                _ => merged.push((a, b)),
            }
        }
        *runs = merged;
        true
    }

    /// How many offsets the runs hold.
    pub fn len(&self) -> u64 {
        self.partitions
            .values()
            .flatten()
            .map(|(a, b)| (b - a + 1) as u64)
            .sum()
    }
}

/// After a rollback: the source records a lake already holds, which the
/// replay skips (counting them), as `RestorePlan.suppress` asks.
#[derive(Default)]
pub struct Replay {
    delivered: Runs,
    suppressed: Option<prometheus::IntCounter>,
}

impl Replay {
    pub fn new(delivered: Runs, suppressed: prometheus::IntCounter) -> Replay {
        Replay {
            delivered,
            suppressed: Some(suppressed),
        }
    }

    /// Whether a replay is being filtered (`RestorePlan.suppress`).
    pub fn is_active(&self) -> bool {
        self.suppressed.is_some()
    }

    /// What the lake holds, read again (after epochs were published).
    pub fn renew(&mut self, delivered: Runs) {
        self.delivered = delivered;
    }

    /// How many source records the lake holds from the replay's start on.
    pub fn held(&self) -> u64 {
        self.delivered.len()
    }

    /// Whether the event from `source` is one the lake holds (then counted).
    pub fn skips(&self, source: Option<crate::event::Provenance>) -> bool {
        let held = source.is_some_and(|s| self.delivered.contains(s.partition, s.offset));
        if held && let Some(counter) = &self.suppressed {
            counter.inc();
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_grow_and_answer_membership() {
        let mut runs = Runs::default();
        for offset in [3, 4, 5, 9, 10, 12] {
            runs.record(0, offset);
        }
        runs.record(1, 7);
        let text: Vec<_> = runs.by_partition().collect();
        assert_eq!(
            text,
            [
                (0, 3, 12, "3-5,9-10,12-12".to_owned()),
                (1, 7, 7, "7-7".to_owned())
            ]
        );
        assert!(runs.contains(0, 4) && runs.contains(0, 12) && runs.contains(1, 7));
        assert!(!runs.contains(0, 6) && !runs.contains(0, 2) && !runs.contains(2, 4));
        assert_eq!(runs.len(), 7);
    }

    #[test]
    fn text_from_an_offset_on_merges_with_what_is_there() {
        let mut runs = Runs::default();
        assert!(runs.add_text(0, "3-5,9-10,12-12", 4));
        assert!(runs.add_text(0, "6-8", 0));
        assert_eq!(runs.by_partition().next().unwrap().3, "4-10,12-12");
        assert!(!runs.contains(0, 3), "before the replay's start");
        assert!(!runs.add_text(0, "x-1", 0));
        assert!(!runs.add_text(0, "5-4", 0));
    }
}
