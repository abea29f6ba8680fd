//! The contract checker on invalid pipelines: each case pins the exact errors a
//! user sees, so a change in wording or in what is caught is a visible decision.

use keystone_crds::check::WRITABLE_SINKS;
use keystone_crds::pipeline::SinkKind;
use keystone_crds::{ErrorKind, Pipeline, compile, parse_manifests};

/// A valid CDC pipeline; each case edits it.
const BASE: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: cdc, namespace: shop}
spec:
  source:
    topic: orders.cdc
    key: [order_id]
    schema:
      fields:
        - {name: event_id, type: string}
        - {name: order_id, type: string}
        - {name: customer_id, type: string}
        - {name: seq, type: integer}
        - {name: ts, type: integer}
        - {name: note, type: string}
        - {name: amount, type: number}
  steps:
    - name: dedup
      dedup: {key: [order_id, event_id], window: 10m}
    - name: order
      order: {key: [order_id], sequence: seq, maxDelay: 5s}
  sinks:
    - name: out
      kafka: {topic: orders.clean}
"#;

const PROCESSORS: &str = r#"
apiVersion: keystone.dev/v1alpha1
kind: Processor
metadata: {name: needs-region, namespace: shop}
spec:
  filter: {expression: 'region != "test"'}
  contract:
    requires: [{name: region, type: string}]
---
apiVersion: keystone.dev/v1alpha1
kind: Processor
metadata: {name: applier, namespace: shop}
spec:
  filter: {expression: 'true'}
  contract:
    keys: {requiresOrderBy: [customer_id]}
---
apiVersion: keystone.dev/v1alpha1
kind: Processor
metadata: {name: liar, namespace: shop}
spec:
  project:
    fields: [{name: id, from: /order_id}]
  contract:
    schema: {effect: Passthrough}
---
apiVersion: keystone.dev/v1alpha1
kind: Processor
metadata: {name: amount-as-string, namespace: shop}
spec:
  filter: {expression: 'true'}
  contract:
    requires: [{name: amount, type: string}]
"#;

/// Replaces the base's steps (and optionally other top-level spec blocks) by `edit`.
fn with_steps(steps: &str) -> String {
    let start = BASE.find("  steps:\n").unwrap();
    let end = BASE.find("  sinks:\n").unwrap();
    format!("{}  steps:\n{steps}{}", &BASE[..start], &BASE[end..])
}

fn with_sinks(sinks: &str) -> String {
    let start = BASE.find("  sinks:\n").unwrap();
    format!("{}  sinks:\n{sinks}", &BASE[..start])
}

fn errors(pipeline: &str) -> Vec<(ErrorKind, String)> {
    // Straight from YAML, not through the manifest reader: several cases break
    // the CRD schema too, which the reader would refuse before the checker ran,
    // and the checker must catch them on its own.
    let pipeline: Pipeline = serde_yaml_ng::from_str(pipeline).unwrap_or_else(|e| panic!("{e}"));
    let processors =
        parse_manifests("processors.yaml", PROCESSORS).unwrap_or_else(|e| panic!("{e}"));
    match compile(&pipeline, &processors.processors) {
        Ok(plan) => panic!(
            "expected errors, but the pipeline compiled:\n{}",
            plan.describe()
        ),
        Err(errors) => errors
            .0
            .into_iter()
            .map(|e| (e.kind, e.to_string()))
            .collect(),
    }
}

#[track_caller]
fn assert_errors(pipeline: &str, expected: &[(ErrorKind, &str)]) {
    let actual = errors(pipeline);
    let expected: Vec<(ErrorKind, String)> = expected
        .iter()
        .map(|(k, m)| (*k, (*m).to_owned()))
        .collect();
    assert_eq!(actual, expected, "\nactual errors:\n{actual:#?}");
}

#[test]
fn base_is_valid() {
    let pipelines = parse_manifests("pipeline.yaml", BASE).unwrap();
    compile(&pipelines.pipelines[0], &[]).unwrap();
}

#[test]
fn dedup_key_absent_upstream() {
    assert_errors(
        &with_steps("    - name: dedup\n      dedup: {key: [order_id, event_uuid], window: 10m}\n"),
        &[(
            ErrorKind::MissingField,
            "spec.steps[0] (dedup): needs field \"event_uuid\" (any) for the dedup key, but it does not reach this step; available: amount: number, customer_id: string, event_id: string, note: string, order_id: string, seq: integer, ts: integer",
        )],
    );
}

#[test]
fn order_sequence_field_not_numeric() {
    assert_errors(
        &with_steps(
            "    - name: order\n      order: {key: [order_id], sequence: note, maxDelay: 5s}\n",
        ),
        &[(
            ErrorKind::WrongType,
            "spec.steps[0].order.sequence (order): sequence field \"note\" must be an integer so events can be ordered by it, but it is string",
        )],
    );
}

#[test]
fn order_sequence_field_missing() {
    assert_errors(
        &with_steps(
            "    - name: order\n      order: {key: [order_id], sequence: version, maxDelay: 5s}\n",
        ),
        &[(
            ErrorKind::MissingField,
            "spec.steps[0] (order): needs field \"version\" (integer) for the order sequence, but it does not reach this step; available: amount: number, customer_id: string, event_id: string, note: string, order_id: string, seq: integer, ts: integer",
        )],
    );
}

