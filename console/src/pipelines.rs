//! The pipelines list and a pipeline's page.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use k8s_openapi::api::core::v1::Event as KubeEvent;
use keystone_crds::pipeline::PipelinePhase;
use keystone_crds::{Pipeline, Processor, Reading};
use kube::api::ListParams;
use maud::{Markup, html};
use serde::Deserialize;

use crate::auth::{Session, User, allowed, home_namespace};
use crate::layout::{Section, ago, api_problem, csrf, page};
use crate::live::{Live, rate};
use crate::{AppState, graph};

#[derive(Deserialize, Default)]
pub struct Filter {
    #[serde(default)]
    pub namespace: String,
}

fn phase_name(pipeline: &Pipeline) -> String {
    pipeline
        .status
        .as_ref()
        .and_then(|s| s.phase.as_ref())
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|| "Pending".to_owned())
}

/// Degraded, Invalid, or a condition that says something is wrong.
pub fn unhealthy(pipeline: &Pipeline) -> bool {
    let Some(status) = &pipeline.status else {
        return false;
    };
    matches!(
        status.phase,
        Some(PipelinePhase::Degraded | PipelinePhase::Invalid)
    ) || status.conditions.iter().any(|c| {
        c.type_ == "Ready" && c.status == "False" && status.phase != Some(PipelinePhase::Suspended)
    })
}

/// Pipelines of one namespace, or of all the user may list.
async fn pipelines_of(session: &Session, namespace: &str) -> Result<Vec<Pipeline>, kube::Error> {
    let api: kube::Api<Pipeline> = if namespace.is_empty() {
        kube::Api::all(session.client.clone())
    } else {
        kube::Api::namespaced(session.client.clone(), namespace)
    };
    let mut items = api.list(&ListParams::default()).await?.items;
    items.sort_by(|a, b| {
        (a.metadata.namespace.as_deref(), a.metadata.name.as_deref())
            .cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()))
    });
    Ok(items)
}

pub async fn list(
    State(state): State<AppState>,
    User(session): User,
    Query(filter): Query<Filter>,
) -> Response {
    let table = match table(&state, &session, &filter.namespace).await {
        Ok(table) => table,
        Err(kube::Error::Api(s)) if s.code == 403 && filter.namespace.is_empty() => {
            match home_namespace(&session.user) {
                Some(home) => {
                    return Redirect::to(&format!("/pipelines?namespace={home}")).into_response();
                }
                None => not_everywhere("Pipelines"),
            }
        }
        Err(e) => return api_problem(&session, "list Pipelines", &e),
    };
    let may_create = allowed(
        &session,
        "create",
        "pipelines",
        if filter.namespace.is_empty() {
            "default"
        } else {
            &filter.namespace
        },
    )
    .await;
    let body = html! {
        h1 { "Pipelines" }
        div.toolbar {
            form method="get" action="/pipelines" {
                label for="namespace" { "Namespace " }
                input #namespace type="text" name="namespace" value=(filter.namespace) placeholder="all namespaces";
                " "
                button type="submit" { "Show" }
            }
            @if may_create {
                a.button href=(format!("/pipelines/new?namespace={}", if filter.namespace.is_empty() { "default" } else { &filter.namespace })) { "New pipeline" }
            }
        }
        (table)
    };
    page("Pipelines", Section::Pipelines, Some(&session), body).into_response()
}

/// What a user who may not list every namespace sees instead of a refusal.
pub fn not_everywhere(kind: &str) -> Markup {
    html! { p.note role="note" { "You may not list " (kind) " in every namespace: name one above." } }
}

/// The table's body alone, which the list page polls for fresh numbers.
pub async fn rows(
    State(state): State<AppState>,
    User(session): User,
    Query(filter): Query<Filter>,
) -> Response {
    match table(&state, &session, &filter.namespace).await {
        Ok(table) => table.into_response(),
        Err(e) => api_problem(&session, "list Pipelines", &e),
    }
}

