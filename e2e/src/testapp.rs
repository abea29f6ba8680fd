//! A tiny HTTP app for the process kubelet's tests: it serves health, tells
//! its pid, env and mounted files, and crashes on request.
//!
//! - `GET /healthz` -> 200 `ok` (503 after `/unhealthy`)
//! - `GET /unhealthy`, `GET /healthy` -> flips `/healthz`
//! - `GET /crash?code=N` -> answers, then exits with code N (default 3)
//! - `GET /pid` -> the process id
//! - `GET /env/NAME` -> the value of NAME
//! - `GET /file/ABSOLUTE/PATH` -> the file's content

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves until SIGTERM (exit 0) or a `/crash` request.
pub async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("testapp listening on {addr}, pid {}", std::process::id());
    let healthy = Arc::new(AtomicBool::new(true));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let healthy = healthy.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, healthy.clone()));
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
            _ = sigterm.recv() => {
                println!("testapp: SIGTERM, exiting");
                return Ok(());
            }
        }
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    healthy: Arc<AtomicBool>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let reply = |status: StatusCode, body: String| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        Ok(resp)
    };
    match path.as_str() {
        "/healthz" if healthy.load(Ordering::Relaxed) => reply(StatusCode::OK, "ok".into()),
        "/healthz" => reply(StatusCode::SERVICE_UNAVAILABLE, "unhealthy".into()),
        "/unhealthy" => {
            healthy.store(false, Ordering::Relaxed);
            reply(StatusCode::OK, "now unhealthy".into())
        }
        "/healthy" => {
            healthy.store(true, Ordering::Relaxed);
            reply(StatusCode::OK, "now healthy".into())
        }
        "/pid" => reply(StatusCode::OK, std::process::id().to_string()),
        "/crash" => {
            let code = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("code=")))
                .and_then(|c| c.parse().ok())
                .unwrap_or(3);
            println!("testapp: crashing with exit code {code} as requested");
            // Answer first, then die.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                std::process::exit(code);
            });
            reply(StatusCode::OK, format!("crashing with {code}"))
        }
        p if p.starts_with("/env/") => match std::env::var(&p["/env/".len()..]) {
            Ok(v) => reply(StatusCode::OK, v),
            Err(_) => reply(StatusCode::NOT_FOUND, "unset".into()),
        },
        p if p.starts_with("/file/") => match std::fs::read_to_string(&p["/file".len()..]) {
            Ok(v) => reply(StatusCode::OK, v),
            Err(e) => reply(StatusCode::NOT_FOUND, e.to_string()),
        },
        _ => reply(StatusCode::NOT_FOUND, "not found".into()),
    }
}

/// A plain HTTP GET for tests: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt as _;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
