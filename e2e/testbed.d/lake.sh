# shellcheck shell=bash
# The lake components of e2e/testbed (sourced by it; uses its log, die,
# cache_lock, start_proc, stop_proc, is_running, wait_until, require_port):
#
#   s3       gofakes3, an S3-compatible store (objects are plain files under
#            $STATE/s3), bucket "keystone", for the Hive-style Parquet sink;
#   iceberg  Apache Iceberg's RESTCatalogServer, a JDBC catalog on SQLite
#            with a file:// warehouse under $STATE/iceberg, for the Iceberg sink;
#   iceberg-s3  a second one whose warehouse is s3://keystone/warehouse on the
#            store above (S3FileIO), as catalogs in production have it;
#   a Python virtualenv with pyiceberg, pyarrow and confluent-kafka[avro],
#            for the independent readers in e2e/readers/ that the e2e tests
#            call (the registry component uses it too).
#
# `up --only lake` starts these; `up` starts them with the rest.

GOFAKES3_VERSION="${KEYSTONE_GOFAKES3_VERSION:-v1.2.0}"
ICEBERG_VERSION="${KEYSTONE_ICEBERG_VERSION:-1.10.1}"
S3_PORT="${KEYSTONE_TESTBED_S3_PORT:-19900}"
ICEBERG_PORT="${KEYSTONE_TESTBED_ICEBERG_PORT:-19181}"
ICEBERG_S3_PORT="${KEYSTONE_TESTBED_ICEBERG_S3_PORT:-19182}"
S3_BUCKET="keystone"
# The interpreter the readers' virtualenv is made with.
LAKE_PYTHON_BIN="${KEYSTONE_LAKE_PYTHON_BIN:-python3.11}"
LAKE_REQUIREMENTS="$REPO/e2e/readers/requirements.txt"

# Set again by lake_pin_env when an existing state pins other versions.
lake_paths() {
  GOFAKES3_BIN="$CACHE/gofakes3-$GOFAKES3_VERSION/bin/gofakes3"
  # Named after the pom too: a jar added to it makes a new folder.
  ICEBERG_LIBS="$CACHE/iceberg-rest-$ICEBERG_VERSION-$(sha256sum "$HERE/iceberg-rest-pom.xml" | cut -c1-12)/lib"
  LAKE_VENV=""
}
lake_paths

# lake_venv: sets LAKE_VENV, the virtualenv's folder. It names the
# interpreter and the requirements' hash: editing
# e2e/readers/requirements.txt makes a new one.
lake_venv() {
  [[ -n "$LAKE_VENV" ]] && return
  local py hash
  py="$("$LAKE_PYTHON_BIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
    || die "no $LAKE_PYTHON_BIN for the lake readers' virtualenv; set KEYSTONE_LAKE_PYTHON_BIN"
  hash="$(sha256sum "$LAKE_REQUIREMENTS" | cut -c1-12)"
  LAKE_VENV="$CACHE/lake-python$py-$hash"
}

# ------------------------------------------------------------------ installs

ensure_gofakes3() {
  go_install_cached gofakes3 "$GOFAKES3_VERSION" "github.com/johannesboyne/gofakes3/cmd/gofakes3@$GOFAKES3_VERSION"
}

ensure_iceberg_rest() {
  [[ -f "$ICEBERG_LIBS/.complete" ]] && return
  cache_lock
  if [[ -f "$ICEBERG_LIBS/.complete" ]]; then cache_unlock; return; fi
  local flog="${ICEBERG_LIBS%/lib}.fetch.log" t=$SECONDS
  log "fetching the Iceberg REST catalog server $ICEBERG_VERSION from Maven Central into $ICEBERG_LIBS"
  rm -rf "$ICEBERG_LIBS"
  mkdir -p "$ICEBERG_LIBS"
  mvn -q -B -f "$HERE/iceberg-rest-pom.xml" -Diceberg.version="$ICEBERG_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$ICEBERG_LIBS" \
    >"$flog" 2>&1 || die "maven could not resolve the Iceberg $ICEBERG_VERSION REST catalog; see $flog"
  touch "$ICEBERG_LIBS/.complete"
  log "Iceberg REST catalog fetched in $((SECONDS - t)) s"
  cache_unlock
}

# The readers' virtualenv, made once per interpreter and requirements file;
# .complete marks a finished install (a half-made one is made again).
ensure_lake_python() {
  lake_venv
  local venv="$LAKE_VENV"
  [[ -f "$venv/.complete" ]] && return
  cache_lock
  if [[ -f "$venv/.complete" ]]; then cache_unlock; return; fi
  local flog="$venv.install.log" t=$SECONDS
  log "making the readers' virtualenv $venv (pip install -r e2e/readers/requirements.txt)"
  rm -rf "$venv"
  {
    "$LAKE_PYTHON_BIN" -m venv "$venv" \
      && "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$LAKE_REQUIREMENTS" \
      && "$venv/bin/python" -c 'import pyiceberg.catalog.rest, pyarrow.dataset, pyarrow.fs, confluent_kafka.schema_registry.avro'
  } >"$flog" 2>&1 || die "making the readers' virtualenv failed; see $flog"
  touch "$venv/.complete"
  log "readers' virtualenv made in $((SECONDS - t)) s"
  cache_unlock
}

