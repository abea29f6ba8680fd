//! Create and edit: the form and the YAML of one Pipeline or Processor side by
//! side, kept in sync through the server; every change checked by the contract
//! checker, its problems shown at the field and the YAML line they name; "Try
//! it" on sample events; then a server-side apply as the user.
//!
//! Which half changed is told by the YAML's digest: the page carries the
//! digest of the YAML it showed, so a posted YAML that differs was edited, and
//! otherwise the form was.

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use keystone_crds::{Diagnostic, Pipeline, Processor, Reading};
use kube::api::{Patch, PatchParams};
use maud::{Markup, html};
use serde_json::{Value, json};

use crate::auth::{Session, User, allowed};
use crate::form::{self, Fields, Kind, Problems};
use crate::layout::{Section, api_problem, csrf, page};
use crate::pipelines::{Filter, managed_by_argo, processors_reading};
use crate::tryit::{self, TryOutcome};
use crate::{AppState, FIELD_MANAGER};
use keystone_operator::OperatorConfig;

const API_VERSION: &str = "keystone.dev/v1alpha1";
/// The name the checker's diagnostics give the editor's text.
const EDITED: &str = "manifest.yaml";

/// What the editor holds between two requests.
struct Draft {
    kind: Kind,
    /// Editing an existing object (its name and namespace fixed).
    existing: bool,
    manifest: Value,
    yaml: String,
    events: String,
    tables: Vec<(String, String)>,
}

fn digest(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn blank_manifest(kind: Kind, namespace: &str) -> Value {
    match kind {
        Kind::Pipeline => json!({
            "apiVersion": API_VERSION, "kind": "Pipeline",
            "metadata": {"name": "my-pipeline", "namespace": namespace},
            "spec": {
                "source": {"topic": "", "schema": {"fields": [{"name": "id", "type": "string"}]}},
                "steps": [],
                "sinks": [{"name": "out", "kafka": {"topic": ""}}]
            }
        }),
        Kind::Processor => json!({
            "apiVersion": API_VERSION, "kind": "Processor",
            "metadata": {"name": "my-processor", "namespace": namespace},
            "spec": {"filter": {"expression": "true"}}
        }),
    }
}

/// An object as the user would write it: no status, no server-set metadata.
fn as_written<T: serde::Serialize>(object: &T) -> Value {
    let mut value = serde_json::to_value(object).unwrap_or(Value::Null);
    if let Some(map) = value.as_object_mut() {
        map.remove("status");
    }
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        for server_set in [
            "managedFields",
            "resourceVersion",
            "uid",
            "generation",
            "creationTimestamp",
            "finalizers",
        ] {
            meta.remove(server_set);
        }
        if let Some(annotations) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
            if annotations.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    value
}

/// The editor on a blank Pipeline or Processor.
pub async fn new_object(
    kind: Kind,
    State(state): State<AppState>,
    User(session): User,
    Query(filter): Query<Filter>,
    headers: HeaderMap,
) -> Response {
    let namespace = if filter.namespace.is_empty() {
        "default".to_owned()
    } else {
        filter.namespace
    };
    let manifest = blank_manifest(kind, &namespace);
    start(&state.operator, &session, &headers, kind, false, manifest).await
}

/// The editor on an existing Pipeline or Processor, as its author wrote it.
pub async fn edit_object<K>(
    kind: Kind,
    State(state): State<AppState>,
    User(session): User,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize,
{
    let api: kube::Api<K> = kube::Api::namespaced(session.client.clone(), &namespace);
    match api.get(&name).await {
        Ok(object) => {
            start(
                &state.operator,
                &session,
                &headers,
                kind,
                true,
                as_written(&object),
            )
            .await
        }
        Err(e) => api_problem(
            &session,
            &format!("read {} {namespace}/{name}", kind.name()),
            &e,
        ),
    }
}

async fn start(
    operator: &OperatorConfig,
    session: &Session,
    headers: &HeaderMap,
    kind: Kind,
    existing: bool,
    manifest: Value,
) -> Response {
    let yaml = form::to_yaml(&manifest, kind);
    let draft = Draft {
        kind,
        existing,
        manifest,
        yaml,
        events: String::new(),
        tables: Vec::new(),
    };
    respond(operator, session, headers, draft, Step::Check).await
}

/// What a post asks for besides keeping the two halves in sync.
enum Step {
    Check,
    Try,
    Apply { force: bool },
}

pub async fn submit(
    State(state): State<AppState>,
    User(session): User,
    headers: HeaderMap,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let fields: Fields = pairs.into_iter().collect();
    let Some(kind) = fields.get("kind").and_then(|k| Kind::parse(k)) else {
        return (StatusCode::BAD_REQUEST, "the editor's form has no kind").into_response();
    };
    let existing = fields.get("existing").is_some_and(|v| v == "true");
    let posted_yaml = fields.get("yaml").cloned().unwrap_or_default();
    let yaml_edited = fields
        .get("yaml_digest")
        .is_none_or(|d| *d != digest(&posted_yaml));
    let op = fields.get("op").map(String::as_str).unwrap_or("check");
    let mut draft = Draft {
        kind,
        existing,
        manifest: Value::Null,
        yaml: posted_yaml.clone(),
        events: fields.get("events").cloned().unwrap_or_default(),
        tables: fields
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("table:")?.to_owned(), v.clone())))
            .collect(),
    };
    draft.tables.sort();
    let previous: Option<Value> = serde_yaml_ng::from_str(&posted_yaml).ok();
    if yaml_edited {
        // The YAML is kept as typed; the form follows it when it parses.
        draft.manifest = previous.unwrap_or_else(|| manifest_from_form(kind, &fields, None));
    } else {
        draft.manifest = manifest_from_form(kind, &fields, previous.as_ref());
        if let Some(spec) = draft.manifest.get_mut("spec") {
            form::apply_op(form::spec_schema(kind), spec, "spec", op, &fields);
        }
        draft.yaml = form::to_yaml(&draft.manifest, kind);
    }
    let step = match op {
        "try" => Step::Try,
        "apply" => Step::Apply { force: false },
        "apply-force" => Step::Apply { force: true },
        _ => Step::Check,
    };
    respond(&state.operator, &session, &headers, draft, step).await
}

