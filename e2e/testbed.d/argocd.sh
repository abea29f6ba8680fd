# shellcheck shell=bash
# The Argo CD component of e2e/testbed (sourced by it; uses its log, die,
# cache_lock, start_proc, stop_proc, is_running, wait_until, require_port),
# for the GitOps tests (e2e/tests/gitops.rs):
#
#   argocd  Argo CD's repo-server, application controller and ApplicationSet
#           controller as local processes against the testbed's API server
#           (ARGOCD_FAKE_IN_CLUSTER maps kubernetes.default.svc to the
#           kubeconfig), Redis from apt on loopback, Argo CD's CRDs and
#           config in the namespace argocd with Keystone's health checks
#           (config/argocd/argocd-cm.yaml) merged into argocd-cm, and a
#           `default` AppProject. Built from the Go module proxy (about 11 min
#           cold on two cores; it needs Go 1.27) and cached by version.
#
# `up --with argocd` starts it after the rest (it needs kube).

ARGOCD_VERSION="${KEYSTONE_ARGOCD_VERSION:-v3.6.1}"
# Argo CD 3.6 needs a newer Go than the machine's; the proxy serves this one.
ARGOCD_GOTOOLCHAIN="${KEYSTONE_ARGOCD_GOTOOLCHAIN:-go1.27.3}"
ARGOCD_REDIS_PORT="${KEYSTONE_TESTBED_ARGOCD_REDIS_PORT:-16379}"
ARGOCD_REPO_PORT="${KEYSTONE_TESTBED_ARGOCD_REPO_PORT:-18081}"
ARGOCD_REPO_METRICS_PORT="${KEYSTONE_TESTBED_ARGOCD_REPO_METRICS_PORT:-18084}"
ARGOCD_CONTROLLER_METRICS_PORT="${KEYSTONE_TESTBED_ARGOCD_CONTROLLER_METRICS_PORT:-18082}"
ARGOCD_APPSET_METRICS_PORT="${KEYSTONE_TESTBED_ARGOCD_APPSET_METRICS_PORT:-18085}"
ARGOCD_APPSET_PROBE_PORT="${KEYSTONE_TESTBED_ARGOCD_APPSET_PROBE_PORT:-18086}"
ARGOCD_APPSET_WEBHOOK_PORT="${KEYSTONE_TESTBED_ARGOCD_APPSET_WEBHOOK_PORT:-18087}"
# Seconds between two refreshes of an app from git (Argo CD's default is 180).
ARGOCD_RESYNC="${KEYSTONE_TESTBED_ARGOCD_RESYNC:-10}"
ARGOCD_NAMESPACE=argocd

argocd_paths() {
  ARGOCD_DIR="$CACHE/argocd-$ARGOCD_VERSION"
  ARGOCD_BIN="$ARGOCD_DIR/bin"
}
argocd_paths

argocd_built() { [[ -x "$ARGOCD_BIN/argocd" && -d "$ARGOCD_DIR/manifests/crds" ]]; }

