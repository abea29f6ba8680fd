//! A real headless browser for end-to-end tests of web pages (the console):
//! Debian's Chromium driven by Playwright for Python, both installed by
//! `e2e/testbed up` (component `browser`), through `e2e/browser/driver.py`.
//!
//! A test writes a script, a list of [`Step`]s, and [`Browser::run`] runs it
//! in a fresh browser (a new temporary profile, one page) and returns one
//! JSON result per step, index-aligned. There is no session that keeps a page
//! across several `run`s: one script is one page session, so a test that needs
//! several checks on one page state puts them in one script.
//!
//! ```no_run
//! # async fn t() -> Result<(), keystone_e2e::browser::BrowserError> {
//! use keystone_e2e::browser::{Browser, Focused, Step};
//! // None (the test skips) without the testbed's env, a panic with
//! // KEYSTONE_TEST_REQUIRE_BROWSER=1 (scripts/test sets it).
//! let Some(browser) = Browser::require() else { return Ok(()) };
//! let results = browser
//!     .run(&[
//!         Step::goto("http://127.0.0.1:8080/"),
//!         Step::focus_order(2),
//!         Step::fill("#name", "orders"),
//!         Step::click("button[type=submit]"),
//!         Step::wait_for_text("#pipelines", "orders"),
//!     ])
//!     .await?;
//! assert_eq!(results[0], 200);
//! let order: Vec<Focused> = serde_json::from_value(results[1].clone()).unwrap();
//! assert_eq!(order[0].role.as_deref(), Some("textbox"));
//! # Ok(()) }
//! ```
//!
//! The steps (see `e2e/browser/driver.py` for the JSON): [`Step::goto`] (the
//! HTTP status), [`Step::fill`], [`Step::click`], [`Step::select`] (the
//! selected values), [`Step::press`], [`Step::press_key`],
//! [`Step::wait_for`], [`Step::wait_for_text`] (the element's text),
//! [`Step::text`] (inner text), [`Step::count`], [`Step::attr`] (the value or
//! null), [`Step::screenshot`] (the PNG's path), [`Step::extra_headers`],
//! [`Step::focus_order`] (a list of [`Focused`]) and [`Step::eval`] (the
//! value); the others give null. Selectors are Playwright's (CSS,
//! `text=...`, `role=...`); steps on one element fail when a selector
//! matches several. Each step waits up to 15 s by default
//! ([`Browser::with_step_timeout`], [`Step::timeout`]).
//!
//! A failing step is a [`BrowserError::Step`]: its index, the step, the
//! page's URL, Playwright's message, the page's console messages and a
//! screenshot of the page at the failure under `target/browser/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;

/// The variable naming the Chromium binary (`/usr/bin/chromium`).
pub const CHROMIUM_VAR: &str = "KEYSTONE_TESTBED_CHROMIUM";
/// The variable naming the Python of the virtualenv that has Playwright.
pub const PYTHON_VAR: &str = "KEYSTONE_TESTBED_PLAYWRIGHT_PYTHON";
/// `1`: a test that needs the browser fails instead of skipping without it.
pub const REQUIRE_VAR: &str = "KEYSTONE_TEST_REQUIRE_BROWSER";

/// The driver script, in this crate.
const DRIVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/browser/driver.py");
/// Time a whole script may take, launch and shutdown included.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Time one step may wait (for an element, a navigation, a text).
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Time the driver's output may take to close after it exited or was killed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The folder for the tests' screenshots: `$CARGO_TARGET_DIR/browser`, by
/// default `target/browser` in the workspace.
pub fn artifact_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        // The workspace's target folder: this crate's parent's.
        || match Path::new(env!("CARGO_MANIFEST_DIR")).parent() {
            Some(workspace) => workspace.join("target"),
            None => PathBuf::from("target"),
        },
        PathBuf::from,
    );
    target.join("browser")
}

