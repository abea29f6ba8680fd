//! The Helm chart: it lints, renders manifests the real API server accepts,
//! installs into the testbed, and the operator it runs (a pod of the process
//! kubelet, under the chart's ServiceAccount and nothing more) reconciles.

mod operator_support;

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
            // Only the users' aggregated roles are cluster-wide, and nothing
            // binds them: the operator's rights are namespaced.
            assert!(
                !manifests.contains("kind: ClusterRoleBinding"),
                "namespaced RBAC must not be cluster-wide"
            );
            for role in manifests
                .split("\n---")
                .filter(|doc| doc.contains("kind: ClusterRole\n"))
            {
                assert!(
                    role.contains("rbac.authorization.k8s.io/aggregate-to-edit: \"true\""),
                    "a cluster-wide role that is not a user role:\n{role}"
                );
            }
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
    let _release = HelmRelease::new(&tb, &release, release_ns.name());

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
    let _release = HelmRelease::new(&tb, &release, release_ns.name());
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

// The web console (`console.*` values): off by default; its own ServiceAccount
// holds no rights in token mode and only `impersonate` in proxy mode.

/// The release name of the console's rendering tests.
const CONSOLE_RELEASE: &str = "ks-console";

/// The console's ServiceAccount (and Deployment, Service, Ingress, ClusterRole) name.
fn console_name(release: &str) -> String {
    format!("{release}-keystone-console")
}

/// The whole chart rendered into `namespace`, as text.
fn render_chart(tb: &Testbed, namespace: &str, extra: &[&str]) -> String {
    let mut cmd = helm(tb);
    cmd.args([
        "template",
        CONSOLE_RELEASE,
        &chart(),
        "--namespace",
        namespace,
        "--skip-crds",
    ]);
    cmd.args(extra);
    let out = cmd.output().expect("helm template");
    assert!(
        out.status.success(),
        "helm template {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every object of the rendered chart.
fn render_objects(tb: &Testbed, namespace: &str, extra: &[&str]) -> Vec<serde_yaml_ng::Value> {
    use serde::Deserialize;
    let text = render_chart(tb, namespace, extra);
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde_yaml_ng::Value::deserialize(doc).expect("the chart renders YAML"))
        .filter(|object| !object.is_null())
        .collect()
}

fn kind(object: &serde_yaml_ng::Value) -> &str {
    object["kind"].as_str().unwrap_or_default()
}

fn name(object: &serde_yaml_ng::Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn object<'a>(
    objects: &'a [serde_yaml_ng::Value],
    kind_: &str,
    name_: &str,
) -> &'a serde_yaml_ng::Value {
    objects
        .iter()
        .find(|o| kind(o) == kind_ && name(o) == name_)
        .unwrap_or_else(|| panic!("no {kind_} {name_} among {} objects", objects.len()))
}

/// The objects labelled as the console's.
fn console_objects(objects: &[serde_yaml_ng::Value]) -> Vec<&serde_yaml_ng::Value> {
    objects
        .iter()
        .filter(|o| {
            o["metadata"]["labels"]["app.kubernetes.io/name"].as_str() == Some("keystone-console")
        })
        .collect()
}

fn strings(value: &serde_yaml_ng::Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A container's environment variable with a literal value.
fn env_value<'a>(container: &'a serde_yaml_ng::Value, var: &str) -> Option<&'a str> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"].as_str() == Some(var))?["value"]
        .as_str()
}

/// The rules of every Role and ClusterRole the rendered bindings grant the
/// ServiceAccount `namespace/account`. A binding to a role the chart does not
/// render fails the test (its rules could not be checked).
fn rules_granted_to(
    objects: &[serde_yaml_ng::Value],
    namespace: &str,
    account: &str,
) -> Vec<serde_yaml_ng::Value> {
    let mut rules = Vec::new();
    for binding in objects
        .iter()
        .filter(|o| matches!(kind(o), "RoleBinding" | "ClusterRoleBinding"))
    {
        let names_account = binding["subjects"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|s| {
                s["kind"].as_str() == Some("ServiceAccount")
                    && s["name"].as_str() == Some(account)
                    && s["namespace"].as_str() == Some(namespace)
            });
        if !names_account {
            continue;
        }
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let role = objects
            .iter()
            .find(|o| {
                kind(o) == role_kind
                    && name(o) == role_name
                    && (role_kind == "ClusterRole"
                        || o["metadata"]["namespace"] == binding["metadata"]["namespace"])
            })
            .unwrap_or_else(|| panic!("{binding:?} names a role the chart does not render"));
        rules.extend(role["rules"].as_sequence().cloned().unwrap_or_default());
    }
    rules
}

