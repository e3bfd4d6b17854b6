"""training.parallel: fsdp on real torchrun processes (2 workers, gloo, CPU): the same weights as DDP, half the
per-rank state, preemption and resume from S3 on an empty disk, sharded checkpoints saved, uploaded, pruned, resumed.

The preemption story (`preempted`) is told once, under FSDP, for both parallel modes: a SIGTERM to torchrun's agent
ends the run KILLED with a resumable checkpoint on disk and in S3, and --resume auto on an empty disk finishes the
same MLflow run, with one continuous metric history, at the weights of an uninterrupted run. A full-format FSDP
checkpoint is the file DDP writes (test_fsdp_trains_to_the_weights_of_ddp). DDP's own SIGTERM: test_reliability's
signal to every process (KILLED, resume_from, the checkpoint in the run); a DDP resume: its --max_restarts (from the
local disk, into the same run); a resume to the weights of an uninterrupted run: test_s3_training's SIGKILL (one
process).

The six DDP and FSDP trainings of the comparison and the per-rank measurements share one torchrun launch (WORKER):
train() runs in the process group the worker made.

Tolerance of the DDP comparison: 1e-5 absolute on every weight after 4 AdamW steps. Both runs see the same batches
and compute the same per-rank gradients; only the reductions differ (DDP all-reduces whole gradient buckets, FSDP
reduce-scatters per block and computes the clipping norm from per-shard partial sums), so gradients agree to fp32
rounding (~1e-7 relative) and the weights to ~1e-6 (measured). Any real difference (a missed or doubled gradient
sync, the accumulation scaled wrong, a per-shard clip, a lost optimizer state) moves weights by O(lr) = 6.5e-4 per
step (the local configs' learning rate): 65 times the tolerance.
"""
import json
import re
import signal
import subprocess
import types
from pathlib import Path

import pytest
import torch

import s3ckpt
from conftest import ROOT, TINY, workers_said
from s3server import BUCKET, CREDENTIALS, MotoS3
from test_reliability import TORCHRUN, environment, logged_steps, runs_of, steps, store, train_args, wait_until

CONFIGS = {p: str(ROOT / "configs" / p / f"{p}_local.yaml") for p in ("baseline", "verifiable", "rho1")}


def final_checkpoint(ckpt_dir):
    (path,) = Path(ckpt_dir).glob("*/*/checkpoint_final.pt")
    return torch.load(path, weights_only=False)


