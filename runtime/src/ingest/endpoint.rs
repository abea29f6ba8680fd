//! One ingest request, from its headers to the answer: who sent it, whether
//! it is within its limits, its records checked against the contract, and a
//! 2xx only once every accepted record is delivered (acknowledged by the
//! broker, or handed to a local pipeline).
//!
//! The answer is always JSON: `{"accepted": n}` on success; with refused
//! records `{"error", "accepted", "refused", "errors": [{index, field,
//! reason}]}`; for a refusal of the whole request `{"error": reason}`.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::json;

use super::body::{self, Contract, Encoding, Framing, Limits, RecordError, Refusal, Stamp};
use super::metrics::IngestMetrics;
use super::tokens::{Identity, Tokens};
use crate::Event;
use crate::event::record_key;
use keystone_crds::pipeline::http::{HttpPartial, HttpSourceSpec};
use tracing::Instrument;

/// A record accepted at the edge, ready for the topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The Kafka record key, from the contract's key fields.
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
}

/// Who sent a request's records: the same for each of them, so it travels
/// once per request, not on every record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The name of the token that sent them (none on an open endpoint).
    pub token: Option<String>,
    /// The W3C trace context the request carried (`traceparent`), so that a
    /// consumer can join the sender's trace.
    pub traceparent: Option<String>,
}

/// Why records cannot be delivered now: not the sender's fault, so the
/// answer is 503 with `Retry-After`, and nothing of the request is promised.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub reason: String,
    pub retry_after: Duration,
}

/// Where accepted records go: a Kafka topic (acks=all), or a local pipeline.
pub trait Deliver: Send + Sync + 'static {
    /// Resolves `Ok` once every record is durable.
    fn deliver(
        &self,
        origin: Origin,
        records: Vec<Record>,
    ) -> BoxFuture<'_, Result<(), Unavailable>>;
}

/// What a batch with refused records gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Partial {
    /// The batch is refused whole (422): nothing of it enters the topic.
    #[default]
    RejectAll,
    /// The valid records are delivered; the answer lists the refused ones.
    AcceptValid,
}

/// How retried requests are told apart from new ones.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Idempotency {
    #[default]
    None,
    /// Each request carries an `Idempotency-Key` header; the endpoint writes
    /// `<key>/<index>` into this top-level field of each record, which the
    /// pipeline's dedup keys on.
    Header { field: String },
}

/// A rate limit per token, in records.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub records_per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

/// The endpoint's settings and what it delivers to.
pub struct Endpoint {
    pub path: String,
    pub limits: Limits,
    pub partial: Partial,
    pub idempotency: Idempotency,
    contract: Contract,
    /// `None`: an open endpoint (local mode on a laptop).
    tokens: Option<Tokens>,
    rate: Option<(RateLimit, DefaultKeyedRateLimiter<String>)>,
    deliver: Arc<dyn Deliver>,
    pub metrics: IngestMetrics,
}

/// An answer: the status, its JSON body, and a `Retry-After` in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
    pub retry_after: Option<u64>,
}

impl Answer {
    fn refused(refusal: Refusal) -> Self {
        Answer {
            status: refusal.status,
            body: json!({ "error": refusal.reason }),
            retry_after: None,
        }
    }
}

/// The parts of a request the endpoint reads.
#[derive(Debug, Default)]
pub struct Request<'a> {
    /// The name of the token that sent it (`None` on an open endpoint), as
    /// [`Endpoint::identify`] found it before the body was read.
    pub token: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    /// The `traceparent` header; kept on the records when well-formed.
    pub traceparent: Option<&'a str>,
    pub body: Vec<u8>,
}

impl Endpoint {
    pub fn new(
        path: String,
        limits: Limits,
        contract: Contract,
        tokens: Option<Tokens>,
        rate: Option<RateLimit>,
        deliver: Arc<dyn Deliver>,
    ) -> Self {
        let rate = rate.map(|rate| {
            let quota = Quota::per_second(rate.records_per_second).allow_burst(rate.burst);
            (rate, RateLimiter::keyed(quota))
        });
        Endpoint {
            path,
            limits,
            partial: Partial::default(),
            idempotency: Idempotency::default(),
            contract,
            tokens,
            rate,
            deliver,
            metrics: IngestMetrics::new(),
        }
    }

