//! The console in a real headless browser (Debian's Chromium driven by
//! Playwright, `keystone_e2e::browser`), against the testbed's API server
//! with the real operator and runtime pods: what e2e/tests/console.rs checks
//! over plain HTTP, here as a person does it, with htmx swapping the editor
//! on every change.
//!
//! - An editor builds a pipeline in the form (not the YAML), sees the contract
//!   checker's error at the step as they tab out of its expression, fixes it,
//!   tries sample events, creates the pipeline, waits for it to run, and
//!   suspends, resumes and checkpoints it with the page's buttons.
//! - A viewer gets no edit controls, and a POST made anyway is refused by
//!   Kubernetes (403) and changes nothing.
//! - Every control of the list, the pipeline page and the editor is reached
//!   with Tab and has an accessible name; every field has a label.
//!
//! Screenshots (console-*.png) are kept in `target/browser/`.
//!
//! Needs `cargo build -p keystone-console -p keystone-operator -p
//! keystone-runtime`, a running testbed with its browser (`e2e/testbed up`,
//! `eval "$(e2e/testbed env)"`); without the browser the tests skip, unless
//! `KEYSTONE_TEST_REQUIRE_BROWSER=1`.

mod console_support;
mod operator_support;
mod runtime_support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use console_support::{Console, install_user_roles, user};
use keystone_crds::Pipeline;
use keystone_e2e::browser::{Browser, Focused, State, Step, artifact_dir};
use keystone_e2e::{TestNamespace, Testbed, wait_for};
use operator_support::*;
use serde_json::{Value, json};

/// A whole script may take this long (a browser start, a sign-in and dozens
/// of htmx round trips).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(300);

/// Time for the operator and the runtime pods to run a created pipeline.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------
// Scripts with named results

/// A browser script whose results the test reads by name.
struct Script {
    steps: Vec<Step>,
    kept: HashMap<&'static str, usize>,
}

impl Script {
    fn new() -> Self {
        Script {
            steps: Vec::new(),
            kept: HashMap::new(),
        }
    }

    fn then(mut self, step: Step) -> Self {
        self.steps.push(step);
        self
    }

    fn then_all(mut self, steps: impl IntoIterator<Item = Step>) -> Self {
        self.steps.extend(steps);
        self
    }

    /// A step whose result is kept as `key`.
    fn keep(mut self, key: &'static str, step: Step) -> Self {
        assert!(
            self.kept.insert(key, self.steps.len()).is_none(),
            "{key} is kept twice"
        );
        self.steps.push(step);
        self
    }

    /// Runs the script; a failing step panics with the harness's report (the
    /// step, the page, its console, a screenshot) and the console's log.
    async fn run(self, browser: &Browser, console: &Console) -> Kept {
        match browser.run(&self.steps).await {
            Ok(results) => Kept {
                results,
                kept: self.kept,
            },
            Err(e) => panic!(
                "{e}\n--- keystone-console's log, last lines ---\n{}",
                tail(&console.log_text(), 40)
            ),
        }
    }
}

/// The results of a script, by the names [`Script::keep`] gave.
struct Kept {
    results: Vec<Value>,
    kept: HashMap<&'static str, usize>,
}

impl Kept {
    fn get(&self, key: &str) -> &Value {
        let index = self
            .kept
            .get(key)
            .unwrap_or_else(|| panic!("no result {key}"));
        &self.results[*index]
    }

    fn text(&self, key: &str) -> &str {
        self.get(key)
            .as_str()
            .unwrap_or_else(|| panic!("{key} is not a string: {}", self.get(key)))
    }

    fn count(&self, key: &str) -> u64 {
        self.get(key)
            .as_u64()
            .unwrap_or_else(|| panic!("{key} is not a count: {}", self.get(key)))
    }

