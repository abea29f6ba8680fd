//! Signing in with a Kubernetes bearer token, and out.

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;

use crate::AppState;
use crate::auth::{self, AuthMode};
use crate::layout::{Section, page};

pub async fn form(State(state): State<AppState>) -> Response {
    if let AuthMode::Proxy { .. } = state.auth {
        return Redirect::to("/pipelines").into_response();
    }
    sign_in_page(StatusCode::OK, None)
}

fn sign_in_page(status: StatusCode, error: Option<&str>) -> Response {
    let body = html! {
        h1 { "Sign in to Keystone" }
        p {
            "The console acts as you: paste a Kubernetes bearer token, and what you may see and change is what "
            "RBAC allows that token. " code { "kubectl create token NAME -n NAMESPACE" } " prints one for a service account."
        }
        @if let Some(error) = error { p.error role="alert" { (error) } }
        form method="post" action="/login" {
            div.field {
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="off" required size="60";
            }
            button.primary type="submit" { "Sign in" }
        }
    };
    (status, page("Sign in", Section::None, None, body)).into_response()
}

#[derive(Deserialize)]
pub struct SignIn {
    token: String,
}

pub async fn submit(State(state): State<AppState>, Form(form): Form<SignIn>) -> Response {
    if let AuthMode::Proxy { .. } = state.auth {
        return Redirect::to("/pipelines").into_response();
    }
    match auth::sign_in_with_token(&state, &form.token).await {
        Ok(id) => (
            [(header::SET_COOKIE, auth::sign_in_cookie(&state, &id))],
            Redirect::to("/pipelines"),
        )
            .into_response(),
        Err(message) => sign_in_page(StatusCode::UNAUTHORIZED, Some(&message)),
    }
}

pub async fn sign_out(State(state): State<AppState>, headers: HeaderMap) -> Response {
    (
        [(header::SET_COOKIE, auth::sign_out(&state, &headers))],
        Redirect::to("/login"),
    )
        .into_response()
}
