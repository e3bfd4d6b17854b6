"""s3ckpt against a real S3 HTTP endpoint (moto's server) and a real MLflow sqlite store. Nothing is mocked."""
import concurrent.futures as cf
import hashlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import s3ckpt
from s3ckpt import (CheckpointError, CheckpointUploader, checkpoint_step, load_checkpoint, prune_local_checkpoints,
                    resolve_checkpoint, s3_client, save_checkpoint)
from conftest import new_store
from s3server import BUCKET, moto_s3, s3_server  # noqa: F401  (fixtures)

S3_LOCATION = f"s3://{BUCKET}/mlflow-artifacts/exp"


@pytest.fixture(scope="module")
def mlflow_db(empty_store, tmp_path_factory):
    """One sqlite store for the module (a copy of the session's migrated one); every test makes its own
    experiment."""
    return new_store(empty_store, tmp_path_factory.mktemp("mlflow"))


def new_run(mlflow_db, location, experiment=None, run_name="baseline-mtp", status=None, start_time=None):
    client = MlflowClient(mlflow_db)
    experiment = experiment or f"exp-{uuid.uuid4().hex[:8]}"
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=str(location))
    run = client.create_run(exp_id, start_time=start_time, run_name=run_name)
    if status:
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def ckpt(d, name, value, n=64):
    """A small checkpoint whose bytes depend on value."""
    return save_checkpoint({"step": value, "w": torch.full((n,), float(value))}, Path(d) / name)


def s3_objects(run_id, mlflow_db):
    """{name under checkpoints/: bytes} of the run's S3 artifacts."""
    bucket, prefix = s3ckpt._split_s3(MlflowClient(mlflow_db).get_run(run_id).info.artifact_uri)
    s3 = s3_client()
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/checkpoints/").get("Contents", [])]
    return {k.rsplit("/", 1)[1]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(s3ckpt, "BACKOFF_START_S", 0.1)


def fast_client():
    # one botocore attempt and a 1 s connect timeout, so the uploader's own retry loop is what the test sees
    return s3_client(max_attempts=1, connect_timeout=1, read_timeout=5)


# ----------------------------------------------------------------------------- local files

def test_save_load_round_trip(tmp_path):
    state = {"model": {"w": torch.randn(3, 4)}, "step": 7, "config": {"lr": 1e-3, "name": "x"}, "hist": [1, 2.5],
             "rng": torch.get_rng_state(), "best_val_loss": float("inf")}
    path = save_checkpoint(state, tmp_path / "ckpt" / "checkpoint_step_7.pt")
    out = load_checkpoint(path)
    assert torch.equal(out["model"]["w"], state["model"]["w"]) and torch.equal(out["rng"], state["rng"])
    assert (out["step"], out["config"], out["hist"], out["best_val_loss"]) == \
        (7, state["config"], [1, 2.5], float("inf"))
    assert Path(f"{path}.sha256").read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    save_checkpoint({"step": 8}, path)  # overwrite in place
    assert load_checkpoint(path) == {"step": 8}
    assert sorted(os.listdir(path.parent)) == ["checkpoint_step_7.pt", "checkpoint_step_7.pt.sha256"]  # no temp files


def test_corrupt_truncated_missing(tmp_path):
    path = ckpt(tmp_path, "checkpoint_best.pt", 1, n=4096)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
    Path(f"{path}.sha256").unlink()  # without a sidecar a truncated file is still refused
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_step():
    assert checkpoint_step("checkpoint_step_120.pt") == 120
    assert checkpoint_step("a/b/checkpoint_step_7.pt") == 7
    assert [checkpoint_step(n) for n in ("checkpoint_best.pt", "checkpoint_step_7.pt.sha256", "checkpoint_step_.pt")] \
        == [None, None, None]


def test_prune_orders_by_step_number(tmp_path):
    for step in (5, 10, 20, 100):
        ckpt(tmp_path, f"checkpoint_step_{step}.pt", step)
    ckpt(tmp_path, "checkpoint_best.pt", 0)
    ckpt(tmp_path, "checkpoint_final.pt", 0)
    removed = prune_local_checkpoints(tmp_path, 2)
    assert removed == [tmp_path / "checkpoint_step_5.pt", tmp_path / "checkpoint_step_10.pt"]
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {f"{n}{s}" for n in ("checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_step_20.pt",
                                        "checkpoint_step_100.pt") for s in ("", ".sha256")}
    assert prune_local_checkpoints(tmp_path, None) == [] and prune_local_checkpoints(tmp_path / "x", 1) == []


def test_writer_copies_now_writes_behind_and_prunes(tmp_path, monkeypatch):
    """The loop waits only for the CPU copy: the file appears later, with the values of the save() call even though
    training changed the tensor in place meanwhile; retention runs after each step checkpoint."""
    release, real_save = threading.Event(), s3ckpt.save_checkpoint

    def held_save(state, path):
        assert release.wait(10), "save() blocked on the write"
        return real_save(state, path)
    monkeypatch.setattr(s3ckpt, "save_checkpoint", held_save)
    writer, weight = s3ckpt.CheckpointWriter(save_total_limit=2), torch.tensor([1.0, 2.0])
    writer.save({"w": weight, "meta": {"step": 1}}, tmp_path / "checkpoint_step_1.pt")
    assert not (tmp_path / "checkpoint_step_1.pt").exists()
    weight.add_(10.0)  # the next optimizer step
    release.set()
    writer.wait()
    first = load_checkpoint(tmp_path / "checkpoint_step_1.pt")
    assert torch.equal(first["w"], torch.tensor([1.0, 2.0])) and first["meta"] == {"step": 1}
    for step in (2, 3):
        writer.save({"w": weight * step, "meta": {"step": step}}, tmp_path / f"checkpoint_step_{step}.pt")
    writer.save({"w": weight}, tmp_path / "checkpoint_best.pt")
    writer.wait()
    third = load_checkpoint(tmp_path / "checkpoint_step_3.pt")
    assert torch.equal(third["w"], torch.tensor([33.0, 36.0])) and third["meta"] == {"step": 3}
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint_best.pt", "checkpoint_step_2.pt",
                                                            "checkpoint_step_3.pt"]
    writer.close()


