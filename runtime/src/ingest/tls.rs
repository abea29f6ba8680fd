//! TLS of the ingest endpoint (`spec.source.http.tls`): the server's
//! certificate and key from a mounted `kubernetes.io/tls` Secret and, for
//! mutual TLS, the authorities whose client certificates are admitted. The
//! files are read again periodically, so a renewed certificate is served
//! without a restart; new connections get the new one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

/// The file names of a `kubernetes.io/tls` Secret mounted as a directory.
pub const CERTIFICATE_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
/// The file of the client authorities' certificates.
pub const CLIENT_CA_FILE: &str = "ca.crt";

/// Where the endpoint's TLS material is.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Holds `tls.crt` (the chain, leaf first) and `tls.key`.
    pub dir: PathBuf,
    /// Holds `ca.crt`; client certificates are required when set.
    pub client_ca_dir: Option<PathBuf>,
}

/// The server configuration new connections get; replaced when the files
/// change.
#[derive(Clone)]
pub struct ReloadingTls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl std::fmt::Debug for ReloadingTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReloadingTls")
    }
}

impl ReloadingTls {
    /// Reads `files` now (an error names the file and what is wrong with it)
    /// and again every `every`; a reading that fails keeps the configuration
    /// last read, with a warning.
    pub fn watch(files: TlsFiles, every: Duration) -> Result<Self, String> {
        let tls = ReloadingTls {
            current: Arc::new(RwLock::new(Arc::new(server_config(&files)?))),
        };
        let reloaded = tls.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match server_config(&files) {
                    Ok(config) => {
                        if let Ok(mut current) = reloaded.current.write() {
                            *current = Arc::new(config);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the ingest TLS files; keeping the last ones read")
                    }
                }
            }
        });
        Ok(tls)
    }

    /// An acceptor with the configuration read last.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self
            .current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        TlsAcceptor::from(config)
    }
}

/// The server configuration `files` describe. HTTP/1.1 only, as the server is.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&files.dir.join(CERTIFICATE_FILE))?;
    let key_path = files.dir.join(KEY_FILE);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("{}: no PEM private key: {e}", key_path.display()))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match &files.client_ca_dir {
        None => builder.with_no_client_auth(),
        Some(dir) => {
            let ca_path = dir.join(CLIENT_CA_FILE);
            let mut roots = RootCertStore::empty();
            for certificate in certificates(&ca_path)? {
                roots
                    .add(certificate)
                    .map_err(|e| format!("{}: not a CA certificate: {e}", ca_path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: {e}", ca_path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: {e}", files.dir.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Every certificate of a PEM file; at least one.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let found = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if found.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(found)
}
