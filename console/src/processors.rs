//! Processors: the list, and one with the Pipelines that use it.

use axum::extract::{Path, Query};
use axum::response::{IntoResponse, Redirect, Response};
use keystone_crds::{Pipeline, Processor};
use kube::api::ListParams;
use maud::html;

use crate::auth::{User, allowed, home_namespace};
use crate::layout::{Section, api_problem, page};
use crate::pipelines::{Filter, managed_by_argo, not_everywhere};

/// The names of the Processors a pipeline's steps refer to.
pub fn references(pipeline: &Pipeline) -> Vec<String> {
    pipeline
        .spec
        .steps
        .iter()
        .filter_map(|step| step.processor_ref.as_ref().map(|r| r.name.clone()))
        .collect()
}

pub async fn list(User(session): User, Query(filter): Query<Filter>) -> Response {
    let api: kube::Api<Processor> = if filter.namespace.is_empty() {
        kube::Api::all(session.client.clone())
    } else {
        kube::Api::namespaced(session.client.clone(), &filter.namespace)
    };
    let (processors, refusal) = match api.list(&ListParams::default()).await {
        Ok(list) => (list.items, None),
        Err(kube::Error::Api(s)) if s.code == 403 && filter.namespace.is_empty() => {
            match home_namespace(&session.user) {
                Some(home) => {
                    return Redirect::to(&format!("/processors?namespace={home}")).into_response();
                }
                None => (Vec::new(), Some(not_everywhere("Processors"))),
            }
        }
        Err(e) => return api_problem(&session, "list Processors", &e),
    };
    let namespace_for_new = if filter.namespace.is_empty() {
        "default"
    } else {
        &filter.namespace
    };
    let may_create = allowed(&session, "create", "processors", namespace_for_new).await;
    let body = html! {
        h1 { "Processors" }
        div.toolbar {
            form method="get" action="/processors" {
                label for="namespace" { "Namespace " }
                input #namespace type="text" name="namespace" value=(filter.namespace) placeholder="all namespaces";
                " " button type="submit" { "Show" }
            }
            @if may_create { a.button href=(format!("/processors/new?namespace={namespace_for_new}")) { "New processor" } }
        }
        @if let Some(refusal) = refusal { (refusal) }
        @else if processors.is_empty() { p.muted { "No processors here yet." } }
        @else {
            table {
                thead { tr { th scope="col" { "Processor" } th scope="col" { "Namespace" } th scope="col" { "Operator" } th scope="col" { "Description" } } }
                tbody {
                    @for p in &processors {
                        @let ns = p.metadata.namespace.clone().unwrap_or_default();
                        @let name = p.metadata.name.clone().unwrap_or_default();
                        tr {
                            td { a href=(format!("/processors/{ns}/{name}")) { (name) } }
                            td { (ns) }
                            td { (p.spec.operator.single().map(|o| o.kind()).unwrap_or("—")) }
                            td { (p.spec.description.clone().unwrap_or_default()) }
                        }
                    }
                }
            }
        }
    };
    page("Processors", Section::Processors, Some(&session), body).into_response()
}

pub async fn detail(
    User(session): User,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let api: kube::Api<Processor> = kube::Api::namespaced(session.client.clone(), &namespace);
    let processor = match api.get(&name).await {
        Ok(p) => p,
        Err(e) => return api_problem(&session, &format!("read Processor {namespace}/{name}"), &e),
    };
    let pipelines: kube::Api<Pipeline> = kube::Api::namespaced(session.client.clone(), &namespace);
    let users = pipelines.list(&ListParams::default()).await.map(|l| {
        l.items
            .into_iter()
            .filter(|p| references(p).contains(&name))
            .filter_map(|p| p.metadata.name)
            .collect::<Vec<_>>()
    });
    let may_patch = allowed(&session, "patch", "processors", &namespace).await;
    let argo = managed_by_argo(&processor.metadata);
    let mut shown = processor.clone();
    shown.metadata.managed_fields = None;
    let yaml = serde_yaml_ng::to_string(&shown).unwrap_or_default();
    let body = html! {
        h1 { "Processor " (name) }
        p.muted { "Namespace " (namespace) }
        @if argo { p.note role="note" { "Argo CD manages this Processor: change it in git." } }
        @if may_patch {
            div.toolbar { a.button href=(format!("/processors/{namespace}/{name}/edit")) { @if argo { "Check a change" } @else { "Edit" } } }
        }
        h2 { "Used by" }
        @match &users {
            Ok(users) if users.is_empty() => p.muted { "No pipeline in " (namespace) " uses it." },
            Ok(users) => ul { @for u in users { li { a href=(format!("/pipelines/{namespace}/{u}")) { (u) } } } },
            Err(e) => p.muted { "The pipelines of " (namespace) " could not be listed: " (e.to_string()) },
        }
        h2 { "Manifest" }
        pre { (yaml) }
    };
    page(
        &format!("Processor {name}"),
        Section::Processors,
        Some(&session),
        body,
    )
    .into_response()
}