def test_writer_copy_is_taken_at_save(tmp_path):
    writer, weight = s3ckpt.CheckpointWriter(save_total_limit=None), torch.tensor([1.0, 2.0])
    writer.save({"w": weight, "nested": [weight, (weight,)]}, tmp_path / "checkpoint_step_1.pt")
    weight.add_(10.0)
    writer.close()
    state = load_checkpoint(tmp_path / "checkpoint_step_1.pt")
    for t in (state["w"], state["nested"][0], state["nested"][1][0]):
        assert torch.equal(t, torch.tensor([1.0, 2.0]))


def test_writer_error_surfaces_at_next_save_and_leaves_nothing(tmp_path):
    (tmp_path / "not-a-dir").write_text("x")
    writer = s3ckpt.CheckpointWriter(save_total_limit=2)
    writer.save({"w": torch.ones(2)}, tmp_path / "not-a-dir" / "checkpoint_step_1.pt")
    with pytest.raises(OSError):
        writer.save({"w": torch.ones(2)}, tmp_path / "checkpoint_step_2.pt")
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-dir"]


# ----------------------------------------------------------------------------- uploads

def test_s3_upload_then_cleanup_keeps_best_final_newest(moto_s3, fast_retries, mlflow_db, tmp_path):
    run_id = new_run(mlflow_db, S3_LOCATION)
    up = CheckpointUploader(run_id, tracking_uri=mlflow_db, retry_budget_s=30, client=fast_client())
    first = up.upload_to_s3_async(ckpt(tmp_path, "checkpoint_step_1.pt", 1)).result(30)
    assert first == f"{S3_LOCATION}/{run_id}/artifacts/checkpoints/checkpoint_step_1.pt"
    moto_s3.stop()  # S3 down: everything below queues, and the cleanup must wait for the uploads before it
    local = {}
    for name in [f"checkpoint_step_{s}.pt" for s in range(1, 7)] + ["checkpoint_best.pt", "checkpoint_final.pt"]:
        p = ckpt(tmp_path, name, checkpoint_step(name) or 99)
        local[name] = p.read_bytes()
        up.upload_to_s3_async(p)
    deleted = s3ckpt.CheckpointWriter(2, up).expire_remote()
    moto_s3.start()  # back (empty, as a restarted moto_server): the queued uploads retry and land
    assert up.wait(30) == []
    assert deleted.result() == [f"checkpoints/checkpoint_step_{s}.pt" for s in (1, 2, 3, 4)]
    objects = s3_objects(run_id, mlflow_db)
    kept = ("checkpoint_best.pt", "checkpoint_final.pt", "checkpoint_step_5.pt", "checkpoint_step_6.pt")
    assert sorted(objects) == sorted(f"{n}{s}" for n in kept for s in ("", ".sha256"))
    for name in kept:
        assert objects[name] == local[name]
        assert objects[f"{name}.sha256"].decode().strip() == hashlib.sha256(local[name]).hexdigest()
    assert not any((tmp_path / ".upload-snapshots").iterdir())  # snapshots go once uploaded
    up.close()


