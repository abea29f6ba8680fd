//! kubectl works against the testbed's API server.

use keystone_e2e::Testbed;

#[tokio::test]
async fn kubectl_lists_namespaces_and_reports_the_pinned_version() {
    let tb = Testbed::from_env().await.expect("testbed");
    let out = tb
        .kubectl()
        .unwrap()
        .args(["get", "ns", "-o", "name"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl get ns failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(names.contains("namespace/default"), "{names}");
    assert!(names.contains("namespace/kube-system"), "{names}");

    let out = tb
        .kubectl()
        .unwrap()
        .args(["version", "-o", "json"])
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl version failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let server = version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default();
    let pinned = tb.var("KEYSTONE_KUBE_VERSION").unwrap();
    assert_eq!(server, pinned);
}

#[tokio::test]
async fn helm_is_built_and_runs() {
    let tb = Testbed::from_env().await.expect("testbed");
    let out = std::process::Command::new(tb.helm().unwrap())
        .args(["version", "--short"])
        .output()
        .expect("run helm");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("v4."));
}
