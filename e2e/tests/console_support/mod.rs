//! Shared helpers of the console's tests: a `keystone-console` process on the
//! testbed's API server, users that are service accounts bound to
//! Kubernetes' own `view` and `edit` roles (which the chart's user roles
//! aggregate into), and an HTTP client that signs in and posts forms with the
//! session's CSRF token as a browser would.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use keystone_e2e::{TestNamespace, Testbed};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, LOCATION, SET_COOKIE};

use crate::operator_support::{repo, run_ok, run_with_stdin};

/// The release name the chart's user roles are rendered with (cluster-wide,
/// shared by the tests; applying them again changes nothing).
const ROLES_RELEASE: &str = "keystone-e2e-users";

pub fn console_binary() -> PathBuf {
    let path = repo().join("target/debug/keystone-console");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p keystone-console` before the e2e tests",
        path.display()
    );
    path
}

/// A console process on the testbed's API server. Killed when dropped.
pub struct Console {
    child: Child,
    pub base: String,
    pub log: PathBuf,
}

impl Console {
    /// In token mode: users sign in with their own tokens.
    pub async fn start(tb: &Testbed) -> Self {
        Self::start_with(tb, &[]).await
    }

    /// With extra arguments (`--auth proxy`, …).
    pub async fn start_with(tb: &Testbed, args: &[&str]) -> Self {
        let port = crate::runtime_support::free_port();
        let log = tb.state_dir().join(format!("e2e-console-{port}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(console_binary())
            .env("KUBECONFIG", tb.kubeconfig().expect("kubeconfig"))
            // Dead letters are read from the testbed's Kafka, as the operator would.
            .env(
                "KAFKA_BOOTSTRAP_SERVERS",
                tb.kafka_bootstrap_servers().expect("kafka"),
            )
            .env("RUST_LOG", "info")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(args)
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("start keystone-console");
        let console = Console {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let http = reqwest::Client::new();
        loop {
            if let Ok(r) = http.get(console.url("/healthz")).send().await
                && r.status() == StatusCode::OK
            {
                return console;
            }
            assert!(
                Instant::now() < deadline,
                "the console did not answer /healthz in 20 s:\n{}",
                console.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Applies the chart's user roles (`<release>-view`, `<release>-edit`,
/// aggregated into `view`, `edit` and `admin`).
pub fn install_user_roles(tb: &Testbed) {
    let mut template = Command::new(tb.helm().expect("helm"));
    template.args([
        "template",
        ROLES_RELEASE,
        &repo().join("helm/keystone").display().to_string(),
        "--show-only",
        "templates/user-roles.yaml",
    ]);
    let roles = run_ok(template);
    let mut apply = tb.kubectl().expect("kubectl");
    apply.args(["apply", "--server-side", "-f", "-"]);
    let (ok, out) = run_with_stdin(apply, &roles);
    assert!(ok, "applying the chart's user roles: {out}");
}

/// A person: a service account of `ns` bound to the cluster role `role`
/// (`view` or `edit`) there, with a token. Waits until the aggregated rights
/// reach the role.
pub async fn user(tb: &Testbed, ns: &TestNamespace, name: &str, role: &str) -> String {
    let mut create = tb.kubectl().expect("kubectl");
    create.args(["-n", ns.name(), "create", "serviceaccount", name]);
    run_ok(create);
    let mut bind = tb.kubectl().expect("kubectl");
    bind.args([
        "-n",
        ns.name(),
        "create",
        "rolebinding",
        &format!("{name}-{role}"),
        &format!("--clusterrole={role}"),
        &format!("--serviceaccount={}:{name}", ns.name()),
    ]);
    run_ok(bind);
    // The aggregation controller copies the chart's rules into view/edit.
    let account = format!("system:serviceaccount:{}:{name}", ns.name());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut can = tb.kubectl().expect("kubectl");
        can.args([
            "auth",
            "can-i",
            "list",
            "pipelines.keystone.dev",
            "-n",
            ns.name(),
            "--as",
            &account,
        ]);
        let out = can.output().expect("kubectl auth can-i");
        if String::from_utf8_lossy(&out.stdout).trim() == "yes" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{account} may not list pipelines 30 s after its {role} binding: are the chart's user roles aggregated?"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut token = tb.kubectl().expect("kubectl");
    token.args(["-n", ns.name(), "create", "token", name, "--duration=1h"]);
    run_ok(token).trim().to_owned()
}

/// A signed-in browser without the browser: the session cookie and the CSRF
/// token, redirects not followed so that tests see them.
pub struct Visitor {
    http: reqwest::Client,
    base: String,
    cookie: String,
    pub csrf: String,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn location(&self) -> Option<&str> {
        self.headers.get(LOCATION).and_then(|v| v.to_str().ok())
    }

    /// Asserts the answer is the redirect a successful form post gets,
    /// showing the page's text otherwise.
    #[track_caller]
    pub fn assert_redirect(&self) {
        assert_eq!(
            self.status,
            StatusCode::SEE_OTHER,
            "{}",
            text_of(&self.body)
        );
    }
}

/// The field managers of an object (`keystone-console` for the console's
/// applies and patches).
pub fn field_managers(meta: &kube::api::ObjectMeta) -> Vec<String> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter_map(|f| f.manager.clone())
        .collect()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .expect("HTTP client")
}

async fn answer(response: reqwest::Response) -> Answer {
    Answer {
        status: response.status(),
        headers: response.headers().clone(),
        body: String::from_utf8_lossy(&response.bytes().await.expect("body")).into_owned(),
    }
}

/// Signs in with a token; the answer to the sign-in POST when it fails.
pub async fn sign_in(console: &Console, token: &str) -> Result<Visitor, Answer> {
    sign_in_at(&console.base, token).await
}

/// Signs in to the console at `base` (`http://host:port`).
pub async fn sign_in_at(base: &str, token: &str) -> Result<Visitor, Answer> {
    let http = client();
    let response = http
        .post(format!("{base}/login"))
        .header("sec-fetch-site", "same-origin")
        .form(&[("token", token)])
        .send()
        .await
        .expect("POST /login");
    let cookie = response
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_owned);
    let answer = answer(response).await;
    let Some(cookie) = cookie.filter(|_| answer.status == StatusCode::SEE_OTHER) else {
        return Err(answer);
    };
    let mut visitor = Visitor {
        http,
        base: base.to_owned(),
        cookie,
        csrf: String::new(),
    };
    let mut page = visitor.get("/pipelines").await;
    // A user who may not list every namespace is sent to their own.
    if let Some(location) = page.location().map(str::to_owned) {
        page = visitor.get(&location).await;
    }
    visitor.csrf = csrf_of(&page.body).expect("a CSRF token on the pipelines page");
    Ok(visitor)
}

/// The CSRF token a page's forms carry.
pub fn csrf_of(html: &str) -> Option<String> {
    let at = html.find("name=\"_csrf\" value=\"")? + "name=\"_csrf\" value=\"".len();
    Some(html[at..at + html[at..].find('"')?].to_owned())
}

impl Visitor {
    pub async fn get(&self, path: &str) -> Answer {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        answer(response).await
    }

    /// A form post with the session's CSRF token, from the console's own pages.
    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Answer {
        let mut all: Vec<(&str, &str)> = vec![("_csrf", &self.csrf)];
        all.extend_from_slice(fields);
        self.post_raw(path, &all, &[("sec-fetch-site", "same-origin")])
            .await
    }

    /// A post exactly as given: no CSRF token added, the given headers.
    pub async fn post_raw(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .form(fields);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        answer(
            request
                .send()
                .await
                .unwrap_or_else(|e| panic!("POST {path}: {e}")),
        )
        .await
    }
}

/// The visible text of an HTML fragment, tags removed and spaces collapsed,
/// for assertions on what a person reads.
pub fn text_of(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
