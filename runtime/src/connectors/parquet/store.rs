//! The object store a Parquet sink writes to: a local folder (`file:///...`)
//! or an S3-compatible bucket (`s3://bucket/prefix`), with the endpoint,
//! region and keys from the sink's credentials Secret.

use std::sync::Arc;
use std::time::Duration;

use keystone_crds::pipeline::{SinkSecretKey, SinkSpec};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::{Path as StorePath, PathPart};
use object_store::{ObjectStore, RetryConfig};

use crate::connectors::lake::LakeError;

/// How long one store request is retried (with backoff) before the sink
/// reports it; the sink itself then tries again at the next commit.
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);

/// A store and the base every path of the sink is under.
pub struct Store {
    pub objects: Arc<dyn ObjectStore>,
    pub base: StorePath,
    /// The base as the manifest gives it, for messages.
    pub location: String,
}

impl Store {
    /// Opens the store of `sink` (a Parquet sink), reading its credentials
    /// through `env`.
    pub fn open(sink: &SinkSpec, env: &dyn Fn(&str) -> Option<String>) -> Result<Store, LakeError> {
        let Some(parquet) = &sink.parquet else {
            return Err(LakeError::Path {
                path: String::new(),
                message: "the sink sets no parquet settings".to_owned(),
            });
        };
        let location = parquet.path.trim_end_matches('/').to_owned();
        let invalid = |message: &str| LakeError::Path {
            path: parquet.path.clone(),
            message: message.to_owned(),
        };
        if let Some(folder) = location.strip_prefix("file://") {
            if !folder.starts_with('/') {
                return Err(invalid(
                    "a file:// path must be absolute (file:///data/events)",
                ));
            }
            std::fs::create_dir_all(folder)
                .map_err(|e| invalid(&format!("cannot create it: {e}")))?;
            let objects = LocalFileSystem::new_with_prefix(folder)
                .map_err(|source| LakeError::Store {
                    location: location.clone(),
                    source,
                })?
                .with_automatic_cleanup(true);
            return Ok(Store {
                objects: Arc::new(objects),
                base: StorePath::default(),
                location,
            });
        }
        let Some(rest) = location.strip_prefix("s3://") else {
            return Err(invalid("must be a file:/// or s3:// URL"));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("names no bucket (s3://bucket/prefix)"));
        }
        let secret = |key| env(&sink.secret_env(key)).filter(|v| !v.is_empty());
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(secret(SinkSecretKey::Region).unwrap_or_else(|| "us-east-1".to_owned()))
            .with_retry(RetryConfig {
                retry_timeout: RETRY_TIMEOUT,
                ..RetryConfig::default()
            });
        if let Some(endpoint) = secret(SinkSecretKey::Endpoint) {
            builder = builder
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false)
                .with_endpoint(endpoint);
        }
        match (
            secret(SinkSecretKey::AccessKeyId),
            secret(SinkSecretKey::SecretAccessKey),
        ) {
            (Some(id), Some(key)) => {
                builder = builder.with_access_key_id(id).with_secret_access_key(key);
            }
            (None, None) => {}
            _ => {
                return Err(LakeError::Path {
                    path: parquet.path.clone(),
                    message: format!(
                        "{} and {} must be set together",
                        sink.secret_env(SinkSecretKey::AccessKeyId),
                        sink.secret_env(SinkSecretKey::SecretAccessKey)
                    ),
                });
            }
        }
        let objects = builder.build().map_err(|source| LakeError::Store {
            location: location.clone(),
            source,
        })?;
        Ok(Store {
            objects: Arc::new(objects),
            base: StorePath::from(prefix),
            location,
        })
    }

    /// The store path of `relative` (slash-separated) under the base.
    pub fn path(&self, relative: &str) -> StorePath {
        // Segments are escaped already (layout::escape): taken as they are.
        self.path_of_parts(
            relative
                .split('/')
                .filter(|p| !p.is_empty())
                .map(|p| PathPart::parse(p).unwrap_or_else(|_| PathPart::from(p))),
        )
    }

    /// The path of `parts` (as a listing returns them) under the base.
    pub fn path_of_parts<'a>(&'a self, parts: impl IntoIterator<Item = PathPart<'a>>) -> StorePath {
        StorePath::from_iter(self.base.parts().chain(parts))
    }

    /// `relative` as the user would find it, for messages.
    pub fn show(&self, relative: &str) -> String {
        format!("{}/{relative}", self.location)
    }
}