#[test]
fn stateful_step_after_rekey_without_repartition() {
    let pipeline = with_steps(
        "    - name: by-customer\n      rekey: {key: [customer_id]}\n    - name: dedup\n      dedup: {key: [customer_id, event_id], window: 1m}\n",
    )
    .replace("  sinks:\n", "  allowRepartition: false\n  sinks:\n");
    assert_errors(
        &pipeline,
        &[(
            ErrorKind::RepartitionNotAllowed,
            "spec.steps[1] (dedup): the step keeps state keyed by [customer_id, event_id], but the stream is partitioned by [order_id] (step \"by-customer\" re-keyed the stream by [customer_id]: that sets the key of the records written after it, it does not move events to other partitions); it needs a repartition topic and spec.allowRepartition is false: set it to true, or partition the source topic by fields of the state key",
        )],
    );
}

#[test]
fn duplicate_step_names() {
    assert_errors(
        &with_steps(
            "    - name: dedup\n      dedup: {key: [order_id, event_id], window: 10m}\n    - name: dedup\n      filter: {expression: 'amount > 0.0'}\n",
        ),
        &[(
            ErrorKind::DuplicateName,
            "spec.steps[1] (dedup): step name \"dedup\" is already used by spec.steps[0]; step names must be unique",
        )],
    );
}

#[test]
fn duplicate_sink_names() {
    assert_errors(
        &with_sinks(
            "    - name: out\n      kafka: {topic: a}\n    - name: out\n      kafka: {topic: b}\n",
        ),
        &[(
            ErrorKind::DuplicateName,
            "spec.sinks[1] (out): sink name \"out\" is already used by spec.sinks[0]; sink names must be unique",
        )],
    );
}

#[test]
fn unknown_processor_ref() {
    assert_errors(
        &with_steps("    - name: enrich\n      processorRef: {name: geo-enricher}\n"),
        &[(
            ErrorKind::UnknownProcessor,
            "spec.steps[0].processorRef (enrich): Processor \"geo-enricher\" not found in namespace \"shop\" (known Processors: amount-as-string, applier, liar, needs-region)",
        )],
    );
}

#[test]
fn processor_contract_not_satisfied() {
    assert_errors(
        &with_steps("    - name: regional\n      processorRef: {name: needs-region}\n"),
        &[(
            ErrorKind::MissingField,
            "spec.steps[0] (regional): needs field \"region\" (any) for the expression, but it does not reach this step; available: amount: number, customer_id: string, event_id: string, note: string, order_id: string, seq: integer, ts: integer",
        )],
    );
}

#[test]
fn processor_contract_type_mismatch() {
    assert_errors(
        &with_steps("    - name: check\n      processorRef: {name: amount-as-string}\n"),
        &[(
            ErrorKind::WrongType,
            "spec.steps[0] (check): needs field \"amount\" to be string for the processor's contract, but it arrives as number",
        )],
    );
}

#[test]
fn processor_contract_contradicts_its_operator() {
    assert_errors(
        &with_steps("    - name: shape\n      processorRef: {name: liar}\n"),
        &[(
            ErrorKind::InvalidProcessorContract,
            "spec.steps[0].processorRef (shape): Processor \"liar\": the contract declares schema effect Passthrough, but the project operator replaces the schema",
        )],
    );
}

#[test]
fn step_needs_order_the_stream_does_not_have() {
    assert_errors(
        &with_steps("    - name: apply\n      processorRef: {name: applier}\n"),
        &[(
            ErrorKind::OrderNotGuaranteed,
            "spec.steps[0] (apply): the step needs events in order per [customer_id], but they arrive only in order per [order_id]; add an order step keyed by [customer_id] before it",
        )],
    );
}

#[test]
fn sink_topic_is_the_source_topic() {
    assert_errors(
        &with_sinks("    - name: loop\n      kafka: {topic: orders.cdc}\n"),
        &[(
            ErrorKind::TopicCycle,
            "spec.sinks[0].kafka.topic (loop): topic \"orders.cdc\" is the pipeline's source: writing to it would feed the pipeline its own output",
        )],
    );
}

#[test]
fn sink_topic_is_a_join_table() {
    let pipeline = with_steps(
        "    - name: join\n      join:\n        table: {name: customers, topic: customers, key: [id], replicated: true, schema: {fields: [{name: id, type: string}, {name: name, type: string}]}}\n        lookupKey: [customer_id]\n",
    );
    let pipeline = pipeline.replace("kafka: {topic: orders.clean}", "kafka: {topic: customers}");
    assert_errors(
        &pipeline,
        &[(
            ErrorKind::TopicCycle,
            "spec.sinks[0].kafka.topic (out): topic \"customers\" is also read as a join table: the pipeline would look up rows it wrote itself (a cycle)",
        )],
    );
}

#[test]
fn sink_topic_is_the_dead_letter_topic() {
    assert_errors(
        &with_sinks("    - name: out\n      kafka: {topic: keystone.shop.cdc.dlq}\n"),
        &[(
            ErrorKind::TopicCycle,
            "spec.sinks[0].kafka.topic (out): topic \"keystone.shop.cdc.dlq\" is the pipeline's dead-letter topic",
        )],
    );
}

#[test]
fn dead_letter_topic_is_the_source() {
    let pipeline = BASE.replace(
        "  sinks:\n",
        "  deadLetter: {topic: orders.cdc}\n  sinks:\n",
    );
    assert_errors(
        &pipeline,
        &[(
            ErrorKind::TopicCycle,
            "spec.deadLetter.topic: topic \"orders.cdc\" is the pipeline's source and cannot also be its deadLetter topic",
        )],
    );
}

#[test]
fn two_sinks_write_one_topic() {
    assert_errors(
        &with_sinks(
            "    - name: a\n      kafka: {topic: same}\n    - name: b\n      kafka: {topic: same}\n",
        ),
        &[(
            ErrorKind::InvalidSink,
            "spec.sinks[1].kafka.topic (b): topic \"same\" is already written by spec.sinks[0]",
        )],
    );
}

