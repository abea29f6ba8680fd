#!/usr/bin/env python3
"""Runs one browser script in a real headless Chromium, through Playwright.

The end-to-end tests (keystone_e2e::browser) call it as a subprocess with the
testbed's Playwright virtualenv (KEYSTONE_TESTBED_PLAYWRIGHT_PYTHON):

    python driver.py [--chromium PATH] < script.json > result.json

The script is a JSON list of steps, or an object
{"steps": [...], "failure_screenshot": "PATH", "timeout_ms": N,
 "viewport": {"width": W, "height": H}}. Each step is an object with one
action key; "timeout_ms" may be added to any step (default: the script's,
else 15 000 ms):

    {"goto": URL}                                   -> HTTP status or null
    {"fill": SELECTOR, "value": TEXT}               -> null
    {"click": SELECTOR}                             -> null
    {"select": SELECTOR, "value": V or [V, ...]}    -> the selected values
    {"press": SELECTOR or null, "key": "Tab"}       -> null (null: the page)
    {"wait_for": SELECTOR, "state": "visible"|"hidden"|"attached"|"detached"}
                                                    -> null (default visible)
    {"wait_for_text": SELECTOR, "text": TEXT}       -> the element's text
    {"text": SELECTOR}                              -> inner text
    {"count": SELECTOR}                             -> number of matches
    {"attr": SELECTOR, "name": NAME}                -> value or null
    {"screenshot": PATH, "full_page": true}         -> PATH (a PNG)
    {"extra_headers": {NAME: VALUE}}                -> null (for later requests)
    {"focus_order": N}                              -> N focused elements
    {"eval": JS, "arg": VALUE}                      -> JSON value

Selectors are Playwright's (CSS, text=..., role=..., ...). Steps that act on
one element (fill, click, select, press, text, attr) are strict: a selector
that matches several elements fails. wait_for (visible, attached) and
wait_for_text wait for the first match.

focus_order presses Tab N times and returns, for each press, the focused
element: {"tag", "id", "role", "name", "html"}. role and name are
Chromium's accessibility tree's (its computed role and accessible name:
aria-labelledby, aria-label, the associated <label>, the text, ...); for an
element without a role there, the explicit role attribute and a name from
aria-label, the <label>, the text or the title. Past the last focusable
element the focus is on <body> (tag "body").

It prints one JSON object on stdout:
    {"ok": true, "results": [...], "console": [...]}      (exit 0)
    {"ok": false, "error": {"index", "step", "url", "message",
     "screenshot"}, "results": [...done...], "console": [...]}   (exit 1)
results are index-aligned with the steps; console holds the page's console
messages and uncaught errors. A script that cannot run (bad JSON, an unknown
action, no browser) exits 2 with "index" null (or the bad step's index).

One script is one browser session: a fresh profile (a temporary user-data
dir) and one page, closed at the end. Never `playwright install`: the browser
is Debian's Chromium (e2e/testbed up installs it).
"""

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import traceback

from playwright.sync_api import sync_playwright

# The flags verified with Debian's Chromium on this machine (see
# ../shared/TESTBED.md, "A real browser"); the user-data dir is a fresh
# temporary folder, given by launch_persistent_context.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEFAULT_TIMEOUT_MS = 15_000
# Console messages kept, at most.
CONSOLE_LIMIT = 200

# The action keys, each with the option keys it takes (timeout_ms: all).
ACTIONS = {
    "goto": set(),
    "fill": {"value"},
    "click": set(),
    "select": {"value"},
    "press": {"key"},
    "wait_for": {"state"},
    "wait_for_text": {"text"},
    "text": set(),
    "count": set(),
    "attr": {"name"},
    "screenshot": {"full_page"},
    "extra_headers": set(),
    "focus_order": set(),
    "eval": {"arg"},
}
REQUIRED = {"fill": {"value"}, "select": {"value"}, "press": {"key"}, "wait_for_text": {"text"}, "attr": {"name"}}


class BadScript(Exception):
    """A script or step the driver cannot run (not a failure of the page)."""

    def __init__(self, message, index=None):
        super().__init__(message)
        self.index = index


