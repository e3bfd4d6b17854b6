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

from wmtp.config import redacted, tracking_uri, UserError
from wmtp.parallel import (Preempted, all_gather, broadcast, files_to_read, full_state, is_sharded, load_optimizer,
                           load_optimizer_rows, load_sharded, own_files, save_sharded)
from wmtp.pretrained import check_state, load_state
from wmtp.tracking import checkpoint_uploader, finished_runs_filter, newest_run

log = logging.getLogger("weighted_mtp")


def resolve_uri(mlflow, uri, pipeline_for_auto, name, cache_dir):
    """A checkpoint path, s3:// or runs:/ URI, or `auto` (checkpoint `name` of the newest finished run of a pipeline
    in mlflow.experiment) -> (local file, the URI it was downloaded from or None). mlflow: the config's mlflow
    section (tracking_uri, experiment)."""
    uri_tracking = tracking_uri(mlflow.tracking_uri)
    if uri == "auto":
        from mlflow import MlflowClient
        run = newest_run(MlflowClient(uri_tracking), mlflow.experiment, finished_runs_filter(pipeline_for_auto))
        if run is None:
            raise UserError(f"no finished run of pipeline '{pipeline_for_auto}' in experiment "
                            f"'{mlflow.experiment}': run the {pipeline_for_auto} pipeline first")
        uri = f"runs:/{run.info.run_id}/{s3ckpt.artifact(name)}"
    try:
        path = s3ckpt.resolve_checkpoint(uri, cache_dir, tracking_uri=uri_tracking)
    except s3ckpt.CheckpointError as e:
        raise UserError(str(e))
    return str(path), (uri if uri.startswith(("s3://", "runs:/")) else None)


def on_this_node(mlflow, found, cache_dir):
    """A start's checkpoint (model.init_from, critic.checkpoint, evaluate's) as a whole file on this rank's node
    (checkpoint_on_node): a sharded one resumes its own run only."""
    path, _, sharded = checkpoint_on_node(mlflow, found, cache_dir)
    if sharded:
        raise UserError(f"{path}: a sharded checkpoint (checkpoint.format=sharded) can only resume its own run: start "
                        f"from that run's {s3ckpt.BEST} or {s3ckpt.FINAL} (whole files)")
    return path


def checkpoint_on_node(mlflow, found, cache_dir):
    """Rank 0's (path, URI) of a checkpoint (None on the other ranks), a start's or a resume's -> (a path on this
    rank's node, the URI, sharded) on every rank: rank 0's path where this node sees it (one machine, a shared disk),
    else this node's own download of the URI (mlflow.tracking_uri's), by its local rank 0 while the others wait.
    A sharded checkpoint's directory (rank 0's path, as rank 0 sees it) is not fetched here: rank 0 reads its
    trainer.pt for everyone (trainer_state), each node fetches the shard files its ranks read (load_shards)."""
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
        path = resolve_uri(mlflow, uri, None, None, cache_dir)[0]
    if dist.is_initialized():
        dist.barrier()
    if missing and not node_first:
        path = resolve_uri(mlflow, uri, None, None, cache_dir)[0]  # in the node's cache by now
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


def load_shards(uri_tracking, model, optimizer, path, uri, manifest, cache_dir):
    """A sharded checkpoint (rank 0's `path`, `uri` in the run's artifacts, trainer.pt's manifest) into the model and
    optimizer; returns the directory this rank loaded from. Each node reads it from one directory of its own: rank
    0's path where the files its ranks read are there intact (one machine, a shared disk), else the node's cache,
    filled by its local rank 0 (s3ckpt.fetch_shards: intact local copies linked, the rest downloaded and checked):
    first .metadata (it says where each tensor is), then the files DCP's load plans of the node's ranks name (its
    own ranks' shards when the world is the one that saved, and whichever files hold the replicated tensors).
    A missing or corrupted file is a one-line error naming it on every rank, before any rank loads. uri_tracking:
    the MLflow server a runs:/ URI is fetched from."""
    fetch = lambda names: s3ckpt.fetch_shards(path, uri, names, manifest, cache_dir, uri_tracking)
    where = by_node_first(lambda: fetch([".metadata"]))
    needs = all_gather((node_id(), files_to_read(model, optimizer, where)))
    names = sorted({".metadata", *(n for node, files in needs if node == node_id() for n in files)})
    where = by_node_first(lambda: fetch(names))
    load_sharded(model, optimizer, where)
    return str(where)