def test_cleanup_spares_names_an_upload_still_writes(s3_server, mlflow_db, tmp_path):
    run_id = new_run(mlflow_db, S3_LOCATION)
    up = CheckpointUploader(run_id, tracking_uri=mlflow_db)
    for step in (1, 2, 3, 4):
        up.upload_to_s3_async(ckpt(tmp_path, f"checkpoint_step_{step}.pt", step)).result(30)
    # stand-ins for uploads in flight (white box: deterministic timing): one submitted before the cleanup,
    # which the cleanup waits for, and a re-upload of step 1 submitted after it, which it must not delete
    before, after = cf.Future(), cf.Future()
    up._latest["checkpoints/checkpoint_best.pt"] = (before, "best")
    cleanup = s3ckpt.CheckpointWriter(2, up).expire_remote()
    up._latest["checkpoints/checkpoint_step_1.pt"] = (after, "step 1")
    time.sleep(0.2)
    assert not cleanup.done()
    before.set_result("ok")
    assert cleanup.result(30) == ["checkpoints/checkpoint_step_2.pt"]
    after.set_result("ok")
    assert {n for n in s3_objects(run_id, mlflow_db) if not n.endswith(".sha256")} == \
        {"checkpoint_step_1.pt", "checkpoint_step_3.pt", "checkpoint_step_4.pt"}
    up.close()


def test_multipart_upload(s3_server, mlflow_db, tmp_path, monkeypatch):
    monkeypatch.setattr(s3ckpt, "MULTIPART_CHUNK", 5 * 2**20)  # S3's smallest part
    run_id = new_run(mlflow_db, S3_LOCATION)
    up = CheckpointUploader(run_id, tracking_uri=mlflow_db)
    p = save_checkpoint({"w": torch.randn(3 * 2**20)}, tmp_path / "checkpoint_final.pt")  # 12 MiB: 3 parts
    up.upload_to_s3_async(p).result(60)
    assert s3_objects(run_id, mlflow_db)["checkpoint_final.pt"] == p.read_bytes()
    up.close()


def test_same_name_uploads_land_in_submission_order(s3_server, mlflow_db, tmp_path):
    run_id = new_run(mlflow_db, S3_LOCATION)
    up = CheckpointUploader(run_id, tracking_uri=mlflow_db, max_workers=2)
    # a big old best and a small new one: without ordering the old one would finish last and win
    up.upload_to_s3_async(save_checkpoint({"w": torch.randn(4 * 2**20)}, tmp_path / "checkpoint_best.pt"))
    newest = save_checkpoint({"w": torch.ones(4)}, tmp_path / "checkpoint_best.pt")
    up.upload_to_s3_async(newest)
    assert up.wait(60) == []
    assert s3_objects(run_id, mlflow_db)["checkpoint_best.pt"] == newest.read_bytes()
    up.close()


