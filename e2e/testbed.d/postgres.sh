# shellcheck shell=bash
# The PostgreSQL component of e2e/testbed (sourced by it; uses its log, die,
# cache_lock, proc_starttime, is_running, wait_until, require_port),
# for the change-data (CDC) sources:
#
#   postgres  Debian's PostgreSQL 15 (/usr/lib/postgresql/15/bin, installed
#             with apt when missing), one cluster under $STATE/postgres,
#             wal_level=logical, on 127.0.0.1:$KEYSTONE_TESTBED_POSTGRES_PORT.
#             TCP connections authenticate with scram-sha-256 (normal and
#             replication ones), the unix socket in $STATE/postgres/run
#             trusts everyone. The superuser postgres has password postgres;
#             the role keystone (LOGIN REPLICATION, password keystone) owns
#             the database keystone.
#
# `up --only postgres` starts it; `up` starts it with the rest.

POSTGRES_MAJOR=15
POSTGRES_BIN="/usr/lib/postgresql/$POSTGRES_MAJOR/bin"
POSTGRES_PORT="${KEYSTONE_TESTBED_POSTGRES_PORT:-15432}"
# initdb and the server refuse to run as root: as root, the testbed runs them
# as this system user, which Debian's package creates.
POSTGRES_USER="postgres"
POSTGRES_DB_USER="keystone"
POSTGRES_DB_PASSWORD="keystone"
POSTGRES_DATABASE="keystone"
POSTGRES_ADMIN_PASSWORD="postgres"

# ------------------------------------------------------------------- install

# ensure_postgres: Debian's postgresql-15 unless its server binary is there.
ensure_postgres() {
  [[ -x "$POSTGRES_BIN/postgres" ]] && return
  ((EUID == 0)) || die "PostgreSQL $POSTGRES_MAJOR is not installed ($POSTGRES_BIN/postgres is missing) and installing it needs root: apt-get install -y postgresql-$POSTGRES_MAJOR"
  # Serializes with other testbeds installing it at the same time.
  cache_lock
  if [[ -x "$POSTGRES_BIN/postgres" ]]; then cache_unlock; return; fi
  mkdir -p "$STATE/logs"
  local flog="$STATE/logs/postgres-install.log" t=$SECONDS
  log "installing postgresql-$POSTGRES_MAJOR with apt-get (log: $flog)"
  local -a apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=300)
  # Lists may be missing (a fresh container) or stale: update once and retry.
  if ! "${apt[@]}" install "postgresql-$POSTGRES_MAJOR" >>"$flog" 2>&1; then
    "${apt[@]}" update >>"$flog" 2>&1 || die "apt-get update failed; see $flog"
    "${apt[@]}" install "postgresql-$POSTGRES_MAJOR" >>"$flog" 2>&1 \
      || die "apt-get install -y postgresql-$POSTGRES_MAJOR failed; see $flog"
  fi
  [[ -x "$POSTGRES_BIN/postgres" ]] \
    || die "apt-get installed postgresql-$POSTGRES_MAJOR but $POSTGRES_BIN/postgres is missing; see $flog"
  log "postgresql-$POSTGRES_MAJOR installed in $((SECONDS - t)) s"
  cache_unlock
}

# postgres_as: sets POSTGRES_AS, the command prefix that runs a command as
# the postgres user (empty when not root). setpriv, not runuser, as for
# OpenSearch: it execs instead of forking and goes through no PAM session.
POSTGRES_AS=()
postgres_as() {
  POSTGRES_AS=()
  ((EUID == 0)) || return 0
  id -u "$POSTGRES_USER" >/dev/null 2>&1 \
    || die "no system user $POSTGRES_USER (Debian's postgresql-$POSTGRES_MAJOR creates it): reinstall the package"
  POSTGRES_AS=(setpriv --reuid="$POSTGRES_USER" --regid="$(id -g "$POSTGRES_USER")" --init-groups --)
}

# postgres_reach DIR: lets the postgres user reach DIR, giving o+x (traverse,
# not list) to every ancestor it cannot pass, with a log line for each.
postgres_reach() {
  ((EUID == 0)) || return 0
  local target d part
  local -a parts
  for target in "$1" "$(readlink -f "$1")"; do
    d=""
    IFS=/ read -r -a parts <<<"${target#/}"
    for part in "${parts[@]}"; do
      [[ -n "$part" ]] || continue
      d="$d/$part"
      if ! "${POSTGRES_AS[@]}" test -x "$d" 2>/dev/null; then
        log "chmod o+x $d (so that user $POSTGRES_USER can reach $target)"
        chmod o+x "$d"
      fi
    done
  done
}