/// `kubectl auth can-i ARGS --as ACCOUNT`, against the testbed's authorizer.
/// Asserts `kubectl auth can-i` says no to each request for the account.
fn assert_refused(tb: &Testbed, account: &str, requests: &[&[&str]]) {
    for request in requests {
        assert!(
            !can_i(tb, account, request),
            "{account} may {}",
            request.join(" ")
        );
    }
}

fn can_i(tb: &Testbed, account: &str, args: &[&str]) -> bool {
    let mut cmd = tb.kubectl().expect("kubectl");
    cmd.args(["auth", "can-i"])
        .args(args)
        .args(["--as", account]);
    let out = cmd.output().expect("kubectl auth can-i");
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

/// `kubectl auth can-i --list -n NAMESPACE --as ACCOUNT`: every rule that applies there.
fn rules_listed(tb: &Testbed, account: &str, namespace: &str) -> String {
    let mut cmd = tb.kubectl().expect("kubectl");
    cmd.args(["auth", "can-i", "--list", "-n", namespace, "--as", account]);
    run_ok(cmd)
}

/// Installs the chart with the console on and nothing running (no operator,
/// no console pods), to ask the API server's authorizer what its
/// ServiceAccount may do. Uninstalled when the returned guard drops.
fn install_console_only(
    tb: &Testbed,
    release: &str,
    namespace: &str,
    extra: &[&str],
) -> HelmRelease {
    let mut install = helm(tb);
    install.args([
        "install",
        release,
        &chart(),
        "--namespace",
        namespace,
        "--set",
        "replicaCount=0",
        "--set",
        "console.enabled=true",
        "--set",
        "console.replicaCount=0",
    ]);
    install.args(extra);
    run_ok(install);
    HelmRelease::new(tb, release, namespace)
}

#[tokio::test]
async fn console_is_absent_unless_enabled() {
    let tb = testbed().await;
    // Enabled, its pods may read the runtime pods' metrics (the operator's
    // NetworkPolicies let the metricsFrom peers in), and only then.
    let peers = |extra: &[&str]| {
        rendered_config(&tb, extra)["networkPolicy"]["metricsFrom"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
    };
    let console_peer = |peer: &serde_yaml_ng::Value| {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"].as_str()
            == Some("keystone-console")
    };
    let enabled = peers(&["--set", "console.enabled=true"]);
    assert_eq!(
        enabled.iter().filter(|p| console_peer(p)).count(),
        1,
        "{enabled:?}"
    );
    assert!(
        enabled.len() > 1,
        "the configured peers are kept: {enabled:?}"
    );
    assert!(!peers(&[]).iter().any(console_peer));
    // Off by default, and off whatever else is set under `console`.
    for extra in [
        &[][..],
        &[
            "--set",
            "console.auth.mode=proxy",
            "--set",
            "console.ingress.enabled=true",
            "--set",
            "console.ingress.tlsSecret=console-tls",
        ][..],
    ] {
        let objects = render_objects(&tb, "default", extra);
        assert!(!objects.is_empty());
        let console = console_objects(&objects);
        assert!(console.is_empty(), "{extra:?} rendered {console:?}");
        assert!(
            objects
                .iter()
                .all(|o| name(o) != console_name(CONSOLE_RELEASE) && kind(o) != "Ingress"),
            "{extra:?}: {objects:?}"
        );
    }
    // And on when enabled: its own ServiceAccount, Deployment and Service.
    let objects = render_objects(&tb, "default", &["--set", "console.enabled=true"]);
    let mut kinds: Vec<&str> = console_objects(&objects).into_iter().map(kind).collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["Deployment", "Service", "ServiceAccount"]);
}

#[tokio::test]
async fn console_manifests_are_accepted_by_the_api_server_and_its_pod_by_pod_security() {
    let tb = testbed().await;
    install_crds(&tb);
    // A namespace enforcing Pod Security "restricted".
    let ns = pipeline_namespace(&tb, "helm-console").await;
    let variants: [&[&str]; 4] = [
        &["--set", "console.enabled=true"],
        &[
            "--set",
            "console.enabled=true",
            "--set",
            "console.auth.mode=proxy",
            "--set",
            "console.auth.impersonate.users={alice,bob}",
            "--set",
            "console.auth.impersonate.groups={team-a}",
        ],
        // The Ingress, with a host, a class, annotations and TLS.
        &[
            "--set",
            "console.enabled=true",
            "--set",
            "console.ingress.enabled=true",
            "--set",
            "console.ingress.className=nginx",
            "--set",
            "console.ingress.host=console.example.com",
            "--set",
            "console.ingress.tlsSecret=console-tls",
            "--set-string",
            "console.ingress.annotations.nginx\\.ingress\\.kubernetes\\.io/proxy-read-timeout=60",
        ],
        // The Ingress for any host, proxy mode for anyone, namespaced operator RBAC.
        &[
            "--set",
            "console.enabled=true",
            "--set",
            "console.auth.mode=proxy",
            "--set",
            "console.ingress.enabled=true",
            "--set",
            "console.service.type=NodePort",
            "--set",
            &format!("watchNamespaces={{{}}}", ns.name()),
        ],
    ];
    let console = console_name(CONSOLE_RELEASE);
    for extra in variants {
        let manifests = render_chart(&tb, ns.name(), extra);
        assert!(manifests.contains(&format!("name: {console}\n")));
        let mut apply = tb.kubectl().expect("kubectl");
        apply.args(["apply", "--dry-run=server", "-n", ns.name(), "-f", "-"]);
        let (ok, text) = run_with_stdin(apply, &manifests);
        assert!(
            ok,
            "the API server refused the chart with the console ({extra:?}):\n{text}"
        );
        for object in ["serviceaccount", "deployment.apps", "service"] {
            assert!(
                text.contains(&format!("{object}/{console} created (server dry run)")),
                "{extra:?}: {object} missing:\n{text}"
            );
        }
        if extra.contains(&"console.ingress.enabled=true") {
            assert!(
                text.contains(&format!(
                    "ingress.networking.k8s.io/{console} created (server dry run)"
                )),
                "{text}"
            );
        }

        // Pod Security is enforced on pods, not on Deployments: a pod made of
        // the Deployment's template must be admitted in the restricted
        // namespace. (Under the namespace's default account: the console's
        // exists only in the dry run.)
        let objects = render_objects(&tb, ns.name(), extra);
        let deployment = object(&objects, "Deployment", &console);
        let mut spec = serde_json::to_value(&deployment["spec"]["template"]["spec"]).expect("json");
        spec["serviceAccountName"] = "default".into();
        let pod = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "console-pod-security", "namespace": ns.name()},
            "spec": spec,
        });
        let mut apply = tb.kubectl().expect("kubectl");
        apply.args(["apply", "--dry-run=server", "-n", ns.name(), "-f", "-"]);
        let (ok, text) = run_with_stdin(apply, &pod.to_string());
        assert!(
            ok,
            "the console's pod is refused in a restricted namespace ({extra:?}):\n{text}"
        );
    }
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn console_deployment_reads_the_operator_config_writes_only_tmp_and_gets_its_flags() {
    let tb = testbed().await;
    let console = console_name(CONSOLE_RELEASE);
    let operator = format!("{CONSOLE_RELEASE}-keystone");
    // A cluster with SASL credentials: the operator reads them through the API
    // (nothing mounted), so the console mounts exactly what the operator does.
    let sasl = r#"kafka.clusters.default={"bootstrapServers":"k:9093","securityProtocol":"SASL_SSL","sasl":{"mechanism":"SCRAM-SHA-512","username":{"secret":"kafka-user","key":"username"},"password":{"secret":"kafka-user","key":"password"}},"tls":{"ca":{"secret":"kafka-ca","key":"ca.crt"}}}"#;
    let objects = render_objects(
        &tb,
        "ks",
        &["--set", "console.enabled=true", "--set-json", sasl],
    );
    let deployment = object(&objects, "Deployment", &console);
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    assert_eq!(
        pod["spec"]["containers"].as_sequence().map(Vec::len),
        Some(1)
    );
    assert_eq!(container["image"].as_str(), Some("keystone/console:0.1.0"));

    // The Kafka credentials, to read dead letters with: get on exactly the
    // Secrets the configuration names, bound to the console's account.
    let role = object(&objects, "Role", &format!("{console}-kafka-credentials"));
    assert_eq!(role["rules"].as_sequence().map(Vec::len), Some(1));
    assert_eq!(strings(&role["rules"][0]["resources"]), ["secrets"]);
    assert_eq!(strings(&role["rules"][0]["verbs"]), ["get"]);
    assert_eq!(
        strings(&role["rules"][0]["resourceNames"]),
        ["kafka-ca", "kafka-user"]
    );
    let binding = object(
        &objects,
        "RoleBinding",
        &format!("{console}-kafka-credentials"),
    );
    assert_eq!(
        binding["subjects"][0]["name"].as_str(),
        Some(console.as_str())
    );

    // Its own ServiceAccount, not the operator's.
    object(&objects, "ServiceAccount", &console);
    assert_eq!(
        pod["spec"]["serviceAccountName"].as_str(),
        Some(console.as_str())
    );
    assert_ne!(console, operator);

    // Restricted: non-root, read-only root filesystem, a writable /tmp.
    assert_eq!(
        pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
    assert_eq!(
        pod["spec"]["securityContext"]["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&security["capabilities"]["drop"]), ["ALL"]);
    let mounts = container["volumeMounts"].as_sequence().expect("mounts");
    let volumes = pod["spec"]["volumes"].as_sequence().expect("volumes");
    let tmp = mounts
        .iter()
        .find(|m| m["mountPath"].as_str() == Some("/tmp"))
        .expect("a /tmp mount");
    let tmp_volume = volumes
        .iter()
        .find(|v| v["name"] == tmp["name"])
        .expect("the /tmp volume");
    assert!(tmp_volume["emptyDir"].is_mapping(), "{tmp_volume:?}");

    // The operator's ConfigMap, at the operator's path, read through
    // KEYSTONE_OPERATOR_CONFIG as the operator reads it through --config.
    let operator_deployment = object(&objects, "Deployment", &operator);
    let operator_pod = &operator_deployment["spec"]["template"]["spec"];
    let operator_container = &operator_pod["containers"][0];
    let config_arg = strings(&operator_container["args"])
        .into_iter()
        .find_map(|a| a.strip_prefix("--config=").map(str::to_owned))
        .expect("the operator's --config");
    assert_eq!(
        env_value(container, "KEYSTONE_OPERATOR_CONFIG"),
        Some(config_arg.as_str())
    );
    let without_tmp = |list: &[serde_yaml_ng::Value]| -> Vec<serde_yaml_ng::Value> {
        list.iter()
            .filter(|v| v["name"] != tmp["name"])
            .cloned()
            .collect()
    };
    assert_eq!(
        without_tmp(mounts),
        operator_container["volumeMounts"]
            .as_sequence()
            .cloned()
            .unwrap_or_default(),
        "the console mounts what the operator mounts, and /tmp"
    );
    assert_eq!(
        without_tmp(volumes),
        operator_pod["volumes"]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
    );
    assert!(
        volumes.iter().all(|v| v["secret"].is_null()),
        "no Secret is mounted: {volumes:?}"
    );
    // It restarts when the operator's configuration changes.
    assert_eq!(
        pod["metadata"]["annotations"]["checksum/config"],
        operator_deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    );

    // Probes on /healthz at the port named http, where it listens.
    assert_eq!(container["ports"][0]["name"].as_str(), Some("http"));
    assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(8080));
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            container[probe]["httpGet"]["path"].as_str(),
            Some("/healthz")
        );
        assert_eq!(container[probe]["httpGet"]["port"].as_str(), Some("http"));
    }
    // The defaults: token sign-in, cookies without Secure, no proxy headers.
    assert_eq!(
        env_value(container, "KEYSTONE_CONSOLE_LISTEN"),
        Some("0.0.0.0:8080")
    );
    assert_eq!(env_value(container, "KEYSTONE_CONSOLE_AUTH"), Some("token"));
    assert_eq!(
        env_value(container, "KEYSTONE_CONSOLE_SECURE_COOKIES"),
        Some("false")
    );
    assert_eq!(env_value(container, "KEYSTONE_LOG_FORMAT"), Some("json"));
    assert!(env_value(container, "RUST_LOG").is_some());
    assert_eq!(env_value(container, "KEYSTONE_CONSOLE_USER_HEADER"), None);

    // Its pods are not the operator's: the operator's Service and the
    // pipelines' NetworkPolicies (which admit the operator's pods) skip them.
    let labels = &pod["metadata"]["labels"];
    assert_eq!(
        labels["app.kubernetes.io/name"].as_str(),
        Some("keystone-console")
    );
    let service = object(&objects, "Service", &console);
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(service["spec"]["type"].as_str(), Some("ClusterIP"));
    assert_eq!(service["spec"]["ports"][0]["port"].as_u64(), Some(80));
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"].as_str(),
        Some("http")
    );
    let operator_service = object(&objects, "Service", &format!("{operator}-metrics"));
    assert_ne!(
        operator_service["spec"]["selector"],
        service["spec"]["selector"]
    );

    // Secure cookies: when asked, and whenever the Ingress terminates TLS.
    let secure = |extra: &[&str]| {
        let mut args = vec!["--set", "console.enabled=true"];
        args.extend_from_slice(extra);
        let objects = render_objects(&tb, "ks", &args);
        let container =
            &object(&objects, "Deployment", &console)["spec"]["template"]["spec"]["containers"][0];
        env_value(container, "KEYSTONE_CONSOLE_SECURE_COOKIES").map(str::to_owned)
    };
    assert_eq!(
        secure(&["--set", "console.secureCookies=true"]).as_deref(),
        Some("true")
    );
    assert_eq!(
        secure(&[
            "--set",
            "console.ingress.enabled=true",
            "--set",
            "console.ingress.tlsSecret=console-tls"
        ])
        .as_deref(),
        Some("true")
    );
    assert_eq!(
        secure(&["--set", "console.ingress.enabled=true"]).as_deref(),
        Some("false")
    );

    // Proxy mode: the identity headers; the Ingress: host, TLS, path / as a prefix.
    let objects = render_objects(
        &tb,
        "ks",
        &[
            "--set",
            "console.enabled=true",
            "--set",
            "console.auth.mode=proxy",
            "--set",
            "console.auth.userHeader=X-Auth-Request-User",
            "--set",
            "console.auth.groupsHeader=X-Auth-Request-Groups",
            "--set",
            "console.bindAddress=$(POD_IP)",
            "--set",
            "console.ingress.enabled=true",
            "--set",
            "console.ingress.host=console.example.com",
            "--set",
            "console.ingress.tlsSecret=console-tls",
        ],
    );
    let container =
        &object(&objects, "Deployment", &console)["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env_value(container, "KEYSTONE_CONSOLE_AUTH"), Some("proxy"));
    assert_eq!(
        env_value(container, "KEYSTONE_CONSOLE_USER_HEADER"),
        Some("X-Auth-Request-User")
    );
    assert_eq!(
        env_value(container, "KEYSTONE_CONSOLE_GROUPS_HEADER"),
        Some("X-Auth-Request-Groups")
    );
    // $(POD_IP) is expanded by the kubelet from a variable defined before it.
    let env_names: Vec<&str> = container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    let position = |var: &str| env_names.iter().position(|n| *n == var);
    assert!(position("POD_IP") < position("KEYSTONE_CONSOLE_LISTEN"));
    assert_eq!(
        env_value(container, "KEYSTONE_CONSOLE_LISTEN"),
        Some("$(POD_IP):8080")
    );
    let ingress = object(&objects, "Ingress", &console);
    assert_eq!(ingress["apiVersion"].as_str(), Some("networking.k8s.io/v1"));
    let rule = &ingress["spec"]["rules"][0];
    assert_eq!(rule["host"].as_str(), Some("console.example.com"));
    let path = &rule["http"]["paths"][0];
    assert_eq!(path["path"].as_str(), Some("/"));
    assert_eq!(path["pathType"].as_str(), Some("Prefix"));
    assert_eq!(
        path["backend"]["service"]["name"].as_str(),
        Some(console.as_str())
    );
    assert_eq!(
        path["backend"]["service"]["port"]["name"].as_str(),
        Some("http")
    );
    let tls = &ingress["spec"]["tls"][0];
    assert_eq!(tls["secretName"].as_str(), Some("console-tls"));
    assert_eq!(strings(&tls["hosts"]), ["console.example.com"]);
}

