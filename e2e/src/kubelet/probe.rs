//! Readiness, liveness and startup probes: HTTP GET, TCP and exec, with the
//! Kubernetes timing fields and thresholds.

use std::net::IpAddr;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::process::Exec;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

/// A probe's verdict after its threshold was reached.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub container: usize,
    /// Which start of the container this is about; stale results are dropped.
    pub generation: u64,
    pub kind: ProbeKind,
    pub healthy: bool,
    pub message: String,
}

/// Where a probe runs.
#[derive(Debug, Clone)]
pub struct Target {
    pub pod_ip: IpAddr,
    pub container: Container,
    pub exec: Exec,
}

/// Returns the unsupported part of a probe, if any.
pub fn unsupported(probe: &Probe) -> Option<&'static str> {
    if probe.grpc.is_some() {
        Some("gRPC probes")
    } else if probe
        .http_get
        .as_ref()
        .is_some_and(|h| h.scheme.as_deref() == Some("HTTPS"))
    {
        Some("HTTPS probes")
    } else if probe.http_get.is_none() && probe.tcp_socket.is_none() && probe.exec.is_none() {
        Some("probes without a handler")
    } else {
        None
    }
}

fn secs(v: Option<i32>, default: i32) -> Duration {
    Duration::from_secs(u64::try_from(v.unwrap_or(default).max(0)).unwrap_or(0))
}

/// Runs a probe until the container stops (the task is aborted then), sending
/// a result whenever the verdict changes. Liveness and startup stop after
/// their first failure verdict (the container gets killed), startup also
/// after its first success.
pub async fn run(
    kind: ProbeKind,
    probe: Probe,
    target: Target,
    container: usize,
    generation: u64,
    tx: mpsc::Sender<ProbeResult>,
) {
    tokio::time::sleep(secs(probe.initial_delay_seconds, 0)).await;
    let period = secs(probe.period_seconds, 10).max(Duration::from_millis(100));
    let timeout = secs(probe.timeout_seconds, 1).max(Duration::from_millis(100));
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    let (mut successes, mut failures) = (0, 0);
    let mut last: Option<bool> = None;
    loop {
        let outcome = check(&probe, &target, timeout).await;
        let healthy = outcome.is_ok();
        if healthy {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        let verdict = if successes >= success_threshold {
            Some(true)
        } else if failures >= failure_threshold {
            Some(false)
        } else {
            None
        };
        if let Some(v) = verdict
            && last != Some(v)
        {
            last = Some(v);
            let message = outcome.err().unwrap_or_default();
            let result = ProbeResult {
                container,
                generation,
                kind,
                healthy: v,
                message,
            };
            if tx.send(result).await.is_err() {
                return;
            }
            let done = match kind {
                ProbeKind::Readiness => false,
                ProbeKind::Liveness => !v,
                ProbeKind::Startup => true,
            };
            if done {
                return;
            }
        }
        tokio::time::sleep(period).await;
    }
}

/// One probe attempt: Ok, or why it failed.
async fn check(probe: &Probe, target: &Target, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        if let Some(http) = &probe.http_get {
            let port = resolve_port(&http.port, &target.container)?;
            let host = match http.host.as_deref() {
                Some(h) if !h.is_empty() => h.to_owned(),
                _ => target.pod_ip.to_string(),
            };
            let path = http.path.clone().unwrap_or_else(|| "/".to_owned());
            let headers: Vec<(String, String)> = http
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect();
            http_get(&host, port, &path, &headers).await
        } else if let Some(tcp) = &probe.tcp_socket {
            let port = resolve_port(&tcp.port, &target.container)?;
            let host = tcp
                .host
                .clone()
                .unwrap_or_else(|| target.pod_ip.to_string());
            TcpStream::connect((host.as_str(), port))
                .await
                .map(drop)
                .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
        } else if let Some(exec) = &probe.exec {
            run_exec(exec.command.as_deref().unwrap_or_default(), &target.exec).await
        } else {
            Err("probe has no handler".to_owned())
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}

fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("invalid port {p}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("port {name:?} is not a named container port")),
    }
}

async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let url = format!("http://{host}:{port}{path}");
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("Get {url:?}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("Get {url:?}: {e}"))?;
    // The connection future drives the socket; it ends with the request.
    tokio::spawn(conn);
    let mut req = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(
            hyper::header::USER_AGENT,
            "kube-probe/keystone-process-kubelet",
        );
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("Get {url:?}: {e}"))?;
    let status = resp.status().as_u16();
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {status}"))
    }
}

async fn run_exec(command: &[String], base: &Exec) -> Result<(), String> {
    let Some((program, args)) = command.split_first() else {
        return Err("exec probe without a command".to_owned());
    };
    let exec = Exec {
        program: program.into(),
        args: args.to_vec(),
        ..base.clone()
    };
    let mut cmd = exec.command();
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let status = cmd
        .status()
        .await
        .map_err(|e| format!("exec {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("command {command:?} exited with {status}"))
    }
}