# pg CMD ARGS...: a PostgreSQL program as the postgres user, from the
# cluster's folder (the caller's may be unreadable to it) with its HOME there
# and none of the caller's libpq settings.
pg() {
  local prog="$1"
  shift
  "${POSTGRES_AS[@]}" env -C "$STATE/postgres" \
    -u PGDATA -u PGHOST -u PGHOSTADDR -u PGPORT -u PGUSER -u PGDATABASE -u PGPASSWORD \
    -u PGPASSFILE -u PGSERVICE -u PGSERVICEFILE -u PGOPTIONS -u PGSSLMODE \
    HOME="$STATE/postgres" "$POSTGRES_BIN/$prog" "$@"
}

# ----------------------------------------------------------------- the server

postgres_dir() { echo "$STATE/postgres"; }

# The unix socket's folder; a socket path has at most 107 bytes.
postgres_socket_dir() { echo "$STATE/postgres/run"; }

postgres_ready() {
  "$POSTGRES_BIN/pg_isready" -q -h 127.0.0.1 -p "$POSTGRES_PORT" -U "$POSTGRES_USER" -d "$POSTGRES_DATABASE" -t 3
}

# postgres_init: initdb once per state (a half-made cluster is made again).
postgres_init() {
  local dir data
  dir="$(postgres_dir)"
  data="$dir/data"
  [[ -f "$dir/.initdb-complete" ]] && return
  log "initdb of $data (PostgreSQL $POSTGRES_MAJOR)"
  rm -rf "$data"
  mkdir -p "$data"
  chmod 700 "$data"
  # initdb wants the superuser's password when TCP connections need one.
  printf '%s\n' "$POSTGRES_ADMIN_PASSWORD" >"$dir/pwfile"
  chmod 600 "$dir/pwfile"
  if ((EUID == 0)); then chown -R "$POSTGRES_USER:" "$dir"; fi
  pg initdb -D "$data" -U postgres --pwfile="$dir/pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C --no-instructions \
    >>"$STATE/logs/postgres-initdb.log" 2>&1 \
    || die "initdb failed; see $STATE/logs/postgres-initdb.log"
  rm -f "$dir/pwfile"
  # Written whole rather than edited: the unix socket trusts everyone,
  # every TCP connection (normal and replication) needs a password. Pods
  # reach 127.0.0.1 from their 127.N.x.y addresses: all of 127/8 may connect.
  cat >"$data/pg_hba.conf" <<'EOF'
# Written by e2e/testbed (testbed.d/postgres.sh).
# TYPE  DATABASE     USER  ADDRESS        METHOD
local   all          all                  trust
local   replication  all                  trust
host    all          all   127.0.0.1/32   scram-sha-256
host    replication  all   127.0.0.1/32   scram-sha-256
host    all          all   127.0.0.0/8    scram-sha-256
host    replication  all   127.0.0.0/8    scram-sha-256
EOF
  if ((EUID == 0)); then chown "$POSTGRES_USER:" "$data/pg_hba.conf"; fi
  touch "$dir/.initdb-complete"
}

# postgres_setup: the passwords, the keystone role and database (idempotent),
# through the unix socket as the superuser.
postgres_setup() {
  local sql
  sql="$(
    cat <<EOF
ALTER ROLE postgres PASSWORD '$POSTGRES_ADMIN_PASSWORD';
DO \$\$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$POSTGRES_DB_USER') THEN
    CREATE ROLE $POSTGRES_DB_USER LOGIN REPLICATION PASSWORD '$POSTGRES_DB_PASSWORD';
  ELSE
    ALTER ROLE $POSTGRES_DB_USER LOGIN REPLICATION PASSWORD '$POSTGRES_DB_PASSWORD';
  END IF;
END
\$\$;
SELECT 'CREATE DATABASE $POSTGRES_DATABASE OWNER $POSTGRES_DB_USER'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$POSTGRES_DATABASE') \gexec
EOF
  )"
  pg psql -X -q -v ON_ERROR_STOP=1 -h "$(postgres_socket_dir)" -p "$POSTGRES_PORT" -U postgres -d postgres \
    <<<"$sql" >>"$STATE/logs/postgres-setup.log" 2>&1 \
    || die "creating the keystone role and database failed; see $STATE/logs/postgres-setup.log"
}