    /// The endpoint a pipeline's `spec.source.http` declares.
    pub fn from_spec(
        http: &HttpSourceSpec,
        contract: Contract,
        tokens: Option<Tokens>,
        deliver: Arc<dyn Deliver>,
    ) -> Self {
        let rate = http.rate_limit.as_ref().and_then(|limit| {
            let per_second = NonZeroU32::new(u32::try_from(limit.records_per_second).ok()?)?;
            let burst = limit
                .burst
                .and_then(|b| NonZeroU32::new(u32::try_from(b).ok()?))
                .unwrap_or(per_second);
            Some(RateLimit {
                records_per_second: per_second,
                burst,
            })
        });
        let limits = Limits {
            max_body_bytes: usize::try_from(http.max_body_bytes).unwrap_or(usize::MAX),
            max_records: usize::try_from(http.max_records).unwrap_or(1),
        };
        let mut endpoint =
            Endpoint::new(http.path.clone(), limits, contract, tokens, rate, deliver);
        endpoint.partial = match http.partial {
            HttpPartial::RejectAll => Partial::RejectAll,
            HttpPartial::AcceptValid => Partial::AcceptValid,
        };
        if let Some(field) = &http.idempotency_field {
            endpoint.idempotency = Idempotency::Header {
                field: field.clone(),
            };
        }
        endpoint
    }

    /// Who sent the request, or its refusal: 401 for one that proves nothing,
    /// 403 for a token granted to other pipelines only.
    pub fn identify(&self, authorization: Option<&[u8]>) -> Result<Option<String>, Answer> {
        let Some(tokens) = &self.tokens else {
            return Ok(None);
        };
        match tokens.identify(authorization) {
            Identity::Token(name) => Ok(Some(name)),
            Identity::Missing => Err(Answer::refused(Refusal {
                status: 401,
                reason: "send a bearer token of this pipeline: Authorization: Bearer <token>"
                    .to_owned(),
            })),
            Identity::Unknown => Err(Answer::refused(Refusal {
                status: 401,
                reason: "the bearer token is none of this pipeline's".to_owned(),
            })),
            Identity::NotGranted(name) => Err(Answer::refused(Refusal {
                status: 403,
                reason: format!(
                    "the token {name:?} may not send to this pipeline (it is not in spec.source.http.grantedTokens)"
                ),
            })),
        }
    }

    /// Answers one request of the sender [`Endpoint::identify`] named,
    /// delivering its accepted records first.
    pub async fn handle(&self, request: Request<'_>) -> Answer {
        let started = Instant::now();
        let span = tracing::debug_span!(
            "ingest_request",
            token = request.token.unwrap_or_default(),
            idempotency_key = request.idempotency_key.unwrap_or_default(),
            traceparent = request.traceparent.unwrap_or_default(),
        );
        let answer = self.accept(request).instrument(span.clone()).await;
        let elapsed = started.elapsed();
        span.in_scope(|| {
            tracing::debug!(
                status = answer.status,
                elapsed_ms = elapsed.as_millis() as u64,
                "ingest request answered"
            )
        });
        answer
    }

