//! How the runtime reaches a secured source cluster: SASL credentials from
//! Secrets as environment, TLS certificates from Secrets as files.

use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, KeyToPath, SecretKeySelector, SecretVolumeSource, Volume, VolumeMount,
};

/// How the runtime authenticates to its source cluster: `--kafka-config`
/// arguments, credentials as environment from Secrets, certificates as files.
/// Secrets are read in the pipeline's namespace, under the names the operator
/// configuration gives (the operator's own copies live in its namespace).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuntimeSecurity {
    pub args: Vec<String>,
    pub env: Vec<EnvVar>,
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
}

pub const TLS_DIR: &str = "/etc/keystone/kafka-tls";

pub fn runtime_security(cluster: &crate::config::KafkaCluster) -> RuntimeSecurity {
    let mut out = RuntimeSecurity::default();
    let setting = |k: &str, v: &str| format!("--kafka-config={k}={v}");
    if let Some(protocol) = &cluster.security_protocol {
        out.args
            .push(setting("security.protocol", &protocol.to_lowercase()));
    }
    if let Some(sasl) = &cluster.sasl {
        out.args.push(setting("sasl.mechanism", &sasl.mechanism));
        // Expanded by the kubelet from the environment: the Deployment holds no secret.
        out.args
            .push(setting("sasl.username", "$(KAFKA_SASL_USERNAME)"));
        out.args
            .push(setting("sasl.password", "$(KAFKA_SASL_PASSWORD)"));
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
