#!/usr/bin/env bash
# `make demo`: build what is missing, start the local control plane, install the
# CRD, run the controller, take a lock with the CLI and show it. Leaves the
# control plane and the controller running; stop them with `make cluster-down`.
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

step "Building deploylock and deploylock-controller"
cargo build --bins
deploylock() { target/debug/deploylock --kubeconfig "$cluster_dir/kubeconfigs/$1.kubeconfig" "${@:2}"; }

step "Installing the ClusterRoles and the admission policy; binding alice and bob to deploylock-user, carol to deploylock-admin"
kubectl create namespace deploylock-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -f config/rbac/clusterroles.yaml -f config/admission/policy.yaml -f config/admission/binding.yaml -f config/dev/bindings.yaml
hack/await-admission.sh "$bin_dir/kubectl" "$cluster_dir/kubeconfigs/admin.kubeconfig" default

step "Starting deploylock-controller (logs in $cluster_dir/logs/controller.log)"
if [[ -f "$cluster_dir/controller.pid" ]] && kill -0 "$(cat "$cluster_dir/controller.pid")" 2>/dev/null; then
  kill "$(cat "$cluster_dir/controller.pid")" 2>/dev/null || true
fi
nohup target/debug/deploylock-controller \
  --kubeconfig "$cluster_dir/kubeconfigs/controller.kubeconfig" \
  --lease-namespace deploylock-system \
  --metrics-addr 127.0.0.1:0 >"$cluster_dir/logs/controller.log" 2>&1 &
echo $! >"$cluster_dir/controller.pid"
# The admission policy's clock: the controller's Lease (every write waits for it).
kubectl wait --for=create lease/deploylock-clock -n deploylock-system --timeout=60s >/dev/null

step "alice: deploylock acquire -e production --reason \"Deploying version 2.1.0\""
deploylock alice release -e production >/dev/null 2>&1 || true
deploylock alice acquire -e production --reason "Deploying version 2.1.0" --deployment-id demo-1 \
  --metadata '{"version":"2.1.0"}'

step "bob tries too, and is told who holds it (exit code 3)"
set +e
deploylock bob acquire -e production --reason "Deploying version 2.2.0"
echo "exit code: $?"
set -e

step "bob tries kubectl instead: the API server's admission policy refuses the write"
set +e
"$bin_dir/kubectl" --kubeconfig "$cluster_dir/kubeconfigs/bob.kubeconfig" patch deploymentlock production \
  --type merge -p '{"spec":{"holder":{"user":"bob","owner":"bob","reason":"mine now"}}}'
echo "exit code: $?"
set -e

step "deploylock status -e production"
deploylock alice status -e production -v

step "kubectl get deploymentlocks (State is written by the controller)"
kubectl wait --for=condition=Locked --timeout=30s deploymentlock/production
kubectl get deploymentlocks

echo
echo "The control plane and the controller keep running. To use them:"
echo "  export KUBECONFIG=$cluster_dir/kubeconfigs/admin.kubeconfig   # alice.kubeconfig, bob.kubeconfig for the users"
echo "  export PATH=$bin_dir:$repo_root/target/debug:\$PATH"
echo "  deploylock --kubeconfig $cluster_dir/kubeconfigs/alice.kubeconfig release"
echo "Stop everything with: make cluster-down"
