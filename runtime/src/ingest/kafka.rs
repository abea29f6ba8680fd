//! Delivery to the pipeline's source topic with the stages' producer settings
//! (idempotent, `acks=all`, the Java partitioner): a 2xx means every record
//! of the request is on the in-sync replicas. The producer's queue bounds the
//! memory held for the broker; a full queue, a failed delivery or one that
//! takes longer than the delivery timeout is a 503, and the client retries.
//! A retry may write again records that were stored before the failure: the
//! idempotency key stamped on each record lets the pipeline's dedup drop them.

use std::time::Duration;

use futures::future::{BoxFuture, join_all};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::endpoint::{Deliver, Record, Unavailable};
use crate::kafka::KafkaSettings;

/// The header carrying the sender's W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The header naming the token that sent a record.
pub const TOKEN_HEADER: &str = "keystone-ingest-token";

/// How long a client is asked to wait after the broker failed it.
const RETRY_AFTER: Duration = Duration::from_secs(2);

pub struct KafkaDelivery {
    producer: FutureProducer,
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
            producer: config.create()?,
            topic,
            delivery_timeout,
        })
    }
}

impl Deliver for KafkaDelivery {
    fn deliver(&self, records: Vec<Record>) -> BoxFuture<'_, Result<(), Unavailable>> {
        Box::pin(async move {
            let mut pending = Vec::with_capacity(records.len());
            for record in &records {
                let mut message = FutureRecord::to(&self.topic).payload(&record.value);
                if let Some(key) = &record.key {
                    message = message.key(key);
                }
                let mut headers = OwnedHeaders::new();
                if let Some(token) = &record.token {
                    headers = headers.insert(Header {
                        key: TOKEN_HEADER,
                        value: Some(token.as_bytes()),
                    });
                }
                if let Some(traceparent) = &record.traceparent {
                    headers = headers.insert(Header {
                        key: TRACEPARENT_HEADER,
                        value: Some(traceparent.as_bytes()),
                    });
                }
                if record.token.is_some() || record.traceparent.is_some() {
                    message = message.headers(headers);
                }
                match self.producer.send_result(message) {
                    Ok(delivery) => pending.push(delivery),
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
            let Ok(outcomes) = tokio::time::timeout(waited, join_all(pending)).await else {
                return Err(Unavailable {
                    reason: format!(
                        "the broker did not acknowledge the records within {} s",
                        self.delivery_timeout.as_secs_f64()
                    ),
                    retry_after: RETRY_AFTER,
                });
            };
            for outcome in outcomes {
                match outcome {
                    Ok(Ok(_)) => {}
                    Ok(Err((error, _))) => return Err(unavailable(&error)),
                    Err(_cancelled) => {
                        return Err(Unavailable {
                            reason: "the producer stopped".to_owned(),
                            retry_after: RETRY_AFTER,
                        });
                    }
                }
            }
            Ok(())
        })
    }
}

fn unavailable(error: &KafkaError) -> Unavailable {
    Unavailable {
        reason: format!("the broker did not store the records: {error}"),
        retry_after: RETRY_AFTER,
    }
}
