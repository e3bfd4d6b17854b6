"""
Checkpoints: where one comes from (a path, s3://, runs:/ or `auto`, on every node) and the Checkpointer that
decides when to write one (best, every save_every steps, at a preemption, final) and what it holds: everything an
exact resume needs. Files and uploads themselves are s3ckpt.py's.
"""
import concurrent.futures as cf
import dataclasses
import logging
import os
from pathlib import Path
import random
import shutil
import signal
import time

import s3ckpt
import torch
import torch.distributed as dist

from wmtp.config import tracking_uri, UserError
from wmtp.parallel import (all_gather, broadcast, files_to_read, full_state, is_sharded, load_sharded, own_files,
                           save_sharded)
from wmtp.pretrained import check_state, load_state, release_pages
from wmtp.tracking import Preempted, finished, newest_run

log = logging.getLogger("weighted_mtp")


def resolve_uri(cfg, uri, pipeline_for_auto, artifact, cache_dir):
    """A checkpoint path, s3:// or runs:/ URI, or `auto` (the newest finished run of a pipeline) -> (local file,
    the URI it was downloaded from or None)."""
    uri_tracking = tracking_uri(cfg.mlflow.tracking_uri)
    if uri == "auto":
        from mlflow import MlflowClient
        run = newest_run(MlflowClient(uri_tracking), cfg.mlflow.experiment, finished(pipeline_for_auto))
        if run is None:
            raise UserError(f"no finished run of pipeline '{pipeline_for_auto}' in experiment "
                            f"'{cfg.mlflow.experiment}': run the {pipeline_for_auto} pipeline first")
        uri = f"runs:/{run.info.run_id}/{artifact}"
    try:
        path = s3ckpt.resolve_checkpoint(uri, cache_dir, tracking_uri=uri_tracking)
    except s3ckpt.CheckpointError as e:
        raise UserError(str(e))
    return str(path), (uri if uri.startswith(("s3://", "runs:/")) else None)


def on_this_node(cfg, found, cache_dir):
    """Rank 0's (path, URI) of a checkpoint -> a file on this rank's node: rank 0's path where this node sees it (one
    machine, a shared disk), else this node's own download of the URI, by its local rank 0 while the others wait.
    A start (model.init_from, critic.checkpoint, evaluate) is a whole checkpoint file: a sharded one resumes only."""
    path, _, sharded = resume_point(cfg, found, cache_dir)
    if sharded:
        raise UserError(f"{path}: a sharded checkpoint (checkpoint.format=sharded) can only resume its own run: start "
                        "from that run's checkpoint_best.pt or checkpoint_final.pt (whole files)")
    return path


def resume_point(cfg, found, cache_dir):
    """on_this_node's (path, URI, sharded): a sharded checkpoint's directory (rank 0's path, as rank 0 sees it) is
    not fetched here: rank 0 reads its trainer.pt for everyone (trainer_state), each node fetches the shard files
    its ranks read (load_shards)."""
    if found is not None:  # rank 0
        found = (*found, bool(found[0]) and Path(found[0]).is_dir())
    path, uri, sharded = broadcast(found)
    if sharded:
        return path, uri, True
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
    return path, uri, False


def node_id():
    """This rank's node: torchrun's GROUP_RANK (0 without torchrun)."""
    return int(os.environ.get("GROUP_RANK", 0))


def by_node_first(fn):
    """fn() run by this node's local rank 0 alone, its result on every rank of the node. A CheckpointError on any
    node is a UserError on every rank (this node's own, else the first), so no rank goes on to load alone."""
    first, result, error = int(os.environ.get("LOCAL_RANK", 0)) == 0, None, None
    if first:
        try:
            result = fn()
        except s3ckpt.CheckpointError as e:
            error = str(e)
    answers = all_gather((node_id(), first, result, error))
    (_, _, result, error), *_ = [a for a in answers if a[0] == node_id() and a[1]]
    errors = [a[3] for a in answers if a[3]]
    if errors:
        raise UserError(error or errors[0])
    return result


def load_shards(cfg, model, optimizer, path, uri, manifest, cache_dir):
    """A sharded checkpoint (rank 0's `path`, `uri` in the run's artifacts, trainer.pt's manifest) into the model and
    optimizer; returns the directory this rank loaded from. Each node reads it from one directory of its own: rank
    0's path where the files its ranks read are there intact (one machine, a shared disk), else the node's cache,
    filled by its local rank 0 (s3ckpt.fetch_shards: intact local copies linked, the rest downloaded and checked):
    first .metadata (it says where each tensor is), then the files DCP's load plans of the node's ranks name (its
    own ranks' shards when the world is the one that saved, and whichever files hold the replicated tensors).
    A missing or corrupted file is a one-line error naming it on every rank, before any rank loads."""
    tracking = tracking_uri(cfg.mlflow.tracking_uri)
    fetch = lambda names: s3ckpt.fetch_shards(path, uri, names, manifest, cache_dir, tracking)
    where = by_node_first(lambda: fetch([".metadata"]))
    needs = all_gather((node_id(), files_to_read(model, optimizer, where)))
    names = sorted({".metadata", *(n for node, files in needs if node == node_id() for n in files)})
    where = by_node_first(lambda: fetch(names))
    load_sharded(model, optimizer, where)
    return str(where)


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