/// The manifest the form describes; metadata other than the name and
/// namespace comes from the YAML it was shown with.
fn manifest_from_form(kind: Kind, fields: &Fields, previous: Option<&Value>) -> Value {
    let mut metadata = previous
        .and_then(|p| p.get("metadata").cloned())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    for key in ["name", "namespace"] {
        if let Some(value) = fields.get(&format!("metadata.{key}")) {
            metadata[key] = Value::String(value.trim().to_owned());
        }
    }
    json!({
        "apiVersion": API_VERSION,
        "kind": kind.name(),
        "metadata": metadata,
        "spec": form::read(form::spec_schema(kind), fields, "spec"),
    })
}

fn meta_str<'a>(manifest: &'a Value, key: &str) -> &'a str {
    manifest["metadata"][key].as_str().unwrap_or_default()
}

async fn respond(
    operator: &OperatorConfig,
    session: &Session,
    headers: &HeaderMap,
    draft: Draft,
    step: Step,
) -> Response {
    let namespace = meta_str(&draft.manifest, "namespace").to_owned();
    let namespace = if namespace.is_empty() {
        "default".to_owned()
    } else {
        namespace
    };
    let name = meta_str(&draft.manifest, "name").to_owned();
    let (mut reading, processors_note) = match draft.kind {
        Kind::Pipeline => processors_reading(session, &namespace).await,
        Kind::Processor => (Reading::default(), None),
    };
    // The edited Processor replaces the cluster's copy in the check.
    reading.extend(Reading::parse(EDITED, &draft.yaml));
    let (reading, checked) = check_reading(operator, reading).await;
    let mut diagnostics: Vec<Diagnostic> = checked
        .diagnostics
        .into_iter()
        .filter(|d| d.file == EDITED)
        .collect();
    let mut plan = match draft.kind {
        Kind::Pipeline if diagnostics.is_empty() => {
            checked.plans.into_iter().find(|p| p.pipeline == name)
        }
        _ => None,
    };
    // The operator refuses what its policy does not allow as it refuses a
    // broken contract (ContractsValid=False, PolicyViolation): say so here.
    if let Some(compiled) = &plan {
        let violations = policy_diagnostics(operator, &reading, &name, compiled);
        if !violations.is_empty() {
            diagnostics = violations;
            plan = None;
        }
    }

    let resource = match draft.kind {
        Kind::Pipeline => "pipelines",
        Kind::Processor => "processors",
    };
    let argo = draft.existing && argo_managed(session, draft.kind, &namespace, &name).await;
    let may_write = allowed(
        session,
        if draft.existing { "patch" } else { "create" },
        resource,
        &namespace,
    )
    .await;

    let mut try_outcome = None;
    let mut notice = None;
    match step {
        Step::Check => {}
        Step::Try => {
            try_outcome = Some(match &plan {
                Some(plan) => {
                    tryit::run(plan.clone(), draft.events.clone(), draft.tables.clone()).await
                }
                None => Err(
                    "Fix the problems above first: only a pipeline that passes the check can run."
                        .to_owned(),
                ),
            });
        }
        Step::Apply { force } => {
            if !diagnostics.is_empty() {
                notice = Some(Err("Not applied: fix the problems above first.".to_owned()));
            } else if argo {
                notice = Some(Err(
                    "Not applied: Argo CD manages this object; commit the YAML to git instead."
                        .to_owned(),
                ));
            } else {
                match apply(
                    session,
                    draft.kind,
                    &namespace,
                    &name,
                    &draft.manifest,
                    force,
                )
                .await
                {
                    Ok(()) => {
                        let target = match draft.kind {
                            Kind::Pipeline => format!("/pipelines/{namespace}/{name}"),
                            Kind::Processor => format!("/processors/{namespace}/{name}"),
                        };
                        return redirect(headers, &target);
                    }
                    Err(message) => notice = Some(Err(message)),
                }
            }
        }
    }

    let view = EditorView {
        draft: &draft,
        session,
        diagnostics: &diagnostics,
        processors_note: processors_note.as_deref(),
        tables: plan.as_ref().map(tryit::tables_of).unwrap_or_default(),
        argo,
        may_write,
        try_outcome: try_outcome.as_ref(),
        notice: notice.as_ref(),
    };
    let markup = editor(&view);
    if headers.contains_key("hx-request") {
        markup.into_response()
    } else {
        let title = if draft.existing {
            format!("Edit {} {name}", draft.kind.name())
        } else {
            format!("New {}", draft.kind.name())
        };
        let section = match draft.kind {
            Kind::Pipeline => Section::Pipelines,
            Kind::Processor => Section::Processors,
        };
        page(
            &title,
            section,
            Some(session),
            html! { h1 { (title) } (markup) },
        )
        .into_response()
    }
}

