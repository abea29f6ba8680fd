//! The schema registry of a pipeline that reads or writes Avro: the reader
//! schema its source is checked and read with, and the registry's verdict on
//! the schemas its sinks write, asked before every deploy and upgrade.
//!
//! Unlike sinks' Secrets, the registry's credentials are read by the
//! operator too: it must ask the registry before anything runs. They come
//! from Secrets in the pipeline's namespace, the same the pods read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use keystone_avro::plan::{
    AvroPlanError, ReaderSchema, SinkVerdict, check_sinks, complete_plan, reader_from_registry,
    uses_avro,
};
use keystone_avro::registry::{Auth, Registry, RegistryConfig, RegistryError};
use keystone_crds::pipeline::avro::SchemaRegistrySpec;
use keystone_crds::{Pipeline, Plan};
use kube::Api;
use kube::api::ListParams;

use crate::config::OperatorConfig;
use crate::context::Context;

/// The condition of a pipeline whose registry cannot be asked.
pub const SCHEMA_REGISTRY: &str = "SchemaRegistryReady";

/// How often a pipeline that follows its source subject's latest version
/// looks for a new one, and how soon a registry that did not answer is
/// asked again.
pub const REGISTRY_RECHECK: Duration = Duration::from_secs(30);

/// How soon pods that wait for the registry are looked at again.
pub const WAITING_RECHECK: Duration = Duration::from_secs(10);

/// What the registry gives a pipeline's check.
pub enum Resolved {
    /// Neither the source nor a sink is Avro.
    NotAvro,
    Ready {
        spec: SchemaRegistrySpec,
        registry: Arc<Registry>,
        reader: Option<ReaderSchema>,
    },
    /// The registry did not answer and the spec is the one deployed: the
    /// reconcile goes on with the plan that runs (checkpoints, upgrade
    /// steps and rollbacks do not wait for the registry).
    Unreachable { deployed: Box<Plan> },
}

/// Why a pipeline's Avro parts could not be resolved.
#[derive(Debug)]
pub enum Problem {
    /// The registry did not answer: nothing is the manifest's fault, what
    /// runs goes on, and it is asked again.
    Unavailable(String),
    /// The manifest (or what the registry holds) is wrong: refused like a
    /// broken contract, with a reason for the condition.
    Invalid {
        reason: &'static str,
        message: String,
    },
}

impl From<AvroPlanError> for Problem {
    fn from(e: AvroPlanError) -> Self {
        match e {
            AvroPlanError::Registry(e) => Problem::from(e),
            AvroPlanError::Schema { path, message } => Problem::Invalid {
                reason: "SchemaInvalid",
                message: format!("{path}: {message}"),
            },
        }
    }
}

impl From<RegistryError> for Problem {
    fn from(e: RegistryError) -> Self {
        let reason = match &e {
            _ if e.is_transient() => return Problem::Unavailable(e.to_string()),
            RegistryError::NotFound { .. } => "SchemaNotFound",
            RegistryError::NotAvro { .. } => "SchemaInvalid",
            RegistryError::Refused { .. } | RegistryError::Config(_) => "SchemaRegistryRefused",
            RegistryError::Unavailable { .. } => unreachable!("transient"),
        };
        Problem::Invalid {
            reason,
            message: e.to_string(),
        }
    }
}

/// The registry a pipeline uses: its own, else its source cluster's in
/// `config`.
pub fn registry_spec(config: &OperatorConfig, pipeline: &Pipeline) -> Option<SchemaRegistrySpec> {
    if let Some(spec) = &pipeline.spec.schema_registry {
        return Some(spec.clone());
    }
    let cluster = config.resolve_cluster(pipeline.spec.source.cluster.as_deref())?;
    config.kafka_clusters.get(&cluster)?.schema_registry.clone()
}

/// The source's reader schema and a client for the pipeline's registry,
/// when the pipeline uses Avro.
pub async fn resolve(ctx: &Context, pipeline: &Pipeline) -> Result<Resolved, Problem> {
    if !uses_avro(pipeline) {
        return Ok(Resolved::NotAvro);
    }
    let Some(spec) = registry_spec(&ctx.config, pipeline) else {
        return Err(Problem::Invalid {
            reason: "NoSchemaRegistry",
            message: "format: avro (or keyFormat: avro) needs a schema registry: set spec.schemaRegistry, or schemaRegistry of the Kafka cluster in the operator's configuration".into(),
        });
    };
    let namespace = pipeline.metadata.namespace.as_deref().unwrap_or_default();
    let registry = client(ctx, namespace, &spec).await?;
    let reader = reader_from_registry(&registry, pipeline).await?;
    Ok(Resolved::Ready {
        spec,
        registry,
        reader,
    })
}

/// Completes a checked plan with its Avro parts and asks the registry about
/// the sinks' schemas: a refused one is a problem naming the sink and
/// quoting the registry.
pub async fn complete(
    plan: &mut Plan,
    spec: &SchemaRegistrySpec,
    registry: &Registry,
    reader: Option<&ReaderSchema>,
) -> Result<Vec<SinkVerdict>, Problem> {
    if let Err(errors) = complete_plan(plan, spec, reader) {
        let message = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        return Err(Problem::Invalid {
            reason: "SchemaInvalid",
            message,
        });
    }
    let verdicts = check_sinks(registry, plan).await?;
    let refusals: Vec<String> = verdicts
        .iter()
        .filter_map(|v| {
            v.refusal
                .as_ref()
                .map(|r| format!("sink {:?}: {r}", v.sink))
        })
        .collect();
    if !refusals.is_empty() {
        return Err(Problem::Invalid {
            reason: "SchemaIncompatible",
            message: refusals.join("; "),
        });
    }
    Ok(verdicts)
}

