#!/usr/bin/env bash
# run.sh — the one entry point of weighted-mtp. Thin on purpose: everything that is not
# "find Python, pick a launcher, fill a template, start a process" lives in weighted_mtp.py.
#
#   ./run.sh demo                          four pipelines on the micro model, embedded MLflow, CPU
#   ./run.sh test [pytest args]            the test suite (installs the test extras)
#   ./run.sh ui                            MLflow UI on the demo's runs
#   ./run.sh <pipeline> [--local] [--dry-run] [trainer args]
#   ./run.sh vessl <pipeline> [--local] [--print] [--inline-secrets]
#   ./run.sh server                        PostgreSQL + S3 + MLflow (basic auth) on this machine
#   ./run.sh doctor [args] | bench [args]
# Run `./run.sh help` for the variables each command reads.
set -euo pipefail
# Never trace this script: it handles passwords (`bash -x run.sh` would print them).
case $- in *x*) set +x ;; esac
# bash 5.2 makes `&` in ${var//pat/rep} mean "the match"; the escaping below wants it literal.
shopt -u patsub_replacement 2>/dev/null || true

# Builtins only up to the Python check, so that it still reports clearly with an empty PATH.
case ${BASH_SOURCE[0]} in */*) ROOT=${BASH_SOURCE[0]%/*} ;; *) ROOT=. ;; esac
ROOT=$(cd "$ROOT" && pwd)
cd "$ROOT"

PIPELINES="baseline critic verifiable rho1"
VENV=${WMTP_VENV:-$ROOT/.venv}
PYTHON=$VENV/bin/python
TORCH_PIN="torch==2.13.0"   # an unpinned torch pulls a multi-GB CUDA build where a CPU wheel would do
ENV_FILE=${WMTP_ENV_FILE:-$ROOT/.env}
# Variables the production configs need (remote MLflow with basic auth + S3 artifacts).
PROD_VARS="MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY"
# Optional variables that break clients when set but empty (boto3 rejects endpoint_url='').
OPTIONAL_VARS="MLFLOW_TRACKING_URI MLFLOW_S3_ENDPOINT_URL AWS_DEFAULT_REGION AWS_SESSION_TOKEN"

die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'run.sh: %s\n' "$*" >&2; exit 2; }
note() { printf 'run.sh: %s\n' "$*" >&2; }

usage() {
  cat <<'EOF'
usage: ./run.sh <command> [args]

  demo                      train baseline, critic, verifiable, rho1 on the micro model (CPU, embedded
                            MLflow in ./mlflow.db), print the summary table and the UI command
  test [pytest args]        install the test extras and run pytest
  ui                        mlflow ui on ./mlflow.db at http://127.0.0.1:$PORT (default 5000)
  <pipeline> [--local] [--dry-run] [trainer args]
                            train one of: baseline critic verifiable rho1
                            --local    configs/<p>/<p>_local.yaml + --use-micro-model (else <p>.yaml,
                                       which needs the MLflow and AWS credentials in .env)
                            --dry-run  print the launch command and the merged config, train nothing
                            trainer args pass through, e.g. --override training.max_steps=10 --resume auto
  vessl <pipeline> [--local] [--print] [--inline-secrets]
                            render vessl.yaml and submit it (`vessl run create -f`), or print it
  server                    PostgreSQL + S3 (moto unless MLFLOW_S3_ENDPOINT_URL) + MLflow server with
                            basic auth; prints the client's .env lines; Ctrl-C stops everything
  doctor [args]             python -m weighted_mtp doctor (default --config configs/defaults.yaml)
  bench [args]              python bench.py: side-by-side speed ratios (--quick, --scaling,
                            --threads N, --out PATH; default bench/results.json)

environment
  .env (or $WMTP_ENV_FILE)  sourced by <pipeline>, vessl and doctor; its values win over the environment
  WMTP_VENV                 virtualenv to create/use (default ./.venv)
  launch:  NPROC_PER_NODE (processes per node; default one per visible GPU, else 1),
           CUDA_VISIBLE_DEVICES, WMTP_GPU_COUNT (pretend this many GPUs exist),
           NNODES, MASTER_ADDR, MASTER_PORT (29400), RDZV_ID (wmtp-<pipeline>), OMP_NUM_THREADS
  vessl:   VESSL_CLUSTER, VESSL_PRESET (required), VESSL_IMAGE, VESSL_RUN_NAME, GIT_URL (default: git
           remote origin), GIT_REF (default: HEAD commit), MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL,
           AWS_DEFAULT_REGION; credentials are VESSL secret references unless --inline-secrets:
           create the org secrets wmtp-mlflow-username, wmtp-mlflow-password, wmtp-aws-access-key-id,
           wmtp-aws-secret-access-key
  server:  WMTP_PG_PORT, WMTP_S3_PORT, WMTP_MLFLOW_PORT (default: free ports), WMTP_MLFLOW_HOST
           (127.0.0.1), WMTP_PG_DATA (persistent data dir; default throwaway), MLFLOW_AUTH_ADMIN_PASSWORD
           (default generated), MLFLOW_S3_ENDPOINT_URL + AWS_* (use that S3 instead of a local moto),
           AWS_DEFAULT_REGION (us-east-1)
EOF
}

# ---------------------------------------------------------------------------------------------
# venv bootstrap
# ---------------------------------------------------------------------------------------------
pyproject_sha() {
  "$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' \
    "$ROOT/pyproject.toml"
}

# bootstrap [test]: make $VENV exist with torch and this project installed (with the test extras).
# Re-installs only when pyproject.toml changed since the last install (sha256 in a stamp file).
bootstrap() {
  local extras=${1:-} stamp want
  if [ ! -x "$PYTHON" ]; then
    command -v python3 >/dev/null 2>&1 ||
      die "python3 not found: install Python >= 3.10 (Debian: apt-get install -y python3 python3-venv)"
    note "creating $VENV"
    python3 -m venv "$VENV" >&2 ||
      die "python3 -m venv $VENV failed (Debian: apt-get install -y python3-venv)"
  fi
  want=$(pyproject_sha)
  stamp=$VENV/.wmtp-installed${extras:+-$extras}
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  # The test stamp implies the plain install.
  if [ -z "$extras" ] && [ -f "$VENV/.wmtp-installed-test" ] &&
    [ "$(cat "$VENV/.wmtp-installed-test")" = "$want" ]; then return 0; fi
  if ! "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
    note "installing $TORCH_PIN into $VENV"
    "$PYTHON" -m pip install "$TORCH_PIN" >&2 || die "pip install $TORCH_PIN failed"
  fi
  note "installing weighted-mtp${extras:+[$extras]} into $VENV (pyproject.toml changed or first run)"
  "$PYTHON" -m pip install -e "$ROOT${extras:+[$extras]}" >&2 || die "pip install -e . failed"
  printf '%s\n' "$want" >"$stamp"
  [ -z "$extras" ] || printf '%s\n' "$want" >"$VENV/.wmtp-installed"
}

# .env: plain KEY=value lines, exported so they reach Python (its values win over the environment).
load_env() {
  if [ -f "$ENV_FILE" ]; then
    set -a
    # shellcheck disable=SC1090
    . "$ENV_FILE" || die "could not read $ENV_FILE: use plain KEY=value lines, values with spaces," \
      "<, >, & or \$ in single quotes (see .env.example)"
    set +a
  fi
  local v
  for v in $OPTIONAL_VARS; do
    if [ -z "${!v-}" ]; then unset "$v"; fi
  done
}

is_pipeline() {
  case " $PIPELINES " in *" $1 "*) [ -n "$1" ] ;; *) return 1 ;; esac
}

check_pipeline() {
  is_pipeline "${1:-}" ||
    usage_error "unknown pipeline '${1:-}': choose one of: ${PIPELINES// /, } (or ./run.sh help)"
}

is_uint() { case ${1:-x} in *[!0-9]*) return 1 ;; *) return 0 ;; esac; }

# GPUs this process may use: the physical count (nvidia-smi -L, or WMTP_GPU_COUNT to pretend),
# limited by CUDA_VISIBLE_DEVICES when set ('' or -1 hide every GPU).
gpu_count() {
  local n=0 visible
  if [ -n "${WMTP_GPU_COUNT:-}" ]; then
    is_uint "$WMTP_GPU_COUNT" || die "WMTP_GPU_COUNT must be a whole number, got '$WMTP_GPU_COUNT'"
    n=$WMTP_GPU_COUNT
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    case $CUDA_VISIBLE_DEVICES in
      "" | -1*) visible=0 ;;
      *) visible=$(printf '%s\n' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true) ;;
    esac
    if [ "$visible" -lt "$n" ]; then n=$visible; fi
  fi
  printf '%s\n' "$n"
}

cpu_count() { getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1; }

print_cmd() { # the exact line a user would type
  local out="+" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  printf '%s\n' "$out"
}

# ---------------------------------------------------------------------------------------------
# <pipeline> [--local] [--dry-run] [trainer args]
# ---------------------------------------------------------------------------------------------
cmd_train() {
  local pipeline=$1 local_=0 dry=0 a cfg missing="" v ngpu nproc nnodes
  shift
  check_pipeline "$pipeline"
  local args=()
  for a in "$@"; do
    case $a in
      --local) local_=1 ;;
      --dry-run) dry=1 ;;
      *) args+=("$a") ;;
    esac
  done
  load_env
  if [ "$local_" = 1 ]; then
    cfg=configs/$pipeline/${pipeline}_local.yaml
  else
    cfg=configs/$pipeline/$pipeline.yaml
    for v in $PROD_VARS; do
      case ${!v:-} in "" | "<"*">") missing+=" $v" ;; esac   # unset, or still .env.example's <placeholder>
    done
    [ -z "$missing" ] || die "not set:${missing}. $cfg logs to the team's MLflow server and S3 and" \
      "needs them: add them to ${ENV_FILE##*/} (see .env.example) or export them, or use --local"
  fi

  ngpu=$(gpu_count)
  nnodes=${NNODES:-1}
  if ! is_uint "$nnodes" || [ "$nnodes" -lt 1 ]; then die "NNODES must be a whole number >= 1, got '$nnodes'"; fi
  if [ -n "${NPROC_PER_NODE:-}" ]; then
    if ! is_uint "$NPROC_PER_NODE" || [ "$NPROC_PER_NODE" -lt 1 ]; then
      die "NPROC_PER_NODE must be a whole number >= 1, got '$NPROC_PER_NODE'"
    fi
    nproc=$NPROC_PER_NODE
  elif [ "$ngpu" -gt 0 ]; then
    nproc=$ngpu
  else
    nproc=1
  fi

  local cmd=()
  if [ "$nnodes" -gt 1 ]; then
    [ -n "${MASTER_ADDR:-}" ] ||
      die "NNODES=$nnodes needs MASTER_ADDR (the rendezvous host every node can reach; MASTER_PORT defaults to 29400)"
    cmd=(torchrun "--nnodes=$nnodes" "--nproc_per_node=$nproc" --rdzv_backend=c10d
      "--rdzv_endpoint=$MASTER_ADDR:${MASTER_PORT:-29400}" "--rdzv_id=${RDZV_ID:-wmtp-$pipeline}")
  elif [ "$ngpu" -gt 0 ] || [ "$nproc" -gt 1 ]; then
    cmd=(torchrun --standalone "--nproc_per_node=$nproc")
  else
    cmd=(python)
  fi
  local train=(-m weighted_mtp train --config "$cfg")
  [ "$local_" = 0 ] || train+=(--use-micro-model)
  train+=(${args[@]+"${args[@]}"})

  # torchrun --max_restarts: restarted gloo workers must not reuse the old rendezvous store (pytorch#135712).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  # torchrun forces OMP_NUM_THREADS=1 when unset; give each process its share of the cores.
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS=$(($(cpu_count) / nproc))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
    export OMP_NUM_THREADS
  fi

  print_cmd "${cmd[@]}" "${train[@]}"
  [ -f "$cfg" ] || die "config $cfg not found"
  bootstrap
  export PATH="$VENV/bin:$PATH"   # so `python` and `torchrun` above are the venv's, exactly as printed
  if [ "$dry" = 1 ]; then
    exec python "${train[@]}" --dry-run
  fi
  exec "${cmd[@]}" "${train[@]}"
}

