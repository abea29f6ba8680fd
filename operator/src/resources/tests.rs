use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use keystone_crds::pipeline::UpgradeStrategy;
use keystone_crds::{Pipeline, Plan, compile};

use super::deployment::env;
use super::{
    ANNOTATION_PLAN_HASH, LABEL_STAGE, MAX_PIPELINE_NAME, PLAN_KEY, RESTORE_DIR, RESTORE_KEY,
    RuntimeSecurity, WorkloadParams, deployment, name_problem, plan_config_map, plan_json,
    pod_disruption_budget, runtime_security, service, stage_object_name, with_type_meta,
};

const PIPELINE: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: clicks, namespace: web, uid: "1234", generation: 3}
spec:
  source:
    topic: web.clicks
    key: [session_id]
    schema:
      fields:
        - {name: session_id, type: string}
        - {name: user, type: string}
  steps:
    - name: per-user
      dedup: {key: [user], window: 1m}
  parallelism: 2
  sinks:
    - name: out
      kafka: {topic: web.clicks.out, partitions: 3}
"#;

fn fixture() -> (Plan, WorkloadParams) {
    fixture_of(PIPELINE)
}

fn fixture_of(manifest: &str) -> (Plan, WorkloadParams) {
    let pipeline: Pipeline = serde_yaml_ng::from_str(manifest).expect("pipeline");
    let plan = compile(&pipeline, &[]).expect("valid");
    let owner = kube::Resource::controller_owner_ref(&pipeline, &()).expect("owner");
    let params = WorkloadParams {
        owner,
        image: "keystone/runtime:test".into(),
        image_pull_policy: None,
        resources: None,
        strategy: UpgradeStrategy::Rolling,
        kafka_env: vec![env("KAFKA_BOOTSTRAP_SERVERS", "k:9092")],
        security: RuntimeSecurity::default(),
        bind_host: None,
        replicas: None,
        restore: None,
    };
    (plan, params)
}

#[test]
fn one_deployment_per_stage_with_the_plan_hash_and_a_restricted_pod() {
    let (plan, params) = fixture();
    assert_eq!(
        plan.stages.len(),
        2,
        "the dedup by another key needs its own stage"
    );
    let d = deployment(&plan, &plan.stages[1], &params);
    assert_eq!(d.metadata.name.as_deref(), Some("clicks-s1"));
    let owner = &d.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.kind, "Pipeline");
    let spec = d.spec.expect("spec");
    assert_eq!(spec.replicas, Some(2));
    let template = spec.template;
    let annotations = template
        .metadata
        .expect("meta")
        .annotations
        .expect("annotations");
    assert_eq!(annotations[ANNOTATION_PLAN_HASH], plan.hash());
    let pod = template.spec.expect("pod");
    assert_eq!(pod.automount_service_account_token, Some(false));
    let c = &pod.containers[0];
    assert_eq!(
        c.args.as_deref().expect("args"),
        [
            "serve",
            "--plan",
            "/etc/keystone/plan.json",
            "--stage",
            "s1"
        ]
    );
    let sc = c.security_context.as_ref().expect("security context");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    let probe = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("probe");
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    let envs: Vec<&str> = c
        .env
        .as_ref()
        .expect("env")
        .iter()
        .map(|e| e.name.as_str())
        .collect();
    for name in ["POD_NAME", "POD_NAMESPACE", "KAFKA_BOOTSTRAP_SERVERS"] {
        assert!(envs.contains(&name), "{name} missing from {envs:?}");
    }
}

