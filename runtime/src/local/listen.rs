//! `run --listen`: the ingest endpoint in front of a local pipeline, so that
//! events can be `curl`ed into a manifest on a laptop. The endpoint checks
//! each request against the pipeline's source schema and key, as it does on
//! a cluster; an accepted request is answered once its events went through
//! the steps and their results were written (output, routed sinks, dead
//! letters). Timers fire as time passes. SIGINT or SIGTERM stops the
//! endpoint, flushes the steps and prints the summary.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use keystone_crds::Plan;
use tokio::sync::oneshot;

use super::{BatchWriter, LocalPipeline, LocalSinks, RunSummary};
use crate::error::RuntimeError;
use crate::ingest::body::{Contract, Limits};
use crate::ingest::endpoint::{Deliver, Endpoint, Origin, Record, Unavailable};
use crate::ingest::server::{ServerSettings, serve, stop_signal};
use crate::schema::Validator;

/// How often timers are fired while no request arrives.
const TICK: Duration = Duration::from_millis(100);

/// Requests waiting for the steps at most; past that, 503.
const QUEUED: usize = 16;

/// The limits of the local endpoint.
pub const LOCAL_LIMITS: Limits = Limits {
    max_body_bytes: 16 << 20,
    max_records: 10_000,
};

type Delivery = (Vec<Record>, oneshot::Sender<Result<(), Unavailable>>);

/// Hands records to the pipeline's thread and waits until it wrote them.
struct ToPipeline {
    requests: SyncSender<Delivery>,
}

impl Deliver for ToPipeline {
    fn deliver(
        &self,
        _origin: Origin,
        records: Vec<Record>,
    ) -> BoxFuture<'_, Result<(), Unavailable>> {
        Box::pin(async move {
            let stopped = || Unavailable {
                reason: "the local pipeline stopped".to_owned(),
                retry_after: Duration::from_secs(1),
            };
            let (reply, written) = oneshot::channel();
            match self.requests.try_send((records, reply)) {
                Ok(()) => written.await.unwrap_or_else(|_| Err(stopped())),
                Err(TrySendError::Full(_)) => Err(Unavailable {
                    reason: format!("{QUEUED} requests are waiting for the steps"),
                    retry_after: Duration::from_secs(1),
                }),
                Err(TrySendError::Disconnected(_)) => Err(stopped()),
            }
        })
    }
}

/// Serves the endpoint on `addr` until SIGINT or SIGTERM, running what it
/// accepts through `pipeline`: the manifest's `spec.source.http` without its
/// tokens and TLS (plain HTTP on a laptop), or a plain endpoint at `/`. `on_listening` is told the bound
/// address (a port of 0 picks a free one) and the path.
#[allow(clippy::too_many_arguments)]
pub fn listen<W: Write, D: Write>(
    plan: &Plan,
    pipeline: &mut LocalPipeline,
    output: &mut W,
    sinks: &mut LocalSinks,
    dead_letters: &mut D,
    addr: SocketAddr,
    on_listening: impl FnOnce(SocketAddr, &str),
) -> Result<RunSummary, RuntimeError> {
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| RuntimeError::Usage(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| RuntimeError::Usage(format!("cannot listen on {addr}: {e}")))?;
    let (requests, incoming) = mpsc::sync_channel::<Delivery>(QUEUED);
    let contract = Contract::new(Validator::for_source(&plan.source.schema), &plan.source.key);
    let deliver = Arc::new(ToPipeline { requests });
    // The manifest's endpoint, when it declares one, with its path, limits
    // and idempotency key; no tokens and no TLS on a laptop.
    let endpoint = match &plan.ingest {
        Some(http) => Endpoint::from_spec(http, contract, None, deliver),
        None => Endpoint::new("/".to_owned(), LOCAL_LIMITS, contract, None, None, deliver),
    };
    let path = endpoint.path.clone();
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            serve(
                listener,
                Arc::new(endpoint),
                ServerSettings::default(),
                stop_signal(),
            )
            .await
        })
        // Dropping the runtime drops the endpoint: the pipeline's loop ends.
    });
    on_listening(bound, &path);

    let started = Instant::now();
    let mut summary = RunSummary::default();
    let mut writer = BatchWriter::new(output, sinks, dead_letters);
    loop {
        match incoming.recv_timeout(TICK) {
            Ok((records, reply)) => {
                summary.input_events += records.len() as u64;
                let lines = records.into_iter().map(|r| r.value).collect();
                let batch = pipeline.push_lines(lines);
                let written = writer
                    .write(batch, true, &mut summary)
                    .and_then(|()| writer.flush());
                let failed = written.as_ref().err().map(ToString::to_string);
                let _ = reply.send(written.map_err(|e| Unavailable {
                    reason: e.to_string(),
                    retry_after: Duration::from_secs(1),
                }));
                if let Some(reason) = failed {
                    return Err(RuntimeError::Usage(format!(
                        "the results could not be written, so the endpoint stops: {reason}"
                    )));
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let (events, dead) = pipeline.tick();
                if !events.is_empty() || !dead.is_empty() {
                    writer.write((events, dead), false, &mut summary)?;
                    writer.flush()?;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    match server.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(RuntimeError::Usage(format!("the endpoint failed: {e}"))),
        Err(panic) => std::panic::resume_unwind(panic),
    }
    let finished = pipeline.finish();
    writer.write(finished, true, &mut summary)?;
    writer.flush()?;
    summary.elapsed = started.elapsed();
    summary.steps = pipeline.metrics();
    Ok(summary)
}
