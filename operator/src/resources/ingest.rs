//! What exposes an HTTP ingest endpoint (`spec.source.http`): its Service,
//! which adds the TLS port when the endpoint has TLS, and the optional
//! Ingress the chart's values ask for.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keystone_crds::Plan;
use keystone_crds::pipeline::http::HttpSourceSpec;

use super::{
    HTTP_PORT, HTTPS_PORT, INGEST_COMPONENT, component_service, meta, stage_labels,
    stage_object_name,
};
use crate::config::IngestIngressConfig;

/// The endpoint's Service: the plain port (probes, metrics, and events
/// without TLS) and, with TLS, the port events take.
pub fn ingest_service(plan: &Plan, http: &HttpSourceSpec, owner: &OwnerReference) -> Service {
    let mut service = component_service(plan, INGEST_COMPONENT, owner);
    if http.tls.is_some()
        && let Some(ports) = service.spec.as_mut().and_then(|s| s.ports.as_mut())
    {
        ports.push(ServicePort {
            name: Some("https".to_owned()),
            port: HTTPS_PORT,
            target_port: Some(IntOrString::String("https".to_owned())),
            protocol: Some("TCP".to_owned()),
            ..ServicePort::default()
        });
    }
    service
}

/// The port events are taken on: the TLS one when the endpoint has TLS.
pub fn ingest_port(http: &HttpSourceSpec) -> (i32, &'static str) {
    if http.tls.is_some() {
        (HTTPS_PORT, "https")
    } else {
        (HTTP_PORT, "http")
    }
}

/// The URL clients inside the cluster send events to.
pub fn ingest_service_url(plan: &Plan, http: &HttpSourceSpec) -> String {
    let service = stage_object_name(&plan.pipeline, INGEST_COMPONENT);
    let (port, scheme) = ingest_port(http);
    format!(
        "{scheme}://{service}.{}.svc:{port}{}",
        plan.namespace, http.path
    )
}

pub fn ingest_ingress_name(pipeline: &str) -> String {
    stage_object_name(pipeline, INGEST_COMPONENT)
}

/// The host an Ingress serves the endpoint on.
pub fn ingest_host(config: &IngestIngressConfig, plan: &Plan) -> String {
    config
        .host
        .replace("{pipeline}", &plan.pipeline)
        .replace("{namespace}", &plan.namespace)
}

/// The URL clients outside the cluster send events to, through the Ingress.
pub fn ingest_ingress_url(
    config: &IngestIngressConfig,
    plan: &Plan,
    http: &HttpSourceSpec,
) -> String {
    let scheme = if config.tls_secret.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}{}", ingest_host(config, plan), http.path)
}

/// An Ingress routing the endpoint's path on its host to the Service's
/// events port (only that path: probes and metrics stay inside).
pub fn ingest_ingress(
    config: &IngestIngressConfig,
    plan: &Plan,
    http: &HttpSourceSpec,
    owner: &OwnerReference,
) -> Ingress {
    let host = ingest_host(config, plan);
    let mut metadata = meta(
        ingest_ingress_name(&plan.pipeline),
        &plan.namespace,
        stage_labels(&plan.pipeline, INGEST_COMPONENT),
        owner,
    );
    if !config.annotations.is_empty() {
        metadata.annotations = Some(
            config
                .annotations
                .clone()
                .into_iter()
                .collect::<BTreeMap<_, _>>(),
        );
    }
    let (_, port_name) = ingest_port(http);
    Ingress {
        metadata,
        spec: Some(IngressSpec {
            ingress_class_name: config.class_name.clone(),
            tls: config.tls_secret.as_ref().map(|secret| {
                vec![IngressTLS {
                    hosts: Some(vec![host.clone()]),
                    secret_name: Some(secret.clone()),
                }]
            }),
            rules: Some(vec![IngressRule {
                host: Some(host),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some(http.path.clone()),
                        path_type: "Exact".to_owned(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name: stage_object_name(&plan.pipeline, INGEST_COMPONENT),
                                port: Some(ServiceBackendPort {
                                    name: Some(port_name.to_owned()),
                                    number: None,
                                }),
                            }),
                            resource: None,
                        },
                    }],
                }),
            }]),
            ..IngressSpec::default()
        }),
        ..Ingress::default()
    }
}