#[test]
fn sasl_and_tls_reach_the_runtime_without_secrets_in_the_deployment() {
    use crate::config::{KafkaCluster, SaslConfig, SecretKey, TlsConfig};
    let key = |secret: &str, key: &str| SecretKey {
        secret: secret.into(),
        key: key.into(),
    };
    let cluster = KafkaCluster {
        bootstrap_servers: "k:9093".into(),
        security_protocol: Some("SASL_SSL".into()),
        tls: Some(TlsConfig {
            ca: Some(key("kafka-ca", "ca.crt")),
            ..TlsConfig::default()
        }),
        sasl: Some(SaslConfig {
            mechanism: "SCRAM-SHA-512".into(),
            username: key("kafka-user", "username"),
            password: key("kafka-user", "password"),
        }),
        ..KafkaCluster::default()
    };
    let (plan, mut params) = fixture();
    params.security = runtime_security(&cluster);
    let d = deployment(&plan, &plan.stages[0], &params);
    let pod = d.spec.expect("spec").template.spec.expect("pod");
    let c = &pod.containers[0];
    let args = c.args.clone().expect("args");
    for wanted in [
        "--kafka-config=security.protocol=sasl_ssl",
        "--kafka-config=sasl.mechanism=SCRAM-SHA-512",
        "--kafka-config=ssl.ca.location=/etc/keystone-kafka-tls/ca/ca.pem",
    ] {
        assert!(
            args.iter().any(|a| a == wanted),
            "{wanted} missing from {args:?}"
        );
    }
    // Credentials never reach the command line, not even as $(VAR) references
    // the kubelet would expand into it: the runtime reads the environment.
    assert!(
        !args
            .iter()
            .any(|a| a.contains("sasl.password") || a.contains("sasl.username")),
        "credentials in {args:?}"
    );
    let env = c.env.clone().expect("env");
    let password = env
        .iter()
        .find(|e| e.name == "KAFKA_SASL_PASSWORD")
        .expect("password env");
    assert_eq!(password.value, None);
    let selector = password
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .expect("secret ref");
    assert_eq!(
        (selector.name.as_str(), selector.key.as_str()),
        ("kafka-user", "password")
    );
    let volumes = pod.volumes.expect("volumes");
    let ca = volumes
        .iter()
        .find(|v| v.name == "kafka-tls-ca")
        .expect("ca volume");
    assert_eq!(
        ca.secret.as_ref().and_then(|s| s.secret_name.as_deref()),
        Some("kafka-ca")
    );
    assert!(
        c.volume_mounts
            .as_ref()
            .expect("mounts")
            .iter()
            .any(|m| m.mount_path == "/etc/keystone-kafka-tls/ca")
    );
}

/// The fixture writing to a search index as `credentials`, trusting the CA in `es-ca`.
fn search_fixture(credentials: &str) -> (Plan, WorkloadParams) {
    let manifest = PIPELINE
            .replace(
                "        - {name: user, type: string}\n",
                "        - {name: user, type: string}\n        - {name: seq, type: integer}\n",
            )
            .replace(
                "    - name: out\n      kafka: {topic: web.clicks.out, partitions: 3}\n",
                &format!(
                    "    - name: search-eu\n      elasticsearch: {{endpoint: 'https://es:9200', index: clicks, idFields: [user], versionField: seq, credentialsSecret: {credentials}, caSecret: es-ca}}\n"
                ),
            );
    fixture_of(&manifest)
}

fn container_env(deployment: &Deployment) -> Vec<EnvVar> {
    deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|pod| pod.containers[0].env.clone())
        .unwrap_or_default()
}

#[test]
fn the_stage_that_writes_the_sinks_reads_their_secrets_by_reference() {
    use keystone_crds::pipeline::SinkSecretKey;
    let (plan, params) = search_fixture("es-creds");
    assert_eq!(
        plan.stages.len(),
        2,
        "the dedup by user needs its own stage"
    );
    let sink = &plan.sinks[0].spec;
    let writer = deployment(&plan, &plan.stages[1], &params);
    let refs: Vec<(String, String, String, Option<bool>)> = container_env(&writer)
        .into_iter()
        .filter(|e| e.name.starts_with("KEYSTONE_SINK_"))
        .map(|e| {
            assert_eq!(e.value, None, "{} carries a value", e.name);
            let selector = e
                .value_from
                .and_then(|v| v.secret_key_ref)
                .expect("a Secret reference");
            (e.name, selector.name, selector.key, selector.optional)
        })
        .collect();
    let expected = [
        (
            "KEYSTONE_SINK_SEARCH_EU_USERNAME",
            "es-creds",
            "username",
            Some(true),
        ),
        (
            "KEYSTONE_SINK_SEARCH_EU_PASSWORD",
            "es-creds",
            "password",
            Some(true),
        ),
        (
            "KEYSTONE_SINK_SEARCH_EU_API_KEY",
            "es-creds",
            "apiKey",
            Some(true),
        ),
        ("KEYSTONE_SINK_SEARCH_EU_CA_CERT", "es-ca", "ca.crt", None),
    ]
    .map(|(env, secret, key, optional)| {
        (env.to_owned(), secret.to_owned(), key.to_owned(), optional)
    });
    assert_eq!(refs, expected);
    // The names are the ones the runtime looks up.
    assert_eq!(refs[0].0, sink.secret_env(SinkSecretKey::Username));
    assert_eq!(refs[3].0, sink.secret_env(SinkSecretKey::CaCert));

    // The stage before the repartition writes no sink, so it reads no sink Secret.
    let reader = deployment(&plan, &plan.stages[0], &params);
    let names: Vec<String> = container_env(&reader).into_iter().map(|e| e.name).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("KEYSTONE_SINK_")),
        "{names:?}"
    );
}