    /// A focus order, up to the first Tab that left the page's controls.
    fn focus_order(&self, key: &str) -> Vec<Focused> {
        let order: Vec<Focused> = serde_json::from_value(self.get(key).clone())
            .unwrap_or_else(|e| panic!("{key} is not a focus order ({e}): {}", self.get(key)));
        order.into_iter().take_while(|f| f.tag != "body").collect()
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// Steps of the console

/// Signs in on /login with a bearer token, as a person pastes it.
fn sign_in(console: &Console, token: &str) -> Vec<Step> {
    vec![
        Step::goto(console.url("/login")),
        Step::fill("#token", token),
        Step::click("main button[type=submit]"),
        Step::wait_for_text("header.top .user", "Signed in as"),
    ]
}

/// The CSS selector of the editor's input for a manifest path (the console's
/// `form::field_id`).
fn field(path: &str) -> String {
    let id: String = path
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("#f-{id}")
}

/// The editor as htmx left it after its last swap: a form that is not the
/// one [`mark_editor`] marked, settled and processed (a change made before
/// htmx processed the new form would be lost).
const EDITOR_SWAPPED: &str = "#editor:not([data-stale]):not(.htmx-added):not(.htmx-settling)";

/// Marks the editor's form, so that [`editor_swapped`] waits for the next.
fn mark_editor() -> Step {
    Step::eval("() => { document.getElementById('editor').dataset.stale = '1'; }")
}

fn editor_swapped() -> Step {
    Step::wait_for(EDITOR_SWAPPED, State::Attached)
}

/// Types into a field of the form and tabs out of it: the change posts the
/// form and htmx swaps the editor (form, YAML and check) for the server's.
fn type_into(selector: &str, value: &str) -> Vec<Step> {
    vec![
        mark_editor(),
        Step::fill(selector, value),
        Step::press(selector, "Tab"),
        editor_swapped(),
    ]
}

/// Chooses an option of a select of the form; the change re-renders it.
fn choose(selector: &str, value: &str) -> Vec<Step> {
    vec![
        mark_editor(),
        Step::select(selector, value),
        editor_swapped(),
    ]
}

/// Clicks one of the editor's buttons (add, remove, check, try).
fn press_button(selector: &str) -> Vec<Step> {
    vec![mark_editor(), Step::click(selector), editor_swapped()]
}

/// Marks the page, so that [`fresh`] matches only on the next page loaded.
fn mark_page() -> Step {
    Step::eval("() => { document.body.dataset.stale = '1'; }")
}

/// `selector` on a page loaded after [`mark_page`].
fn fresh(selector: &str) -> String {
    format!("body:not([data-stale]) {selector}")
}

fn action_button(action: &str) -> String {
    format!("form[action$='/actions/{action}'] button")
}

/// The texts of the problems shown in the form field of the input `selector`.
const PROBLEMS_AT_FIELD: &str = "(selector) => {
    const input = document.querySelector(selector);
    const field = input && input.closest('.field');
    return field ? Array.from(field.querySelectorAll('.problem')).map((p) => p.innerText) : null;
}";

/// The texts of the problems shown on a fieldset itself (a step), not in
/// its fields.
const PROBLEMS_OF_FIELDSET: &str = "(selector) => {
    const fieldset = document.querySelector(selector);
    return fieldset ? Array.from(fieldset.querySelectorAll(':scope > .problem')).map((p) => p.innerText) : null;
}";

/// Shows only what a window of the browser's size (1280×800) shows, from the
/// top or from `selector`, for a full-page screenshot of that size: `main`
/// is cut to the rest of the window and scrolled.
const FIT_TO_WINDOW: &str = "(selector) => {
    window.scrollTo(0, 0);
    const main = document.getElementById('main');
    const top = main.getBoundingClientRect().top;
    const from = selector ? document.querySelector(selector).getBoundingClientRect().top - top - 16 : 0;
    main.style.boxSizing = 'border-box';
    main.style.height = (window.innerHeight - top) + 'px';
    main.style.overflow = 'hidden';
    main.scrollTop = Math.max(0, from);
}";

/// Undoes [`FIT_TO_WINDOW`].
const UNFIT: &str = "() => {
    const main = document.getElementById('main');
    main.style.boxSizing = main.style.height = main.style.overflow = '';
}";

/// A screenshot of the size of the browser's window, from the top of the
/// page or from `selector`.
fn viewport_shot(path: &Path, selector: Option<&str>) -> Vec<Step> {
    vec![
        Step::eval_with(FIT_TO_WINDOW, json!(selector)),
        Step::screenshot(path),
        Step::eval(UNFIT),
    ]
}

/// The rows of the try's per-step table: [step, in, out, dropped, dead].
const TRY_STEP_ROWS: &str = "() => Array.from(
    document.querySelectorAll('#try-result table:not(#try-dead-letters) tbody tr'))
    .map((tr) => Array.from(tr.cells).map((td) => td.innerText.trim()))";

/// Inputs, selects and text areas (not hidden) without a label: their markup;
/// and how many were looked at.
const UNLABELLED_FIELDS: &str = "() => {
    const fields = Array.from(document.querySelectorAll('input, select, textarea'))
        .filter((el) => el.type !== 'hidden');
    const unlabelled = fields.filter((el) => !((el.labels && el.labels.length > 0)
        || (el.getAttribute('aria-label') || '').trim()
        || (el.getAttribute('aria-labelledby') || '').trim()));
    return { fields: fields.length, unlabelled: unlabelled.map((el) => el.outerHTML.slice(0, 200)) };
}";

/// Buttons and links without a name (text or aria-label), and those whose
/// aria-label does not contain their visible text (speech input users say
/// what they see: WCAG 2.5.3, label in name); their markup, and how many
/// were looked at.
const UNNAMED_CONTROLS: &str = "() => {
    const controls = Array.from(document.querySelectorAll('button, a[href], summary'));
    const clean = (s) => (s || '').replace(/\\s+/g, ' ').trim().toLowerCase();
    const unnamed = controls.filter((el) => !(clean(el.getAttribute('aria-label')) || clean(el.textContent)));
    const hidden_label = controls.filter((el) => {
        const label = clean(el.getAttribute('aria-label'));
        return label && !label.includes(clean(el.innerText || el.textContent));
    });
    const markup = (el) => el.outerHTML.slice(0, 200);
    return { controls: controls.length, unnamed: unnamed.map(markup), label_not_in_name: hidden_label.map(markup) };
}";