/// The operator's policy violations of a pipeline that passed the check,
/// located in the edited text.
fn policy_diagnostics(
    operator: &OperatorConfig,
    reading: &Reading,
    name: &str,
    plan: &keystone_crds::Plan,
) -> Vec<Diagnostic> {
    let (Some(pipeline), Some(origin)) = (
        reading
            .manifests
            .pipelines
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name)),
        reading.pipeline_origin(name),
    ) else {
        return Vec::new();
    };
    operator
        .policy
        .violations(&pipeline.spec, plan, operator.runtime_image())
        .into_iter()
        .map(|violation| {
            let at = origin.locate(&violation.path);
            Diagnostic {
                file: EDITED.to_owned(),
                line: at.line,
                column: at.column,
                path: Some(violation.path),
                step: None,
                kind: "PolicyViolation".to_owned(),
                message: format!("the operator's policy: {}", violation.message),
                hint: None,
            }
        })
        .collect()
}

/// A redirect that htmx follows as a full navigation.
fn redirect(headers: &HeaderMap, target: &str) -> Response {
    if headers.contains_key("hx-request") {
        let mut response = StatusCode::OK.into_response();
        if let Ok(value) = HeaderValue::from_str(target) {
            response.headers_mut().insert("hx-redirect", value);
        }
        response
    } else {
        Redirect::to(target).into_response()
    }
}

/// The check of `reading`, as the operator makes it: an Avro source is
/// checked against the schema its registry holds (the manifest's registry,
/// else its cluster's in the operator's configuration; credentials from the
/// console's `KEYSTONE_REGISTRY_*` environment), and one whose schema cannot
/// be had is a diagnostic saying why, not checked against declared fields.
async fn check_reading(
    operator: &OperatorConfig,
    reading: Reading,
) -> (Reading, keystone_crds::Checked) {
    let avro = reading
        .manifests
        .pipelines
        .iter()
        .find(|p| p.spec.source.format == keystone_crds::pipeline::Format::Avro);
    let Some(pipeline) = avro else {
        let checked = keystone_crds::manifest::check(&reading);
        return (reading, checked);
    };
    let args = keystone_runtime::cli::SchemaArgs {
        // The operator's choice of registry, by URL (the manifest's own
        // is the default of `check`).
        registry: keystone_operator::registry::registry_spec(operator, pipeline).map(|r| r.url),
        ..Default::default()
    };
    // The registry client blocks (it has a runtime of its own).
    let checked = tokio::task::spawn_blocking(move || {
        let checked = match keystone_runtime::cli::avro::Sources::resolve(&reading, &args, None) {
            Ok(sources) => keystone_crds::manifest::check_with(&reading, |i| sources.facts(i)),
            // Only `--schema-file` flags can be wrong, and none are given.
            Err(_) => keystone_crds::manifest::check(&reading),
        };
        (reading, checked)
    })
    .await;
    checked.unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
}