#[test]
fn step_without_operator() {
    assert_errors(
        &with_steps("    - name: nothing\n"),
        &[(
            ErrorKind::InvalidOperator,
            "spec.steps[0] (nothing): no operator is set: set exactly one of processorRef, filter, map, project, extract, dedup, order, join, enrich or rekey",
        )],
    );
}

#[test]
fn step_with_two_operators() {
    assert_errors(
        &with_steps(
            "    - name: both\n      processorRef: {name: applier}\n      filter: {expression: 'true'}\n",
        ),
        &[(
            ErrorKind::InvalidOperator,
            "spec.steps[0] (both): more than one operator is set (processorRef, filter): a step runs exactly one",
        )],
    );
}

#[test]
fn filter_expression_does_not_parse() {
    let actual = errors(&with_steps(
        "    - name: bad\n      filter: {expression: 'amount >'}\n",
    ));
    assert_eq!(actual.len(), 1, "{actual:?}");
    assert_eq!(actual[0].0, ErrorKind::InvalidExpression);
    assert!(
        actual[0].1.starts_with(
            "spec.steps[0].filter.expression (bad): the CEL expression does not parse: "
        ),
        "{}",
        actual[0].1
    );
}

#[test]
fn filter_reads_an_unknown_field() {
    assert_errors(
        &with_steps("    - name: big\n      filter: {expression: 'total > 100.0'}\n"),
        &[(
            ErrorKind::MissingField,
            "spec.steps[0] (big): needs field \"total\" (any) for the expression, but it does not reach this step; available: amount: number, customer_id: string, event_id: string, note: string, order_id: string, seq: integer, ts: integer",
        )],
    );
}

#[test]
fn comprehension_variables_are_not_fields() {
    let pipeline = BASE.replace(
        "        - {name: amount, type: number}\n",
        "        - {name: amount, type: number}\n        - {name: tags, type: array}\n",
    );
    let pipeline = pipeline.replace(
        "  sinks:\n",
        "    - name: tagged\n      filter: {expression: 'tags.exists(t, t == \"vip\") && missing_field'}\n  sinks:\n",
    );
    let actual = errors(&pipeline);
    assert_eq!(
        actual.len(),
        1,
        "only missing_field is unknown, not t: {actual:?}"
    );
    assert!(
        actual[0].1.contains("needs field \"missing_field\""),
        "{}",
        actual[0].1
    );
}

#[test]
fn map_reads_a_field_that_a_projection_removed() {
    assert_errors(
        &with_steps(
            "    - name: slim\n      project: {fields: [{name: order_id, from: /order_id}]}\n    - name: cents\n      map: {fields: [{name: cents, expression: 'amount * 100.0', type: number}]}\n",
        ),
        &[(
            ErrorKind::MissingField,
            "spec.steps[1] (cents): needs field \"amount\" (any) for the expression, but step \"slim\" (project) removed it: keep it in the fields of that step, or move this step before that one",
        )],
    );
}

#[test]
fn project_from_is_not_a_pointer() {
    assert_errors(
        &with_steps("    - name: slim\n      project: {fields: [{name: id, from: order_id}]}\n"),
        &[(
            ErrorKind::InvalidOperator,
            "spec.steps[0].project.fields[0].from (slim): \"order_id\" is not a JSON pointer: it must start with '/' (for example /order_id)",
        )],
    );
}

#[test]
fn extract_from_a_missing_field() {
    assert_errors(
        &with_steps(
            "    - name: city\n      extract: {fields: [{name: city, from: /address/city}]}\n",
        ),
        &[(
            ErrorKind::MissingField,
            "spec.steps[0] (city): needs field \"address.city\" (any) for the source of output field \"city\", but it does not reach this step; available: amount: number, customer_id: string, event_id: string, note: string, order_id: string, seq: integer, ts: integer",
        )],
    );
}

#[test]
fn dedup_event_time_field_of_wrong_type() {
    assert_errors(
        &with_steps(
            "    - name: dedup\n      dedup: {key: [order_id, event_id], window: 1h, eventTimeField: note}\n",
        ),
        &[(
            ErrorKind::WrongType,
            "spec.steps[0].dedup.eventTimeField (dedup): field \"note\" is the event-time field and must be a timestamp or integer (epoch milliseconds), but it is string",
        )],
    );
}

#[test]
fn join_key_arity_mismatch() {
    assert_errors(
        &with_steps(
            "    - name: join\n      join:\n        table: {name: t, topic: t, key: [id], replicated: true, schema: {fields: [{name: id, type: string}]}}\n        lookupKey: [customer_id, order_id]\n",
        ),
        &[(
            ErrorKind::InvalidOperator,
            "spec.steps[0].join.lookupKey (join): the join matches 2 event field(s) [customer_id, order_id] against table \"t\", whose key has 1 field(s) [id]",
        )],
    );
}

#[test]
fn join_key_type_mismatch() {
    assert_errors(
        &with_steps(
            "    - name: join\n      join:\n        table: {name: t, topic: t, key: [id], replicated: true, schema: {fields: [{name: id, type: integer}]}}\n        lookupKey: [customer_id]\n",
        ),
        &[(
            ErrorKind::WrongType,
            "spec.steps[0].join.lookupKey[0] (join): event field \"customer_id\" is string but is matched against table key \"id\", which is integer",
        )],
    );
}

#[test]
fn join_copies_a_field_the_table_lacks() {
    assert_errors(
        &with_steps(
            "    - name: join\n      join:\n        table: {name: t, topic: t, key: [id], replicated: true, schema: {fields: [{name: id, type: string}, {name: name, type: string}]}}\n        lookupKey: [customer_id]\n        fields: [name, tier]\n",
        ),
        &[(
            ErrorKind::MissingField,
            "spec.steps[0].join.fields[1] (join): table \"t\" has no field \"tier\" (id: string, name: string)",
        )],
    );
}

