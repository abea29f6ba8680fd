//! The CRDs shipped by the Helm chart and the kustomize base are exactly the
//! ones the API crate generates and commits; the chart's values satisfy its
//! schema's shape and render into a configuration the operator accepts.

use std::path::Path;

use keystone_operator::OperatorConfig;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

#[test]
fn chart_and_kustomize_crds_are_identical_to_the_generated_ones() {
    for (file, generated) in keystone_crds::crd_files() {
        let committed = read(&format!("crds/{file}"));
        assert_eq!(
            committed, generated,
            "crds/{file} is stale: run `cargo run -p keystone-crds --bin crdgen`"
        );
        for copy in [
            format!("helm/keystone/crds/{file}"),
            format!("config/crd/bases/{file}"),
        ] {
            assert!(
                read(&copy) == committed,
                "{copy} differs from crds/{file}: copy it (cp crds/{file} {copy})"
            );
        }
    }
}

#[test]
fn values_schema_is_json_and_closed() {
    let schema: serde_json::Value =
        serde_json::from_str(&read("helm/keystone/values.schema.json")).expect("schema parses");
    assert_eq!(schema["additionalProperties"], false);
    let values: serde_json::Value =
        serde_yaml_ng::from_str(&read("helm/keystone/values.yaml")).expect("values parse");
    let properties = schema["properties"].as_object().expect("properties");
    for key in values.as_object().expect("values map").keys() {
        assert!(
            properties.contains_key(key),
            "values.yaml key {key} is not in values.schema.json"
        );
    }
}

#[test]
fn the_kustomize_manager_config_is_accepted_by_the_operator() {
    let config = OperatorConfig::parse(&read("config/manager/config.yaml")).expect("config parses");
    config.validate().expect("config is valid");
    assert_eq!(config.resolve_cluster(None).as_deref(), Some("default"));
}
