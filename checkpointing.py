"""
Checkpoints: where one comes from (a path, s3://, runs:/ or `auto`, on every node) and the Checkpointer that
decides when to write one (best, every save_every steps, at a preemption, final) and what it holds: everything an
exact resume needs. Files and uploads themselves are s3ckpt.py's.
"""
import contextlib
import dataclasses
import os
from pathlib import Path
import random
import signal

import s3ckpt
import torch
import torch.distributed as dist

from config import RUN_NAMES, tracking_uri, UserError
from parallel import broadcast, full_state, is_sharded, save_sharded
from pretrained import check_state, load_state, release_pages
from tracking import Preempted, finished, newest_run


def resolve_uri(cfg, uri, pipeline_for_auto, artifact, cache_dir):
    """A checkpoint path, s3:// or runs:/ URI, or `auto` (the newest finished run of a pipeline) -> (local file,
    the URI it was downloaded from or None)."""
    uri_tracking = tracking_uri(cfg.mlflow.tracking_uri)
    if uri == "auto":
        from mlflow import MlflowClient
        run = newest_run(MlflowClient(uri_tracking), cfg.mlflow.experiment, finished(pipeline_for_auto))
        if run is None:
            raise UserError(f"no finished '{RUN_NAMES[pipeline_for_auto]}' run in experiment "
                            f"'{cfg.mlflow.experiment}': run the {pipeline_for_auto} pipeline first")
        uri = f"runs:/{run.info.run_id}/{artifact}"
    try:
        path = s3ckpt.resolve_checkpoint(uri, cache_dir, tracking_uri=uri_tracking)
    except s3ckpt.CheckpointError as e:
        raise UserError(str(e))
    return str(path), (uri if uri.startswith(("s3://", "runs:/")) else None)


def on_this_node(cfg, found, cache_dir):
    """Rank 0's (path, URI) of a checkpoint -> a file on this rank's node: rank 0's path where this node sees it (one
    machine, a shared disk), else this node's own download of the URI, by its local rank 0 while the others wait."""
    path, uri = broadcast(found)
    missing = bool(path) and not Path(path).exists()
    if missing and not uri:
        raise UserError(f"{path}: on rank 0's node only and in no run's artifacts: give every node one checkpoint.dir")
    node_first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if missing and node_first:
        path = resolve_uri(cfg, uri, None, None, cache_dir)[0]
    if dist.is_initialized():
        dist.barrier()
    if missing and not node_first:
        path = resolve_uri(cfg, uri, None, None, cache_dir)[0]  # in the node's cache by now
    return path


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint_into(model, path):
    """Load a trainer checkpoint's model weights; returns the whole checkpoint dict."""
    try:
        state = s3ckpt.load_checkpoint(path)
    except s3ckpt.CheckpointError as e:
        raise UserError(str(e))
    load_state(model, state["model"], path, partial=state.get("model_partial", False))
    return state


def read_checkpoint(path):
    """A full checkpoint memory-mapped: its tensors are read only where touched (a rank its own rows)."""
    try:
        return s3ckpt.load_checkpoint(path, mmap=True)
    except s3ckpt.CheckpointError as e:
        raise UserError(str(e))


def checkpoint_weights(model, path, state=None):
    """(path, groups) for parallel.fill_shards: a full checkpoint's model weights (`state`, else read from path,
    memory-mapped), checked against `model` (on the meta device), one tensor a group, whose pages leave this
    process once its rows are copied."""
    state = state or read_checkpoint(path)
    check_state(model, state["model"], path, partial=state.get("model_partial", False))

    def groups():
        for name, tensor in state["model"].items():
            yield {name: tensor}
            release_pages(tensor)
    return str(path), groups()


def read_trainer_state(directory):
    """A sharded checkpoint's trainer.pt: everything but the model and optimizer shards (step, data position, ...),
    once every shard file it lists is there with the size and sha256 it lists."""
    try:
        state = s3ckpt.load_checkpoint(Path(directory) / "trainer.pt")
    except s3ckpt.CheckpointError as e:
        raise UserError(f"{directory}: incomplete sharded checkpoint ({e})")
    try:  # its shard files as they were written (older checkpoints list none)
        s3ckpt.verify_shards(directory, state.get("shards", {}))
    except s3ckpt.CheckpointError as e:
        raise UserError(str(e))
    return state


def find_resume(cfg, run_name, root, cache_dir):
    """`auto`: the newest checkpoint of an unfinished run of this config under checkpoint.dir, else (a machine that
    lost its disk: spot reclaim, a new VESSL container) the newest one in the MLflow artifacts of the newest
    unfinished run of that name; else the given path/URI; `never`: nothing. -> (local file, its URI in the run's
    artifacts or None), (None, None) for nothing to resume."""
    choice = cfg.checkpoint.resume
    if choice == "never":
        return None, None
    if choice != "auto":
        return resolve_uri(cfg, choice, None, None, cache_dir)
    candidates = [p for d in (root / run_name).glob("*") if not (d / "checkpoint_final.pt").exists()
                  for p in [*d.glob("checkpoint_*.pt"), *(m.parent for m in d.glob("checkpoint_step_*/trainer.pt"))]]
    if candidates:
        newest = max(candidates, key=lambda p: p.stat().st_mtime)  # in <run name>/<run id>/
        uploaded = cfg.mlflow.enable_logging and not newest.parent.name.startswith("local-")
        return str(newest), f"runs:/{newest.parent.name}/checkpoints/{newest.name}" if uploaded else None
    remote = newest_remote_checkpoint(cfg, run_name) if cfg.mlflow.enable_logging else None
    return resolve_uri(cfg, remote, None, None, cache_dir) if remote else (None, None)


