//! RESULTS.json (everything, every run) and RESULTS.md (the summary) in e2e/bench.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::digest::OutputDigest;
use crate::generate::Dataset;
use crate::measure::Limits;
use crate::runner::{FLINK_VERSION, KAFKA_STREAMS_VERSION, RunArgs};
use crate::scenario::{self, Scenario};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: impl Iterator<Item = f64>) -> Option<Stat> {
        let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// serde_json writes a NaN (a figure not measured) as `null`.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub round: usize,
    pub warmup: bool,
    pub engine: String,
    pub wall_s: f64,
    /// The time events/s is computed from: wall for Keystone, the job's net runtime
    /// (without JVM and MiniCluster start) for the JVM peers when they report it.
    pub engine_s: f64,
    pub time_basis: String,
    /// Not measured (NaN) is written as JSON `null` and read back as NaN.
    #[serde(deserialize_with = "nan_if_null")]
    pub cpu_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub peak_rss_mib: f64,
    pub events_per_s: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub cpu_s_per_m_events: f64,
    pub output: Option<OutputDigest>,
    pub digest_ok: bool,
    pub loadavg_1m: f64,
    pub error: Option<String>,
    /// S7: latency percentiles of the run, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99_ms: Option<f64>,
    /// S9: CPU seconds the OpenSearch process spent during the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_cpu_s: Option<f64>,
    /// S9: index actions the index answered (indexed + version conflicts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search_actions: Option<u64>,
    /// S5/S6, Keystone's runs: the round's consume-produce ceiling and the
    /// records the run wrote (absent in results from before issue 18).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<crate::ceiling::CeilingRound>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EngineSummary {
    pub engine: String,
    pub config: String,
    pub runs: usize,
    pub failed_runs: usize,
    pub time_basis: String,
    pub events_per_s: Option<Stat>,
    pub events_per_s_wall: Option<Stat>,
    pub cpu_s_per_m_events: Option<Stat>,
    pub peak_rss_mib: Option<Stat>,
    pub wall_s: Option<Stat>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RatioSummary {
    pub peer: String,
    pub target: Option<f64>,
    pub met: Option<bool>,
    pub failed_pairs: usize,
    /// Keystone events/s over the peer's, per pair of runs of the same round.
    pub events_per_s_per_pair: Vec<f64>,
    pub events_per_s: Option<Stat>,
    /// The peer's wall time over Keystone's (JVM start included).
    pub wall_ratio: Option<Stat>,
    /// The peer's CPU-seconds per million events over Keystone's (process totals).
    pub cpu_ratio: Option<Stat>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputInfo {
    pub path: String,
    pub events: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScenarioResult {
    pub id: String,
    pub title: String,
    pub target: String,
    /// `measured`, `failed` or `not measured yet`.
    pub status: String,
    pub reason: String,
    pub input: Option<InputInfo>,
    pub pipeline: Option<String>,
    /// The keystone-runtime binary this scenario ran (scenarios may be re-run alone).
    #[serde(default)]
    pub runtime_bin: Option<String>,
    pub reference: Option<OutputDigest>,
    pub loadavg_start: Option<f64>,
    pub loadavg_end: Option<f64>,
    pub engines: Vec<EngineSummary>,
    pub ratios: Vec<RatioSummary>,
    pub startup: Vec<RunRecord>,
    pub runs: Vec<RunRecord>,
    /// Measurements that are not runs of engines side by side (S8), as markdown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// S5/S6: Keystone as a fraction of the consume-produce ceiling of the same run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<crate::ceiling::CeilingSummary>,
}

impl ScenarioResult {
    pub fn not_measured(s: Scenario) -> ScenarioResult {
        ScenarioResult {
            id: s.id().into(),
            title: s.title().into(),
            target: s.target_text().into(),
            status: "not measured yet".into(),
            reason: s.not_measured_reason().into(),
            input: None,
            pipeline: None,
            runtime_bin: None,
            reference: None,
            loadavg_start: None,
            loadavg_end: None,
            engines: Vec::new(),
            ratios: Vec::new(),
            startup: Vec::new(),
            runs: Vec::new(),
            notes: None,
            ceiling: None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Results {
    pub generated_at: String,
    pub command: String,
    pub machine: serde_json::Value,
    pub versions: serde_json::Value,
    pub limits: serde_json::Value,
    pub input: serde_json::Value,
    pub scenarios: Vec<ScenarioResult>,
}

fn sh(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).trim().to_owned();
            if s.is_empty() {
                s = String::from_utf8_lossy(&o.stderr).trim().to_owned();
            }
            s
        })
        .unwrap_or_default()
}

/// S1 < S2 < ... < S10: scenarios in their numeric order.
fn scenario_number(id: &str) -> u32 {
    id.trim_start_matches('S').parse().unwrap_or(u32::MAX)
}

impl Results {
    /// The previous results, so that scenarios not run keep theirs.
    pub fn load_or_new(path: &Path) -> anyhow::Result<Results> {
        match std::fs::read_to_string(path) {
            Err(_) => Ok(Results::default()),
            Ok(text) => {
                let mut results: Results = serde_json::from_str(&text).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot read the previous results in {}: {e}; move the file away to start afresh",
                        path.display()
                    )
                })?;
                results.scenarios.sort_by_key(|s| scenario_number(&s.id));
                Ok(results)
            }
        }
    }

    pub fn put(&mut self, result: ScenarioResult) {
        self.scenarios.retain(|s| s.id != result.id);
        self.scenarios.push(result);
        self.scenarios.sort_by_key(|s| scenario_number(&s.id));
        for s in scenario::ALL {
            if !self.scenarios.iter().any(|r| r.id == s.id()) {
                self.scenarios.push(ScenarioResult::not_measured(s));
            }
        }
        self.scenarios.sort_by_key(|s| scenario_number(&s.id));
    }

    pub fn stamp(&mut self, args: &RunArgs, data: &Dataset, limits: &Limits) {
        self.generated_at = sh("date -u +%Y-%m-%dT%H:%M:%SZ");
        self.command = std::env::args().collect::<Vec<_>>().join(" ");
        let repo = crate::runner::repo_dir();
        let git = |c: &str| sh(&format!("cd '{}' && {c}", repo.display()));
        self.machine = serde_json::json!({
            "cpu_model": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
            "cores": sh("nproc"),
            "memory": sh("grep MemTotal /proc/meminfo | tr -s ' '"),
            "kernel": sh("uname -r"),
            "uptime_at_end": sh("uptime"),
            "note": "2-core machine shared with other builds while measuring: see the load averages per scenario and per run",
        });
        self.versions = serde_json::json!({
            "keystone_git": git("git rev-parse --short HEAD"),
            "keystone_worktree_dirty": !git("git status --porcelain -- runtime crds").is_empty(),
            "rustc": sh("rustc -V"),
            "java": sh("java -version 2>&1 | head -2 | tr '\\n' ' '"),
            "flink": FLINK_VERSION,
            "kafka_streams": KAFKA_STREAMS_VERSION,
            "jackson": "2.21.3",
            "runtime_bin": args.runtime_bin.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "target/release/keystone-runtime".into()),
        });
        self.limits = serde_json::json!({
            "cpus": limits.cpus,
            "mem_limit_mib": limits.mem_limit_mib,
            "how": limits.how,
            "jvm_heap": args.jvm_heap,
            "parallelism": args.parallelism,
            "runs": args.runs,
            "warmup": args.warmup,
        });
        self.input = serde_json::to_value(&data.config).unwrap_or_default();
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::write(
            dir.join("RESULTS.json"),
            serde_json::to_string_pretty(self)? + "\n",
        )?;
        std::fs::write(dir.join("RESULTS.md"), self.markdown())?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Keystone benchmarks: results\n");
        let _ = writeln!(
            md,
            "Last written {} by `{}` (scenarios not run then keep earlier results; each names its runtime binary and load; regenerate S1-S7 with `target/release/keystone-bench run --scenario all` (runner built with `--features kafka`, testbed Kafka up) and S8 with `e2e/bench/s8-operator.sh` + `keystone-bench s8`, see README.md). Protocol: `shared/BENCHMARKS.md`; harness and semantics: [README.md](README.md); every run: [RESULTS.json](RESULTS.json); where Keystone misses a target and why (profiles): [ANALYSIS.md](ANALYSIS.md).\n",
            self.generated_at,
            self.command
                .replace(&format!("{}/", crate::runner::repo_dir().display()), "")
        );
        let m = &self.machine;
        let v = &self.versions;
        let l = &self.limits;
        let _ = writeln!(
            md,
            "- Machine: {} x{} cores, {}; kernel {}. {}.",
            m["cpu_model"].as_str().unwrap_or("?").trim(),
            m["cores"].as_str().unwrap_or("?"),
            m["memory"].as_str().unwrap_or("?"),
            m["kernel"].as_str().unwrap_or("?"),
            m["note"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            md,
            "- Load at the end: `{}`.",
            m["uptime_at_end"].as_str().unwrap_or("?")
        );
        let _ = writeln!(
            md,
            "- Versions: Keystone work tree at {} (runtime/crds dirty: {}), runtime binary of the last invocation `{}` (each scenario names its own below), {}, {}, Flink {}, Kafka Streams {}, Jackson {}.",
            v["keystone_git"].as_str().unwrap_or("?"),
            v["keystone_worktree_dirty"],
            v["runtime_bin"].as_str().unwrap_or("?"),
            v["rustc"].as_str().unwrap_or("?"),
            v["java"].as_str().unwrap_or("?"),
            v["flink"].as_str().unwrap_or("?"),
            v["kafka_streams"].as_str().unwrap_or("?"),
            v["jackson"].as_str().unwrap_or("?")
        );
        let _ = writeln!(
            md,
            "- Limits: every engine pinned with `taskset -c {}`; memory: {}; JVM heap {}; parallelism {}; {} measured runs per engine after {} warm-up round(s), engines alternating within each round.",
            l["cpus"].as_str().unwrap_or("?"),
            l["how"].as_str().unwrap_or("?"),
            l["jvm_heap"].as_str().unwrap_or("?"),
            l["parallelism"],
            l["runs"],
            l["warmup"]
        );
        let _ = writeln!(
            md,
            "- Input (generator `keystone-bench gen`): {}.\n",
            self.input
        );
        let _ = writeln!(
            md,
            "events/s = input events / time; the time is Keystone's whole process wall time, but only the JVM peers' net job time (their JVM and MiniCluster start-up is left out, which favours the peers; the start-up on an empty input is listed per scenario). CPU-s/M = user+sys CPU seconds of the whole process per million input events (start-up included for every engine). Peak RSS of the process (GNU time). Ratios are Keystone over the peer for events/s, per pair of runs of the same round. Kafka mode (S5, S6, S12): the time of every engine is its drain time, from its first output record's broker append time to the moment the harness read the last expected one (read_committed), so start-up is left out for all engines alike; S7 reports latencies instead (see its section); S8 is recorded by `keystone-bench s8` (see README.md); S13 counts records acknowledged over HTTP against a plain producer's (see its section).\n"
        );

        let _ = writeln!(md, "## Summary\n");
        let _ = writeln!(
            md,
            "| # | scenario | target | status | Keystone / peer events/s, median (min-max) |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for s in &self.scenarios {
            let mut ratios = if s.ratios.is_empty() {
                s.reason.clone()
            } else {
                s.ratios
                    .iter()
                    .map(|r| {
                        let met = match r.met {
                            Some(true) => " (target met)",
                            Some(false) => " (**target missed**)",
                            None => "",
                        };
                        match &r.events_per_s {
                            Some(st) => format!(
                                "vs {}: **{:.2}x** ({:.2}-{:.2}){}",
                                r.peer, st.median, st.min, st.max, met
                            ),
                            None => format!("vs {}: no valid pair{}", r.peer, met),
                        }
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            if let Some(c) = &s.ceiling {
                let text = crate::ceiling::summary_text(c);
                // `--engines keystone` leaves no ratio before it.
                ratios = if ratios.is_empty() {
                    text
                } else {
                    format!("{ratios}; {text}")
                };
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                s.id, s.title, s.target, s.status, ratios
            );
        }
        md.push('\n');

        for s in &self.scenarios {
            let _ = writeln!(md, "## {}: {}\n", s.id, s.title);
            let _ = writeln!(
                md,
                "Target: {}. Status: **{}**.{}\n",
                s.target,
                s.status,
                if s.reason.is_empty() {
                    String::new()
                } else {
                    format!(" {}", s.reason)
                }
            );
            if let Some(notes) = &s.notes {
                let _ = writeln!(md, "{}\n", notes.trim_end());
            }
            let Some(input) = &s.input else {
                continue;
            };
            if s.id == "S7" {
                let _ = writeln!(
                    md,
                    "Input: the generated events in order, {} measured per run (a fresh input topic per run). Pipeline: `{}` (runtime `{}`). Load average (1 min) at start {:.2}, at end {:.2}. The engine table's events/s column holds the p99 latency in ms and the by-wall-time column the p50.\n",
                    input.events,
                    s.pipeline.as_deref().unwrap_or("-"),
                    s.runtime_bin.as_deref().unwrap_or("-"),
                    s.loadavg_start.unwrap_or(f64::NAN),
                    s.loadavg_end.unwrap_or(f64::NAN)
                );
            } else if s.id == "S13" {
                let _ = writeln!(
                    md,
                    "Input: the first {} generated events as request bodies ({:.1} MB), sent in turn; the plain producer writes the generated events in turn, as many as the endpoint took in the same round. Endpoint: `{}` (runtime `{}`). Load average (1 min) at start {:.2}, at end {:.2}. The engine table's events/s column holds records/s; p99 request latencies are in the notes above.\n",
                    input.events,
                    input.bytes as f64 / 1e6,
                    s.pipeline.as_deref().unwrap_or("-"),
                    s.runtime_bin.as_deref().unwrap_or("-"),
                    s.loadavg_start.unwrap_or(f64::NAN),
                    s.loadavg_end.unwrap_or(f64::NAN)
                );
            } else {
                let _ = writeln!(
                    md,
                    "Input: {} events, {:.1} MB ({}). Pipeline: `{}` (runtime `{}`). Reference output: {} lines, sha256 `{}`. Load average (1 min) at start {:.2}, at end {:.2}.\n",
                    input.events,
                    input.bytes as f64 / 1e6,
                    input
                        .path
                        .rsplit('/')
                        .take(2)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("/"),
                    s.pipeline.as_deref().unwrap_or("-"),
                    s.runtime_bin.as_deref().unwrap_or("-"),
                    s.reference.as_ref().map(|r| r.lines).unwrap_or(0),
                    s.reference.as_ref().map(|r| &r.sha256[..16]).unwrap_or("-"),
                    s.loadavg_start.unwrap_or(f64::NAN),
                    s.loadavg_end.unwrap_or(f64::NAN)
                );
            }
            let _ = writeln!(
                md,
                "| engine | events/s median (min-max) | time basis | events/s by wall time | CPU-s / M events | peak RSS MiB | wall s | runs ok |"
            );
            let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
            let f = |st: &Option<Stat>, prec: usize| match st {
                Some(st) => format!(
                    "{:.p$} ({:.p$}-{:.p$})",
                    st.median,
                    st.min,
                    st.max,
                    p = prec
                ),
                None => "-".into(),
            };
            for e in &s.engines {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} | {}/{} |",
                    e.engine,
                    f(&e.events_per_s, 0),
                    if e.time_basis.starts_with("job") {
                        "job"
                    } else if e.time_basis.starts_with("drain") {
                        "drain"
                    } else if e.time_basis.starts_with("latency") {
                        "p99 latency ms (median column); p50 in the wall-time column"
                    } else if let Some((basis, _)) = e.time_basis.split_once(':') {
                        // S9's "applied", S10's "commit", "publish" and "write".
                        basis
                    } else {
                        "wall"
                    },
                    f(&e.events_per_s_wall, 0),
                    f(&e.cpu_s_per_m_events, 2),
                    f(&e.peak_rss_mib, 0),
                    f(&e.wall_s, 2),
                    e.runs - e.failed_runs,
                    e.runs
                );
            }
            md.push('\n');
            if !s.ratios.is_empty() {
                let latency = s.id == "S7";
                let _ = writeln!(
                    md,
                    "| Keystone vs | {} ratio median (min-max) | per pair | target | wall-time ratio | CPU per event ratio |",
                    if latency { "p99 latency" } else { "events/s" }
                );
                let _ = writeln!(md, "|---|---|---|---|---|---|");
                for r in &s.ratios {
                    let pairs = r
                        .events_per_s_per_pair
                        .iter()
                        .map(|x| format!("{x:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} |",
                        r.peer,
                        f(&r.events_per_s, 2),
                        pairs,
                        match (r.target, r.met, latency) {
                            (Some(t), Some(true), false) => format!(">= {t}x: met"),
                            (Some(t), _, false) => format!(">= {t}x: **missed**"),
                            (Some(t), Some(true), true) => format!("<= {t}x: met"),
                            (Some(t), _, true) => format!("<= {t}x: **missed**"),
                            _ => "-".into(),
                        },
                        f(&r.wall_ratio, 2),
                        f(&r.cpu_ratio, 2)
                    );
                }
                md.push('\n');
            }
            if let Some(c) = &s.ceiling {
                let _ = writeln!(md, "{}\n", crate::ceiling::section_line(c));
            }
            if s.id == "S6"
                && let Some(s5) = self.scenarios.iter().find(|x| x.id == "S5")
            {
                let median = |r: &ScenarioResult, e: &str| {
                    r.engines
                        .iter()
                        .find(|x| x.engine == e)
                        .and_then(|x| x.events_per_s.as_ref())
                        .map(|st| st.median)
                };
                let lines: Vec<String> = s
                    .engines
                    .iter()
                    .filter_map(|e| {
                        let (eos, alo) = (median(s, &e.engine)?, median(s5, &e.engine)?);
                        Some(format!(
                            "{} {:.0} vs {:.0} events/s ({:+.1}%)",
                            e.engine,
                            eos,
                            alo,
                            (eos / alo - 1.0) * 100.0
                        ))
                    })
                    .collect();
                let _ = writeln!(
                    md,
                    "Exactly-once (S6) vs at-least-once (S5), medians (target: Keystone loses <= 15%): {}.\n",
                    lines.join("; ")
                );
            }
            if !s.startup.is_empty() {
                let parts: Vec<String> = s
                    .startup
                    .iter()
                    .map(|r| {
                        format!(
                            "{} {:.2} s wall, {:.2} CPU-s, {:.0} MiB",
                            r.engine, r.wall_s, r.cpu_s, r.peak_rss_mib
                        )
                    })
                    .collect();
                let _ = writeln!(md, "Start-up on an empty input: {}.\n", parts.join("; "));
            }
            let config: Vec<String> = s
                .engines
                .iter()
                .map(|e| format!("- {}: {}", e.engine, e.config))
                .collect();
            let _ = writeln!(md, "Configurations:\n\n{}\n", config.join("\n"));
            let failures: Vec<String> = s
                .runs
                .iter()
                .filter_map(|r| {
                    r.error.as_ref().map(|e| {
                        format!(
                            "- round {} {}: {}",
                            r.round,
                            r.engine,
                            e.lines().next().unwrap_or("")
                        )
                    })
                })
                .collect();
            if !failures.is_empty() {
                let _ = writeln!(md, "Failed runs:\n\n{}\n", failures.join("\n"));
            }
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_not_measured_survives_being_written_and_read_back() {
        let written = serde_json::json!({
            "round": 3, "warmup": false, "engine": "keystone-parquet",
            "wall_s": 18.9, "engine_s": 17.1, "time_basis": "publish",
            "cpu_s": f64::NAN, "peak_rss_mib": f64::NAN, "events_per_s": 109407.4,
            "cpu_s_per_m_events": f64::NAN, "output": null, "digest_ok": true,
            "loadavg_1m": 1.2, "error": null
        })
        .to_string();
        assert!(written.contains(r#""cpu_s":null"#), "{written}");
        let read: RunRecord = serde_json::from_str(&written).unwrap();
        assert!(read.cpu_s.is_nan() && read.peak_rss_mib.is_nan());
        assert!(read.cpu_s_per_m_events.is_nan());
        assert_eq!(read.events_per_s, 109407.4);
    }

    /// An S5 entry as RESULTS.json held it before issue 18 (trimmed): no
    /// `ceiling` on the scenario nor on its runs.
    const OLD_S5: &str = r#"{"id": "S5", "title": "Kafka -> parse, dedup, project -> Kafka, at-least-once", "target": ">= 3x Flink, >= 2x Kafka Streams", "status": "measured", "reason": "",
        "input": {"path": "/cache/data/v1/events.jsonl", "events": 500000, "bytes": 151608759},
        "pipeline": "e2e/bench/pipelines/s5-kafka-dedup-project.yaml", "runtime_bin": "/cache/keystone-runtime-9061d99",
        "reference": {"lines": 399775, "sha256": "23a1c30c4d0598daa93f8411805ab7600845e92414fb24601d04dc95f3a1a4f5"},
        "loadavg_start": 4.86, "loadavg_end": 6.25,
        "engines": [{"engine": "keystone", "config": "cfg", "runs": 1, "failed_runs": 0, "time_basis": "drain: first output record appended",
            "events_per_s": {"median": 115500.1, "min": 107112.2, "max": 129132.2, "n": 5}, "events_per_s_wall": null,
            "cpu_s_per_m_events": null, "peak_rss_mib": null, "wall_s": null}],
        "ratios": [{"peer": "flink", "target": 3.0, "met": false, "failed_pairs": 0, "events_per_s_per_pair": [1.97],
            "events_per_s": {"median": 1.97, "min": 1.97, "max": 1.97, "n": 1}, "wall_ratio": null, "cpu_ratio": null}],
        "startup": [],
        "runs": [{"round": 2, "warmup": false, "engine": "keystone", "wall_s": 4.36, "engine_s": 3.87, "time_basis": "drain",
            "cpu_s": 2.04, "peak_rss_mib": 139.6, "events_per_s": 129132.2, "cpu_s_per_m_events": 4.08,
            "output": null, "digest_ok": true, "loadavg_1m": 4.3, "error": null}]}"#;

    fn with_s5(s5: ScenarioResult) -> Results {
        Results {
            scenarios: vec![s5],
            ..Results::default()
        }
    }

    #[test]
    fn an_entry_from_before_the_ceiling_fraction_renders_without_its_line() {
        let old: ScenarioResult = serde_json::from_str(OLD_S5).unwrap();
        assert!(old.ceiling.is_none() && old.runs[0].ceiling.is_none());
        let md = with_s5(old.clone()).markdown();
        assert!(md.contains("## S5: Kafka -> parse, dedup, project -> Kafka"));
        assert!(!md.contains("Consume-produce ceiling"), "{md}");
        assert!(!md.contains("ceiling fraction"), "{md}");
        // Written back, it still has no ceiling fields.
        let again = serde_json::to_string(&old).unwrap();
        assert!(!again.contains("ceiling"), "{again}");
    }

    #[test]
    fn the_ceiling_fraction_is_rendered_in_the_section_and_the_summary() {
        use crate::ceiling::{CeilingRound, CeilingSummary, TARGET};
        let mut s5: ScenarioResult = serde_json::from_str(OLD_S5).unwrap();
        let mut round = CeilingRound {
            copied: Some(500_000),
            records_per_s: Some(200_000.0),
            offsets_written: Some(800_000),
            records_written: Some(800_000),
            ..CeilingRound::default()
        };
        round.finish(500_000, Some(s5.runs[0].events_per_s));
        s5.runs[0].ceiling = Some(round);
        s5.ceiling = Some(CeilingSummary {
            target: TARGET,
            met: true,
            records_per_s: Stat::of([200_000.0].into_iter()),
            records_per_event: Stat::of([1.6].into_iter()),
            fraction: Stat::of([1.033].into_iter()),
            fraction_per_round: vec![1.033],
            failed_rounds: 0,
            how: "How it was measured.".into(),
        });
        // Through RESULTS.json and back, as `keystone-bench report` reads it.
        let text = serde_json::to_string_pretty(&with_s5(s5)).unwrap();
        let read: Results = serde_json::from_str(&text).unwrap();
        let round = read.scenarios[0].runs[0].ceiling.as_ref().unwrap();
        assert_eq!(round.records_per_event, Some(1.6));
        assert!((round.fraction.unwrap() - 129_132.2 * 1.6 / 200_000.0).abs() < 1e-9);
        let md = read.markdown();
        assert!(
            md.contains("vs flink: **1.97x** (1.97-1.97) (**target missed**); ceiling fraction **1.03** (1.03-1.03) (target met) |"),
            "{md}"
        );
        assert!(
            md.contains("\nConsume-produce ceiling (plain rdkafka loop on the same broker and input, same run): 200000 records/s (median of 1; 200000-200000); Keystone writes 1.60 records per input event (1.60-1.60); Keystone at **1.03** of the ceiling (median of 1 rounds; range 1.03-1.03; per round 1.03) (target >= 0.8: met). How it was measured.\n"),
            "{md}"
        );
    }

    #[test]
    fn the_committed_results_still_parse_and_render() {
        let path = crate::runner::bench_dir().join("RESULTS.json");
        if path.exists() {
            let results = Results::load_or_new(&path).unwrap();
            assert!(results.markdown().contains("## S5"));
        }
    }
}
