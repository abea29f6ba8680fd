//! The chart's Grafana dashboard (`helm/keystone/dashboards/keystone.json`)
//! queries only what the binaries export: every metric and label name of
//! every PromQL expression and template variable is checked against the
//! `/metrics` of really running processes (a runtime stage with a Kafka and
//! a search sink, `keystone-runtime ingest` in front of it, the operator),
//! after traffic and failures that make their labelled series exist. And the
//! chart ships it as a ConfigMap for Grafana's sidecar only when asked.
//!
//! The chart's alerts (`templates/prometheusrule.yaml`, rendered with
//! `alerts.enabled=true`) get the same check of their expressions against the
//! same scrapes, a PrometheusRule only when asked, and a runbook link to a
//! section of `docs/alerts.md` each.
//!
//! Needs `cargo build -p keystone-runtime -p keystone-operator` and a running
//! testbed; the parsing tests need neither.

mod operator_support;
mod runtime_support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keystone_crds::pipeline::http::HttpSourceSpec;
use operator_support::{
    OperatorProcess, apply_yaml, install_crds, operator_binary, operator_namespace,
    pipeline_namespace, pipeline_yaml, repo, run_with_stdin, testbed,
};
use runtime_support::{Harness, free_port, http_request, runtime_binary};
use serde::Deserialize;
use serde_json::Value;

// ---------------------------------------------------------------------------
// The dashboard's queries, and what they name
// ---------------------------------------------------------------------------

fn dashboard_path() -> std::path::PathBuf {
    repo().join("helm/keystone/dashboards/keystone.json")
}

fn dashboard() -> Value {
    let path = dashboard_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One query of the dashboard: a panel's PromQL, or a template variable's
/// `label_values(selector, label)`.
#[derive(Debug)]
struct Query {
    /// Where it is, for messages.
    place: String,
    expr: String,
    /// The label a `label_values` variable lists.
    lists: Option<String>,
}

/// Every query of every panel (rows' nested panels included) and variable.
fn queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "a target without expr: {panel}");
            out.push(Query {
                place: format!(
                    "panel {:?} query {}",
                    panel["title"].as_str().unwrap_or_default(),
                    target["refId"].as_str().unwrap_or_default()
                ),
                expr: expr.to_owned(),
                lists: None,
            });
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
            .unwrap_or_default();
        let place = format!("variable {}", variable["name"].as_str().unwrap_or_default());
        let inner = query
            .trim()
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{place}: not label_values(selector, label): {query}"));
        let (selector, label) = inner
            .rsplit_once(',')
            .unwrap_or_else(|| panic!("{place}: label_values without a label: {query}"));
        out.push(Query {
            place,
            expr: selector.to_owned(),
            lists: Some(label.trim().to_owned()),
        });
    }
    out
}

/// What one PromQL expression names: each metric with the labels its
/// selectors match on, and the labels of its `by`/`without`/`on`/`ignoring`
/// clauses.
#[derive(Debug, Default, PartialEq)]
struct Names {
    metrics: BTreeMap<String, BTreeSet<String>>,
    grouping: BTreeSet<String>,
}

/// Words that are neither metrics nor functions.
const KEYWORDS: [&str; 7] = ["bool", "offset", "and", "or", "unless", "inf", "nan"];
/// Modifiers followed by a list of label names.
const LABEL_LISTS: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The index just past a string literal starting at `start`.
fn past_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' && quote != '`' {
            2
        } else {
            1
        };
    }
    i + 1
}

/// The index of the `close` that ends what starts at `start`, strings skipped.
fn closing(chars: &[char], start: usize, close: char) -> usize {
    let mut i = start + 1;
    while i < chars.len() && chars[i] != close {
        i = if matches!(chars[i], '"' | '\'' | '`') {
            past_string(chars, i)
        } else {
            i + 1
        };
    }
    assert!(
        i < chars.len(),
        "unclosed {close:?} in {:?}",
        String::from_iter(chars)
    );
    i
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The label names of a selector's matchers (`a="x", b=~"y"`).
fn matcher_labels(chars: &[char]) -> Vec<String> {
    let mut labels = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if is_name_start(chars[i]) {
            let start = i;
            while i < chars.len() && is_name_char(chars[i]) {
                i += 1;
            }
            labels.push(String::from_iter(&chars[start..i]));
            // The operator and the value, up to the next matcher.
            while i < chars.len() && chars[i] != ',' {
                i = if matches!(chars[i], '"' | '\'' | '`') {
                    past_string(chars, i)
                } else {
                    i + 1
                };
            }
        }
        i += 1;
    }
    labels
}

