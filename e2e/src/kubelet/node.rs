//! The Node object this kubelet stands for.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use super::Config;

/// Creates the Node if needed and marks it Ready.
pub async fn register(client: &Client, config: &Config) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(&config.node_name).await?.is_none() {
        let labels = BTreeMap::from([
            (
                "kubernetes.io/hostname".to_owned(),
                config.node_name.clone(),
            ),
            ("kubernetes.io/os".to_owned(), "linux".to_owned()),
            (
                "kubernetes.io/arch".to_owned(),
                std::env::consts::ARCH.replace("x86_64", "amd64"),
            ),
            ("keystone.dev/process-kubelet".to_owned(), "true".to_owned()),
        ]);
        let node = Node {
            metadata: ObjectMeta {
                name: Some(config.node_name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            ..Default::default()
        };
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            // Lost a race with ourselves (a previous run); fine.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e),
        }
    }
    report(client, config).await
}

/// Keeps the node's Ready condition fresh.
pub async fn heartbeat(client: Client, config: Config) {
    loop {
        tokio::time::sleep(Duration::from_secs(20)).await;
        if let Err(e) = report(&client, &config).await {
            tracing::warn!(error = %e, "node status update failed");
        }
    }
}

async fn report(client: &Client, config: &Config) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let now = Time(Timestamp::now());
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(now.clone()),
        last_transition_time: Some(config.started_at.clone()),
    };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let capacity = BTreeMap::from([
        ("cpu".to_owned(), Quantity(cpus.to_string())),
        ("memory".to_owned(), Quantity(memory_total())),
        ("pods".to_owned(), Quantity("250".to_owned())),
        ("ephemeral-storage".to_owned(), Quantity("100Gi".to_owned())),
    ]);
    let status = NodeStatus {
        conditions: Some(vec![
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "keystone process kubelet is posting ready status",
            ),
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "not measured",
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "not measured",
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "not measured",
            ),
        ]),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".to_owned(),
                address: "127.0.0.1".to_owned(),
            },
            NodeAddress {
                type_: "Hostname".to_owned(),
                address: config.node_name.clone(),
            },
        ]),
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        node_info: Some(NodeSystemInfo {
            architecture: std::env::consts::ARCH.replace("x86_64", "amd64"),
            operating_system: "linux".to_owned(),
            container_runtime_version: "process://keystone".to_owned(),
            kubelet_version: format!("keystone-process-kubelet/{}", env!("CARGO_PKG_VERSION")),
            kernel_version: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            os_image: "host".to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let patch = serde_json::json!({ "status": status });
    nodes
        .patch_status(
            &config.node_name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

fn memory_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|kb| format!("{kb}Ki")))
        })
        .unwrap_or_else(|| "8Gi".to_owned())
}