# up_postgres: initdb once, starts the server unless running (pg_ctl -w waits
# until it accepts connections), makes the roles and the database.
up_postgres() {
  ensure_postgres
  postgres_as
  local dir sock
  dir="$(postgres_dir)"
  sock="$(postgres_socket_dir)"
  mkdir -p "$dir" "$sock" "$STATE/logs" "$STATE/pids"
  ((${#sock} + 16 <= 107)) \
    || die "the unix socket path $sock/.s.PGSQL.$POSTGRES_PORT is too long (107 bytes at most): use a shorter KEYSTONE_TESTBED_STATE"
  if is_running postgres; then
    log "postgres already running"
  else
    require_port "$POSTGRES_PORT" postgres KEYSTONE_TESTBED_POSTGRES_PORT
    if ((EUID == 0)); then
      postgres_reach "$dir"
      chown "$POSTGRES_USER:" "$dir" "$sock"
      # The server appends its output to it (pg_ctl -l) as the postgres user.
      touch "$STATE/logs/postgres.log"
      chown "$POSTGRES_USER:" "$STATE/logs/postgres.log"
    fi
    postgres_init
    # fds 8 and 9 hold the state and cache locks: the server must not keep them.
    # fsync off: a testbed's data need not survive a machine crash.
    pg pg_ctl -D "$dir/data" -l "$STATE/logs/postgres.log" -w -t 60 \
      -o "-p $POSTGRES_PORT -k $sock -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_replication_slots=16 -c max_wal_senders=16 -c shared_buffers=64MB -c fsync=off -c full_page_writes=off" \
      start >>"$STATE/logs/postgres.log" 2>&1 </dev/null 8>&- 9>&- \
      || die "postgres did not start; see $STATE/logs/postgres.log: $(tail -n 3 "$STATE/logs/postgres.log" 2>/dev/null)"
    # The postmaster's pid is the first line of postmaster.pid.
    local pid start
    pid="$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null)"
    start="$(proc_starttime "$pid" 2>/dev/null)" || true
    [[ "$pid" =~ ^[0-9]+$ && -n "$start" ]] \
      || die "postgres started but no live postmaster in $dir/data/postmaster.pid; see $STATE/logs/postgres.log"
    echo "$pid $start" >"$STATE/pids/postgres.pid"
    log "started postgres (pid $pid), log: $STATE/logs/postgres.log"
  fi
  wait_until 30 "postgres (127.0.0.1:$POSTGRES_PORT)" postgres_ready \
    || die "postgres did not accept connections within 30 s; see $STATE/logs/postgres.log"
  postgres_setup
}

# stop_postgres: a fast shutdown (SIGINT: open sessions and replication
# connections are ended, the server checkpoints and exits). stop_proc's
# SIGTERM would be a smart shutdown, which waits for every client to leave.
# SIGKILL after 30 s as a last resort (the server's children notice their
# parent's death and exit).
stop_postgres() {
  local f="$STATE/pids/postgres.pid" pid start i
  [[ -f "$f" ]] || return 0
  read -r pid start <"$f" || true
  if [[ -n "${pid:-}" && "$(proc_starttime "$pid" 2>/dev/null)" == "$start" ]]; then
    log "stopping postgres (pid $pid, fast shutdown)"
    kill -INT "$pid" 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do
      [[ "$(proc_starttime "$pid" 2>/dev/null)" == "$start" ]] || break
      sleep 0.1
    done
    if [[ "$(proc_starttime "$pid" 2>/dev/null)" == "$start" ]]; then
      log "postgres (pid $pid) did not stop within 30 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}

# ---------------------------------------------------------------- the parts

postgres_write_env() {
  echo "export KEYSTONE_TESTBED_POSTGRES_PORT='$POSTGRES_PORT'"
  echo "export KEYSTONE_TESTBED_POSTGRES_HOST='127.0.0.1'"
  echo "export KEYSTONE_TESTBED_POSTGRES_USER='$POSTGRES_DB_USER'"
  echo "export KEYSTONE_TESTBED_POSTGRES_PASSWORD='$POSTGRES_DB_PASSWORD'"
  echo "export KEYSTONE_TESTBED_POSTGRES_DATABASE='$POSTGRES_DATABASE'"
  echo "export KEYSTONE_TESTBED_POSTGRES_ADMIN_URL='postgres://postgres:$POSTGRES_ADMIN_PASSWORD@127.0.0.1:$POSTGRES_PORT/$POSTGRES_DATABASE'"
  # psql, pg_recvlogical, ... of the same version, for tests.
  echo "export KEYSTONE_TESTBED_POSTGRES_BIN='$POSTGRES_BIN'"
}

postgres_pin_env() {
  POSTGRES_PORT="${KEYSTONE_TESTBED_POSTGRES_PORT:-$POSTGRES_PORT}"
}

# postgres_status: one line; returns non-zero when the server does not
# accept connections.
postgres_status() {
  if postgres_ready; then
    echo "postgres pg_isready     ok (127.0.0.1:$POSTGRES_PORT, $("$POSTGRES_BIN/postgres" --version 2>/dev/null | sed 's/^postgres (PostgreSQL) //'))"
  else
    echo "postgres pg_isready     FAILING (127.0.0.1:$POSTGRES_PORT)"
    return 1
  fi
}
