#!/usr/bin/env bash
# run.sh: the one entry point of weighted-mtp; thin on purpose (find Python, pick a launcher, fill a template).
# usage: ./run.sh <command> [args]
#   demo [args]           compare --seeds 1 on the micro model (CPU, MLflow in ./mlflow.db): a warm-up, then baseline,
#                         critic -> verifiable (on the warm-up's own graded answers) and rho1 from it; the summary table
#   compare [args]        the same over --seeds N (3): mean ± 95 % intervals, plot; --control, --gold: docs/compare.md
#   test [--fast] [pytest args]   install what the selected tests lack (Debian packages as root, the test extras),
#                         then pytest; none: the fast tier, then the slow one, each on 2 workers (docs/testing.md)
#   ui | report | ls      mlflow ui on ./mlflow.db, :$PORT (5000), printing its URL (no job runner unless MLFLOW_SERVER_
#   export [args]         ENABLE_JOB_EXECUTION=true) | newest run per pipeline (--all) | the configs | a model dir
#   <pipeline> [--local | --fsdp] [--dry-run] [trainer args]
#                         train baseline, critic, verifiable or rho1 with configs/<p>/<p>.yaml (--fsdp: <p>_fsdp.yaml;
#                         both need .env's MLflow and AWS credentials), or --local: <p>_local.yaml + --use-micro-model;
#                         --dry-run prints the launch command and the merged config and trains nothing;
#                         trainer args pass through, e.g. --override training.max_steps=10 --resume auto
#   evaluate <pipeline> [--local] [args]   pass@k of the pipeline's newest finished run (python -m weighted_mtp
#                         evaluate --checkpoint auto; args pass through: --checkpoint, --samples, --json, --override)
#   sample <pipeline> [--local] --out FILE [args]   its newest run's graded answers to eval.dataset as training JSONL
#   vessl <pipeline> [--local | --fsdp] [--print] [--inline-secrets] [--override k=v ...]
#                         render vessl.yaml and submit it (`vessl run create -f`), or print it
#   server                PostgreSQL + S3 (moto unless MLFLOW_S3_ENDPOINT_URL) + MLflow, basic auth; prints .env lines
#   doctor [args]         python -m weighted_mtp doctor (default --config configs/defaults.yaml)
#   bench [args]          python bench.py: speed ratios (--quick, --scaling, --threads N, --out PATH)
#
# environment (.env, or $WMTP_ENV_FILE, is sourced by <pipeline>, vessl and doctor; its values win; see .env.example)
#   WMTP_VENV  the virtualenv (default ./.venv; it reuses python3's own torch when that is >= 2.4)
#   launch: NPROC_PER_NODE (default: one per visible GPU, else 1), CUDA_VISIBLE_DEVICES, WMTP_GPU_COUNT (pretend
#           this many GPUs), NNODES, MASTER_ADDR, MASTER_PORT (29400), RDZV_ID (wmtp-<pipeline>), OMP_NUM_THREADS
#   vessl:  VESSL_CLUSTER, VESSL_PRESET, WMTP_MODEL_SOURCE, WMTP_DATA_SOURCE (required; s3://, vessl-dataset://,
#           vessl-model:// or hf:// URIs), VESSL_IMAGE, VESSL_RUN_NAME, GIT_URL, GIT_REF (default: origin, HEAD),
#           MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL, AWS_DEFAULT_REGION; the credentials are the VESSL org
#           secrets named in vessl.yaml, or with --inline-secrets their values
#   server: WMTP_PG_PORT, WMTP_S3_PORT, WMTP_MLFLOW_PORT, WMTP_MLFLOW_HOST, WMTP_PG_DATA, MLFLOW_AUTH_ADMIN_PASSWORD,
#           MLFLOW_S3_ENDPOINT_URL + AWS_*: see scripts/tracking_stack.py

set -euo pipefail
case $- in *x*) set +x ;; esac   # never trace this script: it handles passwords (`bash -x run.sh` would print them)
# bash 5.2 makes `&` in ${var//pat/rep} mean "the match"; the escaping below wants it literal.
shopt -u patsub_replacement 2>/dev/null || true