# ------------------------------------------------------------------------ s3

s3_ready() { curl -sf --max-time 3 -o /dev/null "http://127.0.0.1:$S3_PORT/$S3_BUCKET"; }

# Starts gofakes3 unless running and waits until the bucket answers. Its
# objects are files under $STATE/s3 and survive stop/start.
up_s3() {
  ensure_gofakes3
  if is_running s3; then
    log "s3 already running"
  else
    require_port "$S3_PORT" "s3 (gofakes3)" KEYSTONE_TESTBED_S3_PORT
    mkdir -p "$STATE/s3"
    start_proc s3 "$GOFAKES3_BIN" -host "127.0.0.1:$S3_PORT" -backend fs -fs.path "$STATE/s3" -fs.create \
      -initialbucket "$S3_BUCKET" -autobucket
  fi
  wait_until 30 "s3 (http://127.0.0.1:$S3_PORT, bucket $S3_BUCKET)" s3_ready \
    || die "s3 (gofakes3) did not answer within 30 s; see $STATE/logs/s3.log"
}

# ------------------------------------------------------------------- iceberg

# Pods get a private /tmp (the emptyDir over their read-only root), so a
# warehouse under /tmp would be another folder in each pod: a state under /tmp
# keeps its warehouse under /var/tmp instead, named after the state.
iceberg_warehouse_dir() {
  case "$STATE/" in
    /tmp/*) echo "/var/tmp/keystone-testbed-$(printf %s "$STATE" | sha1sum | cut -c1-12)/iceberg-warehouse" ;;
    *) echo "$STATE/iceberg/warehouse" ;;
  esac
}

# lake_cleanup: removes a warehouse kept outside the state (see above).
lake_cleanup() {
  local warehouse
  warehouse="$(iceberg_warehouse_dir)"
  case "$warehouse" in
    /var/tmp/keystone-testbed-*) rm -rf "${warehouse%/iceberg-warehouse}" ;;
  esac
}

catalog_ready() { curl -sf --max-time 3 -o /dev/null "http://127.0.0.1:$1/v1/config"; }
iceberg_ready() { catalog_ready "$ICEBERG_PORT" && catalog_ready "$ICEBERG_S3_PORT"; }

# start_iceberg: starts the REST catalogs unless running (does not wait).
# Their catalogs (SQLite) and warehouses live in $STATE/iceberg and in the
# store, and survive stop/start. They bind 0.0.0.0 (RESTCatalogServer has no
# host setting).
start_iceberg() {
  ensure_iceberg_rest
  local warehouse
  warehouse="$(iceberg_warehouse_dir)"
  mkdir -p "$warehouse"
  start_catalog iceberg "$ICEBERG_PORT" "file://$warehouse"
  # S3FileIO with the store's keys; the AWS SDK's default checksums are
  # streamed as aws-chunked trailers, which gofakes3 would store verbatim.
  start_catalog iceberg-s3 "$ICEBERG_S3_PORT" "s3://$S3_BUCKET/warehouse" \
    CATALOG_IO__IMPL=org.apache.iceberg.aws.s3.S3FileIO \
    CATALOG_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" \
    CATALOG_S3_PATH__STYLE__ACCESS=true \
    CATALOG_S3_ACCESS__KEY__ID=keystone CATALOG_S3_SECRET__ACCESS__KEY=keystone \
    CATALOG_CLIENT_REGION=us-east-1 AWS_REGION=us-east-1 \
    AWS_REQUEST_CHECKSUM_CALCULATION=when_required \
    AWS_RESPONSE_CHECKSUM_VALIDATION=when_required
}

# start_catalog NAME PORT WAREHOUSE [VAR=VALUE...]: one RESTCatalogServer.
start_catalog() {
  local name="$1" port="$2" warehouse="$3"
  shift 3
  if is_running "$name"; then
    log "$name already running"
    return
  fi
  require_port "$port" "$name REST catalog" "KEYSTONE_TESTBED_$(echo "${name^^}" | tr - _)_PORT"
  local dir="$STATE/$name"
  mkdir -p "$dir/tmp"
  # java.io.tmpdir: sqlite-jdbc unpacks its native library there.
  # CATALOG_CLIENTS=1: one JDBC connection. With the default pool of two,
  # concurrent commits of several sink instances made SQLite answer
  # SQLITE_BUSY, which the server returns as a 500 ("commit state unknown").
  start_proc "$name" env -C "$dir" -u JAVA_TOOL_OPTIONS \
    CATALOG_WAREHOUSE="$warehouse" \
    CATALOG_URI="jdbc:sqlite:file:$dir/catalog.db" \
    CATALOG_JDBC_USER=user CATALOG_JDBC_PASSWORD=password \
    CATALOG_CLIENTS=1 \
    CATALOG_REST_PORT="$port" \
    "$@" \
    java -Xmx256m -XX:TieredStopAtLevel=1 -Djava.io.tmpdir="$dir/tmp" \
    -cp "$ICEBERG_LIBS/*" org.apache.iceberg.rest.RESTCatalogServer
}

wait_iceberg() {
  local deadline=$((SECONDS + 60)) name port
  for name in iceberg iceberg-s3; do
    port="$ICEBERG_PORT"
    [[ "$name" == iceberg-s3 ]] && port="$ICEBERG_S3_PORT"
    until catalog_ready "$port"; do
      is_running "$name" \
        || die "the $name REST catalog exited; see $STATE/logs/$name.log: $(tail -n 3 "$STATE/logs/$name.log" 2>/dev/null)"
      ((SECONDS < deadline)) || die "the $name REST catalog did not answer /v1/config within 60 s; see $STATE/logs/$name.log"
      sleep 0.2
    done
    log "$name REST catalog (http://127.0.0.1:$port) ready"
  done
}

up_iceberg() {
  start_iceberg
  wait_iceberg
}

# ---------------------------------------------------------------- the parts

# up_lake: after start_iceberg (cmd_up starts the JVM early).
up_lake() {
  up_s3
  ensure_lake_python
  wait_iceberg
}

lake_write_env() {
  lake_venv
  echo "export KEYSTONE_TESTBED_S3_PORT='$S3_PORT'"
  echo "export KEYSTONE_TESTBED_S3_ENDPOINT='http://127.0.0.1:$S3_PORT'"
  echo "export KEYSTONE_TESTBED_S3_BUCKET='$S3_BUCKET'"
  echo "export KEYSTONE_GOFAKES3_VERSION='$GOFAKES3_VERSION'"
  echo "export KEYSTONE_TESTBED_ICEBERG_PORT='$ICEBERG_PORT'"
  echo "export KEYSTONE_TESTBED_ICEBERG_URI='http://127.0.0.1:$ICEBERG_PORT'"
  echo "export KEYSTONE_TESTBED_ICEBERG_WAREHOUSE='file://$(iceberg_warehouse_dir)'"
  echo "export KEYSTONE_TESTBED_ICEBERG_S3_PORT='$ICEBERG_S3_PORT'"
  echo "export KEYSTONE_TESTBED_ICEBERG_S3_URI='http://127.0.0.1:$ICEBERG_S3_PORT'"
  echo "export KEYSTONE_TESTBED_ICEBERG_S3_WAREHOUSE='s3://$S3_BUCKET/warehouse'"
  echo "export KEYSTONE_ICEBERG_VERSION='$ICEBERG_VERSION'"
  echo "export KEYSTONE_TESTBED_LAKE_PYTHON='$LAKE_VENV/bin/python'"
  echo "export KEYSTONE_TESTBED_READERS='$REPO/e2e/readers'"
}

lake_pin_env() {
  S3_PORT="${KEYSTONE_TESTBED_S3_PORT:-$S3_PORT}"
  ICEBERG_PORT="${KEYSTONE_TESTBED_ICEBERG_PORT:-$ICEBERG_PORT}"
  ICEBERG_S3_PORT="${KEYSTONE_TESTBED_ICEBERG_S3_PORT:-$ICEBERG_S3_PORT}"
  GOFAKES3_VERSION="${KEYSTONE_GOFAKES3_VERSION:-$GOFAKES3_VERSION}"
  # The catalog and warehouse were written by this version.
  ICEBERG_VERSION="${KEYSTONE_ICEBERG_VERSION:-$ICEBERG_VERSION}"
  lake_paths
}

# lake_status: one line per check; returns non-zero when one fails.
lake_status() {
  local rc=0
  lake_venv
  if s3_ready; then
    echo "s3 bucket $S3_BUCKET       ok (http://127.0.0.1:$S3_PORT, gofakes3 $GOFAKES3_VERSION)"
  else
    echo "s3 bucket $S3_BUCKET       FAILING"; rc=1
  fi
  if catalog_ready "$ICEBERG_PORT"; then
    echo "iceberg /v1/config      ok (http://127.0.0.1:$ICEBERG_PORT, $ICEBERG_VERSION)"
  else
    echo "iceberg /v1/config      FAILING"; rc=1
  fi
  if catalog_ready "$ICEBERG_S3_PORT"; then
    echo "iceberg-s3 /v1/config   ok (http://127.0.0.1:$ICEBERG_S3_PORT, s3://$S3_BUCKET/warehouse)"
  else
    echo "iceberg-s3 /v1/config   FAILING"; rc=1
  fi
  if [[ -f "$LAKE_VENV/.complete" ]]; then
    echo "readers' python         ok ($LAKE_VENV/bin/python)"
  else
    echo "readers' python         MISSING ($LAKE_VENV): run e2e/testbed up"; rc=1
  fi
  return "$rc"
}