/// A screenshot's path in the artifacts, without a stale copy of an earlier run.
fn shot(name: &str) -> PathBuf {
    let path = artifact_dir().join(name);
    let _ = std::fs::remove_file(&path);
    path
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "{} is not a screenshot ({} bytes)",
        path.display(),
        bytes.len()
    );
}

// ---------------------------------------------------------------------------
// The Kubernetes side

/// The testbed with the CRDs and the chart's user roles, and a namespace.
async fn world(prefix: &str) -> (Testbed, TestNamespace) {
    let tb = testbed().await;
    install_crds(&tb);
    install_user_roles(&tb);
    let ns = pipeline_namespace(&tb, prefix).await;
    (tb, ns)
}

/// Whether `value` has everything `part` has: the same keys with values that
/// include theirs (and maybe more keys), the same lists, the same scalars.
fn includes(value: &Value, part: &Value) -> bool {
    match (value, part) {
        (Value::Object(value), Value::Object(part)) => part
            .iter()
            .all(|(key, p)| value.get(key).is_some_and(|v| includes(v, p))),
        (Value::Array(value), Value::Array(part)) => {
            value.len() == part.len() && value.iter().zip(part).all(|(v, p)| includes(v, p))
        }
        (value, part) => value == part,
    }
}

fn phase(pipeline: &Pipeline) -> String {
    pipeline
        .status
        .as_ref()
        .and_then(|s| s.phase.as_ref())
        .map(|p| format!("{p:?}"))
        .unwrap_or_default()
}

fn state_of(pipeline: &Pipeline) -> Value {
    serde_json::to_value(pipeline.spec.state).expect("a state serializes")
}

async fn wait_phase(ns: &TestNamespace, name: &str, want: &str, operator: &OperatorProcess) {
    wait_for(
        &ns.api::<Pipeline>(),
        name,
        RUN_TIMEOUT,
        &format!("phase {want}"),
        |p| phase(p) == want,
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n--- the operator's log, last lines ---\n{}",
            tail(&operator.log_text(), 60)
        )
    });
}

