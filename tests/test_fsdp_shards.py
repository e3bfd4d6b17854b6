"""A sharded checkpoint's trainer.pt lists every shard file with its size and sha256 (s3ckpt.shard_manifest); a
resume checks them first: a missing or corrupted shard is a one-line error naming the file, never a partial load."""
import shutil
import subprocess

import torch

from conftest import ROOT, TINY
from test_reliability import TORCHRUN, environment


def train(tmp_path, ckpt, *overrides):
    args = ["-m", "weighted_mtp", "train", "--config", str(ROOT / "configs/baseline/baseline_local.yaml"),
            "--use-micro-model"]
    for o in [*TINY, f"checkpoint.dir={ckpt}", "training.parallel=fsdp", "checkpoint.format=sharded",
              "mlflow.enable_logging=false", *overrides]:
        args += ["--override", o]
    return subprocess.run(TORCHRUN + args, cwd=tmp_path, env=environment(f"sqlite:///{tmp_path}/unused.db"),
                          capture_output=True, text=True, timeout=300)


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
    for copy, error in ((missing, "__1_0.distcp: missing (its checkpoint's trainer.pt lists it)"),
                        (corrupt, "__0_0.distcp: checksum mismatch (corrupted or truncated)")):
        r = train(tmp_path, tmp_path / f"resume-{copy.name}", f"checkpoint.resume={copy / step2.name}")
        assert r.returncode != 0
        # each rank, one line (the two ranks' lines may interleave on the shared stderr pipe)
        assert r.stderr.count(f"error: {copy / step2.name}/{error}") == 2, r.stderr[-3000:]
    r = train(tmp_path, tmp_path / "resume-intact", f"checkpoint.resume={step2}")
    assert r.returncode == 0 and ", resumed at step 2 from " in r.stderr, r.stderr[-3000:]