# builtins only up to the Python check, so that it still reports clearly with an empty PATH
case ${BASH_SOURCE[0]} in */*) ROOT=${BASH_SOURCE[0]%/*} ;; *) ROOT=. ;; esac
ROOT=$(cd "$ROOT" && pwd) && cd "$ROOT"

PIPELINES=; for d in configs/*/; do p=${d%/} p=${p#*/}; [ -f "$d${p}_local.yaml" ] && PIPELINES+=${PIPELINES:+ }$p; done
VENV=${WMTP_VENV:-$ROOT/.venv}
PYTHON=$VENV/bin/python
TORCH_PIN="torch==2.13.0"   # an unpinned torch pulls a multi-GB CUDA build where a CPU wheel would do
TORCH_MIN=2.4               # pyproject.toml's torch>=: a python3 with a torch this new is reused, not replaced
ENV_FILE=${WMTP_ENV_FILE:-$ROOT/.env}
PROD_VARS="MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY"   # <p>.yaml's
OPTIONAL_VARS="MLFLOW_TRACKING_URI MLFLOW_S3_ENDPOINT_URL AWS_DEFAULT_REGION AWS_SESSION_TOKEN"  # unset when empty

die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'run.sh: %s\n' "$*" >&2; exit 2; }
note() { printf 'run.sh: %s\n' "$*" >&2; }
usage() { sed -n '3,/^$/s/^# \{0,1\}//p' "$ROOT/run.sh"; }   # the comment at the top of this file

# --- venv, .env, helpers ----------------------------------------------------------------------
# bootstrap [test]: make $VENV exist with torch and this project installed (with the test extras).
# Re-installs only when pyproject.toml changed since the last install (sha256 in a stamp file).
bootstrap() {
  local extras=${1:-} stamp want site=()
  if [ ! -x "$PYTHON" ]; then
    command -v python3 >/dev/null 2>&1 ||
      die "python3 not found: install Python >= 3.10 (Debian: apt-get install -y python3 python3-venv)"
    # A torch in python3 (a GPU image's CUDA build, several GB) that meets TORCH_MIN is reused: 2.5.1+cu124 >= 2.4.
    python3 -c "import sys, torch; sys.exit([int(x) for x in torch.__version__.split('.')[:2]] < [${TORCH_MIN/./, }])" \
      >/dev/null 2>&1 && site=(--system-site-packages)
    note "creating $VENV${site[*]:+ (with the system site packages: python3 has torch >= $TORCH_MIN)}"
    python3 -m venv ${site[@]+"${site[@]}"} "$VENV" >&2 ||
      die "python3 -m venv $VENV failed (Debian: apt-get install -y python3-venv)"
  fi
  want=$(sha256sum "$ROOT/pyproject.toml") want=${want%% *}
  stamp=$VENV/.wmtp-installed${extras:+-$extras}
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  if [ -z "$extras" ] && [ -f "$VENV/.wmtp-installed-test" ] &&
    [ "$(cat "$VENV/.wmtp-installed-test")" = "$want" ]; then return 0; fi   # the test stamp implies the plain one
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
    [ -z "$(find "$ENV_FILE" -maxdepth 0 -perm /077 2>/dev/null)" ] ||   # credentials: for its owner's eyes only
      note "warning: $ENV_FILE is readable by group or others: chmod 600 $ENV_FILE"
    set -a
    # shellcheck disable=SC1090
    . "$ENV_FILE" || die "could not read $ENV_FILE: use plain KEY=value lines, values with spaces," \
      "<, >, & or \$ in single quotes (see .env.example)"
    set +a
  fi
  local v; for v in $OPTIONAL_VARS; do [ -n "${!v-}" ] || unset "$v"; done
}

check_pipeline() {
  case " $PIPELINES " in *" ${1:-} "*) [ -n "${1:-}" ] && return 0 ;; esac
  usage_error "unknown pipeline '${1:-}': choose one of: ${PIPELINES// /, } (or ./run.sh help)"
}
is_uint() { case ${1:-x} in *[!0-9]*) return 1 ;; *) return 0 ;; esac; }

# GPUs this process may use: the physical count (nvidia-smi -L, or WMTP_GPU_COUNT to pretend),
# limited by CUDA_VISIBLE_DEVICES when set ('' or -1 hide every GPU).
gpu_count() {
  local n=${WMTP_GPU_COUNT:-} visible
  is_uint "${n:-0}" || die "WMTP_GPU_COUNT must be a whole number, got '$n'"
  [ -n "$n" ] || n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    case $CUDA_VISIBLE_DEVICES in
      "" | -1*) visible=0 ;;
      *) visible=$(tr , '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true) ;;
    esac
    [ "$visible" -ge "$n" ] || n=$visible
  fi
  echo "$n"
}
print_cmd() { printf '+'; printf ' %q' "$@"; printf '\n'; }   # the exact line a user would type

