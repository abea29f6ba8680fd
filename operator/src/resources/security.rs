//! How the runtime reaches a secured source cluster: SASL credentials from
//! Secrets as environment, TLS certificates from Secrets as files.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, KeyToPath, Secret, SecretKeySelector, SecretVolumeSource, Volume,
    VolumeMount,
};

use sha2::{Digest, Sha256};

use crate::config::{KafkaCluster, SecretKey};

/// How the runtime authenticates to its source cluster: `--kafka-config`
/// arguments (no secret among them), credentials as environment from
/// Secrets (the runtime reads them itself), certificates as files. Secrets are
/// read in the pipeline's namespace, under the names the operator
/// configuration gives (the operator's own copies live in its namespace).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuntimeSecurity {
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
    /// Pod-template annotations: a digest of the credentials the pods read, so
    /// that rotating a Secret rolls them (environment from a Secret is read once,
    /// at container start).
    pub annotations: BTreeMap<String, String>,
}

/// The digest of the Secret data a stage's pods read.
pub const ANNOTATION_CREDENTIALS_HASH: &str = "keystone.dev/kafka-credentials-hash";

/// Every Secret key the runtime of a cluster reads, in a stable order.
pub fn referenced_secret_keys(cluster: &KafkaCluster) -> Vec<&SecretKey> {
    let mut keys = Vec::new();
    if let Some(sasl) = &cluster.sasl {
        keys.extend([&sasl.username, &sasl.password]);
    }
    if let Some(tls) = &cluster.tls {
        keys.extend([&tls.ca, &tls.certificate, &tls.key].into_iter().flatten());
    }
    keys
}

/// A digest of the values of `keys` in `secrets` (by Secret name; a missing
/// Secret or key counts as absent, so that its creation rolls the pods too).
/// Not a password hash: a change detector that never leaves the cluster,
/// stored where only those who may read the pod template see it.
pub fn credentials_hash(keys: &[&SecretKey], secrets: &BTreeMap<String, Secret>) -> String {
    let mut hasher = Sha256::new();
    for key in keys {
        for part in [key.secret.as_bytes(), key.key.as_bytes()] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        match secrets
            .get(&key.secret)
            .and_then(|s| secret_bytes(s, &key.key))
        {
            Some(value) => {
                hasher.update([1]);
                hasher.update((value.len() as u64).to_be_bytes());
                hasher.update(&value);
            }
            None => hasher.update([0]),
        }
    }
    let digest = hasher.finalize();
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of `key` in a Secret (`data`, or `stringData` not yet merged).
pub fn secret_bytes(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
}

/// Beside the plan's mount, not inside it: a mount point cannot be made in
/// the plan's read-only volume.
pub const TLS_DIR: &str = "/etc/keystone-kafka-tls";

pub fn runtime_security(cluster: &crate::config::KafkaCluster) -> RuntimeSecurity {
    let mut out = RuntimeSecurity::default();
    let setting = |k: &str, v: &str| format!("--kafka-config={k}={v}");
    if let Some(protocol) = &cluster.security_protocol {
        out.args
            .push(setting("security.protocol", &protocol.to_lowercase()));
    }
    if let Some(sasl) = &cluster.sasl {
        out.args.push(setting("sasl.mechanism", &sasl.mechanism));
        // The runtime reads these itself: neither the Deployment nor the
        // process's command line (visible to every user of the node) holds them.
        for (name, key) in [
            ("KAFKA_SASL_USERNAME", &sasl.username),
            ("KAFKA_SASL_PASSWORD", &sasl.password),
        ] {
            out.env.push(EnvVar {
                name: name.to_owned(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: key.secret.clone(),
                        key: key.key.clone(),
                        ..SecretKeySelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            });
        }
    }
    if let Some(tls) = &cluster.tls {
        for (property, file, key) in [
            ("ssl.ca.location", "ca.pem", &tls.ca),
            (
                "ssl.certificate.location",
                "certificate.pem",
                &tls.certificate,
            ),
            ("ssl.key.location", "key.pem", &tls.key),
        ] {
            let Some(key) = key else { continue };
            let volume = format!("kafka-tls-{}", file.trim_end_matches(".pem"));
            let dir = format!("{TLS_DIR}/{}", file.trim_end_matches(".pem"));
            out.volumes.push(Volume {
                name: volume.clone(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(key.secret.clone()),
                    items: Some(vec![KeyToPath {
                        key: key.key.clone(),
                        path: file.to_owned(),
                        ..KeyToPath::default()
                    }]),
                    default_mode: Some(0o440),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            out.mounts.push(VolumeMount {
                name: volume,
                mount_path: dir.clone(),
                read_only: Some(true),
                ..VolumeMount::default()
            });
            out.args.push(setting(property, &format!("{dir}/{file}")));
        }
    }
    out
}