async fn argo_managed(session: &Session, kind: Kind, namespace: &str, name: &str) -> bool {
    let meta = match kind {
        Kind::Pipeline => kube::Api::<Pipeline>::namespaced(session.client.clone(), namespace)
            .get_metadata_opt(name)
            .await
            .map(|m| m.map(|m| m.metadata)),
        Kind::Processor => kube::Api::<Processor>::namespaced(session.client.clone(), namespace)
            .get_metadata_opt(name)
            .await
            .map(|m| m.map(|m| m.metadata)),
    };
    meta.ok().flatten().is_some_and(|m| managed_by_argo(&m))
}

async fn apply(
    session: &Session,
    kind: Kind,
    namespace: &str,
    name: &str,
    manifest: &Value,
    force: bool,
) -> Result<(), String> {
    let mut params = PatchParams::apply(FIELD_MANAGER);
    params.force = force;
    let result = match kind {
        Kind::Pipeline => kube::Api::<Pipeline>::namespaced(session.client.clone(), namespace)
            .patch(name, &params, &Patch::Apply(manifest))
            .await
            .map(|_| ()),
        Kind::Processor => kube::Api::<Processor>::namespaced(session.client.clone(), namespace)
            .patch(name, &params, &Patch::Apply(manifest))
            .await
            .map(|_| ()),
    };
    result.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 409 => format!(
            "Another field manager owns fields this change sets ({}). Apply again taking them over if that is intended.",
            s.message
        ),
        kube::Error::Api(s) if s.code == 403 => format!("Kubernetes does not allow {} to do this: {}", session.user, s.message),
        kube::Error::Api(s) => format!("The API server refused the change: {}", s.message),
        other => format!("The API server did not answer: {other}"),
    })
}

struct EditorView<'a> {
    draft: &'a Draft,
    session: &'a Session,
    diagnostics: &'a [Diagnostic],
    processors_note: Option<&'a str>,
    tables: Vec<String>,
    argo: bool,
    may_write: bool,
    try_outcome: Option<&'a Result<TryOutcome, String>>,
    notice: Option<&'a Result<(), String>>,
}

fn editor(view: &EditorView) -> Markup {
    let draft = view.draft;
    let mut problems = Problems::default();
    for d in view.diagnostics {
        let text = match &d.hint {
            Some(hint) => format!("{} ({hint})", d.message),
            None => d.message.clone(),
        };
        problems.add(d.path.as_deref().unwrap_or("spec"), text);
    }
    let spec = draft.manifest.get("spec").cloned().unwrap_or(json!({}));
    let name = meta_str(&draft.manifest, "name");
    let namespace = meta_str(&draft.manifest, "namespace");
    let conflict = matches!(view.notice, Some(Err(m)) if m.starts_with("Another field manager"));
    html! {
        form #editor method="post" action="/editor" hx-post="/editor" hx-target="this" hx-swap="outerHTML" {
            (csrf(view.session))
            input type="hidden" name="kind" value=(draft.kind.name());
            input type="hidden" name="existing" value=(draft.existing);
            input type="hidden" name="yaml_digest" value=(digest(&draft.yaml));
            @if view.argo {
                p.note role="note" {
                    "Argo CD manages this " (draft.kind.name()) ": an edit here would be reverted at its next sync. "
                    "Check your change here, then commit the YAML on the right to git."
                }
            } @else if !view.may_write {
                p.note role="note" { "You may not change " (draft.kind.name()) "s in " (namespace) ": this editor checks and tries only." }
            }
            @if let Some(note) = view.processors_note { p.muted { (note) } }
            (summary(view.diagnostics))
            @if let Some(Err(message)) = view.notice { p.error role="alert" #notice { (message) } }
            div.editor {
                // A change re-renders the form, except the choice in an "Add a
                // field" select, which only its Add button posts: re-rendering
                // would reset it to its first option (with the keyboard, every
                // arrow key is a change, so no other option could be reached).
                section.pane #form-pane aria-label="Form" hx-post="/editor" hx-trigger="change[!target.name.endsWith('#add')]" hx-target="#editor" hx-swap="outerHTML" {
                    h2 { "Form" }
                    div.field {
                        label for="f-metadata_name" { "Name" }
                        input #f-metadata_name type="text" name="metadata.name" value=(name) readonly[draft.existing] required;
                        (problem_at(&problems, "metadata.name"))
                    }
                    div.field {
                        label for="f-metadata_namespace" { "Namespace" }
                        input #f-metadata_namespace type="text" name="metadata.namespace" value=(namespace) readonly[draft.existing] required;
                    }
                    // The target of the summary's links to problems of the whole spec.
                    div id=(form::field_id("spec")) { (form::render(form::spec_schema(draft.kind), &spec, &problems, "spec")) }
                }
                section.pane aria-label="YAML" {
                    h2 { label for="yaml" { "YAML" } }
                    textarea #yaml name="yaml" rows="32" spellcheck="false"
                        hx-post="/editor" hx-trigger="change" hx-target="#editor" hx-swap="outerHTML" { (draft.yaml) }
                    div.toolbar {
                        button type="submit" name="op" value="check" { "Check" }
                        @if view.may_write && !view.argo {
                            button.primary type="submit" name="op" value="apply" { @if draft.existing { "Apply changes" } @else { "Create" } }
                            @if conflict { button type="submit" name="op" value="apply-force" { "Apply, taking over those fields" } }
                        }
                    }
                }
            }
            @if draft.kind == Kind::Pipeline { (try_section(view)) }
        }
    }
}

