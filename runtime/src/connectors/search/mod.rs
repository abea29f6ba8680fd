//! The Elasticsearch / OpenSearch sink: documents indexed through the bulk API.
//!
//! - [`SearchSink::connect`] builds the sink of a plan (credentials from the
//!   environment variables [`SinkSpec::secret_env`](keystone_crds::pipeline::SinkSpec::secret_env)
//!   names) and starts its background thread; [`SearchSink::to_writer`] renders
//!   the bulk lines it would send into a writer instead (local mode).
//! - [`Sink::write`] turns each event into a bulk action (`request`), buffered
//!   per request; a request goes out at `bulkSize` documents or `bulkBytes`
//!   bytes, and every request still buffered goes out at [`Sink::prepare`],
//!   which waits for all of them to be answered.
//! - Requests are retried until answered (`worker`); a document the index
//!   refuses for good becomes a dead letter with the index's reason; a version
//!   conflict means the index already holds this or a newer version.
//! - [`Sink::backpressured`] holds the host while `maxInFlightBytes` of
//!   requests are unanswered.
//!
//! Writes are idempotent (ids from the event, external versions), so the
//! guarantee is [`Guarantee::Idempotent`]: a replay after a crash rewrites the
//! same documents.

mod client;
mod config;
mod mapping;
mod metrics;
mod request;
mod response;
mod worker;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keystone_crds::plan::PlanSink;

use self::client::BulkClient;
use self::config::SearchConfig;
use self::metrics::SinkMetrics;
use self::request::{Action, ActionBuilder};
use self::worker::{Batch, ORDERED_LANES, Worker};
use super::{Guarantee, Prepared, Sink, SinkContext, SinkError, SinkOutput, SinkRecord};
use crate::error::RuntimeError;
use crate::event::DeadLetter;

type UrlError = <reqwest::Url as std::str::FromStr>::Err;

/// Why the search sink cannot be built or cannot go on. Messages name the
/// setting, the index or the environment variable; never a credential.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("the sink sets no elasticsearch settings")]
    NotASearchSink,
    #[error("endpoint {endpoint:?} is not a URL: {source}")]
    Endpoint {
        endpoint: String,
        #[source]
        source: UrlError,
    },
    #[error(
        "credentialsSecret {secret:?} is named, but none of {username_env}, {password_env} or {api_key_env} is set: the Secret must exist in the pipeline's namespace with keys username and password, or apiKey"
    )]
    NoCredentials {
        secret: String,
        username_env: String,
        password_env: String,
        api_key_env: String,
    },
    #[error("endpoint {endpoint:?} carries credentials; put them in the credentialsSecret instead")]
    EndpointCredentials { endpoint: String },
    #[error("endpoint {endpoint:?} must be an http or https URL with a host")]
    EndpointScheme { endpoint: String },
    #[error("endpoint {endpoint:?} must not have a query or a fragment")]
    EndpointQuery { endpoint: String },
    #[error("index {index:?} is not a valid index name (lowercase letters, digits, '_', '.', '-')")]
    IndexName { index: String },
    #[error("idFields must name at least one field, and no empty one")]
    NoIdFields,
    #[error("versionField must not be empty")]
    EmptyVersionField,
    #[error("{setting} must be at least {min}, not {value}")]
    Setting {
        setting: &'static str,
        value: i64,
        min: i64,
    },
    #[error("{username_env} and {password_env} must be set together (basic authentication)")]
    HalfBasicAuth {
        username_env: String,
        password_env: String,
    },
    #[error(
        "both {api_key_env} and {username_env} are set: the credentials Secret must hold either apiKey or username and password"
    )]
    TwoCredentials {
        api_key_env: String,
        username_env: String,
    },
    #[error("deleteWhen: {source}")]
    DeleteWhen {
        #[source]
        source: Box<RuntimeError>,
    },
    #[error("the CA bundle in {env} cannot be read as PEM: {source}")]
    CaCert {
        env: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the CA bundle in {env} holds no PEM certificate")]
    NoCaCert { env: String },
    #[error("building the HTTP client: {source}")]
    Client {
        #[source]
        source: reqwest::Error,
    },
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("starting the background thread: {source}")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("search index {index} could not be {action}: HTTP {status}: {body}")]
    IndexSetup {
        index: String,
        action: &'static str,
        status: u16,
        body: String,
    },
    #[error("the sink's background thread stopped")]
    WorkerStopped,
    #[error("writing the bulk lines: {source}")]
    Output {
        #[source]
        source: std::io::Error,
    },
}

/// The Elasticsearch / OpenSearch sink (see the module documentation).
pub struct SearchSink {
    name: String,
    step: String,
    builder: ActionBuilder,
    transport: Transport,
}

