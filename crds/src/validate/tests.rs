use serde::Deserialize;
use serde_json::{Value as Json, json};

use super::*;

fn pipeline() -> Json {
    json!({
        "apiVersion": "keystone.dev/v1alpha1",
        "kind": "Pipeline",
        "metadata": {"name": "orders"},
        "spec": {
            "source": {
                "topic": "in",
                "key": ["id"],
                "schema": {"fields": [{"name": "id", "type": "string"}]}
            },
            "steps": [{"name": "dedup", "dedup": {"key": ["id"], "window": "10m"}}],
            "sinks": [{"name": "out", "kafka": {"topic": "out", "partitions": 3}}]
        }
    })
}

fn processor() -> Json {
    json!({
        "apiVersion": "keystone.dev/v1alpha1",
        "kind": "Processor",
        "metadata": {"name": "only-paid"},
        "spec": {"filter": {"expression": "status == 'paid'"}}
    })
}

/// `document` with the value at JSON pointer `pointer` set (parents must exist).
fn with(mut document: Json, pointer: &str, value: Json) -> Json {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = document.pointer_mut(parent).unwrap();
    match parent {
        Json::Array(items) => items[key.parse::<usize>().unwrap()] = value,
        Json::Object(map) => {
            map.insert(key.to_owned(), value);
        }
        other => panic!("{pointer}: parent is {other}"),
    }
    document
}

fn without(mut document: Json, pointer: &str) -> Json {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    document
        .pointer_mut(parent)
        .and_then(Json::as_object_mut)
        .unwrap()
        .remove(key);
    document
}

fn violations(document: &Json) -> Vec<(String, String)> {
    let kind = document["kind"].as_str().unwrap();
    validate(kind, document)
        .into_iter()
        .map(|v| (v.path, v.message))
        .collect()
}

/// Exactly one violation, at `path`, whose message contains `needle`.
#[track_caller]
fn refused(document: Json, path: &str, needle: &str) {
    let found = violations(&document);
    assert!(
        found.len() == 1 && found[0].0 == path && found[0].1.contains(needle),
        "expected one violation at {path} containing {needle:?}, got {found:#?}"
    );
}

#[track_caller]
fn accepted(document: Json) {
    let found = violations(&document);
    assert!(found.is_empty(), "expected no violations, got {found:#?}");
}

#[test]
fn the_bases_are_valid() {
    accepted(pipeline());
    accepted(processor());
}

#[test]
fn every_committed_manifest_is_valid() {
    // Samples, golden pipelines and benchmark pipelines must stay within the CRDs' bounds.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["config/samples", "e2e/bench/pipelines"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            files.push(entry.unwrap().path());
        }
    }
    for entry in std::fs::read_dir(root.join("runtime/tests/golden")).unwrap() {
        files.push(entry.unwrap().path().join("pipeline.yaml"));
    }
    let mut checked = 0;
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
    {
        let text = std::fs::read_to_string(file).unwrap();
        for document in serde_yaml_ng::Deserializer::from_str(&text) {
            let document: Json =
                serde_json::to_value(serde_yaml_ng::Value::deserialize(document).unwrap()).unwrap();
            let Some(kind) = document.get("kind").and_then(Json::as_str) else {
                continue;
            };
            let found = validate(kind, &document);
            assert!(found.is_empty(), "{}: {found:#?}", file.display());
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} manifests found");
}

#[test]
fn types_are_checked_and_an_integral_number_is_an_integer() {
    refused(
        with(pipeline(), "/spec/parallelism", json!("two")),
        "spec.parallelism",
        "Invalid value: \"two\": spec.parallelism in body must be of type integer: \"string\"",
    );
    refused(
        with(pipeline(), "/spec/parallelism", json!(1.5)),
        "spec.parallelism",
        "must be of type integer",
    );
    accepted(with(pipeline(), "/spec/parallelism", json!(2.0)));
    refused(
        with(pipeline(), "/spec/allowRepartition", json!("yes")),
        "spec.allowRepartition",
        "must be of type boolean",
    );
    refused(
        with(pipeline(), "/spec/source/key", json!("id")),
        "spec.source.key",
        "must be of type array",
    );
    refused(
        with(pipeline(), "/spec/source/schema", json!([])),
        "spec.source.schema",
        "must be of type object",
    );
}