def trainer_state(directory):
    """A sharded checkpoint's trainer.pt (everything but the model and optimizer shards: step, data position, the
    manifest of its shard files, ...), read by rank 0 (whose node has it: find_resume) and sent to every rank; its
    shard files are checked as each node fetches them (load_shards)."""
    state = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            state = s3ckpt.load_checkpoint(Path(directory) / "trainer.pt")
        except s3ckpt.CheckpointError as e:
            state = f"{directory}: incomplete sharded checkpoint ({e})"
    state = broadcast(state)
    if isinstance(state, str):
        raise UserError(state)
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
    remote = newest_remote_checkpoint(cfg, run_name, cache_dir) if cfg.mlflow.enable_logging else None
    return resolve_uri(cfg, remote, None, None, cache_dir) if remote else (None, None)


def whole_remotely(client, run_id, name, cache_dir, uri_tracking):
    """Whether the remote sharded checkpoint checkpoints/<name> is whole: its trainer.pt (uploaded last) is there,
    and so is every file its manifest lists, of the size it lists (none lost to a failed node or a cleanup)."""
    listed = {Path(f.path).name: f.file_size for f in client.list_artifacts(run_id, f"checkpoints/{name}")}
    if "trainer.pt" not in listed:
        return False
    try:
        trainer = s3ckpt.resolve_checkpoint(f"runs:/{run_id}/checkpoints/{name}/trainer.pt", cache_dir, uri_tracking)
        shards = s3ckpt.load_checkpoint(trainer).get("shards", {})
    except s3ckpt.CheckpointError as e:
        log.warning(f"remote checkpoint {name} of run {run_id} passed over: {e}")
        return False
    return all(listed.get(n) == size for n, (size, _) in shards.items())