def test_snapshot_is_taken_at_submit_time(moto_s3, fast_retries, mlflow_db, tmp_path):
    run_id = new_run(mlflow_db, S3_LOCATION)
    up = CheckpointUploader(run_id, tracking_uri=mlflow_db, retry_budget_s=30, client=fast_client())
    moto_s3.stop()  # S3 down: the uploads stay queued while the trainer moves on
    first = ckpt(tmp_path, "checkpoint_best.pt", 1).read_bytes()
    step = ckpt(tmp_path, "checkpoint_step_1.pt", 1)
    step_bytes = step.read_bytes()
    futures = [up.upload_to_s3_async(tmp_path / "checkpoint_best.pt"), up.upload_to_s3_async(step)]
    ckpt(tmp_path, "checkpoint_best.pt", 2)  # a newer best replaces the file (os.replace)
    (tmp_path / "checkpoint_step_1.pt").unlink()  # and local pruning removes the step checkpoint
    os.remove(tmp_path / "checkpoint_best.pt")
    moto_s3.start()
    assert [f.result(30) for f in futures] and up.wait(30) == []
    objects = s3_objects(run_id, mlflow_db)
    assert objects["checkpoint_best.pt"] == first and objects["checkpoint_step_1.pt"] == step_bytes
    assert objects["checkpoint_best.pt.sha256"].decode().strip() == hashlib.sha256(first).hexdigest()
    up.close()


def test_local_artifact_store(mlflow_db, tmp_path):
    run_id = new_run(mlflow_db, (tmp_path / "artifacts").as_uri())
    up = CheckpointUploader(run_id, tracking_uri=mlflow_db)
    assert isinstance(up.store, s3ckpt.MlflowStore)
    ckdir = tmp_path / "ckpt"
    for step in (1, 2, 10, 20):
        up.upload_to_s3_async(ckpt(ckdir, f"checkpoint_step_{step}.pt", step))
    best = ckpt(ckdir, "checkpoint_best.pt", 7)
    assert up.upload_to_s3_async(best).result(30).endswith(f"/{run_id}/artifacts/checkpoints/checkpoint_best.pt")
    s3ckpt.CheckpointWriter(2, up).expire_remote()
    assert up.wait(30) == []
    client = MlflowClient(mlflow_db)
    names = {Path(f.path).name for f in client.list_artifacts(run_id, "checkpoints")}
    assert names == {f"{n}{s}" for n in ("checkpoint_best.pt", "checkpoint_step_10.pt", "checkpoint_step_20.pt")
                     for s in ("", ".sha256")}
    got = client.download_artifacts(run_id, "checkpoints/checkpoint_best.pt", str(tmp_path / "dl"))
    assert Path(got).read_bytes() == best.read_bytes()
    # runs:/ on a non-S3 store goes through mlflow, and brings the sidecar so load_checkpoint verifies it
    path = resolve_checkpoint(f"runs:/{run_id}/checkpoints/checkpoint_step_20.pt", tmp_path / "cache", mlflow_db)
    assert load_checkpoint(path)["step"] == 20 and Path(f"{path}.sha256").exists()
    up.close()


# ----------------------------------------------------------------------------- outages

def test_outage_then_recovery_within_budget(moto_s3, fast_retries, mlflow_db, tmp_path, caplog):
    run_id = new_run(mlflow_db, S3_LOCATION)
    up = CheckpointUploader(run_id, tracking_uri=mlflow_db, retry_budget_s=30, client=fast_client())
    moto_s3.stop()
    p = ckpt(tmp_path, "checkpoint_step_1.pt", 1)
    with caplog.at_level(logging.WARNING, logger="weighted_mtp.s3ckpt"):
        fut = up.upload_to_s3_async(p)
        time.sleep(1.0)
        assert not fut.done()
        moto_s3.start()  # same port, empty: the bucket is re-created, as after a real restart
        assert up.wait(30) == []
    assert "retrying" in caplog.text
    assert s3_objects(run_id, mlflow_db)["checkpoint_step_1.pt"] == p.read_bytes()
    up.close()


