#!/usr/bin/env bash
# vessl_preflight.sh ROOT LOCAL REF_GIVEN GIT_URL GIT_REF: run.sh vessl's refusals, each with its reason (one line,
# exit 1), for what would otherwise fail on the node or lose the results; reads MLFLOW_TRACKING_URI too.
set -euo pipefail
root=$1 local_=$2 ref_given=$3 GIT_URL=$4 GIT_REF=$5
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }
case ${GIT_URL:-} in
  http://* | https://* | ssh://* | git://* | ?*@?*:*) ;;
  *) die "vessl: GIT_URL '${GIT_URL:-}' is not a URL a VESSL node can clone (https://, ssh://, git@host:org/repo):" \
    "set GIT_URL, or add a remote with git remote add origin URL" ;;
esac
# The default ref is this checkout's HEAD: a VESSL node can fetch it only once it is on a remote branch.
if [ "$ref_given" = 0 ] && [ -z "$(git -C "$root" branch -r --contains "$GIT_REF" 2>/dev/null)" ]; then
  die "vessl: commit $GIT_REF (HEAD) is on no remote branch, so VESSL cannot fetch it: git push first" \
    "(or set GIT_REF to a pushed commit)"
fi
if [ "$local_" = 1 ] && [ -z "${MLFLOW_TRACKING_URI:-}" ]; then
  die "vessl --local: MLFLOW_TRACKING_URI is empty, so the run would log to an mlflow.db lost with the container:" \
    "set MLFLOW_TRACKING_URI to the team's server"
fi
