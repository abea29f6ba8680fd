//! Accepting connections on the runtime's listeners (operations endpoints,
//! ingest, capture control).

use tokio::net::TcpListener;

/// The pause after a failed `accept` (EMFILE and the like) before the next.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// The next connection. A failed accept (out of file descriptors or memory
/// for a moment, a connection reset before it was taken) leaves the listener
/// fine: it is logged and tried again, instead of stopping the server and
/// with it the probes (a restart) or every client's endpoint. Cancel-safe.
pub async fn accept_retrying(
    listener: &TcpListener,
) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(%error, "could not accept a connection; retrying");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}
