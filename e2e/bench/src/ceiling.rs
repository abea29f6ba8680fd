//! S5 and S6 as a fraction of the consume-produce ceiling measured in the same
//! run (issue 18): Keystone's events/s times the records it writes per input
//! event, over the records/s a plain rdkafka consume-produce loop reaches on the
//! same broker and input. The runner measures (runner/kafka_ceiling.rs); this is
//! the arithmetic and the report's text, which need no broker.

use serde::{Deserialize, Serialize};

use crate::report::{RunRecord, Stat};
use crate::scenario::Engine;

/// Keystone at this fraction of the ceiling or above (issue 18).
pub const TARGET: f64 = 0.8;

/// One round's measurements, on Keystone's run record of that round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CeilingRound {
    /// Records the plain loop copied (every record of the input topic).
    pub copied: Option<u64>,
    /// The loop's rate: records copied over the time from the first record
    /// consumed to the last one acknowledged.
    pub records_per_s: Option<f64>,
    /// Offsets Keystone's run took in the topics it wrote: the sum of their high
    /// watermarks (transaction markers included).
    pub offsets_written: Option<u64>,
    /// The data records among them (S5: every offset; S6: read back read_committed).
    pub records_written: Option<u64>,
    /// `records_written` over the input events.
    pub records_per_event: Option<f64>,
    /// Keystone events/s x `records_per_event` / `records_per_s`.
    pub fraction: Option<f64>,
    /// What could not be measured, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// Records written per input event; `None` without events.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub fn per_event(records: u64, events: u64) -> Option<f64> {
    (events > 0).then(|| records as f64 / events as f64)
}

/// The share of the ceiling's records/s that Keystone's rate in records is;
/// `None` unless every figure is a positive number.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub fn fraction(
    events_per_s: f64,
    records_per_event: f64,
    ceiling_records_per_s: f64,
) -> Option<f64> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    (positive(events_per_s) && positive(records_per_event) && positive(ceiling_records_per_s))
        .then(|| events_per_s * records_per_event / ceiling_records_per_s)
}

impl CeilingRound {
    /// Fills in the records per event and the fraction; `events_per_s` is
    /// Keystone's rate when its run was valid (no fraction otherwise).
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))]
    pub fn finish(&mut self, events: u64, events_per_s: Option<f64>) {
        self.records_per_event = self.records_written.and_then(|w| per_event(w, events));
        self.fraction = match (events_per_s, self.records_per_event, self.records_per_s) {
            (Some(eps), Some(rpe), Some(ceiling)) => fraction(eps, rpe, ceiling),
            _ => None,
        };
    }
}

/// A scenario's rounds against the ceiling.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CeilingSummary {
    pub target: f64,
    /// The median fraction reached the target in rounds that all gave one.
    pub met: bool,
    /// The loop's records/s over the measured rounds.
    pub records_per_s: Option<Stat>,
    /// Keystone's records written per input event, over its valid measured runs.
    pub records_per_event: Option<Stat>,
    pub fraction: Option<Stat>,
    /// In round order.
    pub fraction_per_round: Vec<f64>,
    /// Measured rounds without a fraction (Keystone's run or a measurement failed).
    pub failed_rounds: usize,
    /// How each figure was measured.
    pub how: String,
}

/// The summary of Keystone's measured (not warm-up) runs that carry a ceiling
/// round; `None` when none does (other scenarios, results from before issue 18).
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub fn summarize(runs: &[RunRecord], how: String) -> Option<CeilingSummary> {
    let keystone: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| !r.warmup && r.engine == Engine::Keystone.name())
        .collect();
    let rounds: Vec<(&RunRecord, &CeilingRound)> = keystone
        .iter()
        .filter_map(|r| Some((*r, r.ceiling.as_ref()?)))
        .collect();
    if rounds.is_empty() {
        return None;
    }
    let valid = || rounds.iter().filter(|(r, _)| r.digest_ok).map(|(_, c)| c);
    let fraction_per_round: Vec<f64> = valid().filter_map(|c| c.fraction).collect();
    let failed_rounds = keystone.len() - fraction_per_round.len();
    let fraction = Stat::of(fraction_per_round.iter().copied());
    Some(CeilingSummary {
        target: TARGET,
        met: failed_rounds == 0 && fraction.as_ref().is_some_and(|st| st.median >= TARGET),
        records_per_s: Stat::of(rounds.iter().filter_map(|(_, c)| c.records_per_s)),
        records_per_event: Stat::of(valid().filter_map(|c| c.records_per_event)),
        fraction,
        fraction_per_round,
        failed_rounds,
        how,
    })
}

