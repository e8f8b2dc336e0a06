#!/usr/bin/env bash
# Holds the environment's lock while Flux rolls out a Kustomization.
set -euo pipefail
environment="${1:-production}"
kustomization="${2:-apps}"
namespace="${FLUX_NAMESPACE:-flux-system}"

deploylock acquire -e "$environment" --reason "Flux rollout of $kustomization" \
  --duration 30 --wait-timeout 600
trap 'deploylock release -e "$environment"' EXIT
flux resume kustomization "$kustomization" -n "$namespace"
flux reconcile kustomization "$kustomization" -n "$namespace" --with-source
kubectl wait --for=condition=Ready "kustomization/$kustomization" -n "$namespace" --timeout=25m