#[test]
fn nulls_are_allowed_where_nullable_defaulted_where_defaulted_and_otherwise_absent() {
    accepted(with(pipeline(), "/spec/restore", Json::Null));
    // Not nullable, defaulted: the default replaces the null.
    accepted(with(pipeline(), "/spec/parallelism", Json::Null));
    // Not nullable, no default, required: pruned, so missing.
    refused(
        with(pipeline(), "/spec/sinks", Json::Null),
        "spec.sinks",
        "Required value",
    );
    // A null list item is not pruned and fails its type.
    refused(
        with(pipeline(), "/spec/source/key", json!([null])),
        "spec.source.key[0]",
        "must be of type string",
    );
}

#[test]
fn required_fields_are_required() {
    refused(
        without(pipeline(), "/spec/source/topic"),
        "spec.source.topic",
        "Required value",
    );
    refused(without(pipeline(), "/spec"), "spec", "Required value");
}

#[test]
fn unknown_fields_are_named_by_path() {
    refused(
        with(pipeline(), "/spec/sinks/0/kafka/partitons", json!(3)),
        "spec.sinks[0].kafka.partitons",
        "unknown field spec.sinks[0].kafka.partitons",
    );
    // Under status too: the server decodes it before dropping it.
    refused(
        with(pipeline(), "/status", json!({"phaze": "Running"})),
        "status.phaze",
        "unknown field",
    );
    // A create cannot set status, so its values are not checked.
    accepted(with(pipeline(), "/status", json!({"phase": "Nonsense"})));
    assert_eq!(
        unknown_fields(
            &json!({"spec": {"x": 1}}),
            &json!({"properties": {"spec": {"type": "object", "properties": {}}}})
        ),
        vec!["spec.x"]
    );
}