#[test]
fn search_sink_without_version_needs_order() {
    let pipeline = with_steps("    - name: dedup\n      dedup: {key: [event_id], window: 10m}\n");
    let pipeline = pipeline.replace(
        "      kafka: {topic: orders.clean}\n",
        "      elasticsearch: {endpoint: 'http://es:9200', index: orders, idFields: [order_id]}\n",
    );
    assert_errors(
        &pipeline,
        &[(
            ErrorKind::OrderNotGuaranteed,
            "spec.sinks[0].elasticsearch (out): documents are overwritten by id without a versionField, so events must arrive in order per [order_id], but the stream has no known per-key order; add an order step keyed by [order_id] or set versionField",
        )],
    );
}

#[test]
fn search_sink_version_field_not_integer() {
    let pipeline = BASE.replace(
        "      kafka: {topic: orders.clean}\n",
        "      elasticsearch: {endpoint: 'http://es:9200', index: orders, idFields: [order_id], versionField: note}\n",
    );
    assert_errors(
        &pipeline,
        &[(
            ErrorKind::WrongType,
            "spec.sinks[0].elasticsearch.versionField (out): version field \"note\" must be an integer to serve as an external version, but it is string",
        )],
    );
}

/// The base with more fields in its source schema.
fn with_fields(fields: &str) -> String {
    BASE.replace(
        "        - {name: amount, type: number}\n",
        &format!("        - {{name: amount, type: number}}\n{fields}"),
    )
}

/// `pipeline` with its Kafka sink replaced by a search sink with these settings.
fn to_search(pipeline: &str, settings: &str) -> String {
    pipeline.replace(
        "      kafka: {topic: orders.clean}\n",
        &format!("      elasticsearch: {{endpoint: 'http://es:9200', {settings}}}\n"),
    )
}

#[test]
fn search_sink_with_ids_versions_and_deletes_that_hold() {
    let pipeline = to_search(
        &with_fields(
            "        - {name: op, type: string}\n        - {name: shipping.id, type: string}\n",
        ),
        "index: orders-v1.2_x, idFields: [order_id, seq], versionField: seq, deleteWhen: 'op == \"d\" || event.note == \"gone\" || shipping.id == \"\"'",
    );
    let pipelines = parse_manifests("pipeline.yaml", &pipeline).unwrap_or_else(|e| panic!("{e}"));
    let plan = compile(&pipelines.pipelines[0], &[]).unwrap_or_else(|e| panic!("{e}"));
    let fields: Vec<&str> = plan.sinks[0]
        .schema
        .fields
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert!(fields.contains(&"shipping.id"), "{fields:?}");
}

#[test]
fn search_index_names_the_search_engines_refuse() {
    for (index, problem) in [
        (
            "_orders",
            "index \"_orders\" starts with '_', which Elasticsearch and OpenSearch refuse; start it with a lowercase letter or digit",
        ),
        (
            "-orders",
            "index \"-orders\" starts with '-', which Elasticsearch and OpenSearch refuse; start it with a lowercase letter or digit",
        ),
        (
            "+orders",
            "index \"+orders\" starts with '+', which Elasticsearch and OpenSearch refuse; start it with a lowercase letter or digit",
        ),
        (
            ".",
            "\".\" is not a valid index name (. and .. are reserved); choose another name",
        ),
        (
            "..",
            "\"..\" is not a valid index name (. and .. are reserved); choose another name",
        ),
        (
            ".orders",
            "index \".orders\" starts with '.', which marks hidden and system indices; start it with a lowercase letter or digit",
        ),
        (
            "Orders",
            "index \"Orders\" has uppercase letters, which Elasticsearch and OpenSearch refuse; use \"orders\"",
        ),
        (
            "orders:eu",
            "index \"orders:eu\" contains ':'; index names may contain only lowercase letters, digits, '_', '-' and '.'",
        ),
    ] {
        let pipeline = to_search(BASE, &format!("index: '{index}', idFields: [order_id]"));
        assert_errors(
            &pipeline,
            &[(
                ErrorKind::InvalidSink,
                &format!("spec.sinks[0].elasticsearch.index (out): {problem}"),
            )],
        );
    }
}

#[test]
fn search_id_field_that_is_not_a_scalar() {
    let pipeline = to_search(
        &with_fields("        - {name: lines, type: array}\n        - {name: raw, type: any}\n"),
        "index: orders, idFields: [order_id, lines, raw]",
    );
    assert_errors(
        &pipeline,
        &[
            (
                ErrorKind::WrongType,
                "spec.sinks[0].elasticsearch.idFields[1] (out): id field \"lines\" is array, but a document id is made of scalar values (string, integer, number, boolean or timestamp); choose a scalar field, or derive one with a map step",
            ),
            (
                ErrorKind::WrongType,
                "spec.sinks[0].elasticsearch.idFields[2] (out): id field \"raw\" is any, but a document id is made of scalar values (string, integer, number, boolean or timestamp); choose a scalar field, or derive one with a map step",
            ),
        ],
    );
}

#[test]
fn search_id_field_that_is_missing() {
    assert_errors(
        &to_search(BASE, "index: orders, idFields: [order_id, sku]"),
        &[(
            ErrorKind::MissingField,
            "spec.sinks[0].elasticsearch.idFields[1] (out): needs field \"sku\" for the document id, but it does not reach the sink; available: amount: number, customer_id: string, event_id: string, note: string, order_id: string, seq: integer, ts: integer",
        )],
    );
}

