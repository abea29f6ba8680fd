//! The page around every view, the embedded assets, and small shared pieces.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use crate::auth::{CSRF_FIELD, Session};

const HTMX: &str = include_str!("../assets/htmx.min.js");
const CSS: &str = include_str!("../assets/console.css");
const SCRIPT: &str = include_str!("../assets/console.js");

pub async fn htmx() -> Response {
    asset("text/javascript", HTMX)
}

pub async fn css() -> Response {
    asset("text/css", CSS)
}

pub async fn script() -> Response {
    asset("text/javascript", SCRIPT)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// Which section of the navigation a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Pipelines,
    Processors,
    None,
}

/// A full page. `session` is none on the sign-in page.
pub fn page(title: &str, section: Section, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Keystone" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/htmx.min.js" defer {}
                script src="/assets/console.js" defer {}
            }
            // htmx sends the CSRF token with every request it makes.
            body hx-headers=[session.map(|s| format!(r#"{{"X-CSRF-Token": "{}"}}"#, s.csrf))] {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/pipelines" { "Keystone" }
                    @if let Some(session) = session {
                        nav aria-label="Sections" {
                            a href="/pipelines" aria-current=[(section == Section::Pipelines).then_some("page")] { "Pipelines" }
                            a href="/processors" aria-current=[(section == Section::Processors).then_some("page")] { "Processors" }
                        }
                        form.signout method="post" action="/logout" {
                            (csrf(session))
                            span.user title=(session.groups.join(", ")) { "Signed in as " strong { (session.user) } }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main #main { (body) }
            }
        }
    }
}

/// The hidden field every form posts, for forms submitted without htmx.
pub fn csrf(session: &Session) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(session.csrf); }
}

/// A page saying what went wrong, with the HTTP status the API server gave.
pub fn problem(
    session: Option<&Session>,
    status: StatusCode,
    title: &str,
    detail: &str,
) -> Response {
    (
        status,
        page(
            title,
            Section::None,
            session,
            html! {
                h1 { (title) }
                p.error role="alert" { (detail) }
                p { a href="/pipelines" { "Back to the pipelines" } }
            },
        ),
    )
        .into_response()
}

/// What a failed Kubernetes call means to the user.
pub fn api_problem(session: &Session, what: &str, error: &kube::Error) -> Response {
    match error {
        kube::Error::Api(s) if s.code == 403 => problem(
            Some(session),
            StatusCode::FORBIDDEN,
            "Not allowed",
            &format!(
                "Kubernetes does not allow {} to {what}: {}",
                session.user, s.message
            ),
        ),
        kube::Error::Api(s) if s.code == 404 => problem(
            Some(session),
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("Could not {what}: {}", s.message),
        ),
        kube::Error::Api(s) => problem(
            Some(session),
            StatusCode::from_u16(s.code).unwrap_or(StatusCode::BAD_GATEWAY),
            "The API server refused",
            &format!("Could not {what}: {}", s.message),
        ),
        other => problem(
            Some(session),
            StatusCode::BAD_GATEWAY,
            "The API server did not answer",
            &format!("Could not {what}: {other}"),
        ),
    }
}

/// "3 minutes ago" for a timestamp.
pub fn ago(time: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> String {
    let seconds = (chrono::Utc::now().timestamp() - time.0.as_second()).max(0);
    match seconds {
        0..=89 => format!("{seconds} s ago"),
        90..=5399 => format!("{} min ago", (seconds + 30) / 60),
        5400..=129_599 => format!("{} h ago", (seconds + 1800) / 3600),
        _ => format!("{} days ago", (seconds + 43_200) / 86_400),
    }
}