    async fn accept(&self, request: Request<'_>) -> Answer {
        let token = request.token;
        let refuse = |reason: &'static str, refusal: Refusal| {
            self.metrics.refused(reason, token);
            Answer::refused(refusal)
        };
        self.metrics.received_bytes(request.body.len());
        let framing = match Framing::from_content_type(request.content_type) {
            Ok(framing) => framing,
            Err(refusal) => return refuse("unsupported_media_type", refusal),
        };
        let encoding = match Encoding::from_header(request.content_encoding) {
            Ok(encoding) => encoding,
            Err(refusal) => return refuse("unsupported_media_type", refusal),
        };
        let stamp = match (&self.idempotency, request.idempotency_key) {
            (Idempotency::Header { .. }, None | Some("")) => {
                return refuse(
                    "bad_request",
                    Refusal {
                        status: 400,
                        reason: "this endpoint needs an Idempotency-Key header: a key unique to the request, sent again unchanged with each retry".to_owned(),
                    },
                );
            }
            (Idempotency::Header { field }, Some(key)) => Some(Stamp { field, key }),
            (Idempotency::None, _) => None,
        };
        let decoded = match body::decode(request.body, encoding, self.limits.max_body_bytes) {
            Ok(decoded) => decoded,
            Err(refusal) => return refuse(reason_of(refusal.status), refusal),
        };
        let checked = match body::records(&decoded, framing, self.limits, &self.contract, stamp) {
            Ok(checked) => checked,
            Err(refusal) => return refuse(reason_of(refusal.status), refusal),
        };
        let total = checked.len();
        let (mut events, mut errors) = (Vec::with_capacity(total), Vec::new());
        for record in checked {
            match record {
                Ok(event) => events.push(event),
                Err(error) => errors.push(error),
            }
        }
        if !errors.is_empty() {
            self.metrics.refused_records(token, errors.len());
            if self.partial == Partial::RejectAll || events.is_empty() {
                self.metrics.refused("invalid", token);
                return Answer {
                    status: 422,
                    body: batch_body(0, total, &errors, "no record was accepted"),
                    retry_after: None,
                };
            }
        }
        if let Err(refused) = self.admit(token, events.len()) {
            return refused;
        }
        let origin = Origin {
            token: token.map(str::to_owned),
            traceparent: request
                .traceparent
                .filter(|t| is_trace_context(t))
                .map(str::to_owned),
        };
        let records: Vec<Record> = events.into_iter().map(|event| self.record(event)).collect();
        let accepted = records.len();
        if accepted > 0
            && let Err(unavailable) = self.deliver.deliver(origin, records).await
        {
            self.metrics.refused("unavailable", token);
            tracing::warn!(reason = %unavailable.reason, "ingest request not delivered");
            return Answer {
                status: 503,
                body: json!({ "error": format!(
                    "the request was not stored ({}): retry it, with the same Idempotency-Key if it has one, so that records stored before the failure are not kept twice",
                    unavailable.reason
                )}),
                retry_after: Some(unavailable.retry_after.as_secs().max(1)),
            };
        }
        self.metrics.accepted_records(token, accepted);
        let body = if errors.is_empty() {
            json!({ "accepted": accepted })
        } else {
            batch_body(accepted, total, &errors, "some records were refused")
        };
        Answer {
            status: 200,
            body,
            retry_after: None,
        }
    }

    /// Takes `count` records from the token's rate budget, or answers why not:
    /// 429 with the wait, or 413 for a batch larger than the burst (it would
    /// never pass).
    fn admit(&self, token: Option<&str>, count: usize) -> Result<(), Answer> {
        let Some((rate, limiter)) = &self.rate else {
            return Ok(());
        };
        let Some(cost) = NonZeroU32::new(u32::try_from(count).unwrap_or(u32::MAX)) else {
            return Ok(());
        };
        let wait = match limiter.check_key_n(&token.unwrap_or_default().to_owned(), cost) {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(not_until)) => not_until.wait_time_from(DefaultClock::default().now()),
            Err(_) => {
                self.metrics.refused("rate_limited", token);
                return Err(Answer::refused(Refusal {
                    status: 413,
                    reason: format!(
                        "the request has {count} records, more than the rate limit's burst of {}: send smaller batches",
                        rate.burst
                    ),
                }));
            }
        };
        self.metrics.refused("rate_limited", token);
        Err(Answer {
            status: 429,
            body: json!({ "error": format!(
                "past the rate limit of {} records per second for this token: retry after the Retry-After seconds",
                rate.records_per_second
            )}),
            retry_after: Some(
                u64::try_from(wait.as_millis().div_ceil(1000))
                    .unwrap_or(u64::MAX)
                    .max(1),
            ),
        })
    }

    fn record(&self, event: Event) -> Record {
        Record {
            key: record_key(&event, self.contract.key()),
            value: event.raw,
        }
    }
}

/// A W3C `traceparent` of version 00: `00-<32 hex>-<16 hex>-<2 hex>`. Anything
/// else is not carried onto the records.
fn is_trace_context(value: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut parts = value.split('-');
    let mut next = |n: usize| parts.next().is_some_and(|p| hex(p, n));
    value.starts_with("00-") && next(2) && next(32) && next(16) && next(2) && parts.next().is_none()
}

fn batch_body(
    accepted: usize,
    total: usize,
    errors: &[RecordError],
    summary: &str,
) -> serde_json::Value {
    let errors: Vec<serde_json::Value> = errors
        .iter()
        .map(|e| json!({ "index": e.index, "field": e.field, "reason": e.reason }))
        .collect();
    json!({
        "error": format!("{summary}: {} of {total} record(s) do not meet the pipeline's source contract", errors.len()),
        "accepted": accepted,
        "refused": errors.len(),
        "errors": errors,
    })
}

/// The metrics label of a whole-request refusal.
fn reason_of(status: u16) -> &'static str {
    match status {
        413 => "too_large",
        415 => "unsupported_media_type",
        _ => "bad_request",
    }
}