def rng_state():
    """The RNG component's state: torch's (and CUDA's) generators and Python's random (its Mersenne state)."""
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """rng_state's inverse: every generator continues where the checkpoint left it."""
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
    part = s3ckpt.checkpoint_part(state, "model")
    check_heads(model, part, path)
    load_state(model, part["model"], path, partial=part.get("model_partial", False))
    return state


def check_heads(model, part, path):
    """A full checkpoint lacking heads that `model` has is a one-line UserError that says where heads are added:
    re-heading (copies of head 0, the new-heads warm-up) starts from a model dir's weights, not a checkpoint's. Heads
    are read off the keys (`...extra_heads.<i>.`), so a value model's trunk is checked like a policy."""
    if part.get("model_partial", False):
        return  # adapters only: the heads come from the base model

    def heads(keys):
        return {k[:k.index("extra_heads.")] + k.split("extra_heads.")[1].split(".")[0] for k in keys
                if "extra_heads." in k}
    have = heads(part["model"])
    if heads(model.state_dict()) - have:
        raise UserError(f"{path}: has {1 + len(have)} head(s), model.n_future_tokens is {model.args.n_future_tokens}: "
                        "heads are added to a model dir's weights only (model.path; `export --format meta` writes one)")


def read_checkpoint(path):
    """A full checkpoint memory-mapped: its tensors are read only where touched (a rank its own rows)."""
    try:
        return s3ckpt.load_checkpoint(path, mmap=True)
    except s3ckpt.CheckpointError as e:
        raise UserError(str(e))


def checkpoint_tensors(model, path, state=None):
    """(path, groups) for parallel.fill_shards: a full checkpoint's model tensors (`state`, else read from path,
    memory-mapped), checked against `model` (on the meta device), one tensor a group, whose pages leave this
    process once its rows are copied."""
    part = s3ckpt.checkpoint_part(state or read_checkpoint(path), "model")
    check_heads(model, part, path)
    check_state(model, part["model"], path, partial=part.get("model_partial", False))

    def groups():
        for name, tensor in part["model"].items():
            yield {name: tensor}
            s3ckpt.release_pages(tensor)
    return str(path), groups()


def trainer_state(directory):
    """A sharded checkpoint's trainer.pt (everything but the model and optimizer shards: step, data position, the
    manifest of its shard files, ...), read by rank 0 (whose node has it: find_resume) and sent to every rank; its
    shard files are checked as each node fetches them (load_shards)."""
    state = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            state = s3ckpt.load_checkpoint(Path(directory) / s3ckpt.SHARDED_STATE)
        except s3ckpt.CheckpointError as e:
            state = f"{directory}: incomplete sharded checkpoint ({e})"
    state = broadcast(state)
    if isinstance(state, str):
        raise UserError(state)
    return state


def find_resume(choice, mlflow, experiment_name, run_name, root, cache_dir):
    """checkpoint.resume `choice`: `auto`: the newest checkpoint of an unfinished run of this config (`run_name`,
    `experiment_name`) under checkpoint.dir `root`, else (a machine that lost its disk: spot reclaim, a new VESSL
    container) the newest one in the MLflow artifacts of the newest unfinished run of that name; else the given
    path/URI; `never`: nothing. -> (local file, its URI in the run's artifacts or None), (None, None) for nothing."""
    if choice == "never":
        return None, None
    if choice != "auto":
        return resolve_uri(mlflow, choice, None, None, cache_dir)
    candidates = [p for d in (root / run_name).glob("*") if not (d / s3ckpt.FINAL).exists()
                  for p in s3ckpt.resumable_checkpoints(d)]
    if candidates:
        newest = max(candidates, key=lambda p: p.stat().st_mtime)  # in <run name>/<run id>/
        uploaded = mlflow.enable_logging and not newest.parent.name.startswith("local-")
        return str(newest), f"runs:/{newest.parent.name}/{s3ckpt.artifact(newest.name)}" if uploaded else None
    remote = newest_remote_checkpoint(mlflow, experiment_name, run_name, cache_dir) if mlflow.enable_logging else None
    return resolve_uri(mlflow, remote, None, None, cache_dir) if remote else (None, None)


