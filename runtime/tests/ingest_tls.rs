//! The ingest endpoint over TLS and mutual TLS: events on the TLS port only,
//! client certificates checked in the handshake, a renewed certificate
//! served without a restart. Certificates are made by `openssl`.

mod ingest_support;

use std::sync::Arc;
use std::time::Duration;

use ingest_support::*;
use keystone_runtime::ingest::server::{Listening, ServerSettings, serve_as};
use keystone_runtime::ingest::tls::{self, ReloadingTls, TlsFiles};
use serde_json::Value;
use tokio::net::TcpListener;

/// A new P-256 key, unencrypted, in `openssl req`'s words.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";

/// Certificates made by `openssl` in a directory of their own.
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("keystone-ingest-tls-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Pki { dir }
    }

    /// Runs `openssl` with `command`'s words (none holds a space).
    fn openssl(&self, command: &str) {
        let out = std::process::Command::new("openssl")
            .args(command.split_whitespace())
            .current_dir(&self.dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A certificate authority: `<name>.crt`, `<name>.key`.
    fn authority(&self, name: &str) {
        self.openssl(&format!(
            "req -x509 {NEW_KEY} -keyout {name}.key -out {name}.crt -days 2 -subj /CN={name} \
             -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
        ));
    }

    /// A certificate for a server on 127.0.0.1 or for a client, signed by `ca`.
    fn leaf(&self, name: &str, ca: &str, server: bool) {
        let extensions = if server {
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
        } else {
            "extendedKeyUsage=clientAuth\n"
        };
        std::fs::write(self.dir.join(format!("{name}.ext")), extensions).unwrap();
        self.openssl(&format!(
            "req {NEW_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}"
        ));
        self.openssl(&format!(
            "x509 -req -in {name}.csr -CA {ca}.crt -CAkey {ca}.key -CAcreateserial -days 2 \
             -out {name}.crt -extfile {name}.ext"
        ));
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(file)).unwrap()
    }

    /// A mounted `kubernetes.io/tls` Secret holding `name`'s certificate.
    fn tls_secret(&self, name: &str) -> std::path::PathBuf {
        let dir = self.dir.join(format!("secret-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(tls::CERTIFICATE_FILE),
            self.read(&format!("{name}.crt")),
        )
        .unwrap();
        std::fs::write(dir.join(tls::KEY_FILE), self.read(&format!("{name}.key"))).unwrap();
        dir
    }

    /// A mounted Secret whose `ca.crt` is `ca`'s certificate.
    fn ca_secret(&self, ca: &str) -> std::path::PathBuf {
        let dir = self.dir.join(format!("ca-{ca}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(tls::CLIENT_CA_FILE),
            self.read(&format!("{ca}.crt")),
        )
        .unwrap();
        dir
    }

    /// A client trusting `ca`, presenting `identity`'s certificate if given.
    fn client(&self, ca: &str, identity: Option<&str>) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(&self.read(&format!("{ca}.crt"))).unwrap(),
            )
            .timeout(Duration::from_secs(30));
        if let Some(name) = identity {
            let mut pem = self.read(&format!("{name}.crt"));
            pem.extend(self.read(&format!("{name}.key")));
            builder = builder.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        builder.build().unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The endpoint served over TLS on one port and, for probes and metrics
/// only, in plain HTTP on another.
struct TlsServer {
    https: String,
    http: String,
    memory: Arc<Memory>,
}

async fn start_tls(files: TlsFiles, reload: Duration) -> TlsServer {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (endpoint, memory) = endpoint(both_tokens());
    let endpoint = Arc::new(endpoint);
    let tls = ReloadingTls::watch(files, reload).expect("the TLS files are read");
    let secure = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = TlsServer {
        https: format!(
            "https://127.0.0.1:{}/v1/orders",
            secure.local_addr().unwrap().port()
        ),
        http: format!("http://{}", plain.local_addr().unwrap()),
        memory,
    };
    let events = Listening {
        tls: Some(tls),
        events: true,
    };
    let probes = Listening {
        tls: None,
        events: false,
    };
    let settings = ServerSettings::default();
    tokio::spawn(serve_as(
        secure,
        endpoint.clone(),
        settings,
        events,
        std::future::pending(),
    ));
    tokio::spawn(serve_as(
        plain,
        endpoint,
        settings,
        probes,
        std::future::pending(),
    ));
    server
}

async fn post_over(client: &reqwest::Client, url: &str) -> Result<(u16, Value), reqwest::Error> {
    let response = client
        .post(url)
        .bearer_auth("tok-mobile")
        .body(r#"{"user":"a","amount":1}"#)
        .send()
        .await?;
    let status = response.status().as_u16();
    let body = response.bytes().await?;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

#[tokio::test]
async fn over_tls_events_take_the_tls_port_and_the_plain_one_keeps_only_probes() {
    let pki = Pki::new("server");
    pki.authority("ca");
    pki.leaf("server", "ca", true);
    let files = TlsFiles {
        dir: pki.tls_secret("server"),
        client_ca_dir: None,
    };
    let server = start_tls(files, Duration::from_secs(60)).await;

    let (status, reply) = post_over(&pki.client("ca", None), &server.https)
        .await
        .expect("a TLS answer");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(server.memory.records.lock().unwrap().len(), 1);

    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (status, reply) = post_over(&plain, &format!("{}/v1/orders", server.http))
        .await
        .unwrap();
    assert_eq!(status, 404, "events in clear on the probes' port: {reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("TLS port"),
        "{reply}"
    );
    let healthz = plain
        .get(format!("{}/healthz", server.http))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status().as_u16(), 200);
    assert_eq!(
        server.memory.records.lock().unwrap().len(),
        1,
        "nothing came in clear"
    );

    // A client speaking plain HTTP to the TLS port gets no answer.
    let refused = post_over(&plain, &server.https.replace("https://", "http://")).await;
    assert!(
        refused.is_err() || refused.as_ref().unwrap().0 >= 400,
        "{refused:?}"
    );
}

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_of_the_client_authority() {
    let pki = Pki::new("mutual");
    pki.authority("ca");
    pki.authority("clients");
    pki.authority("strangers");
    pki.leaf("server", "ca", true);
    pki.leaf("device", "clients", false);
    pki.leaf("impostor", "strangers", false);
    let files = TlsFiles {
        dir: pki.tls_secret("server"),
        client_ca_dir: Some(pki.ca_secret("clients")),
    };
    let server = start_tls(files, Duration::from_secs(60)).await;

    for (who, client) in [
        ("no certificate", pki.client("ca", None)),
        (
            "a certificate of another authority",
            pki.client("ca", Some("impostor")),
        ),
    ] {
        let refused = post_over(&client, &server.https).await;
        assert!(refused.is_err(), "{who}: {refused:?}");
    }
    assert!(server.memory.records.lock().unwrap().is_empty());

    let (status, reply) = post_over(&pki.client("ca", Some("device")), &server.https)
        .await
        .expect("a client of the authority is admitted");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(server.memory.records.lock().unwrap().len(), 1);

    let metrics = reqwest::get(format!("{}/metrics", server.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let refused_handshakes: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("keystone_ingest_refusals_total{") && l.contains("reason=\"tls\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused_handshakes, 2.0, "{metrics}");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let pki = Pki::new("renewal");
    pki.authority("old-ca");
    pki.authority("new-ca");
    pki.leaf("old", "old-ca", true);
    pki.leaf("new", "new-ca", true);
    let secret = pki.tls_secret("old");
    let files = TlsFiles {
        dir: secret.clone(),
        client_ca_dir: None,
    };
    let server = start_tls(files, Duration::from_millis(200)).await;
    let trusts_new = pki.client("new-ca", None);
    assert!(
        post_over(&trusts_new, &server.https).await.is_err(),
        "the old certificate is served first"
    );

    // What the kubelet does when the Secret is renewed: new files in place.
    std::fs::write(secret.join(tls::CERTIFICATE_FILE), pki.read("new.crt")).unwrap();
    std::fs::write(secret.join(tls::KEY_FILE), pki.read("new.key")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        // A fresh client each time: no connection of the old certificate is reused.
        match post_over(&pki.client("new-ca", None), &server.https).await {
            Ok((200, _)) => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "the renewed certificate is not served: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn unreadable_tls_files_are_refused_naming_the_file() {
    let pki = Pki::new("unreadable");
    let dir = pki.dir.join("empty-secret");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(tls::CERTIFICATE_FILE), "not a certificate").unwrap();
    std::fs::write(dir.join(tls::KEY_FILE), "").unwrap();
    let error = tls::server_config(&TlsFiles {
        dir: dir.clone(),
        client_ca_dir: None,
    })
    .expect_err("no certificate in it");
    assert!(error.contains("tls.crt"), "{error}");
}
