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
# Needs: eval "$(e2e/testbed env)" (for KAFKA_BOOTSTRAP_SERVERS and the kube binaries).
set -euo pipefail

OPERATOR="${1:?operator binary}"
N="${2:-1000}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BROKERS="${KAFKA_BOOTSTRAP_SERVERS:?eval \"\$(e2e/testbed env)\" first}"
KUBECTL="${KEYSTONE_TESTBED_KUBE_BIN:?}/kubectl"
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
    "$REPO/e2e/testbed" "$@"
}

kafka_topics() { "$REPO/scripts/kafka" topics "$@"; }

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

metrics_port=$((20000 + RANDOM % 10000))
KUBECONFIG="$KCFG" KAFKA_BOOTSTRAP_SERVERS="$BROKERS" WATCH_NAMESPACES="$NS" \
  POD_NAMESPACE=keystone-system POD_NAME=bench-s8-operator \
  KEYSTONE_LEASE_NAME=keystone-operator KEYSTONE_LEADER_ELECT=false \
  KEYSTONE_METRICS_ADDR="127.0.0.1:$metrics_port" KEYSTONE_RUNTIME_IMAGE=keystone/runtime:bench-s8 \
  RUST_LOG=warn "$OPERATOR" >"$WORK/operator.log" 2>&1 &
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
        - {name: n, type: integer}
  steps:
    - name: big
      filter: {expression: 'n > $i'}
  sinks:
    - name: out
      kafka: {topic: bench.s8.out}
  deadLetter: {topic: bench.s8.dlq}
EOF
done >"$WORK/pipelines.yaml"

metric() {
  curl -fsS "http://127.0.0.1:$metrics_port/metrics" | awk -v m="$1" '$1 == m {print $2}' | head -1
}
start=$(date +%s.%N)
k apply --server-side -f "$WORK/pipelines.yaml" >/dev/null
applied=$(date +%s.%N)
echo "applied $N pipelines in $(echo "$applied - $start" | bc) s" >&2

# Wait until every pipeline has a phase, then until the reconcile count is still.
deadline=$((SECONDS + 600))
while :; do
  phased=$(k get pipelines -n "$NS" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c . || true)
  ((phased >= N)) && break
  ((SECONDS > deadline)) && { echo "only $phased of $N pipelines have a phase" >&2; break; }
  sleep 2
done
all_phased=$(date +%s.%N)
prev=-1
for _ in $(seq 1 30); do
  c=$(metric keystone_operator_reconcile_duration_seconds_count || echo 0)
  [[ "$c" == "$prev" ]] && break
  prev="$c"
  sleep 5
done
rss_steady=$(rss_kib)
hwm=$(hwm_kib)
curl -fsS "http://127.0.0.1:$metrics_port/metrics" >"$WORK/metrics.txt"
phases=$(k get pipelines -n "$NS" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | sort | uniq -c | awk '{printf "%s%s:%s", (NR>1?",":""), $2, $1}')

# p50/p99 from the histogram, interpolated within buckets as histogram_quantile does.
quantiles=$(awk '
  /^keystone_operator_reconcile_duration_seconds_bucket/ {
    match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5)
    if (le == "+Inf") le = 1e9
    sum[le] += $2; les[le] = 1
  }
  END {
    n = 0; for (l in les) { b[n++] = l + 0 }
    for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (b[j] < b[i]) { t = b[i]; b[i] = b[j]; b[j] = t }
    total = sum[b[n-1]] + 0
    # sum[] is keyed by the text of le; rebuild counts by value
    for (l in les) c[l + 0] = sum[l]
    split("0.5 0.99", qs, " ")
    for (k = 1; k <= 2; k++) {
      rank = qs[k] * total; prevb = 0; prevc = 0
      for (i = 0; i < n; i++) {
        if (c[b[i]] >= rank) {
          v = (b[i] >= 1e9) ? prevb : prevb + (b[i] - prevb) * (rank - prevc) / ((c[b[i]] - prevc) > 0 ? (c[b[i]] - prevc) : 1)
          printf "%s%.4f", (k > 1 ? " " : ""), v; break
        }
        prevb = b[i]; prevc = c[b[i]]
      }
    }
    printf " %d\n", total
  }' "$WORK/metrics.txt")
read -r p50 p99 reconciles <<<"$quantiles"
buckets=$(grep '^keystone_operator_reconcile_duration_seconds_bucket' "$WORK/metrics.txt" | tr '\n' ';')
errors=$(grep -c -i '"level":"ERROR"\|ERROR' "$WORK/operator.log" || true)

k delete pipelines -n "$NS" --all --wait=false >/dev/null 2>&1 || true
sleep 5

cat <<EOF
{"pipelines": $N, "operator_rss_idle_mib": $(echo "scale=1; $rss_idle/1024" | bc), "operator_rss_steady_mib": $(echo "scale=1; $rss_steady/1024" | bc), "operator_peak_rss_mib": $(echo "scale=1; $hwm/1024" | bc), "reconcile_p50_s": $p50, "reconcile_p99_s": $p99, "reconciles": $reconciles, "apply_s": $(echo "$applied - $start" | bc), "all_phased_after_s": $(echo "$all_phased - $start" | bc), "phases": "$phases", "operator_log_error_lines": $errors, "histogram": "$buckets"}
EOF
