//! Keystone's testbed: the process kubelet, a small test app, and helpers for
//! end-to-end tests against the real components `e2e/testbed up` starts.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let tb = keystone_e2e::Testbed::from_env().await?;
//! let ns = tb.namespace("demo").await?;
//! // ... create objects in ns.name(), then:
//! // keystone_e2e::wait_for(&api, "name", timeout, "what", |o| ...).await?;
//! # Ok(()) }
//! ```

pub mod audit;
pub mod browser;
pub mod debezium;
pub mod http;
pub mod kubelet;
pub mod lake;
pub mod opensearch;
pub mod postgres;
pub mod schema_cases;
pub mod testapp;
mod testbed;
mod wait;

pub use testbed::{Stopped, TestNamespace, Testbed, TestbedError};

/// Installs rustls's ring provider for this process, once: two providers are
/// linked into workspace builds (ring, and aws-lc-rs through the lake
/// crates), and rustls then picks none by itself. Every entry point that
/// makes a TLS client calls it first.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
pub use wait::{WaitError, recent_events, wait_for, wait_for_deletion, wait_for_event, wait_until};