/// Why a script did not give its results.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error(
        "{0} is not set: run e2e/testbed up (it installs Chromium and Playwright) and eval \"$(e2e/testbed env)\""
    )]
    NotSet(&'static str),
    #[error("{var}={} does not exist: run e2e/testbed up (it installs Chromium and Playwright)", .path.display())]
    NotFound { var: &'static str, path: PathBuf },
    #[error("starting the browser driver ({} {DRIVER}) failed: {source}", .python.display())]
    Spawn {
        python: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the browser script did not finish within {timeout:?} and was killed; driver's stderr:\n{stderr}"
    )]
    Timeout { timeout: Duration, stderr: String },
    /// A step failed on the page.
    #[error("{0}")]
    Step(Box<StepFailure>),
    /// The driver could not run the script: a malformed step, a browser
    /// that did not start, or no result at all.
    #[error("the browser driver failed ({status}): {message}; driver's stderr:\n{stderr}")]
    Driver {
        status: String,
        message: String,
        stderr: String,
    },
}

/// A step that failed on the page.
#[derive(Debug)]
pub struct StepFailure {
    /// The step's index in the script.
    pub index: usize,
    /// The step as sent.
    pub step: Value,
    /// The page's URL at the failure.
    pub url: String,
    /// Playwright's message (with its call log).
    pub message: String,
    /// A full-page screenshot taken at the failure.
    pub screenshot: Option<PathBuf>,
    /// The results of the steps before it.
    pub results: Vec<Value>,
    /// The page's console messages and uncaught errors.
    pub console: Vec<String>,
    /// The driver's stderr.
    pub stderr: String,
}

impl std::fmt::Display for StepFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "browser step {} {} failed at {}: {}",
            self.index, self.step, self.url, self.message
        )?;
        if let Some(screenshot) = &self.screenshot {
            write!(f, "\nscreenshot: {}", screenshot.display())?;
        }
        if !self.console.is_empty() {
            write!(f, "\nthe page's console:\n  {}", self.console.join("\n  "))?;
        }
        if !self.stderr.trim().is_empty() {
            write!(f, "\ndriver's stderr:\n{}", self.stderr)?;
        }
        Ok(())
    }
}

/// The state [`Step::wait_for`] waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Present and visible (the first match).
    Visible,
    /// Absent or not visible.
    Hidden,
    /// In the DOM, visible or not (the first match).
    Attached,
    /// Not in the DOM.
    Detached,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Visible => "visible",
            State::Hidden => "hidden",
            State::Attached => "attached",
            State::Detached => "detached",
        }
    }
}

/// One step of a script: a JSON object of `e2e/browser/driver.py`'s
/// vocabulary.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Step(Map<String, Value>);

impl Step {
    fn new(action: &str, arg: Value) -> Step {
        let mut map = Map::new();
        map.insert(action.to_owned(), arg);
        Step(map)
    }

    fn with(mut self, key: &str, value: Value) -> Step {
        self.0.insert(key.to_owned(), value);
        self
    }

    /// Navigates to `url` and waits for its load event; result: the HTTP
    /// status (null for a URL without a response, e.g. `about:blank`).
    pub fn goto(url: impl Into<String>) -> Step {
        Step::new("goto", Value::String(url.into()))
    }

    /// Types `value` into the input, textarea or contenteditable element.
    pub fn fill(selector: impl Into<String>, value: impl Into<String>) -> Step {
        Step::new("fill", Value::String(selector.into())).with("value", Value::String(value.into()))
    }

    /// Clicks the element (after waiting until it is visible and enabled).
    pub fn click(selector: impl Into<String>) -> Step {
        Step::new("click", Value::String(selector.into()))
    }

    /// Selects the option with this value (or label) of a `<select>`;
    /// result: the selected values.
    pub fn select(selector: impl Into<String>, value: impl Into<String>) -> Step {
        Step::new("select", Value::String(selector.into()))
            .with("value", Value::String(value.into()))
    }

    /// Presses `key` (Playwright's names: `Tab`, `Enter`, `Escape`,
    /// `Shift+Tab`, ...) in the element.
    pub fn press(selector: impl Into<String>, key: impl Into<String>) -> Step {
        Step::new("press", Value::String(selector.into())).with("key", Value::String(key.into()))
    }