def newest_remote_checkpoint(cfg, run_name, cache_dir):
    """runs:/ URI of the newest step checkpoint (by step number: a preemption writes one), else checkpoint_best.pt,
    of the newest unfinished run with this run name and experiment.name; None when there is none to resume from."""
    from mlflow import MlflowClient
    uri_tracking = tracking_uri(cfg.mlflow.tracking_uri)
    client = MlflowClient(uri_tracking)
    same_config = (f"tags.mlflow.runName = '{run_name}' and params.`experiment.name` = '{cfg.experiment.name}' "
                   "and attributes.status != 'FINISHED'")
    run = newest_run(client, cfg.mlflow.experiment, same_config)
    if run is None:
        return None
    names = [Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoints")]
    if "checkpoint_final.pt" in names:  # trained to the end, only its ending was lost: as finished locally
        return None
    # a sharded checkpoint (a directory) is whole once its trainer.pt and every file that lists are there
    whole = lambda n: n.endswith(".pt") or whole_remotely(client, run.info.run_id, n, cache_dir, uri_tracking)
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
    trainer.pt (the rest of the state, and the manifest of every rank's files) once all are in; each rank uploads
    the files it wrote, rank 0 trainer.pt after all of them (nodes need no shared disk). Best and final stay files
    that any tool reads."""

    def __init__(self, setup, batches, tracking, run_id, run_dir):
        self.setup, self.batches, self.tracking, self.run_id, self.run_dir = setup, batches, tracking, run_id, run_dir
        c = setup.cfg.checkpoint
        self.save_every, self.total, self.limit = c.save_every, setup.total_steps, c.save_total_limit
        self.best_val = setup.resume["best_val_loss"] if setup.resume else float("inf")
        self.sharded, self.shards = c.format == "sharded", None  # this rank's shards in flight
        self.writer, self.uploader, self.published = None, tracking.uploader, []
        if setup.rank == 0:
            self.writer = s3ckpt.CheckpointWriter(c.save_total_limit, tracking.uploader)
        elif self.sharded and setup.cfg.mlflow.enable_logging:  # every rank uploads the shard files it writes
            self.uploader = s3ckpt.CheckpointUploader(run_id, tracking_uri(setup.cfg.mlflow.tracking_uri),
                                                      retry_budget_s=c.upload_retry_budget_s,
                                                      verify_etag=c.verify_etag)
        # a sharded save finishes in a background thread, its collectives (the save's, the manifest's) on a group of
        # their own; the uploads behind it run no collective: rank 0 learns from the store that the others' are in
        self.group = dist.new_group(backend="gloo") if self.sharded and dist.is_initialized() else None
        self.finishing = cf.ThreadPoolExecutor(1, thread_name_prefix="ckpt-shards") if self.sharded else None
        self.publishing = cf.ThreadPoolExecutor(1, thread_name_prefix="ckpt-publish") if self.sharded else None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if self.shards:
            try:
                self.shards.result()
            except Exception as e:
                log.error(f"sharded checkpoint failed: {e}")
        if self.writer:
            self.writer.close()
        if self.sharded:
            self.finishing.shutdown(wait=False, cancel_futures=True)
            if self.setup.rank == 0:  # its Tracking waits for these (uploader.track), as long as the run's end allows
                self.publishing.shutdown(wait=False)
                return
            c = self.setup.cfg.checkpoint
            cf.wait(self.published, c.preempt_grace_s if exc_type is Preempted else c.upload_timeout_s)
            self.publishing.shutdown(wait=False, cancel_futures=True)
            if self.uploader:
                self.uploader.close()

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
            self.shards = self.finishing.submit(self.after_shards, written, s3ckpt.cpu_copy(state), path, step)
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

    def after_shards(self, written, state, path, step):
        """Every rank, once its sharded save `written` is done: the files each rank wrote, with their sizes and
        sha256 (each hashes its own), gathered into one manifest; rank 0 writes trainer.pt with it; each node's
        local rank 0 applies save_total_limit to its own disk. With a run to upload into, each rank's files (rank
        0's trainer.pt apart) are snapshotted now and uploaded behind (publish)."""
        rank, local_first = self.setup.rank, int(os.environ.get("LOCAL_RANK", 0)) == 0
        mine = own_files(written.result(), rank)
        manifest = {n: e for part in all_gather(s3ckpt.shard_manifest(path, mine), self.group) for n, e in part.items()}
        if rank == 0:
            s3ckpt.save_checkpoint({**state, "shards": manifest}, path / "trainer.pt")
        if self.uploader:  # snapshots before pruning: the newest may be pruned at once (save_total_limit 0)
            root = path.parent / ".upload-snapshots"
            trainer = s3ckpt.snapshot_files([path / "trainer.pt", path / "trainer.pt.sha256"], root) if rank == 0 \
                else None
            published = self.publishing.submit(self.publish, s3ckpt.snapshot_files([path / n for n in mine], root),
                                               trainer, path, step, set(manifest))
            self.published = [f for f in self.published if not f.done()] + [published]
            if rank == 0:
                self.uploader.track(f"checkpoints/{path.name}", path, published)
        if local_first:
            s3ckpt.prune_local_checkpoints(path.parent, self.limit)
        return manifest

    def publish(self, mine, trainer, path, step, manifest):
        """Every rank: its files (the snapshot `mine`) into the run's checkpoints/<directory>/. Rank 0 then waits
        until the store lists every file of the manifest (each rank uploads its own: no collective runs behind the
        loop, so a rank that stops early leaves no other waiting on it), puts trainer.pt last, the mark of a whole
        remote directory, and expires older ones. Returns the directory's URI on rank 0."""
        artifact = f"checkpoints/{path.name}"
        self.uploader.put_files(mine, artifact, str(path))
        if trainer is None:
            return None
        deadline = time.monotonic() + self.setup.cfg.checkpoint.upload_timeout_s
        while missing := sorted(manifest - set(self.uploader.store.list(artifact))):
            if time.monotonic() > deadline:
                shutil.rmtree(trainer, ignore_errors=True)
                raise s3ckpt.CheckpointError(f"{path}: {missing[0]} never reached the run's artifacts, so no "
                                             "trainer.pt either")
            time.sleep(0.5)
        uri = self.uploader.put_files(trainer, artifact, str(path))[0].rsplit("/", 1)[0]
        self.writer.expire_remote(upto=step)  # steps after this one may still be arriving from other ranks
        return uri


def fetcher(cfg, master, cache, starts):
    """fetch(spec, pipeline_for_auto, artifact, key, what) -> a start's checkpoint on this node; rank 0 resolves it
    once and records it in `starts` under the config key it came from (the first log line, the run's tags)."""
    def fetch(spec, pipeline_for_auto, artifact, key, what):
        found = resolve_uri(cfg, spec, pipeline_for_auto, artifact, cache) if master else None
        if master:
            starts[key] = (what, spec, found[1] or str(Path(found[0]).resolve()), str(found[0]))
        return on_this_node(cfg, found, cache)
    return fetch


def resume_from(cfg, run_name, cache, starts):
    """Rank 0's (path, URI) to resume from (find_resume), recorded in `starts`; `auto` finding nothing says so."""
    found = find_resume(cfg, run_name, Path(cfg.checkpoint.dir), cache)
    if found[0]:
        starts["checkpoint.resume"] = ("resumed", cfg.checkpoint.resume, found[1] or found[0])
    elif cfg.checkpoint.resume == "auto":  # said in the first log line, not a silent fresh start
        starts["checkpoint.resume"] = (f"--resume auto found nothing to resume (no unfinished {run_name} run of "
                                       f"experiment.name '{cfg.experiment.name}'): a fresh run", "auto", "")
    return found
