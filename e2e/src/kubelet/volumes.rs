//! Materializes a pod's volumes as folders under the pod's state folder, the
//! way the kubelet lays them out: each ConfigMap/Secret volume holds a
//! `..data` symlink to a versioned folder and one symlink per key, so an
//! update swaps `..data` atomically and is visible through the bind mount.

use std::collections::{BTreeMap, HashMap, hash_map::DefaultHasher};
use std::hash::{Hash, Hasher};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, ServiceAccount, Volume};
use kube::api::PostParams;
use kube::{Api, Client};

use super::PodFailure;
use super::env::{PodFacts, config_map_data, field_ref, secret_data};
use super::process::Mount;

/// Where in-cluster clients look for their credentials.
pub const SERVICE_ACCOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The synthetic volume holding the service-account token (the
/// ServiceAccount admission plugin, which would add it to the spec, is off).
pub const TOKEN_VOLUME: &str = "keystone-kube-api-access";

/// A file to write: relative path, content, mode.
type Files = BTreeMap<String, (Vec<u8>, u32)>;

/// Context for volumes that need more than the pod spec.
pub struct VolumeContext<'a> {
    pub client: &'a Client,
    pub pod: &'a Pod,
    pub facts: &'a PodFacts,
    pub ca_cert: Option<&'a Path>,
    /// Tokens already issued for this pod, reused for half their lifetime so
    /// the periodic refresh does not rewrite the volume every time.
    pub tokens: &'a std::sync::Mutex<HashMap<String, (String, std::time::Instant)>>,
}

/// Writes every volume of the pod under `root`, returning volume name ->
/// folder. Called again periodically to pick up ConfigMap/Secret changes.
pub async fn materialize(
    ctx: &VolumeContext<'_>,
    root: &Path,
) -> Result<HashMap<String, PathBuf>, PodFailure> {
    let ns = ctx.pod.metadata.namespace.as_deref().unwrap_or("default");
    let spec = ctx
        .pod
        .spec
        .as_ref()
        .ok_or_else(|| PodFailure::unsupported("pod has no spec"))?;
    let mut paths = HashMap::new();
    for volume in spec.volumes.iter().flatten() {
        let dir = root.join(&volume.name);
        if volume.empty_dir.is_some() {
            std::fs::create_dir_all(&dir).map_err(io_failure)?;
        } else {
            let files = volume_files(ctx, ns, volume).await?;
            write_atomic(&dir, &files).map_err(io_failure)?;
        }
        paths.insert(volume.name.clone(), dir);
    }
    if wants_token(ctx.pod) {
        let sa = service_account(ctx.pod);
        let sas: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
        // Without the ServiceAccount, there is nothing to mount; a pod that
        // needs API access will fail visibly when it tries.
        if sas.get_opt(&sa).await.ok().flatten().is_some() {
            let mut files = Files::new();
            let token = request_token(ctx, ns, &sa, None, 3600).await?;
            files.insert("token".to_owned(), (token.into_bytes(), 0o644));
            files.insert("namespace".to_owned(), (ns.as_bytes().to_vec(), 0o644));
            if let Some(ca) = ctx.ca_cert {
                let ca = std::fs::read(ca).map_err(io_failure)?;
                files.insert("ca.crt".to_owned(), (ca, 0o644));
            }
            let dir = root.join(TOKEN_VOLUME);
            write_atomic(&dir, &files).map_err(io_failure)?;
            paths.insert(TOKEN_VOLUME.to_owned(), dir);
        }
    }
    Ok(paths)
}

fn io_failure(e: std::io::Error) -> PodFailure {
    PodFailure::config(format!("writing volume: {e}"))
}

fn service_account(pod: &Pod) -> String {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| {
        s.service_account_name
            .clone()
            .or_else(|| s.service_account.clone())
    })
    .filter(|s| !s.is_empty())
    .unwrap_or_else(|| "default".to_owned())
}

fn names_service_account(pod: &Pod, sa: &str) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .is_some_and(|name| name == sa)
}

/// Whether the pod gets a token mounted at [`SERVICE_ACCOUNT_PATH`].
fn wants_token(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    if spec.automount_service_account_token == Some(false) {
        return false;
    }
    // A pod that mounts something there itself keeps it.
    !spec.containers.iter().any(|c| {
        c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path.trim_end_matches('/') == SERVICE_ACCOUNT_PATH)
    })
}

