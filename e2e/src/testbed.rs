//! Access to a running testbed (`e2e/testbed up`) for tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use thiserror::Error;

// Debug prints the message: tests `.expect()` these, and the message is
// what tells the reader to run `e2e/testbed up`.
#[derive(Error)]
pub enum TestbedError {
    #[error("testbed not running: run `e2e/testbed up` (no env file at {0})")]
    NotRunning(PathBuf),
    #[error("the testbed runs without {component}: run `e2e/testbed up` (without --only)")]
    Missing { component: &'static str },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
}

impl std::fmt::Debug for TestbedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A running testbed, read from its state folder's `env` file.
#[derive(Clone)]
pub struct Testbed {
    state: PathBuf,
    env: BTreeMap<String, String>,
    client: Option<Client>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("state", &self.state)
            .field("env", &self.env)
            .finish()
    }
}

/// The state folder: `$KEYSTONE_TESTBED_STATE`, else `<repo>/target/testbed`.
pub fn state_dir() -> PathBuf {
    match std::env::var_os("KEYSTONE_TESTBED_STATE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/testbed"),
    }
}

impl Testbed {
    /// Connects to the testbed `e2e/testbed up` started. Its kubeconfig is
    /// used even when `KUBECONFIG` points elsewhere, so tests never touch
    /// another cluster.
    pub async fn from_env() -> Result<Self, TestbedError> {
        let state = state_dir();
        let env_file = state.join("env");
        let text = match std::fs::read_to_string(&env_file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TestbedError::NotRunning(env_file));
            }
            Err(source) => {
                return Err(TestbedError::Io {
                    path: env_file,
                    source,
                });
            }
        };
        let env = parse_env(&text);
        let client = match env.get("KUBECONFIG") {
            None => None,
            Some(path) => {
                let path = PathBuf::from(path);
                let kubeconfig =
                    Kubeconfig::read_from(&path).map_err(|source| TestbedError::Kubeconfig {
                        path: path.clone(),
                        source,
                    })?;
                let config =
                    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                        .await
                        .map_err(|source| TestbedError::Kubeconfig { path, source })?;
                crate::install_crypto_provider();
                Some(Client::try_from(config)?)
            }
        };
        Ok(Self { state, env, client })
    }

    /// A kube client for the testbed's API server (admin rights).
    pub fn client(&self) -> Result<Client, TestbedError> {
        self.client
            .clone()
            .ok_or(TestbedError::Missing { component: "kube" })
    }

    /// `127.0.0.1:PORT` of the Kafka broker.
    pub fn kafka_bootstrap_servers(&self) -> Result<&str, TestbedError> {
        self.var("KAFKA_BOOTSTRAP_SERVERS")
            .ok_or(TestbedError::Missing { component: "kafka" })
    }

    pub fn kubeconfig(&self) -> Result<PathBuf, TestbedError> {
        self.var("KUBECONFIG")
            .map(PathBuf::from)
            .ok_or(TestbedError::Missing { component: "kube" })
    }

    /// The Helm v4 binary built for the testbed.
    pub fn helm(&self) -> Result<PathBuf, TestbedError> {
        self.var("HELM")
            .map(PathBuf::from)
            .ok_or(TestbedError::Missing { component: "kube" })
    }

    /// The node the process kubelet registered.
    pub fn node_name(&self) -> Result<&str, TestbedError> {
        self.var("KEYSTONE_TESTBED_NODE")
            .ok_or(TestbedError::Missing { component: "kube" })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// Any variable of the env file (`e2e/testbed env` prints them).
    pub fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }

    /// The folder holding a pod's container logs (`<container>.log`).
    pub fn pod_log_dir(&self, namespace: &str, pod: &str, uid: &str) -> PathBuf {
        self.state
            .join("kubelet/pods")
            .join(format!("{namespace}_{pod}_{uid}"))
    }

    /// `e2e/testbed stop COMPONENT` (`opensearch`, `kafka`, `kube-apiserver`):
    /// the process stops, its data stays. For fault tests.
    pub async fn stop(&self, component: &str) -> anyhow::Result<()> {
        run_script(&self.state, &["stop", component]).await
    }

    /// `e2e/testbed start COMPONENT`: starts it again on the same port and
    /// returns once it answers.
    pub async fn start(&self, component: &str) -> anyhow::Result<()> {
        run_script(&self.state, &["start", component]).await
    }

    /// `kubectl` pointed at the testbed.
    pub fn kubectl(&self) -> Result<std::process::Command, TestbedError> {
        let mut cmd = std::process::Command::new("kubectl");
        cmd.env("KUBECONFIG", self.kubeconfig()?);
        Ok(cmd)
    }

    /// Creates a fresh namespace `<prefix>-<pid>-<n>`; it is deleted when the
    /// returned guard drops (best effort) or by [`TestNamespace::delete`].
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace, TestbedError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let name = format!("{prefix}-{}-{n}", std::process::id());
        let client = self.client()?;
        let api: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    "keystone.dev/e2e".to_owned(),
                    "true".to_owned(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        api.create(&PostParams::default(), &ns).await?;
        Ok(TestNamespace {
            name,
            client,
            kubeconfig: self.kubeconfig()?,
            deleted: false,
        })
    }
}