#[test]
fn a_renamed_sink_secret_rolls_the_pods_that_read_it() {
    let (plan, params) = search_fixture("es-creds");
    let (renamed, _) = search_fixture("es-creds-2");
    let before = deployment(&plan, &plan.stages[1], &params);
    let after = deployment(&renamed, &renamed.stages[1], &params);
    assert_ne!(
        before.spec.as_ref().expect("spec").template,
        after.spec.as_ref().expect("spec").template
    );
    // Not only through the plan hash: the references themselves change.
    assert_ne!(container_env(&before), container_env(&after));
}

#[test]
fn names_that_cannot_name_services_are_refused() {
    assert_eq!(name_problem("orders"), None);
    assert_eq!(name_problem(&"a".repeat(MAX_PIPELINE_NAME)), None);
    assert!(name_problem(&"a".repeat(MAX_PIPELINE_NAME + 1)).is_some());
    assert!(name_problem("1orders").is_some_and(|m| m.contains("lowercase letter")));
    // A dot is a valid resource name, but not in a Service name.
    assert!(name_problem("orders.eu").is_some_and(|m| m.contains("no '.'")));
    let longest = stage_object_name(&"a".repeat(MAX_PIPELINE_NAME), "s999");
    assert!(longest.len() <= 63, "{}", longest.len());
}

#[test]
fn a_changed_plan_changes_the_pod_template() {
    let (plan, params) = fixture();
    let before = deployment(&plan, &plan.stages[0], &params);
    let mut changed = plan.clone();
    changed.commit_interval_ms += 1;
    let after = deployment(&changed, &changed.stages[0], &params);
    assert_ne!(
        before.spec.expect("spec").template,
        after.spec.expect("spec").template
    );
}

#[test]
fn a_restore_is_mounted_passed_and_rolls_the_pods_and_replicas_can_be_held() {
    let (plan, mut params) = fixture();
    let before = deployment(&plan, &plan.stages[0], &params);
    params.restore = Some("p-restore-r1".to_owned());
    params.replicas = Some(0);
    let after = deployment(&plan, &plan.stages[0], &params);
    let spec = after.spec.expect("spec");
    assert_eq!(spec.replicas, Some(0));
    assert_ne!(before.spec.expect("spec").template, spec.template);
    let pod = spec.template.spec.expect("pod spec");
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap_or_default();
    let at = args
        .iter()
        .position(|a| a == "--restore")
        .expect("--restore");
    assert_eq!(args[at + 1], format!("{RESTORE_DIR}/{RESTORE_KEY}"));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "restore")
        .expect("restore volume");
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some("p-restore-r1")
    );
    assert!(
        container
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.name == "restore" && m.mount_path == RESTORE_DIR)
    );
}

#[test]
fn service_pdb_and_config_map_select_and_carry_the_plan() {
    let (plan, params) = fixture();
    let stage = &plan.stages[0];
    let svc = service(&plan, stage, &params.owner);
    let selector = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.clone())
        .expect("selector");
    assert_eq!(selector[LABEL_STAGE], "s0");
    let pdb = pod_disruption_budget(&plan, stage, &params.owner);
    assert_eq!(
        pdb.spec.and_then(|s| s.max_unavailable),
        Some(IntOrString::Int(1))
    );
    let json = plan_json(&plan).expect("json");
    let cm = plan_config_map(&plan, json.clone(), &params.owner);
    assert_eq!(
        cm.metadata.name,
        Some(format!("clicks-plan-{}", plan.hash()))
    );
    assert_eq!(cm.immutable, Some(true));
    let back: Plan =
        serde_json::from_str(&cm.data.as_ref().expect("data")[PLAN_KEY]).expect("plan");
    assert_eq!(back, plan);
    let value = with_type_meta(&cm).expect("value");
    assert_eq!(value["kind"], "ConfigMap");
    assert_eq!(value["apiVersion"], "v1");
}

