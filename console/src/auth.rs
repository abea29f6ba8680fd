//! Who a request acts as. The console holds no rights of its own: every
//! Kubernetes call is made as the signed-in user, either with the bearer token
//! they pasted (`--auth token`) or by impersonating the user an authenticating
//! proxy names in its headers (`--auth proxy`), so the API server's RBAC decides
//! what each person sees and changes.
//!
//! Sessions live in memory (a restart signs everyone out); the cookie carries
//! only a random id. Every POST carries the session's CSRF token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::PostParams;
use kube::config::AuthInfo;
use ring::rand::{SecureRandom, SystemRandom};

use crate::AppState;

pub const SESSION_COOKIE: &str = "keystone_session";
/// The form field (and header) carrying the session's CSRF token.
pub const CSRF_FIELD: &str = "_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Sessions end this long after sign-in, like a short-lived token would.
const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Bodies a POST may carry (pasted sample events included).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// How users are identified.
#[derive(Clone, Debug)]
pub enum AuthMode {
    /// Each user signs in with their own Kubernetes bearer token.
    Token,
    /// An authenticating proxy in front of the console names the user (and
    /// groups) in headers; the console impersonates them.
    Proxy {
        user_header: String,
        groups_header: String,
    },
}

/// A signed-in user.
#[derive(Clone)]
pub struct Session {
    pub user: String,
    pub groups: Vec<String>,
    pub csrf: String,
    pub client: kube::Client,
    expires: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    fn get(&self, id: &str) -> Option<Session> {
        let mut sessions = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.get(id).cloned()
    }

    fn insert(&self, session: Session) -> String {
        let id = random_hex(32);
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), session);
        id
    }

    fn remove(&self, id: &str) {
        self.by_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .expect("the system's random source");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

fn session_cookie(id: &str, secure: bool, max_age: Duration) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        max_age.as_secs()
    ))
    .expect("a cookie of hex digits")
}

/// A client acting as `identity` on the cluster `base` points at.
fn client_for(base: &kube::Config, identity: &Credentials) -> Result<kube::Client, kube::Error> {
    let mut config = base.clone();
    match identity {
        // Only the user's token: none of the console's own credentials may
        // leak into the request.
        Credentials::Token(token) => {
            config.auth_info = AuthInfo {
                token: Some(token.clone().into()),
                ..AuthInfo::default()
            }
        }
        Credentials::Impersonate { user, groups } => {
            config.auth_info.impersonate = Some(user.clone());
            config.auth_info.impersonate_groups = (!groups.is_empty()).then(|| groups.clone());
        }
    }
    kube::Client::try_from(config)
}

enum Credentials {
    Token(String),
    Impersonate { user: String, groups: Vec<String> },
}

/// Asks the API server who the credentials belong to; fails when it does not
/// accept them.
async fn review(client: &kube::Client) -> Result<(String, Vec<String>), kube::Error> {
    let api: kube::Api<SelfSubjectReview> = kube::Api::all(client.clone());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let info = review.status.and_then(|s| s.user_info).unwrap_or_default();
    Ok((
        info.username.unwrap_or_default(),
        info.groups.unwrap_or_default(),
    ))
}

/// Signs in with a bearer token: a session when the API server accepts it.
pub async fn sign_in_with_token(state: &AppState, token: &str) -> Result<String, String> {
    let token = token.trim();
    if token.is_empty() {
        return Err("Paste a token: `kubectl create token NAME` prints one.".to_owned());
    }
    let client = client_for(&state.kube, &Credentials::Token(token.to_owned()))
        .map_err(|e| format!("cannot build a client: {e}"))?;
    let (user, groups) = review(&client).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 401 => {
            "The API server did not accept this token (401).".to_owned()
        }
        other => format!("Could not ask the API server who this token is: {other}"),
    })?;
    Ok(state.sessions.insert(Session {
        user,
        groups,
        csrf: random_hex(32),
        client,
        expires: Instant::now() + SESSION_LIFETIME,
    }))
}

pub fn sign_in_cookie(state: &AppState, id: &str) -> HeaderValue {
    session_cookie(id, state.secure_cookies, SESSION_LIFETIME)
}