fn problem_at(problems: &Problems, path: &str) -> Markup {
    html! { @for m in problems.0.get(path).into_iter().flatten() { span.problem role="alert" { (m) } } }
}

fn summary(diagnostics: &[Diagnostic]) -> Markup {
    html! {
        div #check-result aria-live="polite" {
            @if diagnostics.is_empty() {
                p.ok { "✓ The contract checker finds no problem." }
            } @else {
                div.error role="alert" {
                    p { strong { (diagnostics.len()) " problem" @if diagnostics.len() > 1 { "s" } " found by the contract checker:" } }
                    ul.diagnostics {
                        @for d in diagnostics {
                            li {
                                "line " (d.line) ": "
                                @if let Some(path) = &d.path { a href=(format!("#{}", form::field_id(path))) { code { (path) } } " " }
                                @if let Some(step) = &d.step { "(" (step) ") " }
                                (d.message)
                                @if let Some(hint) = &d.hint { " — " (hint) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn try_section(view: &EditorView) -> Markup {
    let draft = view.draft;
    html! {
        section aria-labelledby="try-title" {
            h2 #try-title { "Try it" }
            p.muted { "Sample events, one JSON object per line (at most " (tryit::MAX_EVENTS) "), run through the steps here in local mode: nothing is written anywhere." }
            div.field {
                label for="events" { "Sample events" }
                textarea #events name="events" rows="6" spellcheck="false" { (draft.events) }
            }
            div.field {
                label for="events-file" { "Or a file" }
                input #events-file type="file" accept=".json,.jsonl,.ndjson,.txt" data-fills="events";
            }
            @for table in &view.tables {
                @let id = form::field_id(&format!("table:{table}"));
                @let rows = draft.tables.iter().find(|(n, _)| n == table).map(|(_, r)| r.as_str()).unwrap_or("");
                div.field {
                    label for=(id) { "Rows of table " (table) }
                    textarea id=(id) name=(format!("table:{table}")) rows="4" spellcheck="false" { (rows) }
                }
            }
            button type="submit" name="op" value="try" { "Run the sample" }
            @match view.try_outcome {
                None => {}
                Some(Err(message)) => p.error role="alert" #try-error { (message) },
                Some(Ok(outcome)) => (try_result(outcome)),
            }
        }
    }
}

fn try_result(outcome: &TryOutcome) -> Markup {
    html! {
        div #try-result {
            table {
                caption { "Per step" }
                thead { tr { th scope="col" { "Step" } th scope="col" { "In" } th scope="col" { "Out" } th scope="col" { "Dropped" } th scope="col" { "Dead letters" } } }
                tbody {
                    @for s in &outcome.steps {
                        tr { td { (s.name) } td { (s.events_in) } td { (s.events_out) } td { (s.dropped) } td { (s.dead_lettered) } }
                    }
                }
            }
            h3 { "Output (" (outcome.output_total) " events)" }
            @if outcome.output.len() < outcome.output_total { p.muted { "The first " (outcome.output.len()) " shown." } }
            pre #try-output { @for line in &outcome.output { (line) "\n" } }
            h3 { "Dead letters (" (outcome.dead_letters_total) ")" }
            @if !outcome.dead_letters.is_empty() {
                table #try-dead-letters {
                    thead { tr { th scope="col" { "Step" } th scope="col" { "Reason" } th scope="col" { "Event" } } }
                    tbody { @for (step, reason, original) in &outcome.dead_letters { tr { td { (step) } td { (reason) } td { code { (original) } } } } }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_as_written_has_no_server_fields() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/samples/clickstream-etl.yaml"
        ))
        .unwrap();
        let mut p: Pipeline = serde_yaml_ng::from_str(&text).unwrap();
        p.metadata.resource_version = Some("7".into());
        p.metadata.uid = Some("u".into());
        p.status = Some(Default::default());
        let written = as_written(&p);
        assert!(written.get("status").is_none());
        assert!(written["metadata"].get("resourceVersion").is_none());
        assert!(written["metadata"].get("uid").is_none());
        assert_eq!(written["metadata"]["name"], "clickstream-etl");
    }

    #[test]
    fn the_operators_policy_is_located_in_the_edited_text() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/samples/orders-join-customers.yaml"
        ))
        .unwrap();
        let reading = Reading::parse(EDITED, &text);
        let name = reading.manifests.pipelines[0]
            .metadata
            .name
            .clone()
            .unwrap();
        let plan = reading.compile(0).unwrap();
        let mut operator: OperatorConfig =
            serde_yaml_ng::from_str("policy: {maxPartitions: 1}").unwrap();
        let found = policy_diagnostics(&operator, &reading, &name, &plan);
        assert!(!found.is_empty());
        let first = &found[0];
        let path = first.path.as_deref().unwrap();
        assert!(path.ends_with(".partitions"), "{path}");
        assert!(
            first.message.starts_with("the operator's policy"),
            "{}",
            first.message
        );
        let line = text.lines().nth(first.line - 1).unwrap();
        assert!(line.contains("partitions"), "line {}: {line}", first.line);
        operator.policy = Default::default();
        assert!(policy_diagnostics(&operator, &reading, &name, &plan).is_empty());
    }

    #[test]
    fn the_form_keeps_metadata_from_the_yaml_it_was_shown_with() {
        let previous =
            json!({"metadata": {"name": "a", "namespace": "n", "labels": {"team": "x"}}});
        let mut fields = Fields::new();
        fields.insert("metadata.name".into(), "b".into());
        fields.insert("metadata.namespace".into(), "n".into());
        let manifest = manifest_from_form(Kind::Pipeline, &fields, Some(&previous));
        assert_eq!(
            manifest["metadata"],
            json!({"name": "b", "namespace": "n", "labels": {"team": "x"}})
        );
        assert_eq!(manifest["kind"], "Pipeline");
    }
}

#[cfg(test)]
mod avro_tests {
    use super::*;

    /// An Avro source is checked against its registry's schema, as the
    /// operator checks it: a registry that cannot be asked is a diagnostic
    /// at the source's format, not a check against the declared fields.
    #[tokio::test]
    async fn an_avro_source_whose_registry_does_not_answer_is_a_diagnostic() {
        let yaml = r#"apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: clicks, namespace: web}
spec:
  schemaRegistry: {url: "http://127.0.0.1:9"}
  source:
    topic: clicks
    format: avro
    schema:
      fields: [{name: id, type: string}]
  sinks:
    - name: out
      kafka: {topic: clicks.out}
"#;
        let reading = Reading::parse(EDITED, yaml);
        let (_, checked) = check_reading(&OperatorConfig::default(), reading).await;
        assert!(
            checked.plans.is_empty(),
            "not checked against the declared fields"
        );
        let diagnostic = checked
            .diagnostics
            .iter()
            .find(|d| d.path.as_deref() == Some("spec.source.format"))
            .unwrap_or_else(|| panic!("{:?}", checked.diagnostics));
        assert!(
            diagnostic.message.contains("clicks-value")
                && diagnostic.message.contains("127.0.0.1:9"),
            "{}",
            diagnostic.message
        );

        let json = yaml.replace("    format: avro\n", "");
        let (_, checked) =
            check_reading(&OperatorConfig::default(), Reading::parse(EDITED, &json)).await;
        assert_eq!(checked.plans.len(), 1, "{:?}", checked.diagnostics);
    }
}
