#!/usr/bin/env bash
# Builds the pinned control-plane binaries (kube-apiserver, kubectl, etcd, helm)
# from the wrapper Go modules under hack/tools and caches them outside the clone.
#
#   hack/build-tools.sh          the control plane (etcd, kube-apiserver, kubectl, helm)
#   hack/build-tools.sh --node   also the node's Kubernetes parts: kube-controller-manager,
#                                kube-scheduler and kubelet (same pinned k8s.io/kubernetes)
#
# The cache directory is keyed by a hash of the wrapper modules' go.mod/go.sum
# and of this script (it holds the link flags), so a binary is rebuilt only when
# a pinned version or the way it is built changes. Go's own module and build
# caches are reused between runs.
#
# Prints the directory holding the binaries as its last line of stdout.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="$repo_root/hack/tools"
cache_root="${DEPLOYLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deploylock}"

with_node=false
case "${1:-}" in
  --node) with_node=true ;;
  "") ;;
  *) echo "usage: hack/build-tools.sh [--node]" >&2; exit 2 ;;
esac

key="$(cat "$tools_dir"/*/go.mod "$tools_dir"/*/go.sum "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
bin_dir="$cache_root/tools-$key/bin"
mkdir -p "$bin_dir"

log() { echo "[build-tools] $*" >&2; }

# Serialise concurrent builds (e.g. `make demo` and `make test` started together).
exec 9>"$cache_root/.build.lock"
flock 9

module_version() { # <wrapper dir> <module path>
  (cd "$1" && go list -m -f '{{.Version}}' "$2")
}

module_time() { # <wrapper dir> <module path>
  (cd "$1" && go list -m -f '{{if .Time}}{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' "$2")
}

# Runs `go build -v` and reports progress as a package count, so a cold build
# that takes minutes is visibly alive without printing thousands of lines.
go_build() { # <wrapper dir> <output> <ldflags> <package>
  local dir="$1" out="$2" ldflags="$3" pkg="$4" name start count=0
  name="$(basename "$out")"
  if [[ -x "$out" ]]; then
    return 0
  fi
  log "building $name from $pkg (cold build on 2 cores: several minutes; cached afterwards)"
  start=$SECONDS
  (cd "$dir" && go build -v -trimpath -ldflags "$ldflags" -o "$out.tmp" "$pkg") 2>&1 |
    while IFS= read -r line; do
      count=$((count + 1))
      if ((count % 100 == 0)); then
        log "  $name: $count packages compiled ($((SECONDS - start))s)"
      fi
      # Compiler diagnostics look like "path/file.go:12:3: message" or "# package".
      case "$line" in
        *.go:[0-9]*:* | "# "* | go:\ *) echo "$line" >&2 ;;
      esac
    done
  if [[ ! -x "$out.tmp" ]]; then
    log "FAILED to build $name (see errors above)"
    exit 1
  fi
  mv "$out.tmp" "$out"
  log "built $name in $((SECONDS - start))s"
}

k8s_dir="$tools_dir/kubernetes"
k8s_version="$(module_version "$k8s_dir" k8s.io/kubernetes)"
k8s_time="$(module_time "$k8s_dir" k8s.io/kubernetes)"
k8s_minor="$(echo "$k8s_version" | cut -d. -f2)"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  k8s_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=${k8s_time:-1970-01-01T00:00:00Z}"
done

etcd_dir="$tools_dir/etcd"
helm_dir="$tools_dir/helm"
helm_version="$(module_version "$helm_dir" helm.sh/helm/v3)"
# Upstream's Makefile also stamps the Kubernetes version helm assumes when it
# talks to no cluster (`helm template`, `helm lint`) from its client-go version
# (v0.X.Y -> 1.X); without it helm assumes v1.20 and rejects kubeVersion ">=1.x".
helm_k8s_minor="$(module_version "$helm_dir" k8s.io/client-go | cut -d. -f2)"
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$helm_version"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean -X helm.sh/helm/v3/internal/version.metadata="
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_k8s_minor"
done

go_build "$etcd_dir" "$bin_dir/etcd" "-s -w" go.etcd.io/etcd/server/v3
go_build "$k8s_dir" "$bin_dir/kube-apiserver" "$k8s_ldflags" k8s.io/kubernetes/cmd/kube-apiserver
go_build "$k8s_dir" "$bin_dir/kubectl" "$k8s_ldflags" k8s.io/kubernetes/cmd/kubectl
go_build "$helm_dir" "$bin_dir/helm" "$helm_ldflags" helm.sh/helm/v3/cmd/helm
if $with_node; then
  go_build "$k8s_dir" "$bin_dir/kube-controller-manager" "$k8s_ldflags" k8s.io/kubernetes/cmd/kube-controller-manager
  go_build "$k8s_dir" "$bin_dir/kube-scheduler" "$k8s_ldflags" k8s.io/kubernetes/cmd/kube-scheduler
  go_build "$k8s_dir" "$bin_dir/kubelet" "$k8s_ldflags" k8s.io/kubernetes/cmd/kubelet
fi

echo "$bin_dir"
