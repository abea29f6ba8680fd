//! The process kubelet against the real control plane: Deployments become
//! running, ready processes; crashes restart; deletion stops them.

use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use keystone_e2e::testapp::http_get;
use keystone_e2e::{TestNamespace, Testbed, wait_for, wait_until};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Not 8080: a process elsewhere on the machine that binds 0.0.0.0:8080
/// takes that port from every pod IP (pods share the host's network).
const PORT: u16 = 38080;

fn testapp_deployment(name: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "app",
                        "image": "keystone/testapp:dev",
                        "env": [
                            { "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
                            { "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                            { "name": "GREETING", "valueFrom": { "configMapKeyRef": { "name": "cfg", "key": "greeting" } } },
                            { "name": "PORT", "value": PORT.to_string() }
                        ],
                        "ports": [{ "name": "http", "containerPort": PORT }],
                        "readinessProbe": { "httpGet": { "path": "/healthz", "port": "http" }, "periodSeconds": 1 },
                        "volumeMounts": [{ "name": "config", "mountPath": "/etc/keystone-testapp" }]
                    }],
                    "volumes": [{ "name": "config", "configMap": { "name": "cfg" } }]
                }
            }
        }
    }))
    .expect("valid deployment")
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .map_or(0, |c| c.restart_count)
}

fn pod_addr(pod: &Pod) -> SocketAddr {
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .expect("pod IP");
    SocketAddr::new(ip.parse().expect("IP"), PORT)
}

