//! The HTTP server of an ingest endpoint: `POST <path>` for events, `GET
//! /healthz`, `/readyz` and `/metrics` beside it.
//!
//! Memory stays bounded whatever clients do: at most `max_in_flight`
//! requests are read at once (each at most the body limit); past that a
//! request is answered 503 with `Retry-After` at once, before its body is
//! read. Slow clients are cut off: headers must arrive within
//! `header_timeout`, the body within `body_timeout` (408).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::endpoint::{Answer, Endpoint, Request};
use super::tls::ReloadingTls;

/// How the server treats connections.
#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    pub max_in_flight: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    /// How long a shutdown waits for requests being answered.
    pub drain_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_in_flight: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// What one listener serves.
#[derive(Debug, Clone)]
pub struct Listening {
    /// TLS on every connection; plain HTTP when `None`.
    pub tls: Option<ReloadingTls>,
    /// Whether events are taken here. A plain port beside a TLS one serves
    /// only the probes and metrics, so no event crosses the network in clear.
    pub events: bool,
}

impl Listening {
    /// Plain HTTP, events included: an endpoint without TLS.
    pub fn plain() -> Self {
        Listening {
            tls: None,
            events: true,
        }
    }
}

/// Serves `endpoint` on `listener` until `shutdown` resolves; then stops
/// accepting and waits (up to the drain timeout) for the requests being
/// answered, so that no delivered request loses its answer to a shutdown.
pub async fn serve(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    settings: ServerSettings,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    serve_as(listener, endpoint, settings, Listening::plain(), shutdown).await
}

/// [`serve`], with TLS or without events as `listening` says.
pub async fn serve_as(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    settings: ServerSettings,
    listening: Listening,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(settings.max_in_flight));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = crate::host::accept_retrying(&listener) => accepted,
            () = &mut shutdown => break,
        };
        let connection = Connection {
            endpoint: endpoint.clone(),
            permits: permits.clone(),
            settings,
            events: listening.events,
            peer,
        };
        let tls = listening.tls.clone();
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return connection.serve(stream).await;
            };
            // A client that never finishes its handshake is cut off like one
            // that never sends its headers.
            match tokio::time::timeout(settings.header_timeout, tls.acceptor().accept(stream)).await
            {
                Ok(Ok(stream)) => connection.serve(stream).await,
                Ok(Err(error)) => {
                    connection.endpoint.metrics.refused("tls", None);
                    tracing::debug!(%peer, %error, "ingest TLS handshake refused");
                }
                Err(_) => {
                    connection.endpoint.metrics.refused("tls", None);
                    tracing::debug!(%peer, "ingest TLS handshake timed out");
                }
            }
        });
    }
    let draining = permits.acquire_many(settings.max_in_flight as u32);
    if tokio::time::timeout(settings.drain_timeout, draining)
        .await
        .is_err()
    {
        tracing::warn!("ingest requests still being answered at shutdown");
    }
    Ok(())
}

/// One accepted connection and what it shares with the others.
struct Connection {
    endpoint: Arc<Endpoint>,
    permits: Arc<Semaphore>,
    settings: ServerSettings,
    events: bool,
    peer: SocketAddr,
}

impl Connection {
    async fn serve<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            endpoint,
            permits,
            settings,
            events,
            peer,
        } = self;
        let service = service_fn(move |request| {
            answer(request, endpoint.clone(), permits.clone(), settings, events)
        });
        let served = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_timeout)
            .serve_connection(TokioIo::new(io), service)
            .await;
        if let Err(error) = served {
            tracing::debug!(%peer, %error, "ingest connection closed with an error");
        }
    }
}

/// Binds `addr` and serves until `shutdown`, as `listening` says.
pub async fn bind_and_serve(
    addr: SocketAddr,
    endpoint: Arc<Endpoint>,
    settings: ServerSettings,
    listening: Listening,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(
        %addr,
        path = %endpoint.path,
        tls = listening.tls.is_some(),
        events = listening.events,
        "ingest endpoint listening"
    );
    serve_as(listener, endpoint, settings, listening, shutdown).await
}

/// Answers one request; every answer of the events path is counted by its
/// status, refusals before the body included.
async fn answer(
    request: hyper::Request<Incoming>,
    endpoint: Arc<Endpoint>,
    permits: Arc<Semaphore>,
    settings: ServerSettings,
    events: bool,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let counted = events && request.uri().path() == endpoint.path;
    let started = std::time::Instant::now();
    let response = respond(request, endpoint.clone(), permits, settings, events).await;
    if counted && let Ok(response) = &response {
        endpoint
            .metrics
            .answered(response.status().as_u16(), started.elapsed());
    }
    response
}

