//! The background side of the sink: a thread with its own small tokio runtime
//! (the host's thread blocks; it never runs async code) that sends bulk
//! requests, retries them and reports each batch's end.
//!
//! Order. Documents are routed by a hash of their id to one of
//! [`ORDERED_LANES`] lanes, and each lane sends its batches strictly one after
//! another, a batch's retries included (a retried item goes before any later
//! batch of its lane; within a request, see
//! [`retry_plan`](super::response::retry_plan)). Without `versionField` the last
//! write of an id wins, so this is what keeps an id's writes in stream order.
//! With it the index would keep the newest version whatever the order, but
//! batches overtaking each other turn an id's older writes into version
//! conflicts, each still a look-up for the index (measured in benchmark S9:
//! up to a third of the actions): lanes avoid them too, and bound the requests
//! in flight to the lanes' number without tracking ids across requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use super::SearchError;
use super::client::{BulkClient, SetupError};
use super::config::SearchConfig;
use super::mapping::create_index_body;
use super::metrics::{ItemResult, RetryReason, SinkMetrics};
use super::request::Action;
use super::response::{ItemOutcome, refusal_reason, retry_plan};
use crate::event::DeadLetter;

/// Lanes of a sink (see the module documentation).
pub(crate) const ORDERED_LANES: usize = 4;

/// Actions sent together, and what the host needs to know of them.
pub(crate) struct Batch {
    /// The host's epoch when it was sent: dead letters of a batch sent before an
    /// abort are not reported (the replay writes the events again).
    pub epoch: u64,
    /// The lane of the batch's ids.
    pub lane: usize,
    pub actions: Vec<Action>,
    /// The NDJSON bytes of the actions.
    pub bytes: u64,
}

/// A batch whose every action has its final answer.
pub(crate) struct Completion {
    pub epoch: u64,
    pub dead_letters: Vec<DeadLetter>,
}

/// Bytes of bulk actions sent and not answered yet, retries included.
pub(crate) struct InFlight {
    bytes: AtomicU64,
    gauge: prometheus::IntGauge,
}

impl InFlight {
    pub(crate) fn new(gauge: prometheus::IntGauge) -> Self {
        Self {
            bytes: AtomicU64::new(0),
            gauge,
        }
    }

    pub(crate) fn add(&self, bytes: u64) {
        let now = self
            .bytes
            .fetch_add(bytes, Ordering::AcqRel)
            .saturating_add(bytes);
        self.gauge.set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    pub(crate) fn sub(&self, bytes: u64) {
        let before = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(bytes))
            })
            .unwrap_or(0);
        let now = before.saturating_sub(bytes);
        self.gauge.set(i64::try_from(now).unwrap_or(i64::MAX));
    }

    pub(crate) fn get(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }

    /// Whether the host must stop taking input.
    pub(crate) fn reaches(&self, limit: u64) -> bool {
        self.get() >= limit
    }
}

/// An index the cluster will not let the sink check or create.
#[derive(Clone, Debug)]
pub(crate) struct SetupRefusal {
    pub action: &'static str,
    pub status: u16,
    pub body: String,
}

/// What the host thread and the background thread share.
pub(crate) struct Shared {
    pub in_flight: InFlight,
    fatal: Mutex<Option<SetupRefusal>>,
}

