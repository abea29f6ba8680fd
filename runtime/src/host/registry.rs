//! The schema registry, for a stage that reads or writes Avro.
//!
//! Reading (`plan.source.avro`): before a polled batch is parsed, the writer
//! schemas it names are fetched (once each, then kept). A registry that
//! cannot answer is no record's fault: the batch is not parsed, its
//! partitions are read again from its first records after a backoff, and
//! nothing is dead-lettered or skipped; the stage says it waits in its log
//! and its metrics.
//!
//! Writing (`plan.sinks[].avro`): a sink's schema is registered (or a pinned
//! version looked up) when the instance starts, before it is ready.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use keystone_avro::registry::{Registry, RegistryError, until_available};
use keystone_avro::{AvroSchema, Shape};
use keystone_crds::plan::{PlanAvroSink, PlanAvroSource, PlanAvroWriter};

use super::process::Records;
use crate::avro::AvroDecoder;
use crate::connectors::kafka::AvroWriter;
use crate::registry::client;

/// How long one question to the registry may take before it counts as unanswered.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Fetches the writer schemas of the batches a stage reads.
pub(super) struct SchemaFetcher {
    decoder: Arc<AvroDecoder>,
    registry: Registry,
    /// The registry client is async; the stage's loop is not.
    runtime: tokio::runtime::Runtime,
    backoff: Option<ExponentialBackoff>,
}

/// Why a batch waits, and for how long.
#[derive(Debug)]
pub(super) struct Waiting {
    pub(super) error: RegistryError,
    pub(super) retry_in: Duration,
}

impl SchemaFetcher {
    /// A fetcher for `avro`, with credentials and a CA from the environment.
    pub(super) fn new(
        avro: &PlanAvroSource,
        env: impl Fn(&str) -> Option<String>,
        read_file: impl Fn(&str) -> std::io::Result<Vec<u8>>,
    ) -> Result<Self, String> {
        let which = |e: &dyn std::fmt::Display| {
            format!("the plan's reader schema ({}): {e}", avro.reader_name())
        };
        let reader = AvroSchema::parse_str(&avro.reader_schema).map_err(|e| which(&e))?;
        let shape = Shape::new(reader).map_err(|e| which(&e))?;
        let (runtime, registry) = client(&avro.registry_url, &env, &read_file)?;
        Ok(Self {
            decoder: Arc::new(AvroDecoder::new(shape)),
            registry,
            runtime,
            backoff: None,
        })
    }

    /// The decoder the stage's source check reads records with.
    pub(super) fn decoder(&self) -> Arc<AvroDecoder> {
        self.decoder.clone()
    }

    /// Fetches the writer schemas `batch` names that are not known yet. `Ok`:
    /// every record of the batch can be parsed now. `Err`: the registry did
    /// not answer (down, slow, refusing the credentials); the batch must be
    /// read again after `retry_in`, which grows from 100 ms to 10 s while the
    /// registry stays away.
    pub(super) fn prepare(&mut self, batch: &BTreeMap<i32, Records>) -> Result<(), Waiting> {
        let unknown = self.decoder.unknown_ids(
            batch
                .values()
                .flatten()
                .filter_map(|(_, payload, _)| payload.as_deref()),
        );
        for id in unknown {
            let answer = self.runtime.block_on(async {
                tokio::time::timeout(ASK_TIMEOUT, self.registry.schema_by_id(id))
                    .await
                    .unwrap_or_else(|_| {
                        Err(RegistryError::Unavailable {
                            url: self.registry.base_url().to_owned(),
                            reason: format!("no answer for schema id {id} within {ASK_TIMEOUT:?}"),
                        })
                    })
            });
            if let Err(error) = self.decoder.learn(id, answer) {
                let backoff = self.backoff.get_or_insert_with(|| {
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_delay(Duration::from_secs(10))
                        .without_max_times()
                        .build()
                });
                let retry_in = backoff.next().unwrap_or(Duration::from_secs(10));
                return Err(Waiting { error, retry_in });
            }
        }
        self.backoff = None;
        Ok(())
    }
}

/// The schema and id a Kafka sink writes with (`plan.sinks[].avro`): its
/// schema registered under the subject, or a pinned version looked up. While
/// the registry cannot answer, the instance waits (it is not ready yet);
/// a refusal (an incompatible schema, a version that does not exist, bad
/// credentials) ends it with the registry's reason.
pub(super) fn sink_writer(
    sink: &str,
    avro: &PlanAvroSink,
    env: impl Fn(&str) -> Option<String>,
    read_file: impl Fn(&str) -> std::io::Result<Vec<u8>>,
) -> Result<AvroWriter, String> {
    let (runtime, registry) = client(&avro.registry_url, &env, &read_file)?;
    let waiting = |error: &RegistryError, retry_in: Duration| {
        tracing::warn!(sink, %error, ?retry_in, "waiting for the schema registry before writing");
    };
    let subject = avro.subject.as_str();
    let (id, schema) = runtime
        .block_on(async {
            match &avro.writer {
                PlanAvroWriter::Register { schema } => {
                    let parsed =
                        AvroSchema::parse_str(schema).map_err(|e| RegistryError::NotAvro {
                            what: format!("the schema of sink {sink}"),
                            reason: e.to_string(),
                        })?;
                    let id =
                        until_available(|| registry.register(subject, schema), waiting).await?;
                    Ok((id, parsed))
                }
                PlanAvroWriter::Version { version } => {
                    let registered =
                        until_available(|| registry.version(subject, *version), waiting).await?;
                    Ok((registered.id, AvroSchema::clone(&registered.schema)))
                }
            }
        })
        .map_err(|e: RegistryError| format!("sink {sink}, subject {subject}: {e}"))?;
    let shape = Shape::new(schema).map_err(|e| format!("sink {sink}, subject {subject}: {e}"))?;
    let writer =
        AvroWriter::new(shape, id).map_err(|e| format!("sink {sink}, subject {subject}: {e}"))?;
    tracing::info!(sink, subject, id, "writing Avro with the registered schema");
    Ok(writer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_that_is_down_makes_the_batch_wait_longer_each_time() {
        let plan = PlanAvroSource {
            // Nothing listens on port 9 of loopback (discard is not served).
            registry_url: "http://127.0.0.1:9".into(),
            subject: "t-value".into(),
            version: 1,
            reader_schema:
                r#"{"type": "record", "name": "R", "fields": [{"name": "id", "type": "long"}]}"#
                    .into(),
        };
        let mut fetcher = SchemaFetcher::new(&plan, |_| None, |_| Ok(Vec::new())).expect("fetcher");
        let record = keystone_avro::wire::frame(3, b"\x02");
        let batch = BTreeMap::from([(0, vec![(0i64, Some(record), None)])]);
        let first = fetcher.prepare(&batch).expect_err("waits");
        assert!(first.error.is_transient(), "{:?}", first.error);
        let second = fetcher.prepare(&batch).expect_err("waits");
        assert!(
            second.retry_in > first.retry_in,
            "{first:?} then {second:?}"
        );
        // Bytes that name no schema need no registry: they are dead letters.
        let not_avro = BTreeMap::from([(0, vec![(1i64, Some(b"{}".to_vec()), None)])]);
        assert!(fetcher.prepare(&not_avro).is_ok());
    }
}
