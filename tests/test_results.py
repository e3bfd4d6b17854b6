"""Results that mean something: the prompt template, mixed built-ins, val/pass@1 by execution during training, and
`compare` — every policy pipeline from one warm-up's weights, over seeds, as mean ± 95 % intervals with a plot, all
nested under one parent MLflow run."""
import json
import math
import re

import pytest
import torch
from mlflow import MlflowClient

import weighted_mtp as wm
from wmtp.config import UserError, load_config
from wmtp.pretrained import ByteTokenizer
from wmtp.data import arith_records, encode_records, load_records, pyfunc_records, render_prompt
from wmtp.evaluation import distinct_prompts
from wmtp.report import format_compare, mean_interval
from conftest import ROOT, TINY, new_store, tiny_config

TOK = ByteTokenizer()
PASS1 = "val/pass_at_1"
T_975_1 = math.tan(math.pi * (0.975 - 0.5))  # Student t's 97.5 % quantile, 1 degree of freedom (Cauchy): 12.706
T_975_2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # and 2 degrees of freedom: (2p − 1) / √(2p(1 − p)) = 4.303


def test_plain_template_is_short_and_what_training_and_validation_both_use():
    record = arith_records("validation")[0]
    assert (record["instruction"], record.get("input"), record["output"]) == ("13+54", None, "67")
    assert render_prompt(record, "plain") == "13+54\n"
    assert render_prompt({"instruction": "Add.", "input": "1+2", "output": "3"}, "plain") == "Add.\n1+2\n"
    assert render_prompt(record) == render_prompt(record, "alpaca")
    assert render_prompt(record).endswith("### Response:\n")
    (ids, labels, _, _), = encode_records([record], TOK, 64, "truncate", "x", "plain")[0]
    assert ids == [TOK.bos_id] + list(b"13+54\n67") + [TOK.eos_id]        # 10 tokens, 3 of them trained
    assert [i for i, label in zip(ids, labels) if label != -100] == [ord("6"), ord("7"), TOK.eos_id]
    # validation decodes from the prompt training encoded; evaluate renders [BOS] + render_prompt(task, template)
    [(prompt, _)] = distinct_prompts([(ids, labels, 1.0, record)])
    assert prompt == [TOK.bos_id] + TOK.encode(render_prompt(record, "plain"))
    with pytest.raises(UserError, match=r"'dataset.template' must be alpaca or plain or chat, got 'chatml'"):
        load_config(ROOT / "configs" / "baseline" / "baseline_local.yaml", ["dataset.template=chatml"])


def test_builtins_mix_and_hold_the_same_problems_out_of_training_and_evaluation():
    arith, pyfunc = arith_records("train"), pyfunc_records("train")
    mixed, checker = load_records("builtin:arith+pyfunc", "train")
    assert len(mixed) == len(arith) + len(pyfunc) == 18000 + len(pyfunc)
    assert {r["_source"] for r in mixed} == {"builtin:arith", "builtin:pyfunc"}
    right = next(r for r in mixed if r["task_id"] == "arith-7-35" and r["is_correct"])
    assert right["instruction"] == "07+35" and checker(right, "42") and not checker(right, "43")
    code = next(r for r in mixed if r["task_id"] == "pyfunc-add-8" and r["is_correct"])
    assert (code["instruction"], code["output"]) == ("f(x) returns x plus 8", "x + 8")
    assert checker(code, "x + 8") is True and checker(code, "x + 7") is False and checker(code, "None") is False
    weighted, _ = load_records("builtin:arith+pyfunc*3", "train")   # a mixture's weights: pyfunc 3 times over
    assert len(weighted) == len(arith) + 3 * len(pyfunc)
    assert [r["task_id"] for r in weighted[len(arith):]] == [r["task_id"] for r in pyfunc] * 3
    for name in ("arith", "pyfunc"):  # evaluate's split is validation's: problems training never saw
        held_out = {r["task_id"] for r in load_records(f"builtin:{name}", "eval")[0]}
        assert held_out == {r["task_id"] for r in load_records(f"builtin:{name}", "validation")[0]}
        assert not held_out & {r["task_id"] for r in load_records(f"builtin:{name}", "train")[0]}
    with pytest.raises(UserError, match=r"^dataset.train: unknown built-in dataset 'nope' "
                                        r"\(known: arith, pyfunc, sums\)"):
        load_records("builtin:arith+nope", "train")
    for bad in ("pyfunc*0", "pyfunc*x", "pyfunc*"):
        with pytest.raises(UserError, match=rf"^dataset.train: '{re.escape(bad)}': the count after \* must be a whole "
                                               "number >= 1$"):
            load_records(f"builtin:arith+{bad}", "train")


