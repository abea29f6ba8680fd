//! The operator's configuration: Kafka clusters, the runtime image, watched
//! namespaces. Helm renders it into a ConfigMap mounted as a file; a few
//! environment variables override it so a developer can run the binary alone.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::ResourceRequirements;
use serde::{Deserialize, Serialize};

/// The runtime image used when neither the config nor the Pipeline names one.
pub const DEFAULT_RUNTIME_IMAGE: &str = "keystone/runtime:latest";

/// The name a single, unnamed cluster gets (from `KAFKA_BOOTSTRAP_SERVERS`).
pub const DEFAULT_CLUSTER: &str = "default";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperatorConfig {
    /// Image of the runtime pods; a Pipeline's `spec.runtimeImage` overrides it.
    #[serde(default)]
    pub runtime_image: Option<String>,
    /// `imagePullPolicy` of the runtime containers.
    #[serde(default)]
    pub runtime_image_pull_policy: Option<String>,
    /// Host the runtime's HTTP endpoints bind, e.g. `$(POD_IP)`; the runtime's default when unset.
    #[serde(default)]
    pub runtime_bind_address: Option<String>,
    /// Resources of runtime containers whose Pipeline sets none.
    #[serde(default)]
    pub runtime_resources: Option<ResourceRequirements>,
    /// The cluster a Pipeline gets when it names none; the only cluster when there is one.
    #[serde(default)]
    pub default_cluster: Option<String>,
    /// Kafka clusters by name, as Pipelines refer to them.
    #[serde(default)]
    pub kafka_clusters: BTreeMap<String, KafkaCluster>,
    /// Namespaces whose Pipelines this operator manages; all when empty.
    #[serde(default)]
    pub watch_namespaces: Vec<String>,
    /// How many Pipelines (and, separately, Processors) are reconciled at once
    /// per watched namespace; `DEFAULT_RECONCILE_CONCURRENCY` when unset.
    #[serde(default)]
    pub reconcile_concurrency: Option<u16>,
    /// What Pipelines may ask for: runtime images, partitions, replication
    /// factors and topic configs. Nothing is limited when unset.
    #[serde(default)]
    pub policy: crate::policy::Policy,
    /// A NetworkPolicy per pipeline that lets only the operator and the metrics
    /// scraper reach its pods' port; none when unset.
    #[serde(default)]
    pub network_policy: Option<NetworkPolicyConfig>,
    /// The pods and Ingress of HTTP ingest endpoints (`spec.source.http`).
    #[serde(default)]
    pub ingest: IngestConfig,
}

/// How HTTP ingest endpoints are run and exposed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngestConfig {
    /// Resources of the ingest containers; those of the stages when unset.
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    /// An Ingress per endpoint, so that clients outside the cluster reach it.
    #[serde(default)]
    pub ingress: Option<IngestIngressConfig>,
}

/// The Ingress made for each HTTP ingest endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngestIngressConfig {
    #[serde(default)]
    pub enabled: bool,
    /// `spec.ingressClassName`; the cluster's default class when unset.
    #[serde(default)]
    pub class_name: Option<String>,
    /// The host of each endpoint, with `{pipeline}` and `{namespace}` replaced,
    /// e.g. `{pipeline}.{namespace}.ingest.example.com`.
    pub host: String,
    /// Annotations of each Ingress (the controller's settings, e.g. the
    /// backend protocol for endpoints served over TLS).
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// A TLS Secret (in each pipeline's namespace) the Ingress terminates TLS
    /// with, for the host; plain HTTP when unset.
    #[serde(default)]
    pub tls_secret: Option<String>,
}

/// Who may reach runtime pods (`resources::network_policy`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyConfig {
    #[serde(default)]
    pub enabled: bool,
    /// Labels of the operator's pods (in the operator's namespace): they send
    /// the checkpoints and read `/metrics` for the health gate.
    #[serde(default)]
    pub operator_pod_labels: BTreeMap<String, String>,
    /// Peers that scrape `/metrics` (NetworkPolicy `from` entries, e.g. a
    /// `namespaceSelector` of the monitoring namespace).
    #[serde(default)]
    pub metrics_from: Vec<k8s_openapi::api::networking::v1::NetworkPolicyPeer>,
}

