#!/usr/bin/env bash
# Fetches the real CRDs of Flux (Kustomization, HelmRelease) and Argo CD
# (Application) from their Go modules, pinned below, through the Go module
# proxy (the module zips carry the CRD manifests the projects release), and
# caches them outside the clone.
#
# Prints the directory holding the CRD manifests as its last line of stdout.
# Its top level holds the CRDs the GitOps gate reads (`kubectl apply -f DIR`);
# two subdirectories hold those the examples run against on the node:
#   DIR/flux-source/   Flux's source kinds (GitRepository, OCIRepository, Bucket,
#                      ExternalArtifact: kustomize-controller watches them all)
#   DIR/workflows/     Argo Workflows' Workflow and WorkflowTemplate (only the
#                      CRD manifests are taken from that module: the
#                      workflow-controller is not run; security advisories are
#                      reported for v4.0.5's controller and server)
# The Workflow CRD is larger than the client-side apply annotation allows:
# apply it server-side (`kubectl apply --server-side -f DIR/workflows`).
#
# Versions: the newest the proxy serves that this machine's Go (1.26) accepts
# (kustomize-controller v1.10 and argo-cd v3.6 need Go 1.27; several
# helm-controller versions are not served by proxy.golang.org).
set -euo pipefail

KUSTOMIZE_CONTROLLER=github.com/fluxcd/kustomize-controller@v1.9.6
HELM_CONTROLLER=github.com/fluxcd/helm-controller@v1.4.3
ARGO_CD=github.com/argoproj/argo-cd/v3@v3.5.7
# Flux 2.9's source-controller, the release that goes with kustomize-controller v1.9.
SOURCE_CONTROLLER=github.com/fluxcd/source-controller@v1.9.6
ARGO_WORKFLOWS=github.com/argoproj/argo-workflows/v4@v4.0.5

cache_root="${DEPLOYLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deploylock}"
key="$(echo "$KUSTOMIZE_CONTROLLER $HELM_CONTROLLER $ARGO_CD $SOURCE_CONTROLLER $ARGO_WORKFLOWS" | sha256sum | cut -c1-16)"
out="$cache_root/gitops-crds-$key"

log() { echo "[gitops-crds] $*" >&2; }

if [[ -s "$out/.complete" ]]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache_root"
exec 9>"$cache_root/.gitops-crds.lock"
flock 9
if [[ -s "$out/.complete" ]]; then
  echo "$out"
  exit 0
fi

module_dir() { # <module@version>
  local json dir
  # Outside any module: -mod=mod lets `go mod download` fetch what is named.
  json="$(cd "$cache_root" && GOFLAGS=-mod=mod go mod download -json "$1")" || {
    log "cannot download $1: $json"
    exit 1
  }
  dir="$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  if [[ -z "$dir" || ! -d "$dir" ]]; then
    log "no module directory for $1: $json"
    exit 1
  fi
  echo "$dir"
}

tmp="$out.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
log "fetching $KUSTOMIZE_CONTROLLER, $HELM_CONTROLLER, $ARGO_CD, $SOURCE_CONTROLLER, $ARGO_WORKFLOWS (Go module proxy)"
cp "$(module_dir "$KUSTOMIZE_CONTROLLER")/config/crd/bases/kustomize.toolkit.fluxcd.io_kustomizations.yaml" "$tmp/"
cp "$(module_dir "$HELM_CONTROLLER")/config/crd/bases/helm.toolkit.fluxcd.io_helmreleases.yaml" "$tmp/"
cp "$(module_dir "$ARGO_CD")/manifests/crds/application-crd.yaml" "$tmp/argoproj.io_applications.yaml"
mkdir -p "$tmp/flux-source" "$tmp/workflows"
source_crds="$(module_dir "$SOURCE_CONTROLLER")/config/crd/bases"
for kind in gitrepositories ocirepositories buckets externalartifacts; do
  cp "$source_crds/source.toolkit.fluxcd.io_$kind.yaml" "$tmp/flux-source/"
done
workflow_crds="$(module_dir "$ARGO_WORKFLOWS")/manifests/base/crds/full"
cp "$workflow_crds/argoproj.io_workflows.yaml" "$workflow_crds/argoproj.io_workflowtemplates.yaml" "$tmp/workflows/"
chmod u+w "$tmp"/*.yaml "$tmp"/*/*.yaml
printf '%s\n' "$KUSTOMIZE_CONTROLLER" "$HELM_CONTROLLER" "$ARGO_CD" "$SOURCE_CONTROLLER" "$ARGO_WORKFLOWS" >"$tmp/.complete"
rm -rf "$out"
mv "$tmp" "$out"
echo "$out"
