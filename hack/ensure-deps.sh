#!/usr/bin/env bash
# Installs the system packages the test suite needs on a fresh Debian machine:
# faketime (libfaketime), to run the CLI with a skewed clock in the clock-skew tests.
set -euo pipefail

missing=()
command -v faketime >/dev/null 2>&1 || missing+=(faketime)
((${#missing[@]} == 0)) && exit 0

echo "[deps] installing ${missing[*]} from Debian's packages" >&2
sudo=""
[[ $(id -u) -ne 0 ]] && sudo="sudo"
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
