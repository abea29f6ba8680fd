//! The operations endpoints on one port: `/metrics`, `/healthz`, `/readyz`, and
//! `POST /checkpoint`, which finishes the current transaction at a barrier and
//! answers with the committed positions.

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

use crate::kafka::{Checkpoint, Shared};

/// A checkpoint request handed to the engine thread.
pub struct CheckpointRequest {
    pub reply: oneshot::Sender<Result<Checkpoint, String>>,
}

pub async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    checkpoints: mpsc::Sender<CheckpointRequest>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "operations endpoints listening");
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        let checkpoints = checkpoints.clone();
        tokio::spawn(async move {
            let service =
                service_fn(move |request| handle(request, shared.clone(), checkpoints.clone()));
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
    checkpoints: mpsc::Sender<CheckpointRequest>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let text = "text/plain; charset=utf-8";
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            let body = shared
                .metrics
                .lock()
                .map(|m| m.encode())
                .unwrap_or_default();
            respond(StatusCode::OK, "text/plain; version=0.0.4", body)
        }
        (&Method::GET, "/healthz") => {
            if shared.failed.load(Ordering::Relaxed) {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    text,
                    "the engine stopped on an error\n",
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
            } else {
                respond(StatusCode::OK, text, "ready\n")
            }
        }
        (&Method::POST, "/checkpoint") => {
            let (reply, answer) = oneshot::channel();
            if checkpoints.send(CheckpointRequest { reply }).is_err() {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    text,
                    "the engine is not running\n",
                )
            } else {
                match tokio::time::timeout(Duration::from_secs(60), answer).await {
                    Ok(Ok(Ok(checkpoint))) => respond(
                        StatusCode::OK,
                        "application/json",
                        serde_json::to_vec(&checkpoint).unwrap_or_default(),
                    ),
                    Ok(Ok(Err(reason))) => respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        text,
                        format!("{reason}\n"),
                    ),
                    Ok(Err(_)) => respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        text,
                        "the engine stopped\n",
                    ),
                    Err(_) => respond(
                        StatusCode::GATEWAY_TIMEOUT,
                        text,
                        "the checkpoint did not complete within 60s\n",
                    ),
                }
            }
        }
        _ => respond(StatusCode::NOT_FOUND, text, "not found\n"),
    };
    Ok(response)
}
