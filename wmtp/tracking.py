"""
MLflow, rank 0 only: the experiment (created and marked as model development), the run (created or resumed),
params, metrics sent off the training thread, system metrics, artifacts and uploads, the run's end status;
newest_run() behind every `auto`; preflight and doctor checks of the credentials and stores.
"""
import contextlib
import io
import logging
import math
import os
from pathlib import Path
import queue
import re
import sys
import threading
import time

import s3ckpt
import yaml

from wmtp.config import flatten, redacted, tracking_uri, UserError
from wmtp.parallel import Meter, Preempted, all_reduce
log = logging.getLogger("weighted_mtp")
RECORD = logging.getLogger("weighted_mtp.record")  # training.log only: the console shows the progress bar


EXPERIMENT_KIND = "mlflow.experimentKind"


def experiment_artifact_location(cfg, uri):
    """Where a self-created experiment keeps artifacts: mlflow.s3_artifacts when set; a tracking server decides
    for itself; a local sqlite store gets a mlartifacts/ folder beside its database (not the CWD)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.mlflow.experiment).strip("-")
    if cfg.mlflow.s3_artifacts:
        return None if uri.startswith("http") else cfg.mlflow.s3_artifacts.rstrip("/") + "/" + slug
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / slug).as_uri()
    return None


def experiment_id(client, cfg):
    """The id of mlflow.experiment, created if needed, marked as model development (else MLflow 3's UI opens it as
    a GenAI experiment: an empty Traces page)."""
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        cfg.mlflow.experiment,
        artifact_location=experiment_artifact_location(cfg, tracking_uri(cfg.mlflow.tracking_uri)))
    if not exp or EXPERIMENT_KIND not in exp.tags:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND, "custom_model_development")
    return exp_id


def git_commit():
    """The commit of the code that runs (`git rev-parse HEAD` in the repo), or None outside a git checkout; tagged as
    mlflow.source.git.commit, so a result can be traced to its code."""
    import subprocess
    try:
        r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def source_tags():
    """{mlflow.source.git.commit: <commit>} inside a git checkout, else {}: every run carries it."""
    commit = git_commit()
    return {"mlflow.source.git.commit": commit} if commit else {}


def ui_base(uri, port=None):
    """The MLflow UI's address: the tracking server itself, or `./run.sh ui` on this machine for a sqlite store."""
    return uri.rstrip("/") if uri.startswith("http") else f"http://127.0.0.1:{port or os.environ.get('PORT', 5000)}"


def runs_view_url(uri, exp_id, port=None):
    """The experiment's runs in the MLflow UI's model-training view. `workflowType=machine_learning` because MLflow
    3's workflow toggle lives in the browser's localStorage, defaults to GenAI and ignores the experiment's kind
    (mlflow/mlflow#24498): without it a fresh browser opens the Traces page."""
    return f"{ui_base(uri, port)}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def run_url(uri, exp_id, run_id, port=None):
    """One run's page in the model-training view (without workflowType a fresh browser files it under GenAI's
    "Evaluations")."""
    return f"{ui_base(uri, port)}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning"


def ui_url(uri, experiment):
    """The runs view of `experiment` (see runs_view_url); a UserError when the store has no such experiment."""
    from mlflow import MlflowClient
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"experiment '{experiment}' not found in {uri} (no run has been logged there yet)")
    return runs_view_url(uri, exp.experiment_id)


