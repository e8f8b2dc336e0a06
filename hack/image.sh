#!/usr/bin/env bash
# Builds container images locally, with no registry: the FROM of every
# Dockerfile here is `scratch`, and what goes in is built on this machine.
#
#   hack/image.sh deploylock   the deploylock image from ./Dockerfile (controller + CLI)
#   hack/image.sh pause        the node's sandbox image (Kubernetes' pause.c)
#   hack/image.sh shell        a shell image for the examples' scripts (busybox + deploylock)
#   hack/image.sh flux         the Flux example's Job image (busybox + deploylock + kubectl)
#   hack/image.sh binaries     only the static release binaries (prints their directory;
#                              hack/dist.sh packs them)
#
# Each image is written as an OCI archive under the cache, keyed by a hash of
# everything that goes into it, and rebuilt only when that changes. Prints the
# archive's path as its last line of stdout; `hack/cluster.sh load-image`
# imports it into the node's containerd.
#
# The builder is buildah (Debian's package) unless IMAGE_BUILDER=docker or
# podman: with docker the image is built and tagged in docker's own store
# (`make image IMAGE_BUILDER=docker`) and no archive is written.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache_root="${DEPLOYLOCK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/deploylock}"
builder="${IMAGE_BUILDER:-buildah}"

# One name everywhere: the chart's default image, the examples, the README.
DEPLOYLOCK_IMAGE="ghcr.io/deploylock/deploylock:0.1.0"
PAUSE_IMAGE="registry.k8s.io/pause:3.10.1"
SHELL_IMAGE="ghcr.io/deploylock/deploylock-shell:0.1.0"
FLUX_IMAGE="ghcr.io/deploylock/deploylock-flux:0.1.0"

mkdir -p "$cache_root"
# One build at a time (the tests build images from several threads; the build
# contexts and buildah's storage are shared).
if [[ "${1:-}" != name ]]; then
  exec 9>"$cache_root/.image.lock"
  flock 9
fi

log() { echo "[image] $*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}

# The release binaries, statically linked (musl) so that a `FROM scratch`
# image can run them. Built in a target directory under the cache, so a fresh
# clone on the same machine reuses the compiled dependencies.
build_release_binaries() { # prints the directory holding them
  local target_dir="$cache_root/image-target"
  rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl ||
    die "the Rust target x86_64-unknown-linux-musl is missing (run hack/ensure-deps.sh --node)"
  command -v musl-gcc >/dev/null || die "musl-gcc is missing (run hack/ensure-deps.sh --node)"
  log "building the static release binaries (cargo, target dir $target_dir)"
  local start=$SECONDS
  (cd "$repo_root" && CARGO_TARGET_DIR="$target_dir" cargo build --quiet --release --locked \
    --target x86_64-unknown-linux-musl \
    --bin deploylock-controller --bin deploylock --bin kubectl-deploylock) >&2
  log "release binaries ready in $((SECONDS - start))s"
  echo "$target_dir/x86_64-unknown-linux-musl/release"
}

# build <name> <Dockerfile> <context dir>: builds and writes the OCI archive.
build() {
  local image="$1" dockerfile="$2" context="$3" key archive
  key="$( (cat "$dockerfile"; cd "$context" && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)"
  case "$builder" in
    docker | podman)
      "$builder" build -t "$image" -f "$dockerfile" "$context" >&2
      echo "$image"
      return 0
      ;;
    buildah) ;;
    *) die "IMAGE_BUILDER must be buildah, podman or docker (got $builder)" ;;
  esac
  command -v buildah >/dev/null || die "buildah is missing (run hack/ensure-deps.sh --node)"
  mkdir -p "$cache_root/images"
  archive="$cache_root/images/$(basename "${image%%:*}")-$key.tar"
  if [[ -s "$archive" ]]; then
    log "$image is up to date ($archive)"
    echo "$archive"
    return 0
  fi
  log "building $image from $(realpath --relative-to="$repo_root" "$dockerfile") with buildah"
  local start=$SECONDS storage=(--root "$cache_root/buildah/storage" --runroot "$cache_root/buildah/run")
  buildah "${storage[@]}" bud --quiet --layers=false --isolation chroot -f "$dockerfile" -t "$image" "$context" >&2 ||
    die "buildah could not build $image"
  rm -f "$archive.tmp"
  buildah "${storage[@]}" push --quiet "$image" "oci-archive:$archive.tmp:$image" >&2 ||
    die "buildah could not write $archive"
  buildah "${storage[@]}" rmi --force "$image" >/dev/null 2>&1 || true
  mv "$archive.tmp" "$archive"
  # Older archives of the same image are superseded.
  # (The key is 16 characters: deploylock-* must not match deploylock-shell-*.)
  find "$cache_root/images" -name "$(basename "${image%%:*}")-????????????????.tar" ! -name "$(basename "$archive")" -delete
  log "built $image in $((SECONDS - start))s: $archive"
  echo "$archive"
}