#[test]
fn preserve_unknown_fields_keeps_everything_below() {
    let schema = json!({"type": "object", "properties": {"free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}});
    assert!(unknown_fields(&json!({"free": {"a": {"b": 1}}}), &schema).is_empty());
    assert_eq!(unknown_fields(&json!({"other": 1}), &schema), vec!["other"]);
}

#[test]
fn enums_list_the_supported_values() {
    refused(
        with(pipeline(), "/spec/delivery", json!("ExactlyTwice")),
        "spec.delivery",
        "Unsupported value: \"ExactlyTwice\": supported values: \"ExactlyOnce\", \"AtLeastOnce\"",
    );
}

#[test]
fn minimum_and_maximum_hold_at_the_boundary() {
    refused(
        with(pipeline(), "/spec/parallelism", json!(0)),
        "spec.parallelism",
        "Invalid value: 0: spec.parallelism in body should be greater than or equal to 1",
    );
    refused(
        with(pipeline(), "/spec/parallelism", json!(-1)),
        "spec.parallelism",
        "greater than or equal to 1",
    );
    refused(
        with(pipeline(), "/spec/parallelism", json!(1025)),
        "spec.parallelism",
        "should be less than or equal to 1024",
    );
    accepted(with(pipeline(), "/spec/parallelism", json!(1)));
    accepted(with(pipeline(), "/spec/parallelism", json!(1024)));
    refused(
        with(pipeline(), "/spec/sinks/0/kafka/partitions", json!(0)),
        "spec.sinks[0].kafka.partitions",
        "greater than or equal to 1",
    );
}

#[test]
fn exclusive_bounds_and_multiples() {
    let schema = json!({"type": "number", "minimum": 1, "exclusiveMinimum": true, "maximum": 3, "exclusiveMaximum": true, "multipleOf": 0.5});
    let check = |value: Json| {
        let mut out = schema::Report::default();
        schema::validate_value(&value, &schema, "x", &mut out);
        out.violations
            .into_iter()
            .map(|v| v.message)
            .collect::<Vec<_>>()
    };
    assert!(check(json!(1))[0].contains("should be greater than 1"));
    assert!(check(json!(3))[0].contains("should be less than 3"));
    assert!(check(json!(1.25))[0].contains("multiple of 0.5"));
    assert!(check(json!(1.5)).is_empty());
}

#[test]
fn lengths_count_characters_not_bytes() {
    // checkpointTrigger: at most 253, and no pattern.
    accepted(with(
        pipeline(),
        "/spec/checkpointTrigger",
        json!("é".repeat(253)),
    ));
    refused(
        with(
            pipeline(),
            "/spec/checkpointTrigger",
            json!("é".repeat(254)),
        ),
        "spec.checkpointTrigger",
        "Too long: may not be more than 253 characters",
    );
    refused(
        with(pipeline(), "/spec/steps/0/dedup/key/0", json!("")),
        "spec.steps[0].dedup.key[0]",
        "Invalid value: \"\": spec.steps[0].dedup.key[0] in body should be at least 1 chars long",
    );
}

#[test]
fn patterns_use_re2_semantics() {
    refused(
        with(
            pipeline(),
            "/spec/steps/0/dedup/window",
            json!("10 minutes"),
        ),
        "spec.steps[0].dedup.window",
        "in body should match '^([0-9]+(ms|s|m|h|d))+$'",
    );
    // `$` is the end of the text, not before a final newline.
    refused(
        with(pipeline(), "/spec/steps/0/dedup/window", json!("10m\n")),
        "spec.steps[0].dedup.window",
        "should match",
    );
    accepted(with(
        pipeline(),
        "/spec/steps/0/dedup/window",
        json!("1h30m"),
    ));
}

#[test]
fn item_counts_are_bounded() {
    refused(
        with(pipeline(), "/spec/sinks", json!([])),
        "spec.sinks",
        "Invalid value: 0: spec.sinks in body should have at least 1 items",
    );
    refused(
        with(pipeline(), "/spec/steps/0/dedup/key", json!([])),
        "spec.steps[0].dedup.key",
        "should have at least 1 items",
    );
    let steps: Vec<Json> = (0..65)
        .map(|i| json!({"name": format!("s{i}"), "filter": {"expression": "true"}}))
        .collect();
    refused(
        with(pipeline(), "/spec/steps", Json::Array(steps)),
        "spec.steps",
        "Too many: 65: must have at most 64 items",
    );
}

#[test]
fn int_or_string_takes_either() {
    accepted(with(
        pipeline(),
        "/spec/resources",
        json!({"limits": {"cpu": 1, "memory": "512Mi"}}),
    ));
    refused(
        with(
            pipeline(),
            "/spec/resources",
            json!({"limits": {"cpu": true}}),
        ),
        "spec.resources.limits.cpu",
        "must be of type integer or string",
    );
}

#[test]
fn map_lists_refuse_duplicate_keys_and_sets_duplicate_items() {
    refused(
        with(
            pipeline(),
            "/spec/sinks",
            json!([{"name": "out", "kafka": {"topic": "out"}}, {"name": "out", "kafka": {"topic": "other"}}]),
        ),
        "spec.sinks[1]",
        "Duplicate value: {\"name\":\"out\"}",
    );
    let schema =
        json!({"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"});
    let mut out = schema::Report::default();
    schema::validate_value(&json!(["a", "b", "a"]), &schema, "x", &mut out);
    assert_eq!(out.violations.len(), 1);
    assert_eq!(out.violations[0].path, "x[2]");
    assert!(
        !out.blocking,
        "a duplicate does not keep the rules from running"
    );
}

#[test]
fn defaults_are_applied_before_validation() {
    let schema = crd_schema("Pipeline").unwrap();
    let mut document = pipeline();
    schema::apply_defaults(&mut document, schema);
    assert_eq!(document["spec"]["upgrade"]["healthGate"]["maxRestarts"], 1);
    assert_eq!(document["spec"]["sinks"][0]["kafka"]["create"], true);
    assert_eq!(document["spec"]["parallelism"], 1);
    // A defaulted field set to null is defaulted, not refused.
    accepted(with(
        pipeline(),
        "/spec/sinks/0/kafka/partitions",
        Json::Null,
    ));
}

#[test]
fn every_violation_is_reported() {
    let doc = with(pipeline(), "/spec/parallelism", json!(0));
    let doc = with(doc, "/spec/sinks/0/kafka/partitions", json!(-1));
    let doc = with(doc, "/spec/steps/0/dedup/key", json!([]));
    let paths: Vec<String> = violations(&doc).into_iter().map(|v| v.0).collect();
    assert_eq!(
        paths,
        [
            "spec.parallelism",
            "spec.sinks[0].kafka.partitions",
            "spec.steps[0].dedup.key"
        ]
    );
}

// One violating document per CEL rule of the CRDs.

#[test]
fn rule_step_names_are_unique() {
    let doc = with(
        pipeline(),
        "/spec/steps",
        json!([{"name": "a", "filter": {"expression": "true"}}, {"name": "a", "filter": {"expression": "false"}}]),
    );
    refused(
        doc,
        "spec",
        "Invalid value: \"object\": step names must be unique within a pipeline",
    );
}

#[test]
fn rule_the_source_topic_is_not_a_kafka_sink_topic() {
    refused(
        with(pipeline(), "/spec/sinks/0/kafka/topic", json!("in")),
        "spec",
        "the source topic cannot also be a Kafka sink topic",
    );
    // The same topic name on another cluster is another topic.
    let doc = with(pipeline(), "/spec/sinks/0/kafka/topic", json!("in"));
    accepted(with(doc, "/spec/sinks/0/kafka/cluster", json!("other")));
}

#[test]
fn rule_each_step_sets_exactly_one_operator() {
    refused(
        with(pipeline(), "/spec/steps/0", json!({"name": "none"})),
        "spec.steps[0]",
        "each step sets exactly one of processorRef, filter",
    );
    refused(
        with(
            pipeline(),
            "/spec/steps/0/filter",
            json!({"expression": "true"}),
        ),
        "spec.steps[0]",
        "each step sets exactly one of processorRef, filter",
    );
    // A null operator is an unset one.
    accepted(with(pipeline(), "/spec/steps/0/filter", Json::Null));
}

#[test]
fn rule_each_sink_sets_exactly_one_kind() {
    refused(
        with(pipeline(), "/spec/sinks/0", json!({"name": "out"})),
        "spec.sinks[0]",
        "each sink sets exactly one of kafka, elasticsearch, iceberg or parquet",
    );
}

#[test]
fn rule_a_source_sets_at_most_one_of_postgres_and_http() {
    let postgres =
        json!({"host": "db", "database": "shop", "credentialsSecret": "s", "tables": ["orders"]});
    let http = json!({"tokensSecret": "t"});
    let both = with(
        with(pipeline(), "/spec/source/postgres", postgres.clone()),
        "/spec/source/http",
        http.clone(),
    );
    refused(
        both,
        "spec.source",
        "set at most one of postgres and http: each writes the source topic",
    );
    accepted(with(pipeline(), "/spec/source/http", http));
    accepted(with(pipeline(), "/spec/source/postgres", postgres));
}

#[test]
fn rules_avro_settings_need_format_avro() {
    let registry = json!({"url": "http://registry:8081"});
    let avro_source = with(
        with(pipeline(), "/spec/source/format", json!("avro")),
        "/spec/schemaRegistry",
        registry.clone(),
    );
    accepted(with(
        avro_source.clone(),
        "/spec/source/avro",
        json!({"version": 3}),
    ));
    refused(
        with(pipeline(), "/spec/source/avro", json!({"version": 3})),
        "spec.source",
        "avro is read only with format: avro",
    );
    refused(
        with(
            pipeline(),
            "/spec/sinks/0/kafka/avro",
            json!({"version": 1}),
        ),
        "spec.sinks[0].kafka",
        "avro is written only with format: avro",
    );
    accepted(with(
        with(pipeline(), "/spec/sinks/0/kafka/format", json!("avro")),
        "/spec/sinks/0/kafka/avro",
        json!({"autoRegister": false}),
    ));
    refused(
        with(
            avro_source.clone(),
            "/spec/source/avro",
            json!({"subjectStrategy": "RecordName"}),
        ),
        "spec.source.avro",
        "RecordName and TopicRecordName need recordName",
    );
    accepted(with(
        avro_source.clone(),
        "/spec/source/avro",
        json!({"subjectStrategy": "TopicRecordName", "recordName": "shop.Order"}),
    ));
    let inline = r#"{"type": "record", "name": "Order", "fields": []}"#;
    accepted(with(
        avro_source.clone(),
        "/spec/source/avro",
        json!({"schema": inline}),
    ));
    refused(
        with(
            avro_source,
            "/spec/source/avro",
            json!({"schema": inline, "version": 2}),
        ),
        "spec.source.avro",
        "schema and version are exclusive",
    );
    refused(
        with(
            pipeline(),
            "/spec/schemaRegistry",
            json!({"url": "registry:8081"}),
        ),
        "spec.schemaRegistry.url",
        "",
    );
}

#[test]
fn rule_a_processor_sets_exactly_one_operator() {
    refused(
        with(processor(), "/spec/rekey", json!({"key": ["id"]})),
        "spec",
        "set exactly one operator: filter, map, project, extract, dedup, order, join, enrich or rekey",
    );
}

#[test]
fn every_rule_compiles_and_none_compares_with_the_stored_object() {
    let mut rules = Vec::new();
    for kind in ["Pipeline", "Processor"] {
        collect_rules(crd_schema(kind).unwrap(), &mut rules);
    }
    assert_eq!(rules.len(), 10, "{rules:#?}");
    for rule in &rules {
        let source = rule["rule"].as_str().unwrap();
        let program = cel::Program::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
        // A transition rule refuses going back to an earlier value, so Argo CD
        // could never self-heal a field raised by hand back to git's value (and
        // its failed sync would block every later automated one): what cannot
        // be undone in Kafka is reported by the operator in status instead.
        assert!(
            !rules::is_transition_rule(&program),
            "a transition rule: {source}"
        );
    }
    accepted(with(pipeline(), "/spec/sinks/0/kafka/partitions", json!(1)));
}

fn collect_rules(schema: &Json, rules: &mut Vec<Json>) {
    if let Some(found) = schema
        .get("x-kubernetes-validations")
        .and_then(Json::as_array)
    {
        rules.extend(found.iter().cloned());
    }
    for key in ["properties", "additionalProperties", "items"] {
        match schema.get(key) {
            Some(Json::Object(map)) if key == "properties" => {
                map.values().for_each(|s| collect_rules(s, rules))
            }
            Some(child @ Json::Object(_)) => collect_rules(child, rules),
            _ => {}
        }
    }
}

#[test]
fn rules_are_skipped_when_a_value_has_the_wrong_type() {
    // Duplicate step names, but also a type error: the server reports only the latter.
    let doc = with(
        pipeline(),
        "/spec/steps",
        json!([{"name": "a", "filter": {"expression": "true"}}, {"name": "a", "filter": {"expression": "false"}}]),
    );
    refused(
        with(doc.clone(), "/spec/parallelism", json!("x")),
        "spec.parallelism",
        "must be of type integer",
    );
    // A bound below its minimum does not block them.
    let paths: Vec<String> = violations(&with(doc, "/spec/parallelism", json!(0)))
        .into_iter()
        .map(|v| v.0)
        .collect();
    assert_eq!(paths, ["spec.parallelism", "spec"]);
}

#[test]
fn message_expressions_fall_back_to_the_message() {
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}},
    "x-kubernetes-validations": [
        {"rule": "self.n > 1", "messageExpression": "'n is ' + string(self.n)"},
        {"rule": "self.n > 2", "messageExpression": "''", "message": "n too small"},
        {"rule": "self.n > 3"}
    ]});
    let mut out = Vec::new();
    rules::validate_rules(&json!({"n": 1}), &schema, "spec", &mut out);
    let messages: Vec<&str> = out.iter().map(|v| v.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "Invalid value: \"object\": n is 1",
            "Invalid value: \"object\": n too small",
            "Invalid value: \"object\": failed rule: self.n > 3"
        ]
    );
}