/// The metric and label names of a PromQL expression. Grafana's variables
/// (`$__rate_interval`, `$pipeline`) are skipped: they stand in ranges and
/// label values only.
fn names(expr: &str) -> Names {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Names::default();
    // The metric just read, whose selector may follow.
    let mut metric: Option<String> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let mut last = None;
        if matches!(c, '"' | '\'' | '`') {
            i = past_string(&chars, i);
        } else if c == '[' {
            i = closing(&chars, i, ']') + 1;
        } else if c == '{' {
            let end = closing(&chars, i, '}');
            let of = metric
                .clone()
                .unwrap_or_else(|| panic!("a selector without a metric name in {expr}"));
            out.metrics
                .entry(of)
                .or_default()
                .extend(matcher_labels(&chars[i + 1..end]));
            i = end + 1;
        } else if c.is_ascii_digit() || c == '.' || c == '$' {
            // A number, a duration, or a Grafana variable.
            i += 1;
            while i < chars.len() && (is_name_char(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if is_name_start(c) {
            let start = i;
            while i < chars.len() && is_name_char(chars[i]) {
                i += 1;
            }
            let word = String::from_iter(&chars[start..i]);
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            // A function, or an aggregation whose clause comes first (`sum by (l) (...)`).
            let following =
                String::from_iter(chars[next..].iter().take_while(|c| is_name_char(**c)));
            let call =
                chars.get(next) == Some(&'(') || matches!(following.as_str(), "by" | "without");
            if LABEL_LISTS.contains(&word.as_str()) {
                if call {
                    let end = closing(&chars, next, ')');
                    out.grouping.extend(
                        String::from_iter(&chars[next + 1..end])
                            .split(',')
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_owned),
                    );
                    i = end + 1;
                }
            } else if !call && !KEYWORDS.contains(&word.as_str()) {
                out.metrics.entry(word.clone()).or_default();
                last = Some(word);
            }
        } else {
            i += 1;
        }
        metric = last;
    }
    out
}

// ---------------------------------------------------------------------------
// What the binaries export, and the check
// ---------------------------------------------------------------------------

/// The sample names of a Prometheus text exposition, each with the label
/// names its series carry (histograms: `_bucket`, `_sum`, `_count`).
fn exposition(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        let end = chars
            .iter()
            .position(|c| !is_name_char(*c))
            .unwrap_or(chars.len());
        let labels = out.entry(String::from_iter(&chars[..end])).or_default();
        if chars.get(end) == Some(&'{') {
            let close = closing(&chars, end, '}');
            labels.extend(matcher_labels(&chars[end + 1..close]));
        }
    }
    out
}

/// Labels Prometheus adds to every series of a Kubernetes pod target (a
/// PodMonitor's or a ServiceMonitor's); the binaries cannot export them.
const TARGET_LABELS: [&str; 2] = ["namespace", "pod"];