async fn volume_files(
    ctx: &VolumeContext<'_>,
    ns: &str,
    volume: &Volume,
) -> Result<Files, PodFailure> {
    let mut files = Files::new();
    if let Some(cm) = &volume.config_map {
        let mode = mode(cm.default_mode);
        let optional = cm.optional.unwrap_or(false);
        if let Some(data) = config_map_data(ctx.client, ns, &cm.name, optional).await? {
            let data = data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
            add_items(
                &mut files,
                data,
                cm.items.as_deref(),
                mode,
                optional,
                &cm.name,
            )?;
        }
    } else if let Some(s) = &volume.secret {
        let mode = mode(s.default_mode);
        let optional = s.optional.unwrap_or(false);
        let name = s.secret_name.clone().unwrap_or_default();
        if let Some(data) = secret_data(ctx.client, ns, &name, optional).await? {
            add_items(&mut files, data, s.items.as_deref(), mode, optional, &name)?;
        }
    } else if let Some(d) = &volume.downward_api {
        let mode = mode(d.default_mode);
        for item in d.items.iter().flatten() {
            let f = item.field_ref.as_ref().ok_or_else(|| {
                PodFailure::unsupported(format!(
                    "volume {}: only fieldRef downwardAPI items are supported",
                    volume.name
                ))
            })?;
            let value = field_ref(ctx.pod, f, ctx.facts)?;
            files.insert(
                item.path.clone(),
                (value.into_bytes(), item.mode.map_or(mode, to_mode)),
            );
        }
    } else if let Some(p) = &volume.projected {
        let mode = mode(p.default_mode);
        for source in p.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                let optional = cm.optional.unwrap_or(false);
                if let Some(data) = config_map_data(ctx.client, ns, &cm.name, optional).await? {
                    let data = data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
                    add_items(
                        &mut files,
                        data,
                        cm.items.as_deref(),
                        mode,
                        optional,
                        &cm.name,
                    )?;
                }
            } else if let Some(s) = &source.secret {
                let optional = s.optional.unwrap_or(false);
                if let Some(data) = secret_data(ctx.client, ns, &s.name, optional).await? {
                    add_items(
                        &mut files,
                        data,
                        s.items.as_deref(),
                        mode,
                        optional,
                        &s.name,
                    )?;
                }
            } else if let Some(t) = &source.service_account_token {
                let sa = service_account(ctx.pod);
                let expiry = t.expiration_seconds.unwrap_or(3600);
                let token = request_token(ctx, ns, &sa, t.audience.clone(), expiry).await?;
                files.insert(t.path.clone(), (token.into_bytes(), mode));
            } else if let Some(d) = &source.downward_api {
                for item in d.items.iter().flatten() {
                    let f = item.field_ref.as_ref().ok_or_else(|| {
                        PodFailure::unsupported(format!(
                            "volume {}: only fieldRef downwardAPI items are supported",
                            volume.name
                        ))
                    })?;
                    let value = field_ref(ctx.pod, f, ctx.facts)?;
                    files.insert(
                        item.path.clone(),
                        (value.into_bytes(), item.mode.map_or(mode, to_mode)),
                    );
                }
            } else {
                return Err(PodFailure::unsupported(format!(
                    "volume {}: this projected source is not supported by the process kubelet",
                    volume.name
                )));
            }
        }
    } else {
        return Err(PodFailure::unsupported(format!(
            "volume {}: only configMap, secret, emptyDir, downwardAPI and projected volumes are supported by the process kubelet",
            volume.name
        )));
    }
    Ok(files)
}

/// Is this volume type one the kubelet can materialize?
pub fn supported(volume: &Volume) -> bool {
    volume.config_map.is_some()
        || volume.secret.is_some()
        || volume.empty_dir.is_some()
        || volume.downward_api.is_some()
        || volume.projected.is_some()
}

fn mode(default_mode: Option<i32>) -> u32 {
    default_mode.map_or(0o644, to_mode)
}

fn to_mode(m: i32) -> u32 {
    u32::try_from(m).unwrap_or(0o644) & 0o777
}

