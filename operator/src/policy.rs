//! What Pipeline authors may ask of the operator, which acts with its own
//! (admin) Kafka credentials and creates pods: the runtime images they may run
//! and the topics they may have created. The chart sets these; a violation
//! refuses the Pipeline before anything is created.

use std::collections::BTreeMap;

use keystone_crds::Plan;
use keystone_crds::pipeline::PipelineSpec;
use keystone_crds::plan::{Partitions, TopicRole};
use serde::{Deserialize, Serialize};

/// Limits on Pipelines. Each is off when unset, so a bare operator (and every
/// existing configuration) behaves as before; the chart turns them on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    /// Patterns a Pipeline's `spec.runtimeImage` must match, `*` standing for
    /// any run of characters (`registry.example/keystone/runtime:*`). Any image
    /// when empty. The operator's own runtime image is always allowed.
    #[serde(default)]
    pub allowed_runtime_images: Vec<String>,
    /// The most partitions a topic the operator creates may have.
    #[serde(default)]
    pub max_partitions: Option<i32>,
    /// The highest replication factor a Pipeline may ask for.
    #[serde(default)]
    pub max_replication_factor: Option<i32>,
    /// The replication factors a Pipeline may ask for; any (up to the maximum) when empty.
    #[serde(default)]
    pub allowed_replication_factors: Vec<i32>,
    /// Topic configs a Pipeline may set on the topics it creates; any when
    /// unset, none when empty.
    #[serde(default)]
    pub allowed_topic_configs: Option<Vec<String>>,
    /// Upper bounds of numeric topic configs (`retention.ms: 604800000`);
    /// `-1` (unlimited) exceeds every bound. The dead-letter retention counts.
    #[serde(default)]
    pub max_topic_config_values: BTreeMap<String, i64>,
}

/// One violation: the field and what the limit is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole text must be the pattern.
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

impl Policy {
    /// Every way `spec` (compiled to `plan`) exceeds the policy; `default_image`
    /// is the operator's own runtime image, allowed whatever the patterns say.
    pub fn violations(
        &self,
        spec: &PipelineSpec,
        plan: &Plan,
        default_image: &str,
    ) -> Vec<Violation> {
        let mut out = Vec::new();
        if let Some(image) = &spec.runtime_image
            && image != default_image
            && !self.allowed_runtime_images.is_empty()
            && !self
                .allowed_runtime_images
                .iter()
                .any(|p| glob_matches(p, image))
        {
            out.push(Violation {
                path: "spec.runtimeImage".to_owned(),
                message: format!(
                    "image {image:?} is not allowed by the operator's policy (allowed: {}); use one of those or leave it unset for {default_image:?}",
                    self.allowed_runtime_images.join(", ")
                ),
            });
        }
        for topic in plan.topics.iter().filter(|t| t.create) {
            let path = topic_path(spec, &topic.name, topic.role);
            if let (Some(Partitions::Fixed(n)), Some(max)) =
                (&topic.partitions, self.max_partitions)
                && *n > max
            {
                out.push(Violation {
                    path: format!("{path}.partitions"),
                    message: format!(
                        "topic {:?} asks for {n} partitions; the operator's policy allows at most {max}",
                        topic.name
                    ),
                });
            }
            if let Some(rf) = topic.replication_factor {
                let over = self.max_replication_factor.is_some_and(|max| rf > max);
                let unlisted = !self.allowed_replication_factors.is_empty()
                    && !self.allowed_replication_factors.contains(&rf);
                if over || unlisted {
                    out.push(Violation {
                        path: format!("{path}.replicationFactor"),
                        message: format!(
                            "topic {:?} asks for replication factor {rf}; the operator's policy allows {}",
                            topic.name,
                            self.describe_replication()
                        ),
                    });
                }
            }
            // Only sinks take arbitrary configs from the author; the configs the
            // checker sets on internal topics are the operator's own.
            if topic.role == TopicRole::Sink
                && let Some(allowed) = &self.allowed_topic_configs
            {
                for key in topic.config.keys().filter(|k| !allowed.contains(k)) {
                    out.push(Violation {
                        path: format!("{path}.config.{key}"),
                        message: format!(
                            "topic config {key:?} is not allowed by the operator's policy (allowed: {})",
                            if allowed.is_empty() {
                                "none".to_owned()
                            } else {
                                allowed.join(", ")
                            }
                        ),
                    });
                }
            }
            for (key, max) in &self.max_topic_config_values {
                let Some(value) = topic.config.get(key) else {
                    continue;
                };
                let within = value
                    .trim()
                    .parse::<i64>()
                    .is_ok_and(|v| v >= 0 && v <= *max);
                if !within {
                    let field = if topic.role == TopicRole::DeadLetter && key == "retention.ms" {
                        "spec.deadLetter.retention".to_owned()
                    } else {
                        format!("{path}.config.{key}")
                    };
                    out.push(Violation {
                        path: field,
                        message: format!(
                            "topic {:?} sets {key}={value}; the operator's policy allows at most {max}",
                            topic.name
                        ),
                    });
                }
            }
        }
        out
    }