enum Transport {
    Bulk(Box<BulkTransport>),
    /// Local mode: the bulk lines go to a writer.
    Writer(Box<dyn Write + Send>),
}

/// Buffers and the background thread of a sink that talks to a cluster.
struct BulkTransport {
    index: String,
    worker: Worker,
    #[cfg(test)]
    metrics: Arc<SinkMetrics>,
    /// One buffer per lane (see `worker`).
    buffers: Vec<Buffer>,
    bulk_size: usize,
    bulk_bytes: usize,
    max_in_flight_bytes: u64,
    /// Bumped by each abort: answers to batches of an earlier epoch bring no
    /// dead letters (their events are written again).
    epoch: u64,
    sent: u64,
    answered: u64,
}

#[derive(Default)]
struct Buffer {
    actions: Vec<Action>,
    bytes: usize,
}

impl SearchSink {
    /// Builds the sink of `sink`, reading credentials from the environment, and
    /// starts its background thread. The index is checked (and created, with
    /// `createIndex`) in the background before the first bulk request, so a
    /// cluster that is down does not fail the build: writes wait for it.
    pub fn connect(sink: &PlanSink, context: &SinkContext<'_>) -> Result<SearchSink, SinkError> {
        let config =
            SearchConfig::from_plan(sink, &|name| std::env::var(name).ok()).map_err(|source| {
                SinkError::Search {
                    sink: sink.name.clone(),
                    source: Box::new(source),
                }
            })?;
        SearchSink::start(config, context)
    }

    fn start(config: SearchConfig, context: &SinkContext<'_>) -> Result<SearchSink, SinkError> {
        let named = |source| SinkError::Search {
            sink: config.sink.clone(),
            source: Box::new(source),
        };
        let builder = ActionBuilder::new(&config).map_err(named)?;
        let client = BulkClient::new(&config, context.pipeline).map_err(named)?;
        let metrics =
            Arc::new(SinkMetrics::register(context.registry, &config.sink).map_err(named)?);
        #[cfg(test)]
        let metrics_for_tests = metrics.clone();
        let worker = Worker::start(&config, client, metrics).map_err(named)?;
        tracing::info!(
            sink = %config.sink,
            endpoint = %config.endpoint,
            index = %config.index,
            versioned = config.versioned(),
            "search sink connected"
        );
        let lanes = ORDERED_LANES;
        let transport = BulkTransport {
            index: config.index.clone(),
            worker,
            #[cfg(test)]
            metrics: metrics_for_tests,
            buffers: (0..lanes).map(|_| Buffer::default()).collect(),
            bulk_size: config.bulk_size,
            bulk_bytes: config.bulk_bytes,
            max_in_flight_bytes: config.max_in_flight_bytes as u64,
            epoch: 0,
            sent: 0,
            answered: 0,
        };
        Ok(SearchSink {
            step: format!("sink:{}", config.sink),
            name: config.sink,
            builder,
            transport: Transport::Bulk(Box::new(transport)),
        })
    }

    /// A sink that writes the bulk NDJSON it would send (an action line, then
    /// the document line except for deletes) to `out` instead of a cluster, so
    /// that a user can see what would be indexed. `prepare` flushes `out`.
    pub fn to_writer(sink: &PlanSink, out: Box<dyn Write + Send>) -> Result<SearchSink, SinkError> {
        let named = |source| SinkError::Search {
            sink: sink.name.clone(),
            source: Box::new(source),
        };
        let config = SearchConfig::offline(sink).map_err(named)?;
        let builder = ActionBuilder::new(&config).map_err(named)?;
        Ok(SearchSink {
            name: sink.name.clone(),
            step: format!("sink:{}", sink.name),
            builder,
            transport: Transport::Writer(out),
        })
    }

    fn error(&self, source: SearchError) -> SinkError {
        SinkError::Search {
            sink: self.name.clone(),
            source: Box::new(source),
        }
    }

    #[cfg(test)]
    fn metrics(&self) -> Option<Arc<SinkMetrics>> {
        match &self.transport {
            Transport::Bulk(bulk) => Some(bulk.metrics.clone()),
            Transport::Writer(_) => None,
        }
    }
}

impl BulkTransport {
    /// Takes an action into its lane's buffer and sends the buffer when full.
    fn push(&mut self, action: Action) -> Result<(), SearchError> {
        let lane = if self.buffers.len() > 1 {
            (xxhash_rust::xxh3::xxh3_64(action.id.as_bytes()) % self.buffers.len() as u64) as usize
        } else {
            0
        };
        let Some(buffer) = self.buffers.get_mut(lane) else {
            return Err(SearchError::WorkerStopped);
        };
        buffer.bytes += action.ndjson.len();
        buffer.actions.push(action);
        if buffer.actions.len() >= self.bulk_size || buffer.bytes >= self.bulk_bytes {
            self.send(lane)?;
        }
        Ok(())
    }

