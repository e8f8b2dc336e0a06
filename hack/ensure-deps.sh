#!/usr/bin/env bash
# Installs the system packages the test suite needs on a fresh Debian machine:
#   faketime (libfaketime), to run the CLI with a skewed clock in the clock-skew tests;
# and with --node, what the local node and the locally built images need:
#   containerd, runc, containernetworking-plugins (the node's runtime),
#   buildah (builds the images from their Dockerfiles, no registry),
#   busybox-static (the examples' shell image), musl-tools and Rust's
#   x86_64-unknown-linux-musl target (the image's static binaries).
set -euo pipefail

with_node=false
[[ "${1:-}" == --node ]] && with_node=true

missing=()
command -v faketime >/dev/null 2>&1 || missing+=(faketime)
if $with_node; then
  command -v containerd >/dev/null 2>&1 || missing+=(containerd)
  command -v runc >/dev/null 2>&1 || missing+=(runc)
  [[ -x /usr/lib/cni/loopback ]] || missing+=(containernetworking-plugins)
  command -v buildah >/dev/null 2>&1 || missing+=(buildah)
  [[ -x /bin/busybox ]] && file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' || missing+=(busybox-static)
  command -v musl-gcc >/dev/null 2>&1 || missing+=(musl-tools)
  command -v file >/dev/null 2>&1 || missing+=(file)
fi

if ((${#missing[@]} > 0)); then
  echo "[deps] installing ${missing[*]} from Debian's packages" >&2
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if $with_node && ! rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  echo "[deps] adding the Rust target x86_64-unknown-linux-musl" >&2
  rustup target add x86_64-unknown-linux-musl >&2
fi