async fn pods_summary(ns: &TestNamespace) -> String {
    let pods: Api<Pod> = ns.api();
    match pods.list(&ListParams::default()).await {
        Err(e) => format!("cannot list pods: {e}"),
        Ok(list) if list.items.is_empty() => "no pods".to_owned(),
        Ok(list) => list
            .items
            .iter()
            .map(|p| {
                format!(
                    "{}: {}",
                    p.metadata.name.as_deref().unwrap_or(""),
                    serde_json::to_string_pretty(&p.status).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// The deployment's one pod once it is Running and Ready.
async fn ready_pod(ns: &TestNamespace, app: &str) -> Pod {
    let pods: Api<Pod> = ns.api();
    let lp = ListParams::default().labels(&format!("app={app}"));
    wait_until(
        TIMEOUT,
        &format!("a Ready pod of deployment {app}"),
        || async {
            let list = pods.list(&lp).await.ok()?;
            list.items.into_iter().find(|p| {
                is_ready(p) && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
        },
        || pods_summary(ns),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}

fn process_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("keystone-testapp"))
}

#[tokio::test]
async fn deployment_runs_restarts_after_a_crash_and_is_garbage_collected() {
    let tb = Testbed::from_env().await.expect("testbed");
    let ns = tb.namespace("kubelet").await.expect("namespace");
    let cms: Api<ConfigMap> = ns.api();
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "cfg" }, "data": { "greeting": "hello" }
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm)
        .await
        .expect("configmap");
    let deployments: Api<Deployment> = ns.api();
    deployments
        .create(&PostParams::default(), &testapp_deployment("testapp"))
        .await
        .expect("deployment");

    // Running and Ready through the kubelet, with env and volume in place.
    let pod = ready_pod(&ns, "testapp").await;
    let pod_name = pod.metadata.name.clone().unwrap();
    let addr = pod_addr(&pod);
    assert!(
        addr.ip().is_loopback() && addr.ip().to_string() != "127.0.0.1",
        "own loopback IP: {addr}"
    );
    assert_eq!(http_get(addr, "/env/POD_NAME").await.unwrap().1, pod_name);
    assert_eq!(http_get(addr, "/env/GREETING").await.unwrap().1, "hello");
    assert_eq!(
        http_get(addr, "/file/etc/keystone-testapp/greeting")
            .await
            .unwrap()
            .1,
        "hello"
    );
    let first_pid: u32 = http_get(addr, "/pid").await.unwrap().1.parse().unwrap();
    assert!(process_alive(first_pid));

    // A crash restarts the container in the same pod.
    let (status, _) = http_get(addr, "/crash?code=7")
        .await
        .expect("crash request");
    assert_eq!(status, 200);
    let pods: Api<Pod> = ns.api();
    let restarted = wait_for(&pods, &pod_name, TIMEOUT, "restart after a crash", |p| {
        restarts(p) >= 1 && is_ready(p)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let last = restarted
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .last_state
        .clone()
        .and_then(|s| s.terminated)
        .expect("last state terminated");
    assert_eq!(last.exit_code, 7);
    let second_pid: u32 = http_get(addr, "/pid").await.unwrap().1.parse().unwrap();
    assert_ne!(first_pid, second_pid);
    assert!(process_alive(second_pid));

    // Deleting the Deployment: GC deletes ReplicaSet and Pod, the kubelet
    // stops the process and removes the pod.
    deployments
        .delete("testapp", &DeleteParams::background())
        .await
        .expect("delete deployment");
    wait_until(
        TIMEOUT,
        "the deployment's pods to be garbage collected",
        || async {
            pods.list(&ListParams::default())
                .await
                .ok()
                .filter(|l| l.items.is_empty())
        },
        || pods_summary(&ns),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !process_alive(second_pid),
        "process {second_pid} still runs after its pod was deleted"
    );
    assert!(
        http_get(addr, "/healthz").await.is_err(),
        "something still answers on {addr}"
    );
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn failing_liveness_probe_restarts_the_container() {
    let tb = Testbed::from_env().await.expect("testbed");
    let ns = tb.namespace("liveness").await.expect("namespace");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "live", "labels": { "app": "live" } },
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "app",
                "image": "keystone/testapp:dev",
                "env": [
                    { "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
                    { "name": "PORT", "value": PORT.to_string() }
                ],
                "livenessProbe": { "httpGet": { "path": "/healthz", "port": PORT }, "periodSeconds": 1, "failureThreshold": 2 },
                "readinessProbe": { "exec": { "command": ["true"] }, "periodSeconds": 1 }
            }]
        }
    }))
    .unwrap();
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let ready = ready_pod(&ns, "live").await;
    let addr = pod_addr(&ready);
    http_get(addr, "/unhealthy").await.expect("flip health");
    let restarted = wait_for(
        &pods,
        "live",
        TIMEOUT,
        "restart after liveness failures",
        |p| restarts(p) >= 1 && is_ready(p),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let reason = restarted.status.unwrap().container_statuses.unwrap()[0]
        .last_state
        .clone()
        .and_then(|s| s.terminated)
        .and_then(|t| t.reason)
        .unwrap_or_default();
    assert!(reason.starts_with("LivenessProbeFailed"), "{reason}");
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn exit_codes_set_the_phase_and_unsupported_pods_say_why() {
    let tb = Testbed::from_env().await.expect("testbed");
    let ns = tb.namespace("phases").await.expect("namespace");
    let pods: Api<Pod> = ns.api();
    // `command` not naming the image's binary runs from the host.
    let failing: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "fails" },
        "spec": {
            "restartPolicy": "Never",
            "containers": [{ "name": "c", "image": "keystone/testapp:dev", "command": ["sh", "-c", "exit 3"] }]
        }
    }))
    .unwrap();
    let unsupported: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "unsupported" },
        "spec": {
            "containers": [{ "name": "c", "image": "nginx:1.27" }],
            "volumes": [{ "name": "h", "hostPath": { "path": "/tmp" } }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &failing)
        .await
        .expect("pod");
    pods.create(&PostParams::default(), &unsupported)
        .await
        .expect("pod");

    let failed = wait_for(&pods, "fails", TIMEOUT, "phase Failed", |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let term = failed.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .and_then(|s| s.terminated)
        .expect("terminated");
    assert_eq!(term.exit_code, 3);

    let reported = wait_for(
        &pods,
        "unsupported",
        TIMEOUT,
        "an Unsupported condition",
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == "keystone.dev/ProcessKubeletSupported" && c.status == "False"
                    })
                })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let message = reported.status.unwrap().message.unwrap_or_default();
    assert!(
        message.contains("hostPath") || message.contains("\"h\""),
        "{message}"
    );
    assert!(message.contains("nginx:1.27"), "{message}");
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn waits_fail_with_status_and_events() {
    let tb = Testbed::from_env().await.expect("testbed");
    let ns = tb.namespace("waits").await.expect("namespace");
    let pods: Api<Pod> = ns.api();
    let err = wait_for(
        &pods,
        "does-not-exist",
        Duration::from_millis(500),
        "a pod that never comes",
        |_| true,
    )
    .await
    .expect_err("must time out");
    let text = err.to_string();
    assert!(
        text.contains("timed out") && text.contains("not found"),
        "{text}"
    );
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn init_containers_run_first_and_share_empty_dirs() {
    let tb = Testbed::from_env().await.expect("testbed");
    let ns = tb.namespace("init").await.expect("namespace");
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "with-init", "labels": { "app": "with-init" } },
        "spec": {
            "initContainers": [
                { "name": "first", "image": "keystone/testapp:dev", "command": ["sh", "-c", "echo one > /shared/log"],
                  "volumeMounts": [{ "name": "shared", "mountPath": "/shared" }] },
                { "name": "second", "image": "keystone/testapp:dev", "command": ["sh", "-c", "echo two >> /shared/log"],
                  "volumeMounts": [{ "name": "shared", "mountPath": "/shared" }] }
            ],
            "containers": [{
                "name": "app",
                "image": "keystone/testapp:dev",
                "env": [
                    { "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
                    { "name": "PORT", "value": PORT.to_string() }
                ],
                "readinessProbe": { "tcpSocket": { "port": PORT }, "periodSeconds": 1 },
                "volumeMounts": [{ "name": "shared", "mountPath": "/shared" }]
            }],
            "volumes": [{ "name": "shared", "emptyDir": {} }]
        }
    }))
    .unwrap();
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let ready = ready_pod(&ns, "with-init").await;
    let status = ready.status.clone().unwrap();
    let inits = status.init_container_statuses.unwrap_or_default();
    assert_eq!(inits.len(), 2);
    for s in &inits {
        let t = s
            .state
            .clone()
            .and_then(|s| s.terminated)
            .expect("init terminated");
        assert_eq!(t.exit_code, 0, "{}", s.name);
    }
    assert_eq!(
        http_get(pod_addr(&ready), "/file/shared/log")
            .await
            .unwrap()
            .1,
        "one\ntwo\n"
    );
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn pods_reach_the_api_server_in_cluster_with_their_service_account() {
    let tb = Testbed::from_env().await.expect("testbed");
    let ns = tb.namespace("incluster").await.expect("namespace");
    let pods: Api<Pod> = ns.api();
    // kubectl without a kubeconfig uses the in-cluster config: the
    // KUBERNETES_SERVICE_* env and the mounted token and CA.
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "whoami" },
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "default",
            "containers": [{
                "name": "c",
                "image": "keystone/testapp:dev",
                "command": ["sh", "-c", "kubectl auth whoami -o jsonpath='{.status.userInfo.username}'"]
            }]
        }
    }))
    .unwrap();
    // The serviceaccount controller creates "default" shortly after the namespace.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = ns.api();
    wait_for(
        &sas,
        "default",
        TIMEOUT,
        "the default service account",
        |_| true,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let done = wait_for(&pods, "whoami", TIMEOUT, "the pod to finish", |p| {
        matches!(
            p.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let uid = done.metadata.uid.clone().unwrap();
    let log = std::fs::read_to_string(tb.pod_log_dir(ns.name(), "whoami", &uid).join("c.log"))
        .expect("pod log");
    assert_eq!(
        done.status.unwrap().phase.as_deref(),
        Some("Succeeded"),
        "log:\n{log}"
    );
    let expected = format!("system:serviceaccount:{}:default", ns.name());
    assert!(
        log.contains(&expected),
        "expected {expected} in the log:\n{log}"
    );
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn a_process_listening_on_a_wildcard_address_gets_a_warning_event() {
    let tb = Testbed::from_env().await.expect("testbed");
    let ns = tb.namespace("wildcard").await.expect("namespace");
    let pods: Api<Pod> = ns.api();
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": { "name": "wild" },
        "spec": {
            "containers": [{
                "name": "app",
                "image": "keystone/testapp:dev",
                "env": [{ "name": "POD_IP", "value": "0.0.0.0" }, { "name": "PORT", "value": "38181" }]
            }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let client = ns.client();
    if let Err(e) = keystone_e2e::wait_for_event(
        &client,
        Some(ns.name()),
        "wild",
        &["WildcardListen"],
        TIMEOUT,
    )
    .await
    {
        panic!("{e}\n{}", pods_summary(&ns).await);
    }
    ns.delete().await.expect("delete namespace");
}