/// A namespace owned by one test.
pub struct TestNamespace {
    name: String,
    client: Client,
    kubeconfig: PathBuf,
    deleted: bool,
}

impl TestNamespace {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A namespaced API in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Deletes the namespace now (does not wait for it to be gone).
    pub async fn delete(mut self) -> Result<(), TestbedError> {
        self.deleted = true;
        let api: Api<Namespace> = Api::all(self.client.clone());
        match api.delete(&self.name, &DeleteParams::background()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        // Drop cannot await, and the test's runtime may be gone or blocked:
        // hand the deletion to kubectl and do not wait for it.
        let _ = std::process::Command::new("kubectl")
            .env("KUBECONFIG", &self.kubeconfig)
            .args([
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

/// Parses `export KEY='value'` lines (the format `e2e/testbed` writes).
fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| v.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(v);
            (k.trim().to_owned(), v.to_owned())
        })
        .collect()
}

/// A testbed component stopped for a fault test ([`Stopped::stop`]); started
/// again when dropped unstarted, so a failing test never leaves a shared
/// component (the broker, OpenSearch) down for the tests after it.
pub struct Stopped {
    state: PathBuf,
    component: &'static str,
    started: bool,
}

impl Stopped {
    /// `e2e/testbed stop COMPONENT`; panics if it fails.
    pub async fn stop(tb: &Testbed, component: &'static str) -> Self {
        tb.stop(component)
            .await
            .unwrap_or_else(|e| panic!("e2e/testbed stop {component}: {e}"));
        Self {
            state: tb.state_dir().to_owned(),
            component,
            started: false,
        }
    }

    /// `e2e/testbed start COMPONENT`: back on its port and answering.
    pub async fn start(mut self, tb: &Testbed) {
        self.started = true;
        tb.start(self.component)
            .await
            .unwrap_or_else(|e| panic!("e2e/testbed start {}: {e}", self.component));
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.started {
            std::process::Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed"))
                .args(["start", self.component])
                .env("KEYSTONE_TESTBED_STATE", &self.state)
                .status()
                .ok();
        }
    }
}

/// Runs `e2e/testbed ARGS` on the testbed whose state is in `state`.
pub(crate) async fn run_script(state: &Path, args: &[&str]) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("testbed");
    let out = tokio::process::Command::new(&script)
        .args(args)
        .env("KEYSTONE_TESTBED_STATE", state)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "e2e/testbed {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_env_file() {
        let env = parse_env("# c\nexport A='x y'\nexport B=\"2\"\nexport C=3\nD=4\n");
        assert_eq!(env.get("A").map(String::as_str), Some("x y"));
        assert_eq!(env.get("B").map(String::as_str), Some("2"));
        assert_eq!(env.get("C").map(String::as_str), Some("3"));
        assert!(!env.contains_key("D"));
    }
}
