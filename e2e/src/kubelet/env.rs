//! Container environment: `env`, `envFrom`, `valueFrom` and `$(VAR)`
//! expansion, as the real kubelet resolves them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, ObjectFieldSelector, Pod, Secret};
use kube::{Api, Client};

use super::PodFailure;

/// Pod facts the downward API exposes.
#[derive(Debug, Clone)]
pub struct PodFacts {
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
}

/// Resolves a container's environment in Kubernetes order: `envFrom` sources
/// first, then `env` entries (later ones override), each `env` value
/// expanding `$(NAME)` references to variables defined before it.
pub async fn resolve(
    client: &Client,
    pod: &Pod,
    container: &Container,
    facts: &PodFacts,
) -> Result<Vec<(String, String)>, PodFailure> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut vars: Vec<(String, String)> = Vec::new();
    let set = |vars: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(slot) = vars.iter_mut().find(|(name, _)| *name == k) {
            slot.1 = v;
        } else {
            vars.push((k, v));
        }
    };

    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        if let Some(r) = &source.config_map_ref {
            let optional = r.optional.unwrap_or(false);
            if let Some(data) = config_map_data(client, ns, &r.name, optional).await? {
                for (k, v) in data {
                    set(&mut vars, format!("{prefix}{k}"), v);
                }
            }
        }
        if let Some(r) = &source.secret_ref {
            let optional = r.optional.unwrap_or(false);
            if let Some(data) = secret_data(client, ns, &r.name, optional).await? {
                for (k, v) in data {
                    set(
                        &mut vars,
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v).into_owned(),
                    );
                }
            }
        }
    }

    for var in container.env.iter().flatten() {
        let value = if let Some(from) = &var.value_from {
            if let Some(f) = &from.field_ref {
                Some(field_ref(pod, f, facts)?)
            } else if let Some(r) = &from.config_map_key_ref {
                let optional = r.optional.unwrap_or(false);
                let data = config_map_data(client, ns, &r.name, optional).await?;
                KeyRef {
                    kind: "ConfigMap",
                    namespace: ns,
                    name: &r.name,
                    key: &r.key,
                    optional,
                }
                .value(data.as_ref().map(|d| d.get(&r.key).cloned()))?
            } else if let Some(r) = &from.secret_key_ref {
                let optional = r.optional.unwrap_or(false);
                let data = secret_data(client, ns, &r.name, optional).await?;
                KeyRef {
                    kind: "Secret",
                    namespace: ns,
                    name: &r.name,
                    key: &r.key,
                    optional,
                }
                .value(data.as_ref().map(|d| {
                    d.get(&r.key)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                }))?
            } else {
                return Err(PodFailure::unsupported(format!(
                    "env {}: only fieldRef, configMapKeyRef and secretKeyRef are supported by the process kubelet",
                    var.name
                )));
            }
        } else {
            Some(expand(var.value.as_deref().unwrap_or(""), &vars))
        };
        if let Some(value) = value {
            set(&mut vars, var.name.clone(), value);
        }
    }
    Ok(vars)
}

/// One `configMapKeyRef` or `secretKeyRef`.
struct KeyRef<'a> {
    kind: &'static str,
    namespace: &'a str,
    name: &'a str,
    key: &'a str,
    optional: bool,
}

impl KeyRef<'_> {
    /// The variable's value from what was found: `None` when the object does
    /// not exist, `Some(None)` when it lacks the key. As in the kubelet, an
    /// `optional` reference to a missing object or key leaves the variable
    /// unset (an earlier value of it stays); otherwise the container cannot start.
    fn value(&self, found: Option<Option<String>>) -> Result<Option<String>, PodFailure> {
        match found {
            Some(Some(value)) => Ok(Some(value)),
            None | Some(None) if self.optional => Ok(None),
            None => Err(PodFailure::config(format!(
                "{} \"{}\" not found",
                self.kind.to_lowercase(),
                self.name
            ))),
            Some(None) => Err(PodFailure::config(format!(
                "couldn't find key {} in {} {}/{}",
                self.key, self.kind, self.namespace, self.name
            ))),
        }
    }
}