def whole_remotely(client, run_id, name, cache_dir, uri_tracking):
    """Whether the remote sharded checkpoint checkpoints/<name> is whole: its trainer.pt (uploaded last) is there,
    and so is every file its manifest lists, of the size it lists (none lost to a failed node or a cleanup)."""
    listed = {Path(f.path).name: f.file_size for f in client.list_artifacts(run_id, s3ckpt.artifact(name))}
    if s3ckpt.SHARDED_STATE not in listed:
        return False
    try:
        trainer = s3ckpt.resolve_checkpoint(f"runs:/{run_id}/{s3ckpt.artifact(name)}/{s3ckpt.SHARDED_STATE}",
                                            cache_dir, uri_tracking)
        shards = s3ckpt.checkpoint_part(s3ckpt.load_checkpoint(trainer), "shards").get("shards", {})
    except s3ckpt.CheckpointError as e:
        log.warning(f"remote checkpoint {name} of run {run_id} passed over: {e}")
        return False
    return all(listed.get(n) == size for n, (size, _) in shards.items())


def newest_remote_checkpoint(mlflow, experiment_name, run_name, cache_dir):
    """runs:/ URI of the newest step checkpoint (by step number: a preemption writes one), else checkpoint_best.pt,
    of the newest unfinished run with this run name and experiment.name in mlflow.experiment; None when there is
    none to resume from."""
    from mlflow import MlflowClient
    uri_tracking = tracking_uri(mlflow.tracking_uri)
    client = MlflowClient(uri_tracking)
    same_config = (f"tags.mlflow.runName = '{run_name}' and params.`experiment.name` = '{experiment_name}' "
                   "and attributes.status != 'FINISHED'")
    run = newest_run(client, mlflow.experiment, same_config)
    if run is None:
        return None
    names = [Path(f.path).name for f in client.list_artifacts(run.info.run_id, s3ckpt.ARTIFACTS)]
    if s3ckpt.FINAL in names:  # trained to the end, only its ending was lost: as finished locally
        return None
    # a sharded checkpoint (a directory) is whole once its trainer.pt and every file that lists are there
    whole = lambda n: n.endswith(".pt") or whole_remotely(client, run.info.run_id, n, cache_dir, uri_tracking)
    steps = sorted((n for n in names if s3ckpt.checkpoint_step(n) is not None), key=s3ckpt.checkpoint_step)
    newest = next((n for n in reversed(steps) if whole(n)), s3ckpt.BEST)
    return f"runs:/{run.info.run_id}/{s3ckpt.artifact(newest)}" if newest in names else None


def training_parts(setup, step, position, run_id, best_val_loss, finished, unsent_metrics=()):
    """Each component's part of a checkpoint (s3ckpt.PARTS) but the model's and the optimizer's (full_state or the
    shards give those): the schedule's step (the learning rate is a function of it), the data position, the RNG,
    the pipeline's statistics, the tracking ids, and what export and evaluate read (config, model_args). The config
    goes in redacted: a checkpoint is uploaded and shared, and a URI's user:password@ must not travel with it."""
    return {"schedule": {"step": step}, "data": {"position": position}, "rng": {"rng": rng_state()},
            "pipeline": {"pipeline_state": setup.pipeline.state_dict()},
            "tracking": {"run_id": run_id, "best_val_loss": best_val_loss, "unsent_metrics": list(unsent_metrics)},
            "about": {"config": redacted(setup.cfg.to_dict()), "pipeline": setup.pipeline.name, "finished": finished,
                      "model_args": dataclasses.asdict(setup.model.args)}}


@dataclasses.dataclass
class LoopStart:
    """Where the training loop starts: a fresh run's defaults, or what a resumed checkpoint's parts say."""
    step: int = 0
    position: int = 0            # batches taken so far (data.Batches)
    run_id: str = None           # the run to continue; None: a new one
    best_val_loss: float = float("inf")
    unsent_metrics: list = dataclasses.field(default_factory=list)  # metrics the server had not taken yet


def read_resumed(model, path, sharded, fsdp):
    """The checkpoint a run resumes from, read as the run is laid out: a sharded one's trainer.pt (its shards load
    once the optimizer exists: load_shards); with FSDP the whole file memory-mapped (each rank copies its own rows:
    checkpoint_tensors); else the whole file, its model weights loaded into `model` now."""
    if sharded:
        return trainer_state(path)
    if fsdp:
        return read_checkpoint(path)
    return load_checkpoint_into(model, path)


