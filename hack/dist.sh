#!/usr/bin/env bash
# Packs the statically linked release binaries (the image's, hack/image.sh
# binaries) as the release tarball that CI installs from (the GitHub Actions
# example's install step):
#
#   hack/dist.sh [OUT_DIR]     (default: dist/)
#
# writes OUT_DIR/deploylock-VERSION-x86_64-unknown-linux-musl.tar.gz, holding
# deploylock-VERSION-x86_64-unknown-linux-musl/{deploylock,kubectl-deploylock,deploylock-controller},
# and its .sha256 (`sha256sum -c` format). Prints the tarball's path last.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="$(realpath -m "${1:-$repo_root/dist}")"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo_root/Cargo.toml" | head -n 1)"
[[ -n "$version" ]] || { echo "[dist] no version in Cargo.toml" >&2; exit 1; }
name="deploylock-$version-x86_64-unknown-linux-musl"

bins="$("$repo_root/hack/image.sh" binaries | tail -n 1)"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/$name" "$out_dir"
for bin in deploylock kubectl-deploylock deploylock-controller; do
  cp "$bins/$bin" "$stage/$name/$bin"
done
cp "$repo_root/README.md" "$stage/$name/"
# Reproducible: fixed owner, order and times.
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
  -C "$stage" -czf "$out_dir/$name.tar.gz" "$name"
(cd "$out_dir" && sha256sum "$name.tar.gz" >"$name.tar.gz.sha256")
echo "[dist] wrote $out_dir/$name.tar.gz and its .sha256" >&2
echo "$out_dir/$name.tar.gz"