#[test]
fn search_id_field_that_is_optional() {
    let pipeline = to_search(
        &with_fields(
            "        - {name: coupon, type: string, optional: true}\n        - {name: shipping, type: object, optional: true}\n        - {name: shipping.id, type: string}\n",
        ),
        "index: orders, idFields: [coupon, shipping.id], versionField: seq",
    );
    assert_errors(
        &pipeline,
        &[
            (
                ErrorKind::OptionalField,
                "spec.sinks[0].elasticsearch.idFields[0] (out): id field \"coupon\" is optional: an event without it could not be indexed (it would have no document id); make it required (events without it then go to the dead-letter topic) or choose required id fields",
            ),
            (
                ErrorKind::OptionalField,
                "spec.sinks[0].elasticsearch.idFields[1] (out): id field \"shipping.id\" is optional (its parent \"shipping\" is): an event without it could not be indexed (it would have no document id); make it required (events without it then go to the dead-letter topic) or choose required id fields",
            ),
        ],
    );
}

#[test]
fn search_id_field_made_optional_by_a_projection() {
    let pipeline = to_search(
        &BASE.replace(
            "  sinks:\n",
            "    - name: slim\n      project: {fields: [{name: id, from: /order_id, optional: true}, {name: seq, from: /seq}]}\n  sinks:\n",
        ),
        "index: orders, idFields: [id], versionField: seq",
    );
    assert_errors(
        &pipeline,
        &[(
            ErrorKind::OptionalField,
            "spec.sinks[0].elasticsearch.idFields[0] (out): id field \"id\" is optional: an event without it could not be indexed (it would have no document id); make it required (events without it then go to the dead-letter topic) or choose required id fields",
        )],
    );
}

#[test]
fn search_version_field_that_is_optional() {
    let pipeline = to_search(
        &with_fields("        - {name: revision, type: integer, optional: true}\n"),
        "index: orders, idFields: [order_id], versionField: revision",
    );
    assert_errors(
        &pipeline,
        &[(
            ErrorKind::OptionalField,
            "spec.sinks[0].elasticsearch.versionField (out): version field \"revision\" is optional: an event without it could not be written with its external version; make it required (events without it then go to the dead-letter topic) or choose a required version field",
        )],
    );
}

#[test]
fn search_delete_when_does_not_parse() {
    let actual = errors(&to_search(
        BASE,
        "index: orders, idFields: [order_id], deleteWhen: 'note =='",
    ));
    assert_eq!(actual.len(), 1, "{actual:?}");
    assert_eq!(actual[0].0, ErrorKind::InvalidExpression);
    assert!(
        actual[0].1.starts_with(
            "spec.sinks[0].elasticsearch.deleteWhen (out): the CEL expression does not parse: "
        ),
        "{}",
        actual[0].1
    );
}

#[test]
fn search_delete_when_reads_a_field_that_does_not_reach_the_sink() {
    let pipeline = to_search(
        &BASE.replace(
            "  sinks:\n",
            "    - name: slim\n      project: {fields: [{name: order_id, from: /order_id}]}\n  sinks:\n",
        ),
        "index: orders, idFields: [order_id], deleteWhen: 'deleted && event.order_id != \"\"'",
    );
    assert_errors(
        &pipeline,
        &[(
            ErrorKind::MissingField,
            "spec.sinks[0].elasticsearch.deleteWhen (out): needs field \"deleted\" for deleteWhen, but it does not reach the sink; available: order_id: string",
        )],
    );
}

