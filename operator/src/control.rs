//! The credential of the runtime's control endpoints (`POST /checkpoint`,
//! `POST /resume`).
//!
//! One random key, in the Secret `keystone-control-key` of the operator's
//! namespace (made by the operator on first use, read by nobody else), derives
//! each pipeline's token: HMAC-SHA256 over `<namespace>/<pipeline>`. The
//! operator writes the token into the Secret `<pipeline>-control` of the
//! pipeline's namespace (owned by the Pipeline), which the stage pods read
//! through `secretKeyRef`; the operator itself never reads those Secrets back,
//! so it needs to create Secrets in pipeline namespaces but never to read them.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Api;
use kube::api::PostParams;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::context::Context;
use crate::error::Error;
use crate::resources::{LABEL_MANAGED_BY, LABEL_PIPELINE, MANAGED_BY};

/// The Secret, in the operator's namespace, that holds the key all tokens derive from.
pub const CONTROL_KEY_SECRET: &str = "keystone-control-key";
const CONTROL_KEY_FIELD: &str = "key";
/// The key of the token in a pipeline's control Secret.
pub const CONTROL_TOKEN_FIELD: &str = "token";
/// The environment variable the runtime reads its token from.
pub const CONTROL_TOKEN_ENV: &str = "KEYSTONE_CONTROL_TOKEN";

/// The Secret in the pipeline's namespace its pods read the token from.
pub fn control_secret_name(pipeline: &str) -> String {
    format!("{pipeline}-control")
}

/// A pipeline's token: stable for its name (a re-created pipeline whose old
/// Secret is still being garbage-collected gets the same value), unguessable
/// without the key.
pub fn derive_token(key: &[u8], namespace: &str, pipeline: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let tag = hmac::sign(&key, format!("{namespace}/{pipeline}").as_bytes());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The key, from its Secret, made on first use.
async fn load_or_create_key(ctx: &Context) -> Result<Vec<u8>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.operator_namespace);
    let read = |secret: Secret| {
        secret
            .data
            .and_then(|d| d.get(CONTROL_KEY_FIELD).map(|v| v.0.clone()))
            .filter(|k| k.len() >= 32)
    };
    for _ in 0..3 {
        if let Some(secret) = secrets.get_opt(CONTROL_KEY_SECRET).await? {
            return read(secret).ok_or_else(|| {
                Error::ControlKey(format!(
                    "Secret {}/{CONTROL_KEY_SECRET} has no key {CONTROL_KEY_FIELD:?} of at least 32 bytes; delete it and the operator makes a new one",
                    ctx.operator_namespace
                ))
            });
        }
        let mut key = vec![0u8; 32];
        SystemRandom::new().fill(&mut key).map_err(|_| {
            Error::ControlKey("cannot be made: the system random source failed".to_owned())
        })?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(CONTROL_KEY_SECRET.to_owned()),
                labels: Some(BTreeMap::from([(
                    LABEL_MANAGED_BY.to_owned(),
                    MANAGED_BY.to_owned(),
                )])),
                annotations: Some(BTreeMap::from([(
                    "keystone.dev/description".to_owned(),
                    "The key the control tokens of runtime pods derive from. Deleting it rotates every token at the next rollout."
                        .to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                CONTROL_KEY_FIELD.to_owned(),
                ByteString(key.clone()),
            )])),
            ..Secret::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => return Ok(key),
            // Another replica made it first: read theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::ControlKey(format!(
        "Secret {}/{CONTROL_KEY_SECRET} kept appearing and disappearing",
        ctx.operator_namespace
    )))
}

/// The token of a pipeline's instances.
pub async fn token(ctx: &Context, namespace: &str, pipeline: &str) -> Result<String, Error> {
    let key = ctx
        .control_key
        .get_or_try_init(|| load_or_create_key(ctx))
        .await?;
    Ok(derive_token(key, namespace, pipeline))
}

/// Makes sure the pipeline's control Secret exists. It is created, never
/// replaced: its value only depends on the key and the pipeline's name.
pub async fn ensure_secret(
    ctx: &Context,
    namespace: &str,
    pipeline: &str,
    owner: &OwnerReference,
) -> Result<(), Error> {
    let token = token(ctx, namespace, pipeline).await?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(control_secret_name(pipeline)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned()),
                (LABEL_PIPELINE.to_owned(), pipeline.to_owned()),
            ])),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        string_data: Some(BTreeMap::from([(CONTROL_TOKEN_FIELD.to_owned(), token)])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_per_pipeline_and_key_and_are_stable() {
        let key = [7u8; 32];
        let a = derive_token(&key, "ns", "orders");
        assert_eq!(a.len(), 64);
        assert_eq!(a, derive_token(&key, "ns", "orders"));
        assert_ne!(a, derive_token(&key, "ns", "payments"));
        assert_ne!(a, derive_token(&key, "other", "orders"));
        assert_ne!(a, derive_token(&[8u8; 32], "ns", "orders"));
        // No way to forge one name's token from another's by moving the separator.
        assert_ne!(
            derive_token(&key, "a", "b-c"),
            derive_token(&key, "a-b", "c")
        );
    }
}
