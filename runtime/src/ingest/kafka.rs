//! Delivery to the pipeline's source topic with the stages' producer settings
//! (idempotent, `acks=all`, the Java partitioner): a 2xx means every record
//! of the request is on the in-sync replicas. The producer's queue bounds the
//! memory held for the broker; a full queue, a failed delivery or one that
//! takes longer than the delivery timeout is a 503, and the client retries.
//! A retry may write again records that were stored before the failure: the
//! idempotency key stamped on each record lets the pipeline's dedup drop them.

use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use tokio::sync::Notify;

use super::endpoint::{Deliver, Origin, Record, Unavailable};
use crate::kafka::KafkaSettings;

/// The header carrying the sender's W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The header naming the token that sent a record.
pub const TOKEN_HEADER: &str = "keystone-ingest-token";

/// How long a client is asked to wait after the broker failed it.
const RETRY_AFTER: Duration = Duration::from_secs(2);

pub struct KafkaDelivery {
    producer: ThreadedProducer<AckContext>,
    topic: String,
    delivery_timeout: Duration,
}

/// How much longer than the delivery timeout a request waits for the
/// producer's own verdict before it is answered 503 regardless: librdkafka
/// expires the records of a broker that went away only when it next tries to
/// reconnect, up to its reconnect backoff later.
const VERDICT_GRACE: Duration = Duration::from_millis(500);

impl KafkaDelivery {
    /// A producer for `topic`; a record not acknowledged within
    /// `delivery_timeout` fails its request. At most `max_queued_bytes` wait
    /// for the broker at once.
    pub fn new(
        settings: &KafkaSettings,
        topic: String,
        delivery_timeout: Duration,
        max_queued_bytes: usize,
    ) -> Result<Self, KafkaError> {
        let mut config = crate::kafka::config::producer(settings, None);
        config
            .set(
                "message.timeout.ms",
                delivery_timeout.as_millis().to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                (max_queued_bytes / 1024).max(1).to_string(),
            )
            // A broker back from an outage is found within a second, not ten.
            .set("reconnect.backoff.max.ms", "1000");
        // The user's settings win over these too, as over the stages'.
        for (key, value) in &settings.extra {
            config.set(key, value);
        }
        Ok(KafkaDelivery {
            producer: config.create_with_context(AckContext)?,
            topic,
            delivery_timeout,
        })
    }
}

/// What the broker said of one request's records so far: the request waits
/// for one signal, not for a future per record.
pub struct RequestAcks {
    remaining: AtomicUsize,
    failure: Mutex<Option<KafkaError>>,
    done: Notify,
}

/// Counts each request's acknowledgements down from the producer's thread.
pub struct AckContext;

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Arc<RequestAcks>;

    fn delivery(&self, result: &DeliveryResult<'_>, acks: Arc<RequestAcks>) {
        if let Err((error, _)) = result
            && let Ok(mut failure) = acks.failure.lock()
        {
            failure.get_or_insert_with(|| error.clone());
        }
        if acks.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Stored as a permit when the request is not waiting yet.
            acks.done.notify_one();
        }
    }
}

impl Deliver for KafkaDelivery {
    fn deliver(
        &self,
        origin: Origin,
        records: Vec<Record>,
    ) -> BoxFuture<'_, Result<(), Unavailable>> {
        Box::pin(async move {
            let acks = Arc::new(RequestAcks {
                remaining: AtomicUsize::new(records.len()),
                failure: Mutex::new(None),
                done: Notify::new(),
            });
            // Built once: every record of a request names the same sender.
            let mut headers = OwnedHeaders::new_with_capacity(2);
            if let Some(token) = &origin.token {
                headers = headers.insert(Header {
                    key: TOKEN_HEADER,
                    value: Some(token.as_bytes()),
                });
            }
            if let Some(traceparent) = &origin.traceparent {
                headers = headers.insert(Header {
                    key: TRACEPARENT_HEADER,
                    value: Some(traceparent.as_bytes()),
                });
            }
            let with_headers = headers.count() > 0;
            for record in &records {
                let mut message =
                    BaseRecord::with_opaque_to(&self.topic, acks.clone()).payload(&record.value);
                if let Some(key) = &record.key {
                    message = message.key(key);
                }
                if with_headers {
                    message = message.headers(headers.clone());
                }
                match self.producer.send(message) {
                    Ok(()) => {}
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        return Err(Unavailable {
                            reason: "the records waiting for the broker fill the ingest's buffer"
                                .to_owned(),
                            retry_after: Duration::from_secs(1),
                        });
                    }
                    Err((error, _)) => return Err(unavailable(&error)),
                }
            }
            let waited = self.delivery_timeout + VERDICT_GRACE;
            if tokio::time::timeout(waited, acks.done.notified())
                .await
                .is_err()
            {
                return Err(Unavailable {
                    reason: format!(
                        "the broker did not acknowledge the records within {} s",
                        self.delivery_timeout.as_secs_f64()
                    ),
                    retry_after: RETRY_AFTER,
                });
            }
            match acks.failure.lock().ok().and_then(|mut f| f.take()) {
                Some(error) => Err(unavailable(&error)),
                None => Ok(()),
            }
        })
    }
}

fn unavailable(error: &KafkaError) -> Unavailable {
    Unavailable {
        reason: format!("the broker did not store the records: {error}"),
        retry_after: RETRY_AFTER,
    }
}
