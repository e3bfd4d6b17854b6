"""Never lose a run: SIGTERM (spot reclaim), elastic restarts, a crashing rank, NaN losses.

Real processes only: `torchrun` (gloo, CPU, 2 workers) or `python -m weighted_mtp`, and a sqlite MLflow store in a
tmp dir. two_nodes (two torchrun agents as two nodes, each in a directory of its own) serves test_fsdp_nodes.py, whose
two-node job, started from a first run's checkpoint, also checks that each node fetches that checkpoint from S3.

A SIGTERM to torchrun's agent, then --resume auto on an empty disk from S3 to the weights of an uninterrupted run,
is told once for both parallel modes: in test_fsdp.py (FSDP, full format: the file DDP writes). Here DDP's SIGTERM
reaching every process, and its restarts and crashes.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from conftest import ROOT, TINY, new_store

EXPERIMENT = "weighted-mtp/production"
BASELINE = str(ROOT / "configs" / "baseline" / "baseline_local.yaml")
FAULTY = (str(Path(__file__).resolve().parent / "faults.py"),)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def two_nodes(cwd, env, args, nproc_per_node=1, timeout=180):
    """Two torchrun agents that rendezvous (c10d) as two nodes of this machine, each in a directory of its own
    (cwd/node_a, cwd/node_b: a relative checkpoint.dir is its own disk), running `args` -> [(exit code, stderr)].
    stderr goes to a file: a full pipe would stall its node, and with it the other node's collectives."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--nproc_per_node={nproc_per_node}",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes"]
    nodes = []
    for name in ("node_a", "node_b"):
        (cwd / name).mkdir(exist_ok=True)
        with open(cwd / f"{name}.stderr", "w") as err:
            nodes.append(subprocess.Popen(launcher + list(args), cwd=cwd / name, env=env, stdout=subprocess.DEVNULL,
                                          stderr=err))
    try:
        return [(node.wait(timeout), (cwd / f"{name}.stderr").read_text())
                for node, name in zip(nodes, ("node_a", "node_b"))]
    finally:
        for node in nodes:
            node.kill()


def train_args(ckpt_dir, *overrides, resume=None, trainer=("-m", "weighted_mtp")):
    """`trainer` FAULTY: the trainer with WMTP_TEST_FAULT's crash injected (tests/faults.py)."""
    args = [*trainer, "train", "--config", BASELINE, "--use-micro-model"]
    for o in [*TINY, f"checkpoint.dir={ckpt_dir}", *overrides]:
        args += ["--override", o]
    return args + (["--resume", resume] if resume else [])


def environment(tracking_uri, **extra):
    """The subprocess env: one thread per process, the tmp MLflow store, the repo importable from a tmp CWD (so
    nothing is ever written into the repo), and no ambient AWS profile."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL",
                        "WMTP_TEST_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RESTART_COUNT")}
    env.update(OMP_NUM_THREADS="1", MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(ROOT),
               GLOO_SOCKET_IFNAME="lo", PYTHONFAULTHANDLER="1", **extra)  # a fatal signal prints the Python stacks
    return env


def store(empty_store, directory):
    """A copy of the session's migrated store (conftest's empty_store) in `directory`: its URI."""
    return new_store(empty_store, directory)


def runs_of(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def steps(client, run_id, key="train/loss"):
    return [m.step for m in client.get_metric_history(run_id, key)]


def artifact_files(client, run_id, path=""):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += artifact_files(client, run_id, f.path) if f.is_dir else [f.path]
    return sorted(out)


def wait_until(predicate, timeout, proc=None, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended ({proc.returncode}) before {what}:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(ckpt_dir):
    """Steps rank 0 has logged so far, from the run's local training.log."""
    logs = list(Path(ckpt_dir).glob("baseline-mtp/*/training.log"))
    return logs[0].read_text().count(" train/loss=") if logs else 0


# -----------------------------------------------------------------------------
# SIGTERM mid-run

# 150 steps of ~30 ms: the signal lands well inside training. save_every=0 and eval_interval=0 so that the only step
# checkpoint is the one the preemption writes.
PREEMPT = ["training.max_steps=150", "training.log_interval=1", "training.eval_interval=0", "checkpoint.save_every=0"]


# -----------------------------------------------------------------------------
# elastic restart, crash without restart, NaN