#[test]
fn credentials_hash_follows_the_secret_data() {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;

    use super::{credentials_hash, referenced_secret_keys};
    use crate::config::{KafkaCluster, SaslConfig, SecretKey};

    let key = |secret: &str, key: &str| SecretKey {
        secret: secret.into(),
        key: key.into(),
    };
    let cluster = KafkaCluster {
        bootstrap_servers: "kafka:9093".into(),
        sasl: Some(SaslConfig {
            mechanism: "SCRAM-SHA-512".into(),
            username: key("kafka-user", "username"),
            password: key("kafka-user", "password"),
        }),
        ..KafkaCluster::default()
    };
    let keys = referenced_secret_keys(&cluster);
    assert_eq!(keys.len(), 2);
    let secret = |password: &str| {
        let mut data = BTreeMap::new();
        data.insert("username".to_owned(), ByteString(b"orders".to_vec()));
        data.insert(
            "password".to_owned(),
            ByteString(password.as_bytes().to_vec()),
        );
        BTreeMap::from([(
            "kafka-user".to_owned(),
            Secret {
                data: Some(data),
                ..Secret::default()
            },
        )])
    };
    let first = credentials_hash(&keys, &secret("one"));
    assert_eq!(first, credentials_hash(&keys, &secret("one")), "stable");
    assert_ne!(first, credentials_hash(&keys, &secret("two")), "rotation");
    let absent = credentials_hash(&keys, &BTreeMap::new());
    assert_ne!(first, absent, "a created Secret rolls the pods too");
    assert!(!first.contains("one"));

    // The digest rides on the pod template, where a change rolls the pods.
    let (plan, mut params) = fixture();
    params.security = runtime_security(&cluster);
    params
        .security
        .annotations
        .insert(super::ANNOTATION_CREDENTIALS_HASH.to_owned(), first.clone());
    let d = deployment(&plan, &plan.stages[0], &params);
    let annotations = d
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .expect("annotations");
    assert_eq!(
        annotations.get(super::ANNOTATION_CREDENTIALS_HASH),
        Some(&first)
    );
}

