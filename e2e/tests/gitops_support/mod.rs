//! The GitOps tests' side of Argo CD: a local git repository that plays the
//! platform team's, and Argo CD Applications read back from the API server.
//! Argo CD itself runs in the testbed (`e2e/testbed up --with argocd`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keystone_e2e::Testbed;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use serde_json::{Value, json};

use super::operator_support::{run_ok, run_with_stdin, unique};

/// A bare repository (what Argo CD reads, by `file://`) and a clone the test
/// commits to and pushes from.
pub struct GitRepo {
    bare: PathBuf,
    work: PathBuf,
}

impl GitRepo {
    pub fn new(tb: &Testbed, name: &str) -> Self {
        let root = tb.state_dir().join("gitops").join(unique(name));
        let bare = root.join("repo.git");
        let work = root.join("work");
        std::fs::create_dir_all(&root).expect("gitops folder");
        run_ok(git(
            &root,
            &["init", "-q", "--bare", "-b", "main", "repo.git"],
        ));
        run_ok(git(&root, &["clone", "-q", "repo.git", "work"]));
        Self { bare, work }
    }

    /// What Argo CD's `repoURL` says.
    pub fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    pub fn write(&self, path: &str, content: &str) {
        let file = self.work.join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("folder");
        std::fs::write(&file, content).expect("write");
    }

    pub fn read(&self, path: &str) -> String {
        std::fs::read_to_string(self.work.join(path)).expect("read")
    }

    pub fn remove(&self, path: &str) {
        let file = self.work.join(path);
        if file.is_dir() {
            std::fs::remove_dir_all(file).expect("remove folder");
        } else {
            std::fs::remove_file(file).expect("remove file");
        }
    }

    /// Copies a folder of the Keystone repository into this one.
    pub fn copy_dir(&self, from: &Path, to: &str) {
        let target = self.work.join(to);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("folder");
        let mut cp = Command::new("cp");
        cp.arg("-r").arg(from).arg(&target);
        run_ok(cp);
    }

    /// Commits everything and pushes; returns the commit's hash.
    pub fn commit(&self, message: &str) -> String {
        run_ok(git(&self.work, &["add", "-A"]));
        run_ok(git(
            &self.work,
            &[
                "-c",
                "user.name=Platform Team",
                "-c",
                "user.email=platform@example.com",
                "commit",
                "-q",
                "-m",
                message,
            ],
        ));
        run_ok(git(&self.work, &["push", "-q", "origin", "HEAD:main"]));
        run_ok(git(&self.work, &["rev-parse", "HEAD"]))
            .trim()
            .to_owned()
    }
}

fn git(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir).args(args);
    cmd
}

/// An Argo CD Application as the API server holds it.
#[derive(Clone, Debug)]
pub struct App(pub Value);