// ---------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn an_editor_builds_a_pipeline_in_the_form_tries_it_creates_it_and_operates_it() {
    let Some(browser) = Browser::require() else {
        return;
    };
    let browser = browser.with_timeout(SCRIPT_TIMEOUT);
    require_runtime_binary();
    let (tb, ns) = world("console-browser-edit").await;
    let token = user(&tb, &ns, "ana", "edit").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start(&tb, ns.name(), op_ns.name(), "op-console-browser");
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.console.b.in");
    let sink = unique("e2e.console.b.out");
    kafka.create(&source, 2).await;
    let console = Console::start(&tb).await;
    let name = "clicks";
    let detail_path = format!("/pipelines/{}/{name}", ns.name());
    let expression = field("spec.steps[0].filter.expression");
    let step = field("spec.steps[0]");
    let error_shot = shot("console-editor-error-full.png");
    let error_top = shot("console-editor-error-top.png");
    let error_view = shot("console-editor-error.png");
    let try_shot = shot("console-editor-try.png");
    let events = "{\"session_id\":\"s1\",\"user\":\"u1\",\"action\":\"view\"}\n\
                  {\"session_id\":\"s2\",\"user\":\"u1\",\"action\":\"buy\"}\n\
                  {\"session_id\":\"s3\",\"user\":\"u2\",\"action\":\"view\"}\n\
                  not json\n";

    // The new-pipeline page, filled in the form only: every change is posted
    // when the field loses focus, and the server's form, YAML and check
    // replace the editor.
    let editor = Script::new()
        .then_all(sign_in(&console, &token))
        .keep(
            "new",
            Step::goto(console.url(&format!("/pipelines/new?namespace={}", ns.name()))),
        )
        .then_all(type_into(&field("metadata.name"), name))
        .then_all(type_into(&field("spec.source.topic"), &source))
        // The blank template's empty key went at the first change (an empty
        // optional field is not kept): it comes back through "Add a field".
        .then(Step::select(field("spec.source#add"), "key"))
        .then_all(press_button("button[value='addprop:spec.source']"))
        .then_all(type_into(&field("spec.source.key"), "session_id"))
        // The blank template's one schema field, renamed; two more added.
        .then_all(type_into(
            &field("spec.source.schema.fields[0].name"),
            "session_id",
        ))
        .then_all(press_button(
            "button[value='add:spec.source.schema.fields']",
        ))
        .then_all(type_into(
            &field("spec.source.schema.fields[1].name"),
            "user",
        ))
        .then_all(choose(
            &field("spec.source.schema.fields[1].type"),
            "string",
        ))
        .then_all(press_button(
            "button[value='add:spec.source.schema.fields']",
        ))
        .then_all(type_into(
            &field("spec.source.schema.fields[2].name"),
            "action",
        ))
        .then_all(choose(
            &field("spec.source.schema.fields[2].type"),
            "string",
        ))
        .then_all(type_into(&field("spec.sinks[0].kafka.topic"), &sink))
        // An optional setting, through "Add a field to spec": it comes
        // empty, which the checker refuses, so its settings stay unfolded.
        .then(Step::select(field("spec#add"), "topicDeletionPolicy"))
        .then_all(press_button("button[value='addprop:spec']"))
        .then_all(choose(&field("spec.topicDeletionPolicy"), "Delete"))
        .then(Step::wait_for_text("#check-result", "finds no problem"))
        // A step: "Add step", its name, then its operator from "Add a field
        // to spec.steps[0]".
        .then_all(press_button("button[value='add:spec.steps']"))
        .then_all(type_into(&field("spec.steps[0].name"), "views"))
        .keep("chosen", Step::select(field("spec.steps[0]#add"), "filter"))
        .then_all(press_button("button[value='addprop:spec.steps[0]']"))
        .keep("operator added", Step::count(&expression))
        // An expression on a field the schema does not have.
        .then_all(type_into(&expression, "amount > 10"))
        .keep("summary", Step::wait_for_text("#check-result", "amount"))
        .keep(
            "typed",
            Step::eval_with("(s) => document.querySelector(s).value", json!(expression)),
        )
        .keep("field invalid", Step::attr(&expression, "aria-invalid"))
        .keep(
            "problems at field",
            Step::eval_with(PROBLEMS_AT_FIELD, json!(expression)),
        )
        .keep("step invalid", Step::count(format!("{step}.invalid")))
        .keep(
            "problems at step",
            Step::eval_with(PROBLEMS_OF_FIELDSET, json!(step)),
        )
        .keep(
            "summary links",
            Step::eval(
                "() => Array.from(document.querySelectorAll('#check-result a')).map((a) => a.getAttribute('href'))",
            ),
        )
        .keep("error shot", Step::screenshot(&error_shot))
        .then_all(viewport_shot(&error_top, None))
        .then_all(viewport_shot(&error_view, Some(&step)))
        // Fixed.
        .then_all(type_into(&expression, "action == \"view\""))
        .keep(
            "fixed",
            Step::wait_for_text("#check-result", "finds no problem"),
        )
        .keep("invalid after fix", Step::attr(&expression, "aria-invalid"))
        .keep(
            "problems after fix",
            Step::count("#form-pane .problem, #form-pane .invalid, #form-pane [aria-invalid=true]"),
        )
        .keep(
            "yaml",
            Step::eval("() => document.getElementById('yaml').value"),
        )
        // Try it on sample events, one of them not JSON.
        .then(Step::fill("#events", events))
        .then_all(press_button("button[name=op][value=try]"))
        .keep("try", Step::text("#try-result"))
        .keep("try steps", Step::eval(TRY_STEP_ROWS))
        .keep("try output", Step::text("#try-output"))
        .keep("try dead letters", Step::text("#try-dead-letters"))
        .keep("try shot", Step::screenshot(&try_shot))
        .keep(
            "created yet",
            Step::eval(format!("async () => (await fetch('{detail_path}')).status")),
        )
        // Create: htmx follows the console's redirect to the pipeline's page.
        .then(Step::click("button[name=op][value=apply]"))
        .keep(
            "created",
            Step::wait_for_text("main h1", format!("Pipeline {name}")),
        )
        .keep("created at", Step::eval("() => location.pathname"))
        .run(&browser, &console)
        .await;

    assert_eq!(editor.get("new"), &json!(200));
    assert_eq!(editor.get("chosen"), &json!(["filter"]));
    assert_eq!(
        editor.count("operator added"),
        1,
        "\"Add\" added the filter chosen in \"Add a field to spec.steps[0]\""
    );
    // The contract error: in the summary, which links it, and inline where
    // the checker puts it: at the step (the fieldset marked invalid, the
    // message in it), or at the step's expression field (the input
    // aria-invalid, the message beside it).
    let summary = editor.text("summary");
    assert!(
        summary.contains("1 problem found by the contract checker")
            && summary.contains("spec.steps[0]")
            && summary.contains("amount"),
        "{summary}"
    );
    assert_png(&error_shot);
    assert_png(&error_top);
    assert_png(&error_view);
    assert_eq!(
        editor.get("typed"),
        &json!("amount > 10"),
        "the expression stays as typed"
    );
    let at_field = editor.get("problems at field").to_string();
    let at_step = editor.get("problems at step").to_string();
    let links = editor.get("summary links").to_string();
    let where_shown = format!(
        "the summary: {summary}\nits links: {links}\nmessages at the step: {at_step}\n\
         messages at the expression's field: {at_field}\nthe page: {}",
        error_shot.display()
    );
    let shown_at_step = editor.count("step invalid") == 1
        && at_step.contains("amount")
        && links.contains(&format!("\"{step}\""));
    let shown_at_field = editor.get("field invalid") == &json!("true")
        && at_field.contains("amount")
        && links.contains(&format!("\"{expression}\""));
    assert!(
        shown_at_step || shown_at_field,
        "the problem is not shown inline at the step nor at its field; {where_shown}"
    );
    // Fixed: no problem left anywhere.
    assert!(editor.text("fixed").contains("finds no problem"));
    assert_eq!(editor.get("invalid after fix"), &Value::Null);
    assert_eq!(editor.count("problems after fix"), 0);
    // The YAML half is the form's pipeline.
    let yaml = editor.text("yaml");
    let manifest: Value = serde_yaml_ng::from_str(yaml)
        .unwrap_or_else(|e| panic!("the YAML half does not parse ({e}):\n{yaml}"));
    let expected_spec = json!({
        "source": {
            "topic": source,
            "key": ["session_id"],
            "schema": {"fields": [
                {"name": "session_id", "type": "string"},
                {"name": "user", "type": "string"},
                {"name": "action", "type": "string"},
            ]},
        },
        "steps": [{"name": "views", "filter": {"expression": "action == \"view\""}}],
        "sinks": [{"name": "out", "kafka": {"topic": sink}}],
        "topicDeletionPolicy": "Delete",
    });
    assert_eq!(manifest["metadata"]["name"], json!(name), "{yaml}");
    assert_eq!(
        manifest["metadata"]["namespace"],
        json!(ns.name()),
        "{yaml}"
    );
    assert_eq!(manifest["spec"], expected_spec, "the YAML:\n{yaml}");
    // The try: per step in, out, dropped, dead letters; the output; the
    // line that is not JSON dead-lettered.
    let tried = editor.text("try");
    assert!(tried.contains("Output (2 events)"), "{tried}");
    assert!(tried.contains("Dead letters (1)"), "{tried}");
    let rows: Vec<Vec<String>> = serde_json::from_value(editor.get("try steps").clone())
        .unwrap_or_else(|e| panic!("{e}: {}", editor.get("try steps")));
    assert_eq!(
        rows,
        vec![
            ["source", "4", "3", "0", "1"].map(String::from).to_vec(),
            ["views", "3", "2", "1", "0"].map(String::from).to_vec(),
        ],
        "per step: in, out, dropped, dead letters (the source dead-letters the line that is not JSON, the filter drops the buy)"
    );
    let output = editor.text("try output");
    assert_eq!(output.lines().count(), 2, "{output}");
    assert!(
        output.contains("\"s1\"") && output.contains("\"s3\"") && !output.contains("\"s2\""),
        "{output}"
    );
    assert!(
        editor.text("try dead letters").contains("not json"),
        "{}",
        editor.text("try dead letters")
    );
    assert_png(&try_shot);
    assert_eq!(
        editor.get("created yet"),
        &json!(404),
        "checking and trying created nothing"
    );
    // Created, as the form built it, by the console's server-side apply.
    assert_eq!(editor.text("created at"), detail_path);
    let created = ns.api::<Pipeline>().get(name).await.expect("the pipeline");
    let spec = serde_json::to_value(&created.spec).unwrap();
    // The API server's defaults come on top of what the form set.
    assert!(
        includes(&spec, &expected_spec),
        "the created spec lacks what the form set: {expected_spec:#}\nin {spec:#}"
    );
    let managers = console_support::field_managers(&created.metadata);
    assert!(
        managers.contains(&"keystone-console".to_owned()),
        "{managers:?}"
    );

    // It runs: the operator starts the runtime pods.
    wait_phase(&ns, name, "Running", &operator).await;
    let pipeline_shot = shot("console-pipeline-full.png");
    let pipeline_view = shot("console-pipeline.png");
    let detail = console.url(&detail_path);
    let page = Script::new()
        .then_all(sign_in(&console, &token))
        .keep("status", Step::goto(&detail))
        .keep("phase", Step::wait_for_text("main h1 .badge", "Running"))
        .keep(
            "graph",
            Step::eval(
                "() => { const svg = document.querySelector('.graph svg[role=img]');
                  return svg && { title: document.getElementById(svg.getAttribute('aria-labelledby')).textContent,
                                  text: svg.textContent, nodes: svg.querySelectorAll('g.node').length }; }",
            ),
        )
        .keep(
            "plan text",
            Step::eval("() => document.querySelector('.graph + details').textContent"),
        )
        .keep("pipeline shot", Step::screenshot(&pipeline_shot))
        .then_all(viewport_shot(&pipeline_view, None))
        // Suspend: the form posts, the console patches, the page comes back.
        .then(mark_page())
        .then(Step::click(action_button("suspend")))
        .keep(
            "resume",
            Step::wait_for_text(fresh(&action_button("resume")), "Resume"),
        )
        .keep("suspend buttons", Step::count(action_button("suspend")))
        .run(&browser, &console)
        .await;
    assert_eq!(page.get("status"), &json!(200));
    let graph = page.get("graph");
    assert_eq!(
        graph["title"],
        json!(format!("The plan of {name}")),
        "{graph}"
    );
    let drawn = graph["text"].as_str().unwrap_or_default();
    assert!(drawn.contains("views (filter)"), "the plan graph: {drawn}");
    assert!(
        graph["nodes"].as_u64().unwrap_or(0) >= 4,
        "source, stage, sink, dead letters: {graph}"
    );
    let plan = page.text("plan text");
    assert!(
        plan.contains(&source) && plan.contains(&format!("kafka: {sink}")),
        "the plan as text: {plan}"
    );
    assert_png(&pipeline_shot);
    assert_png(&pipeline_view);
    assert_eq!(page.count("suspend buttons"), 0);
    let suspended = ns.api::<Pipeline>().get(name).await.unwrap();
    assert_eq!(state_of(&suspended), json!("Suspended"));
    assert_eq!(suspended.spec.checkpoint_trigger, None);
    // The operator stops the pods before the pipeline is resumed.
    wait_phase(&ns, name, "Suspended", &operator).await;

    // Resume, then "Checkpoint now".
    let asked_at = chrono::Utc::now().timestamp();
    let actions = Script::new()
        .then_all(sign_in(&console, &token))
        .then(Step::goto(&detail))
        .then(mark_page())
        .then(Step::click(action_button("resume")))
        .keep(
            "suspend",
            Step::wait_for_text(fresh(&action_button("suspend")), "Suspend"),
        )
        .then(mark_page())
        .then(Step::click(action_button("checkpoint")))
        .then(Step::wait_for(
            fresh(&action_button("checkpoint")),
            State::Visible,
        ))
        .keep("after checkpoint", Step::eval("() => location.pathname"))
        .run(&browser, &console)
        .await;
    assert!(actions.text("suspend").contains("Suspend"));
    assert_eq!(actions.text("after checkpoint"), detail_path);
    let resumed = ns.api::<Pipeline>().get(name).await.unwrap();
    assert_eq!(state_of(&resumed), json!("Running"));
    let trigger = resumed
        .spec
        .checkpoint_trigger
        .as_deref()
        .expect("\"Checkpoint now\" set spec.checkpointTrigger");
    let trigger: i64 = trigger
        .parse()
        .unwrap_or_else(|e| panic!("checkpointTrigger {trigger:?}: {e}"));
    assert!(
        (asked_at - 5..=chrono::Utc::now().timestamp() + 5).contains(&trigger),
        "checkpointTrigger {trigger} is not the time of the click ({asked_at})"
    );

    // The list, with the pipeline running again.
    wait_phase(&ns, name, "Running", &operator).await;
    let list_shot = shot("console-pipelines.png");
    let list = Script::new()
        .then_all(sign_in(&console, &token))
        .then(Step::goto(
            console.url(&format!("/pipelines?namespace={}", ns.name())),
        ))
        .keep(
            "row",
            Step::text(format!("#pipelines tr:has(a[href='{detail_path}'])")),
        )
        .keep(
            "phase",
            Step::text(format!("#pipelines tr:has(a[href='{detail_path}']) .badge")),
        )
        .keep("list shot", Step::screenshot(&list_shot))
        .run(&browser, &console)
        .await;
    assert!(list.text("row").contains(name), "{}", list.text("row"));
    assert_eq!(list.text("phase"), "Running");
    assert_png(&list_shot);
    drop(operator);
}

