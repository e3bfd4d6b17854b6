"""A sharded checkpoint's trainer.pt lists every shard file with its size and sha256 (s3ckpt.shard_manifest); a
resume checks them first: a missing or corrupted shard is a one-line error naming the file, never a partial load.

One torchrun launch (SCENARIO), one process group (train() runs in its caller's group and leaves it standing; a second
group would hang, pytorch#135712): a sharded training through the CLI, rank 0 then copies its step-2 checkpoint twice,
one copy missing a shard and one with a corrupted one; the CLI resumes the intact checkpoint, and prepare() of each
broken copy must refuse it. The CLI's exit code 2 for a UserError: tests/test_bad_input.py."""
import json
import subprocess

import torch

from conftest import ROOT, TINY, workers_said
from test_reliability import TORCHRUN, environment

CONFIG = str(ROOT / "configs/baseline/baseline_local.yaml")
SHARDED = [*TINY, "training.parallel=fsdp", "checkpoint.format=sharded", "mlflow.enable_logging=false"]
BROKEN = {"missing": "__1_0.distcp: missing (its checkpoint's trainer.pt lists it)",
          "corrupt": "__0_0.distcp: checksum mismatch (corrupted or truncated)"}

SCENARIO = """
import json, pathlib, shutil, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import weighted_mtp as wm
from wmtp.config import UserError, load_config

def cli(ckpt, *overrides):
    argv = ["train", "--config", {config!r}, "--use-micro-model"]
    for o in {sharded!r} + ["checkpoint.dir=" + ckpt, *overrides]:
        argv += ["--override", o]
    return wm.main(argv)

dist.init_process_group("gloo")
rank = dist.get_rank()
codes = [cli("{tmp}/run")]
dist.barrier()  # both ranks' shards written
(step2,) = pathlib.Path("{tmp}/run").glob("*/*/checkpoint_step_2")
copies = {{name: pathlib.Path("{tmp}", name, step2.name) for name in ("missing", "corrupt")}}
if rank == 0:
    for copy in copies.values():
        shutil.copytree(step2, copy)
    (copies["missing"] / "__1_0.distcp").unlink()
    data = bytearray((copies["corrupt"] / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit pattern flipped, the size unchanged
    (copies["corrupt"] / "__0_0.distcp").write_bytes(bytes(data))
dist.barrier()
codes.append(cli("{tmp}/resume-intact", "checkpoint.resume=" + str(step2)))
errors = {{}}
for name, copy in copies.items():
    overrides = ["checkpoint.dir={tmp}/resume-" + name, "checkpoint.resume=" + str(copy)]
    cfg = load_config({config!r}, {sharded!r} + overrides)
    try:
        wm.prepare(cfg, True, rank, 2, torch.device("cpu"))
        errors[str(copy)] = None
    except UserError as e:
        errors[str(copy)] = str(e)
json.dump({{"codes": codes, "errors": errors}}, open("{tmp}/rank" + str(rank) + ".json", "w"))
dist.destroy_process_group()
wm.exit_worker(0)  # as the CLI's torchrun workers leave: gloo's threads can abort Python's finalisation
"""


def test_a_missing_or_corrupted_shard_is_named_before_anything_loads(tmp_path):
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO.format(root=str(ROOT), config=CONFIG, sharded=SHARDED, tmp=str(tmp_path)))
    r = subprocess.run(TORCHRUN + [str(script)], cwd=tmp_path, env=environment(f"sqlite:///{tmp_path}/unused.db"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, workers_said(r.stderr)
    (step2,) = (tmp_path / "run").glob("*/*/checkpoint_step_2")
    shards = torch.load(step2 / "trainer.pt", weights_only=False)["shards"]
    files = sorted(f.name for f in step2.iterdir() if not f.name.startswith("trainer.pt"))
    assert sorted(shards) == files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    for name, (size, digest) in shards.items():
        assert size == (step2 / name).stat().st_size and len(digest) == 64
    assert ", resumed at step 2 from " in r.stderr, r.stderr[-3000:]
    copies = {str(tmp_path / name / step2.name): error for name, error in BROKEN.items()}
    for k in range(2):  # each rank: the training and the intact resume exit 0, and each broken copy is refused
        out = json.loads((tmp_path / f"rank{k}.json").read_text())   # with one line naming the file, before loading
        assert out["codes"] == [0, 0], (k, out)
        assert sorted(out["errors"]) == sorted(copies), (k, out)
        for copy, error in copies.items():
            assert out["errors"][copy] == f"{copy}/{error}", (k, out)
