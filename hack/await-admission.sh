#!/usr/bin/env bash
# Waits until the API server enforces the deploylock.dev admission policy in
# NAMESPACE: a new ValidatingAdmissionPolicy takes a moment to load, and a
# write sent before that is not checked. Probes with a server-side dry run of
# a forbidden write (a holding in another user's name), which changes nothing.
# Usage: hack/await-admission.sh KUBECTL KUBECONFIG NAMESPACE [SECONDS]
set -euo pipefail
kubectl="${1:?kubectl}" kubeconfig="${2:?kubeconfig}" namespace="${3:?namespace}" seconds="${4:-60}"
now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
later="$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)"
probe=$(cat <<JSON
{"apiVersion":"deploylock.dev/v1","kind":"DeploymentLock","metadata":{"name":"admission-probe"},
 "spec":{"environment":"admission-probe","fencingToken":0,
  "holder":{"lockId":"probe","user":"nobody-at-all","owner":"probe","type":"manual","reason":"probe",
            "acquiredAt":"$now","expiresAt":"$later","durationSeconds":3600}}}
JSON
)
deadline=$((SECONDS + seconds))
while ((SECONDS < deadline)); do
  if ! said="$("$kubectl" --kubeconfig "$kubeconfig" create --dry-run=server -n "$namespace" -f - <<<"$probe" 2>&1)"; then
    [[ "$said" == *ValidatingAdmissionPolicy* ]] && exit 0
  fi
  sleep 0.2
done
echo "the admission policy is not enforced in $namespace after ${seconds}s: $said" >&2
exit 1
