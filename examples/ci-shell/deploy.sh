#!/usr/bin/env bash
# The seed's CI pattern: acquire or stop, deploy, release.
set -euo pipefail
environment="${1:-production}"
version="${VERSION:-2.1.0}"
deploy_command="${DEPLOY_COMMAND:-echo deploying}"

if deploylock acquire -e "$environment" --reason "Deploying version $version" \
  --duration 30 --deployment-id "${CI_PIPELINE_ID:-local}"; then
  # Release even if the deploy fails; a killed job's lock expires by itself.
  trap 'deploylock release -e "$environment"' EXIT
  $deploy_command "$version"
else
  status=$?
  echo "could not lock $environment (exit code $status): not deploying" >&2
  exit 1
fi
