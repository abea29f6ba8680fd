//! Every sample under config/samples compiles, and its plan (stages and topics)
//! is pinned by a snapshot.

use std::path::{Path, PathBuf};

use keystone_crds::{Manifests, compile, parse_manifests};

fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples")
}

fn load(name: &str) -> Manifests {
    let mut manifests = Manifests::default();
    for file in [name, "processors.yaml"] {
        let path = samples_dir().join(file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        manifests.extend(parse_manifests(file, &text).unwrap_or_else(|e| panic!("{e}")));
    }
    manifests
}

fn pipeline_samples() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(samples_dir())
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") && name != "processors.yaml")
        .collect();
    names.sort();
    names
}

#[test]
fn there_is_a_sample_per_use_case() {
    let names = pipeline_samples();
    for expected in [
        "orders-cdc-to-search.yaml",
        "clickstream-etl.yaml",
        "orders-join-customers.yaml",
        "payments-enrich.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "missing sample {expected}"
        );
    }
}

#[test]
fn every_sample_compiles_and_matches_its_plan_snapshot() {
    for name in pipeline_samples() {
        let manifests = load(&name);
        assert_eq!(manifests.pipelines.len(), 1, "{name} holds one pipeline");
        let plan = compile(&manifests.pipelines[0], &manifests.processors)
            .unwrap_or_else(|errors| panic!("{name} is invalid:\n{errors}"));
        insta::assert_snapshot!(name.trim_end_matches(".yaml"), plan.describe());
    }
}

#[test]
fn sample_processors_have_consistent_contracts() {
    let manifests = load("payments-enrich.yaml");
    assert_eq!(manifests.processors.len(), 3);
    for processor in &manifests.processors {
        keystone_crds::check_processor(processor).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn cdc_sample_is_one_stage_because_keys_include_the_partitioning_key() {
    let manifests = load("orders-cdc-to-search.yaml");
    let plan = compile(&manifests.pipelines[0], &manifests.processors).unwrap();
    assert_eq!(plan.stages.len(), 1);
    let changelogs: Vec<&str> = plan.stages[0]
        .steps
        .iter()
        .filter_map(|s| s.state.as_ref().map(|st| st.changelog_topic.as_str()))
        .collect();
    assert_eq!(
        changelogs,
        [
            "keystone.default.orders-cdc-to-search.changelog.drop-redeliveries",
            "keystone.default.orders-cdc-to-search.changelog.in-order"
        ]
    );
}

#[test]
fn join_sample_repartitions_by_the_join_key() {
    let manifests = load("orders-join-customers.yaml");
    let plan = compile(&manifests.pipelines[0], &manifests.processors).unwrap();
    assert_eq!(plan.stages.len(), 2);
    assert_eq!(
        plan.stages[0].steps.len(),
        0,
        "the first stage only repartitions"
    );
    assert_eq!(plan.stages[1].input.partitioned_by, ["customer_id"]);
    assert_eq!(
        plan.stages[1].input.topic,
        "keystone.default.orders-join-customers.repartition.with-customer"
    );
}

#[test]
fn plan_round_trips_through_json() {
    let manifests = load("orders-cdc-to-search.yaml");
    let plan = compile(&manifests.pipelines[0], &manifests.processors).unwrap();
    let json = serde_json::to_string(&plan).unwrap();
    let back: keystone_crds::Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, plan);
    assert_eq!(back.hash(), plan.hash());
}
