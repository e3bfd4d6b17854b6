"""What a new user hits first (issue 23): settings that would be ignored, the record of a run (every key, no secret,
the commit), `report`, the UI's URL, the closing summary, start-up time, checkpoints stored once, export, data."""
import os
import subprocess
import sys

import pytest
import yaml
from mlflow import MlflowClient

import weighted_mtp as wm
from config import DEFAULTS, UserError, dotted_keys, flatten, is_secret
from conftest import ROOT, tiny_config

SECRET = "s3cr3t-value-that-cannot-occur-by-chance"


def run_module(*args, cwd=ROOT, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "weighted_mtp", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_the_micro_model_refuses_a_model_path_it_would_ignore(tmp_path):
    r = run_module("train", "--config", "configs/baseline/baseline_local.yaml", "--use-micro-model",
                   "--override", "model.path=/nope/7B", "--dry-run")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: model.path=/nope/7B would be ignored: --use-micro-model (./run.sh --local) trains the micro model; "
        "drop --local/--use-micro-model to train that model, or drop the setting"]
    with pytest.raises(UserError, match=r"^model.tokenizer=t.model would be ignored"):
        wm.train(tiny_config("baseline", tmp_path, "model.tokenizer=t.model"), use_micro=True)


def test_secrets_are_known_by_name_not_by_substring():
    for key in ("n_future_tokens", "tokenizer", "max_new_tokens", "tokens_per_sec", "secretary_count"):
        assert not is_secret(key), key
    for key in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "aws_session_token", "db_password", "api_key",
                "hf_token", "password"):
        assert is_secret(key), key
    flat = flatten({"mlflow": {"tracking_uri": "https://alice:pw@mlflow.example:443/x"}})
    assert flat == {"mlflow.tracking_uri": "https://mlflow.example:443/x"}


def test_every_key_is_recorded_no_secret_anywhere_and_the_commit_is_tagged(tracking, tmp_path, monkeypatch):
    for var in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(var, SECRET)
    cfg = tiny_config("baseline", tmp_path, f"mlflow.tags={{team: wmtp, api_token: {SECRET}}}")
    run_id = wm.train(cfg, use_micro=True)["run_id"]
    client = MlflowClient(tracking)
    run = client.get_run(run_id)
    expected = {k for k in dotted_keys(DEFAULTS) if k != "mlflow.tags"}   # tags: one param per tag
    assert expected <= set(run.data.params)
    for key in ("model.n_future_tokens", "model.tokenizer", "eval.max_new_tokens"):
        assert key in run.data.params, key
    assert run.data.params["model.n_future_tokens"] == "3"   # TINY's head count, as it ran
    assert run.data.params["mlflow.tags.team"] == "wmtp" and "mlflow.tags.api_token" not in run.data.params
    with open(client.download_artifacts(run_id, "config.yaml", str(tmp_path))) as f:
        config_yaml = yaml.safe_load(f)
    assert {k for k in dotted_keys(config_yaml) if not k.startswith("mlflow.tags")} == {
        k for k in dotted_keys(DEFAULTS) if k != "mlflow.tags"}
    assert config_yaml["model"]["n_future_tokens"] == 3 and config_yaml["mlflow"]["tags"]["team"] == "wmtp"
    recorded = [*map(str, run.data.params.values()), *map(str, run.data.tags.values())]
    assert not any(SECRET in text for text in recorded)
    for path in tmp_path.rglob("*"):   # config.yaml, training.log, checkpoints' sidecars: nowhere on disk but the db
        if path.is_file() and path.suffix in (".yaml", ".log", ".json", ".txt"):
            assert SECRET not in path.read_text(errors="replace"), path
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert run.data.tags["mlflow.source.git.commit"] == commit.strip() and len(commit.strip()) == 40