/// What the dashboard asks for that no scrape has: each problem names the
/// query, the metric or label, and the scrapes looked at.
fn problems(
    queries: &[Query],
    scrapes: &[(&str, BTreeMap<String, BTreeSet<String>>)],
) -> Vec<String> {
    let sources = scrapes
        .iter()
        .map(|(s, _)| *s)
        .collect::<Vec<_>>()
        .join(", ");
    let mut problems = Vec::new();
    for query in queries {
        let names = names(&query.expr);
        if names.metrics.is_empty() {
            problems.push(format!("{}: no metric in {}", query.place, query.expr));
        }
        let mut known: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
        let mut missing = false;
        for (metric, matched) in &names.metrics {
            let exported: Vec<&BTreeSet<String>> =
                scrapes.iter().filter_map(|(_, e)| e.get(metric)).collect();
            if exported.is_empty() {
                problems.push(format!(
                    "{}: metric {metric} is exported by none of {sources}",
                    query.place
                ));
                missing = true;
                continue;
            }
            let labels: BTreeSet<&str> = exported
                .iter()
                .flat_map(|l| l.iter().map(String::as_str))
                .chain(TARGET_LABELS)
                .collect();
            for label in matched.iter().filter(|l| !labels.contains(l.as_str())) {
                problems.push(format!(
                    "{}: {metric} has no label {label} (it has {labels:?})",
                    query.place
                ));
            }
            known.extend(labels);
        }
        // With a metric missing, its labels are unknown: that problem is enough.
        let asked = names.grouping.iter().chain(&query.lists);
        for label in asked.filter(|l| !missing && !known.contains(l.as_str())) {
            problems.push(format!(
                "{}: label {label} is on none of its metrics {:?}",
                query.place,
                names.metrics.keys().collect::<Vec<_>>()
            ));
        }
    }
    problems
}

#[test]
fn promql_names_are_read_whole_and_strings_ranges_and_variables_are_not_names() {
    let expr = r#"histogram_quantile(0.99, sum by (pipeline, le) (rate(keystone_x_seconds_bucket{namespace=~"$namespace", reason=~"a,b}"}[$__rate_interval] offset 5m))) / on (pipeline) group_left max without (stage) (keystone_y)"#;
    assert_eq!(
        names(expr),
        Names {
            metrics: BTreeMap::from([
                (
                    "keystone_x_seconds_bucket".to_owned(),
                    BTreeSet::from(["namespace".to_owned(), "reason".to_owned()])
                ),
                ("keystone_y".to_owned(), BTreeSet::new()),
            ]),
            grouping: ["pipeline", "le", "stage"]
                .map(str::to_owned)
                .into_iter()
                .collect(),
        }
    );
}

