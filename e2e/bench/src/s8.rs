//! S8: memory. The runtime's part compares the peak RSS of Keystone's and Flink's
//! processes in S5's runs (S2's dedup state, on Kafka, at steady state: the whole
//! backlog drained); the operator's part is measured by `e2e/bench/s8-operator.sh`
//! (N Pipelines on a separate testbed instance) and recorded here.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::report::{Results, ScenarioResult, Stat};
use crate::scenario::Scenario;

#[derive(Debug, Args)]
pub struct S8Args {
    /// The JSON line `e2e/bench/s8-operator.sh` printed; once per run (for
    /// instance with 1,000 and with 10,000 Pipelines), each judged by the
    /// target for its number of Pipelines.
    #[arg(long, required = true)]
    pub operator_json: Vec<PathBuf>,
    /// Where RESULTS.md and RESULTS.json are; e2e/bench by default.
    #[arg(long)]
    pub results_dir: Option<PathBuf>,
}

pub fn record(args: &S8Args) -> anyhow::Result<()> {
    let dir = args
        .results_dir
        .clone()
        .unwrap_or_else(crate::runner::bench_dir);
    let mut results = Results::load_or_new(&dir.join("RESULTS.json"))?;
    let mut operator_runs = Vec::new();
    for path in &args.operator_json {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let line = text
            .lines()
            .rfind(|l| l.trim_start().starts_with('{'))
            .with_context(|| format!("no JSON line in {}", path.display()))?;
        operator_runs.push(serde_json::from_str::<serde_json::Value>(line)?);
    }
    operator_runs.sort_by_key(|op| op["pipelines"].as_u64().unwrap_or_default());
    let s5 = results
        .scenarios
        .iter()
        .find(|s| s.id == "S5")
        .context("S5 has no results: run `keystone-bench run --scenario S5` first")?;
    let rss = |engine: &str, round: usize| {
        s5.runs
            .iter()
            .find(|r| !r.warmup && r.digest_ok && r.engine == engine && r.round == round)
            .map(|r| r.peak_rss_mib)
    };
    let rounds: Vec<usize> = s5
        .runs
        .iter()
        .filter(|r| !r.warmup)
        .map(|r| r.round)
        .collect();
    let mut per_pair = Vec::new();
    for &round in &rounds {
        if let (Some(k), Some(f)) = (rss("keystone", round), rss("flink", round))
            && !per_pair.iter().any(|(r, _, _)| *r == round)
        {
            per_pair.push((round, k, f));
        }
    }
    let ratio = Stat::of(per_pair.iter().map(|(_, k, f)| k / f));
    let k_rss = Stat::of(per_pair.iter().map(|(_, k, _)| *k));
    let f_rss = Stat::of(per_pair.iter().map(|(_, _, f)| *f));
    let fmt = |s: &Option<Stat>, p: usize| match s {
        Some(s) => format!("{:.p$} ({:.p$}-{:.p$})", s.median, s.min, s.max),
        None => "-".into(),
    };
    let runtime_met = ratio.as_ref().is_some_and(|r| r.median <= 0.25);
    let operators: Vec<OperatorRun> = operator_runs.iter().map(OperatorRun::of).collect();
    let op_met = operators.iter().all(|op| op.met);
    let summary = format!(
        "runtime: Keystone / Flink peak RSS **{:.3}x** (target <= 0.25x: {}); {}",
        ratio.as_ref().map(|r| r.median).unwrap_or(f64::NAN),
        if runtime_met { "met" } else { "**missed**" },
        operators
            .iter()
            .map(|op| op.summary.as_str())
            .collect::<Vec<_>>()
            .join("; "),
    );
    let mut notes = format!(
        "Runtime RSS: peak RSS (GNU time, the whole process: for the JVM heap, metaspace, threads and native memory) of each engine in S5's measured runs, which hold S2's dedup state for the 399,775 distinct event ids of the whole backlog once it is drained (Kafka mode, the same process that serves a pipeline; see S5 for configs and load).\n\n\
| engine | peak RSS MiB, median (min-max) |\n|---|---|\n| keystone (`serve`) | {} |\n| flink (MiniCluster, heap state, -Xms2g -Xmx2g) | {} |\n| Keystone / Flink per pair | {} |\n\n\
Note that Flink's JVM was given a 2 GiB heap up front (-Xms2g, as in every scenario), so its RSS reflects the heap it was allowed rather than what S2's state needs; Keystone has no such setting.\n\n\
Operator: `e2e/bench/s8-operator.sh` (release build of keystone-operator) on a separate testbed instance (its own etcd, kube-apiserver and controller manager; its process kubelet stopped, so the pipelines' pods stay Pending and no runtime runs), N Pipelines applied at once (`kubectl apply --server-side`), all sharing one source, sink and dead-letter topic on the Kafka given to the script (created and deleted by it). Reconcile latency from the operator's `keystone_operator_reconcile_duration_seconds` histogram (quantiles interpolated within buckets as Prometheus' histogram_quantile does, buckets 0.01/0.05/0.1/0.25/0.5/1 s...). With the pods Pending every Pipeline stays `Provisioning`; the operator looks at a Pipeline again when its objects change (watches) and otherwise only for Kafka's drift check (every 300 s, spread ±10%), at most 8 reconciles at once, on the same two cores as the apiserver, etcd, the controller manager (which creates a ReplicaSet and a Pod per Pipeline meanwhile) and Kafka. The histograms count every reconcile of their phase (the edit phase: every reconcile during and after the edits, not only the edits').",
        fmt(&k_rss, 0),
        fmt(&f_rss, 0),
        per_pair
            .iter()
            .map(|(_, k, f)| format!("{:.3}", k / f))
            .collect::<Vec<_>>()
            .join(", "),
    );
    for op in &operators {
        notes.push_str("\n\n");
        notes.push_str(&op.table);
    }
    let mut result = ScenarioResult::not_measured(Scenario::S8);
    result.status = if runtime_met && op_met {
        "measured".into()
    } else {
        "measured (target missed)".into()
    };
    result.reason = summary;
    result.notes = Some(notes);
    result.loadavg_end = Some(crate::measure::loadavg());
    results.put(result);
    results.write(&dir)?;
    eprintln!("wrote {}", dir.join("RESULTS.md").display());
    Ok(())
}