#[tokio::test]
async fn a_viewer_sees_no_controls_and_a_post_made_anyway_is_refused() {
    let Some(browser) = Browser::require() else {
        return;
    };
    let browser = browser.with_timeout(SCRIPT_TIMEOUT);
    let (tb, ns) = world("console-browser-view").await;
    let token = user(&tb, &ns, "vic", "view").await;
    let name = "watched";
    apply_yaml(
        &tb,
        &pipeline_yaml(
            ns.name(),
            name,
            "e2e.console.bv.in",
            "e2e.console.bv.out",
            2,
            "Delete",
        ),
    )
    .await;
    let before = ns.api::<Pipeline>().get(name).await.unwrap();
    let console = Console::start(&tb).await;
    let detail_path = format!("/pipelines/{}/{name}", ns.name());
    let post_anyway = format!(
        "async () => {{
            const csrf = document.querySelector('[name=_csrf]').value;
            const answer = await fetch('{detail_path}/actions/suspend', {{
                method: 'POST',
                headers: {{'Content-Type': 'application/x-www-form-urlencoded'}},
                body: '_csrf=' + encodeURIComponent(csrf),
            }});
            const page = new DOMParser().parseFromString(await answer.text(), 'text/html');
            return {{ status: answer.status, text: page.querySelector('main').innerText }};
        }}"
    );
    let viewer = Script::new()
        .then_all(sign_in(&console, &token))
        .then(Step::goto(
            console.url(&format!("/pipelines?namespace={}", ns.name())),
        ))
        .keep("row", Step::wait_for_text("#pipelines a", name))
        .keep(
            "new pipeline links",
            Step::count("a[href^='/pipelines/new']"),
        )
        .keep("new pipeline texts", Step::count("text=New pipeline"))
        .then(Step::goto(console.url(&detail_path)))
        .keep(
            "title",
            Step::wait_for_text("main h1", format!("Pipeline {name}")),
        )
        .keep("plan", Step::count(".graph svg"))
        .keep("action forms", Step::count("form[action*='/actions/']"))
        .keep("edit links", Step::count("a[href$='/edit']"))
        .keep(
            "controls",
            Step::eval(
                "() => Array.from(document.querySelectorAll('main button, main a, main input'))
                    .map((el) => el.innerText || el.value || '')",
            ),
        )
        .keep("csrf fields", Step::count("[name=_csrf]"))
        .keep("post", Step::eval(&post_anyway))
        .then(Step::goto(console.url(&format!("{detail_path}/edit"))))
        .keep(
            "editor note",
            Step::wait_for_text("#editor .note", "You may not change Pipelines"),
        )
        .keep(
            "apply buttons",
            Step::count("button[name=op][value^=apply]"),
        )
        .run(&browser, &console)
        .await;

    assert!(viewer.text("row").contains(name));
    assert_eq!(viewer.count("new pipeline links"), 0);
    assert_eq!(viewer.count("new pipeline texts"), 0);
    assert_eq!(
        viewer.count("plan"),
        1,
        "the viewer sees the pipeline's page"
    );
    assert_eq!(
        viewer.count("action forms"),
        0,
        "no action form for a viewer"
    );
    assert_eq!(viewer.count("edit links"), 0);
    let controls = viewer.get("controls").to_string();
    for control in ["Suspend", "Resume", "Checkpoint now", "Edit", "Roll back"] {
        assert!(
            !controls.contains(control),
            "a viewer has {control}: {controls}"
        );
    }
    // The sign-out form's token: the POST below is not refused for CSRF.
    assert_eq!(viewer.count("csrf fields"), 1);
    let post = viewer.get("post");
    assert_eq!(post["status"], json!(403), "{post}");
    let refusal = post["text"].as_str().unwrap_or_default();
    assert!(
        refusal.contains("Kubernetes does not allow") && refusal.contains("cannot patch"),
        "refused by the API server, not by the console: {refusal}"
    );
    assert_eq!(viewer.count("apply buttons"), 0);
    let after = ns.api::<Pipeline>().get(name).await.unwrap();
    assert_eq!(state_of(&after), json!("Running"));
    assert_eq!(
        serde_json::to_value(&after.spec).unwrap(),
        serde_json::to_value(&before.spec).unwrap(),
        "the viewer's POST changed the pipeline"
    );
    assert_eq!(after.metadata.generation, before.metadata.generation);
}

