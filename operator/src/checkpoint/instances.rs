//! The runtime instances of a stage, addressed one by one: their pods (found by
//! the stage Deployment's selector) and their `/checkpoint` and `/resume`
//! endpoints on the pod address.

use std::time::Duration;

use futures::future::join_all;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use keystone_crds::Plan;
use keystone_crds::checkpoint::InstanceCheckpoint;
use keystone_crds::plan::PlanStage;
use kube::Api;
use kube::api::ListParams;

use super::CheckpointFailure;
use crate::context::Context;
use crate::resources::{ANNOTATION_PLAN_HASH, HTTP_PORT, LABEL_PIPELINE, LABEL_STAGE, pod_ready};

/// How long one instance may take to answer. The runtime gives up on its own
/// barrier after 60 s and says so; this leaves it the time to say it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(65);

/// How long reaching a pod may take. A pod on a node that went away can look
/// Ready for a while and its address then swallows the connection attempt; the
/// reconcile waiting on it should not hold its slot for the whole request timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One runtime instance, ready to be asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Instance {
    pub(super) pod: String,
    /// `http://<pod IP>:<http port>`.
    pub(super) base: String,
}

/// `http://<pod IP>:<port named http>` of a pod that has an address.
fn base_url(pod: &Pod) -> Option<String> {
    let ip = pod
        .status
        .as_ref()?
        .pod_ip
        .as_deref()
        .filter(|ip| !ip.is_empty())?;
    let port = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some("http"))
        .map_or(HTTP_PORT, |p| p.container_port);
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    Some(format!("http://{host}:{port}"))
}

/// The stage's instances, if every desired replica is Ready and runs
/// `plan_hash`, and no other pod of the stage is starting or going away.
pub(super) fn check_pods(
    stage: &PlanStage,
    plan_hash: &str,
    pods: &[Pod],
) -> Result<Vec<Instance>, String> {
    let name = &stage.name;
    let mut ready = Vec::new();
    for pod in pods {
        let pod_name = pod.metadata.name.clone().unwrap_or_default();
        let status = pod.status.clone().unwrap_or_default();
        // A pod that ended (evicted, completed) runs nothing and owns no partition.
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(format!(
                "stage {name}: pod {pod_name} is terminating (a rollout or a scale-down is in progress)"
            ));
        }
        let hash = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_PLAN_HASH));
        match hash {
            None => {
                return Err(format!(
                    "stage {name}: pod {pod_name} has no {ANNOTATION_PLAN_HASH} annotation (it was not made by the stage's Deployment)"
                ));
            }
            Some(hash) if hash != plan_hash => {
                return Err(format!(
                    "stage {name}: pod {pod_name} runs plan {hash}, not the current plan {plan_hash} (a rollout is in progress)"
                ));
            }
            Some(_) => {}
        }
        if !pod_ready(pod) {
            return Err(format!("stage {name}: pod {pod_name} is not Ready"));
        }
        let Some(base) = base_url(pod) else {
            return Err(format!(
                "stage {name}: pod {pod_name} has no IP address yet"
            ));
        };
        ready.push(Instance {
            pod: pod_name,
            base,
        });
    }
    if ready.len() != stage.parallelism.max(0) as usize {
        return Err(format!(
            "stage {name}: {} ready instance(s) of {} desired",
            ready.len(),
            stage.parallelism
        ));
    }
    ready.sort_by(|a, b| a.pod.cmp(&b.pod));
    Ok(ready)
}

async fn stage_pods(ctx: &Context, plan: &Plan, stage: &PlanStage) -> Result<Vec<Pod>, String> {
    let selector = format!(
        "{LABEL_PIPELINE}={},{LABEL_STAGE}={}",
        plan.pipeline, stage.name
    );
    Api::<Pod>::namespaced(ctx.client.clone(), &plan.namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map(|list| list.items)
        .map_err(|e| {
            format!(
                "stage {}: listing pods {selector} in {}: {e}",
                stage.name, plan.namespace
            )
        })
}

/// The stage's instances, checked by [`check_pods`].
pub(super) async fn ready_instances(
    ctx: &Context,
    plan: &Plan,
    stage: &PlanStage,
    plan_hash: &str,
) -> Result<Vec<Instance>, CheckpointFailure> {
    let pods = stage_pods(ctx, plan, stage)
        .await
        .map_err(CheckpointFailure::new)?;
    check_pods(stage, plan_hash, &pods).map_err(CheckpointFailure::new)
}

/// One request with an empty body: the body of a 2xx answer, or what went wrong.
async fn exchange(method: Method, url: String, token: Option<&str>) -> Result<Bytes, String> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let mut request = Request::builder().method(method.clone()).uri(&url);
    if let Some(token) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("building {method} {url}: {e}"))?;
    let answer = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{method} {url}: {}", with_causes(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{method} {url}: reading the answer: {e}"))?
            .to_bytes();
        if status.is_success() {
            Ok(body)
        } else {
            Err(format!(
                "{method} {url} answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ))
        }
    };
    tokio::time::timeout(REQUEST_TIMEOUT, answer)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{method} {url}: no answer within {REQUEST_TIMEOUT:?}"
            ))
        })
}