def test_outage_longer_than_budget_reports_local_paths(moto_s3, mlflow_db, tmp_path, caplog):
    run_id = new_run(mlflow_db, S3_LOCATION)
    up = CheckpointUploader(run_id, tracking_uri=mlflow_db, retry_budget_s=0.5, client=fast_client())
    moto_s3.stop()
    p = ckpt(tmp_path, "checkpoint_final.pt", 1)
    with caplog.at_level(logging.ERROR, logger="weighted_mtp.s3ckpt"):
        fut = up.upload_to_s3_async(p)
        assert up.wait(20) == [str(p)]
    assert str(p) in caplog.text and "testing" not in caplog.text  # the path is named, the secret never
    with pytest.raises(Exception):
        fut.result()
    assert len(list((tmp_path / ".upload-snapshots").iterdir())) == 1  # the failed snapshot is kept
    up.close()


def test_wait_timeout_then_close(moto_s3, mlflow_db, tmp_path):
    run_id = new_run(mlflow_db, S3_LOCATION)
    up = CheckpointUploader(run_id, tracking_uri=mlflow_db, retry_budget_s=300, client=fast_client())
    moto_s3.stop()
    p = ckpt(tmp_path, "checkpoint_best.pt", 1)
    fut = up.upload_to_s3_async(p)
    t = time.monotonic()
    assert up.wait(0.3) == [str(p)]  # still retrying: not safe yet
    assert time.monotonic() - t < 2
    up.close()  # gives up after the current attempt instead of retrying for 300 s
    with pytest.raises(Exception):
        fut.result(10)
    assert up.wait(1) == [str(p)]
    assert up.upload_to_s3_async(tmp_path / "missing.pt").exception() is not None  # never raises in the loop


# ----------------------------------------------------------------------------- download

def test_resolve_s3_and_runs_uri(s3_server, mlflow_db, tmp_path):
    run_id = new_run(mlflow_db, S3_LOCATION)
    up = CheckpointUploader(run_id, tracking_uri=mlflow_db)
    p = ckpt(tmp_path / "ckpt", "checkpoint_best.pt", 1)
    uri = up.upload_to_s3_async(p).result(30)
    cache = tmp_path / "cache"
    got = resolve_checkpoint(uri, cache)
    assert got.read_bytes() == p.read_bytes() and load_checkpoint(got)["step"] == 1
    inode = got.stat().st_ino
    assert resolve_checkpoint(uri, cache).stat().st_ino == inode  # cached: not downloaded again
    up.upload_to_s3_async(ckpt(tmp_path / "ckpt", "checkpoint_best.pt", 2)).result(30)  # same size, new bytes
    assert load_checkpoint(resolve_checkpoint(uri, cache))["step"] == 2
    got = resolve_checkpoint(f"runs:/{run_id}/checkpoints/checkpoint_best.pt", cache, mlflow_db)
    assert load_checkpoint(got)["step"] == 2
    assert not [n for n in os.listdir(got.parent) if n.endswith(".tmp")]
    with pytest.raises(CheckpointError, match="cannot download"):
        resolve_checkpoint(f"s3://{BUCKET}/nope/checkpoint_best.pt", cache)
    up.close()


def test_resolve_auto_picks_newest_finished_run(s3_server, mlflow_db, tmp_path):
    """`auto` (checkpointing.resolve_uri, the one definition) = the newest FINISHED run tagged with the pipeline."""
    from wmtp.checkpointing import resolve_uri
    from wmtp.config import UserError, load_config
    exp = f"auto-{uuid.uuid4().hex[:8]}"
    cases = [("critic", "FINISHED", 1), ("critic", "FINISHED", 2), ("critic", "FAILED", 3), ("critic", None, 4),
             ("baseline", "FINISHED", 5)]
    for pipeline, status, value in cases:
        run_id = new_run(mlflow_db, S3_LOCATION, exp, pipeline, start_time=1_700_000_000_000 + value * 1000)
        MlflowClient(mlflow_db).set_tag(run_id, "pipeline", pipeline)
        up = CheckpointUploader(run_id, tracking_uri=mlflow_db)
        up.upload_to_s3_async(ckpt(tmp_path / str(value), "checkpoint_best.pt", value)).result(30)
        up.close()
        if status:
            MlflowClient(mlflow_db).set_terminated(run_id, status)
    cfg = load_config(Path(__file__).parent.parent / "configs/defaults.yaml",
                      [f"mlflow.experiment={exp}", f"mlflow.tracking_uri={mlflow_db}"])
    got, uri = resolve_uri(cfg.mlflow, "auto", "critic", "checkpoint_best.pt", tmp_path / "cache")
    assert load_checkpoint(got)["step"] == 2  # the newest FINISHED one: not the failed or the running run
    assert uri.startswith("runs:/") and uri.endswith("/checkpoints/checkpoint_best.pt")
    with pytest.raises(UserError) as e:
        resolve_uri(cfg.mlflow, "auto", "rho1", "checkpoint_final.pt", tmp_path / "cache")
    assert str(e.value) == (f"no finished run of pipeline 'rho1' in experiment '{exp}': "
                            "run the rho1 pipeline first")


