# Sourced by hack/cluster.sh: the node of the local cluster (`up --node`).
#
# kube-controller-manager and kube-scheduler from the pinned k8s.io/kubernetes
# module, and per node i (node-i, address 127.0.0.i): a containerd with its own
# root, state, socket and CNI configuration under DIR/node-i, runc as its
# runtime, and a kubelet. What it took to run them on this machine kind
# (cgroup v1, a process may not lower its oom_score_adj, no registry) is noted
# beside each setting.
# shellcheck shell=bash

node_dir() { echo "$dir/node-$1"; }
containerd_socket() { echo "$(node_dir "$1")/containerd.sock"; }

check_node_prerequisites() {
  local missing=()
  for command in containerd containerd-shim-runc-v2 runc ctr buildah cc; do
    command -v "$command" >/dev/null || missing+=("$command")
  done
  [[ -x /usr/lib/cni/loopback ]] || missing+=("/usr/lib/cni/loopback")
  ((${#missing[@]} == 0)) ||
    die "the node needs ${missing[*]} (Debian: run hack/ensure-deps.sh --node)"
  [[ $(id -u) -eq 0 ]] || die "the node runs containers: run as root"
  ((node_count >= 1 && node_count <= 9)) || die "--nodes must be 1 to 9"
}

# The API server's flags that depend on whether pods run.
configure_apiserver() {
  node_apiserver_args=()
  if ((node_count > 0)); then
    authorization_mode="Node,RBAC"
    # ServiceAccount admission gives pods their token; NodeRestriction keeps
    # each kubelet to its own node's objects.
    admission_args=(--enable-admission-plugins NodeRestriction)
    node_apiserver_args=(
      # kubectl logs/exec: the API server reaches a kubelet at the node's
      # registered address (127.0.0.i), never through DNS.
      --kubelet-preferred-address-types InternalIP
      --kubelet-client-certificate "$dir/pki/apiserver-kubelet-client.crt"
      --kubelet-client-key "$dir/pki/apiserver-kubelet-client.key"
      # hack/node/local-network.yaml is a MutatingAdmissionPolicy (beta in 1.35).
      --feature-gates MutatingAdmissionPolicy=true
      --runtime-config admissionregistration.k8s.io/v1beta1=true
    )
  else
    authorization_mode="RBAC"
    # No controller-manager creates ServiceAccounts: pods are never run.
    admission_args=(--disable-admission-plugins ServiceAccount)
  fi
}

write_node_configs() {
  make_identity apiserver-kubelet-client kube-apiserver-kubelet-client system:masters
  kcm_port="$(free_port)"
  scheduler_port="$(free_port)"
  local i nd
  for ((i = 1; i <= node_count; i++)); do
    nd="$(node_dir "$i")"
    mkdir -p "$nd"/{cni,containerd,kubelet,pod-logs}
    cat >"$nd/cni/10-loopback.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "deploylock-local", "plugins": [{"type": "loopback"}]}
EOF
    cat >"$nd/containerd.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
# Plugins that would write outside this directory or need absent kernel parts.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$nd/containerd.sock"
[ttrpc]
  address = "$nd/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  # Built locally (hack/image.sh pause): nothing is pulled.
  sandbox_image = "$(hack_image_name pause)"
  # This machine refuses to lower a process's oom_score_adj (containerd asks
  # -998 for sandboxes): without this runc fails with "can't get final
  # child's PID from pipe: EOF".
  restrict_oom_score_adj = true
  # Network namespaces as mounts under DIR, so that \`down\` finds them all.
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$nd/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
EOF
    cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# Kubernetes 1.35 refuses cgroup v1 (this machine's hierarchy) unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
# No QoS cgroup tree and no allocatable enforcement: several kubelets share
# this machine's cgroups.
cgroupsPerQOS: false
enforceNodeAllocatable: []
evictionHard: {}
failSwapOn: false
containerRuntimeEndpoint: unix://$nd/containerd.sock
address: 127.0.0.$i
port: $(free_port)
healthzBindAddress: 127.0.0.$i
healthzPort: $(free_port)
readOnlyPort: 0
podLogsDir: $nd/pod-logs
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: $dir/pki/ca.crt
# The API server (kubectl logs/exec) authenticates with its client certificate.
authorization:
  mode: AlwaysAllow
registerNode: true
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# No iptables chains (KUBE-FIREWALL, canaries): `down` must leave no rule behind.
makeIPTablesUtilChains: false
EOF
  done
}

hack_image_name() { "$repo_root/hack/image.sh" name "$1"; }

start_controller_manager() {
  setpriv --pdeathsig KILL -- "$bin_dir/kube-controller-manager" \
    --kubeconfig "$dir/kubeconfigs/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file "$dir/pki/sa.key" --root-ca-file "$dir/pki/ca.crt" \
    >>"$dir/logs/kube-controller-manager.log" 2>&1 &
  kcm_pid=$!
  echo "$kcm_pid" >"$dir/kube-controller-manager.pid"
}

start_scheduler() {
  setpriv --pdeathsig KILL -- "$bin_dir/kube-scheduler" \
    --kubeconfig "$dir/kubeconfigs/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$scheduler_port" --leader-elect=false \
    >>"$dir/logs/kube-scheduler.log" 2>&1 &
  scheduler_pid=$!
  echo "$scheduler_pid" >"$dir/kube-scheduler.pid"
}

start_containerd() { # <node index>
  local nd
  nd="$(node_dir "$1")"
  setpriv --pdeathsig KILL -- containerd --config "$nd/containerd.toml" \
    >>"$dir/logs/containerd-node-$1.log" 2>&1 &
  containerd_pids[$1]=$!
  echo "$!" >"$nd/containerd.pid"
}

start_kubelet() { # <node index>
  local nd
  nd="$(node_dir "$1")"
  setpriv --pdeathsig KILL -- "$bin_dir/kubelet" \
    --config "$nd/kubelet.yaml" \
    --kubeconfig "$dir/kubeconfigs/node-$1.kubeconfig" \
    --hostname-override "node-$1" --node-ip "127.0.0.$1" \
    --root-dir "$nd/kubelet" --cert-dir "$nd/kubelet/pki" \
    >>"$dir/logs/kubelet-node-$1.log" 2>&1 &
  kubelet_pids[$1]=$!
  echo "$!" >"$nd/kubelet.pid"
}

node_pids_refresh() {
  node_pids=("$kcm_pid" "$scheduler_pid" "${containerd_pids[@]}" "${kubelet_pids[@]}")
}

start_node() {
  declare -g -a containerd_pids=() kubelet_pids=() node_pids=()
  start_controller_manager
  start_scheduler
  local i
  for ((i = 1; i <= node_count; i++)); do
    start_containerd "$i"
    start_kubelet "$i"
  done
  node_pids_refresh
}

# A node part that exited is started again, like etcd and the apiserver.
restart_exited_node_parts() {
  local i
  if ! kill -0 "$kcm_pid" 2>/dev/null; then
    echo "[supervisor] kube-controller-manager exited; starting it again" >>"$dir/logs/kube-controller-manager.log"
    start_controller_manager
  fi
  if ! kill -0 "$scheduler_pid" 2>/dev/null; then
    echo "[supervisor] kube-scheduler exited; starting it again" >>"$dir/logs/kube-scheduler.log"
    start_scheduler
  fi
  for ((i = 1; i <= node_count; i++)); do
    if ! kill -0 "${containerd_pids[$i]}" 2>/dev/null; then
      echo "[supervisor] containerd exited; starting it again" >>"$dir/logs/containerd-node-$i.log"
      start_containerd "$i"
    fi
    if ! kill -0 "${kubelet_pids[$i]}" 2>/dev/null; then
      echo "[supervisor] kubelet exited; starting it again" >>"$dir/logs/kubelet-node-$i.log"
      start_kubelet "$i"
    fi
  done
  node_pids_refresh
}

ctr_on() { # <node index> <ctr args...>
  local socket
  socket="$(containerd_socket "$1")"
  shift
  ctr --address "$socket" --namespace k8s.io "$@"
}

# Stops the node: the kubelets (so nothing restarts a container), every
# container through its containerd (which ends the shims), containerd, then the
# controllers; finally whatever is left (processes started from this
# directory, mounts under it).
stop_node() {
  local i id
  for ((i = 1; i <= node_count; i++)); do
    stop_process "${kubelet_pids[$i]:-0}"
  done
  for ((i = 1; i <= node_count; i++)); do
    [[ -S "$(containerd_socket "$i")" ]] || continue
    for id in $(ctr_on "$i" tasks list --quiet 2>/dev/null); do
      ctr_on "$i" tasks kill --all --signal SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_on "$i" tasks list --quiet 2>/dev/null); do
      timeout 10 ctr_on "$i" tasks delete --force "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_on "$i" containers list --quiet 2>/dev/null); do
      ctr_on "$i" containers delete "$id" >/dev/null 2>&1 || true
    done
  done
  for ((i = 1; i <= node_count; i++)); do
    stop_process "${containerd_pids[$i]:-0}"
  done
  stop_process "${kcm_pid:-0}"
  stop_process "${scheduler_pid:-0}"
  stop_nodes_leftovers
}

# Processes whose command line names this directory (containerd shims carry
# their containerd's socket path), with their children (the containers);
# then every mount under the directory, deepest first; then the kubelets'
# log links into it.
stop_nodes_leftovers() {
  local pid child target
  for pid in $(grep -lsF -- "$dir/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
    # Not this shell, and not the servers the supervisor stops gracefully next.
    case "$pid" in
      "$$" | "$BASHPID" | "${etcd_pid:-}" | "${apiserver_pid:-}") continue ;;
    esac
    for child in $(cat "/proc/$pid/task/"*/children 2>/dev/null); do
      kill -KILL "$child" 2>/dev/null || true
    done
    kill -KILL "$pid" 2>/dev/null || true
  done
  # Mount points may contain spaces in theory; findmnt escapes them as \x20.
  while read -r target; do
    umount --lazy "$target" 2>/dev/null || true
  done < <(findmnt --raw --noheadings --output TARGET | grep -F -- "$dir/" | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-)
  if [[ -d /var/log/containers ]]; then
    find /var/log/containers -maxdepth 1 -type l -lname "$dir/*" -delete 2>/dev/null || true
  fi
}

# Foreground part of `up --node`: the sandbox image in every containerd, the
# network policy loaded, the nodes Ready.
await_node() {
  local i start=$SECONDS kubectl=("$bin_dir/kubectl" --kubeconfig "$dir/kubeconfigs/admin.kubeconfig")
  for ((i = 1; i <= node_count; i++)); do
    # containerd's socket: nothing to watch before it answers.
    until ctr_on "$i" version >/dev/null 2>&1; do
      ((SECONDS - start < 60)) || die "containerd of node-$i did not start; see $dir/logs/containerd-node-$i.log:
$(tail -n 20 "$dir/logs/containerd-node-$i.log" 2>/dev/null)"
      sleep 0.2
    done
    ctr_on "$i" images import "$pause_archive" >/dev/null ||
      die "cannot import the pause image into node-$i's containerd"
  done
  sed "s/APISERVER_PORT/$apiserver_port/" "$repo_root/hack/node/local-network.yaml" |
    "${kubectl[@]}" apply -f - >/dev/null || die "cannot apply hack/node/local-network.yaml"
  # A new admission policy takes a moment to load: a server-side dry run
  # shows when pods get the host network.
  until [[ "$("${kubectl[@]}" run policy-probe --image "$(hack_image_name pause)" --dry-run=server \
    -o 'jsonpath={.spec.hostNetwork}' 2>/dev/null)" == true ]]; do
    ((SECONDS - start < 60)) || die "the local network policy was not loaded within 60s"
    sleep 0.2
  done
  for ((i = 1; i <= node_count; i++)); do
    "${kubectl[@]}" wait --for=create "node/node-$i" --timeout=120s >/dev/null ||
      die "node-$i did not register; see $dir/logs/kubelet-node-$i.log:
$(tail -n 20 "$dir/logs/kubelet-node-$i.log" 2>/dev/null)"
    # The kubelet refuses to publish a loopback --node-ip ("nodeIP can't be
    # loopback address") and then leaves the node's addresses alone: they are
    # set here, to the address its kubelet listens on. hostNetwork pods get it
    # as their IP (probes, Endpoints), the API server reaches the kubelet there.
    "${kubectl[@]}" patch "node/node-$i" --subresource=status --type=merge -p \
      "{\"status\":{\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"127.0.0.$i\"},{\"type\":\"Hostname\",\"address\":\"node-$i\"}]}}" \
      >/dev/null || die "cannot set the address of node-$i"
  done
  "${kubectl[@]}" wait --for=condition=Ready node --all --timeout=120s >/dev/null ||
    die "the nodes are not Ready; see $dir/logs/kubelet-node-*.log"
  "${kubectl[@]}" wait --for=create serviceaccount/default -n default --timeout=60s >/dev/null ||
    die "kube-controller-manager created no ServiceAccount; see $dir/logs/kube-controller-manager.log"
  log "$node_count node(s) Ready in $((SECONDS - start))s"
}

# load-image: an OCI archive (hack/image.sh) into every node's containerd.
load_image() { # <archive>
  local archive="$1" count i
  [[ -f "$archive" ]] || die "usage: hack/cluster.sh load-image ARCHIVE [--dir DIR] (no file $archive)"
  [[ -f "$dir/node-count" ]] || die "no cluster in $dir (run: make cluster-up NODE=1)"
  count="$(cat "$dir/node-count")"
  ((count > 0)) || die "the cluster in $dir has no node (run: make cluster-up NODE=1)"
  for ((i = 1; i <= count; i++)); do
    ctr_on "$i" images import "$archive" >/dev/null || die "cannot import $archive into node-$i"
  done
  log "imported $(basename "$archive") into $count node(s)"
}
