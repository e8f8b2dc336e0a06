#!/bin/sh
# Holds the environment's lock while Flux rolls out a Kustomization, and leaves
# the Kustomization as it found it: suspended again if it was suspended.
#
#   locked-rollout.sh [ENVIRONMENT] [KUSTOMIZATION]     (default: production apps)
#
# Needs deploylock and kubectl (no flux CLI): it does what `flux resume` and
# `flux reconcile` do, through Flux's documented API: spec.suspend, the
# reconcile.fluxcd.io/requestedAt annotation, then status.lastHandledReconcileAt
# and the Ready condition that kustomize-controller reports. POSIX sh, so it
# runs in the busybox image of job.yaml as well as in a CI step.
set -eu
environment="${1:-production}"
kustomization="${2:-apps}"
namespace="${FLUX_NAMESPACE:-flux-system}"
timeout="${ROLLOUT_TIMEOUT:-25m}"
# This run's own holding: the cleanup releases it and nothing else, even when
# another run under the same identity holds the lock.
deployment_id="${DEPLOYMENT_ID:-flux-$kustomization-$(date +%s)-$$}"
ks="kustomizations.kustomize.toolkit.fluxcd.io/$kustomization"

was_suspended=
deploylock acquire -e "$environment" --reason "Flux rollout of $kustomization" \
  --duration 30 --wait-timeout 600 --deployment-id "$deployment_id"
cleanup() {
  status=$?
  trap - EXIT
  if [ "$was_suspended" = true ]; then
    kubectl patch "$ks" -n "$namespace" --type=merge -p '{"spec":{"suspend":true}}' || status=1
  fi
  deploylock release -e "$environment" --deployment-id "$deployment_id" || status=1
  exit "$status"
}
trap cleanup EXIT
# A stopped Job (SIGTERM) or ^C still cleans up.
trap 'exit 143' TERM
trap 'exit 130' INT

# With GitOps gating (README "GitOps gating"), a Kustomization suspended for
# another holder carries the deploylock.dev/gitops-saved annotation until the
# controller restores it, which it does once this run holds the lock (when the
# Kustomization's deploylock.dev/deployer annotation names this run's
# identity). Wait for that, so that what a person left (suspended or not) is
# what this run finds, and leaves.
restore_wait="${RESTORE_TIMEOUT:-60}"
while [ -n "$(kubectl get "$ks" -n "$namespace" -o jsonpath='{.metadata.annotations.deploylock\.dev/gitops-saved}')" ]; do
  restore_wait=$((restore_wait - 1))
  if [ "$restore_wait" -le 0 ]; then
    echo "Kustomization $namespace/$kustomization is still suspended for another holder of $environment:" \
      "does its deploylock.dev/deployer annotation name this identity, and does the controller run?" >&2
    exit 1
  fi
  sleep 1
done
was_suspended="$(kubectl get "$ks" -n "$namespace" -o jsonpath='{.spec.suspend}')"

# flux resume + flux reconcile: unsuspend and request a reconciliation, in one patch.
requested="$deployment_id"
kubectl patch "$ks" -n "$namespace" --type=merge -p "{\"spec\":{\"suspend\":false},\
\"metadata\":{\"annotations\":{\"reconcile.fluxcd.io/requestedAt\":\"$requested\"}}}"
# The controller acknowledges the request (lastHandledReconcileAt), then
# reports the outcome: Ready True or False for the current generation
# (Unknown while it reconciles; a first reconcile may acknowledge before it
# has any Ready condition at all).
kubectl wait "$ks" -n "$namespace" --timeout="$timeout" \
  --for=jsonpath='{.status.lastHandledReconcileAt}'="$requested"
ready_of() {
  kubectl get "$ks" -n "$namespace" -o jsonpath='{.metadata.generation}/{.status.observedGeneration}/{.status.conditions[?(@.type=="Ready")].status}'
}
case "$timeout" in
  *m) seconds_left=$((${timeout%m} * 60)) ;;
  *s) seconds_left=${timeout%s} ;;
  *) seconds_left=1500 ;;
esac
while :; do
  state="$(ready_of)"
  generation="${state%%/*}"
  rest="${state#*/}"
  observed="${rest%%/*}"
  ready="${rest#*/}"
  if [ "$generation" = "$observed" ] && { [ "$ready" = True ] || [ "$ready" = False ]; }; then
    break
  fi
  seconds_left=$((seconds_left - 2))
  if [ "$seconds_left" -le 0 ]; then
    break
  fi
  sleep 2
done
if [ "$ready" != True ]; then
  echo "Kustomization $namespace/$kustomization is not Ready:" \
    "$(kubectl get "$ks" -n "$namespace" -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}')" >&2
  exit 1
fi
echo "Kustomization $namespace/$kustomization is Ready:" \
  "$(kubectl get "$ks" -n "$namespace" -o jsonpath='{.status.lastAppliedRevision}')"