    fn describe_replication(&self) -> String {
        match (
            &self.allowed_replication_factors[..],
            self.max_replication_factor,
        ) {
            ([], Some(max)) => format!("at most {max}"),
            (list, max) => {
                let list = list
                    .iter()
                    .map(i32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                match max {
                    Some(max) => format!("{list} (at most {max})"),
                    None => list,
                }
            }
        }
    }
}

/// Where in the spec a created topic comes from.
fn topic_path(spec: &PipelineSpec, topic: &str, role: TopicRole) -> String {
    if role == TopicRole::Sink
        && let Some(i) = spec
            .sinks
            .iter()
            .position(|s| s.kafka.as_ref().is_some_and(|k| k.topic == topic))
    {
        return format!("spec.sinks[{i}].kafka");
    }
    format!("topic {topic} ({})", role.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(extra_sink: &str, image: Option<&str>) -> (PipelineSpec, Plan) {
        pipeline_with(extra_sink, image, "30d")
    }

    fn pipeline_with(
        extra_sink: &str,
        image: Option<&str>,
        dlq_retention: &str,
    ) -> (PipelineSpec, Plan) {
        let image = image
            .map(|i| format!("  runtimeImage: {i}\n"))
            .unwrap_or_default();
        let yaml = format!(
            r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: p, namespace: n}}
spec:
{image}  source: {{topic: in, schema: {{fields: [{{name: a, type: string}}]}}}}
  deadLetter: {{retention: {dlq_retention}}}
  sinks:
    - name: out
      kafka: {{topic: out, {extra_sink}}}
"#
        );
        let pipeline: keystone_crds::Pipeline = serde_yaml_ng::from_str(&yaml).expect("pipeline");
        let plan = keystone_crds::compile(&pipeline, &[]).expect("valid");
        (pipeline.spec, plan)
    }

    #[test]
    fn globs() {
        assert!(glob_matches("keystone/runtime:*", "keystone/runtime:0.1.0"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches(
            "reg/*/runtime@sha256:*",
            "reg/team/runtime@sha256:ab"
        ));
        assert!(glob_matches("exact", "exact"));
        assert!(!glob_matches("exact", "exactly"));
        assert!(!glob_matches(
            "keystone/runtime:*",
            "evil/keystone/runtime:1"
        ));
        assert!(!glob_matches("keystone/runtime:*", "keystone/runtimes:1"));
        assert!(!glob_matches("a*b*c", "a-c-b"));
    }

    #[test]
    fn no_policy_allows_everything() {
        let (spec, plan) = pipeline(
            "partitions: 5000, replicationFactor: 7, config: {retention.ms: '-1'}",
            Some("evil/miner:latest"),
        );
        assert_eq!(
            Policy::default().violations(&spec, &plan, "keystone/runtime:1"),
            vec![]
        );
    }

    #[test]
    fn images_outside_the_allow_list_are_refused() {
        let policy = Policy {
            allowed_runtime_images: vec!["keystone/runtime:*".into()],
            ..Policy::default()
        };
        let (spec, plan) = pipeline("partitions: 1", Some("evil/miner:latest"));
        let v = policy.violations(&spec, &plan, "keystone/runtime:1");
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].path, "spec.runtimeImage");
        assert!(v[0].message.contains("keystone/runtime:*"), "{}", v[0]);
        for ok in [Some("keystone/runtime:2"), None] {
            let (spec, plan) = pipeline("partitions: 1", ok);
            assert_eq!(
                policy.violations(&spec, &plan, "keystone/runtime:1"),
                vec![]
            );
        }
        // The operator's own image is allowed whatever the patterns say.
        let (spec, plan) = pipeline("partitions: 1", Some("local/runtime:dev"));
        assert_eq!(policy.violations(&spec, &plan, "local/runtime:dev"), vec![]);
    }

    #[test]
    fn topic_quotas_name_the_field_and_the_limit() {
        let policy = Policy {
            max_partitions: Some(12),
            max_replication_factor: Some(3),
            allowed_replication_factors: vec![3],
            allowed_topic_configs: Some(vec!["retention.ms".into(), "cleanup.policy".into()]),
            max_topic_config_values: BTreeMap::from([("retention.ms".into(), 7 * 86_400_000)]),
            ..Policy::default()
        };
        let (spec, plan) = pipeline(
            "partitions: 13, replicationFactor: 2, config: {retention.ms: '-1', unclean.leader.election.enable: 'true'}",
            None,
        );
        let v = policy.violations(&spec, &plan, "keystone/runtime:1");
        let paths: Vec<&str> = v.iter().map(|v| v.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "spec.deadLetter.retention",
                "spec.sinks[0].kafka.partitions",
                "spec.sinks[0].kafka.replicationFactor",
                "spec.sinks[0].kafka.config.unclean.leader.election.enable",
                "spec.sinks[0].kafka.config.retention.ms",
            ],
            "{v:?}"
        );
        assert!(v[0].message.contains("at most 604800000"), "{}", v[0]);
        assert!(v[1].message.contains("at most 12"), "{}", v[1]);
        assert!(v[2].message.contains("3 (at most 3)"), "{}", v[2]);
        assert!(
            v[3].message.contains("retention.ms, cleanup.policy"),
            "{}",
            v[3]
        );

        let (spec, plan) = pipeline_with(
            "partitions: 12, replicationFactor: 3, config: {retention.ms: '86400000'}",
            None,
            "7d",
        );
        assert_eq!(
            policy.violations(&spec, &plan, "keystone/runtime:1"),
            vec![]
        );
    }
}