#[tokio::test]
async fn console_in_token_mode_has_a_service_account_bound_to_nothing() {
    let tb = testbed().await;
    let console = console_name(CONSOLE_RELEASE);
    // Both shapes of the operator's RBAC, and the Ingress.
    for extra in [
        &["--set", "console.enabled=true"][..],
        &[
            "--set",
            "console.enabled=true",
            "--set",
            "console.ingress.enabled=true",
            "--set",
            "watchNamespaces={apps,more-apps}",
        ][..],
    ] {
        let objects = render_objects(&tb, "ks", extra);
        object(&objects, "ServiceAccount", &console);
        // Every binding names ServiceAccounts only (no User or Group that
        // the console's account could belong to), and none names the console's.
        for binding in objects
            .iter()
            .filter(|o| matches!(kind(o), "RoleBinding" | "ClusterRoleBinding"))
        {
            for subject in binding["subjects"].as_sequence().expect("subjects") {
                assert_eq!(
                    subject["kind"].as_str(),
                    Some("ServiceAccount"),
                    "{binding:?}"
                );
                assert_ne!(
                    subject["name"].as_str(),
                    Some(console.as_str()),
                    "{extra:?}: {binding:?}"
                );
            }
        }
        assert!(
            rules_granted_to(&objects, "ks", &console).is_empty(),
            "{extra:?}"
        );
        let roles: Vec<&str> = console_objects(&objects)
            .into_iter()
            .map(kind)
            .filter(|k| k.contains("Role"))
            .collect();
        assert!(roles.is_empty(), "{extra:?}: {roles:?}");
    }

    // Installed, the API server's authorizer agrees: the console's account may
    // do exactly what an account nobody bound anything to may do.
    let ns = pipeline_namespace(&tb, "helm-console-token").await;
    let release_ns = operator_namespace(&tb, &ns).await;
    let release = unique("ksct");
    let installed = install_console_only(&tb, &release, release_ns.name(), &[]);
    let account = format!(
        "system:serviceaccount:{release_ns}:{}",
        console_name(&release)
    );
    let nobody = format!("system:serviceaccount:{release_ns}:nobody-bound-this");
    for namespace in [release_ns.name(), ns.name()] {
        assert_eq!(
            rules_listed(&tb, &account, namespace),
            rules_listed(&tb, &nobody, namespace),
            "the console's account has rights in {namespace}"
        );
    }
    assert_refused(
        &tb,
        &account,
        &[
            &["impersonate", "users"],
            &["impersonate", "groups"],
            &["list", "pipelines.keystone.dev", "--all-namespaces"],
            &["get", "secrets", "-n", release_ns.name()],
        ],
    );
    // The operator's account still has its rights (the check can say yes).
    let operator = format!("system:serviceaccount:{release_ns}:{release}-keystone");
    assert!(can_i(
        &tb,
        &operator,
        &["list", "pipelines.keystone.dev", "--all-namespaces"]
    ));
    drop(installed);
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn console_in_proxy_mode_may_impersonate_users_and_groups_and_nothing_else() {
    let tb = testbed().await;
    let console = console_name(CONSOLE_RELEASE);
    let rule_of = |rules: &[serde_yaml_ng::Value], resource: &str| -> serde_yaml_ng::Value {
        let matching: Vec<&serde_yaml_ng::Value> = rules
            .iter()
            .filter(|r| strings(&r["resources"]).contains(&resource.to_owned()))
            .collect();
        assert_eq!(matching.len(), 1, "one rule on {resource}: {rules:?}");
        matching[0].clone()
    };
    let check = |rules: &[serde_yaml_ng::Value], users: &[&str], groups: &[&str]| {
        assert_eq!(rules.len(), 2, "{rules:?}");
        for (resource, names) in [("users", users), ("groups", groups)] {
            let rule = rule_of(rules, resource);
            assert_eq!(strings(&rule["apiGroups"]), [""], "{rule:?}");
            assert_eq!(strings(&rule["resources"]), [resource], "{rule:?}");
            assert_eq!(strings(&rule["verbs"]), ["impersonate"], "{rule:?}");
            if names.is_empty() {
                assert!(rule["resourceNames"].is_null(), "{rule:?}");
            } else {
                assert_eq!(strings(&rule["resourceNames"]), names, "{rule:?}");
            }
        }
    };

    // Any user and group when none are listed.
    let objects = render_objects(
        &tb,
        "ks",
        &[
            "--set",
            "console.enabled=true",
            "--set",
            "console.auth.mode=proxy",
        ],
    );
    check(&rules_granted_to(&objects, "ks", &console), &[], &[]);
    // Bounded by the lists.
    let bounded = [
        "--set",
        "console.enabled=true",
        "--set",
        "console.auth.mode=proxy",
        "--set",
        "console.auth.impersonate.users={alice,bob}",
        "--set",
        "console.auth.impersonate.groups={team-a}",
    ];
    let objects = render_objects(&tb, "ks", &bounded);
    check(
        &rules_granted_to(&objects, "ks", &console),
        &["alice", "bob"],
        &["team-a"],
    );
    // A ClusterRole and its binding, to the console's account alone.
    let binding = object(&objects, "ClusterRoleBinding", &console);
    assert_eq!(binding["roleRef"]["kind"].as_str(), Some("ClusterRole"));
    assert_eq!(binding["roleRef"]["name"].as_str(), Some(console.as_str()));
    let subjects = binding["subjects"].as_sequence().expect("subjects");
    assert_eq!(subjects.len(), 1, "{binding:?}");
    assert_eq!(subjects[0]["name"].as_str(), Some(console.as_str()));
    let mut kinds: Vec<&str> = console_objects(&objects)
        .into_iter()
        .map(kind)
        .filter(|k| k.contains("Role"))
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["ClusterRole", "ClusterRoleBinding"]);
    // Without rbac.create the chart makes no RBAC, the console's included.
    let objects = render_objects(
        &tb,
        "ks",
        &[&bounded[..], &["--set", "rbac.create=false"]].concat(),
    );
    assert!(
        objects.iter().all(|o| !kind(o).contains("Role")),
        "{objects:?}"
    );

    // Installed, the API server's authorizer agrees.
    let ns = pipeline_namespace(&tb, "helm-console-proxy").await;
    let release_ns = operator_namespace(&tb, &ns).await;
    let release = unique("kscp");
    let installed = install_console_only(&tb, &release, release_ns.name(), &bounded[2..]);
    let account = format!(
        "system:serviceaccount:{release_ns}:{}",
        console_name(&release)
    );
    assert!(can_i(&tb, &account, &["impersonate", "users/alice"]));
    assert!(can_i(&tb, &account, &["impersonate", "users/bob"]));
    assert!(can_i(&tb, &account, &["impersonate", "groups/team-a"]));
    assert_refused(
        &tb,
        &account,
        &[
            &["impersonate", "users/mallory"],
            &["impersonate", "groups/system:masters"],
            &["impersonate", "serviceaccounts"],
            &["impersonate", "userextras/scopes"],
            &["list", "pipelines.keystone.dev", "--all-namespaces"],
            &["get", "secrets", "-n", release_ns.name()],
            &["list", "pods", "-n", ns.name()],
        ],
    );
    drop(installed);
    ns.delete().await.expect("delete namespace");
}

#[tokio::test]
async fn console_values_outside_the_schema_are_refused() {
    let tb = testbed().await;
    for bad in [
        "console.auth.mode=oidc",
        "console.auth.mode=",
        "console.unknown=1",
        "console.auth.impersonate.serviceaccounts={a}",
        "console.ingress.hosts=a",
        "console.replicaCount=-1",
        "console.service.port=0",
    ] {
        let mut template = helm(&tb);
        template.args([
            "template",
            "x",
            &chart(),
            "--set",
            "console.enabled=true",
            "--set",
            bad,
        ]);
        let out = template.output().expect("helm template");
        assert!(!out.status.success(), "{bad} must be refused");
    }
    for good in ["console.auth.mode=proxy", "console.auth.mode=token"] {
        let mut template = helm(&tb);
        template.args([
            "template",
            "x",
            &chart(),
            "--set",
            "console.enabled=true",
            "--set",
            good,
        ]);
        run_ok(template);
    }
}
