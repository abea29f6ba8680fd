//! The console against the testbed's real API server, with the real operator
//! and runtime pods: signing in, the pages, the editor's check, try and apply,
//! the actions as the patches they are, and Kubernetes RBAC deciding what each
//! user sees and may do (a viewer gets no edit controls and a direct POST is
//! refused by the API server), CSRF and cross-site refusals, proxy mode's
//! impersonation, and Argo CD managed objects kept read-only.
//!
//! Needs `cargo build -p keystone-console -p keystone-operator -p
//! keystone-runtime` and a running testbed.

mod console_support;
mod operator_support;
mod runtime_support;

use std::time::Duration;

use console_support::{Console, Visitor, install_user_roles, sign_in, sign_in_at, text_of, user};
use keystone_crds::{Pipeline, Processor};
use keystone_e2e::{TestNamespace, Testbed, wait_for};
use kube::api::{Patch, PatchParams};
use operator_support::*;
use reqwest::StatusCode;
use serde_json::json;

/// A namespace with the chart's user roles, an editor and a viewer.
struct World {
    tb: Testbed,
    ns: TestNamespace,
    editor_token: String,
    viewer_token: String,
}

async fn world(prefix: &str) -> World {
    let tb = testbed().await;
    install_crds(&tb);
    install_user_roles(&tb);
    let ns = pipeline_namespace(&tb, prefix).await;
    let editor_token = user(&tb, &ns, "ana", "edit").await;
    let viewer_token = user(&tb, &ns, "vic", "view").await;
    World {
        tb,
        ns,
        editor_token,
        viewer_token,
    }
}

fn sample_pipeline(ns: &str, name: &str, source: &str, sink: &str) -> String {
    pipeline_yaml(ns, name, source, sink, 2, "Delete")
}

/// Applies the sample pipeline `name` (topics `e2e.console.TAG.in`/`.out`)
/// as the testbed's admin, for tests of what users see of it.
async fn apply_sample(w: &World, name: &str, tag: &str) {
    let yaml = sample_pipeline(
        w.ns.name(),
        name,
        &format!("e2e.console.{tag}.in"),
        &format!("e2e.console.{tag}.out"),
    );
    apply_yaml(&w.tb, &yaml).await;
}

async fn signed_in(console: &Console, token: &str) -> Visitor {
    match sign_in(console, token).await {
        Ok(visitor) => visitor,
        Err(answer) => panic!(
            "sign-in refused ({}): {}\n{}",
            answer.status,
            text_of(&answer.body),
            console.log_text()
        ),
    }
}

/// The editor's fields for a manifest typed into its YAML half.
fn yaml_post<'a>(yaml: &'a str, op: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("kind", "Pipeline"),
        ("existing", "false"),
        ("yaml", yaml),
        // No digest of a shown YAML: the YAML half is what changed.
        ("yaml_digest", ""),
        ("op", op),
    ]
}