impl Shared {
    pub(crate) fn fatal(&self) -> Option<SetupRefusal> {
        // A poisoned lock still holds a valid Option.
        match self.fatal.lock() {
            Ok(fatal) => fatal.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_fatal(&self, refusal: SetupRefusal) {
        match self.fatal.lock() {
            Ok(mut fatal) => *fatal = Some(refusal),
            Err(poisoned) => *poisoned.into_inner() = Some(refusal),
        }
    }
}

/// Why no completion can be awaited any more.
#[derive(Debug)]
pub(crate) struct Stopped;

/// The host's handle on the background thread.
pub(crate) struct Worker {
    batches: Option<tokio_mpsc::UnboundedSender<Batch>>,
    completions: mpsc::Receiver<Completion>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    pub shared: Arc<Shared>,
}

/// What every background task reads.
struct Context {
    sink: String,
    index: String,
    step: String,
    versioned: bool,
    create_index: Option<serde_json::Value>,
    backoff: ExponentialBuilder,
    max_delay: Duration,
    client: BulkClient,
    metrics: Arc<SinkMetrics>,
    shared: Arc<Shared>,
    completions: mpsc::Sender<Completion>,
}

impl Worker {
    pub(crate) fn start(
        config: &SearchConfig,
        client: BulkClient,
        metrics: Arc<SinkMetrics>,
    ) -> Result<Worker, SearchError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| SearchError::Runtime { source })?;
        let shared = Arc::new(Shared {
            in_flight: InFlight::new(metrics.in_flight_bytes.clone()),
            fatal: Mutex::new(None),
        });
        let (batches_tx, batches_rx) = tokio_mpsc::unbounded_channel();
        let (completions_tx, completions_rx) = mpsc::channel();
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let (min_delay, max_delay) = config.retry_delays;
        let context = Arc::new(Context {
            sink: config.sink.clone(),
            index: config.index.clone(),
            step: format!("sink:{}", config.sink),
            versioned: config.versioned(),
            create_index: config.create_index.then(|| create_index_body(config)),
            backoff: ExponentialBuilder::default()
                .with_min_delay(min_delay)
                .with_max_delay(max_delay)
                .with_jitter()
                .without_max_times(),
            max_delay,
            client,
            metrics,
            shared: shared.clone(),
            completions: completions_tx,
        });
        let thread = std::thread::Builder::new()
            .name(format!("search-{}", config.sink))
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        _ = shutdown_rx => {}
                        _ = run(batches_rx, context) => {}
                    }
                });
                // Dropping the runtime cancels requests still in flight: the
                // host dropped the sink without waiting for them, so the events
                // are not committed and will be written again.
            })
            .map_err(|source| SearchError::Runtime { source })?;
        Ok(Worker {
            batches: Some(batches_tx),
            completions: completions_rx,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
            shared,
        })
    }

    /// Hands a batch to the background thread; its bytes count as in flight
    /// from now on.
    pub(crate) fn send(&self, batch: Batch) -> Result<(), Stopped> {
        let bytes = batch.bytes;
        self.shared.in_flight.add(bytes);
        let sent = self.batches.as_ref().map(|tx| tx.send(batch).is_ok());
        if sent != Some(true) {
            self.shared.in_flight.sub(bytes);
            return Err(Stopped);
        }
        Ok(())
    }

    /// The next completion, waiting at most `wait`; `None` when none came.
    pub(crate) fn completion(&self, wait: Duration) -> Result<Option<Completion>, Stopped> {
        let next = if wait.is_zero() {
            self.completions.try_recv().map_err(|e| match e {
                mpsc::TryRecvError::Empty => None,
                mpsc::TryRecvError::Disconnected => Some(Stopped),
            })
        } else {
            self.completions.recv_timeout(wait).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => None,
                mpsc::RecvTimeoutError::Disconnected => Some(Stopped),
            })
        };
        match next {
            Ok(completion) => Ok(Some(completion)),
            Err(None) => Ok(None),
            Err(Some(stopped)) => Err(stopped),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.batches = None;
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The thread ends as soon as it sees the signal: its runtime only
            // cancels tasks on the way out.
            let _ = thread.join();
        }
    }
}

async fn run(mut batches: tokio_mpsc::UnboundedReceiver<Batch>, context: Arc<Context>) {
    if let Some(body) = &context.create_index
        && let Err(refusal) = ensure_index(&context, body).await
    {
        tracing::error!(
            sink = %context.sink,
            index = %context.index,
            status = refusal.status,
            body = %refusal.body,
            "the search index cannot be {}; the sink stops", refusal.action
        );
        context.shared.set_fatal(refusal);
        return;
    }
    let lanes: Vec<tokio_mpsc::UnboundedSender<Batch>> = (0..ORDERED_LANES)
        .map(|_| {
            let (tx, mut rx) = tokio_mpsc::unbounded_channel::<Batch>();
            let context = context.clone();
            tokio::spawn(async move {
                while let Some(batch) = rx.recv().await {
                    deliver(context.clone(), batch).await;
                }
            });
            tx
        })
        .collect();
    while let Some(batch) = batches.recv().await {
        // A lane task ends only with the runtime, so the send cannot fail
        // while this loop runs.
        let _ = lanes[batch.lane % ORDERED_LANES].send(batch);
    }
}