def newest_remote_checkpoint(cfg, run_name):
    """runs:/ URI of the newest step checkpoint (by step number: a preemption writes one), else checkpoint_best.pt,
    of the newest unfinished run with this run name and experiment.name; None when there is none to resume from."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri(cfg.mlflow.tracking_uri))
    same_config = (f"tags.mlflow.runName = '{run_name}' and params.`experiment.name` = '{cfg.experiment.name}' "
                   "and attributes.status != 'FINISHED'")
    run = newest_run(client, cfg.mlflow.experiment, same_config)
    if run is None:
        return None
    names = [Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoints")]
    if "checkpoint_final.pt" in names:  # trained to the end, only its ending was lost: as finished locally
        return None
    # a sharded checkpoint (a directory) is whole once its trainer.pt, uploaded last, is there
    whole = lambda n: n.endswith(".pt") or "trainer.pt" in [
        Path(f.path).name for f in client.list_artifacts(run.info.run_id, f"checkpoints/{n}")]
    steps = sorted((n for n in names if s3ckpt.checkpoint_step(n) is not None), key=s3ckpt.checkpoint_step)
    newest = next((n for n in reversed(steps) if whole(n)), "checkpoint_best.pt")
    return f"runs:/{run.info.run_id}/checkpoints/{newest}" if newest in names else None


def checkpoint_state(setup, step, position, run_id, best_val_loss, finished, unsent_metrics=()):
    """Everything a checkpoint holds but the model and optimizer (those come from full_state or the shards):
    what an exact resume needs, and what export and evaluate read (config, model_args, run_id, step)."""
    return {"step": step, "position": position, "rng": rng_state(), "pipeline_state": setup.pipeline.state_dict(),
            "config": setup.cfg.to_dict(), "run_id": run_id, "best_val_loss": best_val_loss,
            "pipeline": setup.pipeline.name, "finished": finished, "unsent_metrics": list(unsent_metrics),
            "model_args": dataclasses.asdict(setup.model.args)}


def pipeline_state(checkpoint):
    """The pipeline's own state in a checkpoint (checkpoints before the split named it "ema", whatever it held)."""
    return checkpoint.get("pipeline_state", checkpoint.get("ema"))


class Checkpointer:
    """Checkpoints written behind the loop (s3ckpt.CheckpointWriter, rank 0's) and uploaded into the run: the best
    by val/loss, one every save_every steps, one at a preemption, the final one. It decides when; a checkpoint
    holds what an exact resume needs (model, optimizer, step, data position, RNG, the pipeline's state, ...).
    A full checkpoint is rank 0's one file (gathered from every rank when sharded); with checkpoint.format: sharded
    the step checkpoints (periodic and preemption) are directories each rank writes its shards into, rank 0 adding
    trainer.pt (the rest of the state) once all are in; best and final stay files that any tool reads."""

    def __init__(self, setup, batches, tracking, run_id, run_dir):
        self.setup, self.batches, self.tracking, self.run_id, self.run_dir = setup, batches, tracking, run_id, run_dir
        self.save_every, self.total = setup.cfg.checkpoint.save_every, setup.total_steps
        self.best_val = setup.resume["best_val_loss"] if setup.resume else float("inf")
        self.sharded, self.shards = setup.cfg.checkpoint.format == "sharded", None  # this rank's shards in flight
        # sharded saves finish in a background thread: their collectives get a group of their own
        self.group = dist.new_group(backend="gloo") if self.sharded and dist.is_initialized() else None
        self.writer = None
        if setup.rank == 0:
            self.writer = s3ckpt.CheckpointWriter(setup.cfg.checkpoint.save_total_limit, tracking.uploader)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.shards:
            with contextlib.suppress(Exception):  # rank 0's writer reports a failed save
                self.shards.result()
        if self.writer:
            self.writer.close()

    def step_name(self, done):
        return f"checkpoint_step_{done}" + ("" if self.sharded else ".pt")

    def after_validation(self, done, val):
        if val["val/loss"] < self.best_val:
            self.best_val = val["val/loss"]
            self.save("checkpoint_best.pt", done)

    def after_step(self, done):
        if self.save_every and done % self.save_every == 0 and done < self.total:
            self.save(self.step_name(done), done)

    def preempt(self, done, signum):
        """A resumable checkpoint on disk before anyone is told to resume from it; then the run ends KILLED."""
        self.save(self.step_name(done), done, wait=True)
        raise Preempted(signum or signal.SIGTERM, self.run_dir / self.step_name(done))

    def final(self):
        self.save("checkpoint_final.pt", self.total, finished=True, wait=True)

    def save(self, name, step, finished=False, wait=False):
        s, path = self.setup, self.run_dir / name
        state = checkpoint_state(s, step, self.batches.position, self.run_id, self.best_val, finished,
                                 self.tracking.unsent())
        if not name.endswith(".pt"):
            self.wait_shards()  # one sharded save in flight per rank, as the writer keeps one write in flight
            written = save_sharded(s.model, s.optimizer, path, self.group)
            if self.writer:
                self.writer.save_dir(written, state, path)
            else:
                self.shards = written
        elif self.writer or is_sharded(s.model):  # every rank takes part in gathering a sharded model
            weights, partial, optimizer = full_state(s.model, s.optimizer)
            if self.writer:
                self.writer.save({**state, "model": weights, "model_partial": partial, "optimizer": optimizer}, path)
        if wait:
            self.wait_shards()
            if self.writer:
                self.writer.wait()

    def wait_shards(self):
        shards, self.shards = self.shards, None
        if shards is not None:
            shards.result()
