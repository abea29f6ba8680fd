#!/usr/bin/env bash
# S8 (operator part): the operator's RSS and reconcile latency with N Pipelines.
#
# Runs on a separate testbed instance (own state folder and ports: the shared one
# is never touched) whose process kubelet is stopped once the node is Ready, so
# that the N pipelines' pods stay Pending instead of becoming N runtime processes.
# The operator runs as a local process (as e2e/tests/operator_support does) with
# that instance's kubeconfig and the shared testbed's Kafka; all pipelines share
# one source, one sink and one dead-letter topic (1 partition each), deleted at
# the end, so the broker gains three topics, not 2N.
#
# Usage: e2e/bench/s8-operator.sh OPERATOR_BINARY [N]   (prints a JSON summary last)
# Needs: eval "$(e2e/testbed env)" (for KAFKA_BOOTSTRAP_SERVERS and the kube binaries);
# another Kafka: KAFKA_BOOTSTRAP_SERVERS=... KEYSTONE_BENCH_KAFKA_STATE=its testbed state.
# KEYSTONE_BENCH_S8_LOG=FILE keeps the operator's log, KEYSTONE_BENCH_S8_RUST_LOG sets its filter (warn).
set -euo pipefail

OPERATOR="${1:?operator binary}"
N="${2:-1000}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BROKERS="${KAFKA_BOOTSTRAP_SERVERS:?eval \"\$(e2e/testbed env)\" first}"
KUBECTL="$(command -v kubectl || echo "${KEYSTONE_TESTBED_KUBE_BIN:?}/kubectl")"
NS=bench-s8
TB_STATE="${KEYSTONE_BENCH_S8_STATE:-/tmp/keystone-bench-s8-testbed}"
WORK="$(mktemp -d)"

tb() {
  # A testbed instance of its own: other state folder, ports, node name and pod net.
  env -u KUBECONFIG \
    KEYSTONE_TESTBED_STATE="$TB_STATE" \
    KEYSTONE_TESTBED_ETCD_PORT=24790 KEYSTONE_TESTBED_ETCD_PEER_PORT=24800 \
    KEYSTONE_TESTBED_APISERVER_PORT=17443 KEYSTONE_TESTBED_KCM_PORT=17257 \
    KEYSTONE_TESTBED_NODE=keystone-bench-s8 KEYSTONE_TESTBED_POD_NET=77 \
    KEYSTONE_TESTBED_SERVICE_CIDR=10.96.0.0/16 \
    "$REPO/e2e/testbed" "$@"
}

# scripts/kafka reads the testbed env of KEYSTONE_BENCH_KAFKA_STATE when given
# (a Kafka of another testbed instance), else the shared testbed's.
kafka_topics() {
  if [[ -n "${KEYSTONE_BENCH_KAFKA_STATE:-}" ]]; then
    KEYSTONE_TESTBED_STATE="$KEYSTONE_BENCH_KAFKA_STATE" "$REPO/scripts/kafka" topics "$@"
  else
    "$REPO/scripts/kafka" topics "$@"
  fi
}

op_pid=""
cleanup() {
  set +e
  [[ -n "$op_pid" ]] && kill "$op_pid" 2>/dev/null && wait "$op_pid" 2>/dev/null
  tb down >/dev/null 2>&1
  for t in bench.s8.src bench.s8.out bench.s8.dlq; do
    kafka_topics --delete --topic "$t" >/dev/null 2>&1
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "starting a separate testbed instance (kube only) in $TB_STATE" >&2
tb up --only kube >&2
KCFG="$TB_STATE/kube/kubeconfig"
# Stop this instance's process kubelet: pods stay Pending, no runtime processes.
kubelet_pid="$(cut -d' ' -f1 "$TB_STATE/pids/kubelet.pid")"
kill "$kubelet_pid"
echo "stopped the instance's kubelet (pid $kubelet_pid)" >&2

k() { "$KUBECTL" --kubeconfig "$KCFG" "$@"; }
k apply -f "$REPO/config/crd/bases/" >&2
k create namespace "$NS" >&2
k create namespace keystone-system >&2
for t in bench.s8.src bench.s8.out bench.s8.dlq; do
  kafka_topics --create --if-not-exists --topic "$t" --partitions 1 >&2
done

metrics_port=$(python3 -c "import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); print(s.getsockname()[1])")
KUBECONFIG="$KCFG" KAFKA_BOOTSTRAP_SERVERS="$BROKERS" WATCH_NAMESPACES="$NS" \
  POD_NAMESPACE=keystone-system POD_NAME=bench-s8-operator \
  KEYSTONE_LEASE_NAME=keystone-operator KEYSTONE_LEADER_ELECT=false \
  KEYSTONE_METRICS_ADDR="127.0.0.1:$metrics_port" KEYSTONE_RUNTIME_IMAGE=keystone/runtime:bench-s8 \
  RUST_LOG="${KEYSTONE_BENCH_S8_RUST_LOG:-warn}" "$OPERATOR" >"$WORK/operator.log" 2>&1 &
op_pid=$!
sleep 3
kill -0 "$op_pid" || { cat "$WORK/operator.log" >&2; exit 1; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$op_pid/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$op_pid/status"; }
rss_idle=$(rss_kib)

# N pipelines: filter -> sink, all on the shared topics.
for i in $(seq 1 "$N"); do
  cat <<EOF
---
apiVersion: keystone.dev/v1alpha1
kind: Pipeline
metadata: {name: p$i, namespace: $NS}
spec:
  source:
    topic: bench.s8.src
    schema:
      fields:
        - {name: id, type: string}
        - {name: num, type: integer}
  steps:
    - name: big
      filter: {expression: 'num > $i'}
  sinks:
    - name: out
      kafka: {topic: bench.s8.out}
  deadLetter: {topic: bench.s8.dlq}
EOF
done >"$WORK/pipelines.yaml"

metric() {
  curl -fsS "http://127.0.0.1:$metrics_port/metrics" | awk -v m="$1" '$1 == m {print $2}' | head -1
}
# Until the reconcile count stays the same for 5 s (at most 150 s).
wait_still() {
  local prev=-1 c
  for _ in $(seq 1 30); do
    c=$(metric keystone_operator_reconcile_duration_seconds_count || echo 0)
    [[ "$c" == "$prev" ]] && break
    prev="$c"
    sleep 5
  done
}
start=$(date +%s.%N)
k apply --server-side -f "$WORK/pipelines.yaml" >/dev/null
applied=$(date +%s.%N)
echo "applied $N pipelines in $(echo "$applied - $start" | bc) s" >&2

# Wait until every pipeline has a phase (10 min, and 1 min more per 1,000
# Pipelines), then until the reconcile count is still.
deadline=$((SECONDS + 600 + N * 60 / 1000))
while :; do
  phased=$(k get pipelines -n "$NS" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c . || true)
  ((phased >= N)) && break
  ((SECONDS > deadline)) && { echo "only $phased of $N pipelines have a phase" >&2; break; }
  sleep 2
done
all_phased=$(date +%s.%N)
wait_still
rss_steady=$(rss_kib)
hwm=$(hwm_kib)
curl -fsS "http://127.0.0.1:$metrics_port/metrics" >"$WORK/metrics.txt"
phases=$(k get pipelines -n "$NS" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | sort | uniq -c | awk '{printf "%s%s:%s", (NR>1?",":""), $2, $1}')

# p50/p99 of the reconciles between two scrapes (bucket counts of AFTER minus
# BEFORE; BEFORE may be /dev/null), interpolated within buckets as Prometheus'
# histogram_quantile does. Prints "p50 p99 count".
quantiles() {
  awk '
    /^keystone_operator_reconcile_duration_seconds_bucket/ {
      match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5)
      if (le == "+Inf") le = 1e9
      le += 0; les[le] = 1
      if (FILENAME == ARGV[1]) before[le] += $2; else after[le] += $2
    }
    END {
      n = 0; for (l in les) b[n++] = l + 0
      for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (b[j] < b[i]) { t = b[i]; b[i] = b[j]; b[j] = t }
      for (i = 0; i < n; i++) c[i] = after[b[i]] - before[b[i]]
      total = c[n - 1]
      split("0.5 0.99", qs, " ")
      for (k = 1; k <= 2; k++) {
        rank = qs[k] * total; pb = 0; pc = 0
        for (i = 0; i < n; i++) {
          if (c[i] >= rank) {
            v = (b[i] >= 1e9) ? pb : pb + (b[i] - pb) * (rank - pc) / ((c[i] - pc) > 0 ? (c[i] - pc) : 1)
            printf "%s%.4f", (k > 1 ? " " : ""), v; break
          }
          pb = b[i]; pc = c[i]
        }
      }
      printf " %d\n", total
    }' "$1" "$2"
}
quantiles /dev/null "$WORK/metrics.txt" >"$WORK/q1"
read -r p50 p99 reconciles <"$WORK/q1"
buckets=$(grep '^keystone_operator_reconcile_duration_seconds_bucket' "$WORK/metrics.txt" | sed 's/"/\\"/g' | tr '\n' ';')
# Edits at steady state: change the filter of EDITS pipelines one after another
# (a new generation: a full reconcile that rolls the Deployment), as a user does.
EDITS="${KEYSTONE_BENCH_S8_EDITS:-200}"
edit_start=$(date +%s.%N)
for i in $(seq 1 "$EDITS"); do
  k patch pipeline "p$i" -n "$NS" --type json \
    -p "[{\"op\":\"replace\",\"path\":\"/spec/steps/0/filter/expression\",\"value\":\"num >= $i\"}]" >/dev/null
done
edit_s=$(echo "$(date +%s.%N) - $edit_start" | bc)
wait_still
curl -fsS "http://127.0.0.1:$metrics_port/metrics" >"$WORK/metrics2.txt"
read -r edit_p50 edit_p99 edit_reconciles < <(quantiles "$WORK/metrics.txt" "$WORK/metrics2.txt")
rss_after_edits=$(rss_kib)
hwm=$(hwm_kib)
errors=$(grep -c -i '"level":"ERROR"\|ERROR' "$WORK/operator.log" || true)
# The operator's log is kept where KEYSTONE_BENCH_S8_LOG says (it is otherwise removed).
[[ -n "${KEYSTONE_BENCH_S8_LOG:-}" ]] && cp "$WORK/operator.log" "$KEYSTONE_BENCH_S8_LOG"

k delete pipelines -n "$NS" --all --wait=false >/dev/null 2>&1 || true
sleep 5

cat <<EOF
{"pipelines": $N, "operator_rss_idle_mib": $(echo "scale=1; $rss_idle/1024" | bc), "operator_rss_steady_mib": $(echo "scale=1; $rss_steady/1024" | bc), "operator_peak_rss_mib": $(echo "scale=1; $hwm/1024" | bc), "reconcile_p50_s": $p50, "reconcile_p99_s": $p99, "reconciles": $reconciles, "apply_s": $(echo "$applied - $start" | bc), "all_phased_after_s": $(echo "$all_phased - $start" | bc), "phases": "$phases", "operator_log_error_lines": $errors, "edits": $EDITS, "edit_s": $edit_s, "edit_reconcile_p50_s": $edit_p50, "edit_reconcile_p99_s": $edit_p99, "edit_reconciles": $edit_reconciles, "operator_rss_after_edits_mib": $(echo "scale=1; $rss_after_edits/1024" | bc), "histogram": "$buckets"}
EOF
