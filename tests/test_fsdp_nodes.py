"""Sharded checkpoints across nodes without a shared disk: two torchrun agents (2 processes each) rendezvous as two
nodes on this machine, each in its own directory with a relative checkpoint.dir, so neither sees the other's files.
The job starts from a first run's checkpoint (model.init_from=auto): rank 0 resolves it, each node downloads the same
S3 object into its own cache. Every rank uploads the shard files it wrote into the run's artifacts on a real (moto)
S3 server, rank 0 trainer.pt last; a resume on two empty disks fetches on each node what its ranks read, checked
against trainer.pt's manifest, and ends at the weights the crashed job had reached at the step it failed after
(tests/faults.py gathers them from every rank first): an uninterrupted job's, with no second job to compare with.
"""
import os
import shutil
from unittest import mock

import pytest
import torch

import s3ckpt
import weighted_mtp as wm
from conftest import tiny_config
from s3server import BUCKET, CREDENTIALS, MotoS3, moto_s3  # noqa: F401 (a fixture)
from test_reliability import FAULTY, environment, runs_of, store, train_args
from test_reliability import two_nodes as launch_two_nodes

SHARDED = ["training.parallel=fsdp", "checkpoint.format=sharded", "mlflow.s3_artifacts=s3://wmtp/mlflow-artifacts",
           "mlflow.system_metrics_interval_s=0", "training.eval_interval=0",
           "training.max_steps=3"]
# the job's starting checkpoint: one process, whole-file checkpoints, MLflow's artifacts in S3 (what auto finds)
FIRST = ["mlflow.s3_artifacts=s3://wmtp/mlflow-artifacts", "mlflow.system_metrics_interval_s=0",
         "training.eval_interval=0", "training.max_steps=2"]
STEP = "checkpoint_step_2"  # 3 steps, a step checkpoint every 2 (TINY)


def two_nodes(tmp_path, env, *overrides, trainer=("-m", "weighted_mtp")):
    """The sharded run on two nodes of 2 processes, each with checkpoint.dir=ckpt (its own disk)."""
    return launch_two_nodes(tmp_path, env, train_args("ckpt", *SHARDED, *overrides, trainer=trainer), 2)


def s3_objects(s3, prefix):
    listed = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):]: s3.client().get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
            for o in listed}


def assert_each_disk_holds_its_nodes_shards_and_s3_all(tmp_path, s3, run_id):
    """Step 2's sharded checkpoint of the run: each node's disk holds its two ranks' shards, S3 all of them byte for
    byte and trainer.pt's manifest of their sizes -> the checkpoint's S3 prefix."""
    prefix = f"mlflow-artifacts/weighted-mtp-production/{run_id}/artifacts/checkpoints/{STEP}/"
    remote = s3_objects(s3, prefix)
    shards = [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]
    assert sorted(remote) == sorted([*shards, "trainer.pt", "trainer.pt.sha256"])
    local = {}
    for name in ("node_a", "node_b"):  # each disk holds its own node's two ranks' shards only
        (step_dir,) = (tmp_path / name / "ckpt").glob(f"baseline-mtp/{run_id}/{STEP}")
        files = {f.name: f.read_bytes() for f in step_dir.iterdir() if f.is_file()}
        assert len([f for f in files if f.endswith(".distcp")]) == 2, (name, sorted(files))
        local.update(files)
    assert sorted(local) == sorted(remote) and all(remote[f] == local[f] for f in local)  # byte for byte
    trainer = s3.client().get_object(Bucket=BUCKET, Key=prefix + "trainer.pt")["Body"]
    (tmp_path / "trainer.pt").write_bytes(trainer.read())
    manifest = torch.load(tmp_path / "trainer.pt", weights_only=False)["shards"]
    assert sorted(manifest) == shards
    assert all(manifest[f][0] == len(remote[f]) for f in shards)
    return prefix