/// One run of `s8-operator.sh`, judged by the target for its number of
/// Pipelines: at most 50 MB peak RSS up to 1,000, under 150 MiB at 10,000
/// (issue 18), and a reconcile p99 under 1 s either way.
struct OperatorRun {
    met: bool,
    summary: String,
    table: String,
}

impl OperatorRun {
    fn of(op: &serde_json::Value) -> Self {
        let num = |k: &str| op[k].as_f64().unwrap_or(f64::NAN);
        let pipelines = op["pipelines"].as_u64().unwrap_or_default();
        // 50 MB = 47.7 MiB.
        let (rss_limit_mib, rss_target) = if pipelines <= 1_000 {
            (50.0 / 1.048_576, "<= 50 MB")
        } else {
            (150.0, "< 150 MiB")
        };
        let peak = num("operator_peak_rss_mib");
        // The script lists Pipelines without a phase under an empty name.
        let phases = op["phases"].as_str().unwrap_or("?");
        let unphased = phases
            .split(',')
            .find_map(|p| p.strip_prefix(':'))
            .and_then(|n| n.parse::<u64>().ok());
        let phased_after = match unphased {
            Some(n) => format!(
                "not all: {n} had none when the script stopped waiting, after {:.1} s",
                num("all_phased_after_s")
            ),
            None => format!("{:.1} s", num("all_phased_after_s")),
        };
        let p99 = num("reconcile_p99_s").max(num("edit_reconcile_p99_s"));
        let met = peak <= rss_limit_mib && p99 < 1.0;
        let summary = format!(
            "operator with {pipelines} Pipelines: peak RSS **{peak:.1} MiB**, reconcile p50 {:.3} s, p99 **{:.3} s** while they are applied, p99 **{:.3} s** for edits at steady state (targets {rss_target} and < 1 s: {})",
            num("reconcile_p50_s"),
            num("reconcile_p99_s"),
            num("edit_reconcile_p99_s"),
            if met { "met" } else { "**missed**" },
        );
        let table = format!(
            "Operator with {pipelines} Pipelines (applied in {:.1} s):\n\n\
| measure | value |\n|---|---|\n| operator RSS before any Pipeline | {:.1} MiB |\n| operator RSS at steady state with {pipelines} Pipelines | {:.1} MiB |\n| operator peak RSS (VmHWM) | {peak:.1} MiB |\n| reconcile p50 / p99 while the {pipelines} Pipelines are applied ({} reconciles) | {:.3} s / {:.3} s |
| reconcile p50 / p99 of {} edits one after another at steady state ({} reconciles, {:.0} s) | {:.3} s / {:.3} s |
| operator RSS after the edits | {:.1} MiB |\n| every Pipeline had a phase after | {phased_after} |\n| phases | {phases} |\n| error lines in the operator's log | {} |\n\n\
Histogram (cumulative, end of the run): `{}`",
            num("apply_s"),
            num("operator_rss_idle_mib"),
            num("operator_rss_steady_mib"),
            op["reconciles"],
            num("reconcile_p50_s"),
            num("reconcile_p99_s"),
            op["edits"],
            op["edit_reconciles"],
            num("edit_s"),
            num("edit_reconcile_p50_s"),
            num("edit_reconcile_p99_s"),
            num("operator_rss_after_edits_mib"),
            op["operator_log_error_lines"],
            op["histogram"].as_str().unwrap_or("?"),
        );
        Self {
            met,
            summary,
            table,
        }
    }
}
