#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kube-controller-manager from the
# k8s.io/kubernetes Go module into $1 (a cache folder named by version).
#
# k8s.io/kubernetes's go.mod requires its ~30 staging modules at v0.0.0 and
# maps them with `replace => ./staging/...`, which a dependent module ignores.
# So we generate a throwaway wrapper module that replaces each of them with the
# published v0.<minor>.<patch>. The list is read from the published go.mod, not
# hard-coded, because minors add modules.
set -euo pipefail

KUBE_VERSION="${KUBE_VERSION:?}"          # e.g. v1.36.3
OUT="${1:?usage: build-kube.sh OUT_DIR}"
minor_patch="${KUBE_VERSION#v1.}"         # 36.3
minor="${minor_patch%%.*}"                # 36
staging_version="v0.${minor_patch}"       # v0.36.3

# 1.36 builds with the installed Go 1.26. Later minors pull
# structured-merge-diff/v7, which needs Go 1.27: set KEYSTONE_GOTOOLCHAIN=go1.27.3
# (or GOTOOLCHAIN=auto) and the go command fetches that toolchain from the
# module proxy.
export GOTOOLCHAIN="${KEYSTONE_GOTOOLCHAIN:-${GOTOOLCHAIN:-local}}"
export GOFLAGS="-mod=mod -buildvcs=false"

work="$OUT.build"
rm -rf "$work"
mkdir -p "$work"
cd "$work"

gomod="$(go mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -f "$gomod" ]] || { echo "cannot find go.mod of k8s.io/kubernetes@${KUBE_VERSION}" >&2; exit 1; }

go mod init keystone.local/kube-wrapper >/dev/null 2>&1
# Same go directive as upstream so the toolchain choice matches.
upstream_go="$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")"
[[ -n "$upstream_go" ]] && go mod edit -go="$upstream_go"

# Every `k8s.io/X v0.0.0` requirement is a staging module.
staging=$(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1} $1=="require" && $2 ~ /^k8s\.io\// && $3 == "v0.0.0" {print $2}' "$gomod" | sort -u)
[[ -n "$staging" ]] || { echo "no staging modules found in $gomod" >&2; exit 1; }
for m in $staging; do
  go mod edit -replace="${m}=${m}@${staging_version}"
done
# Upstream also pins some third-party modules via replace; keep those too.
awk '/^replace \(/{inblock=1; next} inblock && /^\)/{inblock=0} inblock && $2 == "=>" && $1 !~ /^k8s\.io\// && $3 !~ /^\./ {print $1"="$3"@"$4}' "$gomod" |
  while read -r r; do go mod edit -replace="$r"; done
go mod edit -require="k8s.io/kubernetes@${KUBE_VERSION}"

cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3/etcdmain"
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)
GO
mkdir -p cmd/etcd
cat > cmd/etcd/main.go <<'GO'
// etcd's own server/main.go is package main of a module root; reproduce it.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO

echo "== go mod tidy ($(go version))"
go mod tidy

ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${KUBE_VERSION} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor} -X k8s.io/component-base/version.gitTreeState=clean"
mkdir -p "$work/bin"
export CGO_ENABLED=0
echo "== build etcd"
go build -trimpath -ldflags "-s -w" -o "$work/bin/etcd" ./cmd/etcd
for c in kube-apiserver kube-controller-manager; do
  echo "== build $c"
  go build -trimpath -ldflags "$ldflags" -o "$work/bin/$c" "k8s.io/kubernetes/cmd/$c"
done

# Publish atomically: a half-built cache folder would be trusted next time.
rm -rf "$OUT"
mkdir -p "$OUT"
mv "$work/bin" "$OUT/bin"
cp go.mod go.sum "$OUT/"
rm -rf "$work"
echo "== done: $OUT/bin"