impl App {
    fn str_at(&self, pointer: &str) -> &str {
        self.0
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
    }
    pub fn sync(&self) -> &str {
        self.str_at("/status/sync/status")
    }
    pub fn health(&self) -> &str {
        self.str_at("/status/health/status")
    }
    /// The git revision the sync status compares against.
    pub fn revision(&self) -> &str {
        self.str_at("/status/sync/revision")
    }
    pub fn reconciled_at(&self) -> &str {
        self.str_at("/status/reconciledAt")
    }
    pub fn operation_phase(&self) -> &str {
        self.str_at("/status/operationState/phase")
    }
    pub fn operation_message(&self) -> &str {
        self.str_at("/status/operationState/message")
    }
    pub fn operation_revision(&self) -> &str {
        self.str_at("/status/operationState/syncResult/revision")
    }
    /// The resource of `kind` and `name` in the app's status (sync and health).
    pub fn resource(&self, kind: &str, name: &str) -> Option<&Value> {
        self.0
            .pointer("/status/resources")?
            .as_array()?
            .iter()
            .find(|r| r["kind"] == kind && r["name"] == name)
    }
    pub fn resource_health(&self, kind: &str, name: &str) -> (String, String) {
        let r = self.resource(kind, name);
        let field = |f: &str| {
            r.and_then(|r| r.pointer(f))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        (field("/health/status"), field("/health/message"))
    }
    /// Resources whose live state differs from git.
    pub fn out_of_sync(&self) -> Vec<String> {
        self.0
            .pointer("/status/resources")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .filter(|r| r["status"] != "Synced")
                    .map(|r| format!("{}/{} {}", r["kind"], r["name"], r["status"]))
                    .collect()
            })
            .unwrap_or_default()
    }
    /// Resources whose health is known and not Healthy, with the health
    /// check's message: what an app stuck Progressing waits for.
    pub fn not_healthy(&self) -> Vec<String> {
        self.0
            .pointer("/status/resources")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .filter(|r| r["health"]["status"].is_string())
                    .filter(|r| r["health"]["status"] != "Healthy")
                    .map(|r| {
                        format!(
                            "{}/{} {} {}",
                            r["kind"], r["name"], r["health"]["status"], r["health"]["message"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
    pub fn conditions(&self) -> String {
        self.0
            .pointer("/status/conditions")
            .map(Value::to_string)
            .unwrap_or_default()
    }
    pub fn summary(&self) -> String {
        format!(
            "sync={} health={} revision={} operation={} {:?} conditions={} out-of-sync={:?} not-healthy={:?}",
            self.sync(),
            self.health(),
            self.revision(),
            self.operation_phase(),
            self.operation_message(),
            self.conditions(),
            self.out_of_sync(),
            self.not_healthy()
        )
    }
}

/// Argo CD's side of the testbed.
pub struct Argo {
    tb: Testbed,
    apps: Api<DynamicObject>,
    namespace: String,
}

impl Argo {
    pub async fn new() -> Self {
        let tb = Testbed::from_env().await.expect("testbed");
        let namespace = tb
            .var("KEYSTONE_TESTBED_ARGOCD_NAMESPACE")
            .map(str::to_owned)
            .expect(
                "the testbed runs without Argo CD: start it with `e2e/testbed up --with argocd`",
            );
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "argoproj.io",
            "v1alpha1",
            "Application",
        ));
        let apps = Api::namespaced_with(tb.client().expect("client"), &namespace, &resource);
        Self {
            tb,
            apps,
            namespace,
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Applies Argo CD objects (Applications, ApplicationSets) in its namespace.
    pub fn apply(&self, yaml: &str) {
        let mut cmd = self.tb.kubectl().expect("kubectl");
        cmd.args(["apply", "-n", &self.namespace, "-f", "-"]);
        let (ok, text) = run_with_stdin(cmd, yaml);
        assert!(ok, "applying Argo CD objects failed: {text}\n{yaml}");
    }

    pub async fn app(&self, name: &str) -> Option<App> {
        let app = self.apps.get_opt(name).await.expect("get application")?;
        Some(App(serde_json::to_value(app).expect("json")))
    }

    /// Asks Argo CD to compare with git now instead of at its next resync.
    pub async fn refresh(&self, name: &str) {
        let patch = json!({"metadata": {"annotations": {"argocd.argoproj.io/refresh": "hard"}}});
        let _ = self
            .apps
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }

    /// Waits until the app satisfies `ok`, refreshing it every 10 s; panics
    /// with what it last saw and the Argo CD logs' tails.
    pub async fn wait(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&App) -> bool,
    ) -> App {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        let mut next_refresh = tokio::time::Instant::now();
        loop {
            if let Some(app) = self.app(name).await {
                if ok(&app) {
                    return app;
                }
                last = Some(app);
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                panic!(
                    "application {name}: waited {timeout:?} for {what}; last seen: {}\n{}",
                    last.map(|a| a.summary()).unwrap_or_else(|| "absent".into()),
                    self.logs()
                );
            }
            if now >= next_refresh {
                self.refresh(name).await;
                next_refresh = now + Duration::from_secs(10);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Synced to `revision` and Healthy.
    pub async fn wait_synced_healthy(&self, name: &str, revision: &str, timeout: Duration) -> App {
        self.wait(
            name,
            &format!("Synced to {revision} and Healthy"),
            timeout,
            |a| a.sync() == "Synced" && a.revision() == revision && a.health() == "Healthy",
        )
        .await
    }

    /// Deletes the app and leaves what it made (no cascade): what a test made
    /// through it is removed by the test, so shared objects (the CRDs) stay.
    pub async fn delete_app(&self, name: &str) {
        let patch = json!({"metadata": {"finalizers": null}});
        let _ = self
            .apps
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        let _ = self.apps.delete(name, &DeleteParams::default()).await;
    }

    /// Deletes an ApplicationSet without deleting its apps' resources.
    pub fn delete_appset(&self, name: &str) {
        let mut cmd = self.tb.kubectl().expect("kubectl");
        cmd.args([
            "delete",
            "applicationset",
            name,
            "-n",
            &self.namespace,
            "--cascade=orphan",
            "--ignore-not-found",
        ]);
        let _ = cmd.output();
    }

    /// The last lines of the Argo CD processes' logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for name in [
            "argocd-application-controller",
            "argocd-repo-server",
            "argocd-applicationset-controller",
        ] {
            let path = self.tb.state_dir().join("logs").join(format!("{name}.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {name} (last lines)\n"));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// An Application syncing `path` of `repo` into `namespace`, automated with
/// prune and self-heal; `extra` is appended to its spec.source.
pub fn application(
    name: &str,
    repo: &GitRepo,
    path: &str,
    namespace: &str,
    source_extra: &str,
    sync_options: &[&str],
) -> String {
    let options = sync_options
        .iter()
        .map(|o| format!("\n      - {o}"))
        .collect::<String>();
    format!(
        r#"apiVersion: argoproj.io/v1alpha1
kind: Application
metadata:
  name: {name}
spec:
  project: default
  source:
    repoURL: {url}
    targetRevision: main
    path: {path}{source_extra}
  destination:
    server: https://kubernetes.default.svc
    namespace: {namespace}
  syncPolicy:
    automated: {{prune: true, selfHeal: true}}
    syncOptions:
      - ApplyOutOfSyncOnly=false{options}
"#,
        url = repo.url()
    )
}