# --- <pipeline> [--local] [--dry-run] [trainer args] -----------------------------------------------
cmd_train() {   # cmd_train train|evaluate|sample <pipeline> [args]
  local command=$1 pipeline=${2:-} local_=0 dry=0 fsdp="" a cfg missing="" v ngpu nproc nnodes args=() cmd=(python)
  shift; [ $# -eq 0 ] || shift
  check_pipeline "$pipeline"
  for a in "$@"; do
    case $a in --local) local_=1 ;; --dry-run) dry=1 ;; --fsdp) fsdp=_fsdp ;; *) args+=("$a") ;; esac
  done
  [ "$local_" = 0 ] || [ -z "$fsdp" ] || usage_error "--local or --fsdp (or --local --override training.parallel=fsdp)"
  load_env
  cfg=configs/$pipeline/$pipeline$fsdp.yaml
  [ "$local_" = 0 ] || cfg=configs/$pipeline/${pipeline}_local.yaml
  for v in $PROD_VARS; do   # a --dry-run plan needs no credentials
    case $dry$local_:${!v:-} in 00: | 00:"<"*">") missing+=" $v" ;; esac   # unset, or .env.example's <placeholder>
  done
  [ -z "$missing" ] || die "not set:${missing}. $cfg logs to the team's MLflow server and S3 and" \
    "needs them: add them to ${ENV_FILE##*/} (see .env.example) or export them, or use --local"
  ngpu=$(gpu_count) nnodes=${NNODES:-1} nproc=${NPROC_PER_NODE:-}
  if ! is_uint "$nnodes" || [ "$nnodes" -lt 1 ]; then die "NNODES must be a whole number >= 1, got '$nnodes'"; fi
  : "${nproc:=$((ngpu > 0 ? ngpu : 1))}"
  if ! is_uint "$nproc" || [ "$nproc" -lt 1 ]; then die "NPROC_PER_NODE must be a whole number >= 1, got '$nproc'"; fi
  if [ "$nnodes" -gt 1 ]; then
    [ -n "${MASTER_ADDR:-}" ] ||
      die "NNODES=$nnodes needs MASTER_ADDR (the rendezvous host every node can reach; MASTER_PORT defaults to 29400)"
    cmd=(torchrun "--nnodes=$nnodes" "--nproc_per_node=$nproc" --rdzv_backend=c10d
      "--rdzv_endpoint=$MASTER_ADDR:${MASTER_PORT:-29400}" "--rdzv_id=${RDZV_ID:-wmtp-$pipeline}")
  elif [ "$ngpu" -gt 0 ] || [ "$nproc" -gt 1 ]; then
    cmd=(torchrun --standalone "--nproc_per_node=$nproc")
  fi
  [ "$local_" = 0 ] || args=(--use-micro-model ${args[@]+"${args[@]}"})
  local train=(-m weighted_mtp "$command" --config "$cfg" ${args[@]+"${args[@]}"})
  # torchrun --max_restarts: restarted gloo workers must not reuse the old rendezvous store (pytorch#135712).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
  # torchrun forces OMP_NUM_THREADS=1 when unset; give each process its share of the cores.
  if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS=$(($(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1) / nproc))
    export OMP_NUM_THREADS=$((OMP_NUM_THREADS > 0 ? OMP_NUM_THREADS : 1))
  fi
  [ "$dry" = 0 ] || { cmd=(python) && train+=(--dry-run); }   # one process plans them all; the line says --dry-run
  case " ${args[*]-} " in *" --nproc"*) ;; *) [ "$dry" = 0 ] || train+=(--nproc "$((nproc * nnodes))") ;; esac
  print_cmd "${cmd[@]}" "${train[@]}"
  [ -f "$cfg" ] || die "config $cfg not found"; bootstrap
  export PATH="$VENV/bin:$PATH"   # so `python` and `torchrun` above are the venv's, exactly as printed
  exec "${cmd[@]}" "${train[@]}"
}

# --- vessl <pipeline> [--local] [--print] [--inline-secrets] ---------------------------------------
VESSL_TMP=""   # the private dir of the rendered file (it may hold secrets); the EXIT trap removes it
# Each placeholder of vessl.yaml and how it is filled. required/optional: a quoted scalar; source: a
# model/data URI (required; its import line is dropped with --local); secret:NAME: a reference to the
# VESSL org secret NAME, or with --inline-secrets {value: '...', secret: true}.
VESSL_SPEC="VESSL_RUN_NAME:required VESSL_CLUSTER:required VESSL_PRESET:required VESSL_IMAGE:required
  GIT_URL:required GIT_REF:required PIPELINE:required WMTP_LOCAL:optional WMTP_FSDP:optional WMTP_OVERRIDES:optional
  WMTP_MODEL_SOURCE:source WMTP_DATA_SOURCE:source
  MLFLOW_TRACKING_URI:optional MLFLOW_S3_ENDPOINT_URL:optional AWS_DEFAULT_REGION:optional
  MLFLOW_TRACKING_USERNAME:secret:wmtp-mlflow-username MLFLOW_TRACKING_PASSWORD:secret:wmtp-mlflow-password
  AWS_ACCESS_KEY_ID:secret:wmtp-aws-access-key-id AWS_SECRET_ACCESS_KEY:secret:wmtp-aws-secret-access-key"