# ---------------------------------------------------------------------------------------------
# vessl <pipeline> [--local] [--print] [--inline-secrets]
# ---------------------------------------------------------------------------------------------
CLEANUP_PATHS=()
cleanup_paths() {
  local p
  for p in ${CLEANUP_PATHS[@]+"${CLEANUP_PATHS[@]}"}; do rm -rf -- "$p"; done
}

# secret_name VAR: the VESSL org secret that holds VAR.
secret_name() {
  case $1 in
    MLFLOW_TRACKING_USERNAME) echo wmtp-mlflow-username ;;
    MLFLOW_TRACKING_PASSWORD) echo wmtp-mlflow-password ;;
    AWS_ACCESS_KEY_ID) echo wmtp-aws-access-key-id ;;
    AWS_SECRET_ACCESS_KEY) echo wmtp-aws-secret-access-key ;;
  esac
}

# yaml_scalar VALUE: a YAML single-quoted scalar ('' inside). Newlines are refused by the caller.
yaml_scalar() {
  local v=$1
  printf "'%s'" "${v//\'/\'\'}"
}

# sed_escape TEXT: TEXT as a literal sed replacement for the delimiter '|'.
sed_escape() {
  local v=$1
  v=${v//\\/\\\\}
  v=${v//&/\\&}
  v=${v//|/\\|}
  printf '%s' "$v"
}

cmd_vessl() {
  local pipeline=${1:-} local_=0 print=0 inline=0 a
  [ $# -gt 0 ] && shift
  check_pipeline "$pipeline"
  for a in "$@"; do
    case $a in
      --local) local_=1 ;;
      --print) print=1 ;;
      --inline-secrets) inline=1 ;;
      *) usage_error "vessl: unknown argument '$a' (usage: ./run.sh vessl <pipeline> [--local] [--print] [--inline-secrets])" ;;
    esac
  done
  load_env
  local template=$ROOT/vessl.yaml
  [ -f "$template" ] || die "vessl.yaml not found"

  # Derived values; anything already set (in .env or the environment) wins.
  : "${GIT_URL:=$(git -C "$ROOT" remote get-url origin 2>/dev/null || true)}"
  : "${GIT_REF:=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)}"
  : "${VESSL_IMAGE:=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime}"
  : "${VESSL_RUN_NAME:=wmtp-$pipeline}"
  : "${AWS_DEFAULT_REGION:=eu-north-1}"
  # shellcheck disable=SC2034  # read through ${!var} below
  local PIPELINE=$pipeline WMTP_LOCAL=""
  [ "$local_" = 0 ] || WMTP_LOCAL=1

  # Each placeholder: how it is filled. required/optional: a quoted scalar; secret: a VESSL secret
  # reference, or with --inline-secrets {value: '...', secret: true}.
  local spec="VESSL_RUN_NAME:required VESSL_CLUSTER:required VESSL_PRESET:required VESSL_IMAGE:required
    GIT_URL:required GIT_REF:required PIPELINE:required WMTP_LOCAL:optional
    MLFLOW_TRACKING_URI:optional MLFLOW_S3_ENDPOINT_URL:optional AWS_DEFAULT_REGION:optional
    MLFLOW_TRACKING_USERNAME:secret MLFLOW_TRACKING_PASSWORD:secret AWS_ACCESS_KEY_ID:secret
    AWS_SECRET_ACCESS_KEY:secret"
  local known=" " item
  for item in $spec; do known+="${item%%:*} "; done
  local ph
  for ph in $(grep -v '^[[:space:]]*#' "$template" | grep -o '{{[A-Za-z0-9_]*}}' | tr -d '{}' | sort -u); do
    case $known in *" $ph "*) ;; *) die "vessl.yaml uses {{$ph}}, which run.sh does not know" ;; esac
  done

  # Everything holding a value lives in one umask-077 dir that the EXIT trap removes, whatever happens.
  umask 077
  local tmp
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/wmtp-vessl.XXXXXX") || die "mktemp failed"
  CLEANUP_PATHS+=("$tmp")
  local script=$tmp/render.sed out=$tmp/run.yaml var kind val repl nl=$'\n' cr=$'\r' missing=""
  : >"$script"
  for item in $spec; do
    var=${item%%:*} kind=${item#*:}
    val=${!var-}
    case $val in *"$nl"* | *"$cr"*) die "$var contains a line break; VESSL env values must be one line" ;; esac
    if [ "$kind" = secret ] && [ "$inline" = 0 ]; then
      repl="{secret: $(secret_name "$var")}"
    elif [ -z "$val" ] && [ "$kind" != optional ]; then
      missing+=" $var"
      continue
    elif [ "$kind" = secret ]; then
      repl="{value: $(yaml_scalar "$val"), secret: true}"
    else
      repl=$(yaml_scalar "$val")
    fi
    # One placeholder per template line; `t` ends the line once it is filled, so a value that
    # itself contains {{OTHER}} is never substituted again. printf is a builtin: no value on argv.
    printf 's|{{%s}}|%s|g\nt\n' "$var" "$(sed_escape "$repl")" >>"$script"
  done
  [ -z "$missing" ] || die "vessl.yaml needs${missing} (set in .env or the environment)"
  sed -f "$script" "$template" >"$out"
  rm -f -- "$script"

  if [ "$print" = 1 ]; then
    cat "$out"
    return 0
  fi
  if ! command -v vessl >/dev/null 2>&1; then
    note "the vessl CLI is not installed, nothing was submitted. Either:"
    note "  pip install vessl && vessl configure && ./run.sh vessl $pipeline${WMTP_LOCAL:+ --local}"
    note "  or ./run.sh vessl $pipeline${WMTP_LOCAL:+ --local} --print > run.yaml; vessl run create -f run.yaml; rm run.yaml"
    exit 1
  fi
  print_cmd vessl run create -f "$out"
  local rc=0
  vessl run create -f "$out" || rc=$?
  exit "$rc"
}