async fn table(
    state: &AppState,
    session: &Session,
    namespace: &str,
) -> Result<Markup, kube::Error> {
    let pipelines = pipelines_of(session, namespace).await?;
    let lives =
        futures::future::join_all(pipelines.iter().map(|p| state.rates.of(&session.client, p)))
            .await;
    let poll = format!("/pipelines/rows?namespace={}", namespace);
    Ok(html! {
        div #pipelines hx-get=(poll) hx-trigger="every 5s" hx-swap="outerHTML" {
            @if pipelines.is_empty() {
                p.muted { "No pipelines here yet." }
            } @else {
                table {
                    caption.muted { "Rates are per second over the last few seconds; lag is records not yet committed." }
                    thead { tr {
                        th scope="col" { "Pipeline" } th scope="col" { "Namespace" } th scope="col" { "Phase" }
                        th scope="col" { "Stages ready" } th scope="col" { "Lag" } th scope="col" { "In/s" }
                        th scope="col" { "Out/s" } th scope="col" { "Dead letters/min" } th scope="col" { "Last checkpoint" }
                    } }
                    tbody {
                        @for (pipeline, live) in pipelines.iter().zip(lives) {
                            @let ns = pipeline.metadata.namespace.clone().unwrap_or_default();
                            @let name = pipeline.metadata.name.clone().unwrap_or_default();
                            @let live = live.unwrap_or_default();
                            @let bad = unhealthy(pipeline);
                            tr class=[bad.then_some("unhealthy")] {
                                td {
                                    a href=(format!("/pipelines/{ns}/{name}")) { (name) }
                                    @if bad { " " span.error { "⚠ unhealthy" } }
                                }
                                td { (ns) }
                                td { span class=(format!("badge {}", phase_name(pipeline))) { (phase_name(pipeline)) } }
                                td { (pipeline.status.as_ref().and_then(|s| s.ready_stages.clone()).unwrap_or_else(|| "—".into())) }
                                td { (live.lag.map(|l| format!("{l:.0}")).unwrap_or_else(|| "—".into())) }
                                td { (rate(live.in_per_second)) }
                                td { (rate(live.out_per_second)) }
                                td { (rate(live.dead_letters_per_minute)) }
                                td { (last_checkpoint(pipeline)) }
                            }
                        }
                    }
                }
            }
        }
    })
}

fn last_checkpoint(pipeline: &Pipeline) -> String {
    pipeline
        .status
        .as_ref()
        .and_then(|s| s.last_checkpoint.as_ref())
        .map(|c| format!("{} ({})", c.id, ago(&c.time)))
        .unwrap_or_else(|| "—".to_owned())
}

/// Whether Argo CD manages the object: a change made here would be reverted
/// at its next sync.
pub fn managed_by_argo(meta: &kube::api::ObjectMeta) -> bool {
    meta.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("argocd.argoproj.io/tracking-id"))
        || meta.managed_fields.iter().flatten().any(|f| {
            f.manager
                .as_deref()
                .is_some_and(|m| m.starts_with("argocd"))
        })
}

/// The Processors of a namespace, as a reading the checker takes beside a
/// pipeline; a user who may not list them gets the pipeline checked alone.
pub async fn processors_reading(session: &Session, namespace: &str) -> (Reading, Option<String>) {
    let api: kube::Api<Processor> = kube::Api::namespaced(session.client.clone(), namespace);
    match api.list(&ListParams::default()).await {
        Ok(list) => {
            let mut reading = Reading::default();
            for mut processor in list.items {
                let name = processor.metadata.name.clone().unwrap_or_default();
                processor.metadata.managed_fields = None;
                processor.status = None;
                let text = serde_yaml_ng::to_string(&processor).unwrap_or_default();
                reading.extend(Reading::parse(&format!("Processor {name}"), &text));
            }
            (reading, None)
        }
        Err(e) => (
            Reading::default(),
            Some(format!(
                "Processors of {namespace} could not be read ({e}); references to them are not checked"
            )),
        ),
    }
}