def log_params(client, run_id, params):
    """params {name: value} on a run: values as text cut to MLflow's 6000 characters, 100 per request (its limit)."""
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def newest_run(client, experiment, where):
    """The newest run (by start time) of `experiment` that matches the MLflow filter `where`, or None. Every `auto`
    is one of these searches: a pipeline's newest finished run, or the newest unfinished run of this config."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], where, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def finished_runs_filter(pipeline):
    """The MLflow search filter for the finished runs of `pipeline` (its runs carry the tag pipeline=<name>)."""
    return f"tags.pipeline = '{pipeline}' and attributes.status = 'FINISHED'"


# Where a run's weights come from, one config key each; the short names make the tags wmtp.<short>.resolved/.run.
START_KEYS = {"model.init_from": "init_from", "model.path": "model_path", "critic.checkpoint": "critic",
              "reference.path": "reference", "checkpoint.resume": "resume"}
RUN_ID = re.compile(r"[0-9a-f]{32}")


def source_run(resolved):
    """The MLflow run a checkpoint came from: the id in runs:/<id>/..., else the <run id> directory the trainer
    writes a local checkpoint into (checkpoint.dir/<run name>/<run id>/...), else ''."""
    if resolved.startswith("runs:/"):
        return resolved[len("runs:/"):].split("/", 1)[0]
    parent = Path(resolved).parent.name
    return parent if RUN_ID.fullmatch(parent) else ""


def start_text(starts, files=True):
    """The first log line's account of where the weights come from: `starts` {config key: (what it starts, what the
    config says, what that resolved to[, the local file read])}, e.g. "policy from runs:/<id>/checkpoints/
    checkpoint_final.pt (model.init_from=auto, file <checkpoint.dir>/.cache/...); reference from ..."."""
    def one(key, what, spec, resolved, local=""):
        said = [f"{key}={spec}" if spec and spec != resolved else "",
                f"file {local}" if files and local and local != resolved else ""]
        said = ", ".join(s for s in said if s)
        return what if not resolved else f"{what} from {resolved}" + (f" ({said})" if said else "")
    return "; ".join(one(k, *starts[k]) for k in sorted(starts, key=list(START_KEYS).index))


def run_description(cfg, use_micro, starts):
    """The run's note (MLflow's Description column in the runs list): [micro] for the micro model, the config's
    experiment.description, and where it started, source runs by their first 8 characters, so that runs of one
    name tell apart at a glance."""
    order = sorted(starts, key=list(START_KEYS).index)
    short = [f"{starts[k][0]} from " + (f"run {source_run(starts[k][2])[:8]}" if source_run(starts[k][2]) else
                                        Path(starts[k][2]).name if "/" in starts[k][2] else starts[k][2])
             for k in order if starts[k][2]]
    return " · ".join([("[micro] " if use_micro else "") + (cfg.experiment.description or cfg.experiment.name),
                       *short])


def provenance_tags(starts):
    """Tags recording each start as resolved: wmtp.<short>.resolved (the URI or absolute path) and wmtp.<short>.run
    (its source run id, where there is one), and wmtp.started_from, the one line `report` shows."""
    tags = {"wmtp.started_from": start_text(starts, files=False)}
    for key, (_, _, resolved, *_) in starts.items():
        if not resolved:
            continue
        tags[f"wmtp.{START_KEYS[key]}.resolved"] = resolved
        if source_run(resolved):
            tags[f"wmtp.{START_KEYS[key]}.run"] = source_run(resolved)
    return tags


class MetricLogger:
    """Metrics go into a queue; a thread sends them with log_batch every `interval` seconds and keeps them, retrying
    with backoff, while the server is slow or away — the training loop never waits on the network.

    Metrics are (key, value, timestamp_ms, step) tuples; `unsent()` goes into each checkpoint, so a process killed
    with metrics still queued loses none: the resumed run sends them (`replay`) before its own."""

    def __init__(self, client, run_id, interval=1.0, logged_through=0):
        self.client, self.run_id, self.interval = client, run_id, interval
        self.logged_through = logged_through  # a resumed run repeats steps up to its checkpoint; logged ones are kept
        self.queue, self.pending, self.stopping = queue.Queue(), [], False
        self.thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def log(self, metrics, step):
        """Queues metrics {name: number} at `step`, stamped now; returns at once (a step the resumed run already
        logged is dropped, see replay)."""
        now = int(time.time() * 1000)
        self.replay([(key, float(value), now, step) for key, value in metrics.items()])

    def replay(self, items):
        """Queues (key, value, timestamp_ms, step) tuples as they are (a checkpoint's unsent ones keep their time),
        except those of a step <= logged_through, which the run already has."""
        for item in items:
            if item[3] > self.logged_through:
                self.queue.put(item)

    def unsent(self):
        """The (key, value, timestamp_ms, step) tuples not yet accepted by the server, oldest first: a checkpoint's."""
        return list(self.pending) + list(self.queue.queue)

    def _loop(self):
        from mlflow.entities import Metric
        failures = 0
        while True:
            time.sleep(self.interval if failures == 0 else min(30.0, 2.0 ** failures))
            while not self.queue.empty():
                self.pending.append(self.queue.get())
            try:
                while self.pending:
                    batch = self.pending[:1000]  # MLflow's per-request limit
                    self.client.log_batch(self.run_id, metrics=[Metric(*m) for m in batch])
                    del self.pending[:len(batch)]
                failures = 0
            except Exception as e:
                failures += 1
                log.warning(f"metric logging failed ({type(e).__name__}); {len(self.pending)} metrics kept, retrying")
            if self.stopping and not self.pending and self.queue.empty():
                return

    def close(self, timeout):
        """Send everything still queued; False when the server stayed away for `timeout` seconds."""
        self.stopping = True
        self.thread.join(timeout)
        return not self.thread.is_alive()


