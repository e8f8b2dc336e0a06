#!/usr/bin/env bash
# A real local Kubernetes control plane (etcd + kube-apiserver) on loopback,
# the way controller-runtime's envtest runs one: no nodes, no container runtime.
#
#   hack/cluster.sh up   [--dir DIR] [--watch-pid PID] [--node [--nodes N]]
#                                                         start, wait until ready, print `export KUBECONFIG=…`
#   hack/cluster.sh down [--dir DIR]                      stop and remove DIR
#   hack/cluster.sh load-image ARCHIVE [--dir DIR]        import an OCI archive into every node's containerd
#   hack/cluster.sh env  [--dir DIR]                      print the export line of a running cluster
#   hack/cluster.sh restart-etcd|restart-apiserver [--dir DIR]   kill one server; the supervisor restarts it
#
# `up` leaves a supervisor process in the background that owns etcd and the
# apiserver. It stops them (and deletes DIR) on `down`, on SIGTERM/SIGINT, and
# when the process given by --watch-pid exits (tests pass their own PID, so a
# killed test run leaves nothing behind). The servers also get SIGKILL from the
# kernel if the supervisor itself dies (PR_SET_PDEATHSIG via setpriv).
#
# With --node the cluster also runs pods, the way a user's cluster does:
# kube-controller-manager, kube-scheduler and N nodes (default 1), each a
# kubelet with its own containerd + runc, all started and stopped by the same
# supervisor. Node i registers as `node-i` with the address 127.0.0.i; the
# cluster has no pod network, so every pod runs in the host's network namespace
# and reaches the API server on 127.0.0.1 (hack/node/local-network.yaml).
# Images cannot be pulled: the sandbox image is built locally (hack/image.sh
# pause) and others are imported with `load-image` (`make image` does it).
# `down` stops every container, shim and node process and unmounts everything
# under DIR (the containers' root filesystems, volumes and network namespaces).
#
# The API server keeps an audit log of accepted and refused writes to
# DeploymentLocks and workloads (hack/audit-policy.yaml) in DIR/logs/audit.log:
# the torture run checks the workload gate against it.
#
# Identities (client certificates signed by the cluster CA), one kubeconfig each
# in DIR/kubeconfigs/:
#   admin       CN=deploylock-admin, O=system:masters   (everything)
#   alice, bob  CN=alice / CN=bob, O=deploylock:users   (ordinary users)
#   viewer      CN=viewer, O=deploylock:viewers
#   carol       CN=carol, O=deploylock:admins           (a deploylock admin, not a cluster admin)
#   controller  CN=deploylock-controller                (the controller's identity)
# Each identity starts with no permissions beyond Kubernetes' defaults;
# RBAC for them comes from the manifests deploylock ships.
set -Eeuo pipefail
# A failing step says which (openssl's own words are in logs/pki.log).
trap 'echo "[cluster] failed at line $LINENO: $BASH_COMMAND" >&2' ERR

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_root="${DEPLOYLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deploylock}"

log() { echo "[cluster] $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

command=${1:-}
shift || true
dir="$cache_root/cluster"
watch_pid=""
node_count=0
image_archive=""
if [[ "$command" == load-image ]]; then
  image_archive="${1:-}"
  shift || true
fi
while (($#)); do
  case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --watch-pid) watch_pid="$2"; shift 2 ;;
    --node) ((node_count > 0)) || node_count=1; shift ;;
    --nodes) node_count="$2"; shift 2 ;;
    *) die "unknown argument $1" ;;
  esac
done

# Certificates are backdated two days when libfaketime is available, so that
# clients run with a clock set back (the clock-skew tests) still accept them.
# The library is preloaded directly: the `faketime` wrapper keeps a named
# semaphore and shared memory per PID in /dev/shm, leaks them when killed,
# and then fails ("sem_open: File exists") once that PID comes round again.
libfaketime=""
for candidate in /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 \
  /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 \
  /usr/lib/faketime/libfaketime.so.1 /usr/local/lib/faketime/libfaketime.so.1; do
  if [[ -f "$candidate" ]]; then
    libfaketime="$candidate"
    break
  fi