SOURCES="s3://, vessl-dataset://, vessl-model:// or hf:// URIs"

# vessl_value VAR KIND INLINE: the YAML text for {{VAR}}, escaped for a sed replacement with the
# delimiter '|'; nothing when a required value is missing.
vessl_value() {
  local var=$1 kind=${2%%:*} val=${!1-} v
  case $val in *$'\n'* | *$'\r'*) die "$var contains a line break; VESSL env values must be one line" ;; esac
  [ "$kind" != source ] || [ -z "$val" ] || [[ $val =~ ^(s3|vessl-dataset|vessl-model|hf)://. ]] ||
    die "$var must be one of the $SOURCES (got '$val')"
  if [ "$kind" = secret ] && [ "$3" = 0 ]; then
    v="{secret: ${2#secret:}}"
  elif [ -z "$val" ] && [ "$kind" != optional ]; then
    return 0
  elif [ "$kind" = secret ]; then
    v="{value: '${val//\'/\'\'}', secret: true}"
  else
    v="'${val//\'/\'\'}'"   # a YAML single-quoted scalar ('' inside)
  fi
  v=${v//\\/\\\\} v=${v//&/\\&} v=${v//|/\\|}
  printf '%s' "$v"
}

cmd_vessl() {
  local pipeline=${1:-} local_=0 fsdp="" print=0 inline=0 a item var repl ph missing="" template=$ROOT/vessl.yaml o=""
  [ $# -gt 0 ] && shift
  check_pipeline "$pipeline"
  while [ $# -gt 0 ]; do   # --override k=v: no blanks (they travel as one env value, split on the node)
    case $1:${2:-} in --local:*) local_=1 ;; --fsdp:*) fsdp=1 ;; --print:*) print=1 ;; --inline-secrets:*) inline=1 ;;
      --override:*[[:space:]]* | --override:) usage_error "vessl: --override needs one k=v without blanks" ;;
      --override:*) o+="${o:+ }--override=$2" && shift ;; *) usage_error "vessl: unknown argument '$1' (see help)" ;;
    esac; shift; done
  load_env
  [ -f "$template" ] || die "vessl.yaml not found"   # derived values below: what .env or the environment set wins
  a=${GIT_REF:+1} && : "${GIT_URL:=$(git -C "$ROOT" remote get-url origin 2>/dev/null || true)}"
  : "${GIT_REF:=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)}"
  : "${VESSL_IMAGE:=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime}"
  : "${VESSL_RUN_NAME:=wmtp-$pipeline}"
  : "${AWS_DEFAULT_REGION:=eu-north-1}"
  "$BASH" "$ROOT/scripts/vessl_preflight.sh" "$ROOT" "$local_" "${a:-0}" "$GIT_URL" "$GIT_REF" || exit 1
  # shellcheck disable=SC2034  # read through ${!var}
  local PIPELINE=$pipeline WMTP_LOCAL=${local_#0} WMTP_FSDP=$fsdp WMTP_OVERRIDES=$o
  for ph in $(grep -v '^[[:space:]]*#' "$template" | grep -o '{{[A-Za-z0-9_]*}}' | tr -d '{}' | sort -u); do
    case " $VESSL_SPEC " in *[[:space:]]"$ph":*) ;; *) die "vessl.yaml uses {{$ph}}, which run.sh does not know" ;; esac
  done
  umask 077   # every file that holds a value: private, in a dir the EXIT trap removes whatever happens
  VESSL_TMP=$(mktemp -d "${TMPDIR:-/tmp}/wmtp-vessl.XXXXXX") || die "mktemp failed"
  local script=$VESSL_TMP/render.sed out=$VESSL_TMP/run.yaml
  for item in $VESSL_SPEC; do
    var=${item%%:*}   # --local: the micro model and builtin data, so no import lines
    [ "${item#*:}:$local_" != source:1 ] || { printf '/{{%s}}/d\n' "$var" >>"$script" && continue; }
    repl=$(vessl_value "$var" "${item#*:}" "$inline") || exit 1
    [ -n "$repl" ] || { missing+=" $var" && continue; }
    # One placeholder per template line; `t` ends the line once it is filled, so a value that
    # itself contains {{OTHER}} is never substituted again. printf is a builtin: no value on argv.
    printf 's|{{%s}}|%s|g\nt\n' "$var" "$repl" >>"$script"
  done
  case $missing in *_SOURCE*) a="; the model and data sources are $SOURCES" ;; *) a="" ;; esac
  [ -z "$missing" ] || die "vessl.yaml needs${missing} (set in .env or the environment$a)"
  sed -f "$script" "$template" >"$out"
  rm -f -- "$script"
  [ "$print" = 0 ] || { cat "$out" && return 0; }
  if ! command -v vessl >/dev/null 2>&1; then
    a="./run.sh vessl $pipeline${WMTP_LOCAL:+ --local}"
    die "the vessl CLI is not installed, nothing was submitted. Either: pip install vessl && vessl configure" \
      "&& $a; or $a --print > run.yaml; vessl run create -f run.yaml; rm run.yaml"
  fi
  print_cmd vessl run create -f "$out"
  vessl run create -f "$out" || exit
}

