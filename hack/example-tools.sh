#!/usr/bin/env bash
# Builds the tools the examples run under, from their Go modules at the
# versions pinned by the wrapper modules under hack/example-tools, and caches
# them outside the clone:
#
#   hack/example-tools.sh kustomize-controller   Flux's kustomize-controller (the Flux example
#                                                runs against it, as a host process)
#   hack/example-tools.sh act                    nektos/act (runs the GitHub Actions workflow
#                                                locally, in host mode)
#   hack/example-tools.sh kubectl-static         the pinned kubectl (hack/tools/kubernetes) as
#                                                upstream releases it, CGO_ENABLED=0: static,
#                                                for the Flux example's image (FROM scratch)
#
# The cache directory is keyed by a hash of the wrapper modules and of this
# script, apart from hack/build-tools.sh's, so that pinning a new example tool
# does not rebuild the control plane. Go's module and build caches are reused.
#
# Prints the path of the binary as its last line of stdout.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="$repo_root/hack/example-tools"
cache_root="${DEPLOYLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deploylock}"

log() { echo "[example-tools] $*" >&2; }

case "${1:-}" in
  kustomize-controller) wrapper=flux package=github.com/fluxcd/kustomize-controller ;;
  act) wrapper=act package=github.com/nektos/act ;;
  kubectl-static) wrapper=../tools/kubernetes package=k8s.io/kubernetes/cmd/kubectl ;;
  *)
    echo "usage: hack/example-tools.sh kustomize-controller|act|kubectl-static" >&2
    exit 2
    ;;
esac
name="$1"

key="$(cat "$tools_dir"/*/go.mod "$tools_dir"/*/go.sum "$repo_root"/hack/tools/kubernetes/go.mod \
  "$repo_root"/hack/tools/kubernetes/go.sum "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
bin_dir="$cache_root/example-tools-$key/bin"
out="$bin_dir/$name"
if [[ -x "$out" ]]; then
  echo "$out"
  exit 0
fi
mkdir -p "$bin_dir"
exec 9>"$cache_root/.example-tools.lock"
flock 9
if [[ -x "$out" ]]; then
  echo "$out"
  exit 0
fi

dir="$tools_dir/$wrapper"
module="${package%/cmd/*}"
version="$(cd "$dir" && go list -m -f '{{.Version}}' "$module")"
log "building $name $version from $package (cold build on 2 cores: minutes; cached afterwards)"
start=$SECONDS
ldflags="-s -w"
cgo=1
case "$name" in
  # What act prints for --version (upstream's release build sets it the same way).
  act) ldflags+=" -X main.version=$version" ;;
  kubectl-static)
    cgo=0
    minor="$(echo "$version" | cut -d. -f2)"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
    done
    ;;
esac
rm -f "$out.tmp"
if ! (cd "$dir" && CGO_ENABLED=$cgo go build -trimpath -ldflags "$ldflags" -o "$out.tmp" "$package") >&2; then
  log "FAILED to build $name (see errors above)"
  exit 1
fi
mv "$out.tmp" "$out"
log "built $name in $((SECONDS - start))s"
echo "$out"
