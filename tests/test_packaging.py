"""`pip install .` (not editable) gives a trainer that works from any directory: every module and every config is
in the installed package, nothing is read from the checkout. Neither that install nor the editable one run.sh makes
can be shadowed by what a researcher's directory holds: data/, model/, config/, weights/ folders and a config.py."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import ROOT, TINY


def researchers_directory(work):
    """A directory with the names a user's project has: folders named like our rooms (the package's own name among
    them) and a config.py that fails loudly if it is ever imported instead of ours."""
    for name in ("data", "model", "config", "weights", "wmtp"):
        (work / name).mkdir(parents=True)
        (work / name / "README.txt").write_text("the user's own\n")
    (work / "config.py").write_text("raise SystemExit(\"the user's config.py was imported\")\n")
    return sorted(p.name for p in work.iterdir())


def one_step(python, work, env, configs, ckpt):
    """`--help` and a one-step local training run from `work` -> (the help's stdout, the checkpoints written)."""
    run = lambda *args: subprocess.run([str(python), "-m", "weighted_mtp", *args], cwd=work, env=env,
                                       capture_output=True, text=True, timeout=300)
    helped = run("--help")
    assert helped.returncode == 0, helped.stderr[-3000:]
    overrides = [*TINY, "training.max_steps=1", "checkpoint.save_every=0", "mlflow.enable_logging=false",
                 f"checkpoint.dir={ckpt}"]
    trained = run("train", "--config", f"{configs}/baseline/baseline_local.yaml", "--use-micro-model",
                  *[f"--override={o}" for o in overrides])
    assert trained.returncode == 0, trained.stderr[-3000:]
    return helped.stdout, sorted(p.name for p in Path(ckpt).glob("baseline-mtp/*/checkpoint_*.pt"))


def test_the_editable_install_is_not_shadowed_by_a_researchers_directory(tmp_path):
    work = tmp_path / "project"
    planted = researchers_directory(work)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    probe = "import weights, wmtp.config as c; print(weights.__file__, c.__file__)"
    where = subprocess.run([sys.executable, "-c", probe],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.split() == [str(ROOT / "weights.py"), str(ROOT / "wmtp" / "config.py")], where.stderr
    helped, written = one_step(sys.executable, work, env, ROOT / "configs", tmp_path / "ckpt")
    assert "train" in helped and "evaluate" in helped and written == ["checkpoint_best.pt", "checkpoint_final.pt"]
    assert sorted(p.name for p in work.iterdir()) == planted  # nothing written into the user's directory


def test_a_non_editable_install_trains_from_another_directory(tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "elsewhere"
    planted = researchers_directory(work)
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
    assert sorted(p.relative_to(configs) for p in Path(configs).glob("*/*.yaml")) == sorted(
        p.relative_to(ROOT / "configs") for p in (ROOT / "configs").glob("*/*.yaml"))  # compare --control's too
    helped, written = one_step(python, work, env, configs, tmp_path / "ckpt")
    assert "train" in helped and "evaluate" in helped and written == ["checkpoint_best.pt", "checkpoint_final.pt"]
    assert sorted(p.name for p in work.iterdir()) == planted  # nothing written into the working directory