# ensure_argocd: builds the one argocd binary (every Argo CD program is it,
# under another name) and keeps the manifests and wrapper scripts of the
# same version beside it.
ensure_argocd() {
  argocd_built && return
  cache_lock
  if argocd_built; then cache_unlock; return; fi
  local flog="$CACHE/argocd-$ARGOCD_VERSION.build.log" t=$SECONDS tmp="$ARGOCD_DIR.tmp"
  log "building Argo CD $ARGOCD_VERSION from the Go module proxy into $ARGOCD_DIR (about 11 min cold; log: $flog)"
  rm -rf "$tmp"
  (
    set -euo pipefail
    export GOTOOLCHAIN="$ARGOCD_GOTOOLCHAIN" GOFLAGS=-mod=mod CGO_ENABLED=0
    cd "$CACHE"
    local module engine
    module="$(go mod download -json "github.com/argoproj/argo-cd/v3@$ARGOCD_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
    engine="$(go mod download -json "github.com/argoproj/argo-cd/gitops-engine/v3@$ARGOCD_VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')"
    [[ -d "$module" && -d "$engine" ]] || { echo "go mod download gave no folder"; exit 1; }
    mkdir -p "$tmp/bin"
    cp -r "$module" "$tmp/src"
    chmod -R u+w "$tmp/src"
    # The module's go.mod replaces gitops-engine with ./gitops-engine.
    cp -r "$engine" "$tmp/src/gitops-engine"
    chmod -R u+w "$tmp/src/gitops-engine"
    (cd "$tmp/src" && nice -n 10 go build -trimpath -buildvcs=false -ldflags "-s -w" -o "$tmp/bin/argocd" ./cmd)
    local name
    for name in argocd-repo-server argocd-application-controller argocd-applicationset-controller argocd-server argocd-git-ask-pass; do
      ln -s argocd "$tmp/bin/$name"
    done
    # The repo-server runs these even with GPG off.
    cp "$tmp/src/hack/git-verify-wrapper.sh" "$tmp/src/hack/gpg-wrapper.sh" "$tmp/bin/"
    chmod +x "$tmp/bin/"*.sh
    mkdir -p "$tmp/manifests"
    cp -r "$tmp/src/manifests/crds" "$tmp/manifests/crds"
    cp -r "$tmp/src/manifests/base/config" "$tmp/manifests/config"
    rm -rf "$tmp/src"
  ) >"$flog" 2>&1 || { cache_unlock; die "Argo CD build failed; see $flog"; }
  mv "$tmp" "$ARGOCD_DIR"
  log "Argo CD $ARGOCD_VERSION built in $((SECONDS - t)) s"
  cache_unlock
}

# ensure_redis: Debian's redis-server unless it is there.
ensure_redis() {
  command -v redis-server >/dev/null && return
  ((EUID == 0)) || die "redis-server is not installed and installing it needs root: apt-get install -y redis-server"
  cache_lock
  if command -v redis-server >/dev/null; then cache_unlock; return; fi
  local flog="$CACHE/redis-install.log"
  log "installing redis-server with apt-get (log: $flog)"
  local -a apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=300)
  if ! "${apt[@]}" install redis-server >>"$flog" 2>&1; then
    "${apt[@]}" update >>"$flog" 2>&1 || { cache_unlock; die "apt-get update failed; see $flog"; }
    "${apt[@]}" install redis-server >>"$flog" 2>&1 || { cache_unlock; die "apt-get install -y redis-server failed; see $flog"; }
  fi
  # Debian's package starts a system service on 6379: the testbed runs its own.
  if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
    systemctl stop redis-server >>"$flog" 2>&1 || true
  fi
  cache_unlock
}

argocd_env() {
  local scratch="$STATE/argocd"
  mkdir -p "$scratch/tls" "$scratch/ssh" "$scratch/gnupg" "$scratch/tmp"
  chmod 700 "$scratch/gnupg"
  echo env \
    "PATH=$ARGOCD_BIN:$HELM_BIN:$PATH" \
    "KUBECONFIG=$STATE/kube/kubeconfig" \
    ARGOCD_FAKE_IN_CLUSTER=true \
    ARGOCD_GPG_ENABLED=false \
    "ARGOCD_TLS_DATA_PATH=$scratch/tls" \
    "ARGOCD_SSH_DATA_PATH=$scratch/ssh" \
    "ARGOCD_GNUPGHOME=$scratch/gnupg" \
    "TMPDIR=$scratch/tmp" \
    "HOME=$scratch"
}

redis_ready() { [[ "$(redis-cli -p "$ARGOCD_REDIS_PORT" ping 2>/dev/null)" == PONG ]]; }
argocd_repo_ready() { curl -sf --max-time 3 "http://127.0.0.1:$ARGOCD_REPO_METRICS_PORT/metrics" >/dev/null; }
argocd_controller_ready() { curl -sf --max-time 3 "http://127.0.0.1:$ARGOCD_CONTROLLER_METRICS_PORT/metrics" >/dev/null; }
argocd_appset_ready() { curl -sf --max-time 3 "http://127.0.0.1:$ARGOCD_APPSET_METRICS_PORT/metrics" >/dev/null; }