    fn send(&mut self, lane: usize) -> Result<(), SearchError> {
        let Some(buffer) = self.buffers.get_mut(lane) else {
            return Ok(());
        };
        if buffer.actions.is_empty() {
            return Ok(());
        }
        let full = std::mem::take(buffer);
        let batch = Batch {
            epoch: self.epoch,
            lane,
            actions: full.actions,
            bytes: full.bytes as u64,
        };
        self.worker.send(batch).map_err(|_| self.stopped())?;
        self.sent += 1;
        Ok(())
    }

    /// Collects the answers that arrived, waiting until `deadline` for all of
    /// them. Returns whether every batch sent is answered.
    fn collect(
        &mut self,
        out: &mut SinkOutput,
        deadline: Option<Instant>,
    ) -> Result<bool, SearchError> {
        if let Some(refusal) = self.worker.shared.fatal() {
            return Err(self.setup_error(refusal));
        }
        while self.answered < self.sent {
            let wait = deadline.map_or(Duration::ZERO, |d| {
                d.saturating_duration_since(Instant::now())
            });
            match self.worker.completion(wait) {
                Ok(Some(completion)) => {
                    self.answered += 1;
                    if completion.epoch == self.epoch {
                        out.dead_letters.extend(completion.dead_letters);
                    }
                }
                Ok(None) => return Ok(false),
                Err(_) => return Err(self.stopped()),
            }
        }
        Ok(true)
    }

    fn stopped(&self) -> SearchError {
        match self.worker.shared.fatal() {
            Some(refusal) => self.setup_error(refusal),
            None => SearchError::WorkerStopped,
        }
    }

    fn setup_error(&self, refusal: worker::SetupRefusal) -> SearchError {
        SearchError::IndexSetup {
            index: self.index.clone(),
            action: refusal.action,
            status: refusal.status,
            body: refusal.body,
        }
    }
}

impl Sink for SearchSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn guarantee(&self) -> Guarantee {
        Guarantee::Idempotent
    }

    fn write(&mut self, record: &SinkRecord<'_>, out: &mut SinkOutput) -> Result<(), SinkError> {
        if let Transport::Bulk(bulk) = &mut self.transport {
            // Answers that arrived meanwhile: their dead letters go out early.
            bulk.collect(out, None).map_err(|e| self.error(e))?;
        }
        let event = record.event;
        let action = match self.builder.build(&event.value, record.value, &event.raw) {
            Ok(action) => action,
            Err(refusal) => {
                out.dead_letters.push(DeadLetter {
                    step: self.step.clone(),
                    reason: refusal.to_string(),
                    original: event.raw.clone(),
                });
                return Ok(());
            }
        };
        let result = match &mut self.transport {
            Transport::Bulk(bulk) => bulk.push(action),
            Transport::Writer(writer) => writer
                .write_all(&action.ndjson)
                .map_err(|source| SearchError::Output { source }),
        };
        result.map_err(|e| self.error(e))
    }

    fn backpressured(&self) -> bool {
        match &self.transport {
            Transport::Bulk(bulk) => bulk
                .worker
                .shared
                .in_flight
                .reaches(bulk.max_in_flight_bytes),
            Transport::Writer(_) => false,
        }
    }

    fn prepare(&mut self, wait: Duration, out: &mut SinkOutput) -> Result<Prepared, SinkError> {
        let result = match &mut self.transport {
            Transport::Writer(writer) => writer
                .flush()
                .map(|()| Prepared::Ready)
                .map_err(|source| SearchError::Output { source }),
            Transport::Bulk(bulk) => {
                let deadline = Instant::now().checked_add(wait);
                (0..bulk.buffers.len())
                    .try_for_each(|lane| bulk.send(lane))
                    .and_then(|()| bulk.collect(out, deadline.or(Some(far_future()))))
                    .map(|done| {
                        if done {
                            Prepared::Ready
                        } else {
                            Prepared::Pending
                        }
                    })
            }
        };
        result.map_err(|e| self.error(e))
    }

    fn abort(&mut self) {
        // Buffered documents are dropped: the host writes their events again.
        // Requests in flight finish; writing a document twice is harmless.
        if let Transport::Bulk(bulk) = &mut self.transport {
            for buffer in &mut bulk.buffers {
                *buffer = Buffer::default();
            }
            bulk.epoch += 1;
        }
    }
}

/// A deadline for a wait too long to represent (`Duration::MAX`).
fn far_future() -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(86_400 * 365))
        .unwrap_or(now)
}