pub async fn detail(
    State(state): State<AppState>,
    User(session): User,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let api: kube::Api<Pipeline> = kube::Api::namespaced(session.client.clone(), &namespace);
    let pipeline = match api.get(&name).await {
        Ok(p) => p,
        Err(e) => return api_problem(&session, &format!("read Pipeline {namespace}/{name}"), &e),
    };
    let may_patch = allowed(&session, "patch", "pipelines", &namespace).await;
    let argo = managed_by_argo(&pipeline.metadata);
    let (mut reading, _) = processors_reading(&session, &namespace).await;
    let mut bare = pipeline.clone();
    bare.metadata.managed_fields = None;
    bare.status = None;
    reading.extend(Reading::parse(
        "pipeline",
        &serde_yaml_ng::to_string(&bare).unwrap_or_default(),
    ));
    let plan = reading
        .manifests
        .pipelines
        .iter()
        .position(|p| p.metadata.name.as_deref() == Some(&name))
        .and_then(|index| reading.compile(index).ok());
    let events = recent_events(&session, &namespace, &name).await;
    let live = state
        .rates
        .of(&session.client, &pipeline)
        .await
        .unwrap_or_default();
    let dead_letters = match &plan {
        Some(plan) => recent_dead_letters(&state, &session, &namespace, plan).await,
        None => html! { p.muted { "Unknown until the plan compiles." } },
    };
    let status = pipeline.status.clone().unwrap_or_default();
    let base = format!("/pipelines/{namespace}/{name}");
    let suspended = pipeline.spec.state == keystone_crds::pipeline::PipelineState::Suspended;
    let body = html! {
        h1 { "Pipeline " (name) " " span class=(format!("badge {}", phase_name(&pipeline))) { (phase_name(&pipeline)) } }
        p.muted { "Namespace " (namespace) " · stages ready " (status.ready_stages.clone().unwrap_or_else(|| "—".into())) }
        @if argo {
            p.note role="note" {
                "Argo CD manages this Pipeline: a change made here would be reverted at its next sync, so the console shows it read-only. "
                "Change it in git instead; " a href=(format!("{base}/edit")) { "the editor" } " checks a change and gives the YAML to commit."
            }
        }
        @if may_patch && !argo {
            div.toolbar role="group" aria-label="Actions" {
                a.button href=(format!("{base}/edit")) { "Edit" }
                @if suspended {
                    (action_button(&session, &base, "resume", "Resume", None))
                } @else {
                    (action_button(&session, &base, "suspend", "Suspend", None))
                }
                (action_button(&session, &base, "checkpoint", "Checkpoint now", None))
                @if status.last_stable_spec.is_some() {
                    (action_button(&session, &base, "rollback", "Roll back to the last stable spec", None))
                }
            }
        }
        @for condition in status.conditions.iter().filter(|c| c.status == "False" && c.type_ != "Suspended") {
            p.error role="alert" { strong { (condition.type_) ": " } (condition.reason) " — " (condition.message) }
        }
        h2 { "Plan" }
        @match &plan {
            Some(plan) => (graph::draw(plan)),
            None => p.muted { "The plan could not be compiled here; see the conditions." },
        }
        h2 { "Live" }
        div #live hx-get=(format!("{base}/live")) hx-trigger="every 5s" hx-swap="innerHTML" { (live_table(&live)) }
        h2 { "Conditions" }
        table {
            thead { tr { th scope="col" { "Type" } th scope="col" { "Status" } th scope="col" { "Reason" } th scope="col" { "Message" } th scope="col" { "Since" } } }
            tbody {
                @for c in &status.conditions {
                    tr { td { (c.type_) } td { (c.status) } td { (c.reason) } td { (c.message) } td { (ago(&c.last_transition_time)) } }
                }
            }
        }
        h2 { "Checkpoints" }
        @if let Some(failed) = &status.last_failed_checkpoint {
            p.error role="status" {
                "Checkpoint " code { (failed.id) } " failed " (ago(&failed.time))
                @if let Some(reason) = &failed.reason { ": " (reason) }
            }
        }
        @if let Some(running) = &status.checkpoint_in_progress {
            p.muted role="status" { "A checkpoint is being taken (" (running.trigger) ", started " (ago(&running.started)) ")." }
        }
        @if status.checkpoints.is_empty() { p.muted { "None retained yet." } }
        @else {
            table {
                thead { tr { th scope="col" { "Checkpoint" } th scope="col" { "Taken" } th scope="col" { "Reason" } th scope="col" { "Restore" } } }
                tbody {
                    @for c in status.checkpoints.iter().rev() {
                        tr {
                            td { code { (c.id) } }
                            td { (ago(&c.time)) }
                            td { (c.reason.clone().unwrap_or_default()) }
                            td {
                                @if may_patch && !argo {
                                    (action_button(&session, &base, "restore", &format!("Restore {}", c.id), Some(&c.id)))
                                }
                            }
                        }
                    }
                }
            }
        }
        h2 { "Recent dead letters" }
        (dead_letters)
        h2 { "Events" }
        @if events.is_empty() { p.muted { "No recent events." } }
        @else {
            table {
                thead { tr { th scope="col" { "Type" } th scope="col" { "Reason" } th scope="col" { "Message" } th scope="col" { "Count" } } }
                tbody { @for e in &events { tr { td { (e.type_.clone().unwrap_or_default()) } td { (e.reason.clone().unwrap_or_default()) } td { (e.message.clone().unwrap_or_default()) } td { (e.count.unwrap_or(1)) } } } }
            }
        }
    };
    page(
        &format!("Pipeline {name}"),
        Section::Pipelines,
        Some(&session),
        body,
    )
    .into_response()
}

