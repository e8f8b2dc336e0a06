#!/usr/bin/env bash
# The same with exec: renewed while the command runs, released when it exits,
# waits up to 10 minutes in the queue if someone else is deploying.
set -euo pipefail
environment="${1:-production}"
version="${VERSION:-2.1.0}"
deploy_command="${DEPLOY_COMMAND:-echo deploying}"

exec deploylock exec -e "$environment" --reason "Deploying version $version" \
  --duration 10 --wait-timeout 600 -- $deploy_command "$version"
