"""`evaluate`: samples mode scored exactly against known answers, one-line errors for bad files, and model mode end
to end on the micro model — eval/pass@k on the evaluated training run, every completion in the evaluation's own
eval/<evaluation>/samples.jsonl."""
import dataclasses
import io
import json
import logging
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from wmtp import sandbox
import weighted_mtp as wm
from wmtp.evaluation import Progress, eval_tasks, evaluate
from conftest import ROOT, main_in_process, tiny_config

BASELINE = ROOT / "configs" / "baseline" / "baseline_local.yaml"
TASKS = [  # one task of each test style
    {"instruction": "Read two integers, print their sum.", "output": "print(sum(map(int, input().split())))",
     "task_id": "sum", "metadata": {"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}]}},
    {"instruction": "Write add(a, b).", "output": "def add(a, b):\n    return a + b", "task_id": "add",
     "metadata": {"test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"}},
]
SAMPLES = [("sum", "print(sum(map(int, input().split())))"), ("sum", "print(42)"),   # c = 1 of n = 2
           ("add", "def add(a, b):\n    return a - b"), ("add", "def add(a, b):\n    return b - a")]  # c = 0 of 2


def newest_samples(client, run_id, folder):
    """The local copy of the newest evaluation's samples.jsonl on the run (its tag eval.samples names it)."""
    return client.download_artifacts(run_id, client.get_run(run_id).data.tags["eval.samples"], folder)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_evaluate(tmp_path, uri, *args):
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri,
           "AWS_SECRET_ACCESS_KEY": "planted-secret-value-123"}
    return subprocess.run([sys.executable, "-m", "weighted_mtp", "evaluate", "--config", str(BASELINE), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_samples_mode_scores_known_answers_and_logs_its_own_run(tmp_path, tracking):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": t, "completion": c} for t, c in SAMPLES])
    r = run_evaluate(tmp_path, tracking, "--samples", str(samples), "--json", str(tmp_path / "out.json"),
                     "--override", f"eval.dataset={tasks}", "--override", "eval.k=[1, 2]", "--override",
                     "eval.workers=1")
    assert r.returncode == 0, r.stderr
    assert "evaluate: 4/4 programs run, ETA 0 s" in r.stderr  # the progress line (every 4 x workers programs)
    summary = json.loads((tmp_path / "out.json").read_text())
    # pass@1 = mean(c/n) = (1/2 + 0/2) / 2; pass@2 = mean(1 − C(n−c,2)/C(n,2)) = (1 + 0) / 2
    assert summary == {"pass@1": 0.25, "pass@2": 0.5, "n_tasks": 2, "n_samples": 4, "timeouts": 0, "errors": 0,
                       "sandbox": "bwrap"}  # the isolation that produced it (bwrap: the default)
    client = MlflowClient(tracking)
    [run] = client.search_runs([client.get_experiment_by_name("weighted-mtp/production").experiment_id])
    assert run.info.run_name == "evaluate" and run.info.status == "FINISHED"
    assert run.data.tags["sandbox.isolation"] == sandbox.isolation().mode            # which isolation: a run tag ...
    assert f"sandbox: {sandbox.isolation().mode}" in r.stdout                         # ... and printed
    tags = client.get_experiment_by_name("weighted-mtp/production").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"  # created here: marked here too
    assert run.data.metrics == {"eval/pass_at_1": 0.25, "eval/pass_at_2": 0.5}  # MLflow forbids "@" in names
    lines = open(newest_samples(client, run.info.run_id, str(tmp_path))).read().splitlines()
    assert [(json.loads(x)["task_id"], json.loads(x)["passed"]) for x in lines] == [
        ("sum", True), ("sum", False), ("add", False), ("add", False)]
    assert "planted-secret-value-123" not in "".join(lines) + r.stdout + r.stderr


@pytest.mark.parametrize("line, message", [
    ('{"task_id": "sum", "completion": "print(3)"}\n{"task_id": "sum"', "samples.jsonl:2: not valid JSON"),
    ('{"task_id": "nope", "completion": "x"}', "samples.jsonl:1: unknown task_id 'nope'"),
])
def test_a_bad_samples_line_is_one_line_naming_file_and_line(tmp_path, tracking, line, message):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    (tmp_path / "samples.jsonl").write_text(line + "\n")
    # in this process (evaluate's exit 2 from a real process: the test below)
    r = main_in_process("evaluate", "--config", str(BASELINE), "--samples", str(tmp_path / "samples.jsonl"),
                        "--override", f"eval.dataset={tasks}", cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {tmp_path}/{message}"), r.stderr
    assert not list(MlflowClient(tracking).search_experiments(filter_string="name = 'weighted-mtp/production'"))


def test_a_task_without_tests_is_an_error_naming_its_line(tmp_path, tracking):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", [TASKS[0], {"instruction": "x", "output": "y", "task_id": "bare"}])
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": "bare", "completion": "print(1)"}])
    r = run_evaluate(tmp_path, tracking, "--samples", str(samples), "--override", f"eval.dataset={tasks}")
    assert r.returncode == 2 and f"{tasks}:2" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_model_mode_logs_pass_at_k_on_the_evaluated_training_run(tmp_path, tracking):
    trained = wm.train(tiny_config("baseline", tmp_path))
    cfg = tiny_config("baseline", tmp_path, "eval.max_tasks=3", "eval.n_samples=2", "eval.k=[1, 2]",
                      "eval.max_new_tokens=12", "eval.workers=2", "eval.timeout_s=5")
    summary = evaluate(cfg, use_micro=True, checkpoint="auto", json_out=str(tmp_path / "out.json"))
    assert summary["n_tasks"] == 3 and summary["n_samples"] == 6
    client = MlflowClient(tracking)
    run = client.get_run(trained["run_id"])
    assert run.data.metrics["eval/pass_at_1"] == summary["pass@1"]
    assert run.data.metrics["eval/pass_at_2"] == summary["pass@2"]
    history = client.get_metric_history(run.info.run_id, "eval/pass_at_1")
    assert [m.step for m in history] == [4]  # the checkpoint's step
    assert run.data.tags["sandbox.isolation"] == sandbox.isolation().mode
    lines = open(newest_samples(client, run.info.run_id, str(tmp_path))).read().splitlines()
    records = [json.loads(x) for x in lines]
    assert len(records) == 6 and sorted({r["task_id"] for r in records}) == sorted(eval_tasks("builtin:pyfunc", 3))
    assert all(r["tests"] and isinstance(r["completion"], str) for r in records)
    assert json.loads((tmp_path / "out.json").read_text()) == summary
    # sampled (n_samples 2): plain decoding, one token per forward, nothing drafted
    assert summary["tokens_per_forward"] == 1.0 and "accept_head_1" not in summary
    assert run.data.metrics["eval/tokens_per_forward"] == 1.0
    plain_cfg = tiny_config("baseline", tmp_path, "eval.max_tasks=3", "eval.n_samples=1", "eval.max_new_tokens=12",
                            "eval.workers=2", "eval.timeout_s=5", "eval.speculative=false")
    plain = evaluate(plain_cfg, use_micro=True, checkpoint="auto")
    (tmp_path / "p").mkdir(), (tmp_path / "f").mkdir()
    plain_lines = open(newest_samples(client, run.info.run_id, str(tmp_path / "p"))).read()
    fast = evaluate(dataclasses.replace(plain_cfg, eval=dataclasses.replace(plain_cfg.eval, speculative=True)),
                    use_micro=True, checkpoint="auto")
    fast_lines = open(newest_samples(client, run.info.run_id, str(tmp_path / "f"))).read()
    assert plain["tokens_per_forward"] == 1.0 and "accept_head_1" not in plain  # plain: one token per forward
    assert fast_lines == plain_lines and fast["pass@1"] == plain["pass@1"]  # the same completions, greedy both ways
    metrics = client.get_run(run.info.run_id).data.metrics  # H = 3: heads 1 and 2 drafted
    assert fast["tokens_per_forward"] >= 1.0 and 0 <= fast["accept_head_2"] <= fast["accept_head_1"] <= 1
    assert all(metrics[f"eval/{k}"] == fast[k] for k in ("tokens_per_forward", "accept_head_1", "accept_head_2"))


def test_run_sh_evaluate_launches_the_same_command(tmp_path, tracking):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": t, "completion": c} for t, c in SAMPLES])
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": tracking, "WMTP_GPU_COUNT": "0",
           "WMTP_VENV": sys.prefix, "WMTP_ENV_FILE": str(tmp_path / "no.env"), "HOME": str(tmp_path)}
    r = subprocess.run([str(ROOT / "run.sh"), "evaluate", "baseline", "--local", "--samples", str(samples),
                        "--json", str(tmp_path / "out.json"), "--override", f"eval.dataset={tasks}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (f"+ python -m weighted_mtp evaluate --config configs/baseline/baseline_local.yaml --use-micro-model "
            f"--samples {samples}") in r.stdout
    assert json.loads((tmp_path / "out.json").read_text())["pass@1"] == 0.25


def test_a_completion_reading_the_environment_finds_no_secret_anywhere(tmp_path, tracking):
    """The evaluator's environment holds a planted AWS secret; a completion that dumps os.environ (and /proc's
    copy of its parent's) to stdout and stderr fails its task, and the secret is in no result, log or MLflow record."""
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS)
    spy = "import os, sys\nprint(dict(os.environ)); print(dict(os.environ), file=sys.stderr)\n"
    if sandbox.isolation().mode != "none":  # bwrap: its own /proc; uid: another uid's; none: readable (README)
        spy += "print(open(f'/proc/{os.getppid()}/environ').read(), file=sys.stderr)\n"
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"task_id": "sum", "completion": spy}])
    r = run_evaluate(tmp_path, tracking, "--samples", str(samples), "--json", str(tmp_path / "out.json"),
                     "--override", f"eval.dataset={tasks}")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out.json").read_text())["pass@1"] == 0.0
    client = MlflowClient(tracking)
    [run] = client.search_runs([client.get_experiment_by_name("weighted-mtp/production").experiment_id])
    artifact = open(newest_samples(client, run.info.run_id, str(tmp_path))).read()
    assert json.loads(artifact)["stderr"]  # it did print something
    everything = artifact + r.stdout + r.stderr + json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert "planted-secret-value-123" not in everything


def test_evaluate_progress_is_a_bar_on_a_terminal_and_a_line_per_batch_in_a_log(caplog):
    terminal = io.StringIO()
    bars = Progress(4, 8, terminal)
    bars.tasks_generated(2), bars.tasks_generated(2), bars.programs_run(8)
    shown = terminal.getvalue()
    assert "evaluate: tasks generated:  50%" in shown and " 2/4 " in shown and " 4/4 " in shown
    assert "evaluate: programs run: 100%" in shown and " 8/8 " in shown
    with caplog.at_level(logging.INFO, logger="weighted_mtp"):
        lines = Progress(4, 8)
        lines.tasks_generated(4), lines.programs_run(8)
    assert [r.getMessage() for r in caplog.records] == [
        "evaluate: 4/4 tasks generated, ETA 0 s (then 8 programs to run)", "evaluate: 8/8 programs run, ETA 0 s"]
