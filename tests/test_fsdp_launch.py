"""./run.sh <pipeline> --fsdp and ./run.sh vessl <pipeline> --fsdp launch configs/<p>/<p>_fsdp.yaml (issue 24)."""
import hashlib
import sys

import pytest
import yaml

from test_launch import PROD_CREDS, ROOT, base_env, run_sh, tmpdir_entries, vessl_env


def installed_venv(tmp_path):
    """A venv run.sh finds installed (its stamp is this pyproject's): its python is this interpreter, pip a no-op."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 0\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".wmtp-installed").write_text(hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest() + "\n")
    return venv


@pytest.mark.parametrize("pipeline", ["baseline", "critic", "verifiable", "rho1"])
def test_fsdp_flag_launches_the_fsdp_config(tmp_path, pipeline):
    env = base_env(tmp_path, WMTP_GPU_COUNT="4", WMTP_VENV=str(installed_venv(tmp_path)), **PROD_CREDS)
    res = run_sh([pipeline, "--fsdp", "--dry-run"], env)
    assert res.stdout.splitlines()[0] == (  # --dry-run: the one planning process, for the launch's 4
        f"+ python -m weighted_mtp train --config configs/{pipeline}/{pipeline}_fsdp.yaml --dry-run --nproc 4"
    ), res.stderr
    assert "training.parallel" not in res.stderr and "parallel: fsdp" in res.stdout  # the merged config it read


def test_fsdp_and_local_together_is_a_usage_error(tmp_path):
    res = run_sh(["baseline", "--local", "--fsdp"], base_env(tmp_path))
    assert res.returncode == 2
    assert "--local or --fsdp (or --local --override training.parallel=fsdp)" in res.stderr


def test_vessl_fsdp_passes_the_flag_to_the_run(tmp_path):
    res = run_sh(["vessl", "rho1", "--fsdp", "--print"], vessl_env(tmp_path))
    assert res.returncode == 0, res.stderr
    doc = yaml.safe_load(res.stdout)
    assert doc["env"]["WMTP_PIPELINE"] == "rho1" and doc["env"]["WMTP_FSDP"] == "1" and doc["env"]["WMTP_LOCAL"] == ""
    assert './run.sh "$WMTP_PIPELINE" ${WMTP_LOCAL:+--local} ${WMTP_FSDP:+--fsdp}' in doc["run"][0]["command"]
    res = run_sh(["vessl", "rho1", "--print"], vessl_env(tmp_path))
    assert yaml.safe_load(res.stdout)["env"]["WMTP_FSDP"] == ""  # empty: run.sh adds no --fsdp
    assert tmpdir_entries(tmp_path) == []