/// Reconciles at once per controller: enough to overlap the API server's and
/// Kafka's round trips, few enough that a thousand Pipelines changing together
/// queue rather than all hold their objects and requests in flight at once.
pub const DEFAULT_RECONCILE_CONCURRENCY: u16 = 8;

/// One Kafka cluster. Credentials come from Secrets in the operator's namespace;
/// runtime pods read Secrets of the same names from their own namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaCluster {
    /// `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// `PLAINTEXT` (default), `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    #[serde(default)]
    pub security_protocol: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub sasl: Option<SaslConfig>,
    /// Extra librdkafka properties for the operator's admin client.
    #[serde(default)]
    pub client_config: BTreeMap<String, String>,
    /// How Pipelines' runtime pods are authorized on this cluster; with the
    /// cluster's credentials (the operator's) when unset.
    #[serde(default)]
    pub authorization: Option<Authorization>,
    /// The schema registry of Pipelines on this cluster that read or write
    /// Avro and name none themselves (`spec.schemaRegistry`). Its Secrets are
    /// read in each Pipeline's namespace.
    #[serde(default)]
    pub schema_registry: Option<keystone_crds::pipeline::avro::SchemaRegistrySpec>,
}

impl KafkaCluster {
    /// Whether each Pipeline gets its own principal and ACLs here.
    pub fn per_pipeline_acls(&self) -> bool {
        self.authorization
            .as_ref()
            .is_some_and(|a| a.mode == AuthorizationMode::Acls)
    }
}

/// How runtime pods are authorized on a cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    pub mode: AuthorizationMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthorizationMode {
    /// Per Pipeline, the operator creates a SCRAM principal (its password in a
    /// Secret the Pipeline owns, which its pods read) and least-privilege ACLs:
    /// read its source and table topics, write its sinks and its own internal
    /// topics, its consumer groups and transactional ids; all removed with the
    /// Pipeline. The cluster's `sasl` must be SCRAM and its credentials a super
    /// user (or allowed to alter ACLs and SCRAM credentials).
    Acls,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate (PEM) to verify the brokers.
    #[serde(default)]
    pub ca: Option<SecretKey>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub certificate: Option<SecretKey>,
    /// Client key (PEM) for mutual TLS.
    #[serde(default)]
    pub key: Option<SecretKey>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SaslConfig {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: String,
    pub username: SecretKey,
    pub password: SecretKey,
}

/// A key of a Secret.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKey {
    pub secret: String,
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("invalid configuration: {problem}")]
    Invalid { problem: &'static str },
    #[error(
        "cluster name {name:?} must match [A-Za-z0-9._-]+ (it is part of topic ownership keys)"
    )]
    ClusterName { name: String },
}