def create_run(client, exp_id, cfg, run_name, extra_tags=None):
    """A new run of the config: its tags (extra_tags: provenance and the note, which mlflow.tags may override; the
    pipeline tag, what `auto` searches by, from experiment.pipeline alone whatever mlflow.tags say; the git commit),
    every param and config.yaml, secrets left out. Returns its id."""
    tags = {"mlflow.note.content": cfg.experiment.description, **(extra_tags or {}),
            **{str(k): str(v) for k, v in redacted(cfg.mlflow.tags).items()}, "pipeline": cfg.experiment.pipeline}
    tags = {k: v for k, v in tags.items() if v}
    run_id = client.create_run(exp_id, run_name=run_name, tags={**tags, **source_tags()}).info.run_id
    log_params(client, run_id, flatten(cfg.to_dict()))
    client.log_text(run_id, yaml.safe_dump(redacted(cfg.to_dict()), sort_keys=False), "config.yaml")
    return run_id


def open_run_log(path):
    """training.log: everything the trainer logs, and the metric lines (logger weighted_mtp.record), which go to
    this file only (the console shows the progress display)."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    record = logging.getLogger("weighted_mtp.record")
    record.propagate, record.level = False, logging.INFO
    record.addHandler(handler)
    return handler


def close_run_log(handler):
    """Closes open_run_log's handler and detaches it from both loggers: training.log is complete after this."""
    handler.close()
    log.removeHandler(handler)
    logging.getLogger("weighted_mtp.record").removeHandler(handler)


def checkpoint_uploader(run_id, mlflow, checkpoint):
    """The one way an uploader of checkpoints into run `run_id` is made (rank 0's Tracking, and each rank that
    uploads its own shards): to the store of mlflow.tracking_uri, with checkpoint.upload_retry_budget_s and
    checkpoint.verify_etag."""
    return s3ckpt.CheckpointUploader(run_id, tracking_uri(mlflow.tracking_uri), verify_etag=checkpoint.verify_etag,
                                     retry_budget_s=checkpoint.upload_retry_budget_s)