/// The named controls a Tab walk reached, as "role name" (for messages).
fn names(order: &[Focused]) -> Vec<String> {
    order
        .iter()
        .map(|f| format!("{} {:?}", f.role.as_deref().unwrap_or(&f.tag), f.name))
        .collect()
}

/// Every control Tab reached has an accessible name.
fn assert_named(page: &str, order: &[Focused]) {
    assert!(
        order.len() >= 5,
        "{page}: only {} controls reached with Tab: {order:#?}",
        order.len()
    );
    let unnamed: Vec<&Focused> = order.iter().filter(|f| f.name.trim().is_empty()).collect();
    assert!(
        unnamed.is_empty(),
        "{page}: controls without an accessible name: {unnamed:#?}"
    );
}

/// No two buttons Tab reaches have the same name: each says what it acts on.
fn assert_buttons_distinct(page: &str, order: &[Focused]) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for f in order.iter().filter(|f| f.role.as_deref() == Some("button")) {
        *seen.entry(f.name.as_str()).or_default() += 1;
    }
    let mut same: Vec<(&str, usize)> = seen.into_iter().filter(|(_, n)| *n > 1).collect();
    same.sort();
    assert!(
        same.is_empty(),
        "{page}: buttons of the same name (name, how many): {same:?}"
    );
}

