//! GitOps with a real Argo CD (`e2e/testbed up --with argocd`): the operator
//! installed from the Helm chart by an Application, teams' pipelines by an
//! ApplicationSet with a git directory generator, CRDs, Processors and
//! Pipelines in one commit, no drift over resyncs with either diff, upgrades,
//! rollbacks and broken contracts followed by the app's health, suspend and
//! resume from git, pruning, and a partition count raised by hand.

mod gitops_support;
mod operator_support;
mod runtime_support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use gitops_support::{App, Argo, GitRepo, application};
use k8s_openapi::api::apps::v1::Deployment;
use keystone_crds::Pipeline;
use keystone_e2e::TestNamespace;
use kube::Api;
use operator_support::*;

/// The tests that run operators take turns: two apps tracking Keystone's CRDs
/// would each see the other's mark as drift, and the samples' dozen runtime
/// pods beside the chart test's on two cores kept a team's Pipeline
/// Progressing past its timeout in CI.
static TURNS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SYNC: Duration = Duration::from_secs(240);

/// Removes what a test made through Argo CD, without cascading into shared
/// objects: apps and app sets are deleted orphaning their resources, the
/// Pipelines' finalizers are stripped (the operator may be gone), and the
/// chart's cluster-wide objects are deleted by their release label.
struct Cleanup {
    kubeconfig: std::path::PathBuf,
    namespace: String,
    apps: Vec<String>,
    appsets: Vec<String>,
    pipeline_namespaces: Vec<String>,
    release: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let kubectl = |args: &[&str]| {
            let _ = Command::new("kubectl")
                .env("KUBECONFIG", &self.kubeconfig)
                .args(args)
                .output();
        };
        for set in &self.appsets {
            kubectl(&[
                "delete",
                "applicationset",
                set,
                "-n",
                &self.namespace,
                "--cascade=orphan",
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
        for app in &self.apps {
            kubectl(&[
                "patch",
                "application",
                app,
                "-n",
                &self.namespace,
                "--type=merge",
                "-p",
                r#"{"metadata":{"finalizers":null}}"#,
            ]);
            kubectl(&[
                "delete",
                "application",
                app,
                "-n",
                &self.namespace,
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
        for ns in &self.pipeline_namespaces {
            // Deleted first: an operator still running cannot put a finalizer
            // back on a Pipeline that is being deleted.
            kubectl(&[
                "delete",
                "pipelines.keystone.dev",
                "--all",
                "-n",
                ns,
                "--wait=false",
            ]);
            let list = Command::new("kubectl")
                .env("KUBECONFIG", &self.kubeconfig)
                .args(["get", "pipelines.keystone.dev", "-n", ns, "-o", "name"])
                .output();
            if let Ok(list) = list {
                for p in String::from_utf8_lossy(&list.stdout).lines() {
                    kubectl(&[
                        "patch",
                        p,
                        "-n",
                        ns,
                        "--type=merge",
                        "-p",
                        r#"{"metadata":{"finalizers":null}}"#,
                    ]);
                }
            }
        }
        if let Some(release) = &self.release {
            let selector = format!("app.kubernetes.io/instance={release}");
            kubectl(&[
                "delete",
                "clusterrole,clusterrolebinding",
                "-l",
                &selector,
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
    }
}

/// The values of every committed record of `topic`, once `expected` arrived.
fn read_values(bootstrap: &str, topic: &str, expected: usize) -> Vec<serde_json::Value> {
    runtime_support::read_committed(
        bootstrap,
        topic,
        expected,
        Duration::from_secs(60),
        Duration::from_millis(500),
    )
    .into_iter()
    .map(|(_, value, _)| serde_json::from_str(&value).expect("json"))
    .collect()
}

fn session_of(line: &str) -> String {
    let event: serde_json::Value = serde_json::from_str(line).expect("json");
    event["session_id"].as_str().expect("session_id").to_owned()
}

fn users(values: &[serde_json::Value]) -> BTreeSet<String> {
    values
        .iter()
        .filter_map(|v| v["user"].as_str().map(str::to_owned))
        .collect()
}

/// The Pipeline's health as the app reports it, and every distinct one seen
/// while waiting for `until`.
async fn follow_health(
    argo: &Argo,
    app: &str,
    pipeline: &str,
    revision: &str,
    until: impl Fn(&(String, String)) -> bool,
) -> (Vec<String>, App) {
    let mut seen: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + SYNC;
    loop {
        if let Some(a) = argo.app(app).await {
            let health = a.resource_health("Pipeline", pipeline);
            if seen.last() != Some(&health.0) && !health.0.is_empty() {
                seen.push(health.0.clone());
            }
            if a.sync() == "Synced" && a.revision() == revision && until(&health) {
                return (seen, a);
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "app {app}: the Pipeline's health went {seen:?}; last: {:?}, {}\n{}",
                    health,
                    a.summary(),
                    argo.logs()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Commits `content` as `file`, asks Argo CD to look now, and follows the
/// Pipeline `orders`'s health in `app` until `until` holds on that commit.
async fn push_and_follow(
    (argo, repo, app): (&Argo, &GitRepo, &str),
    file: &str,
    content: &str,
    message: &str,
    until: impl Fn(&(String, String)) -> bool,
) -> (Vec<String>, App) {
    repo.write(file, content);
    let commit = repo.commit(message);
    argo.refresh(app).await;
    follow_health(argo, app, "orders", &commit, until).await
}

/// A team's pipeline; it watches a new version for 10 s (not the default two
/// minutes) before calling an upgrade done.
fn team_pipeline(
    ns: &str,
    name: &str,
    source: &str,
    sink: &str,
    partitions: i32,
    policy: &str,
) -> String {
    pipeline_yaml(ns, name, source, sink, partitions, policy).replace(
        "  parallelism: 2\n",
        "  parallelism: 2\n  upgrade: {healthWindow: 10s}\n",
    )
}

#[tokio::test]
async fn the_chart_and_the_teams_pipelines_sync_from_git_and_follow_the_operator() {
    let _turn = TURNS.lock().await;
    let argo = Argo::new().await;
    let tb = testbed().await;
    operator_binary();
    require_runtime_binary();
    let kafka = Kafka::new(&tb);
    let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();
    let team_a = pipeline_namespace(&tb, "gitops-a").await;
    let team_b = pipeline_namespace(&tb, "gitops-b").await;
    let operator_ns = operator_namespace(&tb, &team_a).await;
    let release = unique("ks-gitops");
    let appset = unique("teams");
    let mut cleanup = Cleanup {
        kubeconfig: tb.kubeconfig().expect("kubeconfig"),
        namespace: argo.namespace().to_owned(),
        apps: vec![
            release.clone(),
            team_a.name().to_owned(),
            team_b.name().to_owned(),
        ],
        appsets: vec![appset.clone()],
        pipeline_namespaces: vec![team_a.name().to_owned(), team_b.name().to_owned()],
        release: Some(release.clone()),
    };

    // What the platform team keeps in git: the chart, and a folder per team.
    let repo = GitRepo::new(&tb, "platform");
    repo.copy_dir(
        &operator_support::repo().join("helm/keystone"),
        "charts/keystone",
    );
    let topic = |t: &str| unique(&format!("e2e.gitops.{t}"));
    let (src_a, out_a) = (topic("a"), topic("a.out"));
    let (src_b, out_b) = (topic("b"), topic("b.out"));
    let (src_keep, out_keep) = (topic("keep"), topic("keep.out"));
    for t in [&src_a, &src_b, &src_keep] {
        kafka.create(t, 2).await;
    }
    let a_file = format!("teams/{}/orders.yaml", team_a.name());
    let b_file = format!("teams/{}/orders.yaml", team_b.name());
    let keep_file = format!("teams/{}/keep.yaml", team_b.name());
    repo.write(
        &a_file,
        &team_pipeline(team_a.name(), "orders", &src_a, &out_a, 1, "Delete"),
    );
    repo.write(
        &b_file,
        &team_pipeline(team_b.name(), "orders", &src_b, &out_b, 1, "Delete"),
    );
    repo.write(
        &keep_file,
        &team_pipeline(team_b.name(), "keep", &src_keep, &out_keep, 1, "Retain"),
    );
    // The folder stays a team (and an app) when its pipelines are removed.
    repo.write(
        &format!("teams/{}/README.md", team_b.name()),
        "Team B's pipelines.\n",
    );
    let first = repo.commit("keystone and two teams");

    // 1. The operator from the chart, the teams' pipelines from an ApplicationSet.
    let values = format!(
        r#"
    helm:
      releaseName: {release}
      valuesObject:
        kafka: {{clusters: {{default: {{bootstrapServers: "{bootstrap}"}}}}}}
        watchNamespaces: [{a}, {b}]
        metrics: {{bindAddress: "$(POD_IP)"}}
        runtime: {{bindAddress: "$(POD_IP)"}}
        logFormat: text"#,
        a = team_a.name(),
        b = team_b.name(),
    );
    argo.apply(&application(
        &release,
        &repo,
        "charts/keystone",
        operator_ns.name(),
        &values,
        &[],
    ));
    argo.apply(&format!(
        r#"apiVersion: argoproj.io/v1alpha1
kind: ApplicationSet
metadata:
  name: {appset}
spec:
  goTemplate: true
  generators:
    - git:
        repoURL: {url}
        revision: main
        requeueAfterSeconds: 10
        directories:
          - path: teams/*
  template:
    metadata:
      name: '{{{{.path.basename}}}}'
      finalizers: [resources-finalizer.argocd.argoproj.io]
    spec:
      project: default
      source:
        repoURL: {url}
        targetRevision: main
        path: '{{{{.path.path}}}}'
      destination:
        server: https://kubernetes.default.svc
        namespace: '{{{{.path.basename}}}}'
      syncPolicy:
        # A team whose last pipeline is removed: Argo CD refuses to prune an
        # app's every resource unless told it may.
        automated: {{prune: true, selfHeal: true, allowEmpty: true}}
"#,
        url = repo.url()
    ));
    argo.wait_synced_healthy(&release, &first, SYNC).await;
    for team in [&team_a, &team_b] {
        argo.wait_synced_healthy(team.name(), &first, SYNC).await;
    }
    // Data flows through a pipeline synced from git.
    produce_lines(&tb, &src_a, "{\"session_id\":\"s1\",\"user\":\"ann\",\"action\":\"click\"}\n{\"session_id\":\"s2\",\"user\":\"bob\",\"action\":\"view\"}", session_of).await;
    let got = read_values(&bootstrap, &out_a, 2);
    assert_eq!(
        users(&got),
        BTreeSet::from(["ann".to_owned(), "bob".to_owned()]),
        "{got:?}"
    );

    // 4. A commit that changes a step: Progressing while the operator
    // checkpoints and upgrades, Healthy after.
    let pipelines_a: Api<Pipeline> = team_a.api();
    let hash = |p: &Pipeline| {
        p.status
            .as_ref()
            .and_then(|s| s.plan_hash.clone())
            .unwrap_or_default()
    };
    let original_hash = hash(&pipelines_a.get("orders").await.expect("pipeline"));
    let original = repo.read(&a_file);
    let (seen, _) = push_and_follow(
        (&argo, &repo, team_a.name()),
        &a_file,
        &original.replace(
            "  steps:\n",
            "  steps:\n    - name: no-views\n      filter: {expression: \"action != 'view'\"}\n",
        ),
        "orders: drop views",
        |(h, _)| *h == "Healthy",
    )
    .await;
    assert!(
        seen.contains(&"Progressing".to_owned()),
        "health went {seen:?}"
    );
    let upgraded = pipelines_a.get("orders").await.expect("pipeline");
    assert_ne!(hash(&upgraded), original_hash, "the new version runs");
    produce_lines(&tb, &src_a, "{\"session_id\":\"s3\",\"user\":\"cy\",\"action\":\"view\"}\n{\"session_id\":\"s4\",\"user\":\"dee\",\"action\":\"click\"}", session_of).await;
    let got = read_values(&bootstrap, &out_a, 3);
    assert_eq!(
        users(&got),
        BTreeSet::from(["ann".into(), "bob".into(), "dee".into()]),
        "the filter runs: {got:?}"
    );

    // A revert rolls back the same way.
    let (seen, _) = push_and_follow(
        (&argo, &repo, team_a.name()),
        &a_file,
        &original,
        "Revert \"orders: drop views\"",
        |(h, _)| *h == "Healthy",
    )
    .await;
    assert!(
        seen.contains(&"Progressing".to_owned()),
        "health went {seen:?}"
    );
    assert_eq!(
        hash(&pipelines_a.get("orders").await.expect("pipeline")),
        original_hash
    );

    // A commit that breaks a contract: Degraded with the checker's message,
    // and the old version keeps running.
    let (_, app) = push_and_follow(
        (&argo, &repo, team_a.name()),
        &a_file,
        &original.replace(
            "  steps:\n",
            "  steps:\n    - name: big\n      filter: {expression: \"amount > 10\"}\n",
        ),
        "orders: filter on amount",
        |(h, _)| *h == "Degraded",
    )
    .await;
    let (_, message) = app.resource_health("Pipeline", "orders");
    assert!(
        message.starts_with("Invalid pipeline: ") && message.contains("amount"),
        "{message}"
    );
    assert_eq!(
        hash(&pipelines_a.get("orders").await.expect("pipeline")),
        original_hash,
        "the old version keeps running"
    );
    produce_lines(
        &tb,
        &src_a,
        "{\"session_id\":\"s5\",\"user\":\"eve\",\"action\":\"view\"}",
        session_of,
    )
    .await;
    let got = read_values(&bootstrap, &out_a, 4);
    assert!(
        users(&got).contains("eve"),
        "the old version processes: {got:?}"
    );
    push_and_follow(
        (&argo, &repo, team_a.name()),
        &a_file,
        &original,
        "orders: revert the amount filter",
        |(h, _)| *h == "Healthy",
    )
    .await;

    // 5. Suspend and resume from git.
    push_and_follow(
        (&argo, &repo, team_a.name()),
        &a_file,
        &original.replace(
            "  parallelism: 2\n",
            "  parallelism: 2\n  state: Suspended\n",
        ),
        "orders: suspend",
        |(h, _)| *h == "Suspended",
    )
    .await;
    let deployments: Api<Deployment> = team_a.api();
    let replicas = deployments
        .get("orders-s0")
        .await
        .expect("deployment")
        .spec
        .and_then(|s| s.replicas);
    assert_eq!(replicas, Some(0), "suspended: no instances");
    repo.write(&a_file, &original);
    let resumed = repo.commit("orders: resume");
    argo.refresh(team_a.name()).await;
    follow_health(&argo, team_a.name(), "orders", &resumed, |(h, _)| {
        *h == "Healthy"
    })
    .await;

    // 6. Partitions raised by hand: self-heal puts git's value back, which the
    // API server accepts; the operator keeps the topic's partitions and the
    // app says why it is Degraded and what to do, until git is raised.
    let pipelines_b: Api<Pipeline> = team_b.api();
    let mut raise = tb.kubectl().expect("kubectl");
    raise.args([
        "patch",
        "pipelines.keystone.dev",
        "orders",
        "-n",
        team_b.name(),
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/spec/sinks/0/kafka/partitions", "value": 3}]"#,
    ]);
    run_ok(raise);
    kafka
        .wait_partitions(&out_b, "raised by hand to 3", |p| p == Some(3))
        .await;
    let (_, app) = follow_health(&argo, team_b.name(), "orders", &resumed, |(h, m)| {
        *h == "Degraded" && m.contains("set partitions to 3 or more")
    })
    .await;
    assert_eq!(
        app.sync(),
        "Synced",
        "self-heal applied git's value: {}",
        app.summary()
    );
    assert_eq!(
        kafka.partitions(&out_b),
        Some(3),
        "the topic keeps its partitions"
    );
    push_and_follow(
        (&argo, &repo, team_b.name()),
        &b_file,
        &repo
            .read(&b_file)
            .replace("partitions: 1\n", "partitions: 3\n"),
        "orders: 3 partitions, as the topic has",
        |(h, _)| *h == "Healthy",
    )
    .await;

    // 5. Pipelines removed from git are pruned; the operator honours each one's
    // topic deletion policy.
    repo.remove(&b_file);
    repo.remove(&keep_file);
    let pruned = repo.commit("team b: no pipelines");
    argo.refresh(team_b.name()).await;
    argo.wait(team_b.name(), "the pipelines pruned", SYNC, |a| {
        a.sync() == "Synced" && a.revision() == pruned && a.resource("Pipeline", "orders").is_none()
    })
    .await;
    wait_until_gone(&pipelines_b, "orders").await;
    wait_until_gone(&pipelines_b, "keep").await;
    assert!(
        !kafka.exists(&out_b),
        "Delete: the sink topic {out_b} is deleted"
    );
    assert!(
        kafka.exists(&out_keep),
        "Retain: the sink topic {out_keep} is kept"
    );

    cleanup.apps.retain(|a| a != &release);
    delete_team(&argo, &appset, &team_a, &team_b).await;
    argo.delete_app(&release).await;
    drop(cleanup);
}

async fn wait_until_gone(api: &Api<Pipeline>, name: &str) {
    let deadline = tokio::time::Instant::now() + SYNC;
    while api.get_opt(name).await.expect("get").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pipeline {name} was not deleted"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The ApplicationSet and its apps go; the teams' pipelines are deleted while
/// the operator still runs, so their finalizers complete.
async fn delete_team(argo: &Argo, appset: &str, a: &TestNamespace, b: &TestNamespace) {
    argo.delete_appset(appset);
    for ns in [a, b] {
        argo.delete_app(ns.name()).await;
        let api: Api<Pipeline> = ns.api();
        let _ = api
            .delete_collection(&Default::default(), &Default::default())
            .await;
    }
    for ns in [a, b] {
        let api: Api<Pipeline> = ns.api();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !api
            .list(&Default::default())
            .await
            .map(|l| l.items.is_empty())
            .unwrap_or(true)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// 2. CRDs, Processors and the Pipelines that use them in one commit, one
/// Application: Synced by the first sync, with no manual step and no waves
/// (Argo CD applies CRDs before the objects of their kinds in one sync and
/// skips the dry run of objects whose CRD the same sync brings).
#[tokio::test]
async fn crds_processors_and_pipelines_in_one_commit_are_synced_by_the_first_sync() {
    let _turn = TURNS.lock().await;
    let argo = Argo::new().await;
    let tb = testbed().await;
    operator_binary();
    let ns = pipeline_namespace(&tb, "gitops-one").await;
    let operator_ns = operator_namespace(&tb, &ns).await;
    // The operator is installed: Argo CD waits for the Processors' wave to be
    // healthy (checked by it) before it applies the Pipelines' wave.
    let _operator = OperatorProcess::start(&tb, ns.name(), operator_ns.name(), "gitops");
    let app = unique("one-commit");
    let _cleanup = Cleanup {
        kubeconfig: tb.kubeconfig().expect("kubeconfig"),
        namespace: argo.namespace().to_owned(),
        apps: vec![app.clone()],
        appsets: vec![],
        pipeline_namespaces: vec![ns.name().to_owned()],
        release: None,
    };
    let repo = GitRepo::new(&tb, "one-commit");
    for crd in [
        "keystone.dev_pipelines.yaml",
        "keystone.dev_processors.yaml",
    ] {
        repo.write(
            &format!("platform/crds/{crd}"),
            &std::fs::read_to_string(operator_support::repo().join("crds").join(crd)).expect("crd"),
        );
    }
    let in_ns = |file: &str| {
        std::fs::read_to_string(operator_support::repo().join("config/samples").join(file))
            .expect("sample")
            .replace("namespace: default", &format!("namespace: {}", ns.name()))
    };
    repo.write("platform/processors.yaml", &in_ns("processors.yaml"));
    repo.write(
        "platform/pipelines/payments-enrich.yaml",
        &in_ns("payments-enrich.yaml"),
    );
    let commit = repo.commit("CRDs, processors and a pipeline using them");
    let synced = sync_platform_folder(&argo, &app, &repo, ns.name(), &commit).await;
    for (kind, name) in [
        ("CustomResourceDefinition", "pipelines.keystone.dev"),
        ("CustomResourceDefinition", "processors.keystone.dev"),
        ("Pipeline", "payments-enrich"),
    ] {
        let r = synced
            .resource(kind, name)
            .unwrap_or_else(|| panic!("{kind} {name} in the app: {}", synced.summary()));
        assert_eq!(r["status"], "Synced", "{r}");
    }
    assert!(synced.out_of_sync().is_empty(), "{}", synced.summary());
}

/// An app of the repository's `platform` folder (recursively), synced to
/// `commit` by its first sync, with no retry.
async fn sync_platform_folder(
    argo: &Argo,
    app: &str,
    repo: &GitRepo,
    namespace: &str,
    commit: &str,
) -> App {
    argo.apply(&application(
        app,
        repo,
        "platform",
        namespace,
        "\n    directory: {recurse: true}",
        &[],
    ));
    let synced = argo
        .wait(app, "the first sync to succeed", SYNC, |a| {
            a.operation_phase() == "Succeeded"
                && a.operation_revision() == commit
                && a.sync() == "Synced"
        })
        .await;
    let retries = synced
        .0
        .pointer("/status/operationState/retryCount")
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    assert_eq!(retries, 0, "synced without a retry: {}", synced.summary());
    synced
}

/// 3. Every sample in config/samples stays Synced over at least 10 resyncs,
/// with the client-side diff and with the server-side diff, while the
/// operator reconciles it. Automated sync without self-heal: drift would stay
/// visible as OutOfSync instead of being applied away.
#[tokio::test]
async fn every_sample_stays_synced_over_ten_resyncs_with_either_diff() {
    let _turn = TURNS.lock().await;
    let argo = Argo::new().await;
    let tb = testbed().await;
    install_crds(&tb);
    let mut samples: Vec<_> = std::fs::read_dir(operator_support::repo().join("config/samples"))
        .expect("samples")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    samples.sort();
    assert!(samples.len() >= 7, "{samples:?}");
    let client = pipeline_namespace(&tb, "gitops-csd").await;
    let server = pipeline_namespace(&tb, "gitops-ssd").await;
    let mut operators = Vec::new();
    let repo = GitRepo::new(&tb, "samples");
    let mut apps = Vec::new();
    for (ns, diff) in [(&client, "client"), (&server, "server")] {
        let op_ns = operator_namespace(&tb, ns).await;
        operators.push((
            OperatorProcess::start(&tb, ns.name(), op_ns.name(), "gitops"),
            op_ns,
        ));
        for sample in &samples {
            let text = std::fs::read_to_string(sample)
                .expect("sample")
                .replace("namespace: default", &format!("namespace: {}", ns.name()));
            repo.write(
                &format!(
                    "{diff}/{}",
                    sample.file_name().expect("name").to_string_lossy()
                ),
                &text,
            );
        }
        apps.push((
            unique(&format!("samples-{diff}")),
            diff,
            ns.name().to_owned(),
        ));
    }
    let commit = repo.commit("every sample");
    let _cleanup = Cleanup {
        kubeconfig: tb.kubeconfig().expect("kubeconfig"),
        namespace: argo.namespace().to_owned(),
        apps: apps.iter().map(|(a, _, _)| a.clone()).collect(),
        appsets: vec![],
        pipeline_namespaces: vec![client.name().to_owned(), server.name().to_owned()],
        release: None,
    };
    for (app, diff, ns) in &apps {
        let mut yaml =
            application(app, &repo, diff, ns, "", &[]).replace("selfHeal: true", "selfHeal: false");
        if *diff == "server" {
            yaml = yaml.replace(
                &format!("  name: {app}\n"),
                &format!("  name: {app}\n  annotations:\n    argocd.argoproj.io/compare-options: ServerSideDiff=true\n"),
            );
        }
        argo.apply(&yaml);
    }
    for (app, _, _) in &apps {
        argo.wait(app, "Synced to every sample", SYNC, |a| {
            a.operation_phase() == "Succeeded" && a.revision() == commit && a.sync() == "Synced"
        })
        .await;
    }
    // The operator has reconciled every Pipeline (its status and finalizer are
    // written) before the resyncs are counted.
    for ns in [&client, &server] {
        let api: Api<Pipeline> = ns.api();
        let deadline = tokio::time::Instant::now() + SYNC;
        loop {
            let list = api.list(&Default::default()).await.expect("list");
            if !list.items.is_empty()
                && list.items.iter().all(|p| {
                    p.status
                        .as_ref()
                        .is_some_and(|s| s.observed_generation.is_some())
                })
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the operator did not observe every sample in {}",
                ns.name()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let mut reconciled: Vec<BTreeSet<String>> = vec![BTreeSet::new(); apps.len()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while reconciled.iter().any(|r| r.len() < 11) {
        for (i, (app, diff, _)) in apps.iter().enumerate() {
            let a = argo.app(app).await.expect("app");
            assert!(
                a.sync() == "Synced" && a.out_of_sync().is_empty(),
                "{diff}-side diff: drift after {} resyncs: {}",
                reconciled[i].len().saturating_sub(1),
                a.summary()
            );
            let syncs =
                a.0.pointer("/status/history")
                    .and_then(|h| h.as_array())
                    .map_or(0, Vec::len);
            assert_eq!(syncs, 1, "{diff}-side diff: synced again: {}", a.summary());
            reconciled[i].insert(a.reconciled_at().to_owned());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer resyncs than expected: {reconciled:?}"
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    drop(operators);
}

/// 2, on a cluster that has never seen the CRDs: Keystone's CRDs under a group
/// of their own (the shared testbed keeps the real ones installed, and deleting
/// them would delete every Pipeline), with the samples' Processors and a
/// Pipeline of that group, in one commit: the first sync creates the CRDs and
/// then the objects of their kinds, with no option and no retry.
#[tokio::test]
async fn crds_new_to_the_cluster_and_objects_of_their_kinds_sync_in_one_commit() {
    let argo = Argo::new().await;
    let tb = testbed().await;
    let ns = pipeline_namespace(&tb, "gitops-new").await;
    let group = format!("{}.gitops.example.com", unique("g"));
    let app = unique("new-crds");
    let _cleanup = Cleanup {
        kubeconfig: tb.kubeconfig().expect("kubeconfig"),
        namespace: argo.namespace().to_owned(),
        apps: vec![app.clone()],
        appsets: vec![],
        pipeline_namespaces: vec![],
        release: None,
    };
    let _crds = NewCrds {
        kubeconfig: tb.kubeconfig().expect("kubeconfig"),
        names: vec![
            format!("trialpipelines.{group}"),
            format!("trialprocessors.{group}"),
        ],
    };
    let repo = GitRepo::new(&tb, "new-crds");
    for crd in [
        "keystone.dev_pipelines.yaml",
        "keystone.dev_processors.yaml",
    ] {
        let text =
            std::fs::read_to_string(operator_support::repo().join("crds").join(crd)).expect("crd");
        let mut crd: serde_json::Value = serde_yaml_ng::from_str(&text).expect("yaml");
        let plural = crd["spec"]["names"]["plural"]
            .as_str()
            .expect("plural")
            .to_owned();
        crd["metadata"]["name"] = format!("{plural}.{group}").into();
        crd["spec"]["group"] = group.clone().into();
        // Kinds and names of their own too: `kubectl get pipeline` elsewhere
        // must not find these (kubectl resolves a bare kind in any group).
        let names = crd["spec"]["names"].as_object_mut().expect("names");
        names.remove("shortNames");
        names.remove("categories");
        for (field, prefix) in [
            ("kind", "Trial"),
            ("listKind", "Trial"),
            ("plural", "trial"),
            ("singular", "trial"),
        ] {
            // listKind is left out of the generated CRDs (the API server
            // derives it): rename what is there.
            if let Some(name) = names.get(field).and_then(|n| n.as_str()) {
                let renamed = format!("{prefix}{name}");
                names.insert(field.into(), renamed.into());
            }
        }
        crd["metadata"]["name"] = format!("trial{plural}.{group}").into();
        repo.write(
            &format!("platform/crds/{plural}.yaml"),
            &serde_yaml_ng::to_string(&crd).expect("yaml"),
        );
    }
    let in_group = |file: &str| {
        std::fs::read_to_string(operator_support::repo().join("config/samples").join(file))
            .expect("sample")
            .replace("namespace: default", &format!("namespace: {}", ns.name()))
            .replace(
                "apiVersion: keystone.dev/",
                &format!("apiVersion: {group}/"),
            )
            .replace("kind: Pipeline\n", "kind: TrialPipeline\n")
            .replace("kind: Processor\n", "kind: TrialProcessor\n")
    };
    repo.write("platform/processors.yaml", &in_group("processors.yaml"));
    repo.write(
        "platform/pipelines/payments-enrich.yaml",
        &in_group("payments-enrich.yaml"),
    );
    let commit = repo.commit("new CRDs and objects of their kinds");
    let synced = sync_platform_folder(&argo, &app, &repo, ns.name(), &commit).await;
    for kind in ["TrialProcessor", "TrialPipeline"] {
        let synced_of_kind = synced
            .0
            .pointer("/status/resources")
            .and_then(|r| r.as_array())
            .map(|rs| {
                rs.iter()
                    .filter(|r| r["kind"] == kind && r["group"] == group.as_str())
                    .count()
            })
            .unwrap_or(0);
        assert!(
            synced_of_kind > 0,
            "no {kind} of {group} in the app: {}",
            synced.summary()
        );
    }
    assert!(synced.out_of_sync().is_empty(), "{}", synced.summary());
    let mut get = tb.kubectl().expect("kubectl");
    get.args([
        "get",
        &format!("trialpipelines.{group}"),
        "-n",
        ns.name(),
        "-o",
        "name",
    ]);
    assert!(
        run_ok(get).contains("payments-enrich"),
        "the Pipeline exists"
    );
}

/// Deletes the test's own CRDs (and with them the objects of their kinds).
struct NewCrds {
    kubeconfig: std::path::PathBuf,
    names: Vec<String>,
}

impl Drop for NewCrds {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("kubectl")
                .env("KUBECONFIG", &self.kubeconfig)
                .args(["delete", "crd", name, "--ignore-not-found", "--wait=false"])
                .output();
        }
    }
}
