"""A sharded checkpoint's trainer.pt lists every shard file with its size and sha256 (s3ckpt.shard_manifest); a
resume checks them first: a missing or corrupted shard is a one-line error naming the file, never a partial load."""
import json
import shutil
import subprocess

import torch

from conftest import ROOT, TINY, workers_said
from test_reliability import TORCHRUN, environment

CONFIG = str(ROOT / "configs/baseline/baseline_local.yaml")
SHARDED = [*TINY, "training.parallel=fsdp", "checkpoint.format=sharded", "mlflow.enable_logging=false"]


def train(tmp_path, ckpt, *overrides):
    args = ["-m", "weighted_mtp", "train", "--config", CONFIG, "--use-micro-model"]
    for o in [*SHARDED, f"checkpoint.dir={ckpt}", *overrides]:
        args += ["--override", o]
    return subprocess.run(TORCHRUN + args, cwd=tmp_path, env=environment(f"sqlite:///{tmp_path}/unused.db"),
                          capture_output=True, text=True, timeout=300)


# One torchrun launch for the three resumes: the intact one through the CLI (the trainer's own process group, which
# train() destroys at its end), then prepare() of each broken copy in a fresh group (a FileStore: the launcher's
# store still holds the first group's addresses). The CLI's exit code 2 for a UserError: tests/test_bad_input.py.
RESUMES = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import weighted_mtp as wm
from wmtp.config import UserError, load_config
argv = ["train", "--config", {config!r}, "--use-micro-model"]
for o in {sharded!r} + ["checkpoint.dir={tmp}/resume-intact", "checkpoint.resume={step}"]:
    argv += ["--override", o]
code = wm.main(argv)
rank = int(__import__("os").environ["RANK"])
dist.init_process_group("gloo", init_method="file://{tmp}/errors.store", rank=rank, world_size=2)
errors = {{}}
for copy in {copies!r}:
    cfg = load_config({config!r}, {sharded!r} + ["checkpoint.dir={tmp}/resume-" + copy.rsplit("/", 2)[-2],
                                                 "checkpoint.resume=" + copy])
    try:
        wm.prepare(cfg, True, rank, 2, torch.device("cpu"))
        errors[copy] = None
    except UserError as e:
        errors[copy] = str(e)
json.dump({{"intact": code, "errors": errors}}, open("{tmp}/rank" + str(rank) + ".json", "w"))
dist.destroy_process_group()
"""


def test_a_missing_or_corrupted_shard_is_named_before_anything_loads(tmp_path):
    r = train(tmp_path, tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    (step2,) = (tmp_path / "run").glob("*/*/checkpoint_step_2")
    shards = torch.load(step2 / "trainer.pt", weights_only=False)["shards"]
    files = sorted(f.name for f in step2.iterdir() if not f.name.startswith("trainer.pt"))
    assert sorted(shards) == files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    for name, (size, digest) in shards.items():
        assert size == (step2 / name).stat().st_size and len(digest) == 64
    missing, corrupt = tmp_path / "missing", tmp_path / "corrupt"
    for copy in (missing, corrupt):
        shutil.copytree(step2, copy / step2.name)
    (missing / step2.name / "__1_0.distcp").unlink()
    data = bytearray((corrupt / step2.name / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit pattern flipped, the size unchanged
    (corrupt / step2.name / "__0_0.distcp").write_bytes(bytes(data))
    copies = {str(missing / step2.name): "__1_0.distcp: missing (its checkpoint's trainer.pt lists it)",
              str(corrupt / step2.name): "__0_0.distcp: checksum mismatch (corrupted or truncated)"}
    script = tmp_path / "resumes.py"
    script.write_text(RESUMES.format(root=str(ROOT), config=CONFIG, sharded=SHARDED, tmp=str(tmp_path),
                                     step=str(step2), copies=sorted(copies)))
    r = subprocess.run(TORCHRUN + [str(script)], cwd=tmp_path, env=environment(f"sqlite:///{tmp_path}/unused.db"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, workers_said(r.stderr)
    assert ", resumed at step 2 from " in r.stderr, r.stderr[-3000:]
    for k in range(2):  # each rank refuses each broken copy with one line naming the file, before loading anything
        out = json.loads((tmp_path / f"rank{k}.json").read_text())
        assert out["intact"] == 0 and sorted(out["errors"]) == sorted(copies), (k, out)
        for copy, error in copies.items():
            assert out["errors"][copy] == f"{copy}/{error}", (k, out)
