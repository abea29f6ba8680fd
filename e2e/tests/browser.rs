//! The browser harness (keystone_e2e::browser) against a real headless
//! Chromium: a small form served by an in-test HTTP server is filled,
//! clicked, awaited, walked with the keyboard and photographed; a failing
//! step reports its index, the page and a screenshot.
//!
//! Runs when `KEYSTONE_TESTBED_CHROMIUM` and
//! `KEYSTONE_TESTBED_PLAYWRIGHT_PYTHON` are set (`e2e/testbed env` exports
//! them); with `KEYSTONE_TEST_REQUIRE_BROWSER=1` a missing browser fails the
//! test instead of skipping it.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use keystone_e2e::browser::{Browser, BrowserError, Focused, State, Step, artifact_dir};
use serde_json::json;

/// The page: a labelled input, a button and a script that writes the input
/// into `#out` on click. `#header` shows the request's `X-Keystone-Smoke`.
fn page(header: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>Keystone browser smoke</title></head>
<body>
  <h1>Greeting</h1>
  <p id="header">{header}</p>
  <form onsubmit="return false">
    <label for="name">Your name</label>
    <input id="name" name="name" type="text">
    <button id="greet" type="button">Greet</button>
  </form>
  <div id="out" role="status"></div>
  <script>
    document.getElementById("greet").addEventListener("click", () => {{
      const name = document.getElementById("name").value;
      // Later, as an htmx swap would be: wait_for_text has to wait.
      setTimeout(() => {{
        document.getElementById("out").textContent = "Hello, " + name;
      }}, 200);
    }});
  </script>
</body>
</html>
"#
    )
}

/// Serves `page` at `/` (404 elsewhere) on a loopback port, one thread per
/// connection, until the test process ends: its base URL.
fn serve() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || respond(stream));
        }
    });
    format!("http://{addr}")
}

fn respond(mut stream: TcpStream) {
    // Chromium may open a connection it never uses.
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut header = String::from("(none)");
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {
                if let Some((name, value)) = line.split_once(':')
                    && name.trim().eq_ignore_ascii_case("x-keystone-smoke")
                {
                    header = value.trim().to_owned();
                }
            }
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if path == "/" {
        ("200 OK", page(&header))
    } else {
        ("404 Not Found", "not found\n".to_owned())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

#[tokio::test]
async fn a_form_is_filled_clicked_walked_and_photographed() {
    let Some(browser) = Browser::require() else {
        return;
    };
    let url = serve();
    let screenshot = artifact_dir().join("smoke.png");
    let _ = std::fs::remove_file(&screenshot);
    let results = browser
        .run(&[
            Step::extra_headers([("X-Keystone-Smoke", "from-the-test")]),
            Step::goto(format!("{url}/")),
            Step::text("#header"),
            Step::focus_order(2),
            Step::fill("#name", "Ada"),
            Step::click("#greet"),
            Step::wait_for_text("#out", "Hello, Ada"),
            Step::text("#out"),
            Step::count("input"),
            Step::attr("#name", "name"),
            Step::wait_for("#nothing", State::Hidden),
            Step::eval("document.title"),
            Step::screenshot(&screenshot),
        ])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(results.len(), 13, "{results:?}");
    assert_eq!(results[0], json!(null));
    assert_eq!(results[1], json!(200), "goto gives the HTTP status");
    assert_eq!(
        results[2],
        json!("from-the-test"),
        "extra_headers reached the server"
    );

    // Both controls are reachable with Tab, in order, with their names.
    let order: Vec<Focused> = serde_json::from_value(results[3].clone()).expect("focus order");
    assert_eq!(order.len(), 2, "{order:?}");
    assert_eq!(
        (
            order[0].tag.as_str(),
            order[0].role.as_deref(),
            order[0].name.as_str()
        ),
        ("input", Some("textbox"), "Your name"),
        "the input is reachable and labelled: {order:?}"
    );
    assert_eq!(order[0].id.as_deref(), Some("name"));
    assert_eq!(
        (
            order[1].tag.as_str(),
            order[1].role.as_deref(),
            order[1].name.as_str()
        ),
        ("button", Some("button"), "Greet"),
        "the button is reachable and named: {order:?}"
    );

    assert_eq!(
        results[6],
        json!("Hello, Ada"),
        "wait_for_text gives the text"
    );
    assert_eq!(results[7], json!("Hello, Ada"));
    assert_eq!(results[8], json!(1));
    assert_eq!(results[9], json!("name"));
    assert_eq!(results[11], json!("Keystone browser smoke"));
    let shot = std::fs::read(&screenshot)
        .unwrap_or_else(|e| panic!("the screenshot {}: {e}", screenshot.display()));
    assert!(
        shot.starts_with(b"\x89PNG\r\n\x1a\n") && shot.len() > 1000,
        "{} is not a PNG ({} bytes)",
        screenshot.display(),
        shot.len()
    );
    assert_eq!(results[12], json!(screenshot.to_string_lossy()));
}

#[tokio::test]
async fn a_failing_step_names_itself_the_page_and_a_screenshot() {
    let Some(browser) = Browser::require() else {
        return;
    };
    let url = serve();
    let error = browser
        .run(&[
            Step::goto(format!("{url}/")),
            Step::fill("#name", "Ada"),
            Step::click("#no-such-button").timeout(Duration::from_millis(500)),
            Step::text("#out"),
        ])
        .await
        .expect_err("a click on a missing element fails");
    let BrowserError::Step(failure) = &error else {
        panic!("not a step failure: {error}");
    };
    assert_eq!(failure.index, 2, "{error}");
    assert_eq!(
        failure.step,
        json!({"click": "#no-such-button", "timeout_ms": 500})
    );
    assert_eq!(failure.url, format!("{url}/"));
    assert_eq!(failure.results, vec![json!(200), json!(null)]);
    assert!(failure.message.contains("#no-such-button"), "{error}");
    let screenshot = failure.screenshot.as_ref().expect("a failure screenshot");
    let size = std::fs::metadata(screenshot)
        .unwrap_or_else(|e| panic!("{}: {e}", screenshot.display()))
        .len();
    assert!(size > 0, "{} is empty", screenshot.display());
    let text = error.to_string();
    assert!(
        text.contains("browser step 2") && text.contains(&url),
        "{text}"
    );
}

#[tokio::test]
async fn a_script_past_its_time_is_killed_with_its_browser() {
    let Some(browser) = Browser::require() else {
        return;
    };
    let url = serve();
    let started = std::time::Instant::now();
    let error = browser
        .with_timeout(Duration::from_secs(4))
        .run(&[
            Step::goto(format!("{url}/")),
            Step::wait_for("#never", State::Visible).timeout(Duration::from_secs(60)),
        ])
        .await
        .expect_err("the script outlives its time");
    assert!(
        matches!(error, BrowserError::Timeout { .. }),
        "not a timeout: {error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "killed after {:?}",
        started.elapsed()
    );
}