    /// Presses `key` in the page, wherever the focus is.
    pub fn press_key(key: impl Into<String>) -> Step {
        Step::new("press", Value::Null).with("key", Value::String(key.into()))
    }

    /// Waits until the element is in `state`.
    pub fn wait_for(selector: impl Into<String>, state: State) -> Step {
        Step::new("wait_for", Value::String(selector.into()))
            .with("state", Value::String(state.as_str().to_owned()))
    }

    /// Waits until an element matching `selector` that contains `text`
    /// (case-sensitive) is visible; result: that element's text.
    pub fn wait_for_text(selector: impl Into<String>, text: impl Into<String>) -> Step {
        Step::new("wait_for_text", Value::String(selector.into()))
            .with("text", Value::String(text.into()))
    }

    /// Result: the element's inner text (as rendered).
    pub fn text(selector: impl Into<String>) -> Step {
        Step::new("text", Value::String(selector.into()))
    }

    /// Result: the number of matching elements now (no waiting).
    pub fn count(selector: impl Into<String>) -> Step {
        Step::new("count", Value::String(selector.into()))
    }

    /// Result: the element's attribute `name`, or null.
    pub fn attr(selector: impl Into<String>, name: impl Into<String>) -> Step {
        Step::new("attr", Value::String(selector.into())).with("name", Value::String(name.into()))
    }

    /// Saves a full-page PNG at `path` (folders made); result: its absolute
    /// path.
    pub fn screenshot(path: impl AsRef<Path>) -> Step {
        Step::new(
            "screenshot",
            Value::String(path.as_ref().to_string_lossy().into_owned()),
        )
    }

    /// Sends these headers with every later request of the page (put it
    /// before the [`Step::goto`] they are for).
    pub fn extra_headers<K, V>(headers: impl IntoIterator<Item = (K, V)>) -> Step
    where
        K: Into<String>,
        V: Into<String>,
    {
        let headers = headers
            .into_iter()
            .map(|(k, v)| (k.into(), Value::String(v.into())))
            .collect();
        Step::new("extra_headers", Value::Object(headers))
    }

    /// Presses Tab `presses` times from the current focus (the document's
    /// start after a [`Step::goto`]); result: the focused element after each
    /// press, a list of [`Focused`].
    pub fn focus_order(presses: usize) -> Step {
        Step::new("focus_order", json!(presses))
    }

    /// Evaluates JavaScript in the page (an expression, or a function,
    /// which is called); result: its value as JSON (a promise is awaited).
    pub fn eval(js: impl Into<String>) -> Step {
        Step::new("eval", Value::String(js.into()))
    }

    /// Calls the JavaScript function `js` with `arg`.
    pub fn eval_with(js: impl Into<String>, arg: Value) -> Step {
        Step::eval(js).with("arg", arg)
    }

    /// This step waits at most `timeout` (instead of the browser's step
    /// timeout).
    pub fn timeout(self, timeout: Duration) -> Step {
        self.with("timeout_ms", json!(millis(timeout)))
    }

    /// The step's JSON.
    pub fn as_json(&self) -> &Map<String, Value> {
        &self.0
    }
}

/// The focused element after one Tab of [`Step::focus_order`].
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Focused {
    /// Lower case: `input`, `button`, `a`, ...; `body` past the last
    /// focusable element.
    pub tag: String,
    pub id: Option<String>,
    /// Chromium's computed role (`textbox`, `button`, `link`, `combobox`,
    /// ...), else the `role` attribute.
    pub role: Option<String>,
    /// Chromium's computed accessible name (`aria-labelledby`, `aria-label`,
    /// the associated `<label>`, the text, ...); empty when it has none.
    pub name: String,
    /// The element's markup, cut at 160 characters.
    pub html: String,
}

/// The testbed's Chromium and Playwright.
#[derive(Clone, Debug)]
pub struct Browser {
    python: PathBuf,
    chromium: PathBuf,
    timeout: Duration,
    step_timeout: Duration,
    failure_screenshots: Option<PathBuf>,
}