# The objects Argo CD needs in the cluster: its CRDs, its config with
# Keystone's health checks, and the default project.
argocd_objects() {
  local kubectl=(kubectl --kubeconfig "$STATE/kube/kubeconfig")
  {
    "${kubectl[@]}" apply --server-side --force-conflicts -k "$ARGOCD_DIR/manifests/crds"
    "${kubectl[@]}" wait --for condition=Established --timeout 60s \
      crd/applications.argoproj.io crd/applicationsets.argoproj.io crd/appprojects.argoproj.io
    "${kubectl[@]}" create namespace "$ARGOCD_NAMESPACE" --dry-run=client -o yaml | "${kubectl[@]}" apply -f -
    "${kubectl[@]}" apply -n "$ARGOCD_NAMESPACE" -k "$ARGOCD_DIR/manifests/config"
    # Keystone's health checks, merged into Argo CD's own argocd-cm.
    "${kubectl[@]}" patch -n "$ARGOCD_NAMESPACE" configmap argocd-cm --type merge \
      --patch-file "$REPO/config/argocd/argocd-cm.yaml"
    "${kubectl[@]}" apply -n "$ARGOCD_NAMESPACE" -f - <<EOF
apiVersion: argoproj.io/v1alpha1
kind: AppProject
metadata:
  name: default
  namespace: $ARGOCD_NAMESPACE
spec:
  sourceRepos: ["*"]
  destinations: [{server: "*", namespace: "*"}]
  clusterResourceWhitelist: [{group: "*", kind: "*"}]
EOF
  } >>"$STATE/logs/argocd-objects.log" 2>&1 || die "installing Argo CD's objects failed; see $STATE/logs/argocd-objects.log"
}

up_argocd() {
  has kube || die "argocd needs kube: e2e/testbed up --with argocd starts both"
  ensure_redis
  ensure_argocd
  local -a env
  read -r -a env <<<"$(argocd_env)"
  if ! is_running argocd-redis; then
    require_port "$ARGOCD_REDIS_PORT" argocd-redis KEYSTONE_TESTBED_ARGOCD_REDIS_PORT
    start_proc argocd-redis redis-server --port "$ARGOCD_REDIS_PORT" --bind 127.0.0.1 \
      --save "" --appendonly no --dir "$STATE/argocd"
  fi
  wait_until 30 "argocd redis" redis_ready || die "redis did not start; see $STATE/logs/argocd-redis.log"
  argocd_objects
  if ! is_running argocd-repo-server; then
    require_port "$ARGOCD_REPO_PORT" argocd-repo-server KEYSTONE_TESTBED_ARGOCD_REPO_PORT
    start_proc argocd-repo-server "${env[@]}" "$ARGOCD_BIN/argocd-repo-server" \
      --address 127.0.0.1 --port "$ARGOCD_REPO_PORT" --metrics-address 127.0.0.1 \
      --metrics-port "$ARGOCD_REPO_METRICS_PORT" --redis "127.0.0.1:$ARGOCD_REDIS_PORT" \
      --revision-cache-expiration 5s
  fi
  if ! is_running argocd-application-controller; then
    start_proc argocd-application-controller "${env[@]}" "$ARGOCD_BIN/argocd-application-controller" \
      --kubeconfig "$STATE/kube/kubeconfig" --namespace "$ARGOCD_NAMESPACE" \
      --repo-server "127.0.0.1:$ARGOCD_REPO_PORT" \
      --redis "127.0.0.1:$ARGOCD_REDIS_PORT" --metrics-port "$ARGOCD_CONTROLLER_METRICS_PORT" \
      --app-resync "$ARGOCD_RESYNC" --app-resync-jitter 0 \
      --persist-resource-health
  fi
  if ! is_running argocd-applicationset-controller; then
    start_proc argocd-applicationset-controller "${env[@]}" "$ARGOCD_BIN/argocd-applicationset-controller" \
      --kubeconfig "$STATE/kube/kubeconfig" --namespace "$ARGOCD_NAMESPACE" \
      --argocd-repo-server "127.0.0.1:$ARGOCD_REPO_PORT" \
      --metrics-addr "127.0.0.1:$ARGOCD_APPSET_METRICS_PORT" \
      --probe-addr "127.0.0.1:$ARGOCD_APPSET_PROBE_PORT" \
      --webhook-addr "127.0.0.1:$ARGOCD_APPSET_WEBHOOK_PORT" \
      --enable-leader-election=false --policy sync
  fi
  wait_until 60 "argocd repo-server" argocd_repo_ready || die "the repo-server did not start; see $STATE/logs/argocd-repo-server.log"
  wait_until 60 "argocd application controller" argocd_controller_ready || die "the application controller did not start; see $STATE/logs/argocd-application-controller.log"
  wait_until 60 "argocd applicationset controller" argocd_appset_ready || die "the ApplicationSet controller did not start; see $STATE/logs/argocd-applicationset-controller.log"
}

