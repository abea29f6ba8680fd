#!/usr/bin/env bash
# shellcheck shell=bash
# Debezium's PostgreSQL connector in Kafka Connect (standalone), the
# reference that Keystone's change-data capture is compared with
# (e2e/tests/capture_debezium.rs, the S11 benchmark). Sourced by e2e/testbed
# (`up` installs it with the postgres component) and runnable on its own:
#
#   e2e/testbed.d/debezium.sh ensure   # installs once (cached), then prints
#                                      #   KEYSTONE_DEBEZIUM_HOME=<install folder>
#                                      #   KEYSTONE_DEBEZIUM_CLASSPATH=<worker class path>
#                                      #   KEYSTONE_DEBEZIUM_PLUGIN_PATH=<plugin.path>
#
# What is cached, in ${KEYSTONE_TESTBED_CACHE:-~/.cache/keystone-testbed}:
#   debezium-<version>-<hash of debezium-pom.xml>/
#     plugins/debezium-connector-postgres/*.jar   the connector and its
#         dependencies without Kafka's own jars (org.apache.kafka:*), loaded by
#         the worker from plugin.path in a class loader of their own;
#     logging/slf4j-api-2.*.jar   first on the worker's class path: the Kafka
#         jars carry slf4j-api 1.7 beside log4j's SLF4J 2 binding, which
#         would send every log line to SLF4J's no-operation logger;
#     connect/*.jar   connect-runtime and connect-json of KEYSTONE_KAFKA_VERSION
#         with a log4j2 binding, fetched only when the testbed's Kafka jars
#         (kafka-<version>/libs, which carry them) are missing or lack them.
# The worker: java -cp "<class path>" org.apache.kafka.connect.cli.ConnectStandalone
# worker.properties connector.properties (e2e/src/debezium.rs writes both).

DEBEZIUM_VERSION="${KEYSTONE_DEBEZIUM_VERSION:-3.6.1.Final}"

# Run on its own: the testbed's folders and helpers, as e2e/testbed sets them.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  HERE="$REPO/e2e/testbed.d"
  STATE="${KEYSTONE_TESTBED_STATE:-$REPO/target/testbed}"
  # The state's env file pins the cache folder and the Kafka version.
  if [[ -z "${KEYSTONE_TESTBED_CACHE:-}" && -f "$STATE/env" ]]; then
    KEYSTONE_TESTBED_CACHE="$(sed -n "s/^export KEYSTONE_TESTBED_CACHE='\(.*\)'$/\1/p" "$STATE/env")"
  fi
  if [[ -z "${KEYSTONE_KAFKA_VERSION:-}" && -f "$STATE/env" ]]; then
    KEYSTONE_KAFKA_VERSION="$(sed -n "s/^export KEYSTONE_KAFKA_VERSION='\(.*\)'$/\1/p" "$STATE/env")"
  fi
  CACHE="${KEYSTONE_TESTBED_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/keystone-testbed}"
  KAFKA_VERSION="${KEYSTONE_KAFKA_VERSION:-4.1.1}"
  KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
  # Progress and errors on stderr: stdout carries only the result.
  log() { printf '[debezium %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
  die() { printf '[debezium] error: %s\n' "$*" >&2; exit 1; }
  cache_lock() {
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
  }
  cache_unlock() { flock -u 9; exec 9>&-; }
fi

# debezium_paths: the install folder, named after the pom too (a change to it
# makes a new folder).
debezium_paths() {
  DEBEZIUM_HOME="$CACHE/debezium-$DEBEZIUM_VERSION-$(sha256sum "$HERE/debezium-pom.xml" | cut -c1-12)"
  DEBEZIUM_PLUGINS="$DEBEZIUM_HOME/plugins"
}

# debezium_connect_in_kafka_libs: the testbed's Kafka jars carry the Connect
# worker of the same version (kafka-tools depends on connect-runtime).
debezium_connect_in_kafka_libs() {
  [[ -f "$KAFKA_LIBS/.complete" \
    && -f "$KAFKA_LIBS/connect-runtime-$KAFKA_VERSION.jar" \
    && -f "$KAFKA_LIBS/connect-json-$KAFKA_VERSION.jar" ]]
}

# debezium_fetch WHAT DIR MVN-ARGS...: copies the pom's dependencies (of a
# profile) into DIR.tmp, then renames it to DIR; a log next to the folder.
debezium_fetch() {
  local what="$1" dir="$2" flog t=$SECONDS
  shift 2
  flog="$DEBEZIUM_HOME.fetch.log"
  log "fetching $what from Maven Central into $dir (log: $flog)"
  rm -rf "$dir" "$dir.tmp"
  mkdir -p "$dir.tmp"
  mvn -q -B -f "$HERE/debezium-pom.xml" -Ddebezium.version="$DEBEZIUM_VERSION" -Dkafka.version="$KAFKA_VERSION" \
    "$@" dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$dir.tmp" \
    >>"$flog" 2>&1 || die "maven could not resolve $what; see $flog"
  mv "$dir.tmp" "$dir"
  log "$what fetched in $((SECONDS - t)) s"
}

# ensure_debezium: the connector's plugin folder (and the worker's jars when
# the testbed's Kafka jars lack them), once per cache; idempotent, and
# serialized with other testbeds sharing the cache.
ensure_debezium() {
  debezium_paths
  if [[ -f "$DEBEZIUM_HOME/.complete" ]] && { debezium_connect_in_kafka_libs || [[ -f "$DEBEZIUM_HOME/connect/.complete" ]]; }; then
    return
  fi
  cache_lock
  if [[ ! -f "$DEBEZIUM_HOME/.complete" ]]; then
    mkdir -p "$DEBEZIUM_PLUGINS"
    debezium_fetch "Debezium's PostgreSQL connector $DEBEZIUM_VERSION" \
      "$DEBEZIUM_PLUGINS/debezium-connector-postgres"
    debezium_fetch "SLF4J 2's API" "$DEBEZIUM_HOME/logging" -P logging
    touch "$DEBEZIUM_HOME/.complete"
  fi
  if ! debezium_connect_in_kafka_libs && [[ ! -f "$DEBEZIUM_HOME/connect/.complete" ]]; then
    debezium_fetch "Kafka Connect $KAFKA_VERSION (connect-runtime, connect-json)" \
      "$DEBEZIUM_HOME/connect" -P connect
    touch "$DEBEZIUM_HOME/connect/.complete"
  fi
  cache_unlock
}

# debezium_classpath: the Connect worker's class path (a java -cp wildcard).
debezium_classpath() {
  if debezium_connect_in_kafka_libs; then
    echo "$DEBEZIUM_HOME/logging/*:$KAFKA_LIBS/*"
  else
    echo "$DEBEZIUM_HOME/logging/*:$DEBEZIUM_HOME/connect/*"
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  case "${1:-}" in
    ensure)
      ensure_debezium
      echo "KEYSTONE_DEBEZIUM_HOME=$DEBEZIUM_HOME"
      echo "KEYSTONE_DEBEZIUM_CLASSPATH=$(debezium_classpath)"
      echo "KEYSTONE_DEBEZIUM_PLUGIN_PATH=$DEBEZIUM_PLUGINS"
      ;;
    *)
      echo "usage: $0 ensure" >&2
      exit 2
      ;;
  esac
fi