#[test]
fn a_wrong_metric_or_label_name_is_a_named_problem() {
    let scrape = exposition(
        "# TYPE keystone_d_seconds histogram\n\
         keystone_d_seconds_bucket{stage=\"s0\",le=\"0.1\"} 1\n\
         keystone_d_seconds_count{stage=\"s0\"} 1\n\
         keystone_c_total{reason=\"a, b\",stage=\"s0\"} 3\n",
    );
    let query = |expr: &str| Query {
        place: "p".to_owned(),
        expr: expr.to_owned(),
        lists: None,
    };
    let good = [
        query(r#"sum by (stage, pod) (rate(keystone_c_total{reason="x", namespace="n"}[5m]))"#),
        query("histogram_quantile(0.5, sum by (le) (rate(keystone_d_seconds_bucket[5m])))"),
    ];
    assert_eq!(
        problems(&good, &[("s", scrape.clone())]),
        Vec::<String>::new()
    );
    let bad = [
        query("rate(keystone_c_totals[5m])"),
        query("histogram_quantile(0.5, rate(keystone_d_seconds[5m]))"),
        query(r#"rate(keystone_c_total{step="x"}[5m])"#),
        query("sum by (sink) (rate(keystone_c_total[5m]))"),
    ];
    let found = problems(&bad, &[("s", scrape)]).join("\n");
    for expected in [
        "metric keystone_c_totals is exported by none of s",
        "metric keystone_d_seconds is exported by none of s",
        "keystone_c_total has no label step",
        "label sink is on none of its metrics",
    ] {
        assert!(found.contains(expected), "{expected:?} not in:\n{found}");
    }
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_of_a_prometheus_datasource_variable() {
    let dashboard = dashboard();
    assert_eq!(dashboard["uid"], "keystone-overview");
    let variables: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or_default(), v))
        .collect();
    assert_eq!(variables["datasource"]["type"], "datasource");
    assert_eq!(variables["datasource"]["query"], "prometheus");
    for name in ["namespace", "pipeline"] {
        assert_eq!(variables[name]["type"], "query", "{name}");
        assert_eq!(variables[name]["datasource"]["uid"], "${datasource}");
    }
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<i64> = panels.iter().filter_map(|p| p["id"].as_i64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = &panel["title"];
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let grid = &panel["gridPos"];
        let right = grid["x"].as_i64().unwrap_or(99) + grid["w"].as_i64().unwrap_or(99);
        assert!(right <= 24, "{title} is wider than the grid");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
}

// ---------------------------------------------------------------------------
// The binaries, running
// ---------------------------------------------------------------------------

/// A stage that filters (drops), with a Kafka sink and a search sink on
/// `search`, where nothing listens: its writes stay pending, so a
/// checkpoint's commit fails once records reach it.
fn stage_manifest(name: &str, search: &str) -> String {
    format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: {name}, namespace: e2e}}
spec:
  source:
    topic: e2e.{name}
    key: [user]
    schema:
      fields:
        - {{name: user, type: string}}
        - {{name: amount, type: integer}}
  steps:
    - name: positive
      filter: {{expression: 'amount > 0'}}
  sinks:
    - name: out
      kafka: {{topic: e2e.{name}.out, partitions: 1}}
    - name: search
      elasticsearch: {{endpoint: '{search}', index: {name}, idFields: [user]}}
  # Pinned: a checkpoint waits for the sinks within the transaction's patience.
  delivery: ExactlyOnce
  commitInterval: 200ms
"#
    )
}

