//! A pipeline's buttons. Each is the patch the README documents for kubectl,
//! made as the user, so the console never does what kubectl could not.

use axum::Form;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use keystone_crds::Pipeline;
use kube::api::{Patch, PatchParams};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::FIELD_MANAGER;
use crate::auth::User;
use crate::layout::{api_problem, problem};

#[derive(Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    checkpoint: Option<String>,
}

/// The patch for an action, given the pipeline as it is now.
pub fn patch_for(
    action: &str,
    pipeline: &Pipeline,
    form: &ActionForm,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Patch<Value>, String> {
    Ok(match action {
        // kubectl patch ksp NAME --type merge -p '{"spec":{"state":"Suspended"}}'
        "suspend" => Patch::Merge(json!({"spec": {"state": "Suspended"}})),
        "resume" => Patch::Merge(json!({"spec": {"state": "Running"}})),
        // kubectl patch ksp NAME --type merge -p '{"spec":{"checkpointTrigger":"'$(date +%s)'"}}'
        "checkpoint" => {
            Patch::Merge(json!({"spec": {"checkpointTrigger": now.timestamp().to_string()}}))
        }
        // kubectl patch ksp NAME --type merge -p '{"spec":{"restore":{"checkpoint":"ID","nonce":"N"}}}'
        "restore" => {
            let id = form
                .checkpoint
                .as_deref()
                .filter(|id| !id.is_empty())
                .ok_or("Restore needs a checkpoint id.")?;
            let retained = pipeline
                .status
                .as_ref()
                .is_some_and(|s| s.checkpoints.iter().any(|c| c.id == id));
            if !retained {
                return Err(format!("Checkpoint {id} is not among the retained ones."));
            }
            // A new nonce restores the same checkpoint again if asked twice.
            Patch::Merge(
                json!({"spec": {"restore": {"checkpoint": id, "nonce": now.timestamp_millis().to_string()}}}),
            )
        }
        // kubectl patch ksp NAME --type json -p '[{"op":"replace","path":"/spec","value":STABLE}]'
        // with STABLE from `status.lastStableSpec`.
        "rollback" => {
            let stable = pipeline
                .status
                .as_ref()
                .and_then(|s| s.last_stable_spec.as_deref())
                .ok_or("There is no last stable spec to roll back to yet.")?;
            let stable: Value = serde_json::from_str(stable)
                .map_err(|e| format!("status.lastStableSpec is not JSON: {e}"))?;
            Patch::Json(
                serde_json::from_value(
                    json!([{"op": "replace", "path": "/spec", "value": stable}]),
                )
                .expect("a JSON patch"),
            )
        }
        other => return Err(format!("There is no action {other:?}.")),
    })
}

pub async fn run(
    User(session): User,
    Path((namespace, name, action)): Path<(String, String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let api: kube::Api<Pipeline> = kube::Api::namespaced(session.client.clone(), &namespace);
    let pipeline = match api.get(&name).await {
        Ok(p) => p,
        Err(e) => return api_problem(&session, &format!("read Pipeline {namespace}/{name}"), &e),
    };
    if crate::pipelines::managed_by_argo(&pipeline.metadata) {
        return problem(
            Some(&session),
            StatusCode::CONFLICT,
            "Managed by Argo CD",
            "Argo CD would revert this change at its next sync: make it in git.",
        );
    }
    let patch = match patch_for(&action, &pipeline, &form, chrono::Utc::now()) {
        Ok(patch) => patch,
        Err(message) => {
            return problem(
                Some(&session),
                StatusCode::BAD_REQUEST,
                "Cannot do that",
                &message,
            );
        }
    };
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    match api.patch(&name, &params, &patch).await {
        Ok(_) => Redirect::to(&format!("/pipelines/{namespace}/{name}")).into_response(),
        Err(e) => api_problem(
            &session,
            &format!("{action} Pipeline {namespace}/{name}"),
            &e,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use keystone_crds::pipeline::CheckpointSummary;

    fn pipeline() -> Pipeline {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/samples/clickstream-etl.yaml"
        ))
        .unwrap();
        serde_yaml_ng::from_str(&text).unwrap()
    }

    fn merge(patch: Patch<Value>) -> Value {
        match patch {
            Patch::Merge(v) => v,
            _ => panic!("a merge patch"),
        }
    }

    #[test]
    fn suspend_resume_and_checkpoint_are_the_documented_merge_patches() {
        let now = chrono::DateTime::from_timestamp(1_790_000_000, 0).unwrap();
        let form = ActionForm { checkpoint: None };
        let p = pipeline();
        assert_eq!(
            merge(patch_for("suspend", &p, &form, now).unwrap()),
            json!({"spec": {"state": "Suspended"}})
        );
        assert_eq!(
            merge(patch_for("resume", &p, &form, now).unwrap()),
            json!({"spec": {"state": "Running"}})
        );
        assert_eq!(
            merge(patch_for("checkpoint", &p, &form, now).unwrap()),
            json!({"spec": {"checkpointTrigger": "1790000000"}})
        );
        assert!(patch_for("explode", &p, &form, now).is_err());
    }

    #[test]
    fn restore_takes_only_a_retained_checkpoint_and_rollback_needs_a_stable_spec() {
        let now = chrono::Utc::now();
        let mut p = pipeline();
        let form = ActionForm {
            checkpoint: Some("20261126-101500-123".into()),
        };
        assert!(
            patch_for("restore", &p, &form, now)
                .unwrap_err()
                .contains("not among")
        );
        assert!(
            patch_for("rollback", &p, &form, now)
                .unwrap_err()
                .contains("no last stable")
        );
        let mut status = keystone_crds::PipelineStatus::default();
        status.checkpoints.push(CheckpointSummary {
            id: "20261126-101500-123".into(),
            time: Time(k8s_openapi::jiff::Timestamp::now()),
            reason: None,
            trigger: None,
            plan_hash: None,
        });
        status.last_stable_spec = Some(serde_json::to_string(&p.spec).unwrap());
        p.status = Some(status);
        let restore = merge(patch_for("restore", &p, &form, now).unwrap());
        assert_eq!(
            restore["spec"]["restore"]["checkpoint"],
            "20261126-101500-123"
        );
        match patch_for("rollback", &p, &form, now).unwrap() {
            Patch::Json(ops) => {
                let ops = serde_json::to_value(ops).unwrap();
                assert_eq!(ops[0]["path"], "/spec");
                assert_eq!(ops[0]["value"], serde_json::to_value(&p.spec).unwrap());
            }
            _ => panic!("a JSON patch"),
        }
    }
}
