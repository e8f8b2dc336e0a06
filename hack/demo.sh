#!/usr/bin/env bash
# `make demo`: build what is missing, start the local control plane, install the
# CRD and show a DeploymentLock. Leaves the control plane running; stop it with
# `make cluster-down`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster_dir="${1:?usage: hack/demo.sh CLUSTER_DIR}"
cd "$repo_root"

step() { echo; echo "==> $*"; }

step "Building the pinned control plane (first run: about 10 minutes on 2 cores; cached afterwards)"
bin_dir="$(hack/build-tools.sh | tail -n 1)"
kubectl() { "$bin_dir/kubectl" "$@"; }

step "Starting etcd and kube-apiserver on loopback"
eval "$(hack/cluster.sh up --dir "$cluster_dir")"

step "Installing the DeploymentLock CRD"
kubectl apply --server-side -f crds/
kubectl wait --for condition=established --timeout=60s -f crds/

step "Creating a DeploymentLock for the production environment"
expires="$(date -u -d '+30 minutes' +%Y-%m-%dT%H:%M:%SZ)"
now="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
kubectl apply --server-side -f - <<YAML
apiVersion: deploylock.dev/v1
kind: DeploymentLock
metadata:
  name: production
  namespace: default
spec:
  environment: production
  fencingToken: 1
  holder:
    lockId: demo-$(date +%s)
    user: deploylock-admin
    owner: demo
    type: manual
    reason: Deploying version 2.1.0
    acquiredAt: "$now"
    expiresAt: "$expires"
    durationSeconds: 1800
YAML

step "kubectl get deploymentlocks"
kubectl get deploymentlocks -o wide

echo
echo "The control plane keeps running. To use it:"
echo "  export KUBECONFIG=$cluster_dir/kubeconfigs/admin.kubeconfig"
echo "  export PATH=$bin_dir:\$PATH"
echo "Stop it with: make cluster-down"
