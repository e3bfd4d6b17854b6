"""run.sh launch paths: launcher lines, .env handling, VESSL rendering, shellcheck, real 2-process training.

Every test runs the real ./run.sh as a subprocess with a scrubbed environment, TMPDIR and the .env file
pointed into tmp_path, so nothing depends on (or writes to) the developer's .env or the repo.
"""
from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN_SH = ROOT / "run.sh"
TRAINER = ROOT / "weighted_mtp.py"

# Variables that would change what run.sh does; every test starts without them.
SCRUB_PREFIXES = ("MLFLOW_", "AWS_", "VESSL_", "WMTP_", "GIT_")
SCRUB = {"NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "NPROC_PER_NODE",
         "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PORT"}

PROD_CREDS = {
    "MLFLOW_TRACKING_USERNAME": "wmtp_admin",
    "MLFLOW_TRACKING_PASSWORD": "prod-password-123",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "prod-aws-secret-456",
}
TRICKY = "p&ss|w/rd\\\"'$x y"  # p&ss|w/rd\"'$x y


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(SCRUB_PREFIXES) and k not in SCRUB}
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env.update(TMPDIR=str(tmpdir), WMTP_ENV_FILE=str(tmp_path / "no.env"), WMTP_GPU_COUNT="0")
    env.update(extra)
    return env


def run_sh(args, env, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUN_SH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


def tmpdir_entries(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "tmpdir").iterdir())


