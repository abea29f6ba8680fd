//! A pipeline's NetworkPolicy: its pods' port is reachable from the operator
//! (checkpoints, `/metrics` for the health gate) and the configured metrics
//! scrapers only. The kubelet's probes are not subject to NetworkPolicies.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{HTTP_PORT, INGEST_COMPONENT, LABEL_PIPELINE, meta, pipeline_labels, selector_labels};
use crate::config::NetworkPolicyConfig;

/// The NetworkPolicy's name: one per pipeline, for all its stages.
pub fn network_policy_name(pipeline: &str) -> String {
    format!("{pipeline}-runtime")
}

pub fn network_policy(
    pipeline: &str,
    namespace: &str,
    operator_namespace: &str,
    config: &NetworkPolicyConfig,
    owner: &OwnerReference,
) -> NetworkPolicy {
    let operator = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                operator_namespace.to_owned(),
            )])),
            ..LabelSelector::default()
        }),
        pod_selector: Some(LabelSelector {
            match_labels: Some(config.operator_pod_labels.clone()),
            ..LabelSelector::default()
        }),
        ..NetworkPolicyPeer::default()
    };
    NetworkPolicy {
        metadata: meta(
            network_policy_name(pipeline),
            namespace,
            pipeline_labels(pipeline),
            owner,
        ),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    LABEL_PIPELINE.to_owned(),
                    pipeline.to_owned(),
                )])),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(
                    std::iter::once(operator)
                        .chain(config.metrics_from.iter().cloned())
                        .collect(),
                ),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(HTTP_PORT)),
                    protocol: Some("TCP".to_owned()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

pub fn ingest_network_policy_name(pipeline: &str) -> String {
    format!("{pipeline}-ingest")
}

/// Lets clients reach the HTTP ingest endpoint (`spec.source.http`): its pods'
/// events port (`port`: the TLS one when the endpoint has TLS) is open to
/// every peer, on top of the pipeline's policy, which admits only the
/// operator and the scrapers. The endpoint authenticates each request itself.
pub fn ingest_network_policy(
    pipeline: &str,
    namespace: &str,
    port: i32,
    owner: &OwnerReference,
) -> NetworkPolicy {
    NetworkPolicy {
        metadata: meta(
            ingest_network_policy_name(pipeline),
            namespace,
            pipeline_labels(pipeline),
            owner,
        ),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(pipeline, INGEST_COMPONENT)),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: None,
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(port)),
                    protocol: Some("TCP".to_owned()),
                    ..NetworkPolicyPort::default()
                }]),
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_operator_and_the_scrapers_reach_the_pods_port() {
        let config = NetworkPolicyConfig {
            enabled: true,
            operator_pod_labels: BTreeMap::from([(
                "app.kubernetes.io/name".into(),
                "keystone".into(),
            )]),
            metrics_from: vec![NetworkPolicyPeer {
                namespace_selector: Some(LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        "kubernetes.io/metadata.name".into(),
                        "monitoring".into(),
                    )])),
                    ..LabelSelector::default()
                }),
                ..NetworkPolicyPeer::default()
            }],
        };
        let owner = OwnerReference {
            name: "orders".into(),
            ..OwnerReference::default()
        };
        let policy = network_policy("orders", "team-a", "keystone-system", &config, &owner);
        let json = serde_json::to_value(&policy).expect("json");
        assert_eq!(json["metadata"]["name"], "orders-runtime");
        assert_eq!(
            json["spec"]["podSelector"]["matchLabels"]["keystone.dev/pipeline"],
            "orders"
        );
        assert_eq!(json["spec"]["policyTypes"], serde_json::json!(["Ingress"]));
        let rule = &json["spec"]["ingress"][0];
        assert_eq!(
            rule["ports"],
            serde_json::json!([{"port": 8080, "protocol": "TCP"}])
        );
        let from = rule["from"].as_array().expect("from");
        assert_eq!(from.len(), 2);
        assert_eq!(
            from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "keystone-system"
        );
        assert_eq!(
            from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
            "keystone"
        );
        assert_eq!(
            from[1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
            "monitoring"
        );
    }
}
