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

// Positional parameters: COUNT PROGRAM, then COUNT times SRC DST ro|rw, then
// ARGS... A missing mount point is created (an empty directory or file on the
// host stays behind; harmless, and the only visible trace).
//
// Every source is first bind-mounted into a staging tmpfs, and only then onto
// its target: a target such as /tmp (an emptyDir for a read-only root
// filesystem) would otherwise hide sources that live below it on the host (a
// checkout under /tmp). The program is staged too when a target would hide it.
const MOUNT_SCRIPT: &str = r#"set -e
stage=/run/keystone-kubelet/stage.$$
mkdir -p "$stage"
mount -t tmpfs -o size=1m keystone-stage "$stage"
count=$1; prog=$2; shift 2
case "$prog" in /*) ;; *) prog=$(command -v "$prog" || echo "$prog") ;; esac
hidden=no
i=0
while [ "$i" -lt "$count" ]; do
  i=$((i + 1))
  if [ -d "$1" ]; then mkdir "$stage/$i"; else : > "$stage/$i"; fi
  mount --bind "$1" "$stage/$i"
  printf '%s\n%s\n' "$2" "$3" > "$stage/$i.target"
  case "$prog" in "$2"/*) hidden=yes ;; esac
  shift 3
done
if [ "$hidden" = yes ]; then
  : > "$stage/program"
  mount --bind "$prog" "$stage/program"
  prog="$stage/program"
fi
i=0
while [ "$i" -lt "$count" ]; do
  i=$((i + 1))
  { read -r dst; read -r mode; } < "$stage/$i.target"
  if [ -d "$stage/$i" ]; then
    mkdir -p "$dst"
  else
    mkdir -p "$(dirname "$dst")"
    [ -e "$dst" ] || : > "$dst"
  fi
  mount --bind "$stage/$i" "$dst"
  if [ "$mode" = ro ]; then mount -o remount,bind,ro "$dst"; fi
done
exec "$prog" "$@"
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
            cmd.arg(self.mounts.len().to_string()).arg(&self.program);
            for m in &self.mounts {
                cmd.arg(&m.source)
                    .arg(&m.target)
                    .arg(if m.read_only { "ro" } else { "rw" });
            }
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
