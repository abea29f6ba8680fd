//! The operations endpoints on one port: `/metrics`, `/healthz`, `/readyz`,
//! `POST /checkpoint[?stop=true]`, which finishes the current transaction at a
//! barrier and answers with the committed positions (and stops processing with
//! `stop=true`), and `POST /resume`, which undoes a stop. The two `POST`s need
//! the control token (`control`); metrics and probes are open to the kubelet
//! and the scraper. A stopped instance is not ready: it processes nothing.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use keystone_crds::checkpoint::InstanceCheckpoint;

use crate::host::control::{ControlToken, refusal};
use crate::host::{Shared, accept_retrying};

/// A request handed to the engine thread, answered between two batches.
pub enum Control {
    /// Commit at a barrier and report the positions; then stop processing if `stop`.
    Checkpoint {
        stop: bool,
        reply: oneshot::Sender<Result<InstanceCheckpoint, String>>,
    },
    /// Process again after a stop.
    Resume {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Whether a query string asks for a stop (`stop=true`, `stop=1` or bare `stop`).
fn wants_stop(query: Option<&str>) -> bool {
    query.unwrap_or_default().split('&').any(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, "true"));
        name == "stop" && matches!(value, "true" | "1")
    })
}

pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    controls: mpsc::Sender<Control>,
    token: Option<ControlToken>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(
        %addr,
        control = if token.is_some() { "token" } else { "disabled (no token)" },
        "operations endpoints listening"
    );
    serve_on(listener, shared, controls, token).await
}

/// Serves the endpoints on a bound listener.
pub async fn serve_on(
    listener: TcpListener,
    shared: Arc<Shared>,
    controls: mpsc::Sender<Control>,
    token: Option<ControlToken>,
) -> std::io::Result<()> {
    let token = Arc::new(token);
    loop {
        let (stream, _) = accept_retrying(&listener).await;
        let shared = shared.clone();
        let controls = controls.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                handle(request, shared.clone(), controls.clone(), token.clone())
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "operations connection closed with an error");
            }
        });
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("a valid response")
}

async fn handle(
    request: Request<Incoming>,
    shared: Arc<Shared>,
    controls: mpsc::Sender<Control>,
    token: Arc<Option<ControlToken>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let text = "text/plain; charset=utf-8";
    if request.method() == Method::POST {
        let authorization = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if let Some((status, body)) = refusal(token.as_ref().as_ref(), authorization) {
            // Who asked is worth a line; the credential presented never is.
            tracing::warn!(
                path = request.uri().path(),
                status,
                "control request refused"
            );
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
            let mut response = respond(status, text, body);
            if status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Bearer realm=\"keystone-control\""),
                );
            }
            return Ok(response);
        }
    }
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let body = shared
                .metrics
                .lock()
                .map(|m| {
                    m.set_watchdog(
                        shared.watchdog.since_beat(),
                        shared.watchdog.stalled().is_some(),
                    );
                    m.encode()
                })
                .unwrap_or_default();
            respond(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        (&Method::GET, "/healthz") => {
            let stalled = shared
                .watchdog
                .stalled()
                .filter(|_| shared.restoring.load(Ordering::Relaxed) == 0);
            if shared.failed.load(Ordering::Relaxed) {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    text,
                    "the engine stopped on an error\n",
                )
            } else if let Some(stalled) = stalled {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    text,
                    format!(
                        "the engine made no progress for {}s (watchdog limit {}s): a step, a sink or a Kafka call is stuck\n",
                        stalled.as_secs(),
                        shared.watchdog.limit().as_secs()
                    ),
                )
            } else {
                respond(StatusCode::OK, text, "ok\n")
            }
        }
        (&Method::GET, "/readyz") => {
            let restoring = shared.restoring.load(Ordering::Relaxed);
            if !shared.running.load(Ordering::Relaxed) || !shared.joined.load(Ordering::Relaxed) {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    text,
                    "not consuming yet (joining the group)\n",
                )
            } else if restoring > 0 {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    text,
                    format!("restoring state of {restoring} partition(s)\n"),
                )
            } else if shared.stopped.load(Ordering::Relaxed) {
                // Stopped on purpose (before a replacement, or for an aligned
                // cut): it processes nothing, and says so.
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    text,
                    "stopped after a checkpoint (POST /resume continues)\n",
                )
            } else {
                respond(StatusCode::OK, text, "ready\n")
            }
        }
        (&Method::POST, "/checkpoint") => {
            let stop = wants_stop(request.uri().query());
            let (reply, answer) = oneshot::channel();
            let sent = controls.send(Control::Checkpoint { stop, reply });
            match await_engine(sent.is_ok(), answer).await {
                Ok(checkpoint) => respond(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&checkpoint).unwrap_or_default(),
                ),
                Err(response) => response,
            }
        }
        (&Method::POST, "/resume") => {
            let (reply, answer) = oneshot::channel();
            let sent = controls.send(Control::Resume { reply });
            match await_engine(sent.is_ok(), answer).await {
                Ok(()) => respond(StatusCode::OK, "application/json", "{\"stopped\":false}"),
                Err(response) => response,
            }
        }
        _ => respond(StatusCode::NOT_FOUND, text, "not found\n"),
    };
    Ok(response)
}