stop_argocd() {
  stop_proc argocd-applicationset-controller
  stop_proc argocd-application-controller
  stop_proc argocd-repo-server
  stop_proc argocd-redis
}

argocd_status() {
  local rc=0 name
  for name in argocd-redis argocd-repo-server argocd-application-controller argocd-applicationset-controller; do
    if is_running "$name"; then
      printf '%-24s running (pid %s)\n' "$name" "$(cut -d' ' -f1 "$STATE/pids/$name.pid")"
    else
      printf '%-24s DOWN\n' "$name"
      rc=1
    fi
  done
  return "$rc"
}

argocd_write_env() {
  echo "export KEYSTONE_ARGOCD_VERSION='$ARGOCD_VERSION'"
  echo "export KEYSTONE_TESTBED_ARGOCD_NAMESPACE='$ARGOCD_NAMESPACE'"
  echo "export KEYSTONE_TESTBED_ARGOCD_RESYNC='$ARGOCD_RESYNC'"
  echo "export KEYSTONE_TESTBED_ARGOCD_REDIS_PORT='$ARGOCD_REDIS_PORT'"
  echo "export KEYSTONE_TESTBED_ARGOCD_REPO_PORT='$ARGOCD_REPO_PORT'"
  echo "export KEYSTONE_TESTBED_ARGOCD_REPO_METRICS_PORT='$ARGOCD_REPO_METRICS_PORT'"
  echo "export KEYSTONE_TESTBED_ARGOCD_CONTROLLER_METRICS_PORT='$ARGOCD_CONTROLLER_METRICS_PORT'"
  echo "export KEYSTONE_TESTBED_ARGOCD_APPSET_METRICS_PORT='$ARGOCD_APPSET_METRICS_PORT'"
  echo "export KEYSTONE_TESTBED_ARGOCD_APPSET_PROBE_PORT='$ARGOCD_APPSET_PROBE_PORT'"
  echo "export KEYSTONE_TESTBED_ARGOCD_APPSET_WEBHOOK_PORT='$ARGOCD_APPSET_WEBHOOK_PORT'"
  echo "export KEYSTONE_TESTBED_ARGOCD_BIN='$ARGOCD_BIN'"
}

argocd_pin_env() {
  ARGOCD_VERSION="${KEYSTONE_ARGOCD_VERSION:-$ARGOCD_VERSION}"
  ARGOCD_RESYNC="${KEYSTONE_TESTBED_ARGOCD_RESYNC:-$ARGOCD_RESYNC}"
  ARGOCD_REDIS_PORT="${KEYSTONE_TESTBED_ARGOCD_REDIS_PORT:-$ARGOCD_REDIS_PORT}"
  ARGOCD_REPO_PORT="${KEYSTONE_TESTBED_ARGOCD_REPO_PORT:-$ARGOCD_REPO_PORT}"
  ARGOCD_REPO_METRICS_PORT="${KEYSTONE_TESTBED_ARGOCD_REPO_METRICS_PORT:-$ARGOCD_REPO_METRICS_PORT}"
  ARGOCD_CONTROLLER_METRICS_PORT="${KEYSTONE_TESTBED_ARGOCD_CONTROLLER_METRICS_PORT:-$ARGOCD_CONTROLLER_METRICS_PORT}"
  ARGOCD_APPSET_METRICS_PORT="${KEYSTONE_TESTBED_ARGOCD_APPSET_METRICS_PORT:-$ARGOCD_APPSET_METRICS_PORT}"
  ARGOCD_APPSET_PROBE_PORT="${KEYSTONE_TESTBED_ARGOCD_APPSET_PROBE_PORT:-$ARGOCD_APPSET_PROBE_PORT}"
  ARGOCD_APPSET_WEBHOOK_PORT="${KEYSTONE_TESTBED_ARGOCD_APPSET_WEBHOOK_PORT:-$ARGOCD_APPSET_WEBHOOK_PORT}"
  argocd_paths
}