/// How the runner measures, for the report (`exactly_once`: S6).
#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
pub fn how(exactly_once: bool, input_topic: &str) -> String {
    let written = if exactly_once {
        "the data records of every topic its plan created (sink, changelog, dead letters, repartition if any; all new per run), read back read_committed after the run, so that transaction markers and aborted records are not counted (the offsets with the markers are `offsets_written` in RESULTS.json)"
    } else {
        "the sum of the high watermarks of every topic its plan created (sink, changelog, dead letters, repartition if any; all new per run) after the run; its at-least-once producer is not transactional, so every offset is a data record"
    };
    format!(
        "Each round, just before Keystone's run, the runner's process ran `keystone-bench ceiling`'s loop: every record of `{input_topic}` consumed (a new group, from the earliest offset) and produced unchanged into a recreated 2-partition topic (acks=all, idempotent, linger 5 ms, lz4 as Keystone's producer; its consumer fetches again 10 ms after a full prefetch queue, as Keystone's and every reader of the harness do), timed from the first record consumed to the last acknowledged. Records written per input event: {written}, over the input events. Consumer offset commits are counted on neither side. Fraction = Keystone's events/s (drain time) x records per event / the loop's records/s of the same round; median over the measured rounds."
    )
}

fn range(st: &Stat, prec: usize) -> String {
    format!("{:.p$}-{:.p$}", st.min, st.max, p = prec)
}

fn verdict(c: &CeilingSummary) -> &'static str {
    if c.met { "met" } else { "**missed**" }
}