pub fn sign_out(state: &AppState, headers: &HeaderMap) -> HeaderValue {
    if let Some(id) = cookie(headers, SESSION_COOKIE) {
        state.sessions.remove(&id);
    }
    session_cookie("", state.secure_cookies, Duration::ZERO)
}

/// The proxy's user and groups, when its headers name one.
fn proxied_identity(
    headers: &HeaderMap,
    user_header: &str,
    groups_header: &str,
) -> Option<(String, Vec<String>)> {
    let user = headers.get(user_header)?.to_str().ok()?.trim();
    if user.is_empty() {
        return None;
    }
    let groups = headers
        .get_all(groups_header)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    Some((user.to_owned(), groups))
}

/// The signed-in user of a request; pages that need one take it as an
/// argument. Without one, browsers are sent to sign in.
pub struct User(pub Session);

pub enum NotSignedIn {
    SignIn,
    ProxyHeadersMissing(String),
    Client(String),
}

impl IntoResponse for NotSignedIn {
    fn into_response(self) -> Response {
        match self {
            NotSignedIn::SignIn => Redirect::to("/login").into_response(),
            NotSignedIn::ProxyHeadersMissing(header) => (
                StatusCode::UNAUTHORIZED,
                format!(
                    "No user: the console expects an authenticating proxy to set the {header} header"
                ),
            )
                .into_response(),
            NotSignedIn::Client(message) => {
                (StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
            }
        }
    }
}

impl FromRequestParts<AppState> for User {
    type Rejection = NotSignedIn;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(session) = parts.extensions.get::<Session>() {
            return Ok(User(session.clone()));
        }
        let session = current_session(&parts.headers, state);
        match (&state.auth, session) {
            (_, Some((_, session))) => Ok(User(session)),
            (AuthMode::Token, None) => Err(NotSignedIn::SignIn),
            (AuthMode::Proxy { user_header, .. }, None) => {
                Err(NotSignedIn::ProxyHeadersMissing(user_header.clone()))
            }
        }
    }
}

/// The session a request's cookie names; in proxy mode only while it belongs
/// to the user the proxy names now.
fn current_session(headers: &HeaderMap, state: &AppState) -> Option<(String, Session)> {
    let id = cookie(headers, SESSION_COOKIE)?;
    let session = state.sessions.get(&id)?;
    if let AuthMode::Proxy {
        user_header,
        groups_header,
    } = &state.auth
    {
        let (user, groups) = proxied_identity(headers, user_header, groups_header)?;
        if user != session.user || groups != session.groups {
            return None;
        }
    }
    Some((id, session))
}