def parse_step(index, step):
    """(action, argument, options) of one step, or BadScript."""
    if not isinstance(step, dict):
        raise BadScript(f"step {index} is not an object: {json.dumps(step)}", index)
    actions = [key for key in step if key in ACTIONS]
    # "text" is an action and wait_for_text's option: with another action
    # that takes it, it is that action's option.
    if "text" in actions and any("text" in ACTIONS[key] for key in actions):
        actions.remove("text")
    if len(actions) != 1:
        raise BadScript(
            f"step {index} must have exactly one action key of {sorted(ACTIONS)}, has {actions}: {json.dumps(step)}",
            index,
        )
    action = actions[0]
    options = {key: value for key, value in step.items() if key != action}
    unknown = set(options) - ACTIONS[action] - {"timeout_ms"}
    if unknown:
        raise BadScript(f"step {index} ({action}) has unknown keys {sorted(unknown)}: {json.dumps(step)}", index)
    missing = REQUIRED.get(action, set()) - set(options)
    if missing:
        raise BadScript(f"step {index} ({action}) lacks {sorted(missing)}: {json.dumps(step)}", index)
    return action, step[action], options


# The focused element, described from the DOM: the fallback for elements
# without a role in the accessibility tree, and the tag, id and markup.
FOCUSED_JS = r"""() => {
  const el = document.activeElement;
  if (!el) return null;
  const clean = (s) => (s || "").replace(/\s+/g, " ").trim();
  let name = clean(el.getAttribute("aria-label"));
  const labelledby = el.getAttribute("aria-labelledby");
  if (!name && labelledby) {
    name = clean(labelledby.split(/\s+/)
      .map((id) => document.getElementById(id))
      .filter((e) => e).map((e) => e.innerText).join(" "));
  }
  if (!name && el.labels && el.labels.length) {
    name = clean(Array.from(el.labels).map((l) => l.innerText).join(" "));
  }
  if (!name && el !== document.body) name = clean(el.innerText || el.value);
  if (!name) name = clean(el.getAttribute("title") || el.getAttribute("placeholder"));
  const html = el.outerHTML;
  return {
    tag: el.tagName.toLowerCase(),
    id: el.id || null,
    role: el.getAttribute("role"),
    name: name,
    html: html.length > 160 ? html.slice(0, 160) + "..." : html,
    body: el === document.body,
  };
}"""

# The first line of an ARIA snapshot: `- role "name"`, `- role`, `- text: ...`.
ARIA_LINE = re.compile(r'^- ([A-Za-z][\w-]*)(?: "((?:[^"\\]|\\.)*)")?(?=$|[ :\[])')


def aria_role_name(snapshot):
    """(role, name) from an ARIA snapshot's first line, or (None, None)."""
    first = snapshot.splitlines()[0] if snapshot else ""
    match = ARIA_LINE.match(first)
    if not match or match.group(1) in ("text", "generic"):
        return None, None
    name = match.group(2) or ""
    try:
        name = json.loads(f'"{name}"')
    except ValueError:
        pass
    return match.group(1), name


def focused(page):
    """The focused element after a key press (see focus_order)."""
    element = page.evaluate(FOCUSED_JS)
    if element is None:
        return None
    body = element.pop("body")
    if not body:
        try:
            role, name = aria_role_name(page.locator("*:focus").aria_snapshot(timeout=2_000))
        except Exception:  # noqa: BLE001 - e.g. the focus is in an iframe
            role, name = None, None
        if role is not None:
            element["role"], element["name"] = role, name
    return element


def run_step(context, page, action, arg, options):
    """Runs one step on the page; returns its result (JSON)."""
    if action == "goto":
        response = page.goto(arg)
        return response.status if response is not None else None
    if action == "extra_headers":
        if not isinstance(arg, dict):
            raise BadScript("extra_headers takes an object of header names to values")
        context.set_extra_http_headers({str(k): str(v) for k, v in arg.items()})
        return None
    if action == "focus_order":
        if not isinstance(arg, int) or arg < 0:
            raise BadScript("focus_order takes a number of Tab presses")
        order = []
        for _ in range(arg):
            page.keyboard.press("Tab")
            order.append(focused(page))
        return order
    if action == "eval":
        return page.evaluate(arg, options.get("arg"))
    if action == "screenshot":
        path = os.path.abspath(arg)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        page.screenshot(path=path, full_page=options.get("full_page", True))
        return path
    if action == "press" and arg is None:
        page.keyboard.press(options["key"])
        return None
    if not isinstance(arg, str):
        raise BadScript(f"{action} takes a selector (a string)")
    locator = page.locator(arg)
    if action == "fill":
        locator.fill(str(options["value"]))
        return None
    if action == "click":
        locator.click()
        return None
    if action == "select":
        return locator.select_option(options["value"])
    if action == "press":
        locator.press(options["key"])
        return None
    if action == "wait_for":
        state = options.get("state", "visible")
        if state not in ("visible", "hidden", "attached", "detached"):
            raise BadScript(f"wait_for state must be visible, hidden, attached or detached, not {state!r}")
        # Visible, attached: any match will do. Hidden, detached: the one
        # element (several matches fail, as the selector is ambiguous).
        target = locator.first if state in ("visible", "attached") else locator
        target.wait_for(state=state)
        return None
    if action == "wait_for_text":
        # Case-sensitive: a regular expression of the literal text (a plain
        # string would match case-insensitively).
        match = locator.filter(has_text=re.compile(re.escape(str(options["text"])))).first
        match.wait_for(state="visible")
        return match.inner_text()
    if action == "text":
        return locator.inner_text()
    if action == "count":
        return locator.count()
    if action == "attr":
        return locator.get_attribute(str(options["name"]))
    raise BadScript(f"unknown action {action}")