def resume_components(state, model, optimizer, pipeline, fsdp):
    """Each component loads its own part of the resumed checkpoint `state` (the model's is loaded already, a
    sharded checkpoint's optimizer with its shards): the optimizer's moments (FSDP: this rank's rows of the
    memory-mapped file), the RNG, the pipeline's statistics. -> the LoopStart of the schedule, data and tracking
    parts."""
    moments = s3ckpt.checkpoint_part(state, "optimizer")
    if moments:
        (load_optimizer_rows if fsdp else load_optimizer)(model, optimizer, moments["optimizer"])
    set_rng_state(s3ckpt.checkpoint_part(state, "rng")["rng"])
    pipeline.load_state_dict(s3ckpt.checkpoint_part(state, "pipeline").get("pipeline_state"))
    return LoopStart(**s3ckpt.checkpoint_part(state, "schedule"), **s3ckpt.checkpoint_part(state, "data"),
                     **s3ckpt.checkpoint_part(state, "tracking"))


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
        self.best_val = setup.start.best_val_loss
        self.sharded, self.shards = c.format == "sharded", None  # this rank's shards in flight
        self.writer, self.uploader, self.published = None, tracking.uploader, []
        if setup.rank == 0:
            self.writer = s3ckpt.CheckpointWriter(c.save_total_limit, tracking.uploader)
        elif self.sharded and setup.cfg.mlflow.enable_logging:  # every rank uploads the shard files it writes
            self.uploader = checkpoint_uploader(run_id, setup.cfg.mlflow, c)
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

    def after_validation(self, done, val):
        """checkpoint_best.pt when val/loss is the lowest yet."""
        if val["val/loss"] < self.best_val:
            self.best_val = val["val/loss"]
            self.save(s3ckpt.BEST, done)

    def after_step(self, done):
        """A step checkpoint every checkpoint.save_every steps (the last step's is the final one)."""
        if self.save_every and done % self.save_every == 0 and done < self.total:
            self.save(s3ckpt.step_name(done, self.sharded), done)

    def preempt(self, done, signum):
        """A resumable checkpoint on disk before anyone is told to resume from it; then the run ends KILLED."""
        name = s3ckpt.step_name(done, self.sharded)
        self.save(name, done, wait=True)
        raise Preempted(signum or signal.SIGTERM, self.run_dir / name)

    def final(self):
        """checkpoint_final.pt, marked finished, written before the run ends."""
        self.save(s3ckpt.FINAL, self.total, finished=True, wait=True)

    def save(self, name, step, finished=False, wait=False):
        """Checkpoint `name` (a file, or a sharded step's directory: s3ckpt.step_name) of the state after `step`
        steps, in the run's directory: every component's part (training_parts, the model's and the optimizer's
        gathered whole, or each rank's shards), written behind the loop and uploaded into the run; `wait`: on disk
        before this returns (a preemption's, the final one)."""
        s, path = self.setup, self.run_dir / name
        parts = training_parts(s, step, self.batches.position, self.run_id, self.best_val, finished,
                               self.tracking.unsent())
        if self.sharded and s3ckpt.checkpoint_step(name) is not None:
            self.wait_shards()  # one sharded save in flight per rank, as the writer keeps one write in flight
            written = save_sharded(s.model, s.optimizer, path, self.group)
            self.shards = self.finishing.submit(self.after_shards, written, s3ckpt.cpu_copy(parts), path, step)
        elif self.writer or is_sharded(s.model):  # every rank takes part in gathering a sharded model
            weights, partial, optimizer = full_state(s.model, s.optimizer)
            if self.writer:
                self.writer.save(s3ckpt.checkpoint_dict({**parts, "model": {"model": weights, "model_partial": partial},
                                                         "optimizer": {"optimizer": optimizer}}), path)
        if wait:
            self.wait_shards()
            if self.writer:
                self.writer.wait()

    def wait_shards(self):
        """Blocks until this rank's sharded save in flight (after_shards) is done, raising what it raised; returns at
        once when none is."""
        shards, self.shards = self.shards, None
        if shards is not None:
            shards.result()

    def after_shards(self, written, parts, path, step):
        """Every rank, once its sharded save `written` is done: the files each rank wrote, with their sizes and
        sha256 (each hashes its own), gathered into one manifest; rank 0 writes trainer.pt with it; each node's
        local rank 0 applies save_total_limit to its own disk. With a run to upload into, each rank's files (rank
        0's trainer.pt apart) are snapshotted now and uploaded behind (publish)."""
        rank, local_first = self.setup.rank, int(os.environ.get("LOCAL_RANK", 0)) == 0
        mine = own_files(written.result(), rank)
        manifest = {n: e for part in all_gather(s3ckpt.shard_manifest(path, mine), self.group) for n, e in part.items()}
        trainer = path / s3ckpt.SHARDED_STATE
        if rank == 0:
            s3ckpt.save_checkpoint(s3ckpt.checkpoint_dict({**parts, "shards": {"shards": manifest}}), trainer)
        if self.uploader:  # snapshots before pruning: the newest may be pruned at once (save_total_limit 0)
            root = path.parent / ".upload-snapshots"
            trainer = s3ckpt.snapshot_files([trainer, Path(f"{trainer}.sha256")], root) if rank == 0 else None
            published = self.publishing.submit(self.publish, s3ckpt.snapshot_files([path / n for n in mine], root),
                                               trainer, path, step, set(manifest))
            self.published = [f for f in self.published if not f.done()] + [published]
            if rank == 0:
                self.uploader.track(s3ckpt.artifact(path.name), path, published)
        if local_first:
            s3ckpt.prune_local_checkpoints(path.parent, self.limit)
        return manifest

    def publish(self, mine, trainer, path, step, manifest):
        """Every rank: its files (the snapshot `mine`) into the run's checkpoints/<directory>/. Rank 0 then waits
        until the store lists every file of the manifest (each rank uploads its own: no collective runs behind the
        loop, so a rank that stops early leaves no other waiting on it), puts trainer.pt last, the mark of a whole
        remote directory, and expires older ones. Returns the directory's URI on rank 0."""
        artifact = s3ckpt.artifact(path.name)
        self.uploader.put_files(mine, artifact, str(path))
        if trainer is None:
            return None
        deadline = time.monotonic() + self.setup.cfg.checkpoint.upload_timeout_s
        while missing := sorted(manifest - set(self.uploader.store.list(artifact))):
            if time.monotonic() > deadline:
                shutil.rmtree(trainer, ignore_errors=True)
                raise s3ckpt.CheckpointError(f"{path}: {missing[0]} never reached the run's artifacts, so no "
                                             f"{s3ckpt.SHARDED_STATE} either")
            time.sleep(0.5)
        uri = self.uploader.put_files(trainer, artifact, str(path))[0].rsplit("/", 1)[0]
        self.writer.expire_remote(upto=step)  # steps after this one may still be arriving from other ranks
        return uri


