//! `format: avro`: the source schema is the registered schema's contract,
//! and a step that reads a field the producers do not send is refused with
//! the subject and version it was checked against.

use keystone_crds::schema::{FieldSpec, FieldType, SchemaSpec};
use keystone_crds::{
    ContractErrors, ErrorKind, Plan, RegisteredSource, SourceFacts, compile_with_facts,
    parse_manifests,
};

fn compile(
    source: &str,
    steps: &str,
    registered: Option<&RegisteredSource>,
) -> Result<Plan, ContractErrors> {
    let text = format!(
        r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {{name: orders, namespace: shop}}
spec:
  schemaRegistry: {{url: "http://registry:8081"}}
  source:
{source}
  steps:
{steps}
  sinks:
    - name: out
      kafka: {{topic: orders.out, format: avro}}
"#
    );
    let manifests = parse_manifests("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    compile_with_facts(
        &manifests.pipelines[0],
        &[],
        &SourceFacts {
            table: None,
            registered,
        },
    )
}

fn field(name: &str, field_type: FieldType, optional: bool) -> FieldSpec {
    FieldSpec {
        name: name.into(),
        field_type,
        optional,
        description: None,
    }
}

fn orders_v3() -> RegisteredSource {
    RegisteredSource {
        subject: "orders-value".into(),
        version: 3,
        contract: SchemaSpec {
            fields: vec![
                field("id", FieldType::String, false),
                field("amount", FieldType::Number, false),
                field("note", FieldType::String, true),
            ],
            open: false,
        },
        origin: "the registry at http://registry:8081/".into(),
    }
}

const AVRO_SOURCE: &str = "    topic: orders\n    format: avro\n    key: [id]";
const FILTER_AMOUNT: &str = "    - {name: big, filter: {expression: 'amount > 100'}}";

#[test]
fn steps_are_checked_against_the_registered_schema() {
    let registered = orders_v3();
    let plan =
        compile(AVRO_SOURCE, FILTER_AMOUNT, Some(&registered)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.source.schema.fields, registered.contract.fields);
    assert!(
        !plan.source.schema.open,
        "producers send only the schema's fields"
    );
    let mut contract = registered.contract.fields.clone();
    contract.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(plan.sinks[0].schema.fields, contract);
}

#[test]
fn a_field_the_schema_lacks_is_refused_naming_the_subject_and_version() {
    let registered = orders_v3();
    let steps = "    - {name: vip, filter: {expression: 'total > 100'}}";
    let errors = compile(AVRO_SOURCE, steps, Some(&registered)).expect_err("no such field");
    let error = errors
        .0
        .iter()
        .find(|e| e.kind == ErrorKind::MissingField)
        .unwrap_or_else(|| panic!("{errors}"));
    assert_eq!(error.path, "spec.steps[0]");
    assert!(error.message.contains("\"total\""), "{error}");
    assert!(
        error.message.contains(
            "the Avro schema orders-value version 3 (from the registry at http://registry:8081/)"
        ),
        "{error}"
    );
}

#[test]
fn declared_fields_must_be_the_registered_ones() {
    let registered = orders_v3();
    let source = "    topic: orders\n    format: avro\n    schema:\n      fields:\n        - {name: id, type: integer}\n        - {name: email, type: string}\n        - {name: note, type: string}";
    let errors = compile(source, FILTER_AMOUNT, Some(&registered)).expect_err("declared wrong");
    let messages: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert_eq!(errors.0.len(), 3, "{messages:#?}");
    assert_eq!(errors.0[0].kind, ErrorKind::WrongType);
    assert!(
        messages[0].contains("spec.source.schema.fields[0]: id is declared integer"),
        "{messages:#?}"
    );
    assert_eq!(errors.0[1].kind, ErrorKind::MissingField);
    assert!(
        messages[1].contains("email is declared, but the Avro schema orders-value version 3"),
        "{messages:#?}"
    );
    assert_eq!(errors.0[2].kind, ErrorKind::OptionalField);
    assert!(messages[2].contains("declare it optional"), "{messages:#?}");
}

