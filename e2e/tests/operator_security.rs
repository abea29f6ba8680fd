//! Guard rails of a shared operator, against the real testbed:
//! - the policy (the chart's allow-lists and quotas) refuses a Pipeline asking
//!   for an image or a topic beyond it, naming the field and the limit, and
//!   nothing is created;
//! - on the broker's SASL_SSL (SCRAM-SHA-512) listener, a rotated admin
//!   credential takes effect without restarting the operator, and a rotated
//!   runtime credential rolls the stage's pods, which read it from their
//!   environment (never their command line);
//! - with `authorization: {mode: Acls}`, each Pipeline runs as its own SCRAM
//!   principal with least-privilege ACLs, denied on another's topics, and its
//!   principal and ACLs go with it.

mod operator_support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use keystone_crds::Pipeline;
use keystone_e2e::{Testbed, wait_for, wait_until};
use keystone_kafka_admin::{AclFilter, KafkaAdmin};
use kube::Api;
use kube::api::{Patch, PatchParams};
use operator_support::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

const CREDENTIALS_HASH: &str = "keystone.dev/kafka-credentials-hash";

/// Writes an operator configuration file into the testbed's state dir.
fn config_file(tb: &Testbed, name: &str, text: &str) -> String {
    let path = tb
        .state_dir()
        .join(format!("e2e-operator-config-{name}.yaml"));
    std::fs::write(&path, text).expect("write the operator configuration");
    path.display().to_string()
}