#[test]
fn config_map_documents_fit_compactly_or_are_refused_with_their_size() {
    use super::{CONFIG_MAP_DATA_LIMIT, FitError, fitting_json};
    use keystone_crds::checkpoint::{CheckpointTrigger, PipelineCheckpoint, StageCheckpoint};
    // A checkpoint of two stages, each with `partitions` input partitions and
    // two changelogs, as the operator stores it.
    let checkpoint = |partitions: i32| PipelineCheckpoint {
        id: "20260102-150405-123".into(),
        pipeline: "p".into(),
        namespace: "ns".into(),
        plan_hash: "0123456789abcdef".into(),
        time: "2026-01-02T15:04:05Z".into(),
        trigger: CheckpointTrigger::Manual,
        stages: (0..2)
            .map(|s| StageCheckpoint {
                name: format!("s{s}"),
                input_topic: format!("keystone.ns.p.s{s}.input"),
                source_offsets: (0..partitions)
                    .map(|p| (p, 1_000_000_000 + i64::from(p)))
                    .collect(),
                changelog_positions: (0..2)
                    .map(|c| {
                        (
                            format!("keystone.ns.p.s{s}.step{c}.changelog"),
                            (0..partitions)
                                .map(|p| (p, 2_000_000_000 + i64::from(p)))
                                .collect(),
                        )
                    })
                    .collect(),
            })
            .collect(),
        sink_positions: Default::default(),
    };
    // Small: legible, pretty-printed.
    let small = fitting_json(&checkpoint(10), "checkpoint", "").expect("fits");
    assert!(small.contains('\n'));
    // Thousands of partitions: too large pretty-printed, fits compact.
    let many = checkpoint(8_000);
    assert!(serde_json::to_string_pretty(&many).unwrap().len() > CONFIG_MAP_DATA_LIMIT);
    let compact = fitting_json(&many, "checkpoint", "").expect("fits compactly");
    assert!(!compact.contains('\n') && compact.len() <= CONFIG_MAP_DATA_LIMIT);
    let back: PipelineCheckpoint = serde_json::from_str(&compact).expect("reads back");
    assert_eq!(back, many);
    // Beyond what any encoding here holds: refused, naming the size.
    match fitting_json(&checkpoint(40_000), "checkpoint", " (fewer partitions)") {
        Err(FitError::TooLarge(too_large)) => {
            let message = too_large.to_string();
            assert!(message.contains("checkpoint is"), "{message}");
            assert!(message.contains(&too_large.size.to_string()), "{message}");
            assert!(too_large.size > CONFIG_MAP_DATA_LIMIT);
            assert!(message.contains("fewer partitions"), "{message}");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

const CAPTURE_PIPELINE: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: orders, namespace: shop, uid: "5678", generation: 1}
spec:
  source:
    topic: shop.orders.cdc
    key: [id]
    postgres: {host: db, database: shop, credentialsSecret: shop-db, tables: [orders]}
    schema:
      fields:
        - {name: id, type: integer}
  parallelism: 3
  sinks:
    - name: out
      kafka: {topic: shop.orders.out, partitions: 3}
"#;

#[test]
fn the_capture_runs_alone_replaced_not_rolled_with_credentials_by_reference() {
    let (plan, mut params) = fixture_of(CAPTURE_PIPELINE);
    let capture = super::capture_deployment(&plan, "shop-db", &params);
    assert_eq!(capture.metadata.name.as_deref(), Some("orders-capture"));
    let spec = capture.spec.as_ref().unwrap();
    assert_eq!(
        spec.replicas,
        Some(1),
        "one capture, whatever the parallelism"
    );
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("Recreate")
    );
    let labels = spec.selector.match_labels.as_ref().unwrap();
    assert_eq!(labels[LABEL_STAGE], super::CAPTURE_COMPONENT);
    let container = &spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        container.args.as_deref().unwrap()[..3],
        ["capture", "--plan", &format!("/etc/keystone/{PLAN_KEY}")]
    );
    let env = container_env(&capture);
    for (name, key) in [
        ("KEYSTONE_POSTGRES_USER", "username"),
        ("KEYSTONE_POSTGRES_PASSWORD", "password"),
    ] {
        let var = env.iter().find(|e| e.name == name).unwrap();
        let secret = var
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("shop-db", key)
        );
        assert!(var.value.is_none());
    }
    // Suspended: no capture either.
    params.replicas = Some(0);
    let suspended = super::capture_deployment(&plan, "shop-db", &params);
    assert_eq!(suspended.spec.unwrap().replicas, Some(0));
}

const INGEST_PIPELINE: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: clicks, namespace: web, uid: "9012", generation: 1}
spec:
  source:
    topic: web.clicks
    key: [user]
    http: {path: /v1/clicks, tokensSecret: clicks-tokens, replicas: 3}
    schema:
      fields:
        - {name: user, type: string}
  sinks:
    - name: out
      kafka: {topic: web.clicks.out, partitions: 3}
"#;

#[test]
fn the_ingest_endpoint_rolls_its_replicas_with_the_tokens_secret_mounted() {
    let (plan, mut params) = fixture_of(INGEST_PIPELINE);
    let http = plan.ingest.clone().expect("the plan's ingest");
    let ingest = super::ingest_deployment(&plan, &http, &params);
    assert_eq!(ingest.metadata.name.as_deref(), Some("clicks-ingest"));
    let spec = ingest.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.strategy.as_ref().and_then(|s| s.type_.as_deref()),
        Some("RollingUpdate")
    );
    assert_eq!(
        spec.selector.match_labels.as_ref().unwrap()[LABEL_STAGE],
        super::INGEST_COMPONENT
    );
    let pod = spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    assert_eq!(
        container.args.as_deref().unwrap()[..3],
        ["ingest", "--plan", &format!("/etc/keystone/{PLAN_KEY}")]
    );
    let tokens = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "ingest-tokens")
        .expect("the tokens volume");
    assert_eq!(
        tokens
            .secret
            .as_ref()
            .and_then(|s| s.secret_name.as_deref()),
        Some("clicks-tokens")
    );
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "ingest-tokens")
        .expect("the tokens mount");
    let env = container_env(&ingest);
    let dir = env
        .iter()
        .find(|e| e.name == "KEYSTONE_INGEST_TOKENS")
        .and_then(|e| e.value.clone());
    assert_eq!(dir.as_deref(), Some(mount.mount_path.as_str()));
    assert_eq!(mount.read_only, Some(true));
    // Suspended: no endpoint either.
    params.replicas = Some(0);
    let suspended = super::ingest_deployment(&plan, &http, &params);
    assert_eq!(suspended.spec.unwrap().replicas, Some(0));
}