def emit(result, code):
    # default=str: a value JSON has no form for (e.g. a Date from eval).
    sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    return code


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--chromium",
        default=os.environ.get("KEYSTONE_TESTBED_CHROMIUM") or shutil.which("chromium"),
        help="the Chromium binary (default: $KEYSTONE_TESTBED_CHROMIUM, else chromium on PATH)",
    )
    args = parser.parse_args()

    def bad(message, index=None, step=None):
        error = {"index": index, "step": step, "url": None, "message": message, "screenshot": None}
        return emit({"ok": False, "error": error, "results": [], "console": []}, 2)

    try:
        script = json.load(sys.stdin)
    except ValueError as e:
        return bad(f"the script on stdin is not JSON: {e}")
    if isinstance(script, list):
        script = {"steps": script}
    if not isinstance(script, dict) or not isinstance(script.get("steps"), list):
        return bad("the script must be a list of steps or an object with a list 'steps'")
    steps = script["steps"]
    try:
        parsed = [parse_step(i, step) for i, step in enumerate(steps)]
    except BadScript as e:
        return bad(str(e), e.index, steps[e.index] if e.index is not None else None)
    if not args.chromium:
        return bad("no Chromium: set KEYSTONE_TESTBED_CHROMIUM or pass --chromium (e2e/testbed up installs it)")
    timeout_ms = int(script.get("timeout_ms") or DEFAULT_TIMEOUT_MS)
    failure_screenshot = script.get("failure_screenshot")

    results = []
    console = []

    def on_console(message):
        if len(console) < CONSOLE_LIMIT:
            console.append(f"{message.type}: {message.text}")

    def on_page_error(error):
        if len(console) < CONSOLE_LIMIT:
            console.append(f"pageerror: {error}")

    with tempfile.TemporaryDirectory(prefix="keystone-chromium-") as profile, sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=args.chromium,
                args=CHROMIUM_FLAGS,
                headless=True,
                viewport=script.get("viewport") or {"width": 1280, "height": 800},
            )
        except Exception as e:  # noqa: BLE001 - reported as JSON
            return bad(f"launching {args.chromium} failed: {e}")
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.on("console", on_console)
            page.on("pageerror", on_page_error)
            for index, (action, arg, options) in enumerate(parsed):
                step_timeout = int(options.get("timeout_ms") or timeout_ms)
                page.set_default_timeout(step_timeout)
                page.set_default_navigation_timeout(step_timeout)
                try:
                    results.append(run_step(context, page, action, arg, options))
                except Exception as e:  # noqa: BLE001 - reported as JSON
                    message = str(e) if str(e) else traceback.format_exc()
                    shot = None
                    if failure_screenshot:
                        try:
                            shot = os.path.abspath(failure_screenshot)
                            os.makedirs(os.path.dirname(shot), exist_ok=True)
                            page.screenshot(path=shot, full_page=True, timeout=5_000)
                        except Exception as shot_error:  # noqa: BLE001
                            message += f"\n(the failure screenshot failed too: {shot_error})"
                            shot = None
                    error = {
                        "index": index,
                        "step": steps[index],
                        "url": page.url,
                        "message": message,
                        "screenshot": shot,
                    }
                    code = 2 if isinstance(e, BadScript) else 1
                    return emit({"ok": False, "error": error, "results": results, "console": console}, code)
            return emit({"ok": True, "results": results, "console": console}, 0)
        finally:
            context.close()


if __name__ == "__main__":
    sys.exit(main())
