#!/usr/bin/env bash
# scripts/system_packages.sh VENV_PYTHON [pytest args] — run by `./run.sh test` before anything else.
# The Debian packages that the selected tests need and this machine lacks: python3 and python3-venv (while
# the venv does not exist yet), bubblewrap (bwrap: the sandbox that evaluation runs generated code in; without it
# sandbox.py falls back to weaker isolation), shellcheck (tests/test_launch.py), postgresql (the tracking-stack
# tests).
# As root: apt-get update + install them. Otherwise: one line naming the command, exit 1.
set -euo pipefail
case ${BASH_SOURCE[0]} in */*) ROOT=${BASH_SOURCE[0]%/*}/.. ;; *) ROOT=.. ;; esac
ROOT=$(cd "$ROOT" && pwd)
cd "$ROOT"
PYTHON=$1
shift

# selects FILE [pytest args]: the args run FILE (a path naming it or a folder above it; no path: all tests).
selects() {
  local file=$1 a p paths=0
  shift
  for a in "$@"; do
    p=${a%%::*} p=${p#"$ROOT"/} p=${p#./} p=${p%/}
    case $p in -* | "") continue ;; esac
    [ -e "$p" ] || continue
    paths=1
    case $file in "$p" | "$p"/*) return 0 ;; esac
    [ "$p" != . ] || return 0
  done
  [ "$paths" = 0 ]
}

pkgs="" lack=""
if [ ! -x "$PYTHON" ]; then
  command -v python3 >/dev/null 2>&1 || pkgs+=" python3" lack+="python3 not found, "
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || pkgs+=" python3-venv" lack+="python3 -m venv fails, "
fi
if ! command -v bwrap >/dev/null 2>&1; then  # every selection: the evaluator and training's val/pass@1 use it
  pkgs+=" bubblewrap" lack+="bwrap not found, "
fi
if ! command -v shellcheck >/dev/null 2>&1 && selects tests/test_launch.py "$@"; then
  pkgs+=" shellcheck" lack+="shellcheck not found, "
fi
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null &&
  { selects tests/test_stack.py "$@" || selects tests/test_tracking_stack_training.py "$@"; }; then
  pkgs+=" postgresql" lack+="PostgreSQL's initdb not found, "
fi
[ -n "$pkgs" ] || exit 0
if [ "$(id -u 2>/dev/null)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  printf 'run.sh: installing%s (apt-get)\n' "$pkgs" >&2
  # shellcheck disable=SC2086  # $pkgs: package names, split on purpose
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $pkgs; } >&2 && exit 0
  printf 'run.sh: apt-get install%s failed\n' "$pkgs" >&2
  exit 1
fi
printf 'run.sh: %s; the tests need them: sudo apt-get update && sudo apt-get install -y%s\n' "${lack%, }" "$pkgs" >&2
exit 1