#[tokio::test]
async fn signing_in_takes_only_a_token_the_api_server_accepts() {
    let w = world("console-signin").await;
    let console = Console::start(&w.tb).await;
    let anonymous = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = anonymous
        .get(console.url("/pipelines"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::SEE_OTHER);
    assert_eq!(page.headers()["location"], "/login");

    let refused = sign_in(&console, "not-a-token")
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(
        text_of(&refused.body).contains("did not accept this token"),
        "{}",
        text_of(&refused.body)
    );

    let visitor = signed_in(&console, &w.editor_token).await;
    // ana may not list every namespace: the list opens on her own.
    let everywhere = visitor.get("/pipelines").await;
    assert_eq!(everywhere.status, StatusCode::SEE_OTHER);
    assert_eq!(
        everywhere.location(),
        Some(format!("/pipelines?namespace={}", w.ns.name()).as_str())
    );
    let list = visitor
        .get(&format!("/pipelines?namespace={}", w.ns.name()))
        .await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(text_of(&list.body).contains(&format!(
        "Signed in as system:serviceaccount:{}:ana",
        w.ns.name()
    )));

    // Signing out ends the session on the server, not only in the browser.
    let out = visitor.post("/logout", &[]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(visitor.get("/pipelines").await.location(), Some("/login"));
}

#[tokio::test]
async fn an_editor_checks_tries_creates_and_runs_a_pipeline_and_acts_on_it() {
    let w = world("console-edit").await;
    require_runtime_binary();
    let op_ns = operator_namespace(&w.tb, &w.ns).await;
    let operator = OperatorProcess::start(&w.tb, w.ns.name(), op_ns.name(), "op-console");
    let kafka = Kafka::new(&w.tb);
    let source = unique("e2e.console.in");
    let sink = unique("e2e.console.out");
    kafka.create(&source, 2).await;
    let console = Console::start(&w.tb).await;
    let ana = signed_in(&console, &w.editor_token).await;
    let name = "clicks";

    // The new-pipeline page: the form drawn from the CRD, and the YAML.
    let new = ana
        .get(&format!("/pipelines/new?namespace={}", w.ns.name()))
        .await;
    assert_eq!(new.status, StatusCode::OK);
    assert!(new.body.contains("id=\"f-spec_source_topic\""));
    assert!(new.body.contains("id=\"yaml\""));

    // A contract error is shown at the step it names, in the form, and in the
    // list above with its line.
    let good = sample_pipeline(w.ns.name(), name, &source, &sink);
    let broken = good.replace(
        "dedup: {key: [user], window: 1m}",
        "filter: {expression: 'amount > 10'}",
    );
    assert_ne!(broken, good);
    let checked = ana.post("/editor", &yaml_post(&broken, "check")).await;
    assert_eq!(checked.status, StatusCode::OK);
    let step = checked
        .body
        .find("<fieldset id=\"f-spec_steps_0_\" class=\"invalid\">")
        .expect("the step's fieldset, marked invalid");
    let in_step = &checked.body[step..];
    let problem = in_step
        .find("class=\"problem\"")
        .expect("a problem in the step");
    assert!(
        in_step[problem..].starts_with("class=\"problem\" role=\"alert\">")
            && text_of(&in_step[problem..problem + 400]).contains("amount"),
        "the step's problem names the unknown field: {}",
        text_of(&in_step[..problem + 400])
    );
    assert!(
        checked.body.contains("value=\"amount &gt; 10\""),
        "the expression stays as typed"
    );
    let text = text_of(&checked.body);
    assert!(
        text.contains("1 problem found by the contract checker"),
        "{text}"
    );
    assert!(
        text.contains("spec.steps[0] (per-user) needs field \"amount\""),
        "{text}"
    );
    // And it cannot be applied.
    let refused = ana.post("/editor", &yaml_post(&broken, "apply")).await;
    assert!(text_of(&refused.body).contains("Not applied"));
    assert!(
        w.ns.api::<Pipeline>()
            .get_opt(name)
            .await
            .unwrap()
            .is_none(),
        "a pipeline with a contract error was created"
    );

    // Try it: the good pipeline on sample events, with a duplicate and a
    // record that is not JSON.
    let events = "{\"session_id\":\"s1\",\"user\":\"u1\",\"action\":\"view\"}\n\
                  {\"session_id\":\"s2\",\"user\":\"u1\",\"action\":\"buy\"}\n\
                  {\"session_id\":\"s3\",\"user\":\"u2\",\"action\":\"view\"}\n\
                  not json\n";
    let mut fields = yaml_post(&good, "try");
    fields.push(("events", events));
    let tried = ana.post("/editor", &fields).await;
    let text = text_of(&tried.body);
    assert!(text.contains("Output (2 events)"), "{text}");
    assert!(text.contains("Dead letters (1)"), "{text}");
    assert!(
        text.contains("per-user 3 2 1 0"),
        "the dedup step's in, out, dropped, dead: {text}"
    );
    assert!(text.contains("not json"), "{text}");
    assert!(
        w.ns.api::<Pipeline>()
            .get_opt(name)
            .await
            .unwrap()
            .is_none(),
        "trying created the pipeline"
    );

    // Create: a server-side apply as ana, under the console's field manager.
    let created = ana.post("/editor", &yaml_post(&good, "apply")).await;
    created.assert_redirect();
    let detail_path = format!("/pipelines/{}/{name}", w.ns.name());
    assert_eq!(created.location(), Some(detail_path.as_str()));
    let pipeline = w.ns.api::<Pipeline>().get(name).await.unwrap();
    let managers = console_support::field_managers(&pipeline.metadata);
    assert!(
        managers.contains(&"keystone-console".to_owned()),
        "{managers:?}"
    );

    let ready = wait_ready(&w.ns, name, &operator).await;
    assert!(ready.status.is_some());
    let detail = ana.get(&detail_path).await;
    let text = text_of(&detail.body);
    assert!(text.contains("Running"), "{text}");
    assert!(
        text.contains(&source) && text.contains("per-user (dedup)"),
        "the plan: {text}"
    );
    for control in ["Suspend", "Checkpoint now", "Edit"] {
        assert!(text.contains(control), "{control} missing: {text}");
    }

    // Live numbers come from the runtime pods' metrics.
    produce_lines(
        &w.tb,
        &source,
        "{\"session_id\":\"a\",\"user\":\"x\",\"action\":\"view\"}\n",
        |_| "a".to_owned(),
    )
    .await;
    // A record that is not JSON is a dead letter; the page shows it with
    // its reason to a user allowed to read dead letters.
    produce_lines(&w.tb, &source, "this is not json", |_| "bad".to_owned()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page = text_of(&ana.get(&detail_path).await.body);
        if page.contains("this is not json") {
            let section = &page[page.find("Recent dead letters").unwrap()..];
            assert!(
                section.contains(&format!("{source}/")),
                "where it was read: {section}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no dead letter on the page after 60 s: {page}\n{}",
            console.log_text()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let live = ana.get(&format!("{detail_path}/live")).await;
    let live_text = text_of(&live.body);
    assert!(
        !live_text.contains(" 0 pods scraped"),
        "no runtime pod scraped: {live_text}"
    );

    // Checkpoint now: the documented trigger patch, then a retained
    // checkpoint. Right after start-up a checkpoint can fail while partitions
    // are still being assigned; the page says why and the user asks again.
    let api = w.ns.api::<Pipeline>();
    let retained = |p: &Pipeline| p.status.as_ref().map_or(0, |s| s.checkpoints.len());
    let checkpoints_before = retained(&api.get(name).await.unwrap());
    let mut with_checkpoint = None;
    for _attempt in 0..5 {
        let failed_before = api
            .get(name)
            .await
            .unwrap()
            .status
            .and_then(|s| s.last_failed_checkpoint)
            .map(|c| c.id);
        let answer = ana
            .post(&format!("{detail_path}/actions/checkpoint"), &[])
            .await;
        answer.assert_redirect();
        assert!(
            api.get(name)
                .await
                .unwrap()
                .spec
                .checkpoint_trigger
                .is_some()
        );
        let settled = wait_for(
            &api,
            name,
            Duration::from_secs(120),
            "the checkpoint taken or failed",
            |p| {
                retained(p) > checkpoints_before
                    || p.status
                        .as_ref()
                        .and_then(|s| s.last_failed_checkpoint.as_ref())
                        .map(|c| &c.id)
                        != failed_before.as_ref()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_text()));
        if retained(&settled) > checkpoints_before {
            with_checkpoint = Some(settled);
            break;
        }
        let failure = settled.status.unwrap().last_failed_checkpoint.unwrap();
        let page = text_of(&ana.get(&detail_path).await.body);
        assert!(
            page.contains(&failure.id) && page.contains("failed"),
            "the page shows the failed checkpoint: {page}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let with_checkpoint = with_checkpoint.expect("a checkpoint within 5 attempts");
    let checkpoint = with_checkpoint
        .status
        .unwrap()
        .checkpoints
        .last()
        .unwrap()
        .id
        .clone();
    let detail = ana.get(&detail_path).await;
    assert!(text_of(&detail.body).contains(&format!("Restore {checkpoint}")));

    // Suspend and resume.
    let answer = ana
        .post(&format!("{detail_path}/actions/suspend"), &[])
        .await;
    answer.assert_redirect();
    let suspended = w.ns.api::<Pipeline>().get(name).await.unwrap();
    assert_eq!(format!("{:?}", suspended.spec.state), "Suspended");
    wait_for(
        &w.ns.api::<Pipeline>(),
        name,
        Duration::from_secs(120),
        "phase Suspended",
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.phase.as_ref())
                .is_some_and(|ph| format!("{ph:?}") == "Suspended")
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.log_text()));
    assert!(text_of(&ana.get(&detail_path).await.body).contains("Resume"));
    let answer = ana
        .post(&format!("{detail_path}/actions/resume"), &[])
        .await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    let resumed = w.ns.api::<Pipeline>().get(name).await.unwrap();
    assert_eq!(format!("{:?}", resumed.spec.state), "Running");
    wait_ready(&w.ns, name, &operator).await;

    // Restore from the checkpoint: the documented restore patch.
    let answer = ana
        .post(
            &format!("{detail_path}/actions/restore"),
            &[("checkpoint", checkpoint.as_str())],
        )
        .await;
    answer.assert_redirect();
    let restoring = w.ns.api::<Pipeline>().get(name).await.unwrap();
    assert_eq!(
        restoring
            .spec
            .restore
            .as_ref()
            .map(|r| r.checkpoint.as_str()),
        Some(checkpoint.as_str())
    );
    // A checkpoint that is not retained is refused before any patch.
    let answer = ana
        .post(
            &format!("{detail_path}/actions/restore"),
            &[("checkpoint", "nope")],
        )
        .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);

    // The list marks its phase and links the page; its polled rows too.
    let list = ana
        .get(&format!("/pipelines?namespace={}", w.ns.name()))
        .await;
    assert!(list.body.contains(&format!("href=\"{detail_path}\"")));
    let rows = ana
        .get(&format!("/pipelines/rows?namespace={}", w.ns.name()))
        .await;
    assert_eq!(rows.status, StatusCode::OK);
    assert!(
        rows.body.starts_with("<div id=\"pipelines\""),
        "a fragment: {}",
        rows.body
    );
    assert!(rows.body.contains(&format!("href=\"{detail_path}\"")));

    // Editing shows the object as written, without server fields.
    let edit = ana.get(&format!("{detail_path}/edit")).await;
    assert_eq!(edit.status, StatusCode::OK);
    assert!(!edit.body.contains("resourceVersion"));
    assert!(!edit.body.contains("managedFields"));
    assert!(
        edit.body.contains("readonly"),
        "the name of an existing pipeline is fixed"
    );

    // Roll back: the spec becomes the last stable one (the restore request,
    // made after it, goes with it).
    let stable: serde_json::Value = serde_json::from_str(
        api.get(name)
            .await
            .unwrap()
            .status
            .unwrap()
            .last_stable_spec
            .as_deref()
            .expect("a stable spec"),
    )
    .unwrap();
    let answer = ana
        .post(&format!("{detail_path}/actions/rollback"), &[])
        .await;
    answer.assert_redirect();
    let rolled_back = api.get(name).await.unwrap();
    assert!(rolled_back.spec.restore.is_none());
    assert_eq!(serde_json::to_value(&rolled_back.spec).unwrap(), stable);
    drop(operator);
}

#[tokio::test]
async fn a_viewer_sees_no_edit_controls_and_a_direct_post_is_refused() {
    let w = world("console-view").await;
    let name = "watched";
    apply_sample(&w, name, "v").await;
    let console = Console::start(&w.tb).await;
    let vic = signed_in(&console, &w.viewer_token).await;
    let detail_path = format!("/pipelines/{}/{name}", w.ns.name());

    let list = vic
        .get(&format!("/pipelines?namespace={}", w.ns.name()))
        .await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(text_of(&list.body).contains(name));
    assert!(!text_of(&list.body).contains("New pipeline"));
    let detail = vic.get(&detail_path).await;
    assert_eq!(detail.status, StatusCode::OK);
    let text = text_of(&detail.body);
    for control in ["Suspend", "Checkpoint now", "Edit", "Roll back"] {
        assert!(!text.contains(control), "a viewer sees {control}: {text}");
    }
    assert!(
        !detail.body.contains("/actions/"),
        "no action form for a viewer"
    );
    assert!(
        text.contains("reading them needs get on pipelines/deadletters"),
        "a viewer is not shown dead letters: {text}"
    );

    // Posting anyway: the API server refuses, the console says so.
    let answer = vic
        .post(&format!("{detail_path}/actions/suspend"), &[])
        .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(
        text_of(&answer.body).contains("does not allow"),
        "{}",
        text_of(&answer.body)
    );
    let applied = vic
        .post(
            "/editor",
            &yaml_post(
                &sample_pipeline(w.ns.name(), "sneaky", "e2e.console.v.in", "e2e.console.v.x"),
                "apply",
            ),
        )
        .await;
    assert!(
        text_of(&applied.body).contains("does not allow"),
        "{}",
        text_of(&applied.body)
    );
    assert!(
        w.ns.api::<Pipeline>()
            .get_opt("sneaky")
            .await
            .unwrap()
            .is_none()
    );
    let unchanged = w.ns.api::<Pipeline>().get(name).await.unwrap();
    assert_eq!(format!("{:?}", unchanged.spec.state), "Running");

    // The editor still checks for a viewer, and says why it will not apply.
    let edit = vic.get(&format!("{detail_path}/edit")).await;
    let text = text_of(&edit.body);
    assert!(text.contains("You may not change Pipelines"), "{text}");
    assert!(!text.contains("Apply changes"));
}

#[tokio::test]
async fn changes_without_the_sessions_csrf_token_or_from_another_site_are_refused() {
    let w = world("console-csrf").await;
    let name = "guarded";
    apply_sample(&w, name, "c").await;
    let console = Console::start(&w.tb).await;
    let ana = signed_in(&console, &w.editor_token).await;
    let path = format!("/pipelines/{}/{name}/actions/suspend", w.ns.name());

    let no_token = ana.post_raw(&path, &[], &[]).await;
    assert_eq!(no_token.status, StatusCode::FORBIDDEN);
    assert!(no_token.body.contains("CSRF"));
    let wrong_token = ana.post_raw(&path, &[("_csrf", "0000")], &[]).await;
    assert_eq!(wrong_token.status, StatusCode::FORBIDDEN);
    let csrf = ana.csrf.clone();
    let cross_site = ana
        .post_raw(
            &path,
            &[("_csrf", csrf.as_str())],
            &[("sec-fetch-site", "cross-site")],
        )
        .await;
    assert_eq!(cross_site.status, StatusCode::FORBIDDEN);
    let other_origin = ana
        .post_raw(
            &path,
            &[("_csrf", csrf.as_str())],
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(other_origin.status, StatusCode::FORBIDDEN);
    let still = w.ns.api::<Pipeline>().get(name).await.unwrap();
    assert_eq!(format!("{:?}", still.spec.state), "Running");

    // The same request with the token (as htmx sends it, in a header) works.
    let ok = ana
        .post_raw(
            &path,
            &[],
            &[
                ("x-csrf-token", csrf.as_str()),
                ("sec-fetch-site", "same-origin"),
            ],
        )
        .await;
    ok.assert_redirect();
    let suspended = w.ns.api::<Pipeline>().get(name).await.unwrap();
    assert_eq!(format!("{:?}", suspended.spec.state), "Suspended");
}

#[tokio::test]
async fn behind_a_proxy_the_console_impersonates_the_user_it_names() {
    let w = world("console-proxy").await;
    let name = "proxied";
    apply_sample(&w, name, "p").await;
    // The testbed's admin kubeconfig stands for the console's account, which
    // the chart allows only to impersonate.
    let console = Console::start_with(&w.tb, &["--auth", "proxy"]).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let list = format!("/pipelines?namespace={}", w.ns.name());

    let nobody = http.get(console.url(&list)).send().await.unwrap();
    assert_eq!(nobody.status(), StatusCode::UNAUTHORIZED);

    let viewer = format!("system:serviceaccount:{}:vic", w.ns.name());
    let as_viewer = http
        .get(console.url(&list))
        .header("x-forwarded-user", &viewer)
        .header("x-forwarded-groups", "system:serviceaccounts")
        .send()
        .await
        .unwrap();
    assert_eq!(as_viewer.status(), StatusCode::OK);
    let body = as_viewer.text().await.unwrap();
    assert!(text_of(&body).contains(&format!("Signed in as {viewer}")));
    assert!(text_of(&body).contains(name));
    assert!(
        !text_of(&body).contains("New pipeline"),
        "impersonated as a viewer"
    );

    let stranger = http
        .get(console.url(&list))
        .header("x-forwarded-user", "mallory")
        .send()
        .await
        .unwrap();
    assert_eq!(stranger.status(), StatusCode::FORBIDDEN);
    assert!(text_of(&stranger.text().await.unwrap()).contains("does not allow mallory"));
}

#[tokio::test]
async fn argo_cd_managed_objects_are_read_only_with_the_yaml_to_commit() {
    let w = world("console-argo").await;
    let name = "from-git";
    apply_sample(&w, name, "a").await;
    w.ns.api::<Pipeline>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "argocd.argoproj.io/tracking-id": "pipelines:keystone.dev/Pipeline:ns/from-git"}}})),
        )
        .await
        .unwrap();
    let console = Console::start(&w.tb).await;
    let ana = signed_in(&console, &w.editor_token).await;
    let detail_path = format!("/pipelines/{}/{name}", w.ns.name());
    let detail = ana.get(&detail_path).await;
    let text = text_of(&detail.body);
    assert!(text.contains("Argo CD manages this Pipeline"), "{text}");
    assert!(!text.contains("Suspend"));
    let answer = ana
        .post(&format!("{detail_path}/actions/suspend"), &[])
        .await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    let edit = ana.get(&format!("{detail_path}/edit")).await;
    let text = text_of(&edit.body);
    assert!(text.contains("commit the YAML"), "{text}");
    assert!(!text.contains("Apply changes"));
    assert!(
        edit.body.contains(&format!("name: {name}")),
        "the YAML to commit"
    );
}