impl OperatorConfig {
    /// Reads the YAML or JSON file, if any, then applies environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Self::parse(&text).map_err(|source| ConfigError::Parse {
                    path: path.display().to_string(),
                    source,
                })?
            }
            None => Self::default(),
        };
        config.apply_env(|name| std::env::var(name).ok());
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, serde_yaml_ng::Error> {
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        serde_yaml_ng::from_str(text)
    }

    /// `KEYSTONE_RUNTIME_IMAGE`, `KEYSTONE_RUNTIME_BIND_ADDRESS`, `KEYSTONE_RECONCILE_CONCURRENCY`,
    /// `WATCH_NAMESPACES` (comma-separated) and, when no
    /// cluster is configured, `KAFKA_BOOTSTRAP_SERVERS` as the `default` cluster.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        if let Some(image) = env("KEYSTONE_RUNTIME_IMAGE").filter(|s| !s.is_empty()) {
            self.runtime_image = Some(image);
        }
        if let Some(host) = env("KEYSTONE_RUNTIME_BIND_ADDRESS").filter(|s| !s.is_empty()) {
            self.runtime_bind_address = Some(host);
        }
        if let Some(n) = env("KEYSTONE_RECONCILE_CONCURRENCY").and_then(|s| s.trim().parse().ok()) {
            self.reconcile_concurrency = Some(n);
        }
        if let Some(namespaces) = env("WATCH_NAMESPACES").filter(|s| !s.trim().is_empty()) {
            self.watch_namespaces = namespaces
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if self.kafka_clusters.is_empty()
            && let Some(servers) = env("KAFKA_BOOTSTRAP_SERVERS").filter(|s| !s.is_empty())
        {
            self.kafka_clusters.insert(
                DEFAULT_CLUSTER.to_owned(),
                KafkaCluster {
                    bootstrap_servers: servers,
                    ..KafkaCluster::default()
                },
            );
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for name in self.kafka_clusters.keys() {
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(ConfigError::ClusterName { name: name.clone() });
            }
        }
        for cluster in self.kafka_clusters.values() {
            let scram = cluster
                .sasl
                .as_ref()
                .is_some_and(|s| s.mechanism.to_ascii_uppercase().starts_with("SCRAM-"));
            if cluster.per_pipeline_acls() && !scram {
                return Err(ConfigError::Invalid {
                    problem: "authorization mode Acls needs the cluster's sasl with a SCRAM mechanism (per-Pipeline principals are SCRAM credentials)",
                });
            }
        }
        if let Some(default) = &self.default_cluster
            && !self.kafka_clusters.contains_key(default)
        {
            return Err(ConfigError::Invalid {
                problem: "defaultCluster names a cluster that is not in kafkaClusters",
            });
        }
        Ok(())
    }

    /// Reconciles at once per controller (0 in the file means the default too).
    pub fn reconcile_concurrency(&self) -> u16 {
        self.reconcile_concurrency
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_RECONCILE_CONCURRENCY)
    }

    /// The configured name of the cluster a Pipeline means by `name` (None: the default).
    pub fn resolve_cluster(&self, name: Option<&str>) -> Option<String> {
        match name {
            Some(name) => self
                .kafka_clusters
                .contains_key(name)
                .then(|| name.to_owned()),
            None => match &self.default_cluster {
                Some(default) => Some(default.clone()),
                None if self.kafka_clusters.len() == 1 => {
                    self.kafka_clusters.keys().next().cloned()
                }
                None => self
                    .kafka_clusters
                    .contains_key(DEFAULT_CLUSTER)
                    .then(|| DEFAULT_CLUSTER.to_owned()),
            },
        }
    }

    pub fn runtime_image(&self) -> &str {
        self.runtime_image
            .as_deref()
            .unwrap_or(DEFAULT_RUNTIME_IMAGE)
    }
}

