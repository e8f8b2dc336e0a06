#!/usr/bin/env bash
# `make install`: everything the chart installs except the controller's
# Deployment — the CRD, the ClusterRoles, the namespace deploylock-system,
# the admission policy with its binding, and the workload gate's policy (inert
# until an environment is bound to namespaces). Enforcement is ON from here: the API
# server refuses every DeploymentLock write that is not one whole, legitimate
# transition. The policy reads its clock from the Lease deploylock-clock that a
# running deploylock-controller keeps in deploylock-system; until one runs,
# writes to DeploymentLocks are refused ("no params found").
#
#   hack/install.sh [KUBECTL]          (default: kubectl on PATH)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
kubectl="${1:-kubectl}"
cd "$repo_root"

"$kubectl" apply --server-side -f crds/
"$kubectl" wait --for condition=established --timeout=60s -f crds/
"$kubectl" create namespace deploylock-system --dry-run=client -o yaml | "$kubectl" apply -f -
"$kubectl" apply --server-side \
  -f config/rbac/clusterroles.yaml \
  -f config/admission/policy.yaml \
  -f config/admission/binding.yaml \
  -f config/admission/stop-the-line.yaml \
  -f config/admission/workload-gate.yaml

cat <<'NOTE'

deploylock is installed with enforcement ON (ValidatingAdmissionPolicy deploylock.dev).
Writes to DeploymentLocks are refused until a controller keeps the policy's clock:
  - in the cluster:  helm install deploylock charts/deploylock -n deploylock-system
                     (image: `make image`, then push it and set image.repository)
  - or from here:    deploylock-controller --lease-namespace deploylock-system
Then give people the roles (ClusterRoles deploylock-viewer, deploylock-user, deploylock-admin):
  kubectl create namespace my-app --dry-run=client -o yaml | kubectl apply -f -
  kubectl create rolebinding deploylock-users -n my-app --clusterrole deploylock-user --group my-team
To gate workloads while a lock is held (README "Freezing an environment"), bind
environments to their namespaces: config/admission/workload-gate-binding.example.yaml,
or EnvironmentBindings (kubectl explain environmentbinding.spec) kept by a controller
run with --environment-bindings (RBAC: config/rbac/environment-bindings.yaml)
To remove enforcement: kubectl delete validatingadmissionpolicybinding deploylock.dev
NOTE