/// Finds or starts the request's session, and refuses a POST whose CSRF token
/// is not the session's or that comes from another site.
pub async fn sessions_and_csrf(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = request.into_parts();
    let mut set_cookie = None;
    let mut session = current_session(&parts.headers, &state).map(|(_, s)| s);
    if session.is_none()
        && let AuthMode::Proxy {
            user_header,
            groups_header,
        } = &state.auth
        && let Some((user, groups)) = proxied_identity(&parts.headers, user_header, groups_header)
    {
        let credentials = Credentials::Impersonate {
            user: user.clone(),
            groups: groups.clone(),
        };
        match client_for(&state.kube, &credentials) {
            Ok(client) => {
                let fresh = Session {
                    user,
                    groups,
                    csrf: random_hex(32),
                    client,
                    expires: Instant::now() + SESSION_LIFETIME,
                };
                let id = state.sessions.insert(fresh.clone());
                set_cookie = Some(sign_in_cookie(&state, &id));
                session = Some(fresh);
            }
            Err(e) => {
                return NotSignedIn::Client(format!("cannot build a client: {e}")).into_response();
            }
        }
    }

    let body = if parts.method == Method::POST {
        if cross_site(&parts.headers) {
            return (
                StatusCode::FORBIDDEN,
                "Refused: a change from another site (Sec-Fetch-Site / Origin)",
            )
                .into_response();
        }
        let bytes = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
            Ok(bytes) => bytes,
            Err(_) => {
                return (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("Refused: a request body over {MAX_BODY_BYTES} bytes"),
                )
                    .into_response();
            }
        };
        // Signing in starts the session, so it has no token to present yet;
        // SameSite=Strict and the Origin check above guard it.
        if parts.uri.path() != "/login" {
            let Some(session) = &session else {
                return NotSignedIn::SignIn.into_response();
            };
            let presented = parts
                .headers
                .get(CSRF_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .or_else(|| form_field(&bytes, CSRF_FIELD));
            let valid = presented.is_some_and(|p| {
                bool::from(subtle::ConstantTimeEq::ct_eq(
                    p.as_bytes(),
                    session.csrf.as_bytes(),
                ))
            });
            if !valid {
                return (
                    StatusCode::FORBIDDEN,
                    "Refused: the form's CSRF token is missing or not this session's; reload the page",
                )
                    .into_response();
            }
        }
        axum::body::Body::from(bytes)
    } else {
        body
    };
    if let Some(session) = session {
        parts.extensions.insert(session);
    }
    let mut response = next.run(Request::from_parts(parts, body)).await;
    if let Some(cookie) = set_cookie {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// Whether the browser says the request comes from another site.
fn cross_site(headers: &HeaderMap) -> bool {
    let fetch_site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if let Some(site) = fetch_site {
        return !matches!(site, "same-origin" | "none");
    }
    match (
        headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        headers.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => {
            let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
            origin_host != host
        }
        _ => false,
    }
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// The namespace a service account lives in, from its user name
/// (`system:serviceaccount:NAMESPACE:NAME`): where such a user most likely
/// has rights.
pub fn home_namespace(user: &str) -> Option<&str> {
    let mut parts = user.strip_prefix("system:serviceaccount:")?.split(':');
    parts.next().filter(|ns| !ns.is_empty())
}

/// Whether the user may `verb` the keystone.dev `resource` (or
/// `resource/subresource`) in `namespace`, as
/// the API server answers a SelfSubjectAccessReview: pages show only the
/// controls that would work.
pub async fn allowed(session: &Session, verb: &str, resource: &str, namespace: &str) -> bool {
    // `pipelines/deadletters`: a subresource is asked for apart.
    let (resource, subresource) = match resource.split_once('/') {
        Some((resource, sub)) => (resource, Some(sub)),
        None => (resource, None),
    };
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some("keystone.dev".to_owned()),
                resource: Some(resource.to_owned()),
                subresource: subresource.map(str::to_owned),
                verb: Some(verb.to_owned()),
                namespace: Some(namespace.to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let api: kube::Api<SelfSubjectAccessReview> = kube::Api::all(session.client.clone());
    api.create(&PostParams::default(), &review)
        .await
        .ok()
        .and_then(|r| r.status)
        .is_some_and(|s| s.allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_accounts_home_is_its_namespace() {
        assert_eq!(
            home_namespace("system:serviceaccount:team-a:ana"),
            Some("team-a")
        );
        assert_eq!(home_namespace("ana@example.com"), None);
        assert_eq!(home_namespace("system:serviceaccount::x"), None);
    }

    #[test]
    fn reads_the_session_cookie_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; keystone_session=abc; b=2"),
        );
        assert_eq!(cookie(&headers, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&headers, "c"), None);
    }

    #[test]
    fn proxy_headers_give_user_and_groups() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-user", HeaderValue::from_static("ana"));
        headers.insert(
            "x-forwarded-groups",
            HeaderValue::from_static("team-a, viewers,"),
        );
        let (user, groups) =
            proxied_identity(&headers, "x-forwarded-user", "x-forwarded-groups").unwrap();
        assert_eq!(user, "ana");
        assert_eq!(groups, vec!["team-a", "viewers"]);
        headers.insert("x-forwarded-user", HeaderValue::from_static(" "));
        assert!(proxied_identity(&headers, "x-forwarded-user", "x-forwarded-groups").is_none());
    }

    #[test]
    fn cross_site_posts_are_recognized() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("console:8080"));
        assert!(!cross_site(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://console:8080"),
        );
        assert!(!cross_site(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(cross_site(&headers));
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(!cross_site(&headers));
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&headers));
    }

    #[test]
    fn finds_the_csrf_field_in_a_form_body() {
        assert_eq!(
            form_field(b"a=1&_csrf=xyz&b=%20", CSRF_FIELD).as_deref(),
            Some("xyz")
        );
        assert_eq!(form_field(b"a=1", CSRF_FIELD), None);
    }
}