#[tokio::test]
async fn processors_are_created_in_the_editor_and_list_the_pipelines_using_them() {
    let w = world("console-proc").await;
    let console = Console::start(&w.tb).await;
    let ana = signed_in(&console, &w.editor_token).await;
    let processor = format!(
        "apiVersion: keystone.dev/v1alpha1\nkind: Processor\nmetadata:\n  name: only-views\n  namespace: {}\n\
         spec:\n  description: Keeps page views.\n  filter:\n    expression: 'action == \"view\"'\n  contract:\n    requires:\n      - {{name: action, type: string}}\n    schema: {{effect: Passthrough}}\n",
        w.ns.name()
    );
    let answer = ana
        .post(
            "/editor",
            &[
                ("kind", "Processor"),
                ("existing", "false"),
                ("yaml", &processor),
                ("yaml_digest", ""),
                ("op", "apply"),
            ],
        )
        .await;
    answer.assert_redirect();
    assert!(
        w.ns.api::<Processor>()
            .get_opt("only-views")
            .await
            .unwrap()
            .is_some()
    );

    let pipeline = sample_pipeline(
        w.ns.name(),
        "uses-it",
        "e2e.console.r.in",
        "e2e.console.r.out",
    )
    .replace(
        "    - name: per-user\n      dedup: {key: [user], window: 1m}",
        "    - name: views\n      processorRef: {name: only-views}",
    );
    assert!(pipeline.contains("processorRef"));
    // The checker resolves the reference against the cluster's Processors.
    let checked = ana.post("/editor", &yaml_post(&pipeline, "check")).await;
    assert!(
        text_of(&checked.body).contains("finds no problem"),
        "{}",
        text_of(&checked.body)
    );
    let missing = pipeline.replace("only-views}", "no-such-processor}");
    let checked = ana.post("/editor", &yaml_post(&missing, "check")).await;
    assert!(
        text_of(&checked.body).contains("no-such-processor"),
        "{}",
        text_of(&checked.body)
    );

    apply_yaml(&w.tb, &pipeline).await;
    let list = ana
        .get(&format!("/processors?namespace={}", w.ns.name()))
        .await;
    let text = text_of(&list.body);
    assert!(
        text.contains(&format!(
            "only-views {} filter Keeps page views.",
            w.ns.name()
        )),
        "{text}"
    );
    let new = ana
        .get(&format!("/processors/new?namespace={}", w.ns.name()))
        .await;
    assert_eq!(new.status, StatusCode::OK);
    assert!(
        new.body.contains("kind: Processor"),
        "{}",
        text_of(&new.body)
    );
    let edit = ana
        .get(&format!("/processors/{}/only-views/edit", w.ns.name()))
        .await;
    assert_eq!(edit.status, StatusCode::OK);
    assert!(
        edit.body.contains("id=\"f-spec_filter_expression\""),
        "the operator's field in the form"
    );
    let detail = ana
        .get(&format!("/processors/{}/only-views", w.ns.name()))
        .await;
    let text = text_of(&detail.body);
    assert!(text.contains("Used by uses-it"), "{text}");
}