def fetcher(mlflow, master, cache, starts):
    """fetch(spec, pipeline_for_auto, name, key, what) -> a start's checkpoint on this node (`auto`: checkpoint
    `name` of the newest finished run of pipeline_for_auto); rank 0 resolves it once and records it in `starts`
    under the config key it came from (the first log line, the run's tags). mlflow: the config's mlflow section."""
    def fetch(spec, pipeline_for_auto, name, key, what):
        found = resolve_uri(mlflow, spec, pipeline_for_auto, name, cache) if master else None
        if master:
            starts[key] = (what, spec, found[1] or str(Path(found[0]).resolve()), str(found[0]))
        return on_this_node(mlflow, found, cache)
    return fetch


def resume_from(cfg, run_name, cache, starts):
    """Rank 0's (path, URI) to resume from (find_resume), recorded in `starts`; `auto` finding nothing says so."""
    found = find_resume(cfg.checkpoint.resume, cfg.mlflow, cfg.experiment.name, run_name, Path(cfg.checkpoint.dir),
                        cache)
    if found[0]:
        starts["checkpoint.resume"] = ("resumed", cfg.checkpoint.resume, found[1] or found[0])
    elif cfg.checkpoint.resume == "auto":  # said in the first log line, not a silent fresh start
        starts["checkpoint.resume"] = (f"--resume auto found nothing to resume (no unfinished {run_name} run of "
                                       f"experiment.name '{cfg.experiment.name}'): a fresh run", "auto", "")
    return found