/// Where the control of this role and name comes in the Tab order.
fn reached(page: &str, order: &[Focused], role: &str, name: &str) -> usize {
    order
        .iter()
        .position(|f| f.role.as_deref() == Some(role) && f.name == name)
        .unwrap_or_else(|| {
            panic!(
                "{page}: the {role} {name:?} is not reached with Tab; reached: {:#?}",
                names(order)
            )
        })
}

fn assert_labelled(page: &str, result: &Value, at_least: u64) {
    let looked_at = result["fields"].as_u64().unwrap_or(0);
    assert!(
        looked_at >= at_least,
        "{page}: only {looked_at} fields: {result}"
    );
    assert_eq!(
        result["unlabelled"],
        json!([]),
        "{page}: fields without a label"
    );
}

fn assert_controls_named(page: &str, result: &Value) {
    assert!(
        result["controls"].as_u64().unwrap_or(0) > 0,
        "{page}: {result}"
    );
    assert_eq!(
        result["unnamed"],
        json!([]),
        "{page}: buttons or links without a name"
    );
    assert_eq!(
        result["label_not_in_name"],
        json!([]),
        "{page}: buttons or links whose name does not contain their visible text"
    );
}

#[tokio::test]
async fn every_control_is_reached_with_tab_and_has_a_name() {
    let Some(browser) = Browser::require() else {
        return;
    };
    let browser = browser.with_timeout(SCRIPT_TIMEOUT);
    let (tb, ns) = world("console-browser-keys").await;
    let token = user(&tb, &ns, "kim", "edit").await;
    let name = "keys";
    apply_yaml(
        &tb,
        &pipeline_yaml(
            ns.name(),
            name,
            "e2e.console.bk.in",
            "e2e.console.bk.out",
            2,
            "Delete",
        ),
    )
    .await;
    let console = Console::start(&tb).await;
    let detail_path = format!("/pipelines/{}/{name}", ns.name());
    let keys = Script::new()
        .then_all(sign_in(&console, &token))
        // The list.
        .then(Step::goto(
            console.url(&format!("/pipelines?namespace={}", ns.name())),
        ))
        .then(Step::wait_for_text("#pipelines a", name))
        .keep("list order", Step::focus_order(25))
        .keep("list fields", Step::eval(UNLABELLED_FIELDS))
        .keep("list controls", Step::eval(UNNAMED_CONTROLS))
        // The pipeline's page.
        .then(Step::goto(console.url(&detail_path)))
        .then(Step::wait_for_text("main h1", format!("Pipeline {name}")))
        .keep("detail order", Step::focus_order(25))
        .keep("detail controls", Step::eval(UNNAMED_CONTROLS))
        // The editor, new and on the pipeline (with a dedup step and the
        // folded settings).
        .then(Step::goto(
            console.url(&format!("/pipelines/new?namespace={}", ns.name())),
        ))
        .then(Step::wait_for("#editor", State::Visible))
        .keep("new order", Step::focus_order(100))
        .keep("new fields", Step::eval(UNLABELLED_FIELDS))
        .keep("new controls", Step::eval(UNNAMED_CONTROLS))
        .then(Step::goto(console.url(&format!("{detail_path}/edit"))))
        .then(Step::wait_for("#editor", State::Visible))
        .keep("edit order", Step::focus_order(120))
        .keep("edit fields", Step::eval(UNLABELLED_FIELDS))
        .keep("edit controls", Step::eval(UNNAMED_CONTROLS))
        .run(&browser, &console)
        .await;

    let list = keys.focus_order("list order");
    assert_named("the list", &list);
    assert_eq!(
        (list[0].role.as_deref(), list[0].name.as_str()),
        (Some("link"), "Skip to content"),
        "the first Tab stop skips to the content"
    );
    let sign_out = reached("the list", &list, "button", "Sign out");
    let new = reached("the list", &list, "link", "New pipeline");
    let row = reached("the list", &list, "link", name);
    assert!(
        sign_out < new && new < row,
        "the list's Tab order: {:#?}",
        names(&list)
    );
    assert_labelled("the list", keys.get("list fields"), 1);
    assert_controls_named("the list", keys.get("list controls"));

    let detail = keys.focus_order("detail order");
    assert_named("the pipeline's page", &detail);
    reached("the pipeline's page", &detail, "button", "Sign out");
    let edit = reached("the pipeline's page", &detail, "link", "Edit");
    let suspend = reached("the pipeline's page", &detail, "button", "Suspend");
    let checkpoint = reached("the pipeline's page", &detail, "button", "Checkpoint now");
    assert!(
        edit < suspend && suspend < checkpoint,
        "{:#?}",
        names(&detail)
    );
    assert_controls_named("the pipeline's page", keys.get("detail controls"));

    let new = keys.focus_order("new order");
    assert_named("the new-pipeline editor", &new);
    reached("the new-pipeline editor", &new, "button", "Sign out");
    let name_field = reached("the new-pipeline editor", &new, "textbox", "Name");
    let yaml = reached("the new-pipeline editor", &new, "textbox", "YAML");
    let create = reached("the new-pipeline editor", &new, "button", "Create");
    let events = reached("the new-pipeline editor", &new, "textbox", "Sample events");
    let run = reached("the new-pipeline editor", &new, "button", "Run the sample");
    assert!(
        name_field < yaml && yaml < create && create < events && events < run,
        "the editor's Tab order: {:#?}",
        names(&new)
    );
    assert_buttons_distinct("the new-pipeline editor", &new);
    assert_labelled("the new-pipeline editor", keys.get("new fields"), 15);
    assert_controls_named("the new-pipeline editor", keys.get("new controls"));

    let edit = keys.focus_order("edit order");
    assert_named("the pipeline's editor", &edit);
    reached("the pipeline's editor", &edit, "button", "Apply changes");
    reached("the pipeline's editor", &edit, "button", "Run the sample");
    assert_buttons_distinct("the pipeline's editor", &edit);
    assert_labelled("the pipeline's editor", keys.get("edit fields"), 15);
    assert_controls_named("the pipeline's editor", keys.get("edit controls"));
}