#[tokio::test]
async fn the_chart_installs_a_console_that_users_sign_in_to() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::ListParams;

    let w = world("console-chart").await;
    console_support::console_binary();
    let release_ns = operator_namespace(&w.tb, &w.ns).await;
    let release = unique("ksc");
    let bootstrap = w.tb.kafka_bootstrap_servers().expect("kafka").to_owned();
    let mut install = std::process::Command::new(w.tb.helm().expect("helm"));
    install
        .env("KUBECONFIG", w.tb.kubeconfig().expect("kubeconfig"))
        .args([
            "install",
            &release,
            &repo().join("helm/keystone").display().to_string(),
            "--namespace",
            release_ns.name(),
            "--set",
            &format!("kafka.clusters.default.bootstrapServers={bootstrap}"),
            "--set",
            &format!("watchNamespaces={{{}}}", w.ns.name()),
            "--set",
            "console.enabled=true",
            // Each pod of the process kubelet has its own loopback address.
            "--set",
            "console.bindAddress=$(POD_IP)",
            "--set",
            "metrics.bindAddress=$(POD_IP)",
            "--set",
            "runtime.bindAddress=$(POD_IP)",
        ]);
    run_ok(install);
    let _release = HelmRelease::new(&w.tb, &release, release_ns.name());
    apply_sample(&w, "listed", "h").await;

    // The console pod runs under its own account and becomes ready.
    let pods: kube::Api<Pod> = kube::Api::namespaced(w.tb.client().unwrap(), release_ns.name());
    let selector =
        format!("app.kubernetes.io/instance={release},app.kubernetes.io/name=keystone-console");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let ip = loop {
        let ready_ip = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .ok()
            .and_then(|list| {
                list.items.into_iter().find_map(|p| {
                    let status = p.status?;
                    let ready = status
                        .conditions
                        .as_ref()?
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    ready.then_some(status.pod_ip?)
                })
            });
        if let Some(ip) = ready_ip {
            break ip;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the console pod was not Ready within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let base = format!("http://{ip}:8080");
    let ana = match sign_in_at(&base, &w.editor_token).await {
        Ok(visitor) => visitor,
        Err(answer) => panic!(
            "sign-in refused ({}): {}",
            answer.status,
            text_of(&answer.body)
        ),
    };
    let list = ana
        .get(&format!("/pipelines?namespace={}", w.ns.name()))
        .await;
    assert_eq!(list.status, StatusCode::OK, "{}", text_of(&list.body));
    let text = text_of(&list.body);
    assert!(text.contains("listed"), "{text}");
    assert!(text.contains(&format!(
        "Signed in as system:serviceaccount:{}:ana",
        w.ns.name()
    )));
    // A stranger's token does not sign in.
    assert!(sign_in_at(&base, "nope").await.is_err());
}

#[tokio::test]
async fn the_operators_policy_is_checked_with_the_contracts() {
    let w = world("console-policy").await;
    // The operator's configuration, as the chart mounts it for both.
    let config =
        w.tb.state_dir()
            .join(format!("e2e-console-policy-{}.yaml", std::process::id()));
    std::fs::write(&config, "policy:\n  maxPartitions: 4\n").unwrap();
    let console =
        Console::start_with(&w.tb, &["--operator-config", &config.display().to_string()]).await;
    let ana = signed_in(&console, &w.editor_token).await;
    let within = sample_pipeline(
        w.ns.name(),
        "sized",
        "e2e.console.q.in",
        "e2e.console.q.out",
    );
    let beyond = within.replace("partitions: 2", "partitions: 8");
    assert_ne!(within, beyond);

    let checked = ana.post("/editor", &yaml_post(&beyond, "check")).await;
    let text = text_of(&checked.body);
    assert!(text.contains("the operator's policy"), "{text}");
    assert!(text.contains("spec.sinks[0].kafka.partitions"), "{text}");
    let applied = ana.post("/editor", &yaml_post(&beyond, "apply")).await;
    assert!(text_of(&applied.body).contains("Not applied"));
    assert!(
        w.ns.api::<Pipeline>()
            .get_opt("sized")
            .await
            .unwrap()
            .is_none()
    );

    let checked = ana.post("/editor", &yaml_post(&within, "check")).await;
    assert!(
        text_of(&checked.body).contains("finds no problem"),
        "{}",
        text_of(&checked.body)
    );
    let _ = std::fs::remove_file(&config);
}
