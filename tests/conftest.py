"""Shared helpers: a tiny micro-model config and an embedded MLflow store per test (never the repo's mlflow.db)."""
import contextlib
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The value head on the policy (critic.model policy, as the production configs): the local configs' separate value
# model is tested in test_value_model.py.
POLICY_CRITIC = ["critic.model=policy", "critic.head=linear", "critic.features=hidden"]
# Small enough that a pipeline runs in seconds, big enough that every code path is exercised (H=3 heads, GQA).
TINY = ["model.micro.dim=32", "model.micro.n_trunk_layers=1", "model.micro.n_heads=2", "model.micro.n_kv_heads=1",
        "model.n_future_tokens=3", "data_sampling.n_samples=64", "data_sampling.val_samples=8",
        "training.batch_size=4", "training.max_steps=4", "training.log_interval=2", "training.eval_interval=2",
        "training.warmup_steps=1", "checkpoint.save_every=2", *POLICY_CRITIC]


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """An embedded sqlite MLflow store in tmp_path, set as MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def workers_said(stderr, limit=4000):
    """What torchrun's workers wrote to stderr, without the launcher's own report (its SIGTERM notices and the
    ChildFailedError block fill the tail and hide the failing rank's error): for a failed run's assertion."""
    ours = [line for line in stderr.splitlines() if "torch/distributed/" not in line and "elastic" not in line]
    return "\n".join(ours)[-limit:]


def tiny_config(pipeline, tmp_path, *overrides):
    from config import load_config
    return load_config(ROOT / "configs" / pipeline / f"{pipeline}_local.yaml",
                       [*TINY, f"checkpoint.dir={tmp_path}/ckpt", *overrides])


def load_meta_weights(model, model_dir):
    """A Meta dir's consolidated.pth loaded strictly into `model` (the trainer reads Meta dirs through
    pretrained.read_meta_dir; the tests check the strict load itself)."""
    from pretrained import load_state, read_consolidated
    path, state = read_consolidated(model_dir)
    load_state(model, state, f"{path} (vs params.json)")


def train_keeping_setup(cfg, use_micro=False):
    """(train's result, the Setup it trained): prepare() caught on its way into train(), so that a test can look
    at the live model and pipeline, which train() itself does not hand out."""
    import weighted_mtp as wm
    caught, prepare = [], wm.prepare
    wm.prepare = lambda *args, **kwargs: caught.append(prepare(*args, **kwargs)) or caught[-1]
    try:
        return wm.train(cfg, use_micro=use_micro), caught[-1]
    finally:
        wm.prepare = prepare


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op threads set to n for a while: tiny matmuls on a busy 2-core machine only wait for a core
    with a second thread (OpenMP spins), and one thread is deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