impl Browser {
    /// From `e2e/testbed env`'s `KEYSTONE_TESTBED_CHROMIUM` and
    /// `KEYSTONE_TESTBED_PLAYWRIGHT_PYTHON`; an error naming the one that is
    /// missing.
    pub fn from_testbed() -> Result<Browser, BrowserError> {
        let path = |var: &'static str| match std::env::var_os(var) {
            Some(value) if !value.is_empty() => {
                let path = PathBuf::from(value);
                if path.exists() {
                    Ok(path)
                } else {
                    Err(BrowserError::NotFound { var, path })
                }
            }
            _ => Err(BrowserError::NotSet(var)),
        };
        Ok(Browser {
            python: path(PYTHON_VAR)?,
            chromium: path(CHROMIUM_VAR)?,
            timeout: SCRIPT_TIMEOUT,
            step_timeout: STEP_TIMEOUT,
            failure_screenshots: Some(artifact_dir().join("failures")),
        })
    }

    /// [`Browser::from_testbed`], or `None` to skip (with a message on
    /// stderr); a panic when `KEYSTONE_TEST_REQUIRE_BROWSER=1` (scripts/test).
    pub fn require() -> Option<Browser> {
        match Browser::from_testbed() {
            Ok(browser) => Some(browser),
            Err(e) if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") => {
                panic!("{REQUIRE_VAR}=1 but there is no browser: {e}")
            }
            Err(e) => {
                eprintln!("skipped: no browser: {e}");
                None
            }
        }
    }

    /// Time a whole script may take (default 120 s); then the driver and its
    /// browser are killed.
    pub fn with_timeout(mut self, timeout: Duration) -> Browser {
        self.timeout = timeout;
        self
    }

    /// Time each step may wait (default 15 s).
    pub fn with_step_timeout(mut self, timeout: Duration) -> Browser {
        self.step_timeout = timeout;
        self
    }

    /// Where screenshots of failed steps go (default
    /// `target/browser/failures`); `None`: none are taken.
    pub fn with_failure_screenshots(mut self, dir: Option<PathBuf>) -> Browser {
        self.failure_screenshots = dir;
        self
    }

    /// The Chromium binary.
    pub fn chromium(&self) -> &Path {
        &self.chromium
    }

    /// Runs the script in a fresh browser; one JSON result per step.
    pub async fn run(&self, steps: &[Step]) -> Result<Vec<Value>, BrowserError> {
        static FAILURES: AtomicUsize = AtomicUsize::new(0);
        let mut script = json!({
            "steps": steps,
            "timeout_ms": millis(self.step_timeout),
        });
        if let Some(dir) = &self.failure_screenshots {
            let n = FAILURES.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("failure-{}-{n}.png", std::process::id()));
            script["failure_screenshot"] = Value::String(path.to_string_lossy().into_owned());
        }
        let (status, stdout, stderr) = self.drive(script.to_string().into_bytes()).await?;
        let stdout = String::from_utf8_lossy(&stdout);
        let stderr = String::from_utf8_lossy(&stderr).into_owned();
        let output: Option<DriverOutput> = stdout
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .and_then(|line| serde_json::from_str(line).ok());
        let Some(output) = output else {
            return Err(BrowserError::Driver {
                status,
                message: format!("no result on its stdout: {:?}", stdout.trim()),
                stderr,
            });
        };
        if output.ok {
            return Ok(output.results);
        }
        let error = output.error.unwrap_or_default();
        match error.index {
            // A step that failed on the page has the page's URL; a script
            // refused before the browser started has none.
            Some(index) if error.url.is_some() => Err(BrowserError::Step(Box::new(StepFailure {
                index,
                step: error.step,
                url: error.url.unwrap_or_default(),
                message: error.message,
                screenshot: error.screenshot,
                results: output.results,
                console: output.console,
                stderr,
            }))),
            _ => Err(BrowserError::Driver {
                status,
                message: error.message,
                stderr,
            }),
        }
    }

    /// Runs the driver with `script` on its stdin, in a process group of its
    /// own (Python, Playwright's node driver, Chromium), killed whole at the
    /// timeout: (exit status, stdout, stderr).
    async fn drive(&self, script: Vec<u8>) -> Result<(String, Vec<u8>, Vec<u8>), BrowserError> {
        let mut child = Command::new(&self.python)
            .arg(DRIVER)
            .arg("--chromium")
            .arg(&self.chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BrowserError::Spawn {
                python: self.python.clone(),
                source,
            })?;
        let group = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(Pid::from_raw);
        let kill_group = || {
            if let Some(group) = group {
                // The group outlives its leader while a member holds a pipe,
                // so its id is not reused yet.
                let _ = killpg(group, Signal::SIGKILL);
            }
        };
        let stdout = tokio::spawn(read_all(child.stdout.take()));
        let stderr = tokio::spawn(read_all(child.stderr.take()));
        if let Some(mut stdin) = child.stdin.take() {
            // A driver that dies early closes the pipe: its output says why.
            let _ = stdin.write_all(&script).await;
        }
        let status = match tokio::time::timeout(self.timeout, child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("not known: {e}"),
            Err(_) => {
                kill_group();
                let _ = child.wait().await;
                let stderr = drain(stderr).await;
                return Err(BrowserError::Timeout {
                    timeout: self.timeout,
                    stderr: String::from_utf8_lossy(&stderr).into_owned(),
                });
            }
        };
        // A process left in the group (e.g. a browser the driver did not
        // close) keeps the pipes open: end it.
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let out = stdout.await.unwrap_or_default();
            (out, stderr.await.unwrap_or_default())
        })
        .await;
        let (stdout, stderr) = match drained {
            Ok(output) => output,
            Err(_) => {
                kill_group();
                return Err(BrowserError::Driver {
                    status,
                    message: "its output stayed open after it exited (its processes were killed)"
                        .to_owned(),
                    stderr: String::new(),
                });
            }
        };
        Ok((status, stdout, stderr))
    }
}

