"""
Checkpoints that survive spot machines.

- save_checkpoint / load_checkpoint: atomic local files with a sha256 sidecar, so a crash mid-save never leaves
  a half-written checkpoint behind and corruption is detected at load time.
- CheckpointWriter: the trainer's save — a CPU copy now, the write, upload hand-off and retention (by step number,
  locally and remotely) in the background.
- S3Store / MlflowStore: a run's artifacts behind put / list / delete (boto3 straight to S3 when the artifact
  location is s3://, MLflow's artifact repository otherwise).
- CheckpointUploader: snapshots, orders and retries uploads to a store in the background, runs jobs after them,
  and says in wait() which checkpoints are only local. Rank 0 creates one; with sharded checkpoints every rank does
  (each uploads the shard files it wrote: put_files).
- resolve_checkpoint: a local path, s3://..., runs:/<id>/... or "auto" -> a local file (cached); fetch_shards: the
  files of a sharded checkpoint a node reads, checked against its trainer.pt's manifest.

Nothing here logs credentials: messages name local paths and artifact URIs only.
mlflow and boto3 are imported lazily so that `import s3ckpt` stays cheap for local-only use.
"""
import concurrent.futures as cf
import copy
import hashlib
import logging
import os
import pickle
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

log = logging.getLogger("weighted_mtp.s3ckpt")

MULTIPART_CHUNK = 64 * 2**20     # multipart threshold and part size for S3 uploads
BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 30.0
# errors that waiting does not heal; everything else (refused connections, timeouts, 5xx, throttling,
# a bucket being re-created after an outage) is retried until the retry budget is spent
PERMANENT_ERRORS = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


class CheckpointError(Exception):
    """A checkpoint is missing, corrupted, truncated, or cannot be found / downloaded."""


# -----------------------------------------------------------------------------
# a run's checkpoint files and what one holds: every name and the dict's layout live here, and only here

BEST, FINAL = "checkpoint_best.pt", "checkpoint_final.pt"  # the lowest val/loss; the end of training
SHARDED_STATE = "trainer.pt"  # a sharded checkpoint directory's own state (all but the shards) and shard manifest
RUN_LOG = "training.log"      # the run's log, beside its checkpoints and in its artifacts' logs/
ARTIFACTS = "checkpoints"     # a run's checkpoints among its artifacts: runs:/<id>/checkpoints/<name>
STEP_NAME = re.compile(r"checkpoint_step_(\d+)(\.pt)?")

# Each component's keys in a checkpoint's one flat dict: the keys checkpoints have always had, so older files resume
# and export / evaluate read them as they are. A component saves its part (a dict of its keys) and loads it back
# (checkpoint_part); checkpoint_dict assembles the parts.
PARTS = {"model": ("model", "model_partial"), "optimizer": ("optimizer",), "schedule": ("step",),
         "data": ("position",), "rng": ("rng",), "pipeline": ("pipeline_state",),
         "tracking": ("run_id", "best_val_loss", "unsent_metrics"),
         "about": ("config", "pipeline", "model_args", "finished"), "shards": ("shards",)}
FORMER_KEYS = {"pipeline_state": "ema"}  # checkpoints written before the pipelines' split named it so


def step_name(step, sharded=False):
    """The step checkpoint's name: checkpoint_step_<step>.pt, a sharded one's directory without the suffix."""
    return f"checkpoint_step_{step}" + ("" if sharded else ".pt")


def artifact(name):
    """Where checkpoint `name` lies among its run's artifacts (a runs:/<id>/... path)."""
    return f"{ARTIFACTS}/{name}"


def resumable_checkpoints(run_dir):
    """The checkpoints of a run's directory that a resume may start from: checkpoint_best.pt, the step files and the
    sharded step directories whose trainer.pt is written (a directory without one is still being written)."""
    d = Path(run_dir)
    return [p for p in d.iterdir() if p.name == BEST or (checkpoint_step(p.name) is not None and (
        p.suffix == ".pt" and p.is_file() or (p / SHARDED_STATE).is_file()))] if d.is_dir() else []


def checkpoint_dict(parts):
    """{component: its part} -> the flat dict a checkpoint file holds. A key outside its component's PARTS entry is
    a bug caught here: no two components write one key."""
    state = {}
    for component, part in parts.items():
        stray = set(part) - set(PARTS[component])
        if stray:
            raise KeyError(f"checkpoint part {component!r} has no key {sorted(stray)[0]!r} (s3ckpt.PARTS)")
        state.update(part)
    return state