class Tracking:
    """Rank 0's MLflow run, from its start (or resumption) to its end status, as one context manager: the experiment
    (created if needed), params, tags and config.yaml, metrics sent off the training thread, MLflow's system
    metrics, the checkpoint uploader and logs/training.log. Leaving it ends the run FINISHED, KILLED (preempted: the
    checkpoint to resume from is tagged first) or FAILED, with the metrics and uploads drained — whatever fails."""

    def __init__(self, cfg, run_name, run_dir_root, steps, resume_run_id=None, unsent_metrics=(), resumed=False,
                 tags=None):
        self.cfg, self.run_name, self.run_dir_root, self.steps, self.tags = cfg, run_name, run_dir_root, steps, tags
        self.run_id, self.unsent_metrics, self.resumed = resume_run_id, list(unsent_metrics), resumed
        self.client = self.metrics = self.uploader = self.system = self.file_log = self.exp_id = None

    def __enter__(self):
        logged_through = 0
        if self.cfg.mlflow.enable_logging:
            logged_through = self._start_run()
        self.run_id = self.run_id or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.run_dir = self.run_dir_root / self.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file_log = open_run_log(self.run_dir / s3ckpt.RUN_LOG)
        if self.client:
            self.metrics = MetricLogger(self.client, self.run_id, logged_through=logged_through)
            self.metrics.replay(self.unsent_metrics)
            self.system = self._start_system_metrics()
            self.uploader = checkpoint_uploader(self.run_id, self.cfg.mlflow, self.cfg.checkpoint)
        return self

    def _start_run(self):
        """A new run (tags, params, config.yaml) or the resumed one continued; returns the last step it logged."""
        from mlflow import MlflowClient
        cfg, uri = self.cfg, tracking_uri(self.cfg.mlflow.tracking_uri)
        self.client = MlflowClient(uri)
        exp_id = self.exp_id = experiment_id(self.client, cfg)
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            for key, value in (self.tags or {}).items():  # the resume's provenance, kept beside the original start
                if key.startswith("wmtp.resume."):
                    self.client.set_tag(self.run_id, key, value)
            history = self.client.get_metric_history(self.run_id, "train/loss")
            return max((m.step for m in history), default=0)
        self.run_id = create_run(self.client, exp_id, cfg, self.run_name, self.tags)
        return -1  # nothing yet: step 0 (the starting model's val/head_k_loss) is sent too

    def _start_system_metrics(self):
        """MLflow's own monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) on a thread."""
        interval = self.cfg.mlflow.system_metrics_interval_s
        if not interval:
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=self.resumed,
                                       tracking_uri=tracking_uri(self.cfg.mlflow.tracking_uri))
        monitor.start()
        return monitor

    def log(self, metrics, step):
        """metrics {name: number} at `step` to the run, off the training thread; nothing without a run (logging off)."""
        if self.metrics:
            self.metrics.log(metrics, step)

    def unsent(self):
        """The metrics the server has not taken yet (MetricLogger.unsent), [] without a run: saved in checkpoints."""
        return self.metrics.unsent() if self.metrics else []

    def __exit__(self, exc_type, exc, tb):
        status, resume_from = log_outcome(exc_type, exc, tb, f"{self.cfg.experiment.pipeline}, run {self.run_id}")
        if self.system:
            self.system.finish()
        self._finish(status, resume_from)

    def _finish(self, status, resume_from):
        """Drain metrics and uploads (bounded: the preemption grace period when preempted), tag what stayed only
        local, end the run."""
        client, run_id = self.client, self.run_id
        timeout = self.cfg.checkpoint.preempt_grace_s if status == "KILLED" else self.cfg.checkpoint.upload_timeout_s
        if client and resume_from:  # first, in case the grace period ends with a SIGKILL
            uri = f"runs:/{run_id}/{s3ckpt.artifact(Path(resume_from).name)}"
            client.set_tag(run_id, "resume_from", f"{uri} ({resume_from})")
            client.set_terminated(run_id, status)
        try:
            local_only = self._drain(timeout)
            if client:
                if local_only:
                    client.set_tag(run_id, "checkpoints_local_only", ", ".join(local_only))
                client.set_tag(run_id, "wmtp.steps", str(self.steps))
        finally:
            if client:
                client.set_terminated(run_id, status)

    def _drain(self, timeout):
        """Metrics sent, checkpoints uploaded, then training.log (closed first) through the same retrying uploader;
        returns the files that stayed only local (pruned ones are not wanted)."""
        if self.metrics and not self.metrics.close(timeout=timeout):
            log.error("some metrics could not be sent to the tracking server")
        uploader, local_only = self.uploader, []
        if uploader:
            log.info(f"waiting up to {timeout}s for checkpoint uploads")
            local_only = [p for p in uploader.wait(timeout) if Path(p).exists()]
            if local_only:
                log.error(f"checkpoints NOT uploaded, only local: {', '.join(local_only)}")
        close_run_log(self.file_log)
        if uploader:
            uploader.upload_to_s3_async(self.run_dir / s3ckpt.RUN_LOG, artifact_path="logs")
            local_only = [p for p in uploader.wait(min(timeout, 60)) if Path(p).exists()]
            uploader.close()
        return local_only