#[test]
fn search_op_field_that_is_not_a_string_without_delete_when() {
    let fields = with_fields("        - {name: op, type: integer}\n");
    assert_errors(
        &to_search(&fields, "index: orders, idFields: [order_id]"),
        &[(
            ErrorKind::WrongType,
            "spec.sinks[0].elasticsearch.deleteWhen (out): deleteWhen is unset, so an event whose \"op\" field is the string \"d\" is a delete (the Debezium convention), but \"op\" reaches the sink as integer; set deleteWhen to the CEL condition that marks a delete in these events",
        )],
    );
    // Saying which events are deletes is the fix.
    let fixed = to_search(
        &fields,
        "index: orders, idFields: [order_id], deleteWhen: 'op == 3'",
    );
    let pipelines = parse_manifests("pipeline.yaml", &fixed).unwrap_or_else(|e| panic!("{e}"));
    compile(&pipelines.pipelines[0], &[]).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn kafka_sink_preserve_order_after_a_repartition_that_loses_it() {
    let pipeline = with_steps("    - name: dedup\n      dedup: {key: [event_id], window: 10m}\n");
    let pipeline = pipeline.replace(
        "kafka: {topic: orders.clean}",
        "kafka: {topic: orders.clean, key: [order_id], preserveOrder: true}",
    );
    assert_errors(
        &pipeline,
        &[(
            ErrorKind::OrderNotGuaranteed,
            "spec.sinks[0].kafka (out): preserveOrder is set, so events must arrive in order per [order_id], but the stream has no known per-key order; add an order step keyed by [order_id]",
        )],
    );
}

#[test]
fn source_key_not_in_schema() {
    let pipeline = BASE.replace("    key: [order_id]\n", "    key: [orderId]\n");
    let actual = errors(&pipeline);
    assert_eq!(
        actual[0],
        (
            ErrorKind::MissingField,
            "spec.source.key[0]: key field \"orderId\" is not in the source schema (amount: number, customer_id: string, event_id: string, note: string, order_id: string, seq: integer, ts: integer)".to_owned()
        )
    );
}

#[test]
fn warehouse_partition_column_missing() {
    assert_errors(
        &with_sinks(
            "    - name: lake\n      parquet: {path: 's3://lake/orders', partitionBy: [country]}\n",
        ),
        &[(
            ErrorKind::MissingField,
            "spec.sinks[0].parquet.partitionBy[0] (lake): partition term country needs field \"country\", but it does not reach the sink; available: amount: number, customer_id: string, event_id: string, note: string, order_id: string, seq: integer, ts: integer",
        )],
    );
}

#[test]
fn lake_partition_terms_are_checked_against_their_transform_and_format() {
    assert_errors(
        &with_sinks(
            "    - name: lake\n      parquet: {path: 'lake/orders', partitionBy: ['month(ts)', 'hour(note)', 'bucket(x, seq)', customer_id]}\n",
        ),
        &[
            (
                ErrorKind::InvalidSink,
                "spec.sinks[0].parquet.path (lake): path \"lake/orders\" must be an absolute file:/// URL or an s3://bucket/prefix URL",
            ),
            (
                ErrorKind::InvalidSink,
                "spec.sinks[0].parquet.partitionBy[0] (lake): month(ts): Parquet folders are a field (field=value), day(field) (date=YYYY-MM-DD) or hour(field) (hour=HH)",
            ),
            (
                ErrorKind::WrongType,
                "spec.sinks[0].parquet.partitionBy[1] (lake): partition term hour(note) takes a timestamp field, but note is string",
            ),
            (
                ErrorKind::InvalidSink,
                "spec.sinks[0].parquet.partitionBy[2] (lake): \"bucket(x, seq)\": the bucket count \"x\" is not a positive integer",
            ),
        ],
    );
}

const ICEBERG_SINK: &str = "iceberg: {catalog: {type: rest, uri: 'http://catalog:8181', warehouse: 's3://warehouse/'}, namespace: shop, table: orders}";

#[test]
fn iceberg_sinks_are_written_through_a_rest_catalog_only() {
    assert_errors(
        &with_sinks(
            "    - name: warehouse\n      iceberg: {catalog: {type: sql, uri: 'jdbc:sqlite:lake.db', warehouse: 's3://warehouse/'}, namespace: shop, table: orders}\n    - name: out\n      kafka: {topic: orders.clean}\n",
        ),
        &[(
            ErrorKind::UnsupportedSink,
            "spec.sinks[0].iceberg.catalog.type (warehouse): sql catalogs are not written by this version of Keystone yet; use an Iceberg REST catalog (type: rest)",
        )],
    );
}

#[test]
fn exactly_the_sink_kinds_outside_the_writable_list_are_refused() {
    for kind in SinkKind::ALL {
        let sink = match kind {
            SinkKind::Kafka => "kafka: {topic: orders.clean}",
            SinkKind::Elasticsearch => {
                "elasticsearch: {endpoint: 'http://es:9200', index: orders, idFields: [order_id]}"
            }
            SinkKind::Iceberg => ICEBERG_SINK,
            SinkKind::Parquet => "parquet: {path: 's3://lake/orders'}",
        };
        let pipeline = with_sinks(&format!("    - name: out\n      {sink}\n"));
        let pipelines =
            parse_manifests("pipeline.yaml", &pipeline).unwrap_or_else(|e| panic!("{e}"));
        let kinds: Vec<ErrorKind> = match compile(&pipelines.pipelines[0], &[]) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.0.into_iter().map(|e| e.kind).collect(),
        };
        if WRITABLE_SINKS.contains(&kind) {
            assert!(kinds.is_empty(), "{kind}: {kinds:?}");
        } else {
            assert_eq!(kinds, [ErrorKind::UnsupportedSink], "{kind}");
        }
    }
}

#[test]
fn sink_with_two_kinds() {
    assert_errors(
        &with_sinks("    - name: both\n      kafka: {topic: a}\n      parquet: {path: 's3://x'}\n"),
        &[(
            ErrorKind::InvalidSink,
            "spec.sinks[0] (both): set exactly one of kafka, elasticsearch, iceberg or parquet",
        )],
    );
}

#[test]
fn all_errors_are_reported_not_only_the_first() {
    let pipeline = with_steps(
        "    - name: a\n      dedup: {key: [nope], window: 1m}\n    - name: a\n      order: {key: [order_id], sequence: note, maxDelay: 1s}\n    - name: c\n      processorRef: {name: missing}\n",
    );
    let kinds: Vec<ErrorKind> = errors(&pipeline)
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(
        kinds,
        [
            ErrorKind::DuplicateName,
            ErrorKind::MissingField,
            ErrorKind::WrongType,
            ErrorKind::UnknownProcessor
        ]
    );
}

#[test]
fn filter_expression_that_is_not_a_bool() {
    assert_errors(
        &with_steps("    - name: f\n      filter: {expression: 'amount + 1'}\n"),
        &[(
            ErrorKind::WrongType,
            "spec.steps[0].filter.expression (f): the filter expression is int (amount + 1), but a filter needs a bool; compare it, for example amount + 1 > 0",
        )],
    );
    assert_errors(
        &with_steps("    - name: f\n      filter: {expression: 'seq > 1 ? note : \"\"'}\n"),
        &[(
            ErrorKind::WrongType,
            "spec.steps[0].filter.expression (f): the filter expression is string (seq > 1 ? note : \"\"), but a filter needs a bool; compare it, for example (seq > 1 ? note : \"\") == \"x\"",
        )],
    );
}

