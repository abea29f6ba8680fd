//! A generator of cases for the CRDs, so that `check` and the API server
//! cannot drift: `e2e/tests/crds_apiserver.rs` runs them against the testbed.
//!
//! Cases are generated from the CRDs' openAPIV3Schema: for every node of a set
//! of valid base manifests (the samples and two bases that set every field), one
//! mutation per constraint that violates it (null, wrong type, outside the enum,
//! too short, too long, pattern mismatch, below the minimum, above the maximum,
//! a fraction for an integer, too few or too many items, a duplicate map-list
//! key, a missing required field, an unknown field) and one per bound that sits
//! exactly on it. The CEL rules, which no generic mutation can be relied on to
//! break, come from an explicit table (`rule_cases`), as do metadata and status.
//! Each case is sent to the API server as a dry-run create with strict field
//! validation, and `keystone_crds::validate::validate` must refuse exactly the
//! cases the server refuses.

mod mutations;
mod rules;

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use mutations::{edited, mutations};
use rules::{WIDE_PIPELINE, WIDE_PROCESSOR, rule_cases};

/// A change to a manifest at a JSON pointer.
#[derive(Clone, Debug)]
pub enum Edit {
    Set(String, Json),
    Remove(String),
}

/// A manifest to send to the API server and to `check`.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub kind: &'static str,
    pub document: Json,
    /// Constructed to satisfy the bound it sits on (the server should accept it).
    pub boundary: bool,
}

fn yaml_documents(text: &str) -> Vec<Json> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
        .filter(|d: &Json| !d.is_null())
        .collect()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kind_of(document: &Json) -> &'static str {
    match document["kind"].as_str() {
        Some("Pipeline") => "Pipeline",
        Some("Processor") => "Processor",
        other => panic!("not a Keystone kind: {other:?}"),
    }
}

/// The valid bases: every sample and the two wide bases, without a namespace
/// (the test's namespace is the request's).
pub fn bases() -> Vec<(String, Json)> {
    let mut bases = Vec::new();
    let samples = repo().join("config/samples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&samples)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let stem = file.file_stem().unwrap().to_string_lossy().into_owned();
        for (i, document) in yaml_documents(&text).into_iter().enumerate() {
            bases.push((format!("{stem}#{i}"), document));
        }
    }
    bases.push((
        "wide-pipeline".into(),
        yaml_documents(WIDE_PIPELINE).remove(0),
    ));
    bases.push((
        "wide-processor".into(),
        yaml_documents(WIDE_PROCESSOR).remove(0),
    ));
    for (_, base) in &mut bases {
        base["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("namespace");
    }
    bases
}

/// Every case: each base as it is, its mutations, and the rule cases.
/// `schema_of` gives a kind's openAPIV3Schema (`keystone_crds::validate::crd_schema`).
pub fn generate_cases<'s>(schema_of: impl Fn(&str) -> Option<&'s Json>) -> Vec<Case> {
    let mut cases = Vec::new();
    let bases = bases();
    for (base_name, base) in &bases {
        let kind = kind_of(base);
        cases.push(Case {
            name: format!("{base_name}: as it is"),
            kind,
            document: base.clone(),
            boundary: true,
        });
        let schema = schema_of(kind).unwrap();
        let mut found = Vec::new();
        mutations(
            &base["spec"],
            &schema["properties"]["spec"],
            "/spec",
            &mut found,
        );
        for (label, edit, boundary) in found {
            cases.push(Case {
                name: format!("{base_name}: {label}"),
                kind,
                document: edited(base, &edit),
                boundary,
            });
        }
    }
    let wide = |name: &str| &bases.iter().find(|(n, _)| n == name).unwrap().1;
    cases.extend(rule_cases(wide("wide-pipeline"), wide("wide-processor")));
    cases
}

/// A dry-run create with strict field validation: Ok, or the server's refusal.
pub async fn dry_run_create(
    client: &kube::Client,
    namespace: &str,
    case: &Case,
) -> Result<(), String> {
    let plural = match case.kind {
        "Pipeline" => "pipelines",
        _ => "processors",
    };
    let url = format!("/apis/keystone.dev/v1alpha1/namespaces/{namespace}/{plural}");
    let params = kube::api::PostParams {
        dry_run: true,
        field_manager: None,
    };
    let body = serde_json::to_vec(&case.document).unwrap();
    let mut request = kube::core::Request::new(url).create(&params, body).unwrap();
    // PostParams has no field validation; without it the server would only warn.
    let uri = format!("{}&fieldValidation=Strict", request.uri());
    *request.uri_mut() = uri.parse().unwrap();
    match client.request_text(request).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if matches!(status.code, 400 | 422) => Err(status.message),
        Err(e) => panic!("{}: the request failed: {e}", case.name),
    }
}