/// An error with what caused it ("client error (Connect): tcp connect error:
/// connection timed out"): hyper's own message alone does not say what failed.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// A control request: it carries the pipeline's control token.
async fn post(instance: &Instance, path: &str, token: &str) -> Result<Bytes, String> {
    exchange(
        Method::POST,
        format!("{}{path}", instance.base),
        Some(token),
    )
    .await
}

/// POSTs to `path` of a runtime pod's HTTP port with the control token: the
/// answer's text when 2xx, else what went wrong, naming the URL.
pub async fn pod_post(ip: &str, port: i32, path: &str, token: &str) -> Result<String, String> {
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    let body = exchange(
        Method::POST,
        format!("http://{host}:{port}{path}"),
        Some(token),
    )
    .await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// GETs `path` from a runtime pod's HTTP port (`/metrics`, say): the text of a
/// 2xx answer, or what went wrong, naming the URL.
pub async fn pod_get(ip: &str, port: i32, path: &str) -> Result<String, String> {
    let host = if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    };
    let body = exchange(Method::GET, format!("http://{host}:{port}{path}"), None).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Asks every instance, concurrently, to commit at a barrier (and stop there
/// with `stop`); one answer per instance, in order. An answer in the shape of
/// an older runtime (without instance, plan hash or `stopped`) parses with
/// those left empty.
pub(super) async fn checkpoint_all(
    instances: &[Instance],
    stop: bool,
    token: &str,
) -> Vec<Result<InstanceCheckpoint, String>> {
    let path = if stop {
        "/checkpoint?stop=true"
    } else {
        "/checkpoint"
    };
    join_all(instances.iter().map(|instance| async move {
        let body = post(instance, path, token).await?;
        serde_json::from_slice::<InstanceCheckpoint>(&body).map_err(|e| {
            format!(
                "the answer to POST {}{path} is not a checkpoint: {e}",
                instance.base
            )
        })
    }))
    .await
}

/// Asks stopped instances to resume consuming; all are asked, the first
/// failure is returned.
pub(super) async fn post_resume(instances: &[Instance], token: &str) -> Result<(), String> {
    let results = join_all(instances.iter().map(|i| post(i, "/resume", token))).await;
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    match failures.is_empty() {
        true => Ok(()),
        false => Err(failures.join("; ")),
    }
}

/// Resumes every instance of the pipeline (after a checkpoint with `stop`, or
/// a suspend), whatever its plan or stage. Instances that are not stopped
/// ignore it.
pub async fn resume(ctx: &Context, plan: &Plan) -> Result<(), CheckpointFailure> {
    let selector = format!("{LABEL_PIPELINE}={}", plan.pipeline);
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &plan.namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| {
            CheckpointFailure::new(format!(
                "listing pods {selector} in {}: {e}",
                plan.namespace
            ))
        })?;
    let mut targets = Vec::new();
    for pod in pods.items {
        // The capture (spec.source.postgres) takes no checkpoints: it never stops.
        if pod.metadata.deletion_timestamp.is_some() || crate::resources::is_source_pod(&pod) {
            continue;
        }
        if let Some(base) = base_url(&pod) {
            let pod = pod.metadata.name.clone().unwrap_or_default();
            targets.push(Instance { pod, base });
        }
    }
    let token = crate::control::token(ctx, &plan.namespace, &plan.pipeline)
        .await
        .map_err(|e| CheckpointFailure::new(e.to_string()))?;
    post_resume(&targets, &token)
        .await
        .map_err(CheckpointFailure::new)
}
