# shellcheck shell=bash
# The schema registry component of e2e/testbed (sourced by it; uses its log,
# die, cache_lock, start_proc, is_running, require_port, java_major and the
# lake's ensure_lake_python):
#
#   registry  Apicurio Registry 3.3.3, the Quarkus application from Maven
#             Central (io.apicurio:apicurio-registry-app:3.3.3:tar.gz:all),
#             in-memory storage (its default: an H2 database in memory, so
#             schemas live as long as the process), on
#             127.0.0.1:$KEYSTONE_TESTBED_REGISTRY_PORT, with the global
#             compatibility rule BACKWARD (Confluent's default; a fresh
#             Apicurio has none) and its health endpoints on
#             127.0.0.1:$KEYSTONE_TESTBED_REGISTRY_MGMT_PORT. Clients use
#             its Confluent-compatible API, /apis/ccompat/v7.
#             Java 21+: $KEYSTONE_TESTBED_REGISTRY_JAVA (default Temurin 25).
#   the readers' virtualenv (the lake's, see lake.sh), whose
#             confluent-kafka[avro] e2e/readers/avro_registry.py uses as an
#             independent Avro producer and reader.
#
# `up --only registry` starts it; `up` starts it with the rest.

REGISTRY_VERSION="${KEYSTONE_APICURIO_VERSION:-3.3.3}"
# Not 18085: Argo CD's ApplicationSet controller has it (argocd.sh).
REGISTRY_PORT="${KEYSTONE_TESTBED_REGISTRY_PORT:-19081}"
REGISTRY_MGMT_PORT="${KEYSTONE_TESTBED_REGISTRY_MGMT_PORT:-19082}"

# Set again by registry_pin_env when an existing state pins another version.
registry_paths() {
  REGISTRY_HOME="$CACHE/apicurio-registry-$REGISTRY_VERSION"
}
registry_paths

# registry_java: sets REGISTRY_JAVA, a java of version 21 or later.
registry_java() {
  local java="${KEYSTONE_TESTBED_REGISTRY_JAVA:-/usr/lib/jvm/temurin-25-jdk-amd64/bin/java}" v
  [[ -x "$java" ]] \
    || die "no java at $java for Apicurio Registry $REGISTRY_VERSION (it needs Java 21 or later): set KEYSTONE_TESTBED_REGISTRY_JAVA to one"
  v="$(java_major "$java")"
  if [[ ! "$v" =~ ^[0-9]+$ ]] || ((v < 21)); then
    die "$java is Java ${v:-of an unknown version}; Apicurio Registry $REGISTRY_VERSION needs 21 or later: set KEYSTONE_TESTBED_REGISTRY_JAVA to one"
  fi
  REGISTRY_JAVA="$java"
}

# ------------------------------------------------------------------- install

# ensure_registry: the unpacked application (quarkus-run.jar, lib/, app/,
# quarkus/) in $REGISTRY_HOME, once; .complete marks a finished unpack.
ensure_registry() {
  [[ -f "$REGISTRY_HOME/.complete" ]] && return
  cache_lock
  if [[ -f "$REGISTRY_HOME/.complete" ]]; then cache_unlock; return; fi
  local flog="$CACHE/apicurio-registry-$REGISTRY_VERSION.fetch.log" t=$SECONDS tmp="$REGISTRY_HOME.tmp"
  local tarball="$tmp/download/apicurio-registry-app-$REGISTRY_VERSION-all.tar.gz" jar
  log "fetching Apicurio Registry $REGISTRY_VERSION from Maven Central into $REGISTRY_HOME"
  rm -rf "$REGISTRY_HOME" "$tmp"
  mkdir -p "$tmp/download" "$tmp/unpack"
  # From the cache folder, so that no pom.xml of the caller's folder is read.
  (
    cd "$CACHE"
    mvn -B -q dependency:copy \
      -Dartifact="io.apicurio:apicurio-registry-app:$REGISTRY_VERSION:tar.gz:all" \
      -DoutputDirectory="$tmp/download"
  ) >"$flog" 2>&1 || die "maven could not fetch apicurio-registry-app $REGISTRY_VERSION; see $flog"
  [[ -f "$tarball" ]] || die "maven fetched no $tarball; see $flog"
  tar xzf "$tarball" --no-same-owner -C "$tmp/unpack" >>"$flog" 2>&1 || die "could not unpack $tarball; see $flog"
  # The tarball's folder holding quarkus-run.jar (its top level, or one below).
  jar="$(find "$tmp/unpack" -maxdepth 3 -name quarkus-run.jar -print -quit)"
  [[ -n "$jar" && -d "$(dirname "$jar")/lib" ]] \
    || die "unexpected layout of apicurio-registry-app-$REGISTRY_VERSION-all.tar.gz (no quarkus-run.jar beside lib/)"
  mv "$(dirname "$jar")" "$REGISTRY_HOME"
  # The tarball stays in the local Maven repository.
  rm -rf "$tmp"
  chmod -R a+rX,go-w "$REGISTRY_HOME"
  touch "$REGISTRY_HOME/.complete"
  log "Apicurio Registry fetched in $((SECONDS - t)) s"
  cache_unlock
}