# --- demo, compare, test, dispatch -----------------------------------------------------------------
cmd_compare() {   # python -m weighted_mtp compare --help: --seeds, --warmup-steps, --pipelines, --override
  bootstrap
  export PATH="$VENV/bin:$PATH" MLFLOW_TRACKING_URI=sqlite:///mlflow.db   # ./mlflow.db, git-ignored
  print_cmd python -m weighted_mtp compare "$@"
  python -m weighted_mtp compare "$@" || die "compare failed"
}

cmd_test() {   # --help: this usage, installing nothing; --fast is pytest's (tests/conftest.py: the tiers)
  case " $* " in *" -h "* | *" --help "*) usage | sed -n '/^  test /,/^  ui /{/^  ui /!p;}'; exit 0 ;; esac
  "$BASH" "$ROOT/scripts/system_packages.sh" "$PYTHON" "$@" || exit 1   # $BASH: works with an empty PATH too
  bootstrap test
  local rc=0 slow=0   # no arguments: the fast tier on 2 workers (its budget, its own wall), then the slow one
  [ $# -gt 0 ] || { "$PYTHON" -m pytest --fast -n2 || rc=$?; set -- -n2 -m slow; }   # (docs/testing.md)
  "$PYTHON" -m pytest "$@" || slow=$?; [ "$rc" != 0 ] || rc=$slow
  [ "$rc" != 5 ] || die "pytest collected no tests (exit 5): that is a failure here"; exit "$rc"
}

main() {
  local sub=${1:-help}
  [ $# -eq 0 ] || shift
  case $sub in
    help | -h | --help) usage ;;
    demo) cmd_compare --seeds 1 "$@" ;;
    compare) cmd_compare "$@" ;;
    evaluate | sample) cmd_train "$sub" "$@" ;;
    report | ls | export) load_env; bootstrap; exec "$PYTHON" -m weighted_mtp "$sub" "$@" ;;
    test) cmd_test "$@" ;;
    ui) bootstrap; export PORT=${PORT:-5000}   # the runs view's URL (docs/mlflow.md), then one worker: several race
      export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}   # ~10 GenAI processes
      note "open $(MLFLOW_TRACKING_URI='' "$PYTHON" -m weighted_mtp ui-url || echo "http://127.0.0.1:$PORT")"
      exec "$VENV/bin/mlflow" ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port "$PORT" \
        --workers 1 "$@" ;;   # to create the tables of a fresh mlflow.db (and are slower on 2 cores)
    vessl) trap '[ -z "$VESSL_TMP" ] || rm -rf -- "$VESSL_TMP"' EXIT; trap 'exit 130' INT; trap 'exit 143' TERM
      cmd_vessl "$@" ;;
    server) [ $# -eq 0 ] || usage_error "server takes no arguments (it reads WMTP_* variables; see ./run.sh help)"
      bootstrap test   # not .env: that is the client's file (it may point at a previous server)
      exec "$PYTHON" "$ROOT/scripts/tracking_stack.py" ;;
    doctor) load_env; bootstrap
      case " $* " in *" --config "* | *" --config="*) ;; *) set -- --config configs/defaults.yaml "$@" ;; esac
      exec "$PYTHON" -m weighted_mtp doctor "$@" ;;
    bench) bootstrap test; exec "$PYTHON" bench.py "$@" ;;   # test extras: the upload ratios need moto
    -*) usage >&2; exit 2 ;;
    *) cmd_train train "$sub" "$@" ;;
  esac
}

main "$@"
