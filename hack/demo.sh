#!/usr/bin/env bash
# `make demo`: build what is missing, start the local control plane, install
# deploylock with enforcement on, run the controller, and show the life of a
# lock: acquire, a refusal that says who/why/until, a queued waiter taking over
# on release, `exec` holding the lock while a command runs, an emergency
# --force and its record, an expiry, `history` and the Events.
# Leaves the control plane and the controller running; stop them with
# `make cluster-down`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster_dir="${1:?usage: hack/demo.sh CLUSTER_DIR}"
cd "$repo_root"
build_log="$(dirname "$cluster_dir")/demo-build.log"
mkdir -p "$(dirname "$build_log")"
: >"$build_log"

bold() { if [[ -t 1 ]]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
step() { echo; bold "==> $*"; }
# Runs a slow, chatty command with its output in the build log and one
# progress line on the terminal instead.
quietly() {
  local what="$1"
  shift
  "$@" >>"$build_log" 2>&1 &
  local pid=$! started=$SECONDS
  if [[ -t 1 ]]; then
    while kill -0 "$pid" 2>/dev/null; do
      printf '\r    %s … %ds (log: %s)' "$what" $((SECONDS - started)) "$build_log"
      sleep 1
    done
  else
    printf '    %s … (log: %s)\n' "$what" "$build_log"
  fi
  if ! wait "$pid"; then
    echo
    tail -n 30 "$build_log"
    echo "demo: $what failed; the whole log is $build_log" >&2
    exit 1
  fi
  printf '\r    %s: done in %ds%*s\n' "$what" $((SECONDS - started)) 30 ''
}
# Shows a command as the user would type it, then runs it; a non-zero exit
# is shown, not fatal (refusals are part of the story).
run() {
  local who="$1"
  shift
  printf '%s$ deploylock' "$who"
  local arg
  for arg in "$@"; do
    if [[ "$arg" =~ [^A-Za-z0-9_./=:,-] ]]; then printf " '%s'" "$arg"; else printf ' %s' "$arg"; fi
  done
  echo
  local code=0
  deploylock "$who" "$@" || code=$?
  if ((code != 0)); then echo "    (exit code $code)"; fi
}

step "Building the pinned control plane and deploylock (first run: about 15 minutes on 2 cores; cached afterwards)"
quietly "kube-apiserver, etcd, kubectl, helm" hack/build-tools.sh
bin_dir="$(hack/build-tools.sh 2>>"$build_log" | tail -n 1)"
quietly "deploylock, deploylock-controller" cargo build --bins
kubectl() { "$bin_dir/kubectl" "$@"; }
deploylock() { target/debug/deploylock --kubeconfig "$cluster_dir/kubeconfigs/$1.kubeconfig" "${@:2}"; }

step "Starting etcd and kube-apiserver on loopback; make install (CRD, roles, admission policy)"
# Captured first: a control plane that does not start stops the demo here
# (an eval of a failed substitution would go on without KUBECONFIG).
if ! cluster_env="$(hack/cluster.sh up --dir "$cluster_dir" 2>>"$build_log")"; then
  tail -n 20 "$build_log"
  echo "demo: the local control plane did not start; the whole log is $build_log" >&2
  exit 1
fi
eval "$cluster_env"
hack/install.sh "$bin_dir/kubectl" >>"$build_log" 2>&1
# The local identities: alice and bob are deploylock-users, carol a deploylock-admin.
kubectl apply -f config/dev/bindings.yaml >>"$build_log"
hack/await-admission.sh "$bin_dir/kubectl" "$cluster_dir/kubeconfigs/admin.kubeconfig" default >>"$build_log" 2>&1
echo "    installed; alice and bob are deploylock-users, carol is a deploylock-admin"

step "Starting deploylock-controller (log: $cluster_dir/logs/controller.log)"
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
for environment in production staging; do
  deploylock carol force-release -e "$environment" --reason "demo reset" >/dev/null 2>&1 || true
done

step "carol takes staging for one minute (it will expire during the demo)"
run carol acquire -e staging --duration 1m --reason "Nightly data load"

step "alice takes production"
run alice acquire -e production --reason "Deploying version 2.1.0" --deployment-id demo-1 --metadata '{"version":"2.1.0"}'

step "bob tries too: refused, told who holds it, why and until when (exit code 3)"
run bob acquire -e production --reason "Deploying version 2.2.0"

step "bob tries kubectl instead: the API server's admission policy refuses the write"
printf 'bob$ kubectl patch deploymentlock production --type merge -p {"spec":{"holder":{"user":"bob",...}}}\n'
kubectl --kubeconfig "$cluster_dir/kubeconfigs/bob.kubeconfig" patch deploymentlock production \
  --type merge -p '{"spec":{"holder":{"user":"bob","owner":"bob","reason":"mine now"}}}' 2>&1 | cut -c1-240 || true

step "bob queues (--wait-timeout 60); alice releases; bob takes it over at once"
bob_out="$(mktemp)"
deploylock bob acquire -e production --reason "Deploying version 2.2.0" --wait-timeout 60 >"$bob_out" 2>&1 &
bob_pid=$!
kubectl wait --for=jsonpath='{.spec.queue[0].user}'=bob deploymentlock/production --timeout=30s >/dev/null
echo "bob$ deploylock acquire -e production --reason \"Deploying version 2.2.0\" --wait-timeout 60   (waiting in the queue)"
run alice release -e production
wait "$bob_pid" || echo "    (bob's exit code $?)"
sed 's/^/    bob: /' "$bob_out"
rm -f "$bob_out"
run bob release -e production

step "alice deploys with exec: the lock is held exactly while the command runs"
deploy_script="$cluster_dir/deploy.sh"
cat >"$deploy_script" <<SCRIPT
#!/bin/sh
echo "    (deploy.sh) deploying 2.3.0; meanwhile bob asks:"
$repo_root/target/debug/deploylock --kubeconfig $cluster_dir/kubeconfigs/bob.kubeconfig status -e production |
  sed -n 's/^\\(State\\|User\\|Reason\\):/    (bob sees) &/p'
SCRIPT
chmod +x "$deploy_script"
run alice exec -e production --reason "Deploying version 2.3.0" -- "$deploy_script"
run alice status -e production

step "An incident: bob deploys, carol (deploylock-admin) takes production with --force"
run bob acquire -e production --reason "Deploying version 2.4.0"
run carol acquire -e production --force --reason "Hotfix for incident 4711"
run bob extend -e production --duration 30m
run carol release -e production

step "deploylock history -e production: every transition, with who, why and whom a force overrode"
run alice history -e production

step "Meanwhile staging expired at its instant (the controller turns it Expired and records an Event)"
kubectl wait --for=jsonpath='{.status.state}'=Expired deploymentlock/staging --timeout=90s >/dev/null
kubectl get deploymentlocks
echo
echo "\$ kubectl describe deploymentlock staging   (Events)"
kubectl describe deploymentlock staging | sed -n '/^Events:/,$p'

echo
echo "The control plane and the controller keep running. To use them:"
echo "  export KUBECONFIG=$cluster_dir/kubeconfigs/alice.kubeconfig   # bob, carol (admin), admin (cluster admin)"
echo "  export PATH=$bin_dir:$repo_root/target/debug:\$PATH"
echo "  deploylock status -e production"
echo "Build log: $build_log. Stop everything with: make cluster-down"
