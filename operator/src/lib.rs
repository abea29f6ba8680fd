//! The Keystone operator: Pipelines and Processors become Kafka topics, plan
//! ConfigMaps, runtime Deployments and a status that tells the truth.

pub mod acls;
pub mod capture;
pub mod checkpoint;
pub mod config;
pub mod context;
pub mod control;
pub mod controller;
pub mod error;
pub mod events;
pub mod kafka;
pub mod ledger;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod resources;
pub mod rollout;
pub mod status;
pub mod tables;
pub mod topics;

pub use config::OperatorConfig;
pub use context::{Context, FIELD_MANAGER};
pub use controller::{FINALIZER, run_controllers};
pub use error::Error;

/// A kube client that points nowhere, for unit tests that build what needs one
/// but never call the API server.
#[cfg(test)]
pub(crate) fn offline_client() -> kube::Client {
    // A workspace build enables both of rustls' providers: name one, as the
    // binaries do.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
    kube::Client::try_from(config).expect("client")
}
