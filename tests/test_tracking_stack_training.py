"""The trainer against the guide's stack for real: MLflow server (PostgreSQL, Basic Auth) + S3, via
`./run.sh server`."""
import os
import signal
import subprocess
import sys
import time
import uuid

import boto3
import pytest
from mlflow import MlflowClient

from wmtp.config import flatten, load_config

import stack
from conftest import ROOT, TINY
from stack import tracking_stack  # noqa: F401  (fixture)
from test_pipelines import EXPECTED

LOCAL = ROOT / "configs" / "verifiable" / "verifiable_local.yaml"


@pytest.fixture
def stack_env(tracking_stack, monkeypatch):
    """The client's environment from the printed .env lines (for the trainer and this test's own MlflowClient),
    with an AWS secret that cannot occur by chance."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update({k: tracking_stack[k] for k in stack.ENV_KEYS})
    env["AWS_SECRET_ACCESS_KEY"] = f"secret-{uuid.uuid4().hex}"   # moto accepts any key pair
    env["OMP_NUM_THREADS"] = "1"
    for key in stack.ENV_KEYS:
        monkeypatch.setenv(key, env[key])
    return env


def trainer(env, tmp_path, *overrides, nproc=1, timeout=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] \
        if nproc > 1 else [sys.executable, "-m"]
    args = [f"--override={o}" for o in [*TINY, f"checkpoint.dir={tmp_path}/ckpt", "critic.checkpoint=",
                                         "mlflow.system_metrics_interval_s=0", *overrides]]
    return subprocess.run([*launcher, "weighted_mtp", "train", "--config", str(LOCAL), "--use-micro-model", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def s3_keys(env, prefix):
    s3 = boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])
    listing = s3.list_objects_v2(Bucket="wmtp", Prefix=prefix).get("Contents", [])
    return s3, sorted(o["Key"][len(prefix):] for o in listing)


def test_two_process_verifiable_run_lands_whole_and_leaks_no_secret(stack_env, tmp_path):
    r = trainer(stack_env, tmp_path, "mlflow.tags={team: wmtp}", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("weighted-mtp/production")
    runs = client.search_runs([exp.experiment_id])
    assert [run.info.run_name for run in runs] == ["verifiable-wmtp"]   # one run, whatever the world size
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["team"] == "wmtp"
    assert sorted(k for k in run.data.metrics if not k.startswith("system/")) == sorted(EXPECTED["verifiable"])
    params = run.data.params
    assert params["training.learning_rate"] == "0.001" and params["experiment.name"] == "verifiable-local"
    assert params["data_sampling.n_samples"] == "64" and params["training.k_percent"] == "0.6"
    merged = load_config(LOCAL, [*TINY, f"checkpoint.dir={tmp_path}/ckpt", "critic.checkpoint=",
                                    "mlflow.system_metrics_interval_s=0", "mlflow.tags={team: wmtp}"])
    assert params == {k: str(v) for k, v in flatten(merged.to_dict()).items()}   # every key of the merged config
    # artifacts straight in the bucket at the run's own prefix
    prefix = f"mlflow-artifacts/{exp.experiment_id}/{run.info.run_id}/artifacts/"
    assert run.info.artifact_uri == f"s3://wmtp/{prefix[:-1]}"
    s3, keys = s3_keys(stack_env, prefix)
    assert keys == ["checkpoints/checkpoint_best.pt", "checkpoints/checkpoint_best.pt.sha256",
                    "checkpoints/checkpoint_final.pt", "checkpoints/checkpoint_final.pt.sha256",
                    "checkpoints/checkpoint_step_2.pt", "checkpoints/checkpoint_step_2.pt.sha256",
                    "config.yaml", "logs/training.log"]
    local_final = next((tmp_path / "ckpt" / "verifiable-wmtp").glob("*/checkpoint_final.pt")).read_bytes()
    assert s3.get_object(Bucket="wmtp", Key=prefix + "checkpoints/checkpoint_final.pt")["Body"].read() == local_final
    training_log = s3.get_object(Bucket="wmtp", Key=prefix + "logs/training.log")["Body"].read().decode()
    config_yaml = s3.get_object(Bucket="wmtp", Key=prefix + "config.yaml")["Body"].read().decode()
    assert f"run {run.info.run_id}, 2 process(es)" in training_log
    # no secret value anywhere a user or a colleague can read
    for secret in (stack_env["MLFLOW_TRACKING_PASSWORD"], stack_env["AWS_SECRET_ACCESS_KEY"]):
        for where, text in [("params", repr(params)), ("tags", repr(run.data.tags)), ("training.log", training_log),
                            ("config.yaml", config_yaml), ("stdout", r.stdout), ("stderr", r.stderr)]:
            assert secret not in text, where


def test_wrong_password_fails_fast_before_training_and_doctor_says_why(stack_env, tmp_path):
    env = {**stack_env, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    started = time.time()
    r = trainer(env, tmp_path)
    message = (f"tracking server {env['MLFLOW_TRACKING_URI']} answered 401 Unauthorized: "
               "wrong MLFLOW_TRACKING_USERNAME/PASSWORD")
    assert r.returncode == 2 and time.time() - started < 30
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "step 1" not in r.stdout and not (tmp_path / "ckpt").exists()
    doctor = subprocess.run([sys.executable, "-m", "weighted_mtp", "doctor", "--env-file", str(tmp_path / "none.env")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 1
    assert doctor.stdout.splitlines()[1:3] == [f"ok   tracking server {env['MLFLOW_TRACKING_URI']} reachable",
                                               f"FAIL {message} (check .env: grep MLFLOW .env)"]
    assert env["MLFLOW_TRACKING_PASSWORD"] not in doctor.stdout + doctor.stderr


def test_doctor_passes_on_the_stack(stack_env, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("# the variables come from the environment here\n")
    doctor = subprocess.run([sys.executable, "-m", "weighted_mtp", "doctor", "--env-file", str(env_file),
                             "--override", "mlflow.s3_artifacts=s3://wmtp/mlflow-artifacts"],
                            cwd=ROOT, env=stack_env, capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 0, doctor.stdout
    lines = doctor.stdout.splitlines()
    assert lines[0].startswith(f"ok   {env_file} found; set: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME")
    assert lines[-3] == "ok   S3 bucket 'wmtp' reachable and writable under " + lines[-3].split("under ")[-1]
    assert lines[-2] == f"WARN {env_file} is readable by group or others (mode 644): chmod 600 {env_file}"
    assert lines[-1].startswith(("ok   sandbox: bwrap: ", "WARN sandbox: uid (WEAKER", "WARN sandbox: none (WEAKER"))
    assert stack_env["MLFLOW_TRACKING_PASSWORD"] not in doctor.stdout
    assert stack_env["AWS_SECRET_ACCESS_KEY"] not in doctor.stdout


def test_server_down_for_20s_costs_no_metric(stack_env, tracking_stack, tmp_path):
    overrides = [*TINY, f"checkpoint.dir={tmp_path}/ckpt", "critic.checkpoint=", "mlflow.system_metrics_interval_s=0",
                 "training.max_steps=600", "training.eval_interval=0", "checkpoint.save_every=0",
                 "data_sampling.n_samples=400", "mlflow.run_name=outage"]
    proc = subprocess.Popen([sys.executable, "-m", "weighted_mtp", "train", "--config", str(LOCAL), "--use-micro-model",
                             *[f"--override={o}" for o in overrides]],
                            cwd=tmp_path, env=stack_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server = stack.process_tree([tracking_stack["pids"]["mlflow"]])
    try:
        for line in proc.stdout:            # training is under way once the first progress line appears
            if line.startswith("step 2/"):
                break
        for pid in server:
            os.kill(pid, signal.SIGSTOP)    # the server hangs: no answer, no refusal, like a stalled host
        time.sleep(20)
    finally:
        for pid in server:
            os.kill(pid, signal.SIGCONT)
    rest = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, rest[-3000:]
    client = MlflowClient(stack_env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("weighted-mtp/production")
    run = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'outage'")[0]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(2, 601, 2))  # every logged step, none lost, none twice