/// Waits for the engine's answer to a control request; an error response when the
/// request could not be sent, failed, or took longer than a minute.
async fn await_engine<T>(
    sent: bool,
    answer: oneshot::Receiver<Result<T, String>>,
) -> Result<T, Response<Full<Bytes>>> {
    let text = "text/plain; charset=utf-8";
    if !sent {
        return Err(respond(
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            "the engine is not running\n",
        ));
    }
    match tokio::time::timeout(Duration::from_secs(60), answer).await {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(reason))) => Err(respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            text,
            format!("{reason}\n"),
        )),
        Ok(Err(_)) => Err(respond(
            StatusCode::SERVICE_UNAVAILABLE,
            text,
            "the engine stopped\n",
        )),
        Err(_) => Err(respond(
            StatusCode::GATEWAY_TIMEOUT,
            text,
            "the engine did not answer within 60s\n",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::host::{Metrics, Watchdog};

    /// One request to the endpoints on `addr`: (status, body).
    async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        authorization: Option<&str>,
    ) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let header = authorization
            .map(|v| format!("Authorization: {v}\r\n"))
            .unwrap_or_default();
        stream
            .write_all(
                format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{header}Content-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    /// The real endpoints over TCP, with an engine that beats only when told to
    /// and a clock the test moves.
    #[tokio::test]
    async fn a_stalled_engine_fails_healthz_and_control_needs_the_token() {
        let clock = ManualClock::new(1_000);
        let shared = Arc::new(Shared::new(
            Metrics::new("p", "s0"),
            Watchdog::new(Arc::new(clock.clone()), Duration::from_secs(60)),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (controls, engine) = mpsc::channel();
        let token = ControlToken::new("t0k3n");
        tokio::spawn(serve_on(listener, shared.clone(), controls, token));

        shared.running.store(true, Ordering::SeqCst);
        shared.watchdog.beat();
        assert_eq!(request(addr, "GET", "/healthz", None).await.0, 200);
        clock.advance(30_000);
        assert_eq!(request(addr, "GET", "/healthz", None).await.0, 200);
        // The engine is stuck in one turn: no beat for longer than the limit.
        clock.advance(31_000);
        let (status, body) = request(addr, "GET", "/healthz", None).await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("no progress for 61s"), "{body}");
        let (_, metrics) = request(addr, "GET", "/metrics", None).await;
        let sample = |name: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(&format!("{name}{{")))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(
            sample("keystone_engine_stalled").as_deref(),
            Some("1"),
            "{metrics}"
        );
        assert_eq!(
            sample("keystone_engine_seconds_since_progress").as_deref(),
            Some("61"),
            "{metrics}"
        );
        // Restoring state is progress of another kind: not a stall.
        shared.restoring.store(1, Ordering::SeqCst);
        assert_eq!(request(addr, "GET", "/healthz", None).await.0, 200);
        shared.restoring.store(0, Ordering::SeqCst);
        shared.watchdog.beat();
        assert_eq!(request(addr, "GET", "/healthz", None).await.0, 200);

        // Control requests: refused without the token, before reaching the engine.
        for (authorization, expected) in [(None, 401), (Some("Bearer nope"), 403)] {
            let (status, body) =
                request(addr, "POST", "/checkpoint?stop=true", authorization).await;
            assert_eq!(status, expected, "{body}");
        }
        assert!(
            engine.try_recv().is_err(),
            "a refused request reaches no engine"
        );
        // With it, the request is handed to the engine (which answers here).
        let answer =
            tokio::spawn(
                async move { request(addr, "POST", "/resume", Some("Bearer t0k3n")).await },
            );
        let control = tokio::task::spawn_blocking(move || {
            engine
                .recv_timeout(Duration::from_secs(30))
                .expect("a control request")
        })
        .await
        .expect("engine");
        match control {
            Control::Resume { reply } => reply.send(Ok(())).expect("reply"),
            Control::Checkpoint { .. } => panic!("expected a resume"),
        }
        assert_eq!(answer.await.expect("answer").0, 200);
    }

    #[test]
    fn stop_is_read_from_the_query() {
        assert!(wants_stop(Some("stop=true")));
        assert!(wants_stop(Some("x=1&stop=1")));
        assert!(wants_stop(Some("stop")));
        assert!(!wants_stop(Some("stop=false")));
        assert!(!wants_stop(None));
    }
}