#[tokio::test]
async fn policy_refuses_a_disallowed_image_and_an_oversize_topic_and_creates_nothing() {
    let tb = testbed().await;
    install_crds(&tb);
    let ns = tb.namespace("op-policy").await.expect("namespace");
    let op_ns = operator_namespace(&tb, &ns).await;
    let config = config_file(
        &tb,
        ns.name(),
        r#"
policy:
  allowedRuntimeImages: ["keystone/runtime:*"]
  maxPartitions: 8
  maxReplicationFactor: 1
  allowedTopicConfigs: [retention.ms]
  maxTopicConfigValues: {retention.ms: 2592000000}
"#,
    );
    let operator = OperatorProcess::start_with(
        &tb,
        ns.name(),
        op_ns.name(),
        "op-policy",
        &[("KEYSTONE_OPERATOR_CONFIG", config.as_str())],
    );
    let kafka = Kafka::new(&tb);
    let source = unique("policy-in");
    kafka.create(&source, 2).await;
    let pipelines: Api<Pipeline> = ns.api();
    let deployments: Api<Deployment> = ns.api();

    // An image outside the allow-list.
    let manifest = pipeline_yaml(
        ns.name(),
        "miner",
        &source,
        &format!("{source}.miner"),
        1,
        "Delete",
    )
    .replace(
        "  parallelism: 2\n",
        "  parallelism: 2\n  runtimeImage: evil/miner:1\n",
    );
    apply_yaml(&tb, &manifest).await;
    let p = wait_for(
        &pipelines,
        "miner",
        WAIT,
        "ContractsValid=False PolicyViolation",
        |p| condition(p, "ContractsValid").is_some_and(|c| c.reason == "PolicyViolation"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let c = condition(&p, "ContractsValid").expect("condition");
    assert_eq!(c.status, "False");
    assert!(c.message.contains("spec.runtimeImage"), "{}", c.message);
    assert!(c.message.contains("keystone/runtime:*"), "{}", c.message);

    // More partitions than the quota, a replication factor above the
    // maximum, a topic config off the allow-list and one above its bound.
    let manifest = pipeline_yaml(
        ns.name(),
        "wide",
        &source,
        &format!("{source}.wide"),
        50,
        "Delete",
    )
    .replace(
        r#"config: {retention.ms: "3600000"}"#,
        "replicationFactor: 3\n        config: {retention.ms: \"99999999999\", unclean.leader.election.enable: \"true\"}",
    );
    apply_yaml(&tb, &manifest).await;
    let p = wait_for(
        &pipelines,
        "wide",
        WAIT,
        "ContractsValid=False PolicyViolation",
        |p| condition(p, "ContractsValid").is_some_and(|c| c.reason == "PolicyViolation"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    let c = condition(&p, "ContractsValid").expect("condition");
    assert!(
        c.message.contains("spec.sinks[0].kafka.partitions") && c.message.contains("at most 8"),
        "{}",
        c.message
    );
    assert!(
        c.message
            .contains("spec.sinks[0].kafka.config.unclean.leader.election.enable"),
        "{}",
        c.message
    );
    assert!(
        c.message.contains("spec.sinks[0].kafka.replicationFactor")
            && c.message.contains("replication factor 3"),
        "{}",
        c.message
    );
    assert!(
        c.message
            .contains("spec.sinks[0].kafka.config.retention.ms")
            && c.message.contains("at most 2592000000"),
        "{}",
        c.message
    );

    // Nothing was created for either: no topic, no Deployment.
    for name in ["miner", "wide"] {
        assert_eq!(kafka.partitions(&format!("{source}.{name}")), None);
        assert!(
            deployments
                .get_opt(&format!("{name}-s0"))
                .await
                .expect("get")
                .is_none(),
            "{name} was deployed"
        );
    }

    // Within the policy, a pipeline is accepted and its topic created.
    let manifest = pipeline_yaml(
        ns.name(),
        "narrow",
        &source,
        &format!("{source}.narrow"),
        8,
        "Delete",
    );
    apply_yaml(&tb, &manifest).await;
    wait_condition(&pipelines, "narrow", "TopicsReady", "True").await;
    assert_eq!(kafka.partitions(&format!("{source}.narrow")), Some(8));
    ns.delete().await.expect("delete namespace");
}

/// The testbed's secured listener and the tools to manage its principals.
struct SecureKafka {
    bootstrap: String,
    ca: String,
    plaintext: String,
    libs: String,
}

impl SecureKafka {
    fn new(tb: &Testbed) -> Self {
        let var = |name: &str| {
            tb.var(name)
                .unwrap_or_else(|| {
                    panic!("{name} is not in the testbed env: restart the testbed with this branch's e2e/testbed")
                })
                .to_owned()
        };
        let ca_path = var("KEYSTONE_TESTBED_KAFKA_CA");
        Self {
            bootstrap: var("KAFKA_SECURE_BOOTSTRAP_SERVERS"),
            ca: std::fs::read_to_string(&ca_path).expect("the testbed CA"),
            plaintext: tb.kafka_bootstrap_servers().expect("kafka").to_owned(),
            libs: var("KEYSTONE_TESTBED_KAFKA_LIBS"),
        }
    }

    /// An operator whose one cluster is this listener, authenticating with the
    /// `kafka-credentials` Secret, trusting the CA in `ca_secret`; `extra` is
    /// more of the cluster's configuration (YAML lines indented by 4).
    fn operator(
        &self,
        tb: &Testbed,
        ns: &keystone_e2e::TestNamespace,
        op_ns: &OperatorNamespace,
        identity: &str,
        ca_secret: &str,
        extra: &str,
    ) -> OperatorProcess {
        let config = config_file(
            tb,
            ns.name(),
            &format!(
                r#"
kafkaClusters:
  secure:
    bootstrapServers: "{}"
    securityProtocol: SASL_SSL
    sasl:
      mechanism: SCRAM-SHA-512
      username: {{secret: kafka-credentials, key: username}}
      password: {{secret: kafka-credentials, key: password}}
    tls:
      ca: {{secret: {ca_secret}, key: ca.pem}}
{extra}"#,
                self.bootstrap
            ),
        );
        OperatorProcess::start_with(
            tb,
            ns.name(),
            op_ns.name(),
            identity,
            &[("KEYSTONE_OPERATOR_CONFIG", config.as_str())],
        )
    }

    /// Runs a Kafka command-line tool against the PLAINTEXT listener, whose
    /// principal is a super user of the testbed broker.
    fn tool(&self, class: &str, args: &[&str]) {
        let out = Command::new("java")
            .args(["-Xmx128m", "-XX:TieredStopAtLevel=1", "-cp"])
            .arg(format!("{}/*", self.libs))
            .arg(class)
            .args(["--bootstrap-server", &self.plaintext])
            .args(args)
            .output()
            .expect("java runs");
        assert!(
            out.status.success(),
            "{class} {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates or replaces a principal's SCRAM-SHA-512 credential.
    fn set_password(&self, user: &str, password: &str) {
        let config = format!("SCRAM-SHA-512=[password={password}]");
        self.tool(
            "kafka.admin.ConfigCommand",
            &[
                "--alter",
                "--entity-type",
                "users",
                "--entity-name",
                user,
                "--add-config",
                &config,
            ],
        );
    }

    /// Lets a principal do everything (what the operator's admin needs).
    fn allow_all(&self, user: &str) {
        self.all_acls("--add", user);
    }

    fn remove_acls(&self, user: &str) {
        self.all_acls("--remove", user);
    }

    /// Adds or removes (`--force`: without asking) the ALLOW-everything ACLs of a principal.
    fn all_acls(&self, action: &str, user: &str) {
        let principal = format!("User:{user}");
        let mut args = vec![action];
        if action == "--remove" {
            args.push("--force");
        }
        args.extend([
            "--allow-principal",
            &principal,
            "--operation",
            "All",
            "--topic",
            "*",
            "--group",
            "*",
            "--transactional-id",
            "*",
            "--cluster",
        ]);
        self.tool("org.apache.kafka.tools.AclCommand", &args);
    }
}

fn credentials_secret(user: &str, password: &str, ca: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("kafka-credentials".to_owned()),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([
            ("username".to_owned(), user.to_owned()),
            ("password".to_owned(), password.to_owned()),
            ("ca.pem".to_owned(), ca.to_owned()),
        ])),
        ..Secret::default()
    }
}

async fn put_secret(api: &Api<Secret>, secret: &Secret) {
    let name = secret.metadata.name.clone().expect("name");
    let mut value = serde_json::to_value(secret).expect("json");
    value["apiVersion"] = "v1".into();
    value["kind"] = "Secret".into();
    api.patch(
        &name,
        &PatchParams::apply("e2e-user").force(),
        &Patch::Apply(&value),
    )
    .await
    .expect("apply the Secret");
}

async fn template_hash(deployments: &Api<Deployment>, name: &str) -> Option<String> {
    deployments
        .get_opt(name)
        .await
        .expect("get")?
        .spec?
        .template
        .metadata?
        .annotations?
        .get(CREDENTIALS_HASH)
        .cloned()
}

#[tokio::test]
async fn rotated_credentials_take_effect_without_restarting_the_operator() {
    require_runtime_binary();
    let tb = testbed().await;
    install_crds(&tb);
    let secure = SecureKafka::new(&tb);
    let ns = tb.namespace("op-rotate").await.expect("namespace");
    let op_ns = operator_namespace(&tb, &ns).await;
    let user = unique("rotator");
    secure.set_password(&user, "first-password");
    secure.allow_all(&user);

    // The same Secret in the operator's namespace (its admin client) and in
    // the pipeline's (the runtime pods').
    let secret = credentials_secret(&user, "first-password", &secure.ca);
    let op_secrets: Api<Secret> = Api::namespaced(tb.client().expect("client"), op_ns.name());
    let ns_secrets: Api<Secret> = ns.api();
    put_secret(&op_secrets, &secret).await;
    put_secret(&ns_secrets, &secret).await;
    let mut operator = secure.operator(&tb, &ns, &op_ns, "op-rotate", "kafka-credentials", "");
    let kafka = Kafka::new(&tb);
    let source = unique("rotate-in");
    kafka.create(&source, 2).await;
    let pipelines: Api<Pipeline> = ns.api();
    let deployments: Api<Deployment> = ns.api();

    // The runtime connects on the secured listener with the credentials it
    // reads from its environment.
    apply_yaml(
        &tb,
        &pipeline_yaml(
            ns.name(),
            "first",
            &source,
            &format!("{source}.first"),
            1,
            "Delete",
        ),
    )
    .await;
    wait_ready_with_runtime(&pipelines, "first", &operator).await;
    let before = template_hash(&deployments, "first-s0")
        .await
        .expect("the pod template carries the credentials' digest");

    // Rotate: the broker's credential, then both Secrets.
    secure.set_password(&user, "second-password");
    let rotated = credentials_secret(&user, "second-password", &secure.ca);
    put_secret(&op_secrets, &rotated).await;
    put_secret(&ns_secrets, &rotated).await;

    // The first pipeline's pods roll onto the new credential: the operator
    // watches the Secrets its pods read (by name) and reconciles at once,
    // with no change of the Pipeline. Its topic check may first fail on the
    // admin client's old password (re-read at most 30 s after the last time),
    // so the bound is WAIT (90 s), still well before the periodic drift
    // check (270 s or more).
    wait_until(
        WAIT,
        "the pod template's credentials digest changes",
        || {
            let (deployments, before) = (deployments.clone(), before.clone());
            async move {
                template_hash(&deployments, "first-s0")
                    .await
                    .filter(|h| *h != before)
            }
        },
        || async { String::new() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));

    apply_yaml(
        &tb,
        &pipeline_yaml(
            ns.name(),
            "second",
            &source,
            &format!("{source}.second"),
            1,
            "Delete",
        ),
    )
    .await;
    // The operator reconnects its admin client with the new password (it reads
    // its Secrets again at most 30 s after it last did, when it next needs the
    // client) and creates a new pipeline's topics with it.
    // Each poll changes an annotation of the new pipeline, so that reconciles
    // (which use the admin client) keep coming while the operator is idle.
    let log = operator.log.clone();
    let pokes = std::sync::atomic::AtomicU32::new(0);
    wait_until(
        Duration::from_secs(180),
        "the operator reconnects with the rotated credentials",
        || {
            let (log, pipelines) = (log.clone(), pipelines.clone());
            let poke = pokes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            async move {
                let _ = pipelines
                    .patch(
                        "second",
                        &PatchParams::default(),
                        &Patch::Merge(&serde_json::json!({
                            "metadata": {"annotations": {"e2e.keystone.dev/poke": poke.to_string()}}
                        })),
                    )
                    .await;
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("the cluster's credentials changed; reconnecting the admin client")
                    .then_some(())
            }
        },
        || async { String::new() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    wait_condition(&pipelines, "second", "TopicsReady", "True").await;
    assert_eq!(kafka.partitions(&format!("{source}.second")), Some(1));

    wait_ready_with_runtime(&pipelines, "first", &operator).await;
    wait_ready_with_runtime(&pipelines, "second", &operator).await;
    assert!(operator.is_running(), "the operator was not restarted");

    secure.remove_acls(&user);
    ns.delete().await.expect("delete namespace");
}

/// Client settings for the secured listener as `user`.
fn secure_client(secure: &SecureKafka, user: &str, password: &str, ca_file: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &secure.bootstrap)
        .set("security.protocol", "sasl_ssl")
        .set("sasl.mechanism", "SCRAM-SHA-512")
        .set("sasl.username", user)
        .set("sasl.password", password)
        .set("ssl.ca.location", ca_file);
    config
}

/// What the broker answers `config`'s principal about `topic`: None when allowed.
fn topic_error(config: &ClientConfig, topic: &str) -> Result<Option<RDKafkaRespErr>, String> {
    let consumer: BaseConsumer = config
        .clone()
        .set("group.id", "probe")
        .create()
        .map_err(|e| e.to_string())?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(15))
        .map_err(|e| e.to_string())?;
    Ok(metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| t.error()))
}

/// How many records partition 0 of `topic` holds (read through PLAINTEXT).
fn records_in(bootstrap: &str, topic: &str) -> usize {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "e2e-count")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .expect("partition");
    consumer.assign(&tpl).expect("assign");
    let mut count = 0;
    let mut idle = 0;
    while idle < 6 {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) if m.payload().is_some() => {
                count += 1;
                idle = 0;
            }
            _ => idle += 1,
        }
    }
    count
}