#[test]
fn map_field_whose_expression_is_not_its_declared_type() {
    assert_errors(
        &with_steps(
            "    - name: m\n      map: {fields: [{name: next, expression: 'seq + 1', type: string}, {name: cents, expression: 'amount * 100.0', type: integer}, {name: span, expression: 'duration(\"1h\")', type: any}]}\n",
        ),
        &[
            (
                ErrorKind::WrongType,
                "spec.steps[0].map.fields[0].expression (m): map field \"next\" is declared string, but its expression is int (seq + 1); declare the field integer, or convert the result with string()",
            ),
            (
                ErrorKind::WrongType,
                "spec.steps[0].map.fields[1].expression (m): map field \"cents\" is declared integer, but its expression is double (amount * 100.0); declare the field number, or convert the result with int()",
            ),
            (
                ErrorKind::WrongType,
                "spec.steps[0].map.fields[2].expression (m): map field \"span\" is declared any, but its expression is duration (duration(\"1h\")); durations and bytes have no JSON form; convert it with string()",
            ),
        ],
    );
}

#[test]
fn expression_part_that_always_fails() {
    assert_errors(
        &with_steps(
            "    - name: f\n      filter: {expression: 'note + 1 > 0 || !amount'}\n    - name: m\n      map: {fields: [{name: n, expression: 'seq * 1.5', type: number}]}\n",
        ),
        &[
            (
                ErrorKind::InvalidExpression,
                "spec.steps[0].filter.expression (f): the CEL expression fails whenever it evaluates `note + 1`: + does not apply to string and int",
            ),
            (
                ErrorKind::InvalidExpression,
                "spec.steps[0].filter.expression (f): the CEL expression fails whenever it evaluates `!amount`: ! needs a bool, not int or double",
            ),
            (
                ErrorKind::InvalidExpression,
                "spec.steps[1].map.fields[0].expression (m): the CEL expression fails whenever it evaluates `seq * 1.5`: * does not apply to int and double; CEL does not mix numeric types: convert one side with int(), uint() or double()",
            ),
        ],
    );
}

#[test]
fn search_delete_when_that_is_not_a_bool() {
    assert_errors(
        &to_search(
            &with_fields("        - {name: op, type: string}\n"),
            "index: orders, idFields: [order_id], deleteWhen: 'op'",
        ),
        &[(
            ErrorKind::WrongType,
            "spec.sinks[0].elasticsearch.deleteWhen (out): deleteWhen is string (op), but it must be a bool that says whether the event is a delete; compare it, for example op == \"d\"",
        )],
    );
}

#[test]
fn typed_expressions_that_hold() {
    // Each of these can be what its step needs at run time, so none is refused:
    // numbers of any kind compare, an int is a timestamp (epoch milliseconds),
    // a nullable result may still be the declared type, and unknown members of
    // open objects are not typed.
    let pipeline = with_fields(
        "        - {name: op, type: string}\n        - {name: tags, type: array}\n        - {name: shipping.city, type: string, optional: true}\n",
    );
    let pipeline = pipeline.replace(
        "  sinks:\n",
        concat!(
            "    - name: f\n      filter: {expression: 'tags.exists(t, t == \"vip\") && size(note) > 0 && (amount > 10 || seq % 2 == 0) && event.amount >= 0.5'}\n",
            "    - name: m\n      map:\n        fields:\n",
            "          - {name: cents, expression: 'amount * 100.0', type: number}\n",
            "          - {name: day, expression: 'ts / 86400000', type: integer}\n",
            "          - {name: at, expression: 'ts', type: timestamp}\n",
            "          - {name: seen, expression: 'timestamp(\"2024-01-01T00:00:00Z\")', type: timestamp}\n",
            "          - {name: label, expression: 'order_id + \"/\" + string(seq)', type: string}\n",
            "          - {name: city, expression: 'shipping.city', type: string}\n",
            "          - {name: vip, expression: 'note == \"\" ? null : true', type: boolean}\n",
            "          - {name: doubled, expression: 'tags.map(t, t)', type: array}\n",
            "          - {name: extra, expression: 'shipping.unlisted', type: integer}\n",
            "  sinks:\n",
        ),
    );
    let pipeline = to_search(
        &pipeline,
        "index: orders, idFields: [order_id], deleteWhen: 'event.op == \"d\" || day < 0'",
    );
    let pipelines = parse_manifests("pipeline.yaml", &pipeline).unwrap_or_else(|e| panic!("{e}"));
    compile(&pipelines.pipelines[0], &[]).unwrap_or_else(|e| panic!("{e}"));
}

const CUSTOMERS: &str = "table: {name: customers, topic: customers, key: [id], replicated: true, schema: {fields: [{name: id, type: string}, {name: tier, type: string}]}}";

#[test]
fn enrich_into_an_existing_scalar_is_refused() {
    assert_errors(
        &with_steps(&format!(
            "    - name: tiers\n      enrich:\n        {CUSTOMERS}\n        lookupKey: [customer_id]\n        into: note\n"
        )),
        &[(
            ErrorKind::WrongType,
            "spec.steps[0].enrich.into (tiers): into \"note\" writes the table's fields under field \"note\", which is string here: a matched event would have it replaced by an object, and every later reader of \"note\" would fail; choose an into that is not a field of the stream, for example \"customers\"",
        )],
    );
}

#[test]
fn join_into_a_field_nested_under_a_scalar_is_refused() {
    assert_errors(
        &with_steps(&format!(
            "    - name: tiers\n      join:\n        {CUSTOMERS}\n        lookupKey: [customer_id]\n        into: amount.customer\n"
        )),
        &[(
            ErrorKind::WrongType,
            "spec.steps[0].join.into (tiers): into \"amount.customer\" writes the table's fields under field \"amount\", which is number here: a matched event would have it replaced by an object, and every later reader of \"amount\" would fail; choose an into that is not a field of the stream, for example \"customers\"",
        )],
    );
}