fn add_items(
    files: &mut Files,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    mode: u32,
    optional: bool,
    source: &str,
) -> Result<(), PodFailure> {
    match items {
        None => {
            for (k, v) in data {
                files.insert(k, (v, mode));
            }
        }
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(v) => {
                        files.insert(
                            item.path.clone(),
                            (v.clone(), item.mode.map_or(mode, to_mode)),
                        );
                    }
                    None if optional => {}
                    None => {
                        return Err(PodFailure::config(format!(
                            "configmap/secret {source:?} has no key {:?}",
                            item.key
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

async fn request_token(
    ctx: &VolumeContext<'_>,
    ns: &str,
    sa: &str,
    audience: Option<String>,
    expiration_seconds: i64,
) -> Result<String, PodFailure> {
    let key = format!("{sa}/{audience:?}/{expiration_seconds}");
    let reuse = std::time::Duration::from_secs(
        u64::try_from(expiration_seconds.max(600) / 2).unwrap_or(300),
    );
    if let Some((token, at)) = ctx.tokens.lock().ok().and_then(|t| t.get(&key).cloned())
        && at.elapsed() < reuse
    {
        return Ok(token);
    }
    let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), ns);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a]),
            expiration_seconds: Some(expiration_seconds.max(600)),
            // The API server binds a token to a pod only if the pod names the
            // service account; without the ServiceAccount admission plugin
            // pods that rely on "default" do not, so theirs stay unbound.
            bound_object_ref: names_service_account(ctx.pod, sa).then(|| BoundObjectReference {
                api_version: Some("v1".to_owned()),
                kind: Some("Pod".to_owned()),
                name: ctx.pod.metadata.name.clone(),
                uid: ctx.pod.metadata.uid.clone(),
            }),
        }),
        ..Default::default()
    };
    let created: TokenRequest = api
        .create_subresource("token", sa, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            PodFailure::config(format!(
                "requesting a token for serviceaccount {ns}/{sa}: {e}"
            ))
        })?;
    let token = created.status.and_then(|s| s.token).unwrap_or_default();
    if let Ok(mut tokens) = ctx.tokens.lock() {
        tokens.insert(key, (token.clone(), std::time::Instant::now()));
    }
    Ok(token)
}

/// Writes `files` into `dir` with the kubelet's atomic layout. Unchanged
/// content is not rewritten.
fn write_atomic(dir: &Path, files: &Files) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut hasher = DefaultHasher::new();
    files.hash(&mut hasher);
    let version = format!("..{:016x}", hasher.finish());
    let data_link = dir.join("..data");
    if std::fs::read_link(&data_link).ok().as_deref() == Some(Path::new(&version)) {
        return Ok(());
    }
    let staging = dir.join(format!("{version}.tmp"));
    let _ = std::fs::remove_dir_all(&staging);
    for (rel, (content, mode)) in files {
        let path = staging.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
    }
    std::fs::create_dir_all(&staging)?;
    let final_dir = dir.join(&version);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&staging, &final_dir)?;
    let tmp_link = dir.join("..data.tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&version, &tmp_link)?;
    std::fs::rename(&tmp_link, &data_link)?;
    // One symlink per top-level entry, through ..data.
    let top: std::collections::BTreeSet<&str> =
        files.keys().filter_map(|k| k.split('/').next()).collect();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") {
            if name != "..data" && name != version {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        } else if !top.contains(name.as_str()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    for name in top {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link)?;
        }
    }
    Ok(())
}

/// The bind mounts for a container's volumeMounts.
pub fn mounts(
    container: &Container,
    volumes: &HashMap<String, PathBuf>,
) -> Result<Vec<Mount>, PodFailure> {
    let mut out = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        if m.sub_path_expr.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(PodFailure::unsupported(format!(
                "volumeMount {}: subPathExpr is not supported by the process kubelet",
                m.name
            )));
        }
        let dir = volumes.get(&m.name).ok_or_else(|| {
            PodFailure::unsupported(format!("volumeMount {} names no volume of the pod", m.name))
        })?;
        let source = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            // Resolve through the ..data symlinks now, like the kubelet's
            // subPath, which does not see later updates either.
            Some(sub) => std::fs::canonicalize(dir.join(sub)).unwrap_or_else(|_| dir.join(sub)),
            None => dir.clone(),
        };
        out.push(Mount {
            source,
            target: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false),
        });
    }
    if let Some(dir) = volumes.get(TOKEN_VOLUME) {
        out.push(Mount {
            source: dir.clone(),
            target: SERVICE_ACCOUNT_PATH.to_owned(),
            read_only: true,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_layout_updates_and_prunes() {
        let dir = std::env::temp_dir().join(format!("keystone-vol-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut files = Files::new();
        files.insert("a".into(), (b"1".to_vec(), 0o644));
        files.insert("b".into(), (b"2".to_vec(), 0o600));
        write_atomic(&dir, &files).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        files.remove("b");
        files.insert("a".into(), (b"3".to_vec(), 0o644));
        write_atomic(&dir, &files).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "3");
        assert!(std::fs::symlink_metadata(dir.join("b")).is_err());
        let versions = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.starts_with("..") && n != "..data"
            })
            .count();
        assert_eq!(versions, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
