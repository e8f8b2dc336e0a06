#!/usr/bin/env bash
# Opens a two-hour maintenance window on an environment, shows it, then ends it.
set -euo pipefail
environment="${1:-production}"
ticket="${2:-MAINT-123}"

deploylock acquire -e "$environment" --reason "Database maintenance" --duration 120 \
  --metadata "{\"ticket\": \"$ticket\"}"
deploylock status -e "$environment" -v
# ... the maintenance itself ...
deploylock release -e "$environment"
