//! The committed CRD YAML is what the types generate, and it carries the
//! validation users rely on.

use std::path::Path;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    for (name, generated) in keystone_crds::crd_files() {
        let committed = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| {
            panic!("{name}: {e}; run `cargo run -p keystone-crds --bin crdgen`")
        });
        assert!(
            committed == generated,
            "crds/{name} is out of date: run `cargo run -p keystone-crds --bin crdgen` and commit the result"
        );
    }
}

#[test]
fn crds_carry_validation_rules_printer_columns_and_names() {
    let files = keystone_crds::crd_files();
    let pipeline = &files[0].1;
    for needle in [
        "step names must be unique within a pipeline",
        "the source topic cannot also be a Kafka sink topic",
        "each step sets exactly one of processorRef",
        "each sink sets exactly one of kafka, elasticsearch, iceberg or parquet",
        "pattern: ^([0-9]+(ms|s|m|h|d))+$",
        "x-kubernetes-list-type: map",
        "- ksp",
        "- keystone",
        "jsonPath: .status.readyStages",
        "jsonPath: .status.lastCheckpoint.time",
        "status: {}",
    ] {
        assert!(pipeline.contains(needle), "pipeline CRD lacks {needle:?}");
    }
    let processor = &files[1].1;
    assert!(processor.contains("set exactly one operator"));
    assert!(processor.contains("- ksproc"));
}

#[test]
fn every_spec_field_is_documented() {
    // `kubectl explain` prints these descriptions; an undocumented field is a gap in the user docs.
    for (name, yaml) in keystone_crds::crd_files() {
        let crd: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut undocumented = Vec::new();
        walk(spec, "spec", &mut undocumented);
        assert!(
            undocumented.is_empty(),
            "{name}: fields without description: {undocumented:#?}"
        );
    }
}

fn walk(schema: &serde_json::Value, path: &str, undocumented: &mut Vec<String>) {
    if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
        for (key, child) in properties {
            let child_path = format!("{path}.{key}");
            if child.get("description").is_none() {
                undocumented.push(child_path.clone());
            }
            walk(child, &child_path, undocumented);
        }
    }
    if let Some(items) = schema.get("items") {
        walk(items, &format!("{path}[]"), undocumented);
    }
}

#[test]
fn no_field_is_named_like_a_yaml_1_1_boolean() {
    // kubectl parses manifests as YAML 1.1, where an unquoted `on`, `off`, `yes`,
    // `no`, `y` or `n` key is a boolean: such a field could never be set.
    const BOOLEAN_WORDS: [&str; 8] = ["on", "off", "yes", "no", "y", "n", "true", "false"];
    for (name, yaml) in keystone_crds::crd_files() {
        let crd: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let mut names = Vec::new();
        collect_property_names(
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
            &mut names,
        );
        let bad: Vec<&String> = names
            .iter()
            .filter(|n| BOOLEAN_WORDS.contains(&n.to_ascii_lowercase().as_str()))
            .collect();
        assert!(
            bad.is_empty(),
            "{name}: fields named like YAML 1.1 booleans: {bad:?}"
        );
    }
}

fn collect_property_names(schema: &serde_json::Value, names: &mut Vec<String>) {
    if let Some(properties) = schema.get("properties").and_then(|p| p.as_object()) {
        for (key, child) in properties {
            names.push(key.clone());
            collect_property_names(child, names);
        }
    }
    if let Some(items) = schema.get("items") {
        collect_property_names(items, names);
    }
}

#[test]
fn every_format_is_one_kubernetes_knows() {
    // The API server warns `unrecognized format` on every apply for others
    // (schemars writes "uint32" for u32); Argo CD and kubectl print it.
    const KNOWN: [&str; 6] = ["int32", "int64", "float", "double", "byte", "date-time"];
    for (name, yaml) in keystone_crds::crd_files() {
        let crd: serde_json::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        let mut unknown = Vec::new();
        formats(&crd["spec"]["versions"], "", &mut unknown);
        unknown.retain(|(_, format)| !KNOWN.contains(&format.as_str()));
        assert!(
            unknown.is_empty(),
            "{name}: formats Kubernetes does not know: {unknown:#?}"
        );
    }
}

fn formats(value: &serde_json::Value, path: &str, found: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, child) in map {
                let child_path = format!("{path}/{key}");
                match (key.as_str(), child) {
                    ("format", serde_json::Value::String(format)) => {
                        found.push((child_path, format.clone()))
                    }
                    _ => formats(child, &child_path, found),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                formats(child, &format!("{path}/{i}"), found);
            }
        }
        _ => {}
    }
}