def test_resolve_local_and_missing(tmp_path):
    p = ckpt(tmp_path, "checkpoint_best.pt", 1)
    assert resolve_checkpoint(str(p), tmp_path / "cache") == p
    with pytest.raises(CheckpointError, match="nope.pt"):
        resolve_checkpoint(tmp_path / "nope.pt", tmp_path / "cache")


# ----------------------------------------------------------------------------- upload verification: the ETag


def test_s3_etag_is_the_md5_of_one_put_else_the_md5_of_the_parts_md5s(tmp_path):
    path = tmp_path / "ten"
    path.write_bytes(b"abcdefghij")
    assert s3ckpt.s3_etag(path, 16) == "a925576942e94b2ef57a066101b48876"  # md5(b"abcdefghij"): below the threshold
    parts = [hashlib.md5(b).digest() for b in (b"abcd", b"efgh", b"ij")]
    assert s3ckpt.s3_etag(path, 4) == hashlib.md5(b"".join(parts)).hexdigest() + "-3"
    # 20 001 one-byte parts would be over S3's 10 000: the part size doubles to 2 (10 001 parts, still over), then 4
    big = tmp_path / "big"
    big.write_bytes(bytes(range(256)) * 78 + bytes(33))
    data = big.read_bytes()
    parts = [hashlib.md5(data[i:i + 4]).digest() for i in range(0, len(data), 4)]
    assert len(data) == 20_001 and len(parts) == 5_001
    assert s3ckpt.s3_etag(big, 1) == hashlib.md5(b"".join(parts)).hexdigest() + "-5001"


def test_s3_etag_agrees_with_a_real_s3_server_for_a_multipart_upload(moto_s3, tmp_path):
    from boto3.s3.transfer import TransferConfig
    path, part = tmp_path / "twelve_mib", 5 * 2**20  # S3's smallest part: 3 parts, the last one short
    path.write_bytes(os.urandom(12 * 2**20 + 7))
    s3 = moto_s3.client()
    s3.upload_file(str(path), BUCKET, "etag/probe",
                   Config=TransferConfig(multipart_threshold=part, multipart_chunksize=part))
    etag = s3.head_object(Bucket=BUCKET, Key="etag/probe")["ETag"].strip('"')
    assert etag.endswith("-3") and etag == s3ckpt.s3_etag(path, part)


def test_release_pages_drops_only_the_tensors_own_pages(tmp_path):
    """A memory-mapped tensor reads back the same after its pages are dropped (they come again from the file); on
    heap memory only the pages wholly inside the tensor are dropped: its neighbours keep their bytes."""
    page = os.sysconf("SC_PAGE_SIZE")
    torch.save({"w": torch.arange(4 * page, dtype=torch.float32)}, tmp_path / "w.pt")
    mapped = torch.load(tmp_path / "w.pt", mmap=True, weights_only=True)["w"]
    assert mapped.sum().item() == sum(range(4 * page))  # its pages are read in
    s3ckpt.release_pages(mapped)
    assert mapped.sum().item() == sum(range(4 * page))  # and read again from the file
    heap = torch.ones(4 * page, dtype=torch.uint8)
    offset = -heap.data_ptr() % page + page // 2  # from mid-page to mid-page, three pages later
    inside = heap[offset:offset + 3 * page]
    s3ckpt.release_pages(inside)
    assert heap[:offset].eq(1).all() and heap[offset + 3 * page:].eq(1).all()  # the neighbours untouched
    assert inside.eq(0).sum().item() == 2 * page  # the two pages wholly inside were dropped, the partial ends kept