def closing_summary(tracking, steps, seconds, best_val, continued_by):
    """The lines a run ends on: its id, its page and its experiment's runs in the MLflow UI, where the best and final
    checkpoints are (locally and in the run), and the override the next pipeline reads it by: continued_by, the
    pipeline's (config key, checkpoint file, who reads it)."""
    cfg, run_id, run_dir = tracking.cfg, tracking.run_id, tracking.run_dir
    lines = [f"finished {cfg.experiment.pipeline} run {run_id}: {steps} steps in {seconds:.0f}s, "
             f"best val/loss {best_val:.4f}"]
    if tracking.exp_id is not None:
        uri = tracking_uri(cfg.mlflow.tracking_uri)
        lines.append(f"  this run:    {run_url(uri, tracking.exp_id, run_id)}"
                     + ("" if uri.startswith("http") else "   (start the UI with ./run.sh ui)"))
        lines.append(f"  all runs:    {runs_view_url(uri, tracking.exp_id)}")
    for which, name in (("best:", s3ckpt.BEST), ("final:", s3ckpt.FINAL)):
        if (run_dir / name).exists():
            remote = f" and runs:/{run_id}/{s3ckpt.artifact(name)}" if tracking.client else ""
            lines.append(f"  {which:<12} {run_dir / name}{remote}")
    key, name, reader = continued_by
    start = f"runs:/{run_id}/{s3ckpt.artifact(name)}" if tracking.client else run_dir / name
    lines.append(f"  continue:    --override {key}={start}   ({reader}; a stopped run: --resume auto)")
    return "\n".join(lines)


class NoTracking:
    """What ranks other than 0 get: the same interface, doing nothing but reporting how training ended."""
    run_id, uploader, run_dir = None, None, None

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __enter__(self):
        return self

    def log(self, metrics, step):
        """Nothing: only rank 0 sends metrics."""

    def unsent(self):
        """[]: a rank other than 0 holds no metrics for a checkpoint."""
        return []

    def __exit__(self, exc_type, exc, tb):
        log_outcome(exc_type, exc, tb, f"{self.pipeline}, run {self.run_id}")