#[tokio::test]
async fn each_pipeline_gets_its_own_least_privilege_principal_removed_with_it() {
    require_runtime_binary();
    let tb = testbed().await;
    install_crds(&tb);
    let secure = SecureKafka::new(&tb);
    let admin_user = tb
        .var("KEYSTONE_TESTBED_KAFKA_ADMIN_USER")
        .expect("admin user")
        .to_owned();
    let admin_password = tb
        .var("KEYSTONE_TESTBED_KAFKA_ADMIN_PASSWORD")
        .expect("admin password")
        .to_owned();
    let ca_file = tb.var("KEYSTONE_TESTBED_KAFKA_CA").expect("CA").to_owned();
    let ns = tb.namespace("op-acls").await.expect("namespace");
    let op_ns = operator_namespace(&tb, &ns).await;

    // The operator's admin credential lives in its namespace only; the pods'
    // namespace gets the CA and nothing else of the cluster's.
    let op_secrets: Api<Secret> = Api::namespaced(tb.client().expect("client"), op_ns.name());
    let ns_secrets: Api<Secret> = ns.api();
    put_secret(
        &op_secrets,
        &credentials_secret(&admin_user, &admin_password, &secure.ca),
    )
    .await;
    let mut ca_only = credentials_secret("", "", &secure.ca);
    ca_only.metadata.name = Some("kafka-ca".to_owned());
    put_secret(&op_secrets, &ca_only).await;
    put_secret(&ns_secrets, &ca_only).await;
    let operator = secure.operator(
        &tb,
        &ns,
        &op_ns,
        "op-acls",
        "kafka-ca",
        "    authorization: {mode: Acls}\n",
    );
    let kafka = Kafka::new(&tb);
    let pipelines: Api<Pipeline> = ns.api();
    let (source_a, source_b) = (unique("alpha-in"), unique("beta-in"));
    for (name, source) in [("alpha", &source_a), ("beta", &source_b)] {
        kafka.create(source, 1).await;
        apply_yaml(
            &tb,
            &pipeline_yaml(
                ns.name(),
                name,
                source,
                &format!("{source}.out"),
                1,
                "Delete",
            ),
        )
        .await;
    }
    for name in ["alpha", "beta"] {
        wait_ready_with_runtime(&pipelines, name, &operator).await;
    }

    // Each runs end to end under its own principal.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &secure.plaintext)
        .create()
        .expect("producer");
    for source in [&source_a, &source_b] {
        for user in ["u1", "u2", "u3"] {
            let value = format!(r#"{{"session_id":"s-{user}","user":"{user}","action":"view"}}"#);
            producer
                .send(
                    FutureRecord::to(source).key(user).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .expect("produce");
        }
    }
    for source in [&source_a, &source_b] {
        let sink = format!("{source}.out");
        let plaintext = secure.plaintext.clone();
        wait_until(
            WAIT,
            &format!("3 events in {sink}"),
            || {
                let (plaintext, sink) = (plaintext.clone(), sink.clone());
                async move {
                    tokio::task::spawn_blocking(move || records_in(&plaintext, &sink))
                        .await
                        .ok()
                        .filter(|n| *n >= 3)
                }
            },
            || async { String::new() },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    }

    // Alpha's pods' credential (from its Secret) reads alpha's source and is
    // denied beta's.
    let secret = ns_secrets
        .get("alpha-kafka-user")
        .await
        .expect("alpha's credential Secret");
    let data = secret.data.expect("data");
    let text = |k: &str| String::from_utf8(data[k].0.clone()).expect("utf-8");
    let (alpha_user, alpha_password) = (text("username"), text("password"));
    assert_eq!(alpha_user, format!("keystone.{}.alpha", ns.name()));
    let alpha = secure_client(&secure, &alpha_user, &alpha_password, &ca_file);
    assert_eq!(topic_error(&alpha, &source_a).expect("authenticates"), None);
    assert_eq!(
        topic_error(&alpha, &source_b).expect("authenticates"),
        Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED),
        "alpha's principal must be denied beta's source"
    );
    assert_eq!(
        topic_error(&alpha, &format!("{source_b}.out")).expect("authenticates"),
        Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED),
        "alpha's principal must be denied beta's sink"
    );
    let admin = KafkaAdmin::connect(&secure_client(
        &secure,
        &admin_user,
        &admin_password,
        &ca_file,
    ))
    .expect("admin");
    let principal = format!("User:{alpha_user}");
    let acls = admin
        .describe_acls(&AclFilter::principal(&principal), Duration::from_secs(15))
        .expect("describe");
    assert!(!acls.is_empty());
    assert!(acls.iter().all(|a| a.name != "*"), "{acls:?}");

    // Deleting alpha removes its ACLs and its credential; beta keeps running.
    pipelines
        .delete("alpha", &Default::default())
        .await
        .expect("delete alpha");
    keystone_e2e::wait_for_deletion(&pipelines, "alpha", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    // The broker's authorizer applies the deletion from its metadata log a
    // moment after the controller committed it.
    let (admin_ref, alpha_ref) = (&admin, &alpha);
    wait_until(
        WAIT,
        "alpha's ACLs and credential are gone",
        || {
            let principal = principal.clone();
            let source_a = source_a.clone();
            async move {
                let left = admin_ref
                    .describe_acls(&AclFilter::principal(&principal), Duration::from_secs(15))
                    .expect("describe");
                (left.is_empty() && topic_error(alpha_ref, &source_a).is_err()).then_some(())
            }
        },
        || async { String::new() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    assert!(
        !admin
            .describe_acls(
                &AclFilter::principal(&format!("User:keystone.{}.beta", ns.name())),
                Duration::from_secs(15)
            )
            .expect("describe")
            .is_empty()
    );
    pipelines
        .delete("beta", &Default::default())
        .await
        .expect("delete beta");
    keystone_e2e::wait_for_deletion(&pipelines, "beta", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\noperator log:\n{}", operator.log_text()));
    ns.delete().await.expect("delete namespace");
}