def checkpoint_part(state, component):
    """A checkpoint dict's `component` part: those of its PARTS keys the file holds, a key under its FORMER_KEYS
    name read as the new one (the new name wins), a key the file lacks left out."""
    part = {}
    for key in PARTS[component]:
        if key in state or FORMER_KEYS.get(key) in state:
            part[key] = state[key] if key in state else state[FORMER_KEYS[key]]
    return part


# -----------------------------------------------------------------------------
# local files

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path, write):
    """Runs write(f) on a uniquely named temp file beside path, fsyncs it and renames it onto path.
    Readers see the old file or the new one, never a mix; on error no temp file is left behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique: two writers never share a temp file
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state, path):
    """Saves state to path atomically and writes <path>.sha256 (hex digest of the file's bytes) atomically after it.
    The checkpoint is replaced by os.replace, so an earlier hard link (a queued upload's snapshot) keeps the old
    bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # old sidecar first: a crash in between leaves a checkpoint unverified, never a good one that fails its checksum
    Path(f"{path}.sha256").unlink(missing_ok=True)
    _atomic_write(path, lambda f: torch.save(state, f))
    _write_sidecar(path, _sha256(path))  # hashed from disk (page cache): what a later load will read
    try:  # fsync the directory too, so the renames themselves survive a power cut
        fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass
    return path


def _read_text(path):
    path = Path(path)
    return path.read_text().strip() if path.is_file() else None


def _write_sidecar(path, digest):
    """Writes <path>.sha256 atomically; digest None removes it (a stale one would fail the checksum)."""
    if digest is None:
        Path(f"{path}.sha256").unlink(missing_ok=True)
    else:
        _atomic_write(Path(f"{path}.sha256"), lambda f: f.write(f"{digest}\n".encode()))


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Loads a checkpoint; when <path>.sha256 exists the bytes must match it. Raises CheckpointError otherwise.
    mmap: tensors stay in the file, read when touched (a rank that keeps its own rows of each reads only those)."""
    path = Path(path)
    expected = _read_text(f"{path}.sha256")
    if path.is_file() and expected is not None and _sha256(path) != expected:
        raise CheckpointError(f"{path}: checksum mismatch (corrupted or truncated)")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError:
            # weights_only refused a type (e.g. a numpy RNG state): these are our own files, so unpickle them fully
            return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from e


def shard_manifest(directory, names=None):
    """{file: [bytes, sha256]} of a sharded checkpoint directory's shard files (all but trainer.pt*; only `names`
    when given: the files one rank wrote): what verify_shards checks before a resume reads any of them."""
    files = [Path(directory) / n for n in names] if names is not None else sorted(Path(directory).iterdir())
    return {f.name: [f.stat().st_size, _sha256(f)] for f in files
            if f.is_file() and not f.name.startswith(SHARDED_STATE)}


def _intact(path, entry):
    """Whether path holds the bytes a manifest's [size, sha256] entry lists (None, a checkpoint without a
    manifest: whether it is there)."""
    path = Path(path)
    if not path.is_file() or entry is None:
        return path.is_file()
    return path.stat().st_size == entry[0] and _sha256(path) == entry[1]


def verify_shards(directory, manifest):
    """Raises CheckpointError naming the first shard file of `manifest` that is missing, of another size, or whose
    bytes do not hash to the manifest's: never a partial or corrupted load."""
    for name, entry in manifest.items():
        path = Path(directory) / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (its checkpoint's {SHARDED_STATE} lists it)")
        if not _intact(path, entry):
            raise CheckpointError(f"{path}: checksum mismatch (corrupted or truncated)")


def checkpoint_step(name):
    """'checkpoint_step_120.pt' (or any path / S3 key ending so) -> 120, also for a sharded checkpoint's directory
    'checkpoint_step_120' (or 'checkpoint_step_120/'); None for every other name."""
    m = STEP_NAME.fullmatch(Path(str(name)).name)
    return int(m.group(1)) if m else None


def _prune(names, save_total_limit, delete, spare=lambda name: False):
    """Calls delete(n) for each step checkpoint among names beyond the newest save_total_limit — by step number,
    never by name or mtime ('100' < '20' as strings) — and for its .sha256 when names holds one; spare(name) keeps
    one. Best, final and other files are never touched; None or < 0 keeps all. Returns the deleted checkpoint names,
    oldest first."""
    if save_total_limit is None or save_total_limit < 0:
        return []
    names = set(names)
    steps = sorted((checkpoint_step(n), n) for n in names if checkpoint_step(n) is not None)
    deleted = []
    for _, name in steps[:max(len(steps) - save_total_limit, 0)]:
        if not spare(name):
            for n in (name, f"{name}.sha256"):
                if n in names:
                    delete(n)
            deleted.append(name)
    return deleted


def prune_local_checkpoints(ckpt_dir, save_total_limit):
    """Removes the step checkpoints of ckpt_dir beyond the newest save_total_limit (and their .sha256).
    Keeps checkpoint_best.pt and checkpoint_final.pt. Returns the removed checkpoint paths, oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    def delete(n):  # several nodes may prune one shared directory: a name another removed first is gone already
        shutil.rmtree(d / n, ignore_errors=True) if (d / n).is_dir() else (d / n).unlink(missing_ok=True)
    return [d / n for n in _prune(os.listdir(d), save_total_limit, delete)]


def cpu_copy(state):
    """state with every tensor replaced by a detached CPU copy (and every other leaf deep-copied): what a background
    write may serialise while training keeps changing the originals in place."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: cpu_copy(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cpu_copy(v) for v in state)
    return copy.deepcopy(state)


def s3_etag(path, part_size):
    """The ETag S3 gives `path` uploaded by upload_file with multipart threshold = chunk size = part_size:
    md5(file) below the threshold, else md5(md5(part_1) ‖ … ‖ md5(part_n)) + "-n", the part size doubled until
    n ≤ 10 000 (as s3transfer does)."""
    size, threshold = Path(path).stat().st_size, part_size
    while -(-size // part_size) > 10_000:
        part_size *= 2
    with open(path, "rb") as f:
        parts = [hashlib.md5(block, usedforsecurity=False) for block in iter(lambda: f.read(part_size), b"")]
    if size < threshold:  # one PUT: the part is the whole file
        return parts[0].hexdigest() if parts else hashlib.md5(b"", usedforsecurity=False).hexdigest()
    return hashlib.md5(b"".join(p.digest() for p in parts), usedforsecurity=False).hexdigest() + f"-{len(parts)}"


class CheckpointWriter:
    """Saves checkpoints in a background thread, so the training loop waits only for a CPU copy of the state.
    Serialising, hashing, fsync, the upload hand-off and retention run behind it. One write is in flight at most:
    that bounds the extra host memory to one copy of the state, and keeps checkpoints landing in order. A failed
    write (disk full) is raised by the next save() or wait(). Retention (save_total_limit) is the writer's alone:
    locally at once (a queued upload has its own snapshot), remotely as a job of the uploader."""

    def __init__(self, save_total_limit, uploader=None):
        self.save_total_limit, self.uploader = save_total_limit, uploader
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="ckpt-write")
        self._pending = None

    def save(self, state, path):
        """Waits for the previous write (raising its error), takes a CPU copy of state (cpu_copy) and returns: the
        write to path, its upload and retention run in the background."""
        self.wait()
        self._pending = self._pool.submit(self._write, cpu_copy(state), Path(path))

    def wait(self):
        """Blocks until the last saved checkpoint is on disk and queued for upload; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self):
        """Finishes the write in flight; its error is logged, not raised (the run is failing already)."""
        try:
            self.wait()
        except Exception as e:
            log.error("checkpoint write failed: %s", e)
        self._pool.shutdown(wait=True)

    def expire_remote(self, artifact_path=ARTIFACTS, upto=None):
        """Returns a Future of the deleted remote names. Once every upload submitted before this call has landed
        (the newer checkpoints it keeps must be remote before the older ones go), deletes the remote step
        checkpoints beyond the newest save_total_limit and their .sha256; spares any name an upload submitted later
        still writes. upto: steps after it are not counted (a sharded directory other nodes are still filling)."""
        return self.uploader.after_uploads(lambda store: self._expire_remote(store, artifact_path.strip("/"), upto))

    def _write(self, state, path):
        save_checkpoint(state, path)
        self._upload_and_prune(path)

    def _upload_and_prune(self, path):
        if self.uploader:
            self.uploader.upload_to_s3_async(path)
        if checkpoint_step(path.name) is not None:
            prune_local_checkpoints(path.parent, self.save_total_limit)
            if self.uploader:
                self.expire_remote()

    def _expire_remote(self, store, artifact_path, upto=None):
        names = [n for n in store.list(artifact_path) if upto is None or (checkpoint_step(n) or 0) <= upto]
        deleted = _prune(names, self.save_total_limit,
                         delete=lambda n: store.delete(f"{artifact_path}/{n}"),
                         spare=lambda n: self.uploader.uploading(f"{artifact_path}/{n.rstrip('/')}"))
        deleted = [f"{artifact_path}/{n.rstrip('/')}" for n in deleted]
        if deleted:
            log.info("removed remote checkpoints %s", deleted)
        return deleted


# -----------------------------------------------------------------------------
# artifact stores: put(local_path, artifact_path) -> URI, list(artifact_path) -> names (a directory's ending in
# "/"), delete(name) (a directory's: everything under it)

def s3_client(max_attempts=5, connect_timeout=10, read_timeout=120):
    """A boto3 S3 client configured from the environment (MLFLOW_S3_ENDPOINT_URL or AWS_ENDPOINT_URL,
    AWS_DEFAULT_REGION, the usual AWS_* credentials), with standard-mode retries and timeouts."""
    import boto3
    from botocore.config import Config
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout, read_timeout=read_timeout,
        # boto3 >= 1.36 adds CRC checksums to every request by default; several S3-compatible stores reject them
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
        # custom endpoints (MinIO, moto, ...) rarely resolve bucket subdomains
        s3={"addressing_style": "path"} if endpoint else None,
    )
    # a Session per client: boto3 clients are thread-safe, the default session is not
    return boto3.session.Session().client("s3", endpoint_url=endpoint,
                                          region_name=os.environ.get("AWS_DEFAULT_REGION"), config=config)


def _split_s3(uri):
    u = urlparse(uri)
    return u.netloc, u.path.strip("/")


class S3Store:
    """Artifacts under s3://bucket/prefix, straight through boto3 rather than MLflow's S3 repository: multipart
    parts of MULTIPART_CHUNK, and every upload verified on S3 by its size and by its ETag against the file's MD5
    (unless verify_etag is off, for a store with another ETag scheme, or the object is SSE-KMS/SSE-C)."""

    def __init__(self, uri, client, verify_etag=True):
        (self.bucket, self.prefix), self.s3, self.verify_etag = _split_s3(uri), client, verify_etag

    def _key(self, name):
        return f"{self.prefix}/{name}".lstrip("/")

    def put(self, local_path, artifact_path):
        """Uploads the file to <prefix>/<artifact_path>/<its name>; returns its s3:// URI. IOError when S3 holds
        another size or (verify_etag) another ETag than the local file."""
        from boto3.s3.transfer import TransferConfig
        path = Path(local_path)
        key = self._key(f"{artifact_path}/{path.name}")
        config = TransferConfig(multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK,
                                max_concurrency=4)
        self.s3.upload_file(str(path), self.bucket, key, Config=config)
        head = self.s3.head_object(Bucket=self.bucket, Key=key)
        if head["ContentLength"] != path.stat().st_size:
            raise IOError(f"s3://{self.bucket}/{key} holds {head['ContentLength']} bytes, the local file "
                          f"{path.stat().st_size}")
        # an MD5-based ETag is the server's checksum of what it stored; SSE-KMS and SSE-C objects have another kind
        md5_etag = head.get("ServerSideEncryption") != "aws:kms" and "SSECustomerAlgorithm" not in head
        if self.verify_etag and md5_etag and head["ETag"].strip('"') != s3_etag(path, MULTIPART_CHUNK):
            raise IOError(f"s3://{self.bucket}/{key}: ETag {head['ETag']} does not match the local file's")
        return f"s3://{self.bucket}/{key}"

    def list(self, artifact_path):
        """The names directly under artifact_path/: objects as they are, sub-directories ending in "/"."""
        prefix, names = self._key(f"{artifact_path}/"), []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
            names += [p["Prefix"][len(prefix):] for p in page.get("CommonPrefixes", [])]
        return names

    def delete(self, name):
        """Deletes the object `name`, or with a trailing "/" every object under it."""
        # one DeleteObject per key: DeleteObjects needs a Content-MD5/CRC that some S3-compatible stores reject
        keys = [self._key(name)]
        if name.endswith("/"):
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self._key(name))
            keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        for key in keys:
            self.s3.delete_object(Bucket=self.bucket, Key=key)


class MlflowStore:
    """Every other artifact location (a local file store, the mlflow-artifacts:/ proxy, ...): MLflow's artifact
    repository for it knows the way. delete() raises where the store cannot delete. A local directory store on the
    checkpoint's filesystem gets a hard link instead of a second copy (put_link)."""

    def __init__(self, uri, tracking_uri=None):
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        self.uri, self.repo = uri, get_artifact_repository(uri, tracking_uri=tracking_uri)
        self.local_root = Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else None

    def put(self, local_path, artifact_path):
        """The file into artifact_path/ (a hard link in a local store where one can be made, else a copy through
        MLflow); returns <store URI>/<artifact_path>/<its name>."""
        if not (self.local_root and self.put_link(Path(local_path), self.local_root / artifact_path)):
            self.repo.log_artifact(str(local_path), artifact_path)
        return f"{self.uri}/{artifact_path}/{Path(local_path).name}"

    @staticmethod
    def put_link(src, folder):
        """Hard-links src into folder (the trainer replaces its files, never rewrites them: the link keeps the bytes
        it had) and checks the result against src's .sha256 sidecar when it has one; False when no link can be made
        (another filesystem), so the caller copies."""
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{src.name}.{uuid.uuid4().hex}.link"
        try:
            os.link(src, tmp)
        except OSError:
            return False
        expected = _read_text(f"{src}.sha256")
        if expected is not None and _sha256(tmp) != expected:
            tmp.unlink()
            raise CheckpointError(f"{src}: its bytes do not match {src}.sha256")
        os.replace(tmp, folder / src.name)
        return True

    def list(self, artifact_path):
        """The names directly under artifact_path, a directory's ending in "/"."""
        return [Path(f.path).name + ("/" if f.is_dir else "") for f in self.repo.list_artifacts(artifact_path)]

    def delete(self, name):
        """Deletes the artifact `name` (a directory's: everything under it); raises where the store cannot delete."""
        self.repo.delete_artifacts(name.rstrip("/"))


def artifact_store(run_id, tracking_uri=None, client=None, verify_etag=True):
    """The store of an MLflow run's artifacts: S3Store (client, else s3_client()) when they live on s3://,
    MlflowStore otherwise."""
    from mlflow import MlflowClient
    uri = MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri.rstrip("/")
    if uri.startswith("s3://"):
        return S3Store(uri, client or s3_client(), verify_etag)
    return MlflowStore(uri, tracking_uri)


# -----------------------------------------------------------------------------
# the uploader: snapshots, orders and retries jobs against a store

def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def snapshot_files(paths, root):
    """Hard links (copies on another filesystem) of paths, taken now, in a new folder under root: what a later
    put_files uploads, whatever pruning or a newer save does to the originals meanwhile."""
    folder = Path(root) / uuid.uuid4().hex
    folder.mkdir(parents=True)
    try:
        for p in paths:
            _link_or_copy(p, folder / Path(p).name)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _is_permanent(e):
    return isinstance(e, FileNotFoundError) or any(code in str(e) for code in PERMANENT_ERRORS)


def _failure(fut):
    """A done future's exception, "cancelled", or None when it succeeded."""
    return "cancelled" if fut.cancelled() else fut.exception()


class CheckpointUploader:
    """Uploads files into one MLflow run's artifacts (self.store) in background threads. Rank 0's Tracking
    creates one; with sharded checkpoints every rank that uploads its own shards does too.

    Every upload works on a snapshot (hard link) taken when it is submitted and retries transient errors with
    exponential backoff for retry_budget_s. Uploads of the same name land in submission order; a job given to
    after_uploads() runs once every upload submitted before it has finished. wait() reports what is only local.
    """

    def __init__(self, run_id, tracking_uri=None, max_workers=2, retry_budget_s=300.0, snapshot_dir=None,
                 client=None, verify_etag=True):
        self.store = artifact_store(run_id, tracking_uri, client, verify_etag)
        self.retry_budget_s, self.snapshot_dir = retry_budget_s, Path(snapshot_dir) if snapshot_dir else None
        self._uploads = cf.ThreadPoolExecutor(max_workers, thread_name_prefix="ckpt-upload")
        # jobs wait on uploads: in their own thread, so a waiting job never holds an upload worker idle
        self._jobs = cf.ThreadPoolExecutor(1, thread_name_prefix="ckpt-cleanup")
        self._lock = threading.Lock()
        self._latest = {}           # remote name -> (future, local path) of its newest submitted upload
        self._job_futures = []
        self._stop = threading.Event()

    def upload_to_s3_async(self, checkpoint_path, artifact_path=ARTIFACTS):
        """Uploads to the run's artifact store (S3, or the local directory of the embedded default; the name is the
        users' guide's). Returns at once a Future of the remote URI. The file (and its .sha256) is snapshotted now, so a
        later overwrite or local pruning cannot change or lose what gets uploaded. Never raises: a failure, even of the
        snapshot, is the future's exception and is reported by wait(). A directory (a sharded checkpoint) goes up whole
        under artifact_path/<its name>/, its trainer.pt last: the remote directory is whole once that is in."""
        src, artifact_path = Path(checkpoint_path), artifact_path.strip("/")
        name = f"{artifact_path}/{src.name}"
        with self._lock:
            prev = self._latest.get(name, (None, None))[0]
            try:
                fut = self._uploads.submit(self._upload, self._snapshot(src), artifact_path, str(src), prev)
            except Exception as e:  # no such file, disk full, already closed: report it, never stop training
                log.error("cannot queue the upload of %s: %s", src, e)
                fut = cf.Future()
                fut.set_exception(e)
            self._latest[name] = (fut, str(src))
        return fut

    def after_uploads(self, job):
        """Returns a Future of job(store), run once every upload submitted before this call has finished."""
        with self._lock:
            before = [f for f, _ in self._latest.values() if not f.done()]
            fut = self._jobs.submit(self._after, before, job)
            self._job_futures.append(fut)
        return fut

    def track(self, name, local, fut):
        """Counts the Future fut (an upload done elsewhere: a sharded checkpoint's, whole once it is done) as the
        newest upload of the remote name, of the local path: wait(), uploading() and after_uploads() see it."""
        with self._lock:
            self._latest[name] = (fut, str(local))

    def put_files(self, folder, artifact_path, local):
        """Uploads every file of folder (a snapshot_files snapshot; trainer.pt* last) into artifact_path now, in
        this thread, retrying as every upload does; removes the snapshot once all are in. Returns their URIs."""
        files = sorted(Path(folder).iterdir(), key=lambda f: (f.name.startswith(SHARDED_STATE), f.name))
        uris = self._put([(f, artifact_path.strip("/")) for f in files], local, folder)
        shutil.rmtree(folder, ignore_errors=True)
        return uris

    def uploading(self, name):
        """Whether an upload of the remote name (artifact_path/file) is queued or running."""
        with self._lock:
            fut = self._latest.get(name, (None, None))[0]
        return fut is not None and not fut.done()

    def wait(self, timeout=None):
        """Waits up to timeout seconds for every queued upload and job. Returns the local paths whose newest
        upload failed or has not finished, each logged (an empty list: every submitted checkpoint is safe remotely)."""
        with self._lock:
            latest, jobs = list(self._latest.values()), list(self._job_futures)
        done, _ = cf.wait([f for f, _ in latest] + jobs, timeout=timeout)
        unsafe = []
        for fut, local in latest:
            if fut not in done:
                log.error("checkpoint %s is only local: its upload did not finish within %ss", local, timeout)
            elif _failure(fut):
                log.error("checkpoint %s is only local: its upload failed (%s)", local, _failure(fut))
            else:
                continue
            unsafe.append(local)
        for fut in jobs:
            if fut in done and _failure(fut):
                log.warning("remote checkpoint cleanup failed: %s", _failure(fut))
        return list(dict.fromkeys(unsafe))

    def close(self):
        """Shuts the executors down without blocking: queued tasks are cancelled and a retrying upload gives up
        after its current attempt. Call wait() first."""
        self._stop.set()
        self._uploads.shutdown(wait=False, cancel_futures=True)
        self._jobs.shutdown(wait=False, cancel_futures=True)

    def _after(self, before, job):
        cf.wait(before)
        return job(self.store)

    def _snapshot(self, src):
        root = self.snapshot_dir or src.parent / ".upload-snapshots"
        d = root / uuid.uuid4().hex
        d.mkdir(parents=True)
        try:
            if src.is_dir():
                shutil.copytree(src, d / src.name, copy_function=_link_or_copy)
                return d / src.name
            for p in (src, Path(f"{src}.sha256")):
                if p is src or p.exists():
                    try:
                        os.link(p, d / p.name)  # the trainer writes by os.replace: this inode keeps today's bytes
                    except OSError:  # another filesystem or no hard links: a copy, still taken now
                        shutil.copy2(p, d / p.name)  # (a missing file raises here too)
        except Exception:
            shutil.rmtree(d, ignore_errors=True)
            raise
        return d / src.name

    def _upload(self, snap, artifact_path, local, prev):
        if prev is not None:
            cf.wait([prev])  # an older upload of this name must land first, or it would overwrite the newer one
        files = [(f, artifact_path) for f in (snap, Path(f"{snap}.sha256")) if f is snap or f.exists()]
        if snap.is_dir():
            inside = sorted((f for f in snap.rglob("*") if f.is_file()), key=lambda f: f.name.startswith(SHARDED_STATE))
            files = [(f, f"{artifact_path}/{f.parent.relative_to(snap.parent)}") for f in inside]
        uris = self._put(files, local, snap)
        uri = uris[0] if not snap.is_dir() else uris[-1].rsplit("/", 1)[0]
        shutil.rmtree(snap.parent, ignore_errors=True)
        log.info("uploaded %s -> %s", local, uri)
        return uri

    def _put(self, files, local, snap):
        """store.put of each (file, artifact path), all of them again after a transient error until the retry
        budget is spent (uploading a file again overwrites it: no half state)."""
        deadline, delay, attempt = time.monotonic() + self.retry_budget_s, BACKOFF_START_S, 1
        while True:
            try:
                return [self.store.put(f, path) for f, path in files]
            except Exception as e:
                left = deadline - time.monotonic()
                if _is_permanent(e) or left <= 0 or self._stop.is_set():
                    log.error("upload of %s failed after %d attempt(s): %s (snapshot kept at %s)",
                              local, attempt, e, snap)
                    raise
                log.warning("upload of %s failed (attempt %d: %s); retrying in %.1fs", local, attempt, e,
                            min(delay, left))
                self._stop.wait(min(delay, left))
                delay, attempt = min(2 * delay, BACKOFF_MAX_S), attempt + 1


# -----------------------------------------------------------------------------
# download

def _download_s3(bucket, key, cache_dir):
    from botocore.exceptions import BotoCoreError, ClientError
    s3, dst = s3_client(), Path(cache_dir) / "s3" / bucket / key
    try:
        size = s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
        try:
            digest = s3.get_object(Bucket=bucket, Key=f"{key}.sha256")["Body"].read().decode().strip()
        except ClientError as e:
            if e.response["Error"]["Code"] not in ("NoSuchKey", "404"):
                raise
            digest = None  # uploaded without one: the size alone decides
        # checkpoints of one model all have the same size: the digest, when there is one, tells versions apart
        if dst.is_file() and dst.stat().st_size == size and _read_text(f"{dst}.sha256") == digest:
            return dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(dst, lambda f: s3.download_fileobj(bucket, key, f))
    except (BotoCoreError, ClientError) as e:
        raise CheckpointError(f"s3://{bucket}/{key}: cannot download ({e})") from e
    _write_sidecar(dst, digest)
    return dst


def _is_dir_name(name):
    """A sharded checkpoint is a directory named without a suffix (checkpoint_step_120); files are *.pt."""
    return checkpoint_step(name) is not None and not str(name).endswith(".pt")


def _download_mlflow(uri, run_id, path, cache_dir, tracking_uri):
    import mlflow
    dst = Path(cache_dir) / "runs" / run_id / path
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=dst.parent)  # same filesystem: os.replace is atomic
    try:
        get = lambda u: mlflow.artifacts.download_artifacts(artifact_uri=u, dst_path=tmp, tracking_uri=tracking_uri)
        got = get(uri)
        if Path(got).is_dir():  # a sharded checkpoint: a newer download replaces an older one whole
            shutil.rmtree(dst, ignore_errors=True)
        os.replace(got, dst)
        try:
            digest = _read_text(get(f"{uri}.sha256"))
        except Exception:
            digest = None  # uploaded without one
    except Exception as e:
        raise CheckpointError(f"{uri}: cannot download ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_sidecar(dst, digest)
    return dst


def resolve_checkpoint(uri, cache_dir, tracking_uri=None):
    """Returns a local file for uri: a local path as it is; s3://bucket/key and runs:/<run_id>/<path> downloaded
    atomically into cache_dir (with their .sha256 when the remote has one, so load_checkpoint verifies them).
    A sharded checkpoint's directory comes down as its trainer.pt alone (-> the directory in the cache): each node
    fetches the shard files it reads later (fetch_shards). Raises CheckpointError. (`auto` is the trainer's:
    checkpointing.resolve_uri turns it into a runs:/ URI.)"""
    uri = str(uri).rstrip("/")
    if not uri.startswith(("s3://", "runs:/")):
        path = Path(uri).expanduser()
        if not path.is_file() and not (path / SHARDED_STATE).is_file():
            raise CheckpointError(f"{path}: no such checkpoint file (or sharded checkpoint directory)")
        return path
    if _is_dir_name(uri):
        return resolve_checkpoint(f"{uri}/{SHARDED_STATE}", cache_dir, tracking_uri).parent
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    try:
        if uri.startswith("s3://"):
            return _download_s3(*_split_s3(uri), cache_dir)
        run_id, _, path = uri[len("runs:/"):].strip("/").partition("/")
        base = MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri.rstrip("/")
        if base.startswith("s3://"):
            bucket, prefix = _split_s3(base)
            return _download_s3(bucket, f"{prefix}/{path}".lstrip("/"), cache_dir)
        return _download_mlflow(uri, run_id, path, cache_dir, tracking_uri)
    except MlflowException as e:
        raise CheckpointError(f"{uri}: {e}") from e


def _fetch_intact(uri, entry, cache_dir, tracking_uri):
    """resolve_checkpoint(uri), its bytes checked against the manifest's entry; a cached copy that fails the check
    (stale, broken) is downloaded once more before the remote copy is called corrupted."""
    got = resolve_checkpoint(uri, cache_dir, tracking_uri)
    if not _intact(got, entry):
        got.unlink()
        got = resolve_checkpoint(uri, cache_dir, tracking_uri)
    if not _intact(got, entry):
        raise CheckpointError(f"{uri}: checksum mismatch with its checkpoint's {SHARDED_STATE} (corrupted or "
                              "truncated)")
    return got


def fetch_shards(local_dir, uri, names, manifest, cache_dir, tracking_uri=None):
    """The directory that holds the files `names` of a sharded checkpoint, each as trainer.pt's manifest lists it:
    local_dir when it holds them all intact (one machine, a shared disk); else uri's folder in cache_dir, what is
    missing or broken downloaded from uri (the checkpoint's directory in the run's artifacts) and the intact local
    copies linked in. Raises CheckpointError naming the first file missing or corrupted (locally without a uri)."""
    local = Path(local_dir) if local_dir else None
    bad = [n for n in names if not (local and _intact(local / n, manifest.get(n)))]
    if not bad:
        return local
    if not uri:
        verify_shards(local, {n: manifest.get(n) for n in bad})  # raises, naming the first
    folder = None
    for name in bad:
        folder = _fetch_intact(f"{uri.rstrip('/')}/{name}", manifest.get(name), cache_dir, tracking_uri).parent
    for name in sorted(set(names) - set(bad)):
        if not _intact(folder / name, manifest.get(name)):
            tmp = folder / f".{name}.{uuid.uuid4().hex}.link"
            _link_or_copy(local / name, tmp)
            os.replace(tmp, folder / name)
    return folder


def release_pages(t):
    """Drops a memory-mapped tensor's pages from this process's resident memory (madvise MADV_DONTNEED; the mapping
    is private and never written, so a page touched again is read from the file again): a file read a tensor at a
    time then costs one tensor of RSS, not the whole file. Only the pages that lie wholly inside the tensor are
    released (at most two partial pages stay resident), so memory beside it is never touched: on heap memory, where
    a released page reads back as zeros, only the tensor's own contents are lost, never a neighbour's or malloc's."""
    import ctypes  # here: nothing else in this file needs it
    page, start = os.sysconf("SC_PAGE_SIZE"), t.data_ptr()
    first, end = -(-start // page) * page, (start + t.nbytes) // page * page
    if end > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), 4)