def log_outcome(exc_type, exc, tb, what):
    """Logs how training ended; returns the run's end status and, when preempted, the checkpoint to resume from."""
    if exc_type is None:
        return "FINISHED", None
    if issubclass(exc_type, Preempted):
        log.warning(f"{exc}")
        return "KILLED", exc.checkpoint
    log.error(f"training failed ({what})", exc_info=(exc_type, exc, tb))
    return "FAILED", None


ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def tracking_checks(cfg, timeout=5.0):
    """Yield (ok, line) for the guide's troubleshooting steps, in order, stopping at the first failure: server
    reachable (/health), credentials accepted by the API (/health answers 200 even to a wrong password),
    experiment visible, S3 artifact root writable (put + delete of a probe object)."""
    import requests
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    experiment, artifact_root = cfg.mlflow.experiment, cfg.mlflow.s3_artifacts
    if uri.startswith("http"):
        try:
            requests.get(f"{uri}/health", timeout=timeout).raise_for_status()
        except requests.RequestException as e:
            yield False, (f"tracking server {uri} unreachable ({type(e).__name__}): is it up? "
                          f"is MLFLOW_TRACKING_URI right?")
            return
        yield True, f"tracking server {uri} reachable"
        auth = (os.environ.get("MLFLOW_TRACKING_USERNAME", ""), os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        try:
            r = requests.get(f"{uri}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment},
                             auth=auth if auth[0] else None, timeout=timeout)
        except requests.RequestException as e:
            yield False, f"tracking server {uri} API unreachable ({type(e).__name__})"
            return
        if r.status_code == 401:
            yield False, (f"tracking server {uri} answered 401 Unauthorized: wrong MLFLOW_TRACKING_USERNAME/PASSWORD "
                          f"(check .env: grep MLFLOW .env)")
            return
        if r.status_code == 403:
            yield False, f"tracking server {uri} answered 403: user '{auth[0]}' may not read experiment '{experiment}'"
            return
        yield True, f"credentials accepted by {uri} (user '{auth[0] or '-'}')"
        if r.status_code == 200:
            artifact_root = r.json()["experiment"]["artifact_location"]
            yield True, f"experiment '{experiment}' visible (artifacts at {artifact_root})"
        else:
            yield True, f"experiment '{experiment}' does not exist yet: the first run creates it"
    else:
        yield True, f"embedded tracking store {uri} (no server to check)"
    if not artifact_root.startswith("s3://"):
        yield True, f"artifact store {artifact_root or 'local'}: not S3, nothing to check"
        return
    bucket, _, prefix = artifact_root[len("s3://"):].partition("/")
    key = f"{prefix.rstrip('/')}/.wmtp-probe-{os.getpid()}-{int(time.time())}".lstrip("/")
    try:
        client = s3ckpt.s3_client(max_attempts=2, connect_timeout=timeout, read_timeout=timeout)
        client.put_object(Bucket=bucket, Key=key, Body=b"probe")
        client.delete_object(Bucket=bucket, Key=key)
    except Exception as e:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__)
        yield False, (f"S3 bucket '{bucket}' not writable at {artifact_root} ({code}): check AWS_ACCESS_KEY_ID/"
                      f"AWS_SECRET_ACCESS_KEY/AWS_DEFAULT_REGION and MLFLOW_S3_ENDPOINT_URL")
        return
    yield True, f"S3 bucket '{bucket}' reachable and writable under {artifact_root}"


def preflight(cfg):
    """The trainer's fail-fast: the same checks as `doctor`, before any run exists or any step is taken."""
    for ok, line in tracking_checks(cfg):
        if not ok:
            raise UserError(line)


def doctor(cfg, env_path):
    """Print one line per check with its fix; exit code 0 only when none FAILs (a WARN does not). Never prints a
    secret's value. Last: who may read .env, and which sandbox isolation evaluation would use."""
    found = Path(env_path).exists()
    set_vars = [v for v in ENV_VARS if os.environ.get(v)]
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    needed = uri.startswith("http") or cfg.mlflow.s3_artifacts.startswith("s3://")
    where = "found" if found else "not found (install -m 600 .env.example .env)"
    lines = [(found or bool(set_vars) or not needed, f"{env_path} {where}; set: {', '.join(set_vars) or 'none'}")]
    lines += list(tracking_checks(cfg))
    if found and Path(env_path).stat().st_mode & 0o077:
        lines.append((None, f"{env_path} is readable by group or others (mode {Path(env_path).stat().st_mode & 0o777:o}"
                            f"): chmod 600 {env_path}"))
    from wmtp import sandbox  # no torch there
    lines.append(sandbox.check(sandbox.Limits.of(cfg.eval).mode))
    for ok, line in lines:
        print(f"{'ok' if ok else 'WARN' if ok is None else 'FAIL':<4} {line}")
    return 0 if all(ok is not False for ok, _ in lines) else 1


class AboveTheBars(logging.StreamHandler):
    """The console's log handler: each line written with tqdm.write, which lifts the progress bars off the terminal,
    writes the line and redraws them, so a log line never lands in the middle of a bar."""

    def emit(self, record):
        """Writes the formatted record through tqdm.write; an error goes to logging's handleError, never raised."""
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


class OnlyWarnings(logging.Filter):
    """A handler filter that passes WARNING and above (quiet_console)."""

    def filter(self, record):
        """True (kept) for a record of level WARNING or above."""
        return record.levelno >= logging.WARNING


