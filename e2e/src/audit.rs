//! The fault tests' independent reader: given what reached a sink (a key and
//! a sequence number per event) and what was sent, it counts the events lost,
//! duplicated and out of order per key. It shares no code with the runtime,
//! so a bug in the runtime's bookkeeping cannot hide itself here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// What the sink must hold: per key, every sequence number `1..=last` once,
/// ascending.
#[derive(Clone, Debug, Default)]
pub struct Expected {
    last: BTreeMap<String, i64>,
}

impl Expected {
    /// Sequences `1..=seqs` for each key.
    pub fn uniform(keys: impl IntoIterator<Item = String>, seqs: i64) -> Self {
        Self {
            last: keys.into_iter().map(|k| (k, seqs)).collect(),
        }
    }

    /// Sequences `1..=last` for each `(key, last)`.
    pub fn from_last(last: impl IntoIterator<Item = (String, i64)>) -> Self {
        Self {
            last: last.into_iter().collect(),
        }
    }

    /// How many events the sink must hold.
    pub fn events(&self) -> usize {
        self.last.values().map(|&n| n.max(0) as usize).sum()
    }
}

/// The verdict on one sink's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Events the sink must hold.
    pub expected: usize,
    /// Events read from the sink.
    pub read: usize,
    /// Expected events that never arrived.
    pub lost: usize,
    /// Arrivals beyond the first of an event (and events nobody sent).
    pub duplicated: usize,
    /// Arrivals with a lower sequence than an earlier arrival of the same key.
    pub out_of_order: usize,
    /// A few examples of each problem, for the failure message.
    pub examples: Vec<String>,
    /// False when the sink keeps no arrival order (an index read back
    /// by id): `out_of_order` is then not measured.
    pub order_observable: bool,
}

const EXAMPLES: usize = 12;

impl Audit {
    /// Audits `arrivals`, in the order the sink holds them per key (for Kafka:
    /// partition order, which is per-key order when the key picks the partition).
    pub fn of(expected: &Expected, arrivals: impl IntoIterator<Item = (String, i64)>) -> Self {
        Self::count(expected, arrivals, true)
    }

    /// Audits what a sink holds in no particular order (documents of an
    /// index): losses and duplicates only.
    pub fn of_unordered(
        expected: &Expected,
        held: impl IntoIterator<Item = (String, i64)>,
    ) -> Self {
        Self::count(expected, held, false)
    }

    fn count(
        expected: &Expected,
        arrivals: impl IntoIterator<Item = (String, i64)>,
        order_observable: bool,
    ) -> Self {
        let mut audit = Audit {
            expected: expected.events(),
            order_observable,
            ..Audit::default()
        };
        let mut seen: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        let mut highest: BTreeMap<String, i64> = BTreeMap::new();
        for (key, seq) in arrivals {
            audit.read += 1;
            let sent = expected
                .last
                .get(&key)
                .is_some_and(|&last| (1..=last).contains(&seq));
            if !seen.entry(key.clone()).or_default().insert(seq) || !sent {
                audit.duplicated += 1;
                audit.example(|| {
                    if sent {
                        format!("{key} #{seq} arrived again")
                    } else {
                        format!("{key} #{seq} was never sent")
                    }
                });
            }
            let top = highest.entry(key.clone()).or_insert(i64::MIN);
            if seq < *top && order_observable {
                audit.out_of_order += 1;
                audit.example(|| format!("{key} #{seq} arrived after #{top}"));
            } else {
                *top = seq;
            }
        }
        for (key, &last) in &expected.last {
            let got = seen.get(key);
            let missing: Vec<i64> = (1..=last)
                .filter(|seq| !got.is_some_and(|s| s.contains(seq)))
                .collect();
            if !missing.is_empty() {
                audit.lost += missing.len();
                audit.example(|| format!("{key} lost {}", ranges(&missing)));
            }
        }
        audit
    }

    fn example(&mut self, describe: impl FnOnce() -> String) {
        if self.examples.len() < EXAMPLES {
            self.examples.push(describe());
        }
    }

    /// Nothing lost, duplicated or reordered.
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0
    }

    /// A row of `docs/RELIABILITY.md`'s table.
    pub fn row(&self, fault: &str, load: &str, instances: usize, recovery: Duration) -> String {
        let out_of_order = if self.order_observable {
            self.out_of_order.to_string()
        } else {
            "n/a (index)".to_owned()
        };
        format!(
            "| {fault} | {load} | {instances} | {} | {} | {} | {out_of_order} | {:.1} s |",
            self.read,
            self.lost,
            self.duplicated,
            recovery.as_secs_f64()
        )
    }
}

impl fmt::Display for Audit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} expected, {} read: {} lost, {} duplicated, {} out of order",
            self.expected, self.read, self.lost, self.duplicated, self.out_of_order
        )?;
        for example in &self.examples {
            write!(f, "\n  {example}")?;
        }
        Ok(())
    }
}

/// `1-3, 7` for `[1, 2, 3, 7]`.
fn ranges(sorted: &[i64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        out.push(if sorted[i] == start {
            format!("#{start}")
        } else {
            format!("#{start}-{}", sorted[i])
        });
        i += 1;
    }
    out.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrivals(list: &[(&str, i64)]) -> Vec<(String, i64)> {
        list.iter().map(|(k, s)| (k.to_string(), *s)).collect()
    }

    fn two_keys() -> Expected {
        Expected::uniform(["a".to_owned(), "b".to_owned()], 3)
    }

    #[test]
    fn a_complete_ordered_sink_is_clean() {
        let audit = Audit::of(
            &two_keys(),
            arrivals(&[("a", 1), ("b", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]),
        );
        assert!(audit.is_clean(), "{audit}");
        assert_eq!((audit.expected, audit.read), (6, 6));
    }

    #[test]
    fn losses_duplicates_and_reorderings_are_counted_per_key() {
        let audit = Audit::of(
            &two_keys(),
            arrivals(&[("a", 1), ("a", 3), ("a", 2), ("a", 3), ("b", 1), ("c", 1)]),
        );
        assert_eq!(audit.lost, 2, "{audit}"); // b #2 and #3
        assert_eq!(audit.duplicated, 2, "{audit}"); // a #3 again, c never sent
        assert_eq!(audit.out_of_order, 1, "{audit}"); // a #2 after #3
        assert!(!audit.is_clean());
        let text = audit.to_string();
        assert!(text.contains("b lost #2-3"), "{text}");
        assert!(text.contains("a #2 arrived after #3"), "{text}");
        assert!(text.contains("c #1 was never sent"), "{text}");
    }

    #[test]
    fn an_unordered_sink_is_audited_for_losses_and_duplicates_only() {
        let audit = Audit::of_unordered(
            &two_keys(),
            arrivals(&[("a", 3), ("a", 1), ("a", 2), ("b", 2), ("b", 1), ("b", 1)]),
        );
        assert_eq!(
            (audit.lost, audit.duplicated, audit.out_of_order),
            (1, 1, 0)
        );
        assert!(
            audit
                .row("f", "l", 1, Duration::ZERO)
                .contains("n/a (index)")
        );
    }

    #[test]
    fn an_empty_sink_loses_everything() {
        let audit = Audit::of(&two_keys(), Vec::new());
        assert_eq!((audit.lost, audit.read), (6, 0));
    }

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "#1-3, #7, #9-10");
    }
}
