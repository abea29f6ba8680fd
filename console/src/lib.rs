//! The Keystone console: a web server that shows, checks, tries and changes
//! Pipelines and Processors as the signed-in user, through the same API and
//! the same contract checker as `kubectl` and the operator.
//!
//! Pages are rendered on the server (maud) and work without JavaScript; htmx,
//! embedded in the binary, makes the editor and the live numbers update in
//! place.

use std::sync::Arc;

use axum::Router;
use axum::middleware;
use axum::routing::{get, post};

pub mod actions;
pub mod auth;
pub mod deadletters;
pub mod editor;
pub mod form;
pub mod graph;
pub mod layout;
pub mod live;
pub mod pipelines;
pub mod processors;
pub mod signin;
pub mod tryit;

pub use auth::AuthMode;
use form::Kind;
use keystone_crds::{Pipeline, Processor};

/// The field manager of the console's server-side applies: `kubectl get
/// --show-managed-fields` shows which fields were last set here.
pub const FIELD_MANAGER: &str = "keystone-console";

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Where the API server is and how to trust it; each user's client adds
    /// only their own credentials to it.
    pub kube: kube::Config,
    pub auth: AuthMode,
    /// Session cookies marked `Secure` (the console is served over HTTPS).
    pub secure_cookies: bool,
    pub sessions: Arc<auth::Sessions>,
    /// Rates computed from the runtime pods' metrics between two scrapes.
    pub rates: Arc<live::Rates>,
    pub dead_letters: Arc<deadletters::DeadLetterReader>,
    /// The operator's configuration, for its policy (what Pipelines may ask
    /// for), checked with the contracts; the default (no limits) without one.
    pub operator: Arc<keystone_operator::OperatorConfig>,
}

impl AppState {
    pub fn new(
        kube: kube::Config,
        auth: AuthMode,
        secure_cookies: bool,
        dead_letters: deadletters::DeadLetterReader,
        operator: keystone_operator::OperatorConfig,
    ) -> Self {
        Self {
            kube,
            auth,
            secure_cookies,
            sessions: Arc::default(),
            rates: Arc::default(),
            dead_letters: Arc::new(dead_letters),
            operator: Arc::new(operator),
        }
    }
}

/// Every route of the console.
pub fn router(state: AppState) -> Router {
    let pages = Router::new()
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/pipelines") }),
        )
        .route("/login", get(signin::form).post(signin::submit))
        .route("/logout", post(signin::sign_out))
        .route("/pipelines", get(pipelines::list))
        .route("/pipelines/rows", get(pipelines::rows))
        .route(
            "/pipelines/new",
            get(|s, u, q, h| editor::new_object(Kind::Pipeline, s, u, q, h)),
        )
        .route("/pipelines/{namespace}/{name}", get(pipelines::detail))
        .route("/pipelines/{namespace}/{name}/live", get(pipelines::live))
        .route(
            "/pipelines/{namespace}/{name}/edit",
            get(|s, u, p, h| editor::edit_object::<Pipeline>(Kind::Pipeline, s, u, p, h)),
        )
        .route(
            "/pipelines/{namespace}/{name}/actions/{action}",
            post(actions::run),
        )
        .route("/processors", get(processors::list))
        .route(
            "/processors/new",
            get(|s, u, q, h| editor::new_object(Kind::Processor, s, u, q, h)),
        )
        .route("/processors/{namespace}/{name}", get(processors::detail))
        .route(
            "/processors/{namespace}/{name}/edit",
            get(|s, u, p, h| editor::edit_object::<Processor>(Kind::Processor, s, u, p, h)),
        )
        .route("/editor", post(editor::submit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::sessions_and_csrf,
        ));
    Router::new()
        .merge(pages)
        .route("/healthz", get(|| async { "ok" }))
        .route("/assets/htmx.min.js", get(layout::htmx))
        .route("/assets/console.css", get(layout::css))
        .route("/assets/console.js", get(layout::script))
        .with_state(state)
}