@pytest.mark.parametrize("validation, present, absent", [
    ("builtin:arith+pyfunc", {"val/accuracy", PASS1}, set()),
    ("builtin:pyfunc", {PASS1}, {"val/accuracy"}),   # tests, no string checker: executed once, into pass@1 only
    ("builtin:arith", {"val/accuracy"}, {PASS1}),
])
def test_val_pass_at_1_appears_at_each_validation_on_data_with_tests(tracking, tmp_path, validation, present, absent):
    result = wm.train(tiny_config("baseline", tmp_path, f"dataset.validation={validation}",
                                  "data_sampling.val_samples=24"), use_micro=True)
    client = MlflowClient(tracking)
    metrics = client.get_run(result["run_id"]).data.metrics
    assert present <= set(metrics) and not absent & set(metrics)
    for name in present:
        history = client.get_metric_history(result["run_id"], name)
        assert [m.step for m in history] == [2, 4] and all(0.0 <= m.value <= 1.0 for m in history)


def test_validation_tests_that_cannot_run_fail_before_training(tracking, tmp_path):
    bad = tmp_path / "val.jsonl"
    record = {"instruction": "x", "output": "y", "task_id": "t", "metadata": {"tests": "nope"}}
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=rf"^{bad}:1 \(task t\): metadata.tests must be a list"):
        wm.train(tiny_config("baseline", tmp_path, f"dataset.validation={bad}"), use_micro=True)
    exp = MlflowClient(tracking).get_experiment_by_name("weighted-mtp/production")
    [run] = MlflowClient(tracking).search_runs([exp.experiment_id])
    assert run.info.status == "FAILED" and "train/loss" not in run.data.metrics  # not a step was taken


def test_mean_interval_is_student_t():
    mean, h = mean_interval([1.0, 2.0, 3.0])   # s = 1
    assert mean == 2.0 and h == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-9)
    assert mean_interval([0.5, 0.7])[1] == pytest.approx(T_975_1 * 0.1, rel=1e-9)  # s/√n = |a − b| / 2
    assert mean_interval([0.25])[0] == 0.25 and math.isnan(mean_interval([0.25])[1])


