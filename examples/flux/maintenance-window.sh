#!/usr/bin/env bash
# Freezes an environment: Flux is suspended and the lock says why, who, until when.
set -euo pipefail
environment="${1:-production}"
kustomization="${2:-apps}"
ticket="${3:-MAINT-123}"
namespace="${FLUX_NAMESPACE:-flux-system}"

deploylock acquire -e "$environment" --reason "Maintenance window $ticket" --duration 120 \
  --metadata "{\"ticket\": \"$ticket\", \"flux-kustomization\": \"$kustomization\"}"
flux suspend kustomization "$kustomization" -n "$namespace"
echo "maintenance window open; when done run:"
echo "  flux resume kustomization $kustomization -n $namespace && deploylock release -e $environment"
