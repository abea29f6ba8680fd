use super::*;
use keystone_crds::schema::FieldType::{
    Any, Array, Boolean, Integer, Number, Object, String as Str, Timestamp,
};

fn parse(json: &str) -> Schema {
    Schema::parse_str(json).expect("schema")
}

fn fields(spec: &SchemaSpec) -> Vec<(String, FieldType, bool)> {
    spec.fields
        .iter()
        .map(|f| (f.name.clone(), f.field_type, f.optional))
        .collect()
}

fn f(name: &str, t: FieldType, optional: bool) -> (String, FieldType, bool) {
    (name.to_owned(), t, optional)
}

const ORDER: &str = r#"{
  "type": "record", "name": "Order", "namespace": "shop",
  "fields": [
    {"name": "id", "type": "long"},
    {"name": "status", "type": {"type": "enum", "name": "Status", "symbols": ["NEW", "PAID"]}},
    {"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}},
    {"name": "placed_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "ship_on", "type": ["null", {"type": "int", "logicalType": "date"}], "default": null},
    {"name": "token", "type": {"type": "string", "logicalType": "uuid"}},
    {"name": "customer", "type": {"type": "record", "name": "Customer", "fields": [
      {"name": "id", "type": "int"},
      {"name": "tier", "type": ["string", "null"]}
    ]}},
    {"name": "coupon", "type": ["null", {"type": "record", "name": "Coupon", "fields": [
      {"name": "code", "type": "string"}
    ]}], "default": null},
    {"name": "lines", "type": {"type": "array", "items": "string"}},
    {"name": "labels", "type": {"type": "map", "values": "string"}},
    {"name": "score", "type": ["null", "int", "double"], "default": null},
    {"name": "either", "type": ["int", "string"]},
    {"name": "weight", "type": "float"},
    {"name": "gift", "type": "boolean"}
  ]
}"#;

#[test]
fn a_registered_record_is_a_closed_contract_of_dotted_fields() {
    let spec = contract_of(&parse(ORDER)).expect("contract");
    assert!(!spec.open, "a reader schema's fields are all an event has");
    assert_eq!(
        fields(&spec),
        vec![
            f("id", Integer, false),
            f("status", Str, false),
            f("amount", Str, false),
            f("placed_at", Timestamp, false),
            f("ship_on", Str, true),
            f("token", Str, false),
            f("customer", Object, false),
            f("customer.id", Integer, false),
            f("customer.tier", Str, true),
            // Inside an optional record every field may be absent.
            f("coupon", Object, true),
            f("coupon.code", Str, true),
            f("lines", Array, false),
            f("labels", Object, false),
            f("score", Any, true),
            f("either", Any, false),
            f("weight", Number, false),
            f("gift", Boolean, false),
        ]
    );
    // The contract is one the checker takes.
    let schema = keystone_crds::schema::Schema::from_spec(&spec);
    assert_eq!(schema.get("customer.tier").map(|i| i.field_type), Some(Str));
}

#[test]
fn a_named_type_used_twice_is_listed_at_both_places() {
    let schema = parse(
        r#"{"type": "record", "name": "Shipment", "fields": [
          {"name": "from", "type": {"type": "record", "name": "Address", "fields": [{"name": "city", "type": "string"}]}},
          {"name": "to", "type": "Address"}
        ]}"#,
    );
    assert_eq!(
        fields(&contract_of(&schema).expect("contract")),
        vec![
            f("from", Object, false),
            f("from.city", Str, false),
            f("to", Object, false),
            f("to.city", Str, false),
        ]
    );
}

#[test]
fn a_record_that_contains_itself_is_refused() {
    let direct = parse(
        r#"{"type": "record", "name": "Node", "namespace": "graph", "fields": [
          {"name": "value", "type": "long"},
          {"name": "next", "type": ["null", "Node"], "default": null}
        ]}"#,
    );
    assert_eq!(
        contract_of(&direct).unwrap_err().to_string(),
        "the schema's type graph.Node contains itself: Keystone does not read recursive records (their depth has no bound)"
    );
    let through_another = parse(
        r#"{"type": "record", "name": "Tree", "namespace": "graph", "fields": [
          {"name": "leaves", "type": {"type": "array", "items": {"type": "record", "name": "Leaf", "fields": [
            {"name": "subtree", "type": ["null", "graph.Tree"], "default": null}
          ]}}}
        ]}"#,
    );
    assert_eq!(recursive_type(&through_another), Some("graph.Tree".into()));
    // A type used twice side by side is not a recursion.
    let twice = parse(
        r#"{"type": "record", "name": "Pair", "fields": [
          {"name": "a", "type": {"type": "record", "name": "P", "fields": [{"name": "x", "type": "int"}]}},
          {"name": "b", "type": "P"}
        ]}"#,
    );
    assert_eq!(recursive_type(&twice), None);
}

