#!/usr/bin/env bash
# Holds the environment's lock while Flux rolls out a Kustomization, and leaves
# the Kustomization as it found it: suspended again if it was suspended.
set -euo pipefail
environment="${1:-production}"
kustomization="${2:-apps}"
namespace="${FLUX_NAMESPACE:-flux-system}"
# This run's own holding: the cleanup releases it and nothing else, even when
# another run under the same identity holds the lock.
deployment_id="${DEPLOYMENT_ID:-flux-$kustomization-$(date +%s)-$$}"

was_suspended="$(kubectl get "kustomization/$kustomization" -n "$namespace" -o jsonpath='{.spec.suspend}')"
deploylock acquire -e "$environment" --reason "Flux rollout of $kustomization" \
  --duration 30 --wait-timeout 600 --deployment-id "$deployment_id"
cleanup() {
  if [[ "$was_suspended" == true ]]; then
    flux suspend kustomization "$kustomization" -n "$namespace" || true
  fi
  deploylock release -e "$environment" --deployment-id "$deployment_id"
}
trap cleanup EXIT
flux resume kustomization "$kustomization" -n "$namespace"
flux reconcile kustomization "$kustomization" -n "$namespace" --with-source
kubectl wait --for=condition=Ready "kustomization/$kustomization" -n "$namespace" --timeout=25m
