"""`pip install .` (not editable) gives a trainer that works from any directory: every module and every config is
in the installed package, nothing is read from the checkout."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT, TINY


def test_a_non_editable_install_trains_from_another_directory(tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, mlflow, ...) from this venv; the project itself from `pip install .` alone
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = tmp_path / "source"  # pip builds in the source tree (build/, *.egg-info): not in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__", "mlruns",
                                                                "mlartifacts", "checkpoints", "outputs", "mlflow.db"))
    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "-q", str(source)],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    run = lambda *args: subprocess.run([str(python), *args], cwd=work, env=env, capture_output=True, text=True,
                                       timeout=300)
    where = run("-c", "import weighted_mtp; from wmtp import config; print(weighted_mtp.__file__, config.CONFIGS)")
    assert where.returncode == 0, where.stderr
    module, configs = where.stdout.split()
    assert module == str(Path(site) / "weighted_mtp.py") and configs == str(venv / "share" / "weighted-mtp" / "configs")
    assert sorted(p.name for p in Path(configs).glob("*/*_local.yaml")) == sorted(
        p.name for p in (ROOT / "configs").glob("*/*_local.yaml"))
    helped = run("-m", "weighted_mtp", "--help")
    assert helped.returncode == 0 and "train" in helped.stdout and "evaluate" in helped.stdout
    overrides = [*TINY, "training.max_steps=2", "checkpoint.save_every=0", "mlflow.enable_logging=false",
                 f"checkpoint.dir={tmp_path / 'ckpt'}"]
    trained = run("-m", "weighted_mtp", "train", "--config", f"{configs}/baseline/baseline_local.yaml",
                  "--use-micro-model", *[f"--override={o}" for o in overrides])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert len(list((tmp_path / "ckpt" / "baseline-mtp").glob("*/checkpoint_final.pt"))) == 1
    assert list(work.iterdir()) == []  # nothing written into the working directory