#[test]
fn the_ingest_endpoint_is_open_to_clients_on_its_port_only() {
    let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        name: "clicks".into(),
        ..Default::default()
    };
    let policy = super::ingest_network_policy("clicks", "web", super::HTTP_PORT, &owner);
    let json = serde_json::to_value(&policy).expect("json");
    assert_eq!(json["metadata"]["name"], "clicks-ingest");
    assert_eq!(
        json["spec"]["podSelector"]["matchLabels"][LABEL_STAGE],
        super::INGEST_COMPONENT
    );
    let rule = &json["spec"]["ingress"][0];
    assert!(rule.get("from").is_none(), "every peer: {rule}");
    assert_eq!(
        rule["ports"],
        serde_json::json!([{"port": super::HTTP_PORT, "protocol": "TCP"}])
    );
}

#[test]
fn an_ingest_endpoint_with_tls_mounts_its_secrets_and_takes_events_on_the_tls_port() {
    let manifest = INGEST_PIPELINE.replace(
        "replicas: 3}",
        "replicas: 3, tls: {secret: clicks-tls, clientCaSecret: devices-ca}}",
    );
    let (plan, mut params) = fixture_of(&manifest);
    params.bind_host = Some("$(POD_IP)".into());
    let http = plan.ingest.clone().expect("the plan's ingest");
    let ingest = super::ingest_deployment(&plan, &http, &params);
    let pod = ingest
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let container = &pod.containers[0];
    let env = container_env(&ingest);
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
            .unwrap_or_else(|| panic!("no {name}"))
    };
    for (volume, secret, variable) in [
        ("ingest-tls", "clicks-tls", "KEYSTONE_INGEST_TLS"),
        (
            "ingest-client-ca",
            "devices-ca",
            "KEYSTONE_INGEST_CLIENT_CA",
        ),
    ] {
        let found = pod.volumes.iter().flatten().find(|v| v.name == volume);
        assert_eq!(
            found.and_then(|v| v.secret.as_ref()?.secret_name.as_deref()),
            Some(secret)
        );
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume)
            .expect("mounted");
        assert_eq!(value(variable), mount.mount_path);
    }
    assert_eq!(
        value("KEYSTONE_HTTPS_ADDR"),
        format!("$(POD_IP):{}", super::HTTPS_PORT)
    );
    let ports: Vec<_> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        [
            ("http".to_owned(), super::HTTP_PORT),
            ("https".to_owned(), super::HTTPS_PORT)
        ]
    );

    let owner = params.owner.clone();
    let service = serde_json::to_value(super::ingest_service(&plan, &http, &owner)).unwrap();
    assert_eq!(service["spec"]["ports"][1]["port"], super::HTTPS_PORT);
    assert_eq!(service["spec"]["ports"][1]["targetPort"], "https");
    assert_eq!(
        super::ingest_service_url(&plan, &http),
        "https://clicks-ingest.web.svc:8443/v1/clicks"
    );
    let (port, _) = super::ingest_port(&http);
    let policy =
        serde_json::to_value(super::ingest_network_policy("clicks", "web", port, &owner)).unwrap();
    assert_eq!(
        policy["spec"]["ingress"][0]["ports"],
        serde_json::json!([{"port": super::HTTPS_PORT, "protocol": "TCP"}]),
        "only the TLS port is open to clients"
    );
}

