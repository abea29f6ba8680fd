//! The Helm chart: it lints, renders manifests the real API server accepts,
//! installs into the testbed, and the operator it runs (a pod of the process
//! kubelet, under the chart's ServiceAccount and nothing more) reconciles.

mod operator_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use keystone_crds::Pipeline;
use keystone_e2e::{Testbed, wait_for, wait_until};
use kube::Api;
use kube::api::ListParams;
use operator_support::*;

fn chart() -> String {
    repo().join("helm/keystone").display().to_string()
}

fn helm(tb: &Testbed) -> Command {
    let mut cmd = Command::new(tb.helm().expect("helm"));
    cmd.env("KUBECONFIG", tb.kubeconfig().expect("kubeconfig"));
    cmd
}

/// Uninstalls the release when dropped, so a failed test leaves no operator running.
struct Release {
    helm: PathBuf,
    kubeconfig: PathBuf,
    name: String,
    namespace: String,
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = Command::new(&self.helm)
            .env("KUBECONFIG", &self.kubeconfig)
            .args([
                "uninstall",
                &self.name,
                "--namespace",
                &self.namespace,
                "--ignore-not-found",
            ])
            .output();
    }
}

#[tokio::test]
async fn chart_lints_and_renders_manifests_the_api_server_accepts() {
    let tb = testbed().await;
    install_crds(&tb);
    let mut lint = helm(&tb);
    lint.args(["lint", "--strict", &chart()]);
    run_ok(lint);

    // Both RBAC shapes: cluster-wide, and namespaced Roles for listed namespaces.
    let ns = pipeline_namespace(&tb, "helm-render").await;
    for extra in [
        vec![],
        vec![
            "--set".to_owned(),
            format!("watchNamespaces={{{}}}", ns.name()),
        ],
    ] {
        let mut template = helm(&tb);
        template.args([
            "template",
            "ks-render",
            &chart(),
            "--namespace",
            ns.name(),
            "--skip-crds",
        ]);
        template.args(&extra);
        let out = template.output().expect("helm template");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let manifests = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut apply = tb.kubectl().expect("kubectl");
        apply.args(["apply", "--dry-run=server", "-n", ns.name(), "-f", "-"]);
        let (ok, text) = run_with_stdin(apply, &manifests);
        assert!(
            ok,
            "the API server refused the rendered chart ({extra:?}):\n{text}"
        );
        if extra.is_empty() {
            assert!(
                manifests.contains("kind: ClusterRole\n"),
                "cluster-wide RBAC expected"
            );
        } else {
            assert!(
                !manifests.contains("kind: ClusterRole"),
                "namespaced RBAC must not be cluster-wide"
            );
        }
    }

    // Values are checked against values.schema.json.
    let mut bad = helm(&tb);
    bad.args(["template", "x", &chart(), "--set", "logFormat=xml"]);
    let out = bad.output().expect("helm template");
    assert!(
        !out.status.success(),
        "a value outside the schema must be refused"
    );

    // The kustomize base renders and is accepted too.
    let mut kustomize = tb.kubectl().expect("kubectl");
    kustomize.args([
        "kustomize",
        &repo().join("config/default").display().to_string(),
    ]);
    // Into the test's namespace, which exists (a server dry run creates nothing).
    let manifests = run_ok(kustomize).replace("keystone-system", ns.name());
    let mut apply = tb.kubectl().expect("kubectl");
    apply.args(["apply", "--dry-run=server", "-f", "-"]);
    let (ok, text) = run_with_stdin(apply, &manifests);
    assert!(ok, "the API server refused config/default:\n{text}");
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn installed_chart_runs_an_operator_that_reconciles_under_its_own_service_account() {
    let tb = testbed().await;
    operator_binary();
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "helm-app").await;
    let release_ns = operator_namespace(&tb, &ns).await;
    let release = unique("ks");
    let bootstrap = tb.kafka_bootstrap_servers().expect("kafka").to_owned();

    let mut install = helm(&tb);
    install.args([
        "install",
        &release,
        &chart(),
        "--namespace",
        release_ns.name(),
        "--set",
        &format!("kafka.clusters.default.bootstrapServers={bootstrap}"),
        "--set",
        &format!("watchNamespaces={{{}}}", ns.name()),
        // Each pod of the process kubelet has its own loopback address.
        "--set",
        "metrics.bindAddress=$(POD_IP)",
        "--set",
        "runtime.bindAddress=$(POD_IP)",
        "--set",
        "logFormat=text",
    ]);
    run_ok(install);
    let _release = Release {
        helm: tb.helm().expect("helm"),
        kubeconfig: tb.kubeconfig().expect("kubeconfig"),
        name: release.clone(),
        namespace: release_ns.name().to_owned(),
    };

    // The operator pod runs and becomes ready.
    let pods: Api<Pod> = Api::namespaced(tb.client().expect("client"), release_ns.name());
    let selector = format!("app.kubernetes.io/instance={release}");
    wait_until(
        Duration::from_secs(120),
        "the operator pod to be Ready",
        || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            list.items
                .iter()
                .any(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                })
                .then_some(())
        },
        || async {
            let list = pods.list(&ListParams::default().labels(&selector)).await;
            format!(
                "{:#?}",
                list.map(|l| l.items.into_iter().map(|p| p.status).collect::<Vec<_>>())
            )
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    // It reconciles a Pipeline in the watched namespace: topics, then workloads.
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.helm");
    kafka.create(&source, 1).await;
    apply_yaml(
        &tb,
        &pipeline_yaml(
            ns.name(),
            "charted",
            &source,
            &format!("{source}.out"),
            1,
            "Delete",
        ),
    )
    .await;
    let pipelines: Api<Pipeline> = ns.api();
    wait_for(
        &pipelines,
        "charted",
        Duration::from_secs(120),
        "TopicsReady=True and stages",
        |p| {
            condition_is(p, "TopicsReady", "True")
                && p.status.as_ref().is_some_and(|s| !s.stages.is_empty())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    ns.api::<Deployment>()
        .get("charted-s0")
        .await
        .expect("stage deployment");
    assert_eq!(kafka.partitions(&format!("{source}.out")), Some(1));
    // The chart's default NetworkPolicy, made by the operator under the chart's
    // RBAC and accepted by the API server: the runtime pods' port is open to
    // the operator's pods and the metrics namespace only.
    let policy = ns
        .api::<NetworkPolicy>()
        .get("charted-runtime")
        .await
        .expect("the pipeline's NetworkPolicy");
    let policy = serde_json::to_value(&policy).expect("json");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["keystone.dev/pipeline"],
        "charted"
    );
    let from = &policy["spec"]["ingress"][0]["from"];
    assert_eq!(
        from[0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        release_ns.name(),
        "{policy}"
    );
    assert_eq!(
        from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        release.as_str(),
        "{policy}"
    );
    assert_eq!(
        from[1]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], "monitoring",
        "{policy}"
    );
    // The control token's Secret exists; the operator may create Secrets there
    // but never read them.
    assert!(
        ns.api::<k8s_openapi::api::core::v1::Secret>()
            .get_opt("charted-control")
            .await
            .expect("get secret")
            .is_some()
    );

    // Least privilege: the ServiceAccount can do its job and not more.
    let sa = format!("system:serviceaccount:{release_ns}:{release}-keystone");
    let can = |verb: &str, resource: &str, namespace: &str| {
        let mut cmd = tb.kubectl().expect("kubectl");
        cmd.args([
            "auth", "can-i", verb, resource, "--as", &sa, "-n", namespace,
        ]);
        let out = cmd.output().expect("kubectl auth can-i");
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(can("patch", "deployments.apps", ns.name()));
    assert!(can("patch", "pipelines.keystone.dev/status", ns.name()));
    assert!(
        !can("list", "secrets", release_ns.name()),
        "no secrets beyond the Kafka credentials"
    );
    assert!(!can("get", "secrets", ns.name()));
    assert!(
        !can("list", "pipelines.keystone.dev", "default"),
        "only the watched namespace"
    );
    assert!(!can("create", "pods", ns.name()));
    assert!(!can("delete", "pipelines.keystone.dev", ns.name()));

    // Deleting with Delete works under the chart's RBAC (finalizer, topic deletion).
    pipelines
        .delete("charted", &Default::default())
        .await
        .expect("delete");
    keystone_e2e::wait_for_deletion(&pipelines, "charted", Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    kafka
        .wait_partitions(&format!("{source}.out"), "deleted", |p| p.is_none())
        .await;

    let mut uninstall = helm(&tb);
    uninstall.args(["uninstall", &release, "--namespace", release_ns.name()]);
    run_ok(uninstall);
    ns.delete().await.expect("delete namespace");
}

/// The default, cluster-wide RBAC: the chart's ClusterRole and Role are enough
/// for the operator (run here by the test, impersonating the chart's
/// ServiceAccount), and the ClusterRole grants the cluster-wide watches.
#[tokio::test]
async fn cluster_wide_rbac_is_enough_for_the_operator_and_no_more() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = pipeline_namespace(&tb, "helm-rbac").await;
    let release_ns = operator_namespace(&tb, &ns).await;
    let release = unique("ksr");
    let mut install = helm(&tb);
    install.args([
        "install",
        &release,
        &chart(),
        "--namespace",
        release_ns.name(),
        // The test runs the operator itself, as the chart's ServiceAccount.
        "--set",
        "replicaCount=0",
    ]);
    run_ok(install);
    let _release = Release {
        helm: tb.helm().expect("helm"),
        kubeconfig: tb.kubeconfig().expect("kubeconfig"),
        name: release.clone(),
        namespace: release_ns.name().to_owned(),
    };
    let sa = format!("system:serviceaccount:{release_ns}:{release}-keystone");

    let can = |args: &[&str]| {
        let mut cmd = tb.kubectl().expect("kubectl");
        cmd.args(["auth", "can-i"]).args(args).args(["--as", &sa]);
        let out = cmd.output().expect("kubectl auth can-i");
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for resource in [
        "pipelines.keystone.dev",
        "processors.keystone.dev",
        "configmaps",
        "services",
        "deployments.apps",
        "poddisruptionbudgets.policy",
    ] {
        for verb in ["list", "watch"] {
            assert!(
                can(&[verb, resource, "--all-namespaces"]),
                "{verb} {resource} cluster-wide"
            );
        }
    }
    assert!(!can(&["list", "secrets", "--all-namespaces"]));
    assert!(!can(&["create", "pods", "-n", ns.name()]));
    assert!(!can(&["create", "clusterroles.rbac.authorization.k8s.io"]));

    // A kubeconfig that acts as the ServiceAccount.
    let mut kubeconfig = kube::config::Kubeconfig::read_from(tb.kubeconfig().expect("kubeconfig"))
        .expect("kubeconfig");
    for auth in &mut kubeconfig.auth_infos {
        if let Some(info) = auth.auth_info.as_mut() {
            info.impersonate = Some(sa.clone());
        }
    }
    let path = tb.state_dir().join(format!("e2e-{release}.kubeconfig"));
    std::fs::write(&path, serde_json::to_vec(&kubeconfig).expect("serialize"))
        .expect("write kubeconfig");
    let path_text = path.display().to_string();
    let operator = OperatorProcess::start_with(
        &tb,
        ns.name(),
        release_ns.name(),
        "as-sa",
        &[
            ("KUBECONFIG", path_text.as_str()),
            ("KEYSTONE_LEASE_NAME", &format!("{release}-keystone")),
        ],
    );
    let kafka = Kafka::new(&tb);
    let source = unique("e2e.rbac");
    kafka.create(&source, 1).await;
    apply_yaml(
        &tb,
        &pipeline_yaml(
            ns.name(),
            "as-sa",
            &source,
            &format!("{source}.out"),
            1,
            "Delete",
        ),
    )
    .await;
    let pipelines: Api<Pipeline> = ns.api();
    wait_for(
        &pipelines,
        "as-sa",
        Duration::from_secs(90),
        "reconciled as the ServiceAccount",
        |p| {
            condition_is(p, "TopicsReady", "True")
                && p.status.as_ref().is_some_and(|s| s.stages.len() == 2)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let log = operator.log_text();
    assert!(
        !log.contains("forbidden"),
        "the operator hit RBAC denials:\n{log}"
    );
    pipelines
        .delete("as-sa", &Default::default())
        .await
        .expect("delete");
    keystone_e2e::wait_for_deletion(&pipelines, "as-sa", Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    drop(operator);
    let _ = std::fs::remove_file(&path);
    ns.delete().await.expect("delete namespace");
}

/// One template of the chart, rendered with extra arguments.
fn render_one(tb: &Testbed, template: &str, extra: &[&str]) -> String {
    let mut cmd = helm(tb);
    cmd.args([
        "template",
        "ks-policy",
        &chart(),
        "--skip-crds",
        "--show-only",
        template,
    ]);
    cmd.args(extra);
    run_ok(cmd)
}

/// The rendered operator configuration (the ConfigMap's `config.yaml`).
fn rendered_config(tb: &Testbed, extra: &[&str]) -> serde_yaml_ng::Value {
    let map: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&render_one(tb, "templates/configmap.yaml", extra))
            .expect("the ConfigMap is YAML");
    let text = map["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml")
        .to_owned();
    serde_yaml_ng::from_str(&text).expect("config.yaml is YAML")
}

#[tokio::test]
async fn chart_limits_images_and_topics_by_default_and_reads_only_the_credentials_pods_use() {
    let tb = testbed().await;
    // By default only the chart's own runtime repository may be run, and
    // topic quotas are on.
    let config = rendered_config(
        &tb,
        &[
            "--set",
            "runtime.image.repository=reg.example/keystone/runtime",
        ],
    );
    let policy = &config["policy"];
    let images: Vec<&str> = policy["allowedRuntimeImages"]
        .as_sequence()
        .expect("allowedRuntimeImages")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        images,
        vec![
            "reg.example/keystone/runtime:*",
            "reg.example/keystone/runtime@*"
        ]
    );
    assert_eq!(policy["maxPartitions"].as_i64(), Some(256));
    assert!(
        policy["allowedTopicConfigs"]
            .as_sequence()
            .is_some_and(|keys| keys.iter().any(|k| k.as_str() == Some("retention.ms")))
    );

    // Overrides: an explicit image list; no topic-config allow-list (null).
    let config = rendered_config(
        &tb,
        &[
            "--set-json",
            r#"policy.allowedRuntimeImages=["*"]"#,
            "--set-json",
            "policy.allowedTopicConfigs=null",
            "--set",
            "policy.maxPartitions=0",
        ],
    );
    let policy = &config["policy"];
    assert_eq!(policy["allowedRuntimeImages"][0].as_str(), Some("*"));
    assert!(policy.get("allowedTopicConfigs").is_none(), "{policy:?}");
    assert!(policy.get("maxPartitions").is_none(), "{policy:?}");

    // Values outside the schema are refused.
    for bad in ["policy.maxPartitions=-1", "policy.unknown=1"] {
        let mut template = helm(&tb);
        template.args(["template", "x", &chart(), "--set", bad]);
        let out = template.output().expect("helm template");
        assert!(!out.status.success(), "{bad} must be refused");
    }

    // Where Pipelines live, the operator may read and watch the cluster's
    // credential Secrets by name (to roll pods on rotation) and no other
    // Secret (it may create control token Secrets, never read them).
    let rendered = render_one(
        &tb,
        "templates/rbac.yaml",
        &[
            "--set-json",
            r#"kafka.clusters.default={"bootstrapServers":"k:9093","securityProtocol":"SASL_SSL","sasl":{"mechanism":"SCRAM-SHA-512","username":{"secret":"kafka-user","key":"username"},"password":{"secret":"kafka-user","key":"password"}}}"#,
        ],
    );
    let cluster_role = rendered
        .split("\n---")
        .find(|doc| doc.contains("kind: ClusterRole\n"))
        .expect("a ClusterRole");
    let role: serde_yaml_ng::Value = serde_yaml_ng::from_str(cluster_role).expect("yaml");
    let secret_rules: Vec<&serde_yaml_ng::Value> = role["rules"]
        .as_sequence()
        .expect("rules")
        .iter()
        .filter(|r| {
            r["resources"]
                .as_sequence()
                .is_some_and(|s| s.iter().any(|x| x.as_str() == Some("secrets")))
        })
        .collect();
    let verbs = |rule: &serde_yaml_ng::Value| -> Vec<String> {
        rule["verbs"]
            .as_sequence()
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (named, unnamed): (Vec<_>, Vec<_>) = secret_rules
        .into_iter()
        .partition(|r| !r["resourceNames"].is_null());
    assert_eq!(named.len(), 1, "{cluster_role}");
    assert_eq!(
        named[0]["resourceNames"].as_sequence().map(Vec::len),
        Some(1),
        "{cluster_role}"
    );
    assert_eq!(named[0]["resourceNames"][0].as_str(), Some("kafka-user"));
    assert_eq!(verbs(named[0]), ["get", "list", "watch"], "{cluster_role}");
    for rule in unnamed {
        assert_eq!(verbs(rule), ["create"], "{cluster_role}");
    }
}

#[tokio::test]
async fn chart_ingest_values_reach_the_operator_and_the_ingress_rights_follow_them() {
    let tb = testbed().await;
    let values = [
        "--set",
        "ingest.ingress.enabled=true",
        "--set",
        "ingest.ingress.className=nginx",
        "--set",
        "ingest.ingress.tlsSecret=ingest-wildcard",
        "--set",
        "ingest.ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/proxy-body-size=16m",
        "--set",
        "ingest.resources.limits.memory=1Gi",
    ];
    let config = rendered_config(&tb, &values);
    // Read by the operator's own type: an unknown or misspelt key fails here.
    let config: keystone_operator::config::OperatorConfig =
        serde_yaml_ng::from_value(config).expect("the operator reads the chart's config");
    let ingress = config.ingest.ingress.expect("ingest.ingress");
    assert!(ingress.enabled);
    assert_eq!(ingress.class_name.as_deref(), Some("nginx"));
    assert_eq!(ingress.host, "{pipeline}.{namespace}.ingest.example.com");
    assert_eq!(ingress.tls_secret.as_deref(), Some("ingest-wildcard"));
    assert_eq!(
        ingress
            .annotations
            .get("nginx.ingress.kubernetes.io/proxy-body-size")
            .map(String::as_str),
        Some("16m")
    );
    let memory = config
        .ingest
        .resources
        .and_then(|r| r.limits)
        .and_then(|l| l.get("memory").cloned());
    assert_eq!(memory.map(|q| q.0), Some("1Gi".to_owned()));

    let ingress_rule = |extra: &[&str]| {
        render_one(&tb, "templates/rbac.yaml", extra)
            .lines()
            .any(|line| line.contains("resources: [ingresses]"))
    };
    assert!(ingress_rule(&values), "the operator may make the Ingresses");
    assert!(!ingress_rule(&[]), "and may not when they are off");
    let config: keystone_operator::config::OperatorConfig =
        serde_yaml_ng::from_value(rendered_config(&tb, &[])).expect("the default config");
    assert_eq!(
        config.ingest,
        Default::default(),
        "no ingest settings by default"
    );

    let mut template = helm(&tb);
    template.args(["template", "x", &chart(), "--set", "ingest.ingress.hosts=a"]);
    let out = template.output().expect("helm template");
    assert!(
        !out.status.success(),
        "a value outside the schema is refused"
    );
}