@pytest.fixture(scope="module")
def compared(tmp_path_factory, empty_store):
    """compare over 2 seeds on the tiny micro model, evaluated on 3 tasks, in its own sqlite store."""
    tmp = tmp_path_factory.mktemp("compare")
    uri = new_store(empty_store, tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)
        overrides = [*TINY, f"checkpoint.dir={tmp}/ckpt", "eval.max_tasks=3", "eval.max_new_tokens=8",
                     "eval.workers=2", "eval.timeout_s=5"]
        summary = wm.compare(2, 3, overrides)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("weighted-mtp/production")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    [parent] = [r for r in runs if r.info.run_name == "compare-2-seeds"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, tmp, summary, parent, children


def test_compare_nests_every_run_under_one_parent(compared):
    client, _, summary, parent, children = compared
    assert parent.info.status == "FINISHED" and parent.data.params["seeds"] == "2"
    names = sorted(r.info.run_name for r in children)
    assert names == sorted(["warmup", "baseline-mtp", "critic-pretrain", "verifiable-wmtp", "rho1-wmtp"] * 2)
    assert all(r.info.status == "FINISHED" for r in children)
    policy = [r for r in children if r.data.tags["pipeline"] in wm.policy_pipelines() and r.info.run_name != "warmup"]
    assert {r.data.tags["wmtp.steps"] for r in policy} == {"4"}   # the same policy steps for every pipeline
    assert {r.data.tags["wmtp.steps"] for r in children if r.info.run_name == "warmup"} == {"3"}
    assert all("eval/pass_at_1" in r.data.metrics for r in policy)
    assert [f.path for f in client.list_artifacts(parent.info.run_id, "compare")] == [
        "compare/metrics.png", "compare/summary.json"]
    png = client.download_artifacts(parent.info.run_id, "compare/metrics.png", str(compared[1]))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_intervals_worked_by_hand_from_the_logged_values(compared):
    client, _, summary, parent, children = compared
    for pipeline, run_name in (("baseline", "baseline-mtp"), ("verifiable", "verifiable-wmtp"), ("rho1", "rho1-wmtp")):
        runs = sorted((r for r in children if r.info.run_name == run_name),
                      key=lambda r: int(r.data.params["training.seed"]))
        assert [r.data.params["training.seed"] for r in runs] == ["0", "1"]
        for metric in ("val/loss", "val/accuracy", "eval/pass_at_1"):
            a, b = (r.data.metrics[metric] for r in runs)
            # mean = (a + b) / 2; s = |a − b| / √2; half-width = t_{0.975, 1} · s / √2 = 12.706 · |a − b| / 2
            mean, half = (a + b) / 2, T_975_1 * abs(a - b) / 2
            assert summary[pipeline][metric]["values"] == [a, b]
            assert parent.data.metrics[f"{pipeline}/{metric}_mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12)
            assert parent.data.metrics[f"{pipeline}/{metric}_ci95"] == pytest.approx(half, rel=1e-9, abs=1e-12)
    assert format_compare(summary, 2, 3, 4).splitlines()[2].startswith("baseline    warm-up")


def test_policy_pipelines_start_from_identical_weights(compared):
    """Checked on the checkpoints the runs loaded (their params): baseline and rho1 name the warm-up's final
    checkpoint, verifiable the critic's, whose policy tensors must be the warm-up's bit for bit."""
    client, _, _, _, children = compared
    for seed in ("0", "1"):
        of_seed = {r.info.run_name: r for r in children if r.data.params["training.seed"] == seed}
        warmup = of_seed["warmup"]
        loaded = {"baseline": of_seed["baseline-mtp"].data.params["model.init_from"],
                  "rho1": of_seed["rho1-wmtp"].data.params["model.init_from"],
                  "verifiable": of_seed["verifiable-wmtp"].data.params["critic.checkpoint"]}
        assert loaded["baseline"] == loaded["rho1"] and loaded["baseline"].endswith(
            f"/warmup/{warmup.info.run_id}/checkpoint_final.pt")
        assert f"/critic-pretrain/{of_seed['critic-pretrain'].info.run_id}/" in loaded["verifiable"]
        assert of_seed["critic-pretrain"].data.params["model.init_from"] == loaded["baseline"]
        states = {p: torch.load(path, weights_only=False)["model"] for p, path in loaded.items()}
        policy = {k: v for k, v in states["baseline"].items() if not k.startswith("value_head.")}
        for p in ("verifiable", "rho1"):
            assert sorted(k for k in states[p] if not k.startswith("value_head.")) == sorted(policy)
            assert all(torch.equal(states[p][k], v) for k, v in policy.items()), p
        assert "value_head.weight" in states["verifiable"]  # the critic's, trained on the warm-up's frozen trunk
        # rho1's reference: this seed's baseline (trained from the same warm-up on correct answers)
        assert of_seed["rho1-wmtp"].data.params["reference.path"].endswith(
            f"/baseline-mtp/{of_seed['baseline-mtp'].info.run_id}/checkpoint_final.pt")


def test_compare_control_rows_train_the_critic_their_variant_asks_for(tmp_path, monkeypatch, empty_store):
    """verifiable:shuffled changes only verifiable's weights: it uses the plain critic; verifiable:shuffled-critic
    (critic.shuffle_labels) gets a critic of its own, a row of its own."""
    uri = new_store(empty_store, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    overrides = [*TINY, f"checkpoint.dir={tmp_path}/ckpt", "eval.max_tasks=2", "eval.max_new_tokens=4",
                 "eval.workers=1"]
    summary = wm.compare(1, 2, overrides, ["verifiable:shuffled", "verifiable:shuffled-critic"])
    assert list(summary) == ["critic", "verifiable:shuffled", "critic:shuffled-critic", "verifiable:shuffled-critic"]
    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("weighted-mtp/production").experiment_id], max_results=100)}
    assert sorted(runs) == sorted(["compare-1-seeds", "warmup", "critic-pretrain", "verifiable-wmtp-shuffled",
                                   "critic-pretrain-shuffled-critic", "verifiable-wmtp-shuffled-critic"])
    params = lambda name, key: runs[name].data.params[key]
    assert params("critic-pretrain", "critic.shuffle_labels") == "False"
    assert params("critic-pretrain-shuffled-critic", "critic.shuffle_labels") == "True"
    assert params("verifiable-wmtp-shuffled", "training.weight_control") == "shuffled"
    assert params("verifiable-wmtp-shuffled-critic", "training.weight_control") == "none"
    for policy, critic in (("verifiable-wmtp-shuffled", "critic-pretrain"),
                           ("verifiable-wmtp-shuffled-critic", "critic-pretrain-shuffled-critic")):
        assert f"/{critic}/{runs[critic].info.run_id}/" in params(policy, "critic.checkpoint")
    assert format_compare(summary, 1, 2, 4).splitlines()[5].startswith("verifiable:shuffled-critic warm-up")