#[test]
fn the_charts_ingress_routes_the_endpoints_path_on_its_host() {
    let (plan, params) = fixture_of(INGEST_PIPELINE);
    let http = plan.ingest.clone().expect("the plan's ingest");
    let config = crate::config::IngestIngressConfig {
        enabled: true,
        class_name: Some("nginx".into()),
        host: "{pipeline}.{namespace}.ingest.example.com".into(),
        annotations: std::collections::BTreeMap::from([(
            "nginx.ingress.kubernetes.io/proxy-body-size".into(),
            "16m".into(),
        )]),
        tls_secret: Some("ingest-wildcard".into()),
    };
    let ingress =
        serde_json::to_value(super::ingest_ingress(&config, &plan, &http, &params.owner)).unwrap();
    assert_eq!(ingress["metadata"]["name"], "clicks-ingest");
    assert_eq!(ingress["metadata"]["namespace"], "web");
    assert_eq!(
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"],
        "16m"
    );
    assert_eq!(ingress["metadata"]["ownerReferences"][0]["name"], "clicks");
    assert_eq!(ingress["spec"]["ingressClassName"], "nginx");
    let rule = &ingress["spec"]["rules"][0];
    assert_eq!(rule["host"], "clicks.web.ingest.example.com");
    assert_eq!(
        rule["http"]["paths"],
        serde_json::json!([{
            "path": "/v1/clicks",
            "pathType": "Exact",
            "backend": {"service": {"name": "clicks-ingest", "port": {"name": "http"}}}
        }]),
        "only the events path: probes and metrics stay inside"
    );
    assert_eq!(
        ingress["spec"]["tls"],
        serde_json::json!([{"hosts": ["clicks.web.ingest.example.com"], "secretName": "ingest-wildcard"}])
    );
    assert_eq!(
        super::ingest_ingress_url(&config, &plan, &http),
        "https://clicks.web.ingest.example.com/v1/clicks"
    );
}

#[test]
fn stages_that_read_or_write_avro_get_the_registrys_credentials_and_ca() {
    use keystone_crds::pipeline::avro::SchemaRegistrySpec;
    use keystone_crds::plan::{PlanAvroSink, PlanAvroSource, PlanAvroWriter};
    let (mut plan, params) = search_fixture("es-creds");
    let registry_names = |plan: &Plan, stage: usize| -> Vec<String> {
        container_env(&deployment(plan, &plan.stages[stage], &params))
            .into_iter()
            .filter(|e| e.name.starts_with("KEYSTONE_REGISTRY_"))
            .map(|e| e.name)
            .collect()
    };
    plan.schema_registry = Some(SchemaRegistrySpec {
        url: "https://registry:8081".into(),
        credentials_secret: Some("registry-user".into()),
        ca_secret: Some("registry-ca".into()),
    });
    assert!(
        registry_names(&plan, 0).is_empty(),
        "JSON in and out: no registry"
    );
    plan.source.avro = Some(PlanAvroSource {
        registry_url: "https://registry:8081".into(),
        subject: "clicks-value".into(),
        version: 1,
        reader_schema: "{}".into(),
    });
    let all = [
        "KEYSTONE_REGISTRY_USERNAME",
        "KEYSTONE_REGISTRY_PASSWORD",
        "KEYSTONE_REGISTRY_TOKEN",
        "KEYSTONE_REGISTRY_CA_FILE",
    ];
    assert_eq!(
        registry_names(&plan, 0),
        all,
        "the stage decoding the source"
    );
    assert!(
        registry_names(&plan, 1).is_empty(),
        "it reads the repartition topic's JSON"
    );
    plan.sinks[0].avro = Some(PlanAvroSink {
        registry_url: "https://registry:8081".into(),
        subject: "out-value".into(),
        writer: PlanAvroWriter::Version { version: 2 },
    });
    assert_eq!(
        registry_names(&plan, 1),
        all,
        "the stage writing the Avro sink"
    );
    let writer = deployment(&plan, &plan.stages[1], &params);
    let env = container_env(&writer);
    let password = env
        .iter()
        .find(|e| e.name == "KEYSTONE_REGISTRY_PASSWORD")
        .and_then(|e| e.value_from.as_ref()?.secret_key_ref.clone())
        .expect("a Secret reference");
    assert_eq!(
        (
            password.name.as_str(),
            password.key.as_str(),
            password.optional
        ),
        ("registry-user", "password", Some(true))
    );
    let pod = writer.spec.and_then(|s| s.template.spec).expect("pod");
    let volume = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .find(|v| v.name == "registry-ca")
        .expect("the CA volume");
    assert_eq!(
        volume.secret.and_then(|s| s.secret_name).as_deref(),
        Some("registry-ca")
    );
    let mounts = pod.containers[0].volume_mounts.clone().unwrap_or_default();
    assert!(
        mounts
            .iter()
            .any(|m| m.name == "registry-ca"
                && m.mount_path == "/var/run/secrets/keystone/registry-ca"),
        "{mounts:?}"
    );
}