def console_logging(verbose):
    """One line per event on the terminal: our log lines above the bars (AboveTheBars); MLflow's own INFO lines and
    artifact download bars off unless --verbose (MLflow reads both variables when it is imported, and its logger is
    set here in case it was already); MLflow's remaining lines through the same handler. Each checkpoint upload's
    INFO line (s3ckpt) goes to training.log only unless --verbose: the closing lines say where the checkpoints are."""
    handler = AboveTheBars(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if not verbose:
        handler.addFilter(lambda r: r.name != "weighted_mtp.s3ckpt" or r.levelno >= logging.WARNING)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
                        handlers=[handler])
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow, when a command imports it at all (not a run with mlflow.enable_logging false: ~2 s of imports saved),
    # leaves its loggers to the ones set here instead of configuring its own
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name in ("mlflow", "alembic", "huey"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [], True
        logger.setLevel(logging.INFO if verbose and name == "mlflow" else logging.WARNING)  # MLflow's own levels


@contextlib.contextmanager
def quiet_console():
    """compare's children: their progress bars and summaries (stdout) and INFO lines (the console) left out, so that
    compare shows one line per run and the table; each run's training.log still gets everything."""
    quiet = OnlyWarnings()
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for handler in logging.getLogger().handlers:
            handler.removeFilter(quiet)


def metric_name(name):
    """MLflow allows no '@' in metric names: eval/pass@1 is logged as eval/pass_at_1."""
    return name.replace("@", "_at_")


class TrainLog:
    """Every log_interval steps (and at a stop or the end): the step's means over ranks, the learning rate and
    tokens/s — shown once on stdout (rank 0's progress bar with loss, lr and tok/s on a terminal, else one line per
    log_interval; validation as one line), every metric written once to training.log and sent to the run."""

    def __init__(self, setup, batches, tracking, start_step):
        from tqdm import tqdm
        self.interval, self.total, self.master = setup.cfg.training.log_interval, setup.total_steps, setup.rank == 0
        self.batches, self.tracking, self.start_step = batches, tracking, start_step
        self.meter, self.t_start, self.t_log = Meter(setup.device), time.time(), time.time()
        self.lines = self.master and not sys.stdout.isatty()  # a log file gets lines, not a bar's redraws
        self.bar = tqdm(total=self.total, initial=start_step, desc=setup.pipeline.name, unit="step", file=sys.stdout,
                        disable=not self.master or self.lines, dynamic_ncols=True)

    def step(self, done, lr, stop):
        """After step `done` (of total) at learning rate lr: the bar moves on; every log_interval steps, at the last
        one or when `stop`, the meter's means, lr and tokens/s are shown, recorded and sent. A collective (all_reduce):
        every rank calls it at every step."""
        self.bar.update(1)
        if done % self.interval and done != self.total and not stop:
            return
        stats = self.meter.reduce()
        stats["train/learning_rate"] = lr
        elapsed, self.t_log = time.time() - self.t_log, time.time()
        stats["train/tokens_per_sec"] = all_reduce(self.batches.tokens_seen.clone()).item() / max(elapsed, 1e-9)
        self.batches.tokens_seen.zero_()
        if self.master:
            progress = (f"loss {stats.get('train/loss', math.nan):.4f} | lr {lr:.2e} | "
                        f"{stats['train/tokens_per_sec']:,.0f} tok/s")
            self.bar.set_postfix_str(progress)
            if self.lines:
                eta = (time.time() - self.t_start) / (done - self.start_step) * (self.total - done)
                print(f"step {done}/{self.total} | {progress} | ETA {eta:.0f}s", flush=True)
            RECORD.info(f"step {done}/{self.total}: " + " ".join(f"{k}={v:.5g}" for k, v in sorted(stats.items())))
        self.tracking.log(stats, done)

    def validation(self, done, val):
        """The validation metrics {name: number} after step `done`: one line on stdout and training.log (rank 0),
        sent to the run."""
        if self.master:
            line = f"step {done}: " + " ".join(f"{k}={v:.5g}" for k, v in sorted(val.items()))
            self.bar.write(line, file=sys.stdout)
            RECORD.info(line)
        self.tracking.log(val, done)

    def close(self):
        """Closes the progress bar (the closing summary follows on a clean line)."""
        self.bar.close()
