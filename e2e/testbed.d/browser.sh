# shellcheck shell=bash
# The browser of the console's end-to-end tests (sourced by e2e/testbed;
# uses its log, die, cache_lock and cache_unlock):
#
#   chromium    Debian's Chromium (and ChromeDriver), installed with apt when
#               no `chromium` is on PATH;
#   playwright  a Python virtualenv with Playwright, cached by version and
#               interpreter, which drives that Chromium headless
#               (e2e/browser/driver.py, called by keystone_e2e::browser).
#
# Nothing runs: each test starts its own browser. `up --only browser`
# installs them; `up` installs them with the rest. Never `playwright install`:
# it downloads a browser build of its own, which this machine cannot fetch.

PLAYWRIGHT_VERSION="${KEYSTONE_PLAYWRIGHT_VERSION:-1.65.2}"
# The interpreter the virtualenv is made with.
BROWSER_PYTHON_BIN="${KEYSTONE_BROWSER_PYTHON_BIN:-python3.11}"
BROWSER_VENV=""

# browser_venv: sets BROWSER_VENV, the virtualenv's folder, named after the
# Playwright version and the interpreter.
browser_venv() {
  [[ -n "$BROWSER_VENV" ]] && return
  local py
  py="$("$BROWSER_PYTHON_BIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
    || die "no $BROWSER_PYTHON_BIN for Playwright's virtualenv; set KEYSTONE_BROWSER_PYTHON_BIN"
  BROWSER_VENV="$CACHE/playwright-$PLAYWRIGHT_VERSION-python$py"
}

# browser_chromium: the Chromium on PATH (Debian's /usr/bin/chromium), or
# nothing.
browser_chromium() { command -v chromium 2>/dev/null || true; }

# ensure_chromium: Debian's chromium and chromium-driver unless a chromium is
# on PATH. apt-get update only when the install fails without it.
ensure_chromium() {
  [[ -n "$(browser_chromium)" ]] && return
  ((EUID == 0)) || die "no chromium on PATH and installing it needs root: apt-get install -y chromium chromium-driver"
  # Serializes with other testbeds installing it at the same time.
  cache_lock
  if [[ -n "$(browser_chromium)" ]]; then cache_unlock; return; fi
  mkdir -p "$STATE/logs"
  local flog="$STATE/logs/browser-install.log" t=$SECONDS
  log "installing chromium and chromium-driver with apt-get (log: $flog)"
  local -a apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=300)
  # Lists may be missing (a fresh container) or stale: update once and retry.
  if ! "${apt[@]}" install chromium chromium-driver >>"$flog" 2>&1; then
    "${apt[@]}" update >>"$flog" 2>&1 || die "apt-get update failed; see $flog"
    "${apt[@]}" install chromium chromium-driver >>"$flog" 2>&1 \
      || die "apt-get install -y chromium chromium-driver failed; see $flog"
  fi
  [[ -n "$(browser_chromium)" ]] || die "apt-get installed chromium but no chromium is on PATH; see $flog"
  log "chromium installed in $((SECONDS - t)) s ($(chromium --version 2>/dev/null))"
  cache_unlock
}

# ensure_playwright: the virtualenv, made once per Playwright version and
# interpreter; .complete marks a finished install (a half-made one is made
# again).
ensure_playwright() {
  browser_venv
  local venv="$BROWSER_VENV"
  [[ -f "$venv/.complete" ]] && return
  cache_lock
  if [[ -f "$venv/.complete" ]]; then cache_unlock; return; fi
  local flog="$venv.install.log" t=$SECONDS
  log "making Playwright's virtualenv $venv (pip install playwright==$PLAYWRIGHT_VERSION)"
  rm -rf "$venv"
  {
    "$BROWSER_PYTHON_BIN" -m venv "$venv" \
      && "$venv/bin/python" -m pip install -q --disable-pip-version-check "playwright==$PLAYWRIGHT_VERSION" \
      && "$venv/bin/python" -c 'import playwright.sync_api'
  } >"$flog" 2>&1 || die "making Playwright's virtualenv failed; see $flog"
  touch "$venv/.complete"
  log "Playwright's virtualenv made in $((SECONDS - t)) s"
  cache_unlock
}

ensure_browser() {
  ensure_chromium
  ensure_playwright
}

browser_write_env() {
  browser_venv
  echo "export KEYSTONE_PLAYWRIGHT_VERSION='$PLAYWRIGHT_VERSION'"
  echo "export KEYSTONE_TESTBED_CHROMIUM='$(browser_chromium)'"
  echo "export KEYSTONE_TESTBED_PLAYWRIGHT_PYTHON='$BROWSER_VENV/bin/python'"
}

# browser_status: one line per check; returns non-zero when one fails.
browser_status() {
  local rc=0 chromium
  browser_venv
  chromium="$(browser_chromium)"
  if [[ -n "$chromium" ]]; then
    echo "chromium                ok ($chromium, $("$chromium" --version 2>/dev/null))"
  else
    echo "chromium                MISSING: run e2e/testbed up"; rc=1
  fi
  if [[ -f "$BROWSER_VENV/.complete" ]]; then
    echo "playwright's python     ok ($BROWSER_VENV/bin/python)"
  else
    echo "playwright's python     MISSING ($BROWSER_VENV): run e2e/testbed up"; rc=1
  fi
  return "$rc"
}
