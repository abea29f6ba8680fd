//! Starting and signalling container processes.
//!
//! A container is a process in its own process group (so signals reach its
//! children too). When it has volume mounts, it starts through
//! `unshare --mount --propagation private`, and a tiny shell script bind-mounts
//! each volume at the path the pod spec names before `exec`ing the program:
//! the mounts exist only in that process's mount namespace, the host's view
//! and the pod spec stay unchanged.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// A bind mount of `source` (a materialized volume) at `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub source: PathBuf,
    pub target: String,
    pub read_only: bool,
}

/// Everything needed to run a program "inside" a container.
#[derive(Debug, Clone)]
pub struct Exec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mounts: Vec<Mount>,
    pub cwd: PathBuf,
}

// Positional parameters: SRC DST ro|rw ... -- PROGRAM ARGS...
// A missing mount point is created (an empty directory or file on the host
// stays behind; harmless, and the only visible trace).
const MOUNT_SCRIPT: &str = r#"set -e
while [ "$1" != "--" ]; do
  src=$1; dst=$2; mode=$3; shift 3
  if [ -d "$src" ]; then
    mkdir -p "$dst"
  else
    mkdir -p "$(dirname "$dst")"
    [ -e "$dst" ] || : > "$dst"
  fi
  mount --bind "$src" "$dst"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$dst"; fi
done
shift
exec "$@"
"#;

impl Exec {
    /// The command that runs the program with its mounts, in a new process
    /// group, with exactly the container's environment.
    pub fn command(&self) -> Command {
        let mut cmd = if self.mounts.is_empty() {
            Command::new(&self.program)
        } else {
            let mut cmd = Command::new("unshare");
            cmd.args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                MOUNT_SCRIPT,
                "keystone-mount",
            ]);
            for m in &self.mounts {
                cmd.arg(&m.source)
                    .arg(&m.target)
                    .arg(if m.read_only { "ro" } else { "rw" });
            }
            cmd.arg("--").arg(&self.program);
            cmd
        };
        cmd.args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        cmd
    }

    /// Starts the program with stdout and stderr appended to `log`.
    pub fn spawn(&self, log: &Path) -> std::io::Result<Child> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let err = out.try_clone()?;
        self.command().stdout(out).stderr(err).spawn()
    }
}

/// Signals a container's whole process group; a group that is already gone
/// is not an error.
pub fn signal_group(pid: u32, signal: Signal) {
    let Ok(pid) = i32::try_from(pid) else { return };
    match killpg(Pid::from_raw(pid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pid, %signal, error = %e, "signalling process group failed"),
    }
}

/// The process start time (field 22 of /proc/PID/stat), which with the pid
/// identifies a process even after pid reuse; `e2e/testbed down` checks it.
pub fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = stat.rsplit_once(") ")?.1;
    after_comm.split_whitespace().nth(19).map(str::to_owned)
}