#[test]
fn metadata_name_is_a_dns_subdomain() {
    refused(
        with(pipeline(), "/metadata/name", json!("Orders")),
        "metadata.name",
        "a lowercase RFC 1123 subdomain",
    );
    refused(
        with(processor(), "/metadata/name", json!("a".repeat(254))),
        "metadata.name",
        "must be no more than 253 characters",
    );
    accepted(with(processor(), "/metadata/name", json!("a.b")));
    refused(
        without(processor(), "/metadata/name"),
        "metadata.name",
        "Required value: name or generateName is required",
    );
    accepted(with(
        without(processor(), "/metadata/name"),
        "/metadata/generateName",
        json!("p-"),
    ));
    refused(
        with(pipeline(), "/metadata/nmae", json!("x")),
        "metadata.nmae",
        "unknown field",
    );
    refused(
        with(pipeline(), "/metadata/namespace", json!("Prod")),
        "metadata.namespace",
        "RFC 1123 label",
    );
}

#[test]
fn labels_and_annotations_are_checked() {
    refused(
        with(pipeline(), "/metadata/labels", json!({"team": "a b"})),
        "metadata.labels",
        "a valid label must be an empty string",
    );
    refused(
        with(pipeline(), "/metadata/labels", json!({"-team": "a"})),
        "metadata.labels",
        "name part must consist of",
    );
    accepted(with(
        pipeline(),
        "/metadata/labels",
        json!({"keystone.dev/team": ""}),
    ));
    refused(
        with(pipeline(), "/metadata/annotations", json!({"a/b/c": "x"})),
        "metadata.annotations",
        "name part must consist of",
    );
}

#[test]
fn pipeline_names_must_fit_their_stage_services() {
    // The API server takes these; Keystone could not name the stage Services.
    for (name, needle) in [
        ("a.b", "no '.'"),
        ("1orders", "start with a lowercase letter"),
        (&*"a".repeat(58), "at most 57 characters"),
    ] {
        let found = validate("Pipeline", &with(pipeline(), "/metadata/name", json!(name)));
        assert!(
            found.len() == 1
                && found[0].origin == Origin::Keystone
                && found[0].path == "metadata.name"
                && found[0].message.contains(needle),
            "{name}: {found:#?}"
        );
    }
    accepted(with(pipeline(), "/metadata/name", json!("a".repeat(57))));
    // Processors name no other objects.
    accepted(with(processor(), "/metadata/name", json!("1-only.paid")));
}