#[test]
fn a_schema_that_is_not_a_record_is_refused_by_name() {
    let error = contract_of(&parse(r#"["null", "string"]"#)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the registered schema is a union, not a record: Keystone reads events that are records"
    );
    let error = contract_of(&parse(r#""long""#)).unwrap_err();
    assert_eq!(
        error.to_string(),
        "the registered schema is of type long, not a record: Keystone reads events that are records"
    );
}

#[test]
fn a_record_wider_than_a_contract_is_refused() {
    let many: Vec<_> = (0..=MAX_FIELDS)
        .map(|i| format!(r#"{{"name": "f{i}", "type": "int"}}"#))
        .collect();
    let schema = parse(&format!(
        r#"{{"type": "record", "name": "Wide", "fields": [{}]}}"#,
        many.join(",")
    ));
    assert_eq!(
        contract_of(&schema).unwrap_err(),
        ContractError::TooManyFields {
            count: MAX_FIELDS + 1,
            max: MAX_FIELDS
        }
    );
}

fn spec(fields: &[(&str, FieldType, bool)]) -> SchemaSpec {
    SchemaSpec {
        fields: fields
            .iter()
            .map(|(name, field_type, optional)| FieldSpec {
                name: (*name).to_owned(),
                field_type: *field_type,
                optional: *optional,
                description: None,
            })
            .collect(),
        open: true,
    }
}

#[test]
fn an_output_contract_becomes_a_record_with_nullable_optionals() {
    let contract = spec(&[
        ("id", Str, false),
        ("customer.id", Integer, false),
        ("customer.tier", Str, true),
        ("total", Number, true),
        ("at", Timestamp, false),
        ("tags", Array, true),
        ("paid", Boolean, false),
    ]);
    let output = schema_for_output(&contract, "dev.keystone.shop", "Order").expect("schema");
    let schema = output.schema;
    let expected = parse(
        r#"{"type": "record", "name": "Order", "namespace": "dev.keystone.shop", "fields": [
          {"name": "id", "type": "string"},
          {"name": "customer", "type": {"type": "record", "name": "Order_customer", "fields": [
            {"name": "id", "type": "long"},
            {"name": "tier", "type": ["null", "string"], "default": null}
          ]}},
          {"name": "total", "type": ["null", "double"], "default": null},
          {"name": "at", "type": {"type": "long", "logicalType": "timestamp-micros"}},
          {"name": "tags", "type": ["null", "string"], "default": null, "doc": "tags: JSON text"},
          {"name": "paid", "type": "boolean"}
        ]}"#,
    );
    assert_eq!(schema.canonical_form(), expected.canonical_form());
    // Stable: the same contract gives the same schema, so a redeploy registers
    // nothing new.
    assert_eq!(
        schema_for_output(&contract, "dev.keystone.shop", "Order")
            .expect("schema")
            .text,
        output.text
    );
    // The registered text keeps what the parsed form drops: docs.
    let text: serde_json::Value = serde_json::from_str(&output.text).expect("json");
    assert_eq!(text["fields"][4]["doc"], "tags: JSON text");
    assert_eq!(
        Schema::parse_str(&output.text)
            .expect("text")
            .canonical_form(),
        schema.canonical_form()
    );
    // Read back, the contract's types come back (JSON text as strings).
    assert_eq!(
        fields(&contract_of(&schema).expect("contract")),
        vec![
            f("id", Str, false),
            f("customer", Object, false),
            f("customer.id", Integer, false),
            f("customer.tier", Str, true),
            f("total", Number, true),
            f("at", Timestamp, false),
            f("tags", Str, true),
            f("paid", Boolean, false),
        ]
    );
}

#[test]
fn an_output_contract_without_fields_has_no_schema() {
    assert_eq!(
        schema_for_output(&spec(&[]), "ns", "Empty").unwrap_err(),
        ContractError::Columns(ColumnsError::NoFields)
    );
}

#[test]
fn one_key_field_is_its_own_type_and_several_are_a_record_in_key_order() {
    let contract = spec(&[
        ("id", Str, false),
        ("region", Str, true),
        ("customer.id", Integer, false),
        ("customer.tier", Str, false),
        ("total", Number, false),
    ]);
    let key = |fields: &[&str]| -> Vec<std::string::String> {
        fields.iter().map(|f| (*f).to_owned()).collect()
    };
    let one = schema_for_key(&contract, &key(&["id"]), "dev.keystone.shop", "Order_key")
        .expect("one field");
    assert_eq!(one.text, r#""string""#);
    assert_eq!(one.schema, Schema::String);
    let optional = schema_for_key(&contract, &key(&["region"]), "ns", "K").expect("optional");
    assert_eq!(optional.text, r#"["null","string"]"#);
    let object = schema_for_key(
        &contract,
        &key(&["customer"]),
        "dev.keystone.shop",
        "Order_key",
    )
    .expect("an object field");
    assert_eq!(
        object.schema.canonical_form(),
        parse(
            r#"{"type": "record", "name": "Order_key", "namespace": "dev.keystone.shop", "fields": [
              {"name": "id", "type": "long"}, {"name": "tier", "type": "string"}]}"#
        )
        .canonical_form()
    );
    let several = schema_for_key(
        &contract,
        &key(&["customer.id", "id"]),
        "dev.keystone.shop",
        "Order_key",
    )
    .expect("several");
    assert_eq!(
        several.schema.canonical_form(),
        parse(
            r#"{"type": "record", "name": "Order_key", "namespace": "dev.keystone.shop", "fields": [
              {"name": "customer_id", "type": "long"}, {"name": "id", "type": "string"}]}"#
        )
        .canonical_form(),
        "fields named after their paths, in the key's order"
    );
}

#[test]
fn a_key_field_outside_the_contract_or_two_of_one_name_have_no_key_schema() {
    let contract = spec(&[("a.b", Str, false), ("a_b", Str, false)]);
    let key = |fields: &[&str]| -> Vec<std::string::String> {
        fields.iter().map(|f| (*f).to_owned()).collect()
    };
    let missing = schema_for_key(&contract, &key(&["a.c"]), "ns", "K").unwrap_err();
    assert_eq!(missing, ContractError::KeyField { path: "a.c".into() });
    assert!(
        missing
            .to_string()
            .contains("key field a.c is not in the output contract")
    );
    assert_eq!(
        schema_for_key(&contract, &key(&["a.b", "a_b"]), "ns", "K").unwrap_err(),
        ContractError::KeyFieldNames {
            first: "a.b".into(),
            second: "a_b".into(),
            name: "a_b".into()
        }
    );
    assert_eq!(
        schema_for_key(&contract, &[], "ns", "K").unwrap_err(),
        ContractError::NoKeyFields
    );
}

#[test]
fn field_docs_become_descriptions_and_descriptions_docs() {
    let registered = parse(
        r#"{"type": "record", "name": "Order", "fields": [
          {"name": "id", "type": "string", "doc": "The order's id"},
          {"name": "customer", "doc": "Who ordered", "type": {"type": "record", "name": "Customer", "fields": [
            {"name": "id", "type": "long", "doc": "The customer's id"}
          ]}},
          {"name": "extra", "type": ["null", {"type": "map", "values": "string"}], "doc": "Anything else"},
          {"name": "total", "type": "double"}
        ]}"#,
    );
    let contract = contract_of(&registered).expect("contract");
    let descriptions: Vec<(&str, Option<&str>)> = contract
        .fields
        .iter()
        .map(|f| (f.name.as_str(), f.description.as_deref()))
        .collect();
    assert_eq!(
        descriptions,
        [
            ("id", Some("The order's id")),
            ("customer", Some("Who ordered")),
            ("customer.id", Some("The customer's id")),
            ("extra", Some("Anything else")),
            ("total", None),
        ]
    );

    // Derived back for a sink: each described field has its doc; a JSON-text
    // column says so after its description.
    let output = schema_for_output(&contract, "dev.keystone.shop", "Order").expect("schema");
    let text: serde_json::Value = serde_json::from_str(&output.text).expect("json");
    let doc =
        |field: &serde_json::Value| field.get("doc").and_then(|d| d.as_str()).map(str::to_owned);
    let fields = text["fields"].as_array().expect("fields");
    assert_eq!(doc(&fields[0]), Some("The order's id".into()));
    assert_eq!(doc(&fields[1]), Some("Who ordered".into()));
    assert_eq!(
        doc(&fields[1]["type"]["fields"][0]),
        Some("The customer's id".into())
    );
    assert_eq!(
        doc(&fields[2]),
        Some("Anything else (extra: JSON text)".into())
    );
    assert_eq!(doc(&fields[3]), None);
    // Docs are not part of the schema's identity: a reworded description
    // leaves the canonical form (what compatibility compares) as it was.
    let mut reworded = contract.clone();
    reworded.fields[0].description = Some("Another wording".into());
    let again = schema_for_output(&reworded, "dev.keystone.shop", "Order").expect("schema");
    assert_ne!(again.text, output.text);
    assert_eq!(
        again.schema.canonical_form(),
        output.schema.canonical_form()
    );
}

#[test]
fn a_doc_longer_than_a_description_may_be_is_cut_at_a_character() {
    let long = "é".repeat(MAX_DESCRIPTION + 10);
    let registered = parse(&format!(
        r#"{{"type": "record", "name": "R", "fields": [{{"name": "a", "type": "string", "doc": "{long}"}}]}}"#
    ));
    let contract = contract_of(&registered).expect("contract");
    let description = contract.fields[0]
        .description
        .as_deref()
        .expect("described");
    assert_eq!(description.chars().count(), MAX_DESCRIPTION);
}