/// Expands `$(NAME)` with earlier variables; `$$(NAME)` escapes to a literal
/// `$(NAME)` and unknown references stay as written, like the kubelet.
pub fn expand(input: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match vars.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

pub fn field_ref(
    pod: &Pod,
    f: &ObjectFieldSelector,
    facts: &PodFacts,
) -> Result<String, PodFailure> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let path = f.field_path.as_str();
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => facts.node_name.clone(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => facts.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => facts.host_ip.clone(),
        _ => {
            if let Some(key) = bracket_key(path, "metadata.labels") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(key))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(key) = bracket_key(path, "metadata.annotations") {
                meta.annotations
                    .as_ref()
                    .and_then(|l| l.get(key))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(PodFailure::unsupported(format!(
                    "fieldRef {path} is not supported by the process kubelet"
                )));
            }
        }
    };
    Ok(value)
}

/// `metadata.labels['app']` -> `app`.
fn bracket_key<'a>(path: &'a str, field: &str) -> Option<&'a str> {
    let rest = path
        .strip_prefix(field)?
        .strip_prefix('[')?
        .strip_suffix(']')?;
    rest.strip_prefix('\'')
        .and_then(|r| r.strip_suffix('\''))
        .or_else(|| rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')))
}

pub async fn config_map_data(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, String>>, PodFailure> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(cm)) => {
            let mut data = cm.data.unwrap_or_default();
            for (k, v) in cm.binary_data.unwrap_or_default() {
                data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
            }
            Ok(Some(data))
        }
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(PodFailure::config(format!(
            "configmap \"{name}\" not found"
        ))),
        Err(e) => Err(PodFailure::config(format!(
            "reading configmap \"{name}\": {e}"
        ))),
    }
}

pub async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, PodFailure> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(s)) => {
            let mut data: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            for (k, v) in s.string_data.unwrap_or_default() {
                data.insert(k, v.into_bytes());
            }
            Ok(Some(data))
        }
        Ok(None) if optional => Ok(None),
        Ok(None) => Err(PodFailure::config(format!("secret \"{name}\" not found"))),
        Err(e) => Err(PodFailure::config(format!(
            "reading secret \"{name}\": {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubelet::FailureKind;

    #[test]
    fn expands_like_the_kubelet() {
        let vars = vec![
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "x".to_owned()),
        ];
        assert_eq!(expand("$(A)-$(B)", &vars), "1-x");
        assert_eq!(expand("$(MISSING)", &vars), "$(MISSING)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("cost $5 $(A", &vars), "cost $5 $(A");
    }

    #[test]
    fn optional_key_refs_leave_the_variable_unset_when_the_object_or_key_is_missing() {
        let reference = |optional| KeyRef {
            kind: "Secret",
            namespace: "shop",
            name: "es-creds",
            key: "apiKey",
            optional,
        };
        let found = |value: &str| Some(Some(value.to_owned()));
        assert_eq!(
            reference(true).value(found("k")).expect("value"),
            Some("k".to_owned())
        );
        // A missing key, then a missing Secret.
        assert_eq!(reference(true).value(Some(None)).expect("unset"), None);
        assert_eq!(reference(true).value(None).expect("unset"), None);

        let missing_key = reference(false)
            .value(Some(None))
            .expect_err("required key");
        assert_eq!(missing_key.kind, FailureKind::Config);
        assert_eq!(
            missing_key.message,
            "couldn't find key apiKey in Secret shop/es-creds"
        );
        let missing_secret = reference(false).value(None).expect_err("required Secret");
        assert_eq!(missing_secret.message, "secret \"es-creds\" not found");
    }

    #[test]
    fn reads_bracketed_keys() {
        assert_eq!(
            bracket_key("metadata.labels['app']", "metadata.labels"),
            Some("app")
        );
        assert_eq!(bracket_key("metadata.labels", "metadata.labels"), None);
    }
}