# ---------------------------------------------------------------------------------------------
# server: PostgreSQL + S3 + MLflow with basic auth, in the foreground until Ctrl-C
# ---------------------------------------------------------------------------------------------
SERVICE_PIDS=()    # "name:pid" of each service, each the leader of its own session/process group

PG_ACCOUNT=""      # the unprivileged account for PostgreSQL when root (initdb and postgres refuse root)
PG_AS=()           # its command prefix: setpriv (execs, so pids stay postgres's own) or runuser
as_pg() { ${PG_AS[@]+"${PG_AS[@]}"} "$@"; }

# spawn NAME LOG CMD...: start CMD in its own session (so its own process group), output to LOG.
spawn() {
  local name=$1 log=$2
  shift 2
  if command -v setsid >/dev/null 2>&1; then
    setsid "$@" >"$log" 2>&1 </dev/null &
  else
    "$@" >"$log" 2>&1 </dev/null &
  fi
  SERVICE_PIDS+=("$name:$!")
}

alive() { kill -0 "$1" 2>/dev/null; }

# stop_group PID SIGNAL: signal PID's process group, SIGKILL it after 15 s, reap it.
stop_group() {
  local pid=$1 sig=$2 i=0
  alive "$pid" || return 0
  kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
  while alive "$pid" && [ "$i" -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
  if alive "$pid"; then
    note "$pid did not stop after $sig, killing it"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

server_cleanup() {
  local rc=$? entry i
  trap - EXIT INT TERM
  # Newest first: mlflow, then S3, then postgres (fast shutdown: SIGINT).
  for ((i = ${#SERVICE_PIDS[@]} - 1; i >= 0; i--)); do
    entry=${SERVICE_PIDS[$i]}
    case ${entry%%:*} in
      postgres) stop_group "${entry#*:}" INT ;;
      *) stop_group "${entry#*:}" TERM ;;
    esac
  done
  cleanup_paths
  [ "$rc" = 0 ] || [ "$rc" = 130 ] || [ "$rc" = 143 ] || note "server stopped (exit $rc)"
  exit "$rc"
}

free_port() {
  "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

gen_secret() { "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))'; }

# wait_http URL SECONDS PID: until URL answers 200, or PID dies, or time runs out.
wait_http() {
  "$PYTHON" - "$1" "$2" "$3" <<'EOF'
import os, sys, time, urllib.request
url, deadline, pid = sys.argv[1], time.time() + float(sys.argv[2]), int(sys.argv[3])
while time.time() < deadline:
    try:
        if urllib.request.urlopen(url, timeout=2).status == 200:
            sys.exit(0)
    except Exception:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(3)
    time.sleep(0.2)
sys.exit(2)
EOF
}

env_line() { # KEY VALUE as a line a shell (and `set -a; . ./.env`) reads back unchanged
  local v=$2
  case $v in
    *[!A-Za-z0-9_./:@%+=,-]*) printf "%s='%s'\n" "$1" "${v//\'/\'\\\'\'}" ;;
    *) printf '%s=%s\n' "$1" "$v" ;;
  esac
}

find_pg_bin() {
  local p d
  if p=$(command -v initdb 2>/dev/null); then
    p=$(readlink -f "$p" 2>/dev/null || printf '%s' "$p")
    printf '%s\n' "${p%/*}"
    return 0
  fi
  for d in $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r); do
    if [ -x "$d/initdb" ]; then printf '%s\n' "$d"; return 0; fi
  done
  return 1
}

cmd_server() {
  [ $# -eq 0 ] || usage_error "server takes no arguments (it reads WMTP_* variables; see ./run.sh help)"
  # Not .env: that is the client's file (it may point at a previous server); use the environment.
  bootstrap test
  local pgbin
  pgbin=$(find_pg_bin) || die "PostgreSQL not found (initdb): apt-get install -y postgresql"
  if [ "$(id -u)" = 0 ]; then
    if id -u postgres >/dev/null 2>&1; then PG_ACCOUNT=postgres
    elif id -u nobody >/dev/null 2>&1; then PG_ACCOUNT=nobody
    else die "running as root and neither a 'postgres' nor a 'nobody' account exists for PostgreSQL"; fi
    if command -v setpriv >/dev/null 2>&1; then
      PG_AS=(setpriv "--reuid=$PG_ACCOUNT" "--regid=$PG_ACCOUNT" --init-groups --)
    else
      PG_AS=(runuser -u "$PG_ACCOUNT" --)
    fi
  fi
  trap server_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  local pg_port=${WMTP_PG_PORT:-} s3_port=${WMTP_S3_PORT:-} ml_port=${WMTP_MLFLOW_PORT:-}
  local ml_host=${WMTP_MLFLOW_HOST:-127.0.0.1}
  [ -n "$pg_port" ] || pg_port=$(free_port)
  [ -n "$ml_port" ] || ml_port=$(free_port)

  # state: root-only (auth ini, logs); pgroot: the PostgreSQL account's (socket, throwaway data).
  local state pgroot data persistent=0
  state=$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/wmtp-server.XXXXXX")
  CLEANUP_PATHS+=("$state")
  pgroot=$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/wmtp-pg.XXXXXX")
  CLEANUP_PATHS+=("$pgroot")
  [ -z "$PG_ACCOUNT" ] || chown "$PG_ACCOUNT:" "$pgroot"
  mkdir -p "$pgroot/sock"
  [ -z "$PG_ACCOUNT" ] || chown "$PG_ACCOUNT:" "$pgroot/sock"
  if [ -n "${WMTP_PG_DATA:-}" ]; then
    data=$WMTP_PG_DATA persistent=1
    mkdir -p "$data"
    [ -z "$PG_ACCOUNT" ] || [ -f "$data/PG_VERSION" ] || chown "$PG_ACCOUNT:" "$data"
    chmod 700 "$data"
  else
    data=$pgroot/data
  fi
  echo "# stack: dir $state"
  echo "# stack: dir $pgroot"

  # --- PostgreSQL
  if [ ! -f "$data/PG_VERSION" ]; then
    if [ "$persistent" = 1 ]; then
      as_pg "$pgbin/initdb" -D "$data" --auth=trust -U wmtp >"$state/initdb.log" 2>&1 ||
        die "initdb failed ($(tail -n 3 "$state/initdb.log" | tr '\n' ' '))"
    else
      as_pg "$pgbin/initdb" -D "$data" --auth=trust -U wmtp --no-sync >"$state/initdb.log" 2>&1 ||
        die "initdb failed ($(tail -n 3 "$state/initdb.log" | tr '\n' ' '))"
    fi
  fi
  local pg_flags=(-D "$data" -h 127.0.0.1 -p "$pg_port" -k "$pgroot/sock")
  [ "$persistent" = 1 ] || pg_flags+=(-c fsync=off -c synchronous_commit=off -c full_page_writes=off)
  spawn postgres "$state/postgres.log" ${PG_AS[@]+"${PG_AS[@]}"} "$pgbin/postgres" "${pg_flags[@]}"
  local pg_pid=${SERVICE_PIDS[${#SERVICE_PIDS[@]} - 1]#*:} i=0
  until "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" -U wmtp -d postgres 2>/dev/null; do
    alive "$pg_pid" || die "postgres exited: $(tail -n 5 "$state/postgres.log" | tr '\n' ' ')"
    [ "$i" -lt 300 ] || die "postgres not ready after 30 s (log: $state/postgres.log)"
    sleep 0.1; i=$((i + 1))
  done
  local db
  for db in mlflow mlflow_auth; do
    if [ -z "$("$pgbin/psql" -h 127.0.0.1 -p "$pg_port" -U wmtp -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$db'")" ]; then
      "$pgbin/createdb" -h 127.0.0.1 -p "$pg_port" -U wmtp "$db" || die "createdb $db failed"
    fi
  done
  echo "# stack: pid postgres $pg_pid"

  # --- S3
  local s3_url region=${AWS_DEFAULT_REGION:-us-east-1} ak sk
  if [ -n "${MLFLOW_S3_ENDPOINT_URL:-}" ]; then
    s3_url=$MLFLOW_S3_ENDPOINT_URL
    ak=${AWS_ACCESS_KEY_ID:-} sk=${AWS_SECRET_ACCESS_KEY:-}
    if [ -z "$ak" ] || [ -z "$sk" ]; then
      die "MLFLOW_S3_ENDPOINT_URL is set, so the server needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for it"
    fi
    note "using the S3 endpoint $s3_url (bucket wmtp must exist)"
  else
    [ -n "$s3_port" ] || s3_port=$(free_port)
    s3_url=http://127.0.0.1:$s3_port
    ak=${AWS_ACCESS_KEY_ID:-wmtp-local} sk=${AWS_SECRET_ACCESS_KEY:-$(gen_secret)}
    spawn s3 "$state/s3.log" "$VENV/bin/moto_server" -H 127.0.0.1 -p "$s3_port"
    local s3_pid=${SERVICE_PIDS[${#SERVICE_PIDS[@]} - 1]#*:}
    wait_http "$s3_url/" 30 "$s3_pid" || die "moto_server did not start: $(tail -n 5 "$state/s3.log" | tr '\n' ' ')"
    AWS_ACCESS_KEY_ID=$ak AWS_SECRET_ACCESS_KEY=$sk "$PYTHON" - "$s3_url" "$region" <<'EOF' ||
import sys, boto3
url, region = sys.argv[1], sys.argv[2]
kw = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
boto3.client("s3", endpoint_url=url, region_name=region).create_bucket(Bucket="wmtp", **kw)
EOF
      die "could not create bucket wmtp on $s3_url"
    echo "# stack: pid s3 $s3_pid"
  fi

  # --- MLflow tracking server with basic auth
  local admin_pw=${MLFLOW_AUTH_ADMIN_PASSWORD:-} pwfile=""
  if [ "$persistent" = 1 ]; then
    # The auth db keeps the first admin password; remember it next to the data for later starts.
    pwfile=$data/wmtp-admin-password
    if [ -z "$admin_pw" ] && [ -f "$pwfile" ]; then admin_pw=$(cat "$pwfile"); fi
  fi
  [ -n "$admin_pw" ] || admin_pw=$(gen_secret)
  [ "${#admin_pw}" -ge 12 ] || die "MLFLOW_AUTH_ADMIN_PASSWORD must be at least 12 characters"
  if [ -n "$pwfile" ]; then (umask 077 && printf '%s\n' "$admin_pw" >"$pwfile"); fi
  cat >"$state/auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = postgresql+psycopg2://wmtp@127.0.0.1:$pg_port/mlflow_auth
admin_username = wmtp_admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 300
EOF
  local ml_url=http://127.0.0.1:$ml_port
  [ "$ml_host" = 127.0.0.1 ] || ml_url=http://$(hostname -f 2>/dev/null || hostname):$ml_port
  MLFLOW_AUTH_CONFIG_PATH=$state/auth.ini \
    MLFLOW_AUTH_ADMIN_PASSWORD=$admin_pw \
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(gen_secret) \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    MLFLOW_S3_ENDPOINT_URL=$s3_url AWS_ACCESS_KEY_ID=$ak AWS_SECRET_ACCESS_KEY=$sk AWS_DEFAULT_REGION=$region \
    spawn mlflow "$state/mlflow.log" "$VENV/bin/mlflow" server --app-name basic-auth \
    --backend-store-uri "postgresql+psycopg2://wmtp@127.0.0.1:$pg_port/mlflow" \
    --default-artifact-root s3://wmtp/mlflow-artifacts --no-serve-artifacts \
    --host "$ml_host" --port "$ml_port" --workers 1
  local ml_pid=${SERVICE_PIDS[${#SERVICE_PIDS[@]} - 1]#*:}
  wait_http "http://127.0.0.1:$ml_port/health" 120 "$ml_pid" ||
    die "mlflow server did not start: $(tail -n 8 "$state/mlflow.log" | tr '\n' ' ')"
  echo "# stack: pid mlflow $ml_pid"

  echo "# --- .env ---"
  env_line MLFLOW_TRACKING_URI "$ml_url"
  env_line MLFLOW_TRACKING_USERNAME wmtp_admin
  env_line MLFLOW_TRACKING_PASSWORD "$admin_pw"
  env_line MLFLOW_S3_ENDPOINT_URL "$s3_url"
  env_line AWS_ACCESS_KEY_ID "$ak"
  env_line AWS_SECRET_ACCESS_KEY "$sk"
  env_line AWS_DEFAULT_REGION "$region"
  echo "# --- end ---"
  note "tracking server ready at $ml_url (logs in $state); Ctrl-C stops it"
  # `wait` returns on a trapped signal at once (the traps exit and stop everything) or when a
  # service dies, which is an error.
  wait -n || true
  die "a service of the stack exited unexpectedly (logs in $state, removed on exit):" \
    "$(tail -n 5 "$state"/*.log 2>/dev/null | tr '\n' ' ')"
}

# ---------------------------------------------------------------------------------------------
cmd_demo() {
  bootstrap
  export PATH="$VENV/bin:$PATH"
  export MLFLOW_TRACKING_URI=sqlite:///mlflow.db   # ./mlflow.db, git-ignored
  local p
  for p in $PIPELINES; do
    local cmd=(python -m weighted_mtp train --config "configs/$p/${p}_local.yaml" --use-micro-model "$@")
    print_cmd "${cmd[@]}"
    "${cmd[@]}" || die "demo: $p failed"
  done
  python -m weighted_mtp report
  echo
  echo "Open the MLflow UI on these runs:  ./run.sh ui"
}

cmd_test() {
  bootstrap test
  local rc=0
  "$PYTHON" -m pytest "$@" || rc=$?
  if [ "$rc" = 5 ]; then die "pytest collected no tests (exit 5): that is a failure here"; fi
  exit "$rc"
}

cmd_ui() {
  bootstrap
  # One worker: several race to create the tables of a fresh mlflow.db (and are slower on 2 cores).
  exec "$VENV/bin/mlflow" ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port "${PORT:-5000}" \
    --workers 1 "$@"
}

main() {
  local sub=${1:-help}
  [ $# -eq 0 ] || shift
  case $sub in
    help | -h | --help) usage ;;
    demo) cmd_demo "$@" ;;
    test) cmd_test "$@" ;;
    ui) cmd_ui "$@" ;;
    vessl) trap cleanup_paths EXIT; trap 'exit 130' INT; trap 'exit 143' TERM; cmd_vessl "$@" ;;
    server) cmd_server "$@" ;;
    doctor)
      load_env; bootstrap
      case " $* " in *" --config "* | *" --config="*) ;; *) set -- --config configs/defaults.yaml "$@" ;; esac
      exec "$PYTHON" -m weighted_mtp doctor "$@" ;;
    bench) bootstrap test; exec "$PYTHON" bench.py "$@" ;;   # test extras: the upload ratios need moto
    -*) usage >&2; exit 2 ;;
    *) cmd_train "$sub" "$@" ;;
  esac
}

main "$@"