def test_max_restarts_resumes_from_the_newest_checkpoint_into_the_same_run(tmp_path, empty_store):
    uri = store(empty_store, tmp_path)
    r = subprocess.run(
        [*TORCHRUN, "--max_restarts=1",
         *train_args(tmp_path / "ckpt", "training.max_steps=10", "checkpoint.save_every=2", "checkpoint.resume=auto",
                     trainer=FAULTY)],
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: without it torchrun's restarted gloo workers read the previous
        # attempt's addresses from the shared rendezvous store and hang or fail in connectFullMesh (pytorch#135712;
        # reproduced here with a 15-line torch-only script) — run.sh must export it for --max_restarts to work
        cwd=tmp_path, env=environment(uri, WMTP_TEST_FAULT="1:6", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),
        capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("RuntimeError: WMTP_TEST_FAULT: rank 1 fails once at step 6\n") >= 1  # it did fail
    client, runs = runs_of(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["wmtp.steps"] == "10"
    assert steps(client, run.info.run_id) == [2, 4, 6, 8, 10]
    assert steps(client, run.info.run_id, "val/loss") == [2, 4, 6, 8, 10]
    # rank 1 died before step 6's logging collective, so the newest checkpoint is step 4's
    log_text = Path(client.download_artifacts(run.info.run_id, "logs/training.log", str(tmp_path))).read_text()
    run_dir = tmp_path / "ckpt" / "baseline-mtp" / run.info.run_id
    assert f", resumed at step 4 from {run_dir / 'checkpoint_step_4.pt'}" in log_text
    assert "done: 10 steps" in log_text


def test_a_crash_on_one_rank_fails_the_run_promptly_with_its_traceback_and_checkpoint(tmp_path, empty_store):
    uri = store(empty_store, tmp_path)
    t0 = time.monotonic()
    r = subprocess.run(TORCHRUN + train_args(tmp_path / "ckpt", "training.max_steps=10", "checkpoint.save_every=2",
                                             trainer=FAULTY),
                       cwd=tmp_path, env=environment(uri, WMTP_TEST_FAULT="1:4"), capture_output=True, text=True,
                       timeout=120)  # no hang: rank 0 must not wait out collective_timeout_s (1800 s)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stderr[-3000:]
    assert elapsed < 60, elapsed
    assert "RuntimeError: WMTP_TEST_FAULT: rank 1 fails once at step 4\n" in r.stderr
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\n\s*exitcode\s*: 1 \(pid", r.stderr)  # its traceback, exit 1
    client, runs = runs_of(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    # the newest checkpoint (step 2: rank 1 died before step 4's checkpoint) is in the run's artifacts
    assert artifact_files(client, run.info.run_id) == [
        "checkpoints/checkpoint_best.pt", "checkpoints/checkpoint_best.pt.sha256",
        "checkpoints/checkpoint_step_2.pt", "checkpoints/checkpoint_step_2.pt.sha256",
        "config.yaml", "logs/training.log"]
    local = tmp_path / "ckpt" / "baseline-mtp" / run.info.run_id / "checkpoint_step_2.pt"
    remote = client.download_artifacts(run.info.run_id, "checkpoints/checkpoint_step_2.pt", str(tmp_path / "dl"))
    assert Path(remote).read_bytes() == local.read_bytes()
    log_text = Path(client.download_artifacts(run.info.run_id, "logs/training.log", str(tmp_path))).read_text()
    assert f"ERROR training failed (baseline, run {run.info.run_id})\nTraceback (most recent call last):" in log_text
    # rank 0's own traceback: its collective saw rank 1 go (gloo says closed or reset, as the socket's timing has it)
    assert re.search(r"Connection (closed|reset) by peer", log_text)


def test_a_finished_worker_exits_with_its_code_and_flushed_output_skipping_finalisation(tmp_path):
    """Gloo's threads can abort a DDP worker during Python's finalisation, so torchrun workers leave through
    exit_worker: the exit code and every buffered line survive, finalisation (here an atexit print) never runs."""
    script = ("import atexit, logging, weighted_mtp as wm\n"
              f"logging.basicConfig(filename={str(tmp_path / 'worker.log')!r}, level=logging.INFO)\n"
              "atexit.register(lambda: print('finalised'))\n"
              "logging.getLogger('x').info('last line')\n"
              "print('buffered', end='')\n"
              "wm.exit_worker(3)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (3, "buffered"), r.stderr
    assert (tmp_path / "worker.log").read_text() == "INFO:x:last line\n"


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, empty_store):
    uri = store(empty_store, tmp_path)
    r = subprocess.run([sys.executable, *train_args(tmp_path / "ckpt", "training.learning_rate=1e30",
                                                   "training.max_skipped_steps=3", "training.max_steps=20",
                                                   "training.warmup_steps=0", "training.log_interval=1")],
                       cwd=tmp_path, env=environment(uri), capture_output=True, text=True, timeout=120)
    message = "3 non-finite steps in a row (training.max_skipped_steps): lower training.learning_rate or check the data"
    assert r.returncode == 1 and f"RuntimeError: {message}\n" in r.stderr, r.stderr[-3000:]
    client, runs = runs_of(uri)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FAILED"
    log_text = Path(client.download_artifacts(run.info.run_id, "logs/training.log", str(tmp_path))).read_text()
    assert f"RuntimeError: {message}\n" in log_text and "Traceback" in log_text
    # step 1 is finite (its update is what blows the weights up); steps 2, 3, 4 are skipped
    for k in (1, 2, 3):
        assert f"step {k + 1}: non-finite loss or gradient, step skipped ({k} in a row)" in log_text
    skipped = client.get_metric_history(run.info.run_id, "train/skipped_steps")
    assert [(m.step, m.value) for m in skipped] == [(2, 1.0), (3, 2.0), (4, 3.0)]


def worker_pids(agent_pid):
    return [int(p) for p in Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()]


def test_sigterm_to_every_process_still_checkpoints_and_ends_killed(tmp_path, empty_store):
    uri, ckpt = store(empty_store, tmp_path), tmp_path / "ckpt"
    proc = subprocess.Popen(TORCHRUN + train_args(ckpt, *PREEMPT), cwd=tmp_path, env=environment(uri),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: logged_steps(ckpt) >= 3, 90, proc, "training to log 3 steps")
        workers = worker_pids(proc.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        # the agent's copy arrives a moment later, as it does whenever the workers see theirs first
        wait_until(lambda: "SIGTERM received" in next(ckpt.glob("baseline-mtp/*/training.log")).read_text(), 30)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode != 0
    client, runs = runs_of(uri)
    assert len(runs) == 1
    local = sorted(ckpt.glob("baseline-mtp/*/checkpoint_step_*.pt"))
    assert len(local) == 1, err[-3000:]
    run = runs[0]
    assert run.info.status == "KILLED", err[-3000:]
    assert run.data.tags["resume_from"] == f"runs:/{run.info.run_id}/checkpoints/{local[0].name} ({local[0]})"
    assert artifact_files(client, run.info.run_id) == sorted([
        f"checkpoints/{local[0].name}", f"checkpoints/{local[0].name}.sha256", "config.yaml", "logs/training.log"])
