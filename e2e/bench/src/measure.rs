//! Running one engine process under the same conditions as every other: pinned to
//! the same cores (`taskset -c`), in a memory cgroup with the same limit (cgroup v1
//! `memory.limit_in_bytes`, or v2 `memory.max`, when the machine lets us create
//! one), timed by the runner (wall) and by GNU time (user+sys CPU seconds and the
//! peak RSS of the process, which for a JVM includes heap, metaspace, threads and
//! RocksDB's native memory).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Where processes are placed to share one memory limit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Limits {
    pub cpus: String,
    pub mem_limit_mib: u64,
    /// The cgroup folder, when one could be created; `None` means no memory limit
    /// beyond the JVM's -Xmx (said so in the results).
    pub cgroup: Option<PathBuf>,
    pub how: String,
}

impl Limits {
    pub fn new(cpus: &str, mem_limit_mib: u64) -> Limits {
        let bytes = mem_limit_mib * 1024 * 1024;
        let name = format!("keystone-bench-{}", std::process::id());
        // Our own memory cgroup (v1): /proc/self/cgroup names it relative to the mount.
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut candidates: Vec<(PathBuf, &str)> = Vec::new();
        for line in own.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next(), parts.next(), parts.next());
            let (Some(controllers), Some(path)) = (controllers, path) else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if controllers.split(',').any(|c| c == "memory") {
                candidates.push((
                    Path::new("/sys/fs/cgroup/memory").join(rel).join(&name),
                    "memory.limit_in_bytes",
                ));
            } else if controllers.is_empty() {
                candidates.push((
                    Path::new("/sys/fs/cgroup").join(rel).join(&name),
                    "memory.max",
                ));
            }
        }
        for (dir, file) in candidates {
            // Folders left by runs that were killed: removing fails unless empty.
            if let Some(parent) = dir.parent()
                && let Ok(entries) = std::fs::read_dir(parent)
            {
                for e in entries.flatten() {
                    if e.file_name()
                        .to_string_lossy()
                        .starts_with("keystone-bench-")
                    {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            if std::fs::create_dir(&dir).is_ok() {
                if std::fs::write(dir.join(file), bytes.to_string()).is_ok() {
                    let how = format!(
                        "cgroup {} {file}={mem_limit_mib} MiB (+ taskset -c {cpus})",
                        dir.display()
                    );
                    return Limits {
                        cpus: cpus.to_owned(),
                        mem_limit_mib,
                        cgroup: Some(dir),
                        how,
                    };
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
        Limits {
            cpus: cpus.to_owned(),
            mem_limit_mib,
            cgroup: None,
            how: format!(
                "no memory cgroup could be created: only taskset -c {cpus} and the JVM's -Xmx"
            ),
        }
    }

    pub fn release(&self) {
        if let Some(dir) = &self.cgroup {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// What one process run cost.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Measured {
    pub wall_s: f64,
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
    pub exit_ok: bool,
    pub stdout: String,
    pub stderr_tail: String,
    pub loadavg_1m: f64,
}

pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Runs `argv` pinned and limited; `scratch` holds the time and log files.
pub fn run(argv: &[String], limits: &Limits, scratch: &Path) -> anyhow::Result<Measured> {
    run_hooked(argv, limits, scratch, |_| {})
}

/// [`run`], calling `started` with the process id of the timer (`/usr/bin/time`,
/// whose only child is the engine) once it runs: Kafka-mode engines run until the
/// harness stops them.
pub fn run_hooked(
    argv: &[String],
    limits: &Limits,
    scratch: &Path,
    started: impl FnOnce(u32),
) -> anyhow::Result<Measured> {
    if argv.is_empty() {
        bail!("empty command");
    }
    let time_file = scratch.join("time.txt");
    let out_file = scratch.join("stdout.txt");
    let err_file = scratch.join("stderr.txt");
    let _ = std::fs::remove_file(&time_file);
    let script = r#"if [ -n "$KSB_CGROUP" ]; then echo $$ > "$KSB_CGROUP/cgroup.procs" || exit 97; fi
exec /usr/bin/time -f "%e %U %S %M" -o "$KSB_TIME" taskset -c "$KSB_CPUS" "$@""#;
    let load = loadavg();
    let start = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(argv)
        .env("KSB_TIME", &time_file)
        .env("KSB_CPUS", &limits.cpus)
        .env(
            "KSB_CGROUP",
            limits
                .cgroup
                .as_ref()
                .map(|p| p.as_os_str().to_owned())
                .unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file)?)
        .stderr(std::fs::File::create(&err_file)?)
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?;
    started(child.id());
    let status = child.wait()?;
    let wall_s = start.elapsed().as_secs_f64();
    let numbers = time_numbers(&time_file);
    let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
    let tail: String = {
        let lines: Vec<&str> = stderr.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    let (cpu_s, peak_rss_mib) = match numbers.as_slice() {
        [_, user, sys, rss_kib] => (user + sys, rss_kib / 1024.0),
        _ => (f64::NAN, f64::NAN),
    };
    Ok(Measured {
        wall_s,
        cpu_s,
        peak_rss_mib,
        exit_ok: status.success(),
        stdout: std::fs::read_to_string(&out_file).unwrap_or_default(),
        stderr_tail: tail,
        loadavg_1m: load,
    })
}

/// The numbers of the last line `/usr/bin/time -f` wrote to `file` (GNU time
/// writes "Command exited with non-zero status N" before them); none when
/// it wrote nothing.
pub fn time_numbers(file: &std::path::Path) -> Vec<f64> {
    let time = std::fs::read_to_string(file).unwrap_or_default();
    time.lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}
