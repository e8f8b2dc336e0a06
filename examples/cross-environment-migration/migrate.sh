#!/usr/bin/env bash
# A data migration that spans environments: it runs while deploylock holds
# the lock of every environment it touches, taken together or not at all.
#
#   ./migrate.sh MIGRATION-ID [ENVIRONMENT...]     (default: staging production)
#
# The locks are taken in name order (two migrations naming the same
# environments in any order never deadlock), all or none: if one is held by
# someone else, those taken so far are released again and the exit code is
# the refusal's (3 held, 4 after --wait-timeout). They share one lock group ID
# and are renewed while the migration runs; if any one is lost (an admin
# force-releases it), the migration gets SIGTERM and exec exits 7. At the end
# every lock is released. The command sees, space-separated in lock order:
#   DEPLOYLOCK_ENVIRONMENT    the environments
#   DEPLOYLOCK_LOCK_ID        their lock IDs
#   DEPLOYLOCK_FENCING_TOKEN  their fencing tokens
#   DEPLOYLOCK_GROUP_ID       the lock group ID (only with several environments)
set -euo pipefail
migration="${1:?usage: migrate.sh MIGRATION-ID [ENVIRONMENT...]}"
shift
if [ "$#" -eq 0 ]; then
  set -- staging production
fi
flags=()
for environment in "$@"; do
  flags+=(-e "$environment")
done
# The step run once per environment, given the environment and its fencing
# token (pass the token on to whatever the migration writes to).
migrate_command="${MIGRATE_COMMAND:-echo migrating}"
wait_timeout="${WAIT_TIMEOUT:-600}"

# shellcheck disable=SC2016,SC2086 # expanded by the inner bash; split on purpose
exec deploylock "${flags[@]}" exec --reason "Migration $migration" \
  --duration 15 --wait-timeout "$wait_timeout" -- bash -c '
    set -euo pipefail
    echo "holding $DEPLOYLOCK_ENVIRONMENT (lock group ${DEPLOYLOCK_GROUP_ID:-none})"
    read -r -a tokens <<< "$DEPLOYLOCK_FENCING_TOKEN"
    i=0
    for environment in $DEPLOYLOCK_ENVIRONMENT; do
      "$@" "$environment" "${tokens[$i]}"
      i=$((i + 1))
    done' migrate $migrate_command