/// A client of `spec`, with its Secrets read from `namespace`.
async fn client(
    ctx: &Context,
    namespace: &str,
    spec: &SchemaRegistrySpec,
) -> Result<Arc<Registry>, Problem> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let read = async |name: &str| -> Result<Secret, Problem> {
        match secrets.get_opt(name).await {
            Ok(Some(secret)) => Ok(secret),
            Ok(None) => Err(Problem::Invalid {
                reason: "SecretNotFound",
                message: format!("the schema registry's Secret {namespace}/{name} does not exist"),
            }),
            Err(e) => Err(Problem::Unavailable(format!(
                "the schema registry's Secret {namespace}/{name} could not be read: {e}"
            ))),
        }
    };
    let value = |secret: &Secret, key: &str| -> Option<Vec<u8>> {
        secret.data.as_ref()?.get(key).map(|v| v.0.clone())
    };
    let text = |bytes: Vec<u8>| {
        String::from_utf8_lossy(&bytes)
            .trim_end_matches(['\r', '\n'])
            .to_owned()
    };
    let auth = match &spec.credentials_secret {
        None => None,
        Some(name) => {
            let secret = read(name).await?;
            match (
                value(&secret, "username"),
                value(&secret, "password"),
                value(&secret, "token"),
            ) {
                (Some(username), Some(password), None) => Some(Auth::Basic {
                    username: text(username),
                    password: text(password),
                }),
                (None, None, Some(token)) => Some(Auth::Bearer(text(token))),
                _ => {
                    return Err(Problem::Invalid {
                        reason: "SecretInvalid",
                        message: format!(
                            "the schema registry's Secret {namespace}/{name} must hold username and password, or token (and not both)"
                        ),
                    });
                }
            }
        }
    };
    let ca_pem = match &spec.ca_secret {
        None => None,
        Some(name) => {
            let secret = read(name).await?;
            Some(value(&secret, "ca.crt").ok_or_else(|| Problem::Invalid {
                reason: "SecretInvalid",
                message: format!("the schema registry's Secret {namespace}/{name} has no ca.crt"),
            })?)
        }
    };
    let config = RegistryConfig {
        url: spec.url.clone(),
        auth,
        ca_pem,
    };
    cached_client(&ctx.registries, namespace, config).map_err(Problem::from)
}

/// Registry clients by namespace and URL, each with the configuration
/// (credentials, CA) it was built with.
pub type RegistryClients = Mutex<HashMap<(String, String), (RegistryConfig, Arc<Registry>)>>;

/// The client of `config` for pipelines of `namespace`: the one built
/// before while the configuration is the same (its connections are reused
/// by every reconcile), else a new one in its place (a rotated credential,
/// a new CA).
fn cached_client(
    clients: &RegistryClients,
    namespace: &str,
    config: RegistryConfig,
) -> Result<Arc<Registry>, RegistryError> {
    let key = (namespace.to_owned(), config.url.clone());
    let mut clients = clients.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((built_with, client)) = clients.get(&key)
        && *built_with == config
    {
        return Ok(client.clone());
    }
    let client = Arc::new(Registry::new(&config)?);
    clients.insert(key, (config, client.clone()));
    Ok(client)
}

/// The ready pods of pipeline `name` whose stage waits for the registry
/// (their `keystone_schema_registry_waiting` is 1). Pods that cannot be
/// asked are left out: their readiness speaks for them.
pub async fn waiting_pods(ctx: &Context, namespace: &str, name: &str) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let selector = crate::resources::pipeline_selector(name);
    let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await else {
        return Vec::new();
    };
    let mut waiting = Vec::new();
    for pod in list.items {
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        if !crate::resources::pod_ready(&pod) {
            continue;
        }
        let Ok(text) =
            crate::checkpoint::pod_get(&ip, crate::resources::HTTP_PORT, "/metrics").await
        else {
            continue;
        };
        if crate::rollout::metric_sum(&text, "keystone_schema_registry_waiting", None) > 0.0 {
            waiting.push(pod.metadata.name.unwrap_or_default());
        }
    }
    waiting
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(password: &str) -> RegistryConfig {
        RegistryConfig {
            url: "http://registry.kafka:8081".into(),
            auth: Some(Auth::Basic {
                username: "keystone".into(),
                password: password.into(),
            }),
            ca_pem: None,
        }
    }

    #[test]
    fn a_client_is_reused_until_its_configuration_changes() {
        let clients = RegistryClients::default();
        let first = cached_client(&clients, "shop", config("one")).expect("client");
        let again = cached_client(&clients, "shop", config("one")).expect("client");
        assert!(Arc::ptr_eq(&first, &again), "the same configuration");
        let elsewhere = cached_client(&clients, "web", config("one")).expect("client");
        assert!(
            !Arc::ptr_eq(&first, &elsewhere),
            "another namespace's Secrets"
        );
        let rotated = cached_client(&clients, "shop", config("two")).expect("client");
        assert!(!Arc::ptr_eq(&first, &rotated), "a rotated password");
        let after = cached_client(&clients, "shop", config("two")).expect("client");
        assert!(Arc::ptr_eq(&rotated, &after), "the new one is kept");
        assert_eq!(
            clients.lock().unwrap().len(),
            2,
            "one per namespace and URL"
        );
        let refused = cached_client(
            &clients,
            "shop",
            RegistryConfig {
                url: "ftp://registry".into(),
                ..config("two")
            },
        );
        assert!(
            matches!(refused, Err(RegistryError::Config(_))),
            "an ftp URL is refused"
        );
    }
}