/// The line of the scenario's section in RESULTS.md.
pub fn section_line(c: &CeilingSummary) -> String {
    let ceiling = match &c.records_per_s {
        Some(st) => format!(
            "{:.0} records/s (median of {}; {})",
            st.median,
            st.n,
            range(st, 0)
        ),
        None => "not measured".into(),
    };
    let written = match &c.records_per_event {
        Some(st) => format!(
            "Keystone writes {:.2} records per input event ({})",
            st.median,
            range(st, 2)
        ),
        None => "Keystone's records per input event not measured".into(),
    };
    let at = match &c.fraction {
        Some(st) => format!(
            "Keystone at **{:.2}** of the ceiling (median of {} rounds; range {}; per round {})",
            st.median,
            st.n,
            range(st, 2),
            c.fraction_per_round
                .iter()
                .map(|f| format!("{f:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "Keystone's fraction of the ceiling not measured".into(),
    };
    let failed = if c.failed_rounds > 0 {
        format!(", {} measured round(s) without a fraction", c.failed_rounds)
    } else {
        String::new()
    };
    format!(
        "Consume-produce ceiling (plain rdkafka loop on the same broker and input, same run): {ceiling}; {written}; {at} (target >= {}: {}{failed}). {}",
        c.target,
        verdict(c),
        c.how
    )
}

/// The scenario's addition to the summary table's result text.
pub fn summary_text(c: &CeilingSummary) -> String {
    let met = if c.met {
        "(target met)"
    } else {
        "(**target missed**)"
    };
    match &c.fraction {
        Some(st) => format!(
            "ceiling fraction **{:.2}** ({}) {met}",
            st.median,
            range(st, 2)
        ),
        None => format!("ceiling fraction: not measured {met}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        round: usize,
        warmup: bool,
        engine: &str,
        eps: f64,
        c: Option<CeilingRound>,
    ) -> RunRecord {
        RunRecord {
            round,
            warmup,
            engine: engine.into(),
            wall_s: 5.0,
            engine_s: 4.0,
            time_basis: "drain".into(),
            cpu_s: 1.0,
            peak_rss_mib: 100.0,
            events_per_s: eps,
            cpu_s_per_m_events: 2.0,
            output: None,
            digest_ok: true,
            loadavg_1m: 1.0,
            error: None,
            latency_p50_ms: None,
            latency_p99_ms: None,
            search_cpu_s: None,
            search_actions: None,
            ceiling: c,
        }
    }

    fn round(copied_per_s: f64, written: u64) -> CeilingRound {
        CeilingRound {
            copied: Some(500_000),
            records_per_s: Some(copied_per_s),
            offsets_written: Some(written),
            records_written: Some(written),
            ..CeilingRound::default()
        }
    }

    #[test]
    fn the_fraction_is_keystones_records_per_second_over_the_ceilings() {
        // 100k events/s writing 1.6 records each is 160k records/s: 0.8 of 200k.
        let f = fraction(100_000.0, 1.6, 200_000.0).unwrap();
        assert!((f - 0.8).abs() < 1e-12, "{f}");
        assert_eq!(per_event(800_000, 500_000), Some(1.6));
        assert_eq!(per_event(1, 0), None);
        assert_eq!(fraction(0.0, 1.6, 200_000.0), None);
        assert_eq!(fraction(100_000.0, 1.6, 0.0), None);
        assert_eq!(fraction(f64::NAN, 1.6, 200_000.0), None);
        assert_eq!(fraction(100_000.0, 1.6, f64::INFINITY), None);
    }

    #[test]
    fn a_round_is_finished_from_what_was_measured() {
        let mut c = round(200_000.0, 800_000);
        c.finish(500_000, Some(115_000.0));
        assert_eq!(c.records_per_event, Some(1.6));
        assert!((c.fraction.unwrap() - 0.92).abs() < 1e-12);
        // A failed run (no valid rate) or a failed loop: no fraction.
        c.finish(500_000, None);
        assert_eq!(c.fraction, None);
        let mut c = round(200_000.0, 800_000);
        c.records_per_s = None;
        c.finish(500_000, Some(115_000.0));
        assert_eq!((c.records_per_event, c.fraction), (Some(1.6), None));
    }

    #[test]
    fn the_summary_takes_keystones_measured_rounds_only() {
        let mut rounds = Vec::new();
        for (i, (eps, ceiling)) in [
            (50_000.0, 100_000.0),
            (100_000.0, 200_000.0),
            (110_000.0, 200_000.0),
            (90_000.0, 200_000.0),
        ]
        .into_iter()
        .enumerate()
        {
            let mut c = round(ceiling, 800_000);
            c.finish(500_000, Some(eps));
            rounds.push(run(i, i == 0, "keystone", eps, Some(c)));
            rounds.push(run(i, i == 0, "flink", 60_000.0, None));
        }
        let s = summarize(&rounds, "how".into()).unwrap();
        assert_eq!(s.fraction_per_round.len(), 3);
        let f = s.fraction.as_ref().unwrap();
        assert!((f.median - 0.8).abs() < 1e-9 && (f.min - 0.72).abs() < 1e-9);
        assert!((f.max - 0.88).abs() < 1e-9);
        assert_eq!(s.records_per_s.as_ref().unwrap().n, 3);
        assert_eq!(s.failed_rounds, 0);
        assert!(s.met);
        // A measured Keystone run that failed its digest leaves its round without
        // a fraction: the target then counts as missed.
        rounds[2].digest_ok = false;
        let s = summarize(&rounds, "how".into()).unwrap();
        assert_eq!((s.failed_rounds, s.met), (1, false));
        // No ceiling round anywhere (S12, results from before): no summary.
        let none: Vec<RunRecord> = rounds
            .into_iter()
            .map(|mut r| {
                r.ceiling = None;
                r
            })
            .collect();
        assert!(summarize(&none, "how".into()).is_none());
    }

    #[test]
    fn the_texts_name_the_ceiling_the_factor_and_the_verdict() {
        let c = CeilingSummary {
            target: TARGET,
            met: false,
            records_per_s: Stat::of([198_000.0, 201_000.0, 204_000.0].into_iter()),
            records_per_event: Stat::of([1.6, 1.6, 1.6].into_iter()),
            fraction: Stat::of([0.9, 0.92, 0.95].into_iter()),
            fraction_per_round: vec![0.92, 0.9, 0.95],
            failed_rounds: 1,
            how: "Measured so.".into(),
        };
        let line = section_line(&c);
        assert!(
            line.starts_with(
                "Consume-produce ceiling (plain rdkafka loop on the same broker and input, same run): 201000 records/s (median of 3; 198000-204000); Keystone writes 1.60 records per input event (1.60-1.60); Keystone at **0.92** of the ceiling (median of 3 rounds; range 0.90-0.95; per round 0.92, 0.90, 0.95) (target >= 0.8: **missed**, 1 measured round(s) without a fraction). Measured so."
            ),
            "{line}"
        );
        assert_eq!(
            summary_text(&c),
            "ceiling fraction **0.92** (0.90-0.95) (**target missed**)"
        );
        let met = CeilingSummary {
            met: true,
            failed_rounds: 0,
            ..c
        };
        assert!(section_line(&met).contains("(target >= 0.8: met)"));
        assert!(summary_text(&met).ends_with("(target met)"));
    }
}
