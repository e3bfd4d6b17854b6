"""`./run.sh server` for real: MLflow with basic auth on PostgreSQL, artifacts in S3 (moto), as the guide describes.

One stack for the whole file (tracking_stack here, not stack.py's): the tests use it, then the last one stops it with
SIGTERM and checks that nothing of it is left. The stop a user makes with Ctrl-C (SIGINT) is stack.py's fixture's
teardown, asserted where it serves test_tracking_stack_training.py.
"""
from __future__ import annotations

import contextlib
import os
import signal
import uuid

import boto3
import mlflow
import pytest
import requests
from mlflow.tracking import MlflowClient

import stack
from stack import running_stack

EXPERIMENT = "weighted-mtp/production"


@pytest.fixture(scope="module")
def tracking_stack():
    """stack.py's .env values, pids, dirs and ports, plus "stop": stops the stack with SIGTERM (running_stack's exit
    and its assertions), at the latest when the module ends (a second stop does nothing). A stack costs ~15 s of
    CPU to start: the SIGTERM test stops this one instead of starting its own."""
    with contextlib.ExitStack() as stop:
        info = stop.enter_context(running_stack(stop_signal=signal.SIGTERM))
        info["stop"] = stop.close
        yield info


@pytest.fixture
def client_env(tracking_stack, monkeypatch):
    """The printed .env lines as the process environment, and the fluent API pointed at the stack."""
    for key in stack.ENV_KEYS:
        monkeypatch.setenv(key, tracking_stack[key])
    import mlflow.tracking._tracking_service.utils as tracking_utils
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)  # restored afterwards
    mlflow.set_tracking_uri(tracking_stack["MLFLOW_TRACKING_URI"])
    return tracking_stack


def experiment_id(client: MlflowClient) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return exp.experiment_id if exp else client.create_experiment(EXPERIMENT)


def test_env_block_is_complete(tracking_stack):
    assert tracking_stack["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{tracking_stack['ports']['mlflow']}"
    assert tracking_stack["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{tracking_stack['ports']['s3']}"
    assert tracking_stack["MLFLOW_TRACKING_USERNAME"] == "wmtp_admin"
    assert len(tracking_stack["MLFLOW_TRACKING_PASSWORD"]) >= 12
    assert tracking_stack["AWS_ACCESS_KEY_ID"] and tracking_stack["AWS_SECRET_ACCESS_KEY"]
    assert tracking_stack["AWS_DEFAULT_REGION"] == "us-east-1"
    assert sorted(tracking_stack["pids"]) == ["mlflow", "postgres", "s3"]
    assert all(stack.process_alive(p) for p in tracking_stack["pids"].values())


def test_params_metrics_roundtrip_with_printed_credentials(client_env):
    client = MlflowClient()
    exp_id = experiment_id(client)
    assert client.get_experiment(exp_id).name == EXPERIMENT
    run = client.create_run(exp_id, run_name="stack-roundtrip")
    client.log_param(run.info.run_id, "training.learning_rate", "1e-05")
    client.log_metric(run.info.run_id, "train/loss", 1.25, step=3)
    client.set_terminated(run.info.run_id)
    got = client.get_run(run.info.run_id)
    assert got.data.params == {"training.learning_rate": "1e-05"}
    assert got.data.metrics == {"train/loss": 1.25}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(3, 1.25)]
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "stack-roundtrip"
    assert got.info.artifact_uri.startswith("s3://wmtp/mlflow-artifacts/")
    assert got.info.artifact_uri == f"s3://wmtp/mlflow-artifacts/{exp_id}/{run.info.run_id}/artifacts"


def test_log_artifact_lands_in_the_bucket(client_env, tmp_path):
    payload = f"checkpoint bytes {uuid.uuid4()}\n".encode()
    path = tmp_path / "probe.txt"
    path.write_bytes(payload)
    exp_id = experiment_id(MlflowClient())
    with mlflow.start_run(experiment_id=exp_id, run_name="stack-artifact") as run:
        mlflow.log_artifact(str(path))
        mlflow.log_artifact(str(path), artifact_path="checkpoints")
    s3 = boto3.client("s3", endpoint_url=client_env["MLFLOW_S3_ENDPOINT_URL"],
                      aws_access_key_id=client_env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=client_env["AWS_SECRET_ACCESS_KEY"],
                      region_name=client_env["AWS_DEFAULT_REGION"])
    prefix = f"mlflow-artifacts/{exp_id}/{run.info.run_id}/artifacts"
    assert s3.get_object(Bucket="wmtp", Key=f"{prefix}/probe.txt")["Body"].read() == payload
    assert s3.get_object(Bucket="wmtp", Key=f"{prefix}/checkpoints/probe.txt")["Body"].read() == payload
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="wmtp", Prefix=prefix)["Contents"])
    assert listed == [f"{prefix}/checkpoints/probe.txt", f"{prefix}/probe.txt"]
    # and MLflow lists them through the same store
    assert sorted(a.path for a in MlflowClient().list_artifacts(run.info.run_id)) == ["checkpoints", "probe.txt"]


def test_wrong_password_is_401_while_health_is_200(tracking_stack):
    uri = tracking_stack["MLFLOW_TRACKING_URI"]
    api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    user = tracking_stack["MLFLOW_TRACKING_USERNAME"]
    assert requests.get(f"{uri}/health", timeout=10).status_code == 200
    assert requests.get(api, auth=(user, "wrong-password-123"), timeout=10).status_code == 401
    assert requests.get(api, auth=("nobody", tracking_stack["MLFLOW_TRACKING_PASSWORD"]), timeout=10).status_code == 401
    assert requests.get(api, timeout=10).status_code == 401
    ok = requests.get(api, auth=(user, tracking_stack["MLFLOW_TRACKING_PASSWORD"]), timeout=10)
    assert ok.status_code == 200, ok.text


def test_wrong_password_fails_in_the_client(tracking_stack, monkeypatch):
    for key in stack.ENV_KEYS:
        monkeypatch.setenv(key, tracking_stack[key])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception, match="401|Unauthorized|credentials"):
        MlflowClient(tracking_uri=tracking_stack["MLFLOW_TRACKING_URI"]).search_experiments(max_results=1)


def test_sigterm_stops_every_process_and_removes_dirs(tracking_stack):
    """The file's stack, after the tests above used it, stopped with SIGTERM: run.sh's trap stops all it started,
    within 20 s. The file's last test: it ends the stack."""
    info = tracking_stack
    tree = stack.process_tree(info["pids"].values())
    assert len(tree) >= 4  # postgres + its backends/workers, moto, mlflow + its uvicorn worker
    ports = dict(info["ports"])
    assert all(stack.port_open(p) for p in ports.values())
    dirs = list(info["dirs"])
    info["stop"]()
    # running_stack already asserted this on exit; check it here on its own terms as well
    assert info["stopped_in_s"] < stack.STOP_TIMEOUT_S
    assert [p for p in tree if stack.process_alive(p)] == []
    assert [name for name, p in ports.items() if stack.port_open(p)] == []
    assert dirs and not any(os.path.exists(d) for d in dirs)