#[test]
fn a_capture_or_ingest_source_is_not_avro() {
    let source = "    topic: orders\n    format: avro\n    http: {tokensSecret: t}";
    let errors = compile(source, FILTER_AMOUNT, None).expect_err("http writes JSON");
    assert!(
        errors.0.iter().any(|e| e.path == "spec.source.format"
            && e.message.contains("the http source writes JSON events")),
        "{errors}"
    );
}

#[test]
fn without_the_registered_schema_the_declared_one_stands_in() {
    let source = "    topic: orders\n    format: avro\n    schema:\n      fields:\n        - {name: amount, type: number}";
    let plan = compile(source, FILTER_AMOUNT, None).unwrap_or_else(|e| panic!("{e}"));
    assert!(plan.source.schema.open);
    assert!(
        plan.source.avro.is_none(),
        "the checker does not fill the Avro parts"
    );
}

#[test]
fn avro_keys_need_key_fields() {
    let text = r#"
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: orders, namespace: shop}
spec:
  schemaRegistry: {url: "http://registry:8081"}
  source:
    topic: orders
    schema: {fields: [{name: id, type: string}]}
  sinks:
    - name: unkeyed
      kafka: {topic: orders.unkeyed, keyFormat: avro}
    - name: keyed
      kafka: {topic: orders.keyed, key: [id], keyFormat: avro}
"#;
    let manifests = parse_manifests("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let errors = keystone_crds::compile(&manifests.pipelines[0], &[]).expect_err("no key");
    assert_eq!(errors.0.len(), 1, "{errors}");
    let error = &errors.0[0];
    assert_eq!(error.kind, ErrorKind::InvalidSink);
    assert_eq!(error.path, "spec.sinks[0].kafka.keyFormat");
    assert!(
        error.message.contains("the sink has none: set kafka.key"),
        "{error}"
    );
}

#[test]
fn a_plan_names_its_reader_schema_by_subject_and_version_or_as_the_manifests_own() {
    let mut source = keystone_crds::plan::PlanAvroSource {
        registry_url: "http://registry:8081".into(),
        subject: "clicks-value".into(),
        version: 3,
        reader_schema: String::new(),
    };
    assert_eq!(source.reader_name(), "clicks-value version 3");
    source.version = keystone_crds::check::INLINE_VERSION;
    assert_eq!(
        source.reader_name(),
        "the schema of spec.source.avro.schema"
    );
}

#[test]
fn descriptions_follow_the_fields_a_step_passes_on_unchanged() {
    let described = |name: &str, field_type, optional, description: &str| FieldSpec {
        description: Some(description.into()),
        ..field(name, field_type, optional)
    };
    let registered = RegisteredSource {
        contract: SchemaSpec {
            fields: vec![
                described("id", FieldType::String, false, "The order's id"),
                described("amount", FieldType::Number, false, "Total in euros"),
                described("note", FieldType::String, true, "What the buyer wrote"),
            ],
            open: false,
        },
        ..orders_v3()
    };
    // A filter passes everything on; the projection copies `id` as itself,
    // `amount` as `total` and `note` (optional) as `remark`; the map then
    // writes `id` anew, which no longer means what the source said.
    let steps = "    - {name: big, filter: {expression: 'amount > 100'}}
    - name: slim
      project: {fields: [{name: id, from: /id}, {name: total, from: /amount}, {name: remark, from: /note, optional: true}]}
    - name: tag
      map: {fields: [{name: id, expression: 'id + \"-eu\"', type: string}]}";
    let plan = compile(AVRO_SOURCE, steps, Some(&registered)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        plan.sinks[0].schema.fields,
        [
            field("id", FieldType::String, false),
            described("remark", FieldType::String, true, "What the buyer wrote"),
            described("total", FieldType::Number, false, "Total in euros"),
        ]
    );
    // The source's contract keeps them all.
    assert_eq!(plan.source.schema.fields, registered.contract.fields);
}