# ------------------------------------------------------------------------------------------ shell
SHELL_SCRIPTS = ["run.sh", ".ci/run", "scripts/system_packages.sh"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed (./run.sh test installs it as root: apt-get install -y shellcheck)")
    res = subprocess.run(["shellcheck", str(ROOT / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_scripts_are_executable():
    for script in SHELL_SCRIPTS:
        assert os.stat(ROOT / script).st_mode & stat.S_IXUSR, script


def test_run_sh_stays_thin():
    assert len(RUN_SH.read_text().splitlines()) <= 300


def test_help_lists_commands(tmp_path):
    res = run_sh(["help"], base_env(tmp_path))
    assert res.returncode == 0
    for word in ("demo", "test", "ui", "vessl", "server", "doctor", "bench", "--dry-run", "NPROC_PER_NODE"):
        assert word in res.stdout


def test_unknown_pipeline_exits_2_and_lists_pipelines(tmp_path):
    res = run_sh(["verifyable", "--local"], base_env(tmp_path))
    assert res.returncode == 2
    assert "unknown pipeline 'verifyable'" in res.stderr
    assert "choose one of: baseline, critic, rho1, verifiable (or" in res.stderr  # configs/<p>/<p>_local.yaml
    assert res.stdout == ""


def test_no_python_is_a_clear_error(tmp_path):
    empty = tmp_path / "emptybin"
    empty.mkdir()
    env = {"PATH": str(empty), "WMTP_VENV": str(tmp_path / "venv"), "HOME": str(tmp_path)}
    res = subprocess.run(["/bin/bash", str(RUN_SH), "test"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1
    assert "python3 not found" in res.stderr
    assert not (tmp_path / "venv").exists()


# --------------------------------------------------------------------------------------- bootstrap
def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python logs each call: pip succeeds, pytest too unless its arguments hold $FAKE_PYTEST_FAILS,
    `import torch` only after torch was
    pip-installed, everything else (the stamp's sha256) runs on the real interpreter."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "python.log"
    log.touch()
    py = venv / "bin" / "python"
    py.write_text(f"""#!/bin/sh
printf '%s\\n' "$*" >> {log}
case "$1 $2" in
  "-m pytest") case "$*" in *"${{FAKE_PYTEST_FAILS:-no such argument}}"*) exit 1 ;; esac; exit 0 ;;
  "-m pip"|"-m weighted_mtp") exit 0 ;;
  "-c import torch") grep -q 'pip install torch==2.13.0' {log}; exit $? ;;
esac
exec {sys.executable} "$@"
""")
    py.chmod(0o755)
    return venv, log


def _calls(log: Path) -> list[str]:
    return [c for c in log.read_text().splitlines() if not c.startswith("-c import hashlib")]


def test_bootstrap_installs_torch_pin_first_then_only_when_pyproject_changes(tmp_path):
    import hashlib
    venv, log = _fake_venv(tmp_path)
    env = base_env(tmp_path, WMTP_VENV=str(venv))
    sha = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()

    res = run_sh(["test", "-k", "nothing"], env)
    assert res.returncode == 0, res.stderr
    assert _calls(log) == ["-c import torch", "-m pip install torch==2.13.0",
                           f"-m pip install -e {ROOT}[test]", "-m pytest -k nothing"]
    assert (venv / ".wmtp-installed-test").read_text().strip() == sha
    assert (venv / ".wmtp-installed").read_text().strip() == sha  # the test extras include the plain install

    log.write_text("")
    assert run_sh(["test"], env).returncode == 0
    assert _calls(log) == ["-m pytest --fast -n2", "-m pytest -n2 -m slow"]  # nothing re-installed; fast, then slow

    log.write_text("")  # the plain install is satisfied too: dry-run goes straight to the trainer
    res = run_sh(["baseline", "--local", "--dry-run"], env)
    assert res.returncode == 0, res.stderr
    assert _calls(log) == ["-m weighted_mtp train --config configs/baseline/baseline_local.yaml "
                           "--use-micro-model --dry-run --nproc 1"]  # the launch size, for the memory plan

    (venv / ".wmtp-installed-test").write_text("sha256-of-an-older-pyproject\n")
    log.write_text("pip install torch==2.13.0\n")  # torch is there by now
    assert run_sh(["test"], env).returncode == 0
    assert _calls(log)[1:] == ["-c import torch", f"-m pip install -e {ROOT}[test]", "-m pytest --fast -n2",
                                "-m pytest -n2 -m slow"]
    assert (venv / ".wmtp-installed-test").read_text().strip() == sha


def test_test_help_installs_nothing_and_fast_goes_to_pytest(tmp_path):
    """`./run.sh test --help` prints the command's usage with no venv, install or pytest; --fast is pytest's option
    (tests/conftest.py: the fast tier), passed through as it is; with no arguments, the fast tier on 2 workers,
    then the slow tier on 2 workers, even when the fast tier failed, and a failure of either fails the command."""
    venv, log = _fake_venv(tmp_path)
    env = base_env(tmp_path, WMTP_VENV=str(venv))
    res = run_sh(["test", "--help"], env)
    assert res.returncode == 0 and res.stdout.startswith("  test [--fast] [pytest args]"), res.stderr
    assert "none: the fast tier, then the slow one, each on 2 workers" in res.stdout and res.stderr == ""
    assert _calls(log) == [] and not (venv / ".wmtp-installed-test").exists()
    no_venv = tmp_path / "no-venv"
    assert run_sh(["test", "-h"], base_env(tmp_path, WMTP_VENV=str(no_venv))).stdout == res.stdout
    assert not no_venv.exists()
    res = run_sh(["test", "--fast", "-x"], env)
    assert res.returncode == 0, res.stderr
    assert _calls(log)[-1] == "-m pytest --fast -x"
    for fails in ("", "--fast", "-m slow"):
        res = run_sh(["test"], {**env, "FAKE_PYTEST_FAILS": fails or "no such argument"})
        assert res.returncode == (1 if fails else 0), res.stderr
        assert _calls(log)[-2:] == ["-m pytest --fast -n2", "-m pytest -n2 -m slow"]


# ------------------------------------------------------------------------- system packages (./run.sh test)
def _path_without(tool: str, tmp_path: Path, path: str | None = None) -> str:
    """path ($PATH by default) with each directory that holds `tool` replaced by a folder of links to all its other
    entries."""
    dirs = []
    for i, d in enumerate((os.environ["PATH"] if path is None else path).split(os.pathsep)):
        if d and (Path(d) / tool).exists():
            mirror = tmp_path / f"path-{i}-without-{tool}"
            mirror.mkdir()
            for entry in Path(d).iterdir():
                if entry.name != tool:
                    (mirror / entry.name).symlink_to(entry)
            d = str(mirror)
        dirs.append(d)
    return os.pathsep.join(dirs)


def _no_shellcheck_env(tmp_path: Path, uid: int) -> tuple[dict, Path, Path]:
    """A machine without shellcheck where `id -u` says uid and apt-get only records its calls; a fake venv."""
    fake = tmp_path / "sysbin"
    fake.mkdir()
    apt_log = tmp_path / "apt.log"
    apt_log.touch()
    (fake / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (fake / "apt-get").write_text(f'#!/bin/sh\nprintf "%s %s\\n" "${{DEBIAN_FRONTEND:-unset}}" "$*" >> {apt_log}\n')
    for f in ("id", "apt-get"):
        (fake / f).chmod(0o755)
    venv, py_log = _fake_venv(tmp_path)
    env = base_env(tmp_path, WMTP_VENV=str(venv), PATH=f"{fake}{os.pathsep}{_path_without('shellcheck', tmp_path)}")
    env.pop("DEBIAN_FRONTEND", None)
    return env, apt_log, py_log


def test_test_as_root_apt_gets_what_the_tests_lack(tmp_path):
    env, apt_log, py_log = _no_shellcheck_env(tmp_path, uid=0)
    assert shutil.which("shellcheck", path=env["PATH"]) is None
    res = run_sh(["test", "-k", "nothing"], env)
    assert res.returncode == 0, res.stderr
    assert apt_log.read_text().splitlines() == [
        "unset update", "noninteractive install -y --no-install-recommends shellcheck"]
    assert "run.sh: installing shellcheck (apt-get)" in res.stderr.splitlines()
    assert _calls(py_log)[-1] == "-m pytest -k nothing"


def test_test_as_root_apt_gets_bubblewrap_when_bwrap_is_missing(tmp_path):
    env, apt_log, py_log = _no_shellcheck_env(tmp_path, uid=0)
    env["PATH"] = _path_without("bwrap", tmp_path, env["PATH"])
    assert shutil.which("bwrap", path=env["PATH"]) is None
    res = run_sh(["test", "tests/test_sandbox.py"], env)   # any selection: evaluation runs programs in bwrap
    assert res.returncode == 0, res.stderr
    assert apt_log.read_text().splitlines() == [
        "unset update", "noninteractive install -y --no-install-recommends bubblewrap"]
    assert "run.sh: installing bubblewrap (apt-get)" in res.stderr.splitlines()
    assert _calls(py_log)[-1] == "-m pytest tests/test_sandbox.py"


@pytest.mark.parametrize("args,needed", [
    (["-k", "nothing"], True),                                      # no path: the whole suite
    (["tests"], True),
    (["./tests/test_launch.py::test_help_lists_commands"], True),
    ([str(ROOT / "tests" / "test_launch.py")], True),
    (["tests/test_weights.py", "-x"], False),                      # shellcheck is for test_launch.py only
    (["tests/test_weights.py", "tests/test_stack.py"], False),     # PostgreSQL is there
])
def test_test_as_a_user_names_the_install_command_when_the_selected_tests_need_it(tmp_path, args, needed):
    env, apt_log, py_log = _no_shellcheck_env(tmp_path, uid=1000)
    res = run_sh(["test", *args], env)
    assert apt_log.read_text() == ""
    if needed:
        assert res.returncode == 1
        assert res.stderr.splitlines() == ["run.sh: shellcheck not found; the tests need them: "
                                           "sudo apt-get update && sudo apt-get install -y shellcheck"]
        assert _calls(py_log) == []  # neither installed nor ran anything
    else:
        assert res.returncode == 0, res.stderr
        assert "not found" not in res.stderr
        assert _calls(py_log)[-1] == "-m pytest " + " ".join(args)


# ------------------------------------------------------------------------------ torch from the image
def _fake_python3(tmp_path: Path, torch_version: str | None) -> tuple[dict, Path, Path, Path]:
    """A system python3 whose torch is torch_version (None: no torch). `-m venv` records its arguments and makes
    a venv whose python logs each call: pip and pytest succeed; `import torch` works when the venv sees the
    system site packages (the fake torch) or after torch was pip-installed into it."""
    torch_dir = tmp_path / "system-site" / "torch"
    torch_dir.mkdir(parents=True)
    (torch_dir / "__init__.py").write_text(f"__version__ = {torch_version!r}\n" if torch_version
                                          else "raise ImportError('no torch in this image')\n")
    site, log3, log = torch_dir.parent, tmp_path / "python3.log", tmp_path / "python.log"
    log3.touch()
    log.touch()
    venv_python = tmp_path / "venv-python"
    venv_python.write_text(f"""#!/bin/sh
printf '%s\\n' "$*" >> {log}
case "$1 $2" in
  "-m pip"|"-m pytest") exit 0 ;;
  "-c import torch")
    if grep -q 'include-system-site-packages = true' "$(dirname "$0")/../pyvenv.cfg"; then
      PYTHONPATH={site} exec {sys.executable} -c 'import torch'
    fi
    grep -q 'pip install torch==2.13.0' {log}; exit $? ;;
esac
exec {sys.executable} "$@"
""")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "python3").write_text(f"""#!/bin/sh
printf '%s\\n' "$*" >> {log3}
if [ "$1 $2" = "-m venv" ]; then
  for venv; do :; done
  mkdir -p "$venv/bin" && cp {venv_python} "$venv/bin/python" && chmod +x "$venv/bin/python"
  case " $* " in *" --system-site-packages "*) system=true ;; *) system=false ;; esac
  echo "include-system-site-packages = $system" > "$venv/pyvenv.cfg"
  exit 0
fi
PYTHONPATH={site} exec {sys.executable} "$@"
""")
    (fake / "python3").chmod(0o755)
    venv = tmp_path / "venv"
    env = base_env(tmp_path, WMTP_VENV=str(venv), PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    return env, venv, log3, log


@pytest.mark.parametrize("torch_version,reused", [
    ("2.5.1+cu124", True),      # the VESSL image's torch
    ("2.4.0", True),            # the pyproject minimum itself
    ("2.10.0", True),           # compared as numbers, not strings
    ("2.3.1", False),           # too old: a plain venv and the pinned torch
    (None, False),              # no torch at all
])
def test_new_venv_reuses_the_system_torch_when_it_is_recent_enough(tmp_path, torch_version, reused):
    env, venv, log3, log = _fake_python3(tmp_path, torch_version)
    res = run_sh(["test", "tests/test_weights.py"], env)  # a selection that needs no system package
    assert res.returncode == 0, res.stderr
    venv_calls = [c for c in log3.read_text().splitlines() if c.startswith("-m venv")]
    installs = [f"-m pip install -e {ROOT}[test]", "-m pytest tests/test_weights.py"]
    if reused:
        assert venv_calls == [f"-m venv --system-site-packages {venv}"]
        assert _calls(log) == ["-c import torch", *installs]  # torch already importable: no torch install
        assert "with the system site packages: python3 has torch >= 2.4" in res.stderr
    else:
        assert venv_calls == [f"-m venv {venv}"]
        assert _calls(log) == ["-c import torch", "-m pip install torch==2.13.0", *installs]


def test_torch_minimum_is_the_pyprojects():
    import re
    pyproject = re.search(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert re.search(r"^TORCH_MIN=(\S+)", RUN_SH.read_text(), re.M).group(1) == pyproject


# ---------------------------------------------------------------------------- production variables
@pytest.mark.parametrize("missing", sorted(PROD_CREDS))
def test_missing_production_variable_is_named(tmp_path, missing):
    creds = {k: v for k, v in PROD_CREDS.items() if k != missing}
    res = run_sh(["verifiable"], base_env(tmp_path, **creds))   # a --dry-run plan needs no credentials
    assert res.returncode == 1
    assert f"not set: {missing}." in res.stderr
    for other in creds:
        assert other not in res.stderr.split("not set:")[1].split(".")[0]
    assert res.stdout == ""  # nothing launched, not even the command line


def test_dotenv_lines_count_and_missing_one_is_named(tmp_path):
    dotenv = tmp_path / "my.env"
    # Plain KEY=value lines (not exported) plus one value with shell-special characters, quoted.
    dotenv.write_text("MLFLOW_TRACKING_USERNAME=wmtp_admin\n"
                      "MLFLOW_TRACKING_PASSWORD='p&ss|w rd$x'\n"
                      "AWS_ACCESS_KEY_ID=AKIAEXAMPLE\n")
    res = run_sh(["critic"], base_env(tmp_path, WMTP_ENV_FILE=str(dotenv)))   # (--dry-run needs no credentials)
    assert res.returncode == 1
    assert "not set: AWS_SECRET_ACCESS_KEY." in res.stderr
    # ... and an exported variable counts as well as a .env line
    res = run_sh(["critic"],   # launches, then stops at the missing /mnt/wmtp/model
                 base_env(tmp_path, WMTP_ENV_FILE=str(dotenv), AWS_SECRET_ACCESS_KEY="x"))
    assert "not set" not in res.stderr
    assert res.stdout.splitlines()[0].startswith("+ python -m weighted_mtp train --config configs/critic/critic.yaml")


def test_dotenv_example_placeholders_count_as_missing(tmp_path):
    dotenv = tmp_path / "copied.env"
    shutil.copy(ROOT / ".env.example", dotenv)  # copied and not filled in
    res = run_sh(["baseline"], base_env(tmp_path, WMTP_ENV_FILE=str(dotenv)))
    assert res.returncode == 1
    assert ("not set: MLFLOW_TRACKING_PASSWORD AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY." in res.stderr), res.stderr


def test_unreadable_dotenv_is_a_clear_error(tmp_path):
    dotenv = tmp_path / "bad.env"
    dotenv.write_text("AWS_ACCESS_KEY_ID=<your-key>\n")  # unquoted < > is shell redirection
    res = run_sh(["baseline", "--local", "--dry-run"], base_env(tmp_path, WMTP_ENV_FILE=str(dotenv)))
    assert res.returncode != 0
    assert f"could not read {dotenv}" in res.stderr


def test_a_dotenv_that_group_or_others_can_read_is_warned_about(tmp_path):
    dotenv = tmp_path / "my.env"
    dotenv.write_text("MLFLOW_TRACKING_USERNAME=wmtp_admin\n")
    warning = f"run.sh: warning: {dotenv} is readable by group or others: chmod 600 {dotenv}"
    for mode, warned in ((0o644, True), (0o640, True), (0o604, True), (0o600, False)):   # cp .env.example: 644
        dotenv.chmod(mode)
        res = run_sh(["rho1", "--local", "--dry-run"], base_env(tmp_path, WMTP_ENV_FILE=str(dotenv)))
        assert res.returncode == 0 and (warning in res.stderr.splitlines()) == warned, (oct(mode), res.stderr)


def test_local_needs_no_credentials(tmp_path):
    res = run_sh(["rho1", "--local", "--dry-run"], base_env(tmp_path))
    assert "not set" not in res.stderr
    assert res.stdout.splitlines()[0] == (   # the line that ran: pasted, it plans again and trains nothing
        "+ python -m weighted_mtp train --config configs/rho1/rho1_local.yaml --use-micro-model --dry-run --nproc 1")


# ------------------------------------------------------------------------------------ launcher lines
def config_ready(*configs: str) -> bool:
    return TRAINER.exists() and all((ROOT / c).exists() for c in configs)


LAUNCH_CASES = {
    "cpu": ({}, ["--local"],
            "python -m weighted_mtp train --config configs/verifiable/verifiable_local.yaml --use-micro-model"),
    "cpu-2proc": ({"NPROC_PER_NODE": "2"}, ["--local"],
                  "torchrun --standalone --nproc_per_node=2 -m weighted_mtp train"
                  " --config configs/verifiable/verifiable_local.yaml --use-micro-model"),
    "2gpu": ({"WMTP_GPU_COUNT": "2", **PROD_CREDS}, [],
             "torchrun --standalone --nproc_per_node=2 -m weighted_mtp train"
             " --config configs/verifiable/verifiable.yaml"),
    "cuda-visible-2-of-8": ({"WMTP_GPU_COUNT": "8", "CUDA_VISIBLE_DEVICES": "0,1", **PROD_CREDS}, [],
                            "torchrun --standalone --nproc_per_node=2 -m weighted_mtp train"
                            " --config configs/verifiable/verifiable.yaml"),
    "cuda-visible-none": ({"WMTP_GPU_COUNT": "8", "CUDA_VISIBLE_DEVICES": "", **PROD_CREDS}, [],
                          "python -m weighted_mtp train --config configs/verifiable/verifiable.yaml"),
    "2nodes": ({"WMTP_GPU_COUNT": "4", "NNODES": "2", "MASTER_ADDR": "10.0.0.1", **PROD_CREDS}, [],
               "torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29400"
               " --rdzv_id=wmtp-verifiable -m weighted_mtp train --config configs/verifiable/verifiable.yaml"),
    "2nodes-port-id": ({"WMTP_GPU_COUNT": "4", "NNODES": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
                        "RDZV_ID": "job7", **PROD_CREDS}, [],
                       "torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:1234"
                       " --rdzv_id=job7 -m weighted_mtp train --config configs/verifiable/verifiable.yaml"),
}


@pytest.mark.parametrize("case", list(LAUNCH_CASES))
def test_dry_run_prints_the_launcher_line(tmp_path, case):
    env_extra, flags, expected = LAUNCH_CASES[case]
    extra_args = ["--override", "training.max_steps=3", "--override", "experiment.description=a b&c"]
    res = run_sh(["verifiable", *flags, "--dry-run", *extra_args], base_env(tmp_path, **env_extra))
    first = res.stdout.splitlines()[0] if res.stdout else ""
    # What is printed is what a user would type: it splits back into the exact argv, the launch's trainer arguments
    # planned by one process for all of them (--nproc: nodes x processes per node), with --dry-run.
    assert first.startswith("+ "), res.stdout + res.stderr
    launch = shlex.split(expected)
    nproc = int(env_extra.get("NPROC_PER_NODE") or (2 if "--nproc_per_node=2" in expected else 1 if
                                                     launch[0] == "python" else 4)) * int(env_extra.get("NNODES", 1))
    assert shlex.split(first[2:]) == ["python", *launch[launch.index("-m"):], *extra_args, "--dry-run", "--nproc",
                                      str(nproc)]
    cfg = "configs/verifiable/verifiable_local.yaml" if flags else "configs/verifiable/verifiable.yaml"
    if config_ready(cfg):
        # The rest is the merged config, from the trainer's single-process --dry-run; nothing trains.
        assert res.returncode == 0, res.stderr
        merged = yaml.safe_load("\n".join(res.stdout.splitlines()[1:]))
        assert merged["experiment"]["pipeline"] == "verifiable"
        assert merged["training"]["max_steps"] == 3
        assert merged["experiment"]["description"] == "a b&c"


def test_dry_run_needs_no_credentials_and_keeps_the_users_nproc(tmp_path):
    res = run_sh(["baseline", "--dry-run", "--nproc", "4"], base_env(tmp_path))
    assert "not set" not in res.stderr and res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "+ python -m weighted_mtp train --config configs/baseline/baseline.yaml " \
        "--nproc 4 --dry-run"   # the user's --nproc, not run.sh's
    assert "# launch: 4 process(es) (--nproc)" in res.stdout.splitlines()


def test_multi_node_without_master_addr_names_it(tmp_path):
    res = run_sh(["baseline", "--local", "--dry-run"], base_env(tmp_path, NNODES="2"))
    assert res.returncode == 1
    assert "MASTER_ADDR" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("var,value", [("NPROC_PER_NODE", "two"), ("NNODES", "0"), ("WMTP_GPU_COUNT", "x")])
def test_bad_counts_are_named(tmp_path, var, value):
    res = run_sh(["baseline", "--local", "--dry-run"], base_env(tmp_path, **{var: value}))
    assert res.returncode == 1
    assert var in res.stderr


# --------------------------------------------------------------------------------------------- vessl
SOURCES = {"WMTP_MODEL_SOURCE": "vessl-model://my-org/llama-mtp/4", "WMTP_DATA_SOURCE": "s3://my-bucket/codecontests"}
VESSL_BASE = {"VESSL_CLUSTER": "my-cluster", "VESSL_PRESET": "gpu-a100-4",
              "GIT_URL": "https://github.com/org/weighted-mtp", "GIT_REF": "0123abcd", **SOURCES}


def vessl_env(tmp_path, **extra):
    return base_env(tmp_path, **{**VESSL_BASE, **extra})


def test_vessl_template_has_one_whole_value_placeholder_per_line():
    import re
    for line in (ROOT / "vessl.yaml").read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        found = re.findall(r"\{\{[A-Za-z0-9_]+\}\}", line)
        assert len(found) <= 1, line
        if found:
            assert line.rstrip().endswith(": " + found[0]) or line.strip() == "- " + found[0], line


def test_vessl_inline_secrets_survive_special_characters(tmp_path):
    uri = "http://mlflow.example:5000/?a=1&b=2|c=/d\\e 'f' \"g\" $h"
    env = vessl_env(tmp_path, MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_PASSWORD=TRICKY,
                    MLFLOW_TRACKING_USERNAME="wmtp_admin", AWS_ACCESS_KEY_ID="AKIA&|x",
                    AWS_SECRET_ACCESS_KEY="s3cr3t\\&\\1|{{MLFLOW_TRACKING_PASSWORD}}",
                    AWS_DEFAULT_REGION="eu-north-1")
    res = run_sh(["vessl", "verifiable", "--print", "--inline-secrets"], env)
    assert res.returncode == 0, res.stderr
    doc = yaml.safe_load(res.stdout)
    e = doc["env"]
    assert e["MLFLOW_TRACKING_PASSWORD"] == {"value": TRICKY, "secret": True}
    assert e["MLFLOW_TRACKING_USERNAME"] == {"value": "wmtp_admin", "secret": True}
    assert e["AWS_ACCESS_KEY_ID"] == {"value": "AKIA&|x", "secret": True}
    # a value that contains another placeholder is not substituted a second time
    assert e["AWS_SECRET_ACCESS_KEY"] == {"value": "s3cr3t\\&\\1|{{MLFLOW_TRACKING_PASSWORD}}", "secret": True}
    assert e["MLFLOW_TRACKING_URI"] == uri
    assert e["MLFLOW_S3_ENDPOINT_URL"] == ""  # optional and unset: empty (run.sh unsets it before Python)
    assert e["AWS_DEFAULT_REGION"] == "eu-north-1"
    assert e["WMTP_PIPELINE"] == "verifiable"
    assert e["WMTP_LOCAL"] == ""
    assert doc["name"] == "wmtp-verifiable"
    assert doc["resources"] == {"cluster": "my-cluster", "preset": "gpu-a100-4"}
    assert "cuda" in doc["image"] and "pytorch" in doc["image"]
    assert doc["import"] == {"/root/weighted-mtp": {"git": {"url": "https://github.com/org/weighted-mtp",
                                                            "ref": "0123abcd"}},
                             "/mnt/wmtp/model": "vessl-model://my-org/llama-mtp/4",
                             "/mnt/wmtp/data": "s3://my-bucket/codecontests"}
    step = doc["run"][0]
    assert step["workdir"] == "/root/weighted-mtp"
    assert './run.sh "$WMTP_PIPELINE" ${WMTP_LOCAL:+--local}' in step["command"]
    assert tmpdir_entries(tmp_path) == []


def test_vessl_default_uses_secret_references_and_no_secret_value(tmp_path):
    secrets = {"MLFLOW_TRACKING_USERNAME": "user-zq81", "MLFLOW_TRACKING_PASSWORD": TRICKY,
               "AWS_ACCESS_KEY_ID": "AKIAZQ81ZQ81", "AWS_SECRET_ACCESS_KEY": "secret-zq81-value"}
    res = run_sh(["vessl", "critic", "--local", "--print"],   # --local logs to a server (else its results are lost)
                 vessl_env(tmp_path, MLFLOW_TRACKING_URI="https://mlflow.example", **secrets))
    assert res.returncode == 0, res.stderr
    for value in secrets.values():
        assert value not in res.stdout and value not in res.stderr
    assert "p&ss" not in res.stdout
    e = yaml.safe_load(res.stdout)["env"]
    assert e["MLFLOW_TRACKING_USERNAME"] == {"secret": "wmtp-mlflow-username"}
    assert e["MLFLOW_TRACKING_PASSWORD"] == {"secret": "wmtp-mlflow-password"}
    assert e["AWS_ACCESS_KEY_ID"] == {"secret": "wmtp-aws-access-key-id"}
    assert e["AWS_SECRET_ACCESS_KEY"] == {"secret": "wmtp-aws-secret-access-key"}
    assert e["WMTP_PIPELINE"] == "critic" and e["WMTP_LOCAL"] == "1"
    assert e["AWS_DEFAULT_REGION"] == "eu-north-1"  # the guide's region by default
    # --local trains the micro model on builtin data: only the code is imported, whatever the sources say
    assert list(yaml.safe_load(res.stdout)["import"]) == ["/root/weighted-mtp"]
    assert tmpdir_entries(tmp_path) == []


def test_vessl_reads_dotenv(tmp_path):
    dotenv = tmp_path / "v.env"
    dotenv.write_text("VESSL_CLUSTER=from-dotenv\nMLFLOW_TRACKING_PASSWORD='a&b|c'\n")
    env = vessl_env(tmp_path, WMTP_ENV_FILE=str(dotenv), MLFLOW_TRACKING_USERNAME="u",
                    AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    res = run_sh(["vessl", "rho1", "--print", "--inline-secrets"], env)
    assert res.returncode == 0, res.stderr
    doc = yaml.safe_load(res.stdout)
    assert doc["resources"]["cluster"] == "from-dotenv"
    assert doc["env"]["MLFLOW_TRACKING_PASSWORD"]["value"] == "a&b|c"


@pytest.mark.parametrize("broken", ["missing-required", "missing-secret", "newline"])
def test_vessl_failing_halfway_leaves_nothing(tmp_path, broken):
    env = vessl_env(tmp_path, MLFLOW_TRACKING_USERNAME="u", MLFLOW_TRACKING_PASSWORD=TRICKY,
                    AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
    if broken == "missing-required":
        del env["VESSL_PRESET"]
        want = "VESSL_PRESET"
    elif broken == "missing-secret":
        del env["AWS_SECRET_ACCESS_KEY"]  # the last placeholder: the sed script is written by then
        want = "AWS_SECRET_ACCESS_KEY"
    else:
        env["AWS_SECRET_ACCESS_KEY"] = "line1\nline2"
        want = "AWS_SECRET_ACCESS_KEY contains a line break"
    res = run_sh(["vessl", "baseline", "--print", "--inline-secrets"], env)
    assert res.returncode != 0
    assert want in res.stderr
    assert res.stdout == ""
    assert TRICKY not in res.stderr
    assert tmpdir_entries(tmp_path) == []


@pytest.mark.parametrize("pipeline", ["baseline", "critic", "verifiable", "rho1"])
def test_vessl_imports_model_and_data_where_the_config_reads_them(tmp_path, pipeline):
    res = run_sh(["vessl", pipeline, "--print"], vessl_env(tmp_path))
    assert res.returncode == 0, res.stderr
    doc = yaml.safe_load(res.stdout)
    workdir = Path(doc["run"][0]["workdir"])  # where the trainer runs: relative config paths start there
    cfg = yaml.safe_load((ROOT / "configs" / pipeline / f"{pipeline}.yaml").read_text())

    def imported_from(path: str):
        full = workdir / path
        holders = [source for mount, source in doc["import"].items() if Path(mount) in (full, *full.parents)]
        assert len(holders) == 1, f"{full}: imported by {holders}"
        return holders[0]

    assert doc["import"][cfg["model"]["path"]] == SOURCES["WMTP_MODEL_SOURCE"]  # the model dir is the mount itself
    assert imported_from(cfg["model"]["path"]) == SOURCES["WMTP_MODEL_SOURCE"]
    assert imported_from(cfg["dataset"]["train"]) == SOURCES["WMTP_DATA_SOURCE"]
    assert imported_from(cfg["dataset"]["validation"]) == SOURCES["WMTP_DATA_SOURCE"]
    assert cfg["dataset"]["train"] != cfg["dataset"]["validation"]
    reference = (cfg.get("reference") or {}).get("path", "")
    assert reference in ("", "auto")  # rho1: the newest baseline run's checkpoint, downloaded from S3


@pytest.mark.parametrize("unset", [("WMTP_MODEL_SOURCE",), ("WMTP_DATA_SOURCE",),
                                   ("WMTP_MODEL_SOURCE", "WMTP_DATA_SOURCE")])
def test_vessl_without_sources_names_them_in_one_line(tmp_path, unset):
    env = vessl_env(tmp_path)
    for key in unset:
        del env[key]
    res = run_sh(["vessl", "verifiable", "--print"], env)
    assert res.returncode == 1
    assert res.stdout == ""
    [line] = res.stderr.splitlines()
    assert line.startswith(f"run.sh: vessl.yaml needs {' '.join(unset)} (set in .env or the environment; "), line
    for key in set(SOURCES) - set(unset):
        assert key not in line
    assert tmpdir_entries(tmp_path) == []


@pytest.mark.parametrize("source", ["/data/codecontests", "codecontests", "s3://", "file:///data"])
def test_vessl_source_of_an_unknown_kind_is_named(tmp_path, source):
    res = run_sh(["vessl", "critic", "--print"], vessl_env(tmp_path, WMTP_DATA_SOURCE=source))
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr == (f"run.sh: WMTP_DATA_SOURCE must be one of the s3://, vessl-dataset://, vessl-model:// or "
                          f"hf:// URIs (got '{source}')\n")
    assert tmpdir_entries(tmp_path) == []


@pytest.mark.parametrize("model,data", [("hf://facebook/multi-token-prediction", "vessl-dataset://my-org/cc"),
                                        ("s3://b/models/7B_1T_4", "hf://datasets/deepmind/code_contests")])
def test_vessl_sources_of_every_kind_render(tmp_path, model, data):
    res = run_sh(["vessl", "baseline", "--print"], vessl_env(tmp_path, WMTP_MODEL_SOURCE=model, WMTP_DATA_SOURCE=data))
    assert res.returncode == 0, res.stderr
    imports = yaml.safe_load(res.stdout)["import"]
    assert (imports["/mnt/wmtp/model"], imports["/mnt/wmtp/data"]) == (model, data)


def test_vessl_bad_args(tmp_path):
    res = run_sh(["vessl", "nope", "--print"], vessl_env(tmp_path))
    assert res.returncode == 2 and "unknown pipeline" in res.stderr
    res = run_sh(["vessl", "baseline", "--frobnicate"], vessl_env(tmp_path))
    assert res.returncode == 2 and "--frobnicate" in res.stderr


def test_vessl_refuses_what_a_node_cannot_clone_or_would_lose_and_passes_overrides(tmp_path):
    res = run_sh(["vessl", "baseline", "--print"], vessl_env(tmp_path, GIT_URL="/work/me/weighted-mtp"))
    assert res.returncode == 1 and res.stderr == (
        "run.sh: vessl: GIT_URL '/work/me/weighted-mtp' is not a URL a VESSL node can clone (https://, ssh://, "
        "git@host:org/repo): set GIT_URL, or add a remote with git remote add origin URL\n")
    env = {k: v for k, v in vessl_env(tmp_path).items() if k != "GIT_REF"}   # the default ref: this HEAD
    clone = tmp_path / "clone"   # a checkout whose HEAD is on no remote branch
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    for name in ("run.sh", "vessl.yaml", "scripts", "configs"):  # configs/: run.sh's pipelines
        (clone / name).symlink_to(ROOT / name)
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = subprocess.run([str(clone / "run.sh"), "vessl", "baseline", "--print"], cwd=clone, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.startswith(
        f"run.sh: vessl: commit {head} (HEAD) is on no remote branch, so VESSL cannot fetch it: git push first"), \
        res.stderr
    res = run_sh(["vessl", "baseline", "--local", "--print"], vessl_env(tmp_path))
    assert res.returncode == 1 and "vessl --local: MLFLOW_TRACKING_URI is empty" in res.stderr
    res = run_sh(["vessl", "baseline", "--print", "--override", "training.max_steps=5", "--override",
                  "dataset.train=builtin:arith+pyfunc*4"], vessl_env(tmp_path))
    assert res.returncode == 0, res.stderr
    run = yaml.safe_load(res.stdout)
    assert run["env"]["WMTP_OVERRIDES"] == (
        "--override=training.max_steps=5 --override=dataset.train=builtin:arith+pyfunc*4")
    command = run["run"][0]["command"]
    assert "set -f" in command and "${WMTP_LOCAL:+--local} ${WMTP_FSDP:+--fsdp} $WMTP_OVERRIDES" in command
    res = run_sh(["vessl", "baseline", "--print", "--override", "experiment.description=a b"], vessl_env(tmp_path))
    assert res.returncode == 2 and "--override needs one k=v without blanks" in res.stderr


def _fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    """A `vessl` that records its argv, the file's mode and content; a `sed` wrapper that logs argv."""
    fake = tmp_path / "fakebin"
    fake.mkdir()
    record = tmp_path / "record"
    record.mkdir()
    real_sed = shutil.which("sed")
    (fake / "vessl").write_text(f"""#!/bin/sh
printf '%s\\n' "$@" > {record}/vessl-argv
stat -c %a "$4" > {record}/mode
cp "$4" {record}/run.yaml
echo submitted
""")
    (fake / "sed").write_text(f"""#!/bin/sh
printf '%s\\n' "$@" >> {record}/sed-argv
exec {real_sed} "$@"
""")
    for f in ("vessl", "sed"):
        (fake / f).chmod(0o755)
    return fake, record


def test_vessl_submits_a_private_temp_file_and_removes_it(tmp_path):
    fake, record = _fake_bin(tmp_path)
    env = vessl_env(tmp_path, MLFLOW_TRACKING_USERNAME="u", MLFLOW_TRACKING_PASSWORD=TRICKY,
                    AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="aws-secret-zq81")
    env["PATH"] = f"{fake}:{env['PATH']}"
    res = run_sh(["vessl", "verifiable", "--inline-secrets"], env)
    assert res.returncode == 0, res.stderr
    assert "submitted" in res.stdout
    argv = (record / "vessl-argv").read_text().splitlines()
    assert argv[:3] == ["run", "create", "-f"]
    assert argv[3].startswith(str(tmp_path / "tmpdir") + "/")
    assert (record / "mode").read_text().strip() == "600"
    assert yaml.safe_load((record / "run.yaml").read_text())["env"]["MLFLOW_TRACKING_PASSWORD"]["value"] == TRICKY
    # sed got the values from a script file (-f), never on its command line
    sed_argv = (record / "sed-argv").read_text()
    assert "-f" in sed_argv.splitlines()
    assert "p&ss" not in sed_argv and "aws-secret-zq81" not in sed_argv
    assert not Path(argv[3]).exists()
    assert tmpdir_entries(tmp_path) == []


def test_vessl_without_cli_says_how_to_submit(tmp_path):
    env = vessl_env(tmp_path)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if p and not (Path(p) / "vessl").exists())
    res = run_sh(["vessl", "baseline"], env)
    assert res.returncode == 1
    assert "vessl CLI is not installed" in res.stderr
    assert "--print" in res.stderr and "vessl run create -f" in res.stderr
    assert tmpdir_entries(tmp_path) == []


# -------------------------------------------------------------------------------- .env.example, CI
def test_env_example_has_the_guides_variables_and_only_placeholders():
    text = (ROOT / ".env.example").read_text()
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = shlex.split(value)[0] if value else ""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        assert key in values, key
    assert "MLFLOW_S3_ENDPOINT_URL" in text
    for secret in ("MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert values[secret].startswith("<") and values[secret].endswith(">"), secret
    assert values["MLFLOW_TRACKING_USERNAME"] == "wmtp_admin"


def test_test_command_treats_no_tests_as_failure(tmp_path):
    empty = tmp_path / "no_tests_here"
    empty.mkdir()
    res = run_sh(["test", str(empty), "-p", "no:cacheprovider"], base_env(tmp_path))
    assert res.returncode != 0
    assert "no tests" in res.stderr


# ------------------------------------------------------------------------- real 2-process training
REPO_LITTER = ("mlflow.db", "mlruns", "mlartifacts", "checkpoints", "outputs")


@pytest.mark.skipif(not TRAINER.exists(), reason="weighted_mtp.py has not landed yet")
def test_verifiable_local_trains_with_two_cpu_processes(tmp_path, empty_store):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    def litter():
        return {name for name in REPO_LITTER if (ROOT / name).exists()} | {
            str(p) for name in REPO_LITTER if (ROOT / name).is_dir() for p in (ROOT / name).rglob("*")}

    before = litter()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    shutil.copy(empty_store, tmp_path / "mlflow.db")   # the session's migrated store (tests/conftest.py)
    # Create the experiment first so its artifacts land in tmp_path, not ./mlruns of the CWD.
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("weighted-mtp/production", artifact_location=str(tmp_path / "artifacts"))

    env = base_env(tmp_path, MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1")
    try:  # the suite's tiny micro-model settings (tests/conftest.py), to keep this under a minute
        from conftest import TINY
    except ImportError:
        TINY = []
    common = [a for kv in [*TINY, "training.max_steps=3", f"checkpoint.dir={tmp_path}/ckpt",
                           f"mlflow.tracking_uri={uri}"] for a in ("--override", kv)]
    # verifiable starts from the newest finished critic (critic.checkpoint: auto), and the local
    # critic from the newest baseline: train both first, one process each, in the same store.
    for prereq in ("baseline", "critic"):
        res = run_sh([prereq, "--local", *common], env, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert res.stdout.startswith(f"+ python -m weighted_mtp train --config configs/{prereq}/{prereq}_local.yaml")
    res = run_sh(["verifiable", "--local", *common], {**env, "NPROC_PER_NODE": "2"}, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.splitlines()[0].startswith(
        "+ torchrun --standalone --nproc_per_node=2 -m weighted_mtp train"
        " --config configs/verifiable/verifiable_local.yaml --use-micro-model")

    exp = client.get_experiment_by_name("weighted-mtp/production")
    assert exp.experiment_id == exp_id
    runs = client.search_runs([exp_id], run_view_type=ViewType.ALL, max_results=100)
    by_name = {}
    for r in runs:
        by_name.setdefault(r.info.run_name, []).append(r)
    assert sorted(by_name) == ["baseline-mtp", "critic-pretrain", "verifiable-wmtp"]
    assert len(by_name["verifiable-wmtp"]) == 1  # one run per job, whatever the world size
    assert [r.info.status for rs in by_name.values() for r in rs] == ["FINISHED"] * 3
    after = litter()
    assert after == before, f"the run wrote into the repo: {after - before}"