/// `keystone-runtime ingest` serving the harness's plan, killed when dropped.
struct Ingest {
    child: Child,
    port: u16,
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ingest {
    /// An endpoint at `/events` writing the plan's source topic, with one
    /// token, `mobile`.
    fn start(h: &mut Harness) -> Self {
        // From JSON, as a manifest gives it: the fields not named take their defaults.
        let spec: HttpSourceSpec = serde_json::from_value(serde_json::json!({
            "path": "/events",
            "tokensSecret": "unused-here",
            "partitions": 2,
        }))
        .expect("an http source");
        h.plan.ingest = Some(spec);
        std::fs::write(&h.plan_path, serde_json::to_vec_pretty(&h.plan).unwrap()).unwrap();
        let tokens = h.dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        std::fs::write(tokens.join("mobile"), "tok-mobile\n").unwrap();
        let port = free_port();
        let log = std::fs::File::create(h.dir.join("ingest.log")).unwrap();
        let child = Command::new(runtime_binary())
            .arg("ingest")
            .arg("--plan")
            .arg(&h.plan_path)
            .arg("--tokens-dir")
            .arg(&tokens)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("KAFKA_BOOTSTRAP_SERVERS", &h.bootstrap)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("the ingest endpoint starts");
        let ingest = Ingest { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_request(port, "GET", "/healthz").0 != 200 {
            assert!(
                Instant::now() < deadline,
                "the ingest endpoint did not come up; see {}",
                h.dir.join("ingest.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ingest
    }

    async fn post(&self, token: Option<&str>, body: &str) -> u16 {
        let mut request = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
            .post(format!("http://127.0.0.1:{}/events", self.port))
            .header("content-type", "application/x-ndjson")
            .body(body.to_owned());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.expect("an answer").status().as_u16()
    }
}

/// Polls `scrape` until it has a sample line starting with `prefix`.
fn wait_for_sample(what: &str, prefix: &str, within: Duration, scrape: impl Fn() -> String) {
    let deadline = Instant::now() + within;
    loop {
        let text = scrape();
        if text.lines().any(|l| l.starts_with(prefix)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no {prefix} within {within:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_metric_and_label_the_dashboard_and_the_alerts_query_is_exported_by_a_running_binary()
{
    let queries = queries(&dashboard());
    let tb = testbed().await;
    let alerts: Vec<Query> = alert_rules(&helm_template(&tb, &["--set", "alerts.enabled=true"]))
        .into_iter()
        .map(alert_query)
        .collect();
    assert!(!alerts.is_empty(), "alerts.enabled=true rendered no alert");
    operator_binary();
    install_crds(&tb);

    // The operator, with a Kafka that is not there: its reconcile of a
    // Pipeline fails (after its Kafka timeout), so failures have series too.
    let ns = pipeline_namespace(&tb, "dashboard").await;
    let op_ns = operator_namespace(&tb, &ns).await;
    let operator = OperatorProcess::start_with(
        &tb,
        ns.name(),
        op_ns.name(),
        "op-dashboard",
        &[("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")],
    );
    let manifest = pipeline_yaml(
        ns.name(),
        "stranded",
        "e2e.nowhere",
        "e2e.nowhere.out",
        1,
        "Retain",
    );
    apply_yaml(&tb, &manifest).await;

    // A stage, and the ingest endpoint writing its source topic.
    let name = runtime_support::unique("dashboard");
    let search = format!("http://127.0.0.1:{}", free_port());
    let mut h = Harness::new(&name, &stage_manifest(&name, &search), 2).await;
    let ingest = Ingest::start(&mut h);
    h.start("i0", &[]);
    h.wait_for_partitions(&["i0"]);
    // Nothing is written yet, so the sinks are ready: the checkpoint commits
    // every partition at its start, and the stage reports lag from there.
    let (status, body) = h.http("i0", "POST", "/checkpoint");
    assert_eq!(status, 200, "{body}; see {}", h.log("i0"));
    let records = "{\"user\":\"a\",\"amount\":1}\n{\"user\":\"b\",\"amount\":-1}\n";
    assert_eq!(ingest.post(Some("tok-mobile"), records).await, 200);
    let off_schema = "{\"user\":\"c\",\"amount\":\"x\"}\n";
    assert_eq!(ingest.post(Some("tok-mobile"), off_schema).await, 422);
    assert_eq!(ingest.post(None, records).await, 401);
    let deadline = Instant::now() + Duration::from_secs(60);
    while h.metric("i0", "keystone_step_events_out_total") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the stage processed nothing; see {}",
            h.log("i0")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The search sink's writes are never answered: a checkpoint's commit
    // waits for them (within the transaction's patience), then fails.
    let (status, body) = h.http("i0", "POST", "/checkpoint");
    assert_ne!(
        status, 200,
        "a checkpoint committed past a pending sink: {body}"
    );
    wait_for_sample(
        "the stage",
        "keystone_commit_failures_total{",
        Duration::from_secs(10),
        || h.http("i0", "GET", "/metrics").1,
    );
    wait_for_sample(
        "the operator",
        "keystone_operator_reconcile_failures_total{",
        Duration::from_secs(120),
        || {
            let out = Command::new("curl")
                .args([
                    "-sf",
                    &format!("http://127.0.0.1:{}/metrics", operator.metrics_port),
                ])
                .output()
                .expect("curl");
            String::from_utf8_lossy(&out.stdout).into_owned()
        },
    );

    let scrapes = [
        (
            "the runtime stage",
            exposition(&h.http("i0", "GET", "/metrics").1),
        ),
        (
            "the ingest endpoint",
            exposition(&http_request(ingest.port, "GET", "/metrics").1),
        ),
        ("the operator", exposition(&operator.metrics().await)),
    ];
    let found = problems(&queries, &scrapes);
    assert!(
        found.is_empty(),
        "the dashboard asks for what the binaries do not export:\n{}",
        found.join("\n")
    );
    let found = problems(&alerts, &scrapes);
    assert!(
        found.is_empty(),
        "the alerts ask for what the binaries do not export:\n{}",
        found.join("\n")
    );
    // Each binary's metrics are on the dashboard (and its scrape was read).
    for (source, exported) in &scrapes {
        let used = queries
            .iter()
            .flat_map(|q| names(&q.expr).metrics.into_keys())
            .filter(|m| exported.contains_key(m))
            .count();
        assert!(used > 0, "no query of the dashboard reads {source}");
    }
    ns.delete().await.expect("delete namespace");
}

// ---------------------------------------------------------------------------
// The chart
// ---------------------------------------------------------------------------

fn helm_template(tb: &keystone_e2e::Testbed, extra: &[&str]) -> Vec<serde_yaml_ng::Value> {
    let out = Command::new(tb.helm().expect("helm"))
        .args([
            "template",
            "ks",
            &repo().join("helm/keystone").display().to_string(),
        ])
        .args(["--namespace", "keystone-system", "--skip-crds"])
        .args(extra)
        .output()
        .expect("helm template");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm template {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde_yaml_ng::Value::deserialize(doc).expect("YAML"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn dashboard_config_maps(docs: &[serde_yaml_ng::Value]) -> Vec<&serde_yaml_ng::Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some("ConfigMap"))
        .filter(|d| d["metadata"]["name"].as_str() == Some("ks-keystone-dashboards"))
        .collect()
}

#[tokio::test]
async fn the_chart_ships_the_dashboard_config_map_only_when_enabled() {
    let tb = testbed().await;
    let by_default = helm_template(&tb, &[]);
    assert!(!by_default.is_empty(), "the chart rendered nothing");
    assert!(
        dashboard_config_maps(&by_default).is_empty(),
        "a dashboard ConfigMap without dashboards.enabled"
    );

    // In the release's namespace unless told otherwise.
    let in_release = helm_template(&tb, &["--set", "dashboards.enabled=true"]);
    let found = dashboard_config_maps(&in_release);
    assert_eq!(found.len(), 1, "{in_release:?}");
    assert_eq!(
        found[0]["metadata"]["namespace"].as_str(),
        Some("keystone-system")
    );

    let ns = pipeline_namespace(&tb, "helm-dashboard").await;
    let enabled = helm_template(
        &tb,
        &[
            "--set",
            "dashboards.enabled=true",
            "--set",
            &format!("dashboards.namespace={}", ns.name()),
            "--set",
            "dashboards.annotations.grafana_folder=Keystone",
        ],
    );
    let found = dashboard_config_maps(&enabled);
    assert_eq!(found.len(), 1, "{enabled:?}");
    let map = found[0];
    let metadata = &map["metadata"];
    assert_eq!(metadata["namespace"].as_str(), Some(ns.name()));
    assert_eq!(metadata["labels"]["grafana_dashboard"].as_str(), Some("1"));
    assert_eq!(
        metadata["labels"]["app.kubernetes.io/part-of"].as_str(),
        Some("keystone")
    );
    assert_eq!(
        metadata["annotations"]["grafana_folder"].as_str(),
        Some("Keystone")
    );
    let shipped: Value = serde_json::from_str(
        map["data"]["keystone.json"]
            .as_str()
            .expect("keystone.json"),
    )
    .expect("the shipped dashboard is JSON");
    assert_eq!(
        shipped,
        dashboard(),
        "the ConfigMap holds {}",
        dashboard_path().display()
    );

    // The API server takes it as it is.
    let mut apply = tb.kubectl().expect("kubectl");
    apply.args(["apply", "--dry-run=server", "-f", "-"]);
    let (ok, text) = run_with_stdin(apply, &serde_yaml_ng::to_string(map).expect("YAML"));
    assert!(
        ok,
        "the API server refused the dashboard ConfigMap:\n{text}"
    );
    ns.delete().await.expect("delete namespace");
}

// ---------------------------------------------------------------------------
// The chart's alerts
// ---------------------------------------------------------------------------

/// The alerts the chart ships, by name: a change of the set is a change of
/// `docs/alerts.md` too.
const ALERTS: [&str; 7] = [
    "KeystoneConsumerLagGrowing",
    "KeystoneDeadLetterRateHigh",
    "KeystoneCommitsFailing",
    "KeystoneBufferFull",
    "KeystoneCheckpointsFailing",
    "KeystonePipelineDegraded",
    "KeystoneOperatorReconcileErrors",
];

fn prometheus_rules(docs: &[serde_yaml_ng::Value]) -> Vec<&serde_yaml_ng::Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some("PrometheusRule"))
        .collect()
}

/// Every rule of every group of every PrometheusRule.
fn alert_rules(docs: &[serde_yaml_ng::Value]) -> Vec<&serde_yaml_ng::Value> {
    prometheus_rules(docs)
        .into_iter()
        .flat_map(|rule| rule["spec"]["groups"].as_sequence().into_iter().flatten())
        .flat_map(|group| group["rules"].as_sequence().into_iter().flatten())
        .collect()
}

fn alert_name(rule: &serde_yaml_ng::Value) -> &str {
    rule["alert"].as_str().unwrap_or_default()
}

fn alert_query(rule: &serde_yaml_ng::Value) -> Query {
    let place = format!("alert {}", alert_name(rule));
    let expr = rule["expr"]
        .as_str()
        .unwrap_or_else(|| panic!("{place} has no expr"));
    Query {
        place,
        expr: expr.to_owned(),
        lists: None,
    }
}

/// The labels a Prometheus template refers to (`{{ $labels.pipeline }}`).
fn template_labels(text: &str) -> BTreeSet<String> {
    text.split("$labels.")
        .skip(1)
        .map(|rest| rest.chars().take_while(|c| is_name_char(*c)).collect())
        .collect()
}

fn alerts_doc_path() -> std::path::PathBuf {
    repo().join("docs/alerts.md")
}

/// The anchors GitHub gives the headings of a Markdown file: lower case,
/// punctuation dropped, spaces as hyphens. A `#` line in a fenced code block
/// (a shell comment) is no heading.
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    let mut fenced = false;
    markdown
        .lines()
        .filter(|l| {
            fenced ^= l.starts_with("```");
            !fenced && l.starts_with('#')
        })
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect()
}

#[test]
fn headings_are_anchored_as_github_anchors_them_and_templates_name_their_labels() {
    let anchors = heading_anchors(
        "# Alerts\n\ntext # not a heading\n```sh\n# a comment\n```\n## KeystoneX\n### Why: it's `on`\n",
    );
    assert_eq!(
        anchors,
        ["alerts", "keystonex", "why-its-on"]
            .map(str::to_owned)
            .into_iter()
            .collect()
    );
    assert_eq!(
        template_labels("{{ $labels.namespace }}/{{$labels.pipeline}} {{ $value }}"),
        ["namespace", "pipeline"]
            .map(str::to_owned)
            .into_iter()
            .collect()
    );
}

#[tokio::test]
async fn the_chart_ships_the_alerts_only_when_enabled() {
    let tb = testbed().await;
    let by_default = helm_template(&tb, &[]);
    assert!(!by_default.is_empty(), "the chart rendered nothing");
    assert!(
        prometheus_rules(&by_default).is_empty(),
        "a PrometheusRule without alerts.enabled"
    );

    let enabled = helm_template(
        &tb,
        &[
            "--set",
            "alerts.enabled=true",
            "--set",
            "alerts.labels.release=prometheus",
            "--set",
            "alerts.consumerLag.threshold=2500",
            "--set",
            "alerts.pipelineDegraded.for=3m",
        ],
    );
    let found = prometheus_rules(&enabled);
    assert_eq!(found.len(), 1, "{enabled:?}");
    let metadata = &found[0]["metadata"];
    assert_eq!(metadata["namespace"].as_str(), Some("keystone-system"));
    // What the Prometheus operator's ruleSelector picks it by.
    assert_eq!(metadata["labels"]["release"].as_str(), Some("prometheus"));
    assert_eq!(
        metadata["labels"]["app.kubernetes.io/part-of"].as_str(),
        Some("keystone")
    );

    let rules = alert_rules(&enabled);
    let rendered: Vec<&str> = rules.iter().map(|r| alert_name(r)).collect();
    assert_eq!(rendered, ALERTS, "the chart's alerts");
    for rule in &rules {
        let name = alert_name(rule);
        let expr = alert_query(rule).expr;
        assert!(
            rule["for"].as_str().is_some_and(|f| !f.is_empty()),
            "{name} has no `for`"
        );
        assert!(
            rule["labels"]["severity"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{name} has no severity"
        );
        let annotations = &rule["annotations"];
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                annotations[key].as_str().is_some_and(|a| !a.is_empty()),
                "{name} has no {key}"
            );
        }
        // The labels an alert's text shows are labels its expression keeps;
        // any other renders empty.
        let description = annotations["description"].as_str().unwrap_or_default();
        let used = template_labels(description);
        // A pipeline's namespace is `pipeline_namespace` in the operator's
        // series (its scrape's `namespace` is the operator's own).
        assert!(
            used.contains("namespace") || used.contains("pipeline_namespace"),
            "{name}'s description names no namespace: {description}"
        );
        let kept = names(&expr).grouping;
        let lost: Vec<&String> = used.iter().filter(|l| !kept.contains(*l)).collect();
        assert!(
            lost.is_empty(),
            "{name}'s description shows {lost:?}, which `{expr}` aggregates away (it keeps {kept:?})"
        );
    }
    // The values reach the rules.
    let by_name: BTreeMap<&str, &serde_yaml_ng::Value> =
        rules.iter().map(|r| (alert_name(r), *r)).collect();
    let lag = alert_query(by_name["KeystoneConsumerLagGrowing"]).expr;
    assert!(lag.contains("> 2500"), "{lag}");
    assert_eq!(
        by_name["KeystonePipelineDegraded"]["for"].as_str(),
        Some("3m")
    );
}

#[tokio::test]
async fn every_alert_links_a_section_of_docs_alerts_md() {
    let tb = testbed().await;
    let text = std::fs::read_to_string(alerts_doc_path())
        .unwrap_or_else(|e| panic!("{}: {e}", alerts_doc_path().display()));
    let anchors = heading_anchors(&text);
    let rendered = helm_template(&tb, &["--set", "alerts.enabled=true"]);
    let rules = alert_rules(&rendered);
    assert!(!rules.is_empty(), "alerts.enabled=true rendered no alert");
    // By default the links lead to this repository's docs/alerts.md.
    let base = "https://github.com/keystone-dev/keystone/blob/main/docs/alerts.md#";
    let mut linked = BTreeSet::new();
    for rule in &rules {
        let name = alert_name(rule);
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        let anchor = url
            .strip_prefix(base)
            .unwrap_or_else(|| panic!("{name}'s runbook_url {url:?} is not {base}ANCHOR"));
        assert!(
            anchors.contains(anchor),
            "{name}'s runbook_url anchor #{anchor} is no heading of {} (it has {anchors:?})",
            alerts_doc_path().display()
        );
        linked.insert(anchor.to_owned());
    }
    // And no section is left for an alert that is gone.
    let sections: BTreeSet<&String> = anchors
        .iter()
        .filter(|a| a.starts_with("keystone"))
        .collect();
    assert_eq!(
        sections,
        linked.iter().collect(),
        "the alert sections of {} and the chart's alerts",
        alerts_doc_path().display()
    );

    // Another base: the links move with it.
    let moved = helm_template(
        &tb,
        &[
            "--set",
            "alerts.enabled=true",
            "--set",
            "alerts.runbookBaseUrl=https://wiki.example.com/keystone/",
        ],
    );
    for rule in alert_rules(&moved) {
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(
            url,
            format!(
                "https://wiki.example.com/keystone#{}",
                alert_name(rule).to_lowercase()
            )
        );
    }
}