done
openssl() {
  if [[ -n "$libfaketime" ]]; then
    LD_PRELOAD="$libfaketime" FAKETIME="-2d" command openssl "$@"
  else
    command openssl "$@"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

print_env() {
  [[ -f "$dir/kubeconfigs/admin.kubeconfig" ]] || die "no cluster in $dir (run: make cluster-up)"
  echo "export KUBECONFIG=$dir/kubeconfigs/admin.kubeconfig"
}

stop_cluster() {
  # Processes started beside the cluster (the demo's controller).
  if [[ -f "$dir/controller.pid" ]]; then
    kill -TERM "$(cat "$dir/controller.pid")" 2>/dev/null || true
  fi
  if [[ -f "$dir/supervisor.pid" ]]; then
    local pid
    pid="$(cat "$dir/supervisor.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      # The supervisor removes the directory once its servers have exited.
      tail --pid="$pid" -f /dev/null 2>/dev/null || true
    fi
  fi
  # A supervisor killed outright leaves its node behind: clean it up here.
  [[ -d "$dir" ]] && stop_nodes_leftovers
  rm -rf "$dir"
}

make_identity() { # <name> <CN> <O or empty>
  local name="$1" cn="$2" org="$3" subj
  subj="/CN=$cn"
  [[ -n "$org" ]] && subj="/O=$org$subj"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$dir/pki/$name.key" \
    -subj "$subj" -out "$dir/pki/$name.csr" 2>>"$dir/logs/pki.log"
  openssl x509 -req -in "$dir/pki/$name.csr" -CA "$dir/pki/ca.crt" -CAkey "$dir/pki/ca.key" \
    -CAcreateserial -days 30 -out "$dir/pki/$name.crt" \
    -extfile <(printf 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n') 2>>"$dir/logs/pki.log"
  cat >"$dir/kubeconfigs/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: deploylock-local
  cluster:
    server: https://127.0.0.1:$apiserver_port
    certificate-authority: $dir/pki/ca.crt
users:
- name: $name
  user:
    client-certificate: $dir/pki/$name.crt
    client-key: $dir/pki/$name.key
contexts:
- name: $name
  context:
    cluster: deploylock-local
    user: $name
    namespace: default
current-context: $name
EOF
}

stop_process() { # <pid>
  kill -TERM "$1" 2>/dev/null || return 0
  timeout 5 tail --pid="$1" -f /dev/null 2>/dev/null || kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

# Runs in the background for the cluster's lifetime.
start_etcd() {
  setpriv --pdeathsig KILL -- "$bin_dir/etcd" \
    --name default --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer_port" \
    --unsafe-no-fsync --log-level warn >>"$dir/logs/etcd.log" 2>&1 &
  etcd_pid=$!
  echo "$etcd_pid" >"$dir/etcd.pid"
}

start_apiserver() {
  setpriv --pdeathsig KILL -- "$bin_dir/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$apiserver_port" \
    --cert-dir "$dir/pki/serving" \
    --tls-cert-file "$dir/pki/apiserver.crt" --tls-private-key-file "$dir/pki/apiserver.key" \
    --client-ca-file "$dir/pki/ca.crt" \
    --authorization-mode "$authorization_mode" \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
    "${admission_args[@]}" \
    --audit-policy-file "$repo_root/hack/audit-policy.yaml" --audit-log-path "$dir/logs/audit.log" \
    --service-account-issuer https://deploylock.local \
    --service-account-key-file "$dir/pki/sa.pub" --service-account-signing-key-file "$dir/pki/sa.key" \
    --event-ttl 1h "${node_apiserver_args[@]}" >>"$dir/logs/kube-apiserver.log" 2>&1 &
  apiserver_pid=$!
  echo "$apiserver_pid" >"$dir/apiserver.pid"
}

# Runs in the background for the cluster's lifetime. A server that exits is
# started again (the torture test restarts them on purpose); the supervisor
# stops only on request or when the watched process is gone.
supervise() {
  local etcd_pid apiserver_pid watcher_pid=""
  cleanup() {
    trap - TERM INT EXIT
    # The node first (its pods' containers, the kubelets, containerd), then
    # the apiserver (its graceful shutdown needs etcd), then etcd; a server
    # that has not exited within 5s is killed.
    ((node_count > 0)) && stop_node
    stop_process "$apiserver_pid"
    stop_process "$etcd_pid"
    [[ -n "$watcher_pid" ]] && kill "$watcher_pid" 2>/dev/null || true
    rm -rf "$dir"
    exit 0
  }
  trap cleanup TERM INT EXIT

  start_etcd
  start_apiserver
  if ((node_count > 0)); then
    # The node's parts need the API server; each retries until it answers.
    start_node
  fi
  if [[ -n "$watch_pid" ]]; then
    # Returns when the watched process exits, however it exits.
    tail --pid="$watch_pid" -f /dev/null &
    watcher_pid=$!
  fi
  while true; do
    if [[ -n "$watcher_pid" ]]; then
      wait -n "$watcher_pid" "$etcd_pid" "$apiserver_pid" "${node_pids[@]}" || true
      kill -0 "$watcher_pid" 2>/dev/null || cleanup
    else
      wait -n "$etcd_pid" "$apiserver_pid" "${node_pids[@]}" || true
    fi
    if ((node_count > 0)); then
      restart_exited_node_parts
    fi
    if ! kill -0 "$etcd_pid" 2>/dev/null; then
      echo "[supervisor] etcd exited; starting it again" >>"$dir/logs/etcd.log"
      start_etcd
    fi
    if ! kill -0 "$apiserver_pid" 2>/dev/null; then
      echo "[supervisor] kube-apiserver exited; starting it again" >>"$dir/logs/kube-apiserver.log"
      start_apiserver
    fi
  done
}

start_cluster() {
  if [[ -f "$dir/supervisor.pid" ]] && kill -0 "$(cat "$dir/supervisor.pid")" 2>/dev/null; then
    log "a cluster is already running in $dir"
    print_env
    return 0
  fi
  rm -rf "$dir"
  mkdir -p "$dir"/{pki/serving,kubeconfigs,logs,etcd}

  if ((node_count > 0)); then
    check_node_prerequisites
    bin_dir="$("$repo_root/hack/build-tools.sh" --node | tail -n 1)"
    pause_archive="$("$repo_root/hack/image.sh" pause | tail -n 1)"
  else
    bin_dir="$("$repo_root/hack/build-tools.sh" | tail -n 1)"
  fi
  echo "$bin_dir" >"$dir/bin-dir"
  echo "$node_count" >"$dir/node-count"

  etcd_port="$(free_port)"
  etcd_peer_port="$(free_port)"
  apiserver_port="$(free_port)"

  log "generating certificates and identities"
  openssl req -x509 -new -newkey rsa:2048 -nodes -days 30 -keyout "$dir/pki/ca.key" \
    -subj "/CN=deploylock-local-ca" -out "$dir/pki/ca.crt" 2>>"$dir/logs/pki.log"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$dir/pki/apiserver.key" \
    -subj "/CN=kube-apiserver" -out "$dir/pki/apiserver.csr" 2>>"$dir/logs/pki.log"
  openssl x509 -req -in "$dir/pki/apiserver.csr" -CA "$dir/pki/ca.crt" -CAkey "$dir/pki/ca.key" \
    -CAcreateserial -days 30 -out "$dir/pki/apiserver.crt" \
    -extfile <(printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n') 2>>"$dir/logs/pki.log"
  openssl genrsa -out "$dir/pki/sa.key" 2048 2>>"$dir/logs/pki.log"
  openssl rsa -in "$dir/pki/sa.key" -pubout -out "$dir/pki/sa.pub" 2>>"$dir/logs/pki.log"
  make_identity admin deploylock-admin system:masters
  make_identity alice alice deploylock:users
  make_identity bob bob deploylock:users
  make_identity viewer viewer deploylock:viewers
  make_identity carol carol deploylock:admins
  make_identity controller deploylock-controller ""
  if ((node_count > 0)); then
    make_identity kube-controller-manager system:kube-controller-manager ""
    make_identity kube-scheduler system:kube-scheduler ""
    for ((i = 1; i <= node_count; i++)); do
      make_identity "node-$i" "system:node:node-$i" system:nodes
    done
    write_node_configs
  fi
  configure_apiserver

  log "starting etcd on 127.0.0.1:$etcd_port and kube-apiserver on 127.0.0.1:$apiserver_port (logs in $dir/logs)"
  supervise </dev/null >/dev/null 2>&1 &
  echo $! >"$dir/supervisor.pid"
  disown

  local kubectl=("$bin_dir/kubectl" --kubeconfig "$dir/kubeconfigs/admin.kubeconfig")
  local start=$SECONDS
  # Readiness: the apiserver's own /readyz, polled because nothing can be
  # watched before the apiserver answers.
  until "${kubectl[@]}" get --raw /readyz >/dev/null 2>&1; do
    if ! kill -0 "$(cat "$dir/supervisor.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
      die "the control plane exited during start-up; last apiserver log lines:
$(tail -n 20 "$dir/logs/kube-apiserver.log" 2>/dev/null)"
    fi
    if ((SECONDS - start > 120)); then
      die "kube-apiserver not ready after 120s; see $dir/logs/kube-apiserver.log"
    fi
    sleep 0.2
  done
  log "control plane ready in $((SECONDS - start))s"
  if ((node_count > 0)); then
    # A node that does not come up takes the whole cluster down with it.
    if ! (await_node); then
      log "stopping the cluster"
      stop_cluster
      exit 1
    fi
  fi
  print_env
}

# Kills one server; the supervisor starts it again (fault injection).
restart_server() { # etcd|apiserver
  local pid_file="$dir/$1.pid"
  [[ -f "$pid_file" ]] || die "no $1 running in $dir"
  kill -"${signal:-KILL}" "$(cat "$pid_file")" 2>/dev/null || true
}

# The node: kube-controller-manager, kube-scheduler, and per node a containerd
# and a kubelet (hack/node.sh holds the functions).
# shellcheck source=hack/node.sh
source "$repo_root/hack/node.sh"

case "$command" in
  up) start_cluster ;;
  load-image) load_image "$image_archive" ;;
  restart-etcd) restart_server etcd ;;
  restart-apiserver) restart_server apiserver ;;
  down) stop_cluster ;;
  env) print_env ;;
  *) die "usage: hack/cluster.sh up|down|env|load-image ARCHIVE|restart-etcd|restart-apiserver [--dir DIR] [--watch-pid PID] [--node] [--nodes N]" ;;
esac