/// What the driver prints.
#[derive(Deserialize)]
struct DriverOutput {
    ok: bool,
    #[serde(default)]
    results: Vec<Value>,
    #[serde(default)]
    error: Option<DriverError>,
    #[serde(default)]
    console: Vec<String>,
}

#[derive(Default, Deserialize)]
struct DriverError {
    index: Option<usize>,
    #[serde(default)]
    step: Value,
    url: Option<String>,
    #[serde(default)]
    message: String,
    screenshot: Option<PathBuf>,
}

async fn read_all(pipe: Option<impl AsyncRead + Unpin>) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Some(mut pipe) = pipe {
        let _ = pipe.read_to_end(&mut buf).await;
    }
    buf
}

/// A reader's output after its process was killed (what it read in time).
async fn drain(reader: tokio::task::JoinHandle<Vec<u8>>) -> Vec<u8> {
    tokio::time::timeout(DRAIN_TIMEOUT, reader)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_the_drivers_json() {
        let steps = [
            Step::fill("#name", "Ada"),
            Step::wait_for("#spinner", State::Hidden).timeout(Duration::from_secs(2)),
            Step::wait_for_text("#out", "Hello"),
            Step::press_key("Tab"),
            Step::extra_headers([("X-User", "ada")]),
            Step::focus_order(3),
        ];
        assert_eq!(
            serde_json::to_value(steps).unwrap(),
            json!([
                {"fill": "#name", "value": "Ada"},
                {"wait_for": "#spinner", "state": "hidden", "timeout_ms": 2000},
                {"wait_for_text": "#out", "text": "Hello"},
                {"press": null, "key": "Tab"},
                {"extra_headers": {"X-User": "ada"}},
                {"focus_order": 3},
            ])
        );
    }

    #[test]
    fn a_missing_variable_is_named() {
        let e = BrowserError::NotSet(PYTHON_VAR).to_string();
        assert!(e.contains("KEYSTONE_TESTBED_PLAYWRIGHT_PYTHON"), "{e}");
        assert!(e.contains("e2e/testbed up"), "{e}");
    }
}