#[test]
fn map_overwriting_an_object_removes_what_was_nested_in_it() {
    let pipeline = BASE.replace(
        "        - {name: amount, type: number}\n",
        "        - {name: amount, type: number}\n        - {name: address.city, type: string}\n",
    );
    let pipeline = pipeline.replace(
        "  sinks:\n",
        "    - name: flatten\n      map: {fields: [{name: address, expression: 'address.city', type: string}]}\n    - name: city\n      extract: {fields: [{name: city, from: /address/city}]}\n  sinks:\n",
    );
    assert_errors(
        &pipeline,
        &[(
            ErrorKind::MissingField,
            "spec.steps[3] (city): needs field \"address.city\" (any) for the source of output field \"city\", but step \"flatten\" (map) removed it: give the output field of that step another name, or move this step before that one",
        )],
    );
}

/// Checks `pipeline` with extra Processors besides the shared ones.
fn errors_with_processors(pipeline: &str, extra: &str) -> Vec<(ErrorKind, String)> {
    let pipelines = parse_manifests("pipeline.yaml", pipeline).unwrap_or_else(|e| panic!("{e}"));
    let mut processors = parse_manifests("processors.yaml", PROCESSORS)
        .unwrap_or_else(|e| panic!("{e}"))
        .processors;
    processors.extend(
        parse_manifests("extra.yaml", extra)
            .unwrap_or_else(|e| panic!("{e}"))
            .processors,
    );
    match compile(&pipelines.pipelines[0], &processors) {
        Ok(_) => panic!("expected errors, but the pipeline compiled"),
        Err(errors) => errors
            .0
            .into_iter()
            .map(|e| (e.kind, e.to_string()))
            .collect(),
    }
}

#[test]
fn a_field_a_processor_replaced_away_names_the_processor() {
    let slim = "apiVersion: keystone.dev/v1alpha1\nkind: Processor\nmetadata: {name: slim, namespace: shop}\nspec:\n  project:\n    fields: [{name: order_id, from: /order_id}]\n  contract:\n    schema: {effect: Replaces, fields: [{name: order_id, type: string}]}\n";
    let actual = errors_with_processors(
        &with_steps(
            "    - name: shape\n      processorRef: {name: slim}\n    - name: regional\n      filter: {expression: 'customer_id != \"\"'}\n",
        ),
        slim,
    );
    assert_eq!(
        actual,
        [(
            ErrorKind::MissingField,
            "spec.steps[1] (regional): needs field \"customer_id\" (any) for the expression, but step \"shape\" (Processor \"slim\", project) removed it: keep it in the fields of Processor \"slim\", or move this step before that one".to_owned()
        )]
    );
}

#[test]
fn a_field_missing_for_several_steps_is_one_error_naming_them_all() {
    assert_errors(
        &with_steps(
            "    - name: a\n      filter: {expression: 'region != \"x\"'}\n    - name: b\n      filter: {expression: 'region != \"y\"'}\n    - name: c\n      map: {fields: [{name: r, expression: 'region', type: string}]}\n",
        ),
        &[(
            ErrorKind::MissingField,
            "spec.steps[0] (a): needs field \"region\" (any) for the expression, but it does not reach this step; available: amount: number, customer_id: string, event_id: string, note: string, order_id: string, seq: integer, ts: integer (steps \"b\", \"c\" need it too)",
        )],
    );
}

#[test]
fn a_processor_used_twice_has_its_own_errors_reported_once() {
    let boasting = "apiVersion: keystone.dev/v1alpha1\nkind: Processor\nmetadata: {name: boasting, namespace: shop}\nspec:\n  filter: {expression: 'true'}\n  contract:\n    schema: {effect: Adds, fields: [{name: score, type: number}]}\n";
    let actual = errors_with_processors(
        &with_steps(
            "    - name: one\n      processorRef: {name: boasting}\n    - name: two\n      processorRef: {name: boasting}\n",
        ),
        boasting,
    );
    assert_eq!(
        actual,
        [(
            ErrorKind::InvalidProcessorContract,
            "spec.steps[0].processorRef (one): Processor \"boasting\": the contract declares schema effect Adds, but the filter operator passes the schema through unchanged".to_owned()
        )]
    );
}

#[test]
fn pointers_that_start_with_a_slash_but_are_still_wrong() {
    let cases = [
        (
            "/",
            "\"/\" names a member with an empty name, not the whole event: a field is read from a pointer to it, for example /payload/id (the whole event cannot be copied into one field)",
        ),
        (
            "''",
            "the JSON pointer is empty: name the field to read, for example /payload/id",
        ),
        (
            "/a//b",
            "\"/a//b\" has an empty segment (\"//\" or a trailing '/'): every segment between slashes must name a member",
        ),
        (
            "/a~2b",
            "\"/a~2b\" has a '~' that is not an escape: write ~0 for '~' and ~1 for '/' in a member name",
        ),
    ];
    for (pointer, message) in cases {
        assert_errors(
            &with_steps(&format!(
                "    - name: slim\n      extract: {{fields: [{{name: id, from: {pointer}}}]}}\n"
            )),
            &[(
                ErrorKind::InvalidOperator,
                &format!("spec.steps[0].extract.fields[0].from (slim): {message}"),
            )],
        );
    }
}

#[test]
fn parse_errors_read_as_line_column_message() {
    for (expression, message) in [
        (
            "amount >",
            "1:9: the expression ends where a value or field name is expected",
        ),
        (
            "note ==",
            "1:8: the expression ends where a value or field name is expected",
        ),
    ] {
        assert_errors(
            &with_steps(&format!(
                "    - name: bad\n      filter: {{expression: '{expression}'}}\n"
            )),
            &[(
                ErrorKind::InvalidExpression,
                &format!(
                    "spec.steps[0].filter.expression (bad): the CEL expression does not parse: {message}"
                ),
            )],
        );
    }
}
