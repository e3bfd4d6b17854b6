"""
MLflow, rank 0 only: the experiment (created and marked as model development), the run (created or resumed),
params, metrics sent off the training thread, system metrics, artifacts and uploads, the run's end status;
newest_run() behind every `auto`; preflight and doctor checks of the credentials and stores.
"""
import logging
import os
from pathlib import Path
import queue
import re
import signal
import threading
import time

import s3ckpt
import yaml

from config import flatten, redacted, tracking_uri, UserError
log = logging.getLogger("weighted_mtp")


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


def runs_view_url(uri, exp_id, port=None):
    """The experiment's training-runs view in the MLflow UI: the tracking server itself, or `./run.sh ui` on this
    machine for a sqlite store. `workflowType=machine_learning` because MLflow 3.17's workflow toggle lives in the
    browser's localStorage, defaults to GenAI and ignores the experiment's kind (MLflow issue 24498)."""
    base = uri.rstrip("/") if uri.startswith("http") else f"http://127.0.0.1:{port or os.environ.get('PORT', 5000)}"
    return f"{base}/#/experiments/{exp_id}/runs?workflowType=machine_learning"


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


def finished(pipeline):
    return f"tags.pipeline = '{pipeline}' and attributes.status = 'FINISHED'"


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
        now = int(time.time() * 1000)
        self.replay([(key, float(value), now, step) for key, value in metrics.items()])

    def replay(self, items):
        for item in items:
            if item[3] > self.logged_through:
                self.queue.put(item)

    def unsent(self):
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


def create_run(client, exp_id, cfg, run_name):
    """A new run of the config: its tags (the pipeline tag, what `auto` searches by, from experiment.pipeline alone
    whatever mlflow.tags say; the git commit), every param and config.yaml, secrets left out. Returns its id."""
    tags = {**{str(k): str(v) for k, v in redacted(cfg.mlflow.tags).items()}, "pipeline": cfg.experiment.pipeline}
    if cfg.experiment.description:
        tags["mlflow.note.content"] = cfg.experiment.description
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
    handler.close()
    log.removeHandler(handler)
    logging.getLogger("weighted_mtp.record").removeHandler(handler)


class Tracking:
    """Rank 0's MLflow run, from its start (or resumption) to its end status, as one context manager: the experiment
    (created if needed), params, tags and config.yaml, metrics sent off the training thread, MLflow's system
    metrics, the checkpoint uploader and logs/training.log. Leaving it ends the run FINISHED, KILLED (preempted: the
    checkpoint to resume from is tagged first) or FAILED, with the metrics and uploads drained — whatever fails."""

    def __init__(self, cfg, run_name, run_dir_root, steps, resume_run_id=None, unsent_metrics=(), resumed=False):
        self.cfg, self.run_name, self.run_dir_root, self.steps = cfg, run_name, run_dir_root, steps
        self.run_id, self.unsent_metrics, self.resumed = resume_run_id, list(unsent_metrics), resumed
        self.client = self.metrics = self.uploader = self.system = self.file_log = self.exp_id = None

    def __enter__(self):
        logged_through = 0
        if self.cfg.mlflow.enable_logging:
            logged_through = self._start_run()
        self.run_id = self.run_id or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.run_dir = self.run_dir_root / self.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file_log = open_run_log(self.run_dir / "training.log")
        if self.client:
            self.metrics = MetricLogger(self.client, self.run_id, logged_through=logged_through)
            self.metrics.replay(self.unsent_metrics)
            self.system = self._start_system_metrics()
            c = self.cfg.checkpoint
            self.uploader = s3ckpt.CheckpointUploader(self.run_id, tracking_uri(self.cfg.mlflow.tracking_uri),
                                                      retry_budget_s=c.upload_retry_budget_s,
                                                      verify_etag=c.verify_etag)
        return self

    def _start_run(self):
        """A new run (tags, params, config.yaml) or the resumed one continued; returns the last step it logged."""
        from mlflow import MlflowClient
        cfg, uri = self.cfg, tracking_uri(self.cfg.mlflow.tracking_uri)
        self.client = MlflowClient(uri)
        exp_id = self.exp_id = experiment_id(self.client, cfg)
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "train/loss")
            return max((m.step for m in history), default=0)
        self.run_id = create_run(self.client, exp_id, cfg, self.run_name)
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
        if self.metrics:
            self.metrics.log(metrics, step)

    def unsent(self):
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
            uri = f"runs:/{run_id}/checkpoints/{Path(resume_from).name}"
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
            uploader.upload_to_s3_async(self.run_dir / "training.log", artifact_path="logs")
            local_only = [p for p in uploader.wait(min(timeout, 60)) if Path(p).exists()]
            uploader.close()
        return local_only


def closing_summary(tracking, steps, seconds, best_val):
    """The lines a run ends on: its id, the UI's runs view, where the best and final checkpoints are (locally and in
    the run), how to start from it or resume it."""
    cfg, run_id, run_dir = tracking.cfg, tracking.run_id, tracking.run_dir
    lines = [f"finished {cfg.experiment.pipeline} run {run_id}: {steps} steps in {seconds:.0f}s, "
             f"best val/loss {best_val:.4f}"]
    if tracking.exp_id is not None:
        uri = tracking_uri(cfg.mlflow.tracking_uri)
        lines.append(f"  MLflow UI:   {runs_view_url(uri, tracking.exp_id)}"
                     + ("" if uri.startswith("http") else "   (start it with ./run.sh ui)"))
    for name in ("checkpoint_best.pt", "checkpoint_final.pt"):
        if (run_dir / name).exists():
            remote = f" and runs:/{run_id}/checkpoints/{name}" if tracking.client else ""
            lines.append(f"  {name.split('_')[1][:-3] + ':':<12} {run_dir / name}{remote}")
    final = f"runs:/{run_id}/checkpoints/checkpoint_final.pt" if tracking.client else run_dir / "checkpoint_final.pt"
    lines.append(f"  continue:    --override model.init_from={final}   (a stopped run: --resume auto)")
    return "\n".join(lines)


class NoTracking:
    """What ranks other than 0 get: the same interface, doing nothing but reporting how training ended."""
    run_id, uploader, run_dir = None, None, None

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __enter__(self):
        return self

    def log(self, metrics, step):
        pass

    def unsent(self):
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
    lines.append(sandbox_check())
    for ok, line in lines:
        print(f"{'ok' if ok else 'WARN' if ok is None else 'FAIL':<4} {line}")
    return 0 if all(ok is not False for ok, _ in lines) else 1


def sandbox_check():
    """(True: bwrap | None: a fallback, a warning | False: none works, line) for doctor."""
    import sandbox  # no torch there
    try:
        iso = sandbox.isolation()
    except sandbox.SandboxUnavailable as e:
        return False, f"sandbox: {e}"
    return (True if iso.mode == "bwrap" else None), f"sandbox: {sandbox.describe(iso)}"


class Preempted(Exception):
    """A SIGTERM/SIGINT stopped training at a step boundary after a resumable checkpoint was written."""

    def __init__(self, signum, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume from {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


def metric_name(name):
    """MLflow allows no '@' in metric names: eval/pass@1 is logged as eval/pass_at_1."""
    return name.replace("@", "_at_")