impl OperatorConfig {
    /// The Secrets runtime pods read their Kafka credentials from (by name, in
    /// the pipeline's namespace): those of clusters without per-pipeline
    /// principals (whose pods read a Secret the operator makes).
    pub fn runtime_secret_names(&self) -> std::collections::BTreeSet<String> {
        self.kafka_clusters
            .values()
            .filter(|cluster| !cluster.per_pipeline_acls())
            .flat_map(crate::resources::referenced_secret_keys)
            .map(|key| key.secret.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_secrets_are_those_of_clusters_without_per_pipeline_principals() {
        let config = OperatorConfig::parse(
            r#"
kafkaClusters:
  main:
    bootstrapServers: kafka:9093
    securityProtocol: SASL_SSL
    sasl:
      mechanism: SCRAM-SHA-512
      username: {secret: kafka-user, key: username}
      password: {secret: kafka-user, key: password}
    tls:
      ca: {secret: kafka-ca, key: ca.crt}
  shared:
    bootstrapServers: shared:9093
    securityProtocol: SASL_SSL
    sasl:
      mechanism: SCRAM-SHA-512
      username: {secret: shared-admin, key: username}
      password: {secret: shared-admin, key: password}
    authorization: {mode: Acls}
  plain:
    bootstrapServers: plain:9092
"#,
        )
        .expect("parses");
        let names: Vec<String> = config.runtime_secret_names().into_iter().collect();
        assert_eq!(names, ["kafka-ca", "kafka-user"]);
    }

    #[test]
    fn parses_helm_rendered_config() {
        let config = OperatorConfig::parse(
            r#"
runtimeImage: ghcr.io/keystone/runtime:0.1.0
defaultCluster: main
kafkaClusters:
  main:
    bootstrapServers: kafka:9092
    securityProtocol: SASL_SSL
    sasl:
      mechanism: SCRAM-SHA-512
      username: {secret: kafka-user, key: username}
      password: {secret: kafka-user, key: password}
    tls:
      ca: {secret: kafka-ca, key: ca.crt}
  logs:
    bootstrapServers: logs:9092
watchNamespaces: [a, b]
policy:
  allowedRuntimeImages: ["ghcr.io/keystone/runtime:*"]
  maxPartitions: 64
  maxReplicationFactor: 3
  allowedReplicationFactors: [3]
  allowedTopicConfigs: [retention.ms]
  maxTopicConfigValues: {retention.ms: 604800000}
"#,
        )
        .expect("parses");
        config.validate().expect("valid");
        assert_eq!(config.resolve_cluster(None).as_deref(), Some("main"));
        assert_eq!(
            config.resolve_cluster(Some("logs")).as_deref(),
            Some("logs")
        );
        assert_eq!(config.resolve_cluster(Some("nope")), None);
        assert_eq!(config.watch_namespaces, vec!["a", "b"]);
        assert_eq!(config.policy.max_partitions, Some(64));
        assert_eq!(
            config.policy.allowed_topic_configs,
            Some(vec!["retention.ms".to_owned()])
        );
    }

    #[test]
    fn per_pipeline_acls_need_scram() {
        let mut config = OperatorConfig::parse(
            r#"
kafkaClusters:
  secure:
    bootstrapServers: kafka:9093
    securityProtocol: SASL_SSL
    sasl:
      mechanism: SCRAM-SHA-512
      username: {secret: kafka-admin, key: username}
      password: {secret: kafka-admin, key: password}
    authorization: {mode: Acls}
"#,
        )
        .expect("parses");
        config.validate().expect("valid");
        assert!(config.kafka_clusters["secure"].per_pipeline_acls());
        if let Some(sasl) = config
            .kafka_clusters
            .get_mut("secure")
            .and_then(|c| c.sasl.as_mut())
        {
            sasl.mechanism = "PLAIN".into();
        }
        assert!(config.validate().is_err());
        assert!(
            OperatorConfig::parse(
                "kafkaClusters: {a: {bootstrapServers: k, authorization: {mode: Everything}}}"
            )
            .is_err()
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(OperatorConfig::parse("kafkaCluster: {}").is_err());
    }

    #[test]
    fn env_gives_a_default_cluster_when_none_is_configured() {
        let mut config = OperatorConfig::default();
        config.apply_env(|name| match name {
            "KAFKA_BOOTSTRAP_SERVERS" => Some("127.0.0.1:9092".into()),
            "WATCH_NAMESPACES" => Some(" x, y ,".into()),
            _ => None,
        });
        assert_eq!(config.resolve_cluster(None).as_deref(), Some("default"));
        assert_eq!(config.watch_namespaces, vec!["x", "y"]);
        assert_eq!(config.runtime_image(), DEFAULT_RUNTIME_IMAGE);
    }

    #[test]
    fn several_clusters_without_a_default_have_none() {
        let mut config = OperatorConfig::default();
        for name in ["a", "b"] {
            config
                .kafka_clusters
                .insert(name.into(), KafkaCluster::default());
        }
        assert_eq!(config.resolve_cluster(None), None);
        config
            .kafka_clusters
            .insert("bad name".into(), KafkaCluster::default());
        assert!(config.validate().is_err());
    }
}