/// The last dead letters, for a user allowed to read them.
async fn recent_dead_letters(
    state: &AppState,
    session: &Session,
    namespace: &str,
    plan: &keystone_crds::Plan,
) -> Markup {
    if !allowed(session, "get", "pipelines/deadletters", namespace).await {
        return html! {
            p.muted {
                "Dead letters hold the events themselves: reading them needs "
                code { "get" } " on " code { "pipelines/deadletters" } " in " (namespace) " (the chart's edit role gives it)."
            }
        };
    }
    match state
        .dead_letters
        .recent(plan.source.cluster.as_deref(), &plan.dead_letter_topic, 20)
        .await
    {
        Ok(letters) if letters.is_empty() => {
            html! { p.muted { "None in " code { (plan.dead_letter_topic) } "." } }
        }
        Ok(letters) => html! {
            table #dead-letters {
                caption.muted { "The newest of " code { (plan.dead_letter_topic) } " first" }
                thead { tr { th scope="col" { "Step" } th scope="col" { "Reason" } th scope="col" { "Read from" } th scope="col" { "Event" } } }
                tbody {
                    @for l in &letters {
                        tr { td { (l.step) } td { (l.reason) } td { code { (l.read_from) } } td { code { (l.original) } } }
                    }
                }
            }
        },
        Err(reason) => html! { p.muted role="status" { "Dead letters cannot be read: " (reason) } },
    }
}

fn action_button(
    session: &Session,
    base: &str,
    action: &str,
    label: &str,
    checkpoint: Option<&str>,
) -> Markup {
    html! {
        form method="post" action=(format!("{base}/actions/{action}")) {
            (csrf(session))
            @if let Some(id) = checkpoint { input type="hidden" name="checkpoint" value=(id); }
            button type="submit" { (label) }
        }
    }
}

async fn recent_events(session: &Session, namespace: &str, name: &str) -> Vec<KubeEvent> {
    let api: kube::Api<KubeEvent> = kube::Api::namespaced(session.client.clone(), namespace);
    let params = ListParams::default().fields(&format!(
        "involvedObject.kind=Pipeline,involvedObject.name={name}"
    ));
    let mut events = api.list(&params).await.map(|l| l.items).unwrap_or_default();
    events.sort_by(|a, b| {
        b.last_timestamp
            .as_ref()
            .map(|t| t.0)
            .cmp(&a.last_timestamp.as_ref().map(|t| t.0))
    });
    events.truncate(20);
    events
}

pub async fn live(
    State(state): State<AppState>,
    User(session): User,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let api: kube::Api<Pipeline> = kube::Api::namespaced(session.client.clone(), &namespace);
    match api.get(&name).await {
        Ok(pipeline) => match state.rates.of(&session.client, &pipeline).await {
            Ok(live) => live_table(&live).into_response(),
            Err(e) => (
                StatusCode::BAD_GATEWAY,
                format!("cannot list the pods: {e}"),
            )
                .into_response(),
        },
        Err(e) => api_problem(&session, "read the Pipeline", &e),
    }
}

fn live_table(live: &Live) -> Markup {
    html! {
        p.muted {
            "Lag " (live.lag.map(|l| format!("{l:.0}")).unwrap_or_else(|| "—".into()))
            " · in " (rate(live.in_per_second)) "/s · out " (rate(live.out_per_second))
            "/s · dead letters " (rate(live.dead_letters_per_minute)) "/min · "
            (live.scraped) " pods scraped"
            @if live.unreachable > 0 { ", " (live.unreachable) " unreachable" }
        }
        @if !live.steps.is_empty() {
            table {
                thead { tr { th scope="col" { "Stage" } th scope="col" { "Step" } th scope="col" { "In/s" } th scope="col" { "Out/s" } th scope="col" { "Dropped/s" } th scope="col" { "Dead letters/s" } } }
                tbody {
                    @for (stage, step, r) in &live.steps {
                        tr {
                            td { (stage) } td { (step) }
                            td { (rate(r.map(|r| r.events_in))) } td { (rate(r.map(|r| r.events_out))) }
                            td { (rate(r.map(|r| r.dropped))) } td { (rate(r.map(|r| r.dead_lettered))) }
                        }
                    }
                }
            }
        }
    }
}