/// Checks that the index exists and creates it when not, trying again for as
/// long as the cluster is unreachable or busy. Bulk requests wait for it.
async fn ensure_index(context: &Context, body: &serde_json::Value) -> Result<(), SetupRefusal> {
    let mut backoff = context.backoff.build();
    loop {
        let (error, action) = match context.client.index_exists().await {
            Ok(true) => return Ok(()),
            Ok(false) => match context.client.create_index(body).await {
                Ok(()) => {
                    tracing::info!(sink = %context.sink, index = %context.index, "created the search index");
                    return Ok(());
                }
                Err(error) => (error, "created"),
            },
            // A key allowed to write documents but not to read index
            // metadata gets 403 here: the index may well exist, and if not,
            // the bulk answers say so (as dead letters naming the index).
            Err(SetupError::Permanent { status: 403, body }) => {
                tracing::warn!(
                    sink = %context.sink,
                    index = %context.index,
                    body = %body,
                    "not allowed to check whether the search index exists (HTTP 403); writing without creating it"
                );
                return Ok(());
            }
            Err(error) => (error, "checked"),
        };
        match error {
            SetupError::Permanent { status, body } => {
                return Err(SetupRefusal {
                    action,
                    status,
                    body,
                });
            }
            SetupError::Transient(failure) => {
                context.metrics.retry(failure.reason, 1);
                let delay = context.next_delay(&mut backoff);
                tracing::warn!(
                    sink = %context.sink,
                    index = %context.index,
                    reason = failure.reason.as_str(),
                    status = failure.status,
                    detail = %failure.detail,
                    retry_in_ms = delay.as_millis() as u64,
                    "the search index could not be {action}; trying again"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

impl Context {
    fn next_delay(&self, backoff: &mut impl Iterator<Item = Duration>) -> Duration {
        // The builder sets no maximum number of attempts; the fallback is a guard.
        backoff.next().unwrap_or(self.max_delay)
    }
}

/// Sends a batch until every action has its final answer, then reports it.
async fn deliver(context: Arc<Context>, batch: Batch) {
    let Batch {
        epoch, mut actions, ..
    } = batch;
    let mut dead_letters = Vec::new();
    let mut backoff = context.backoff.build();
    // Parts of the batch to send after the current one, last first: a request
    // the cluster finds too large is sent again in halves, in order.
    let mut later: Vec<Vec<Action>> = Vec::new();
    loop {
        if actions.is_empty() {
            match later.pop() {
                Some(part) => actions = part,
                None => break,
            }
        }
        let body: Vec<u8> = actions
            .iter()
            .flat_map(|a| a.ndjson.iter().copied())
            .collect();
        context.metrics.bulk_requests.inc();
        let started = Instant::now();
        let outcomes = match context.client.bulk(body, actions.len()).await {
            Ok(outcomes) => outcomes,
            Err(failure) if failure.status == Some(413) => {
                // Larger than the cluster takes in one request (its
                // http.max_content_length): retrying the same bytes would stall
                // the sink for good. Halve it; a single document too large
                // becomes a dead letter.
                context.metrics.retry(failure.reason, 1);
                if actions.len() > 1 {
                    let rest = actions.split_off(actions.len() / 2);
                    later.push(rest);
                    tracing::info!(
                        sink = %context.sink,
                        index = %context.index,
                        documents = actions.len() * 2,
                        "the bulk request is too large for the cluster (413): sending it in halves"
                    );
                    continue;
                }
                for action in actions.drain(..) {
                    context.shared.in_flight.sub(action.ndjson.len() as u64);
                    context.metrics.item(ItemResult::Failed);
                    dead_letters.push(DeadLetter {
                        step: context.step.clone(),
                        reason: format!(
                            "search index {} refused the document: it is larger than the cluster accepts in one request (HTTP 413, http.max_content_length)",
                            context.index
                        ),
                        original: action.original,
                    });
                }
                continue;
            }
            Err(failure) => {
                if failure.status.is_some() {
                    context
                        .metrics
                        .request_duration
                        .observe(started.elapsed().as_secs_f64());
                }
                context.metrics.retry(failure.reason, 1);
                let delay = context.next_delay(&mut backoff);
                tracing::warn!(
                    sink = %context.sink,
                    index = %context.index,
                    reason = failure.reason.as_str(),
                    status = failure.status,
                    detail = %failure.detail,
                    documents = actions.len(),
                    retry_in_ms = delay.as_millis() as u64,
                    "bulk request failed; sending it again"
                );
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        context
            .metrics
            .request_duration
            .observe(started.elapsed().as_secs_f64());
        let must_retry: Vec<bool> = outcomes
            .iter()
            .map(|o| matches!(o, ItemOutcome::Retry { .. }))
            .collect();
        // Every item asked to be retried, plus (without versions) the later
        // writes of its id that must land after it.
        let mut send_again = must_retry.clone();
        for i in retry_plan(
            actions.iter().map(|a| a.id.as_str()),
            &must_retry,
            context.versioned,
        ) {
            if let Some(flag) = send_again.get_mut(i) {
                *flag = true;
            }
        }
        let mut retry_example = None;
        let mut next = Vec::new();
        for ((action, outcome), again) in actions.into_iter().zip(outcomes).zip(send_again) {
            if again {
                if let ItemOutcome::Retry { status, error } = &outcome {
                    retry_example
                        .get_or_insert_with(|| context.client.redact(&format!("{status} {error}")));
                }
                next.push(action);
                continue;
            }
            let bytes = action.ndjson.len() as u64;
            let result = match outcome {
                ItemOutcome::Created => ItemResult::Created,
                ItemOutcome::Updated => ItemResult::Updated,
                ItemOutcome::Deleted => ItemResult::Deleted,
                ItemOutcome::VersionConflict => ItemResult::VersionConflict,
                ItemOutcome::Refused { error_type, reason } => {
                    dead_letters.push(DeadLetter {
                        step: context.step.clone(),
                        reason: refusal_reason(&context.index, &error_type, &reason),
                        original: action.original,
                    });
                    ItemResult::Failed
                }
                // Every retry is flagged above; sent again all the same.
                ItemOutcome::Retry { .. } => {
                    next.push(action);
                    continue;
                }
            };
            context.shared.in_flight.sub(bytes);
            context.metrics.item(result);
        }
        actions = next;
        if !actions.is_empty() {
            context
                .metrics
                .retry(RetryReason::Item, actions.len() as u64);
            let delay = context.next_delay(&mut backoff);
            tracing::warn!(
                sink = %context.sink,
                index = %context.index,
                documents = actions.len(),
                first = %retry_example.unwrap_or_default(),
                retry_in_ms = delay.as_millis() as u64,
                "the search cluster asked to send documents again"
            );
            tokio::time::sleep(delay).await;
        }
    }
    // The host may be gone (dropped); then nobody waits for the answer.
    let _ = context.completions.send(Completion {
        epoch,
        dead_letters,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_bytes_gate_the_host() {
        let gauge = prometheus::IntGauge::new("g", "g").unwrap();
        let in_flight = InFlight::new(gauge.clone());
        let limit = 1000;
        in_flight.add(600);
        assert!(!in_flight.reaches(limit));
        in_flight.add(400);
        assert!(in_flight.reaches(limit));
        assert_eq!(gauge.get(), 1000);
        // Items answered one by one release their bytes one by one.
        in_flight.sub(1);
        assert!(!in_flight.reaches(limit));
        in_flight.sub(999);
        assert_eq!(in_flight.get(), 0);
        // Never below zero, whatever happens.
        in_flight.sub(5);
        assert_eq!(in_flight.get(), 0);
        assert_eq!(gauge.get(), 0);
    }
}