# The build context of the deploylock image: the binaries and the CA roots
# (the controller and the CLI make outgoing HTTPS calls, e.g. notifications).
deploylock_context() {
  local bins context="$cache_root/image-context/deploylock"
  bins="$(build_release_binaries)"
  rm -rf "$context"
  mkdir -p "$context/bin"
  for bin in deploylock-controller deploylock kubectl-deploylock; do
    cp "$bins/$bin" "$context/bin/$bin"
  done
  [[ -f /etc/ssl/certs/ca-certificates.crt ]] || die "no /etc/ssl/certs/ca-certificates.crt (apt-get install ca-certificates)"
  cp /etc/ssl/certs/ca-certificates.crt "$context/ca-certificates.crt"
  echo "$context"
}

pause_context() {
  local context="$cache_root/image-context/pause" k8s_dir source
  k8s_dir="$(cd "$repo_root/hack/tools/kubernetes" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"
  source="$k8s_dir/build/pause/linux/pause.c"
  [[ -f "$source" ]] || die "no $source in the pinned k8s.io/kubernetes module"
  rm -rf "$context"
  mkdir -p "$context"
  # Upstream builds it the same way (build/pause/Makefile): static, stripped.
  cc -Os -Wall -Werror -static -DVERSION="v3.10.1-deploylock" -o "$context/pause" "$source" >&2 ||
    die "cannot compile $source"
  strip "$context/pause"
  echo "$context"
}

shell_context() {
  local context="$cache_root/image-context/shell" bins
  command -v busybox >/dev/null && file -L "$(command -v busybox)" | grep -q 'statically linked' ||
    die "a static busybox is missing (run hack/ensure-deps.sh --node: busybox-static)"
  bins="$(build_release_binaries)"
  rm -rf "$context"
  mkdir -p "$context/bin"
  cp "$(command -v busybox)" "$context/bin/busybox"
  cp "$bins/deploylock" "$context/bin/deploylock"
  cp /etc/ssl/certs/ca-certificates.crt "$context/ca-certificates.crt"
  echo "$context"
}

# The shell image plus a static kubectl (the Flux rollout script drives the
# Kustomization with kubectl, as `flux resume`/`flux reconcile` do).
flux_context() {
  local context="$cache_root/image-context/flux" shell kubectl
  shell="$(shell_context)"
  kubectl="$("$repo_root/hack/example-tools.sh" kubectl-static | tail -n 1)" ||
    die "cannot build the static kubectl (hack/example-tools.sh kubectl-static)"
  rm -rf "$context"
  cp -r "$shell" "$context"
  cp "$kubectl" "$context/bin/kubectl"
  echo "$context"
}

case "${1:-}" in
  deploylock) build "$DEPLOYLOCK_IMAGE" "$repo_root/Dockerfile" "$(deploylock_context)" ;;
  pause) build "$PAUSE_IMAGE" "$repo_root/hack/node/Dockerfile.pause" "$(pause_context)" ;;
  shell) build "$SHELL_IMAGE" "$repo_root/hack/node/Dockerfile.shell" "$(shell_context)" ;;
  flux) build "$FLUX_IMAGE" "$repo_root/hack/node/Dockerfile.flux" "$(flux_context)" ;;
  binaries) build_release_binaries ;;
  name) # name <deploylock|pause|shell|flux>: the image's reference
    case "${2:-}" in
      deploylock) echo "$DEPLOYLOCK_IMAGE" ;;
      pause) echo "$PAUSE_IMAGE" ;;
      shell) echo "$SHELL_IMAGE" ;;
      flux) echo "$FLUX_IMAGE" ;;
      *) die "usage: hack/image.sh name deploylock|pause|shell|flux" ;;
    esac
    ;;
  *) die "usage: hack/image.sh deploylock|pause|shell|flux|binaries|name IMAGE" ;;
esac
