"""The checkpoint format: file names in one place (s3ckpt), each component's part of the one flat dict, and a
checkpoint written before the split into parts (tests/fixtures/old_checkpoint_step_1.pt) resuming as it is."""
import ast
import importlib.util
from pathlib import Path
import shutil

import pytest
import s3ckpt
import torch

import weighted_mtp as wm
from wmtp.config import load_config

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OLD = FIXTURES / "old_checkpoint_step_1.pt"


def old_overrides():
    """The overrides the fixture was trained with (its generator's, so the two cannot drift apart)."""
    spec = importlib.util.spec_from_file_location("make_old_checkpoint", FIXTURES / "make_old_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OVERRIDES


def resume_config(tmp_path, *overrides):
    """The fixture's config, resuming from a copy of the fixture in a run directory of its own."""
    run_dir = tmp_path / "ckpt" / "baseline-mtp" / "local-old"
    run_dir.mkdir(parents=True)
    shutil.copy(OLD, run_dir / s3ckpt.step_name(1))
    return load_config(ROOT / "configs" / "baseline" / "baseline_local.yaml",
                       [*old_overrides(), f"checkpoint.dir={tmp_path / 'ckpt'}",
                        f"checkpoint.resume={run_dir / s3ckpt.step_name(1)}", *overrides])


def test_a_checkpoint_written_before_the_split_still_resumes(tmp_path):
    """The on-disk format did not change (each component reads its own keys of the same flat dict), so a step
    checkpoint written by the trainer before the split (commit 4ab8042, tests/fixtures/make_old_checkpoint.py)
    resumes as it is: at its step and data position, its weights and AdamW moments loaded, its run id kept."""
    old = torch.load(OLD, weights_only=False)
    s = wm.prepare(resume_config(tmp_path), use_micro=True)
    assert (s.start.step, s.start.position, s.start.run_id) == (1, 1, old["run_id"])
    assert s.start.run_id.startswith("local-2026") and s.start.best_val_loss == old["best_val_loss"]
    own = s.model.state_dict()
    assert own.keys() == old["model"].keys() and all(torch.equal(own[k], v) for k, v in old["model"].items())
    saved, loaded = old["optimizer"]["state"], s.optimizer.state_dict()["state"]
    assert len(saved) == len(loaded) == 30
    for i in saved:
        assert float(loaded[i]["step"]) == float(saved[i]["step"]) == 1.0
        assert torch.equal(loaded[i]["exp_avg"], saved[i]["exp_avg"])
        assert torch.equal(loaded[i]["exp_avg_sq"], saved[i]["exp_avg_sq"])
    assert torch.equal(torch.get_rng_state(), old["rng"]["torch"])  # the RNG continues where it stopped


def test_training_on_from_an_old_checkpoint_keeps_its_run_and_writes_the_same_keys(tmp_path):
    """One more step from the old checkpoint: the same run (its id, its directory), and the new final checkpoint
    has exactly the old file's keys (what export, evaluate and older trainers read)."""
    result = wm.train(resume_config(tmp_path), use_micro=True)
    old = torch.load(OLD, weights_only=False)
    assert (result["run_id"], result["steps"]) == (old["run_id"], 2)
    final = s3ckpt.load_checkpoint(tmp_path / "ckpt" / "baseline-mtp" / old["run_id"] / s3ckpt.FINAL)
    assert set(final) == set(old) and (final["step"], final["position"], final["finished"]) == (2, 2, True)


def test_each_component_reads_its_own_keys_and_the_former_ema_key():
    """checkpoint_part: a component's keys that the file holds; before the pipelines' split the pipeline's state was
    "ema" (a new file's own pipeline_state wins, even None); checkpoint_dict refuses a key of another part."""
    td_ema = {"mean": torch.tensor(0.25), "var": torch.tensor(2.0)}
    part = s3ckpt.checkpoint_part
    assert part({"ema": td_ema, "step": 3}, "pipeline") == {"pipeline_state": td_ema}
    assert part({"pipeline_state": None, "ema": td_ema}, "pipeline") == {"pipeline_state": None}
    assert part({"run_id": "r", "best_val_loss": 0.5, "step": 3}, "tracking") == {"run_id": "r", "best_val_loss": 0.5}
    assert s3ckpt.checkpoint_dict({"schedule": {"step": 3}, "data": {"position": 7}}) == {"step": 3, "position": 7}
    with pytest.raises(KeyError, match="'schedule' has no key 'position'"):
        s3ckpt.checkpoint_dict({"schedule": {"step": 3, "position": 7}})


def test_step_names_and_the_resumable_checkpoints_of_a_run(tmp_path):
    """step_name / checkpoint_step are inverses; a resume starts from best, step files and whole sharded steps."""
    assert (s3ckpt.step_name(120), s3ckpt.step_name(120, sharded=True)) == ("checkpoint_step_120.pt",
                                                                              "checkpoint_step_120")
    assert s3ckpt.checkpoint_step(s3ckpt.step_name(120)) == s3ckpt.checkpoint_step(s3ckpt.step_name(120, True)) == 120
    for name in (s3ckpt.BEST, s3ckpt.FINAL, s3ckpt.step_name(2), s3ckpt.RUN_LOG):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / s3ckpt.step_name(4, True)).mkdir()  # still being written: no trainer.pt yet
    (tmp_path / s3ckpt.step_name(6, True)).mkdir()
    (tmp_path / s3ckpt.step_name(6, True) / s3ckpt.SHARDED_STATE).write_bytes(b"x")
    assert sorted(p.name for p in s3ckpt.resumable_checkpoints(tmp_path)) == [
        "checkpoint_best.pt", "checkpoint_step_2.pt", "checkpoint_step_6"]


NAMES = ("checkpoint_best", "checkpoint_final", "checkpoint_step_", "trainer.pt", "training.log")


def name_literals(path):
    """(line, string) of each string constant in `path` (docstrings aside) that spells a checkpoint file name."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings and any(name in n.value for name in NAMES)]


def test_checkpoint_file_names_live_in_s3ckpt_alone():
    """Renaming a checkpoint file is one edit: no code but s3ckpt.py spells a name (docstrings may mention them)."""
    files = [p for p in [*ROOT.glob("*.py"), *ROOT.glob("wmtp/*.py"), *ROOT.glob("scripts/*.py")]
             if p.name != "s3ckpt.py"]
    found = {str(p.relative_to(ROOT)): name_literals(p) for p in files}
    assert {f: lines for f, lines in found.items() if lines} == {}
    assert sorted(v for _, v in name_literals(ROOT / "s3ckpt.py")) == [
        "checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_step_", "checkpoint_step_(\\d+)(\\.pt)?", "trainer.pt",
        "training.log"]