def test_two_nodes_without_a_shared_disk_resume_from_s3_alone(tmp_path, empty_store):  # noqa: F811
    s3 = MotoS3().start()
    try:
        uri = store(empty_store, tmp_path)
        env = environment(uri, **CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3.url)
        # the starting checkpoint: a one-process run's checkpoint_final.pt, uploaded to its artifacts in S3 (trained
        # here, in the test's process, with the jobs' environment)
        with mock.patch.dict(os.environ, env, clear=True):
            baseline = wm.train(tiny_config("baseline", tmp_path / "first", *FIRST), use_micro=True)["run_id"]
        _, (first,) = runs_of(uri)  # the store's one run so far
        assert first.info.run_id == baseline and first.info.status == "FINISHED"
        (start,) = (tmp_path / "first").glob(f"ckpt/baseline-mtp/{baseline}/checkpoint_final.pt")
        # rank 0 crashes after step 3: step 2's checkpoint is the newest, its upload finished by the failing run; the
        # weights of step 3, gathered from every rank just before, are what an uninterrupted job ends with
        snapshot = tmp_path / "step3.pt"
        crashed = two_nodes(tmp_path, {**env, "WMTP_TEST_FAULT": "0:3", "WMTP_TEST_SNAPSHOT": str(snapshot)},
                            "model.init_from=auto", trainer=FAULTY)
        assert [rc for rc, _ in crashed] != [0, 0]
        assert any("WMTP_TEST_FAULT: rank 0 fails once at step 3" in err for _, err in crashed), crashed[0][1][-3000:]
        key = (f"mlflow-artifacts/weighted-mtp-production/{baseline}/artifacts/checkpoints/"
               "checkpoint_final.pt")
        remote_start = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert remote_start == start.read_bytes()
        for name in ("node_a", "node_b"):  # rank 0's node and the other: each has its own copy of the start
            assert (tmp_path / name / "ckpt" / ".cache" / "s3" / BUCKET / key).read_bytes() == remote_start, name
        _, runs = runs_of(uri)
        assert len(runs) == 2 and baseline in [r.info.run_id for r in runs]  # the first run, the job's
        (run,) = [r for r in runs if r.info.run_id != baseline]
        assert run.info.status == "FAILED" and run.data.tags["wmtp.init_from.run"] == baseline
        prefix = assert_each_disk_holds_its_nodes_shards_and_s3_all(tmp_path, s3, run.info.run_id)

        # both disks lost: --resume auto finds the run's step 2 in S3 and each node fetches what its ranks read
        for name in ("node_a", "node_b"):
            shutil.rmtree(tmp_path / name / "ckpt")
        resumed = two_nodes(tmp_path, env, "model.init_from=auto", "checkpoint.resume=auto")
        assert [rc for rc, _ in resumed] == [0, 0], "\n".join(err[-3000:] for _, err in resumed)
        log = "".join(err for _, err in resumed)
        assert ", resumed at step 2 from " in log and f"/.cache/s3/{BUCKET}/{prefix}".rstrip("/") in log, log[-3000:]
        _, runs = runs_of(uri)
        assert sorted(r.info.run_id for r in runs) == sorted([baseline, run.info.run_id])  # continued
        assert all(r.info.status == "FINISHED" for r in runs)
        (final,) = tmp_path.glob("node_*/ckpt/baseline-mtp/*/checkpoint_final.pt")  # rank 0's node has it
        ours, theirs = torch.load(final, weights_only=False)["model"], torch.load(snapshot)
        assert sorted(ours) == sorted(theirs)
        begun = torch.load(start, weights_only=False)["model"]
        assert any(not torch.equal(theirs[k], begun[k]) for k in begun)  # the snapshot is of weights that trained
        worst = max((ours[k].double() - theirs[k].double()).abs().max().item() for k in theirs)
        assert worst <= 1e-6, worst  # the same world, the same reductions: as tests/test_fsdp.py

    finally:
        s3.stop()


def test_a_missing_or_corrupted_remote_shard_is_named_and_intact_local_copies_are_not_downloaded(tmp_path, moto_s3):
    """s3ckpt.fetch_shards, what each node's local rank 0 runs, against the moto server over HTTP."""
    step = tmp_path / "run" / STEP
    step.mkdir(parents=True)
    for name, data in ((".metadata", b"meta"), ("__0_0.distcp", b"zero" * 100), ("__1_0.distcp", b"one" * 100)):
        (step / name).write_bytes(data)
    manifest = s3ckpt.shard_manifest(step)
    uri = f"s3://{BUCKET}/runs/r1/checkpoints/{STEP}"
    for name in manifest:
        moto_s3.client().put_object(Bucket=BUCKET, Key=f"runs/r1/checkpoints/{STEP}/{name}",
                                    Body=(step / name).read_bytes())
    cache = tmp_path / "cache"
    # all there and intact: the local directory itself, nothing downloaded
    assert s3ckpt.fetch_shards(step, uri, sorted(manifest), manifest, cache) == step and not cache.exists()
    # one lost locally: it alone is downloaded, the intact local ones linked beside it in the cache
    (step / "__1_0.distcp").unlink()
    got = s3ckpt.fetch_shards(step, uri, sorted(manifest), manifest, cache)
    assert got == cache / "s3" / BUCKET / "runs/r1/checkpoints" / STEP
    assert s3ckpt.shard_manifest(got) == manifest and (got / "__0_0.distcp").stat().st_nlink == 2
    # the remote copy corrupted (its size unchanged), or gone: a one-line error naming it
    shutil.rmtree(cache)
    moto_s3.client().put_object(Bucket=BUCKET, Key=f"runs/r1/checkpoints/{STEP}/__1_0.distcp", Body=b"eno" * 100)
    with pytest.raises(s3ckpt.CheckpointError) as e:
        s3ckpt.fetch_shards(step, uri, sorted(manifest), manifest, cache)
    corrupt = "checksum mismatch with its checkpoint's trainer.pt (corrupted or truncated)"
    assert str(e.value) == f"{uri}/__1_0.distcp: {corrupt}"
    moto_s3.client().delete_object(Bucket=BUCKET, Key=f"runs/r1/checkpoints/{STEP}/__1_0.distcp")
    with pytest.raises(s3ckpt.CheckpointError) as e:
        s3ckpt.fetch_shards(step, uri, sorted(manifest), manifest, cache)
    assert str(e.value).startswith(f"{uri}/__1_0.distcp: cannot download (") and "\n" not in str(e.value)
    # without a run to download from: the local file is named
    with pytest.raises(s3ckpt.CheckpointError, match=r"__1_0.distcp: missing \(its checkpoint's trainer.pt lists it\)"):
        s3ckpt.fetch_shards(step, None, sorted(manifest), manifest, cache)