# ----------------------------------------------------------------- the server

registry_url() { echo "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7"; }

registry_ready() {
  curl -sf --max-time 3 -o /dev/null "http://127.0.0.1:$REGISTRY_MGMT_PORT/health/ready"
}

# start_registry: starts it unless running (does not wait). It runs from the
# unpacked folder in the cache (read only; Quarkus's fast-jar layout is found
# relative to quarkus-run.jar) with its temporary files in $STATE/registry.
start_registry() {
  ensure_registry
  if is_running registry; then
    log "registry already running"
    return
  fi
  registry_java
  require_port "$REGISTRY_PORT" "registry (Apicurio)" KEYSTONE_TESTBED_REGISTRY_PORT
  require_port "$REGISTRY_MGMT_PORT" "registry management" KEYSTONE_TESTBED_REGISTRY_MGMT_PORT
  local dir="$STATE/registry"
  mkdir -p "$dir/tmp"
  start_proc registry env -C "$REGISTRY_HOME" -u JAVA_TOOL_OPTIONS -u JAVA_OPTS \
    "$REGISTRY_JAVA" -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
    -Djava.io.tmpdir="$dir/tmp" \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT" \
    -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port="$REGISTRY_MGMT_PORT" \
    -Dapicurio.rules.global.compatibility=BACKWARD \
    -jar quarkus-run.jar
}

wait_registry() {
  local deadline=$((SECONDS + 120))
  until registry_ready; do
    is_running registry \
      || die "the registry exited; see $STATE/logs/registry.log: $(tail -n 3 "$STATE/logs/registry.log" 2>/dev/null)"
    ((SECONDS < deadline)) \
      || die "the registry did not answer /health/ready within 120 s; see $STATE/logs/registry.log"
    sleep 0.5
  done
  log "registry ($(registry_url)) ready"
}

# up_registry: after start_registry (cmd_up starts the JVM early). The
# readers' virtualenv comes with it: avro_registry.py runs in it.
up_registry() {
  ensure_lake_python
  wait_registry
}

# ---------------------------------------------------------------- the parts

registry_write_env() {
  echo "export KEYSTONE_TESTBED_REGISTRY_URL='$(registry_url)'"
  echo "export KEYSTONE_TESTBED_REGISTRY_PORT='$REGISTRY_PORT'"
  echo "export KEYSTONE_TESTBED_REGISTRY_MGMT_PORT='$REGISTRY_MGMT_PORT'"
  echo "export KEYSTONE_APICURIO_VERSION='$REGISTRY_VERSION'"
  # The readers (avro_registry.py) and their python, which the lake's part
  # exports when the lake runs too.
  if ! has lake; then
    lake_venv
    echo "export KEYSTONE_TESTBED_LAKE_PYTHON='$LAKE_VENV/bin/python'"
    echo "export KEYSTONE_TESTBED_READERS='$REPO/e2e/readers'"
  fi
}

registry_pin_env() {
  REGISTRY_PORT="${KEYSTONE_TESTBED_REGISTRY_PORT:-$REGISTRY_PORT}"
  REGISTRY_MGMT_PORT="${KEYSTONE_TESTBED_REGISTRY_MGMT_PORT:-$REGISTRY_MGMT_PORT}"
  REGISTRY_VERSION="${KEYSTONE_APICURIO_VERSION:-$REGISTRY_VERSION}"
  registry_paths
}

# registry_status: one line per check; returns non-zero when one fails.
registry_status() {
  local rc=0
  if registry_ready; then
    echo "registry /health/ready  ok ($(registry_url), Apicurio $REGISTRY_VERSION)"
  else
    echo "registry /health/ready  FAILING (http://127.0.0.1:$REGISTRY_MGMT_PORT/health/ready)"; rc=1
  fi
  if ! has lake; then
    lake_venv
    if [[ -f "$LAKE_VENV/.complete" ]]; then
      echo "readers' python         ok ($LAKE_VENV/bin/python)"
    else
      echo "readers' python         MISSING ($LAKE_VENV): run e2e/testbed up"; rc=1
    fi
  fi
  return "$rc"
}
