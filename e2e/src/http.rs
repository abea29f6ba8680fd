//! A plain HTTP/1.1 request to an endpoint of a runtime instance or pod, as any
//! client in the cluster could send it.

use std::io::{Read, Write};
use std::time::Duration;

/// Sends `method path` to `host:port` with an optional `Authorization` header
/// value: (status, body); status 0 when the endpoint cannot be reached.
pub fn request(
    host: &str,
    port: u16,
    method: &str,
    path: &str,
    authorization: Option<&str>,
) -> (u16, String) {
    let Ok(mut stream) = std::net::TcpStream::connect((host, port)) else {
        return (0, String::new());
    };
    stream.set_read_timeout(Some(Duration::from_secs(70))).ok();
    let authorization = authorization
        .map(|value| format!("Authorization: {value}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{authorization}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).ok();
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