# Every DDP and FSDP training of test_fsdp_trains_to_the_weights_of_ddp and every measurement of the two tests after
# it, and the uninterrupted reference of the preemption story, read one torchrun launch (WORKER): two processes start
# and import torch once, not eight times. The process group is made once; train() uses a group its caller made and
# leaves it to the caller (no second group on torchrun's store, pytorch#135712). In it: prepare() under DDP, then
# under FSDP (the per-rank state), then a fresh FSDP trainer whose embedding rank 0 poisons (the skipped step), each
# rank writing what it measured; then for each pipeline a DDP and an FSDP training, each into a checkpoint dir of its
# own; then the reference, as the preempted runs' command line would train it with MLflow off.
TRAININGS = [
    ("baseline", []),
    ("verifiable", ["critic.checkpoint="]),
    # LoRA (frozen base and trainable adapters in one FSDP unit), block recomputation, the sharded frozen reference
    ("rho1", ["reference.path=", "model.lora.rank=2", "training.activation_checkpointing=true"]),
]
WORKER = """
import json, os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import weighted_mtp as wm
from wmtp.config import load_config
from wmtp.data import Batches, collate
from wmtp.parallel import Meter, wrap_and_compile
dist.init_process_group("gloo")
rank, world, out = dist.get_rank(), dist.get_world_size(), {{"memory": {{}}}}
local = lambda t: t.to_local() if hasattr(t, "to_local") else t
for parallel in ("ddp", "fsdp"):
    cfg = load_config({config!r}, {tiny!r} + ["mlflow.enable_logging=false", "training.parallel=" + parallel])
    s = wm.prepare(cfg, True, rank, world, torch.device("cpu"))
    model = wrap_and_compile(s.model, cfg.model.compile, world)
    batch = Batches(s).take(1)
    wm.train_step(s.pipeline, model, s.optimizer, s.params, batch, Meter(s.device), 0)  # the optimizer's state
    out["memory"][parallel] = {{
        "params": sum(local(p).numel() for p in s.model.parameters()),
        "moments": sum(local(v).numel() for st in s.optimizer.state.values() for k, v in st.items() if k != "step"),
        "shapes": [list(p.shape) for p in s.model.parameters()]}}
cfg = load_config({config!r}, {tiny!r} + ["mlflow.enable_logging=false", "training.parallel=fsdp"])
s = wm.prepare(cfg, True, rank, 2, torch.device("cpu"))
ids = list(range(65, 85))
batch = collate([(ids, [-100] * 5 + ids[5:], 1.0, {{}})] * 2, s.tok.pad_id, s.device)
step = lambda stop=0: wm.train_step(s.pipeline, s.model, s.optimizer, s.params, [batch], Meter(s.device), 0, stop)
shards = lambda: [p.detach().to_local().clone() for p in s.params]
moments = lambda: [v.to_local().clone() for st in s.optimizer.state.values() for k, v in st.items() if k != "step"]
skip = out["skip"] = {{"first": step().tolist()}}
weight = s.model.tok_embeddings.weight.to_local()
if rank == 0:  # row 70 of 259 is in rank 0's shard of the embedding: the loss goes NaN on every rank
    weight.data[70] = float("nan")
before, state = shards(), moments()
skip["skipped"] = step(stop=15).tolist()
skip["unchanged"] = all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before, shards()))
skip["moments_unchanged"] = all(torch.equal(a, b) for a, b in zip(state, moments()))
skip["steps"] = sorted({{st["step"].item() for st in s.optimizer.state.values()}})
json.dump(out, open(f"{out_dir}/rank{{rank}}.json", "w"))
for pipeline, extra in {trainings!r}:
    for parallel in ("ddp", "fsdp"):
        wm.train(load_config({configs!r}[pipeline], {tiny!r} + [
            f"checkpoint.dir={out_dir}/{{pipeline}}/{{parallel}}/ckpt", "training.parallel=" + parallel,
            "mlflow.enable_logging=false", *extra, "training.gradient_accumulation_steps=2"]), use_micro=True)
wm.train(load_config({configs!r}["baseline"], {tiny!r} + [
    f"checkpoint.dir={out_dir}/reference", *{preempt!r}, "mlflow.enable_logging=false"]), use_micro=True)
dist.destroy_process_group()
wm.exit_worker(0)  # as the CLI's torchrun workers leave: gloo's threads can abort Python's finalisation
"""


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The directory of WORKER's one launch: rank<k>.json of each rank, <pipeline>/<ddp|fsdp>/ckpt of each training,
    reference/ of the preemption story's."""
    tmp = tmp_path_factory.mktemp("fsdp-worker")
    script = tmp / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), config=CONFIGS["baseline"], configs=CONFIGS, tiny=TINY,
                                    trainings=TRAININGS, preempt=PREEMPT, out_dir=tmp))
    r = subprocess.run(TORCHRUN + [str(script)], cwd=tmp, env=environment(f"sqlite:///{tmp}/unused.db"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, workers_said(r.stderr)
    return tmp


@pytest.mark.parametrize("pipeline, extra", TRAININGS)
def test_fsdp_trains_to_the_weights_of_ddp(launched, pipeline, extra):
    ddp = final_checkpoint(launched / pipeline / "ddp" / "ckpt")
    fsdp = final_checkpoint(launched / pipeline / "fsdp" / "ckpt")
    # the same file: the same keys, the optimizer state keyed by parameter index as optimizer.state_dict() keys it
    assert sorted(fsdp) == sorted(ddp) and sorted(fsdp["model"]) == sorted(ddp["model"])
    assert fsdp["model_partial"] == ddp["model_partial"] == (pipeline == "rho1")
    assert fsdp["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
    assert sorted(fsdp["optimizer"]["state"]) == sorted(ddp["optimizer"]["state"]) == list(range(len(ddp["model"])))
    for key in ddp["model"]:
        torch.testing.assert_close(fsdp["model"][key], ddp["model"][key], atol=1e-5, rtol=0, msg=key)
    for index, state in ddp["optimizer"]["state"].items():
        assert state["step"].item() == fsdp["optimizer"]["state"][index]["step"].item() == 4
        torch.testing.assert_close(fsdp["optimizer"]["state"][index]["exp_avg"], state["exp_avg"], atol=1e-5, rtol=0)
    start = torch.load(next((launched / pipeline / "ddp" / "ckpt").glob("*/*/checkpoint_step_2.pt")),
                       weights_only=False)
    assert any(not torch.equal(start["model"][k], ddp["model"][k]) for k in ddp["model"])  # it trained on


@pytest.fixture(scope="module")
def measured(launched):
    """[rank 0's, rank 1's] {"memory": {ddp, fsdp: numels after one step}, "skip": the poisoned step's record}."""
    return [json.loads((launched / f"rank{k}.json").read_text()) for k in range(2)]


def test_fsdp_holds_half_the_parameters_and_optimizer_state_per_rank(measured):
    """Measured: the numel of each rank's local tensors (the DTensor shards under FSDP) after one step."""
    ranks = [m["memory"] for m in measured]
    shapes = ranks[0]["ddp"]["shapes"]
    whole = sum(torch.Size(s).numel() for s in shapes)
    # dim-0 shards as torch.chunk cuts them: rank 0 ceil(rows / 2) rows, rank 1 the rest
    mine = [sum(torch.Size(s).numel() // s[0] * (-(-s[0] // 2) if k == 0 else s[0] // 2) for s in shapes)
            for k in range(2)]
    for k, rank in enumerate(ranks):
        assert rank["ddp"]["params"] == whole and rank["ddp"]["moments"] == 2 * whole  # AdamW: exp_avg, exp_avg_sq
        assert rank["fsdp"]["params"] == mine[k] and rank["fsdp"]["moments"] == 2 * mine[k]
        ratio = (rank["fsdp"]["params"] + rank["fsdp"]["moments"]) / (rank["ddp"]["params"] + rank["ddp"]["moments"])
        assert 0.45 < ratio < 0.55, ratio
    assert mine[0] + mine[1] == whole


def test_a_non_finite_step_is_skipped_on_every_shard(measured):
    """Fused AdamW's found_inf works on DTensor shards on the CPU: a NaN in one rank's shard skips the step on both
    ranks (both see a NaN loss: flag 2), weights and moments untouched, the step count unchanged; stop flags sum."""
    for k in range(2):
        assert measured[k]["skip"] == {"first": [0.0, 0.0], "skipped": [2.0, 30.0], "unchanged": True,
                                       "moments_unchanged": True, "steps": [1.0]}, (k, measured[k]["skip"])


# -----------------------------------------------------------------------------
# SIGTERM mid-run, then --resume auto on an empty disk; full and sharded checkpoints

# log_interval=1 so that "one continuous history" is exactly the steps 1..STEPS, whatever step the signal lands on;
# eval_interval=0 and, in the full format, save_every=0 so that the only step checkpoint is the preemption's (the
# sharded format's: every 3 steps, pruned to the newest 2)
STEPS = 20  # room after the SIGTERM, which lands a step or two after the 7th logged one
PREEMPT = [f"training.max_steps={STEPS}", "training.log_interval=1", "training.eval_interval=0",
           "mlflow.s3_artifacts=s3://wmtp/mlflow-artifacts", "training.parallel=fsdp",
           "training.gradient_accumulation_steps=2", "data_sampling.n_samples=128"]


def preempt_and_resume(tmp, uri, s3, name, overrides, after_steps):
    """SIGTERM a 2-process run once it has logged `after_steps` steps; then --resume auto in an empty dir."""
    ckpt, env = tmp / name, environment(uri, **CREDENTIALS, MLFLOW_S3_ENDPOINT_URL=s3.url)
    proc = subprocess.Popen(TORCHRUN + train_args(ckpt, *PREEMPT, *overrides), cwd=tmp, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: logged_steps(ckpt) >= after_steps, 180, proc, f"training to log {after_steps} steps")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    client, runs = runs_of(uri)
    (killed,) = [r for r in runs if r.info.status != "FINISHED"]  # an earlier run of this module was resumed to its end
    killed, stopped_history = client.get_run(killed.info.run_id), steps(client, killed.info.run_id)
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])
            if f"/{killed.info.run_id}/" in o["Key"]]
    s3_objects = {k: s3.client().get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}
    local = {p.name: p for p in ckpt.glob("baseline-mtp/*/checkpoint_step_*") if s3ckpt.checkpoint_step(p.name)}
    snapshot = {str(f.relative_to(ckpt)): f.read_bytes() for f in ckpt.rglob("*") if f.is_file()}
    fresh = tmp / f"{name}-fresh"
    resumed = subprocess.run(TORCHRUN + train_args(fresh, *PREEMPT, *overrides, resume="auto"), cwd=tmp, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    return types.SimpleNamespace(rc=proc.returncode, stderr=err, killed=killed, s3=s3_objects, local=local,
                                 snapshot=snapshot, ckpt=ckpt, fresh=fresh, resumed=resumed,
                                 stopped_history=stopped_history, runs=runs_of(uri)[1])


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, empty_store, launched):
    """An uninterrupted reference run (WORKER's last training) and a full-format and a sharded-format run, each
    SIGTERMed mid-training and resumed with --resume auto on an empty checkpoint dir (as on the new machine a spot
    reclaim leaves) from S3 alone.

    How the signal arrives: on Kubernetes (VESSL) the kubelet sends SIGTERM to the container's main process only,
    and run.sh execs torchrun, so torchrun's agent receives it and forwards it to its workers (which torchrun starts
    in their own sessions: nothing else reaches them); it SIGKILLs them 30 s later."""
    tmp = tmp_path_factory.mktemp("fsdp-preempt")
    s3 = MotoS3().start()
    try:
        uri = store(empty_store, tmp)
        full = preempt_and_resume(tmp, uri, s3, "full", ["checkpoint.format=full", "checkpoint.save_every=0"], 3)
        sharded = preempt_and_resume(tmp, uri, s3, "sharded", ["checkpoint.format=sharded", "checkpoint.save_every=3",
                                                               "checkpoint.save_total_limit=2"], 7)
        yield types.SimpleNamespace(uri=uri, full=full, sharded=sharded,
                                    reference=final_checkpoint(launched / "reference"))
    finally:
        s3.stop()


def stopped_at(p):
    return max(int(name.rsplit("_", 1)[1].removesuffix(".pt")) for name in p.local)


def assert_resumed_to_the_reference(p, reference):
    assert reference["step"] == STEPS and reference["finished"]  # WORKER's reference ran its 20 steps to the end
    assert p.resumed.returncode == 0, p.resumed.stderr[-3000:]
    resumed = final_checkpoint(p.fresh)
    assert resumed["run_id"] == p.killed.info.run_id and resumed["step"] == STEPS
    assert sorted(resumed["model"]) == sorted(reference["model"])
    worst = max((resumed["model"][k].double() - reference["model"][k].double()).abs().max().item()
                for k in reference["model"])
    assert worst <= 1e-6, worst


def test_fsdp_sigterm_writes_a_full_checkpoint_to_disk_and_s3_and_ends_the_run_killed(preempted):
    p = preempted.full
    assert p.rc != 0, p.stderr[-3000:]
    assert p.killed.info.status == "KILLED", p.stderr[-3000:]
    run_id = p.killed.info.run_id
    (name,) = p.local  # the preemption's checkpoint, the only step checkpoint of this config
    local, n = p.local[name], stopped_at(p)
    assert name == f"checkpoint_step_{n}.pt" and local.parent == p.ckpt / "baseline-mtp" / run_id and 3 < n < STEPS
    assert p.killed.data.tags["resume_from"] == f"runs:/{run_id}/checkpoints/{name} ({local})"
    assert p.killed.data.tags["wmtp.steps"] == str(STEPS) and "checkpoints_local_only" not in p.killed.data.tags
    # every rank says why it stopped and where to resume from
    assert p.stderr.count(f"preempted: stopped by SIGTERM; resume from {local}\n") == 2, p.stderr[-3000:]
    # in S3, under the run's own artifact prefix, byte for byte what is on disk: one file, gathered on rank 0, as DDP
    # writes it
    prefix = f"mlflow-artifacts/weighted-mtp-production/{run_id}/artifacts"
    assert p.killed.info.artifact_uri == f"s3://{BUCKET}/{prefix}"
    assert p.s3[f"{prefix}/checkpoints/{name}"] == local.read_bytes()
    assert p.s3[f"{prefix}/checkpoints/{name}.sha256"] == Path(f"{local}.sha256").read_bytes()
    assert b"SIGTERM received: stopping at the end of this step" in p.s3[f"{prefix}/logs/training.log"]
    saved = torch.load(local, weights_only=False)
    assert saved["step"] == n and saved["position"] == 2 * n and saved["run_id"] == run_id and not saved["finished"]
    assert sorted(saved["optimizer"]["state"])[-1] == 38


def test_resume_auto_on_an_empty_disk_finishes_the_same_run_from_s3_with_the_weights_of_an_uninterrupted_run(
        preempted):
    p = preempted.full
    assert_resumed_to_the_reference(p, preempted.reference)
    assert [r.info.run_id for r in p.runs] == [p.killed.info.run_id]  # the same run continued: exactly one
    run = p.runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["wmtp.steps"] == str(STEPS)
    name = f"checkpoint_step_{stopped_at(p)}.pt"
    (downloaded,) = re.findall(rf", resumed at step {stopped_at(p)} from (\S+)\n", p.resumed.stderr)
    assert Path(downloaded).name == name and Path(downloaded).is_relative_to(p.fresh / ".cache")
    assert Path(downloaded).read_bytes() == p.local[name].read_bytes()  # the preemption's checkpoint, back from S3


def test_preempted_and_resumed_run_has_one_continuous_metric_history(preempted):
    p = preempted.full
    client, _ = runs_of(preempted.uri)
    assert p.stopped_history == list(range(1, stopped_at(p) + 1))  # up to the checkpoint, the stop step included
    assert steps(client, p.killed.info.run_id) == list(range(1, STEPS + 1))  # then the rest: no gap, no duplicate


def test_sharded_checkpoints_are_saved_uploaded_pruned_and_resumed(preempted):
    """The preemption story of the full format (the tests above), told for a sharded checkpoint directory."""
    p, run_id = preempted.sharded, preempted.sharded.killed.info.run_id
    assert p.rc != 0 and p.killed.info.status == "KILLED", p.stderr[-3000:]
    n = stopped_at(p)
    saved = [*range(3, n, 3), n]  # every 3 steps, then the preemption's: 3, 6 and n at least
    kept = [f"checkpoint_step_{k}" for k in saved[-2:]]  # checkpoint.save_total_limit=2, by step number
    assert 6 < n < STEPS and sorted(p.local) == sorted(kept)  # step 3's (at least) pruned
    run_dir = p.ckpt / "baseline-mtp" / run_id
    assert p.stderr.count(f"preempted: stopped by SIGTERM; resume from {run_dir / kept[-1]}\n") == 2, p.stderr[-3000:]
    assert p.killed.data.tags["resume_from"] == f"runs:/{run_id}/checkpoints/{kept[-1]} ({run_dir / kept[-1]})"
    assert p.killed.data.tags["wmtp.steps"] == str(STEPS) and "checkpoints_local_only" not in p.killed.data.tags
    artifacts = f"mlflow-artifacts/weighted-mtp-production/{run_id}/artifacts"
    assert p.killed.info.artifact_uri == f"s3://{BUCKET}/{artifacts}"
    assert b"SIGTERM received: stopping at the end of this step" in p.s3[f"{artifacts}/logs/training.log"]
    prefix = f"{artifacts}/checkpoints"
    for name in kept:  # a torch.distributed.checkpoint directory: both ranks' shards, its metadata, trainer.pt
        files = sorted(f.name for f in (run_dir / name).iterdir())
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer.pt", "trainer.pt.sha256"], files
        for f in files:  # in S3 under the run's artifacts, byte for byte
            assert p.s3[f"{prefix}/{name}/{f}"] == p.snapshot[f"baseline-mtp/{p.killed.info.run_id}/{name}/{f}"]
    remote = sorted({k[len(prefix) + 1:].split("/")[0] for k in p.s3 if k.startswith(prefix + "/")})
    assert remote == sorted(kept)  # the older ones pruned remotely too
    trainer = torch.load(run_dir / kept[-1] / "trainer.pt", weights_only=False)
    assert trainer["step"] == n and trainer["position"] == 2 * n and "model" not in trainer
    assert trainer["run_id"] == run_id and not trainer["finished"]
    assert_resumed_to_the_reference(p, preempted.reference)
    (downloaded,) = re.findall(rf", resumed at step {n} from (\S+)\n", p.resumed.stderr)
    assert Path(downloaded).name == kept[-1] and Path(downloaded).is_relative_to(p.fresh / ".cache")
    # the same run continued (the module's other run is the full format's), to the end, with no gap in its history
    assert sorted(r.info.run_id for r in p.runs) == sorted([preempted.full.killed.info.run_id, run_id])
    assert all(r.info.status == "FINISHED" for r in p.runs)
    assert p.stopped_history == list(range(1, n + 1))
    assert steps(runs_of(preempted.uri)[0], run_id) == list(range(1, STEPS + 1))