async fn respond(
    request: hyper::Request<Incoming>,
    endpoint: Arc<Endpoint>,
    permits: Arc<Semaphore>,
    settings: ServerSettings,
    events: bool,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = request.uri().path();
    if path != endpoint.path || !events {
        return Ok(match (request.method(), path) {
            (&Method::GET, "/healthz" | "/readyz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/metrics") => Response::builder()
                .header("content-type", "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(endpoint.metrics.render())))
                .expect("a valid response"),
            _ if !events => json(&Answer {
                status: 404,
                body: serde_json::json!({
                    "error": "this port serves only probes and metrics: events go to the endpoint's TLS port"
                }),
                retry_after: None,
            }),
            _ => json(&Answer {
                status: 404,
                body: serde_json::json!({
                    "error": format!("no endpoint at {path:?}: events go to POST {}", endpoint.path)
                }),
                retry_after: None,
            }),
        });
    }
    if request.method() != Method::POST {
        let mut response = json(&Answer {
            status: 405,
            body: serde_json::json!({ "error": "send events with POST" }),
            retry_after: None,
        });
        response
            .headers_mut()
            .insert("allow", HeaderValue::from_static("POST"));
        return Ok(response);
    }
    // Who sent it is settled before the body is read: a stranger's body is
    // never buffered.
    let headers = request.headers().clone();
    let authorization = headers.get("authorization").map(HeaderValue::as_bytes);
    let token = match endpoint.identify(authorization) {
        Ok(token) => token,
        Err(refused) if refused.status == 403 => {
            endpoint.metrics.refused("forbidden", None);
            return Ok(json(&refused));
        }
        Err(refused) => {
            endpoint.metrics.refused("unauthorized", None);
            let mut response = json(&refused);
            response.headers_mut().insert(
                "www-authenticate",
                HeaderValue::from_static("Bearer realm=\"keystone-ingest\""),
            );
            return Ok(response);
        }
    };
    let Ok(_permit) = permits.try_acquire() else {
        endpoint.metrics.refused("busy", token.as_deref());
        return Ok(json(&Answer {
            status: 503,
            body: serde_json::json!({ "error": "too many requests in flight: retry after the Retry-After seconds" }),
            retry_after: Some(1),
        }));
    };
    let _in_flight = endpoint.metrics.in_flight();
    let limit = endpoint.limits.max_body_bytes;
    let too_large = || {
        json(&Answer {
            status: 413,
            body: serde_json::json!({ "error": format!("the body is larger than the limit of {limit} bytes") }),
            retry_after: None,
        })
    };
    let declared = header(&headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Ok(too_large());
    }
    let read = Limited::new(request.into_body(), limit).collect();
    let body = match tokio::time::timeout(settings.body_timeout, read).await {
        Ok(Ok(collected)) => collected.to_bytes().to_vec(),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => {
            return Ok(too_large());
        }
        Ok(Err(error)) => {
            tracing::debug!(%error, "ingest body not read");
            return Ok(json(&Answer {
                status: 400,
                body: serde_json::json!({ "error": format!("the body could not be read: {error}") }),
                retry_after: None,
            }));
        }
        Err(_) => {
            return Ok(json(&Answer {
                status: 408,
                body: serde_json::json!({ "error": format!(
                    "the body did not arrive within {} s", settings.body_timeout.as_secs()
                )}),
                retry_after: None,
            }));
        }
    };
    let answer = endpoint
        .handle(Request {
            token: token.as_deref(),
            content_type: header(&headers, "content-type"),
            content_encoding: header(&headers, "content-encoding"),
            idempotency_key: header(&headers, "idempotency-key"),
            traceparent: header(&headers, "traceparent"),
            body,
        })
        .await;
    Ok(json(&answer))
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a valid response")
}

fn json(answer: &Answer) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec(&answer.body).unwrap_or_default();
    body.push(b'\n');
    let mut response = Response::builder()
        .status(StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response");
    if let Some(seconds) = answer.retry_after {
        response
            .headers_mut()
            .insert("retry-after", HeaderValue::from(seconds));
    }
    response
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn stop_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let terminated = async {
        match terminate.as_mut() {
            Some(signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminated => {}
    }
}
