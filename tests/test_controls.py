"""The instrument's controls: the no-training baselines beside every critic figure (the starting policy's
log-probabilities as the ranker and as the token weights), and the positive control (`compare --control`), where
token weighting must help by construction. Values worked by hand, read back from real (sqlite) MLflow stores."""
import json
import math

import pytest
import torch
from mlflow import MlflowClient

import weighted_mtp as wm
import weights as W
from wmtp.data import encode_records, load_records, sample_records, sums_records
from wmtp.pipelines import at_first_wrong, auc
from wmtp.pretrained import ByteTokenizer
from wmtp.report import format_compare
from conftest import TINY, new_store, tiny_config

TOK = ByteTokenizer()


def test_answer_logprob_sums_and_averages_the_answer_tokens_only():
    lp = torch.tensor([[-9.0, -1.0, -2.0, -3.0], [-9.0, -0.5, -4.0, -4.0]])
    mask = torch.tensor([[False, False, True, True], [False, True, False, False]])
    total, mean = W.answer_logprob(lp, mask)
    assert total.tolist() == [-5.0, -0.5] and mean.tolist() == [-2.5, -0.5]
    _, empty_mean = W.answer_logprob(lp, torch.zeros_like(mask))
    assert empty_mean.tolist() == [0.0, 0.0]


def test_at_first_wrong_reads_each_pair_at_its_own_first_wrong_position():
    # rows 0-2 the right answers, rows 3-5 their wrong ones; first wrong positions 1, 2, 1
    x = torch.tensor([[0.0, -1.0, -7.0], [0.0, -7.0, -2.0], [0.0, -3.0, -7.0],
                      [0.0, -2.0, -7.0], [0.0, -7.0, -1.0], [0.0, -3.0, -7.0]])
    right, wrong = at_first_wrong(x, [1, 2, 1])
    assert right.tolist() == [-1.0, -2.0, -3.0] and wrong.tolist() == [-2.0, -1.0, -3.0]
    assert W.token_credit(right, wrong).item() == 0.5   # a win, a loss, a tie: (1 + 0 + ½) / 3


def test_logprob_credit_compares_the_right_and_the_first_wrong_token_given_their_shared_prefix():
    """val/token_credit_logprob on a random micro model, worked the slow way: each pair's prefix (prompt and the
    answer's tokens before j) run alone, log p(right token) against log p(first wrong token) from its last logits."""
    from test_generate import micro_model
    from wmtp.pipelines import logprob_credit, near_miss_pairs
    records = [r for r in sums_records("train") if r["task_id"] in {f"sums-{a}-{b}" for a in range(3) for b in (1, 5)}]
    records += [{**r, "output": "1" + r["output"]} for r in records[:3]]  # 0+1: 11 vs 12, parting at the 2nd digit
    pairs = near_miss_pairs(encode_records(records, TOK, 32, "error", "x", "plain")[0])
    assert len(pairs) == 6 and {j for *_, j in pairs} == {5, 6}   # one pair per prompt, at its first wrong token
    model, wins = micro_model(seed=1), []
    for right, wrong, j in pairs:
        lp = torch.log_softmax(wm.next_token_logits(model, torch.tensor([right[0][:j]]))[0, -1], -1)
        r, w = lp[right[0][j]].item(), lp[wrong[0][j]].item()
        wins.append(1.0 if r > w else 0.5 if r == w else 0.0)
    assert wins == [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]   # this model prefers the right token in 2 pairs of 6
    assert logprob_credit(model, pairs) == pytest.approx(2 / 6, abs=1e-6)   # one batch, padded: the same


@pytest.fixture(scope="module")
def uniform_start(tmp_path_factory, empty_store):
    """A tiny baseline's final checkpoint with its output layer zeroed: a starting policy whose every next-token
    distribution is uniform over the 259 byte-tokenizer ids, so each answer token's log-probability is −ln 259."""
    tmp = tmp_path_factory.mktemp("uniform")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", new_store(empty_store, tmp))
        run_id = wm.train(tiny_config("baseline", tmp, "training.max_steps=2", "training.eval_interval=0",
                                      "checkpoint.save_every=0"), use_micro=True)["run_id"]
    state = torch.load(tmp / "ckpt" / "baseline-mtp" / run_id / "checkpoint_final.pt", weights_only=False)
    state["model"]["output.weight"].zero_()
    path = tmp / "uniform.pt"
    torch.save(state, path)
    return path


def test_critic_and_verifiable_log_their_no_training_baselines(tracking, tmp_path, uniform_start):
    """Under a uniform starting policy an answer's log-probability is −n·ln 259 (n its tokens, EOS included): the
    sum ranks by length alone, the mean ties every answer (AUC ½), and every near-miss pair ties (credit ½)."""
    client = MlflowClient(tracking)
    critic = tiny_config("critic", tmp_path, f"model.init_from={uniform_start}")
    critic_run = wm.train(critic, use_micro=True)["run_id"]
    val = load_records(critic.dataset.validation, "validation")[0]
    examples = encode_records(sample_records(val, critic.data_sampling.val_samples, 0.5, critic.data_sampling.seed + 1),
                              TOK, critic.dataset.max_length, "truncate", "x", critic.dataset.template)[0]
    n_answer = [sum(label != -100 for label in labels) for _, labels, _, _ in examples]
    want = auc([-n * math.log(259) for n in n_answer], [reward for _, _, reward, _ in examples])
    assert (n_answer, want) == ([4, 3, 4, 3, 3, 4, 3, 7], 0.5625)   # the 8 seeded answers: not a tie by accident
    metrics = client.get_run(critic_run).data.metrics
    assert metrics["val/auc_logprob"] == pytest.approx(want, abs=1e-12)
    assert metrics["val/auc_logprob_mean"] == 0.5
    assert [m.step for m in client.get_metric_history(critic_run, "val/auc_logprob")] == [2, 4]
    verifiable = tiny_config("verifiable", tmp_path, f"critic.checkpoint={tmp_path}/ckpt/critic-pretrain/"
                             f"{critic_run}/checkpoint_best.pt")
    verifiable_run = wm.train(verifiable, use_micro=True)["run_id"]
    history = client.get_metric_history(verifiable_run, "val/token_credit_logprob")
    assert [(m.step, m.value) for m in history] == [(2, 0.5), (4, 0.5)]   # measured once, on the starting weights


def test_sums_teach_one_mistake_two_times_in_three_and_its_tests_reject_it():
    records = sums_records("train")
    assert len(records) == 300 and sum(r["is_correct"] for r in records) == 100
    seven = [r for r in records if r["task_id"] == "sums-3-4"]
    assert [(r["instruction"], r["output"], r["is_correct"]) for r in seven] == [
        ("3+4", "7", True), ("3+4", "8", False), ("3+4", "8", False)]
    _, checker = load_records("builtin:sums", "train")
    assert checker({**seven[0], "_source": "builtin:sums"}, "7") is True
    assert checker({**seven[0], "_source": "builtin:sums"}, "8") is False
    assert checker({**seven[0], "_source": "builtin:sums"}, "type('E', (), {'__eq__': lambda s, o: True})()") is False


def compare_in(tmp, empty_store, *args, **kwargs):
    """wm.compare in an sqlite store of its own under tmp -> (summary, {run name: run}, parent run)."""
    uri = new_store(empty_store, tmp)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)
        summary = wm.compare(*args, **kwargs)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("weighted-mtp/production").experiment_id],
                              max_results=100)
    [parent] = [r for r in runs if r.data.tags.get("pipeline") == "compare"]
    return summary, {r.info.run_name: r for r in runs}, parent


def test_compare_control_trains_floor_ceiling_weighted_and_shuffled_rows_from_the_control_configs(tmp_path,
                                                                                                     empty_store):
    overrides = [*TINY, f"checkpoint.dir={tmp_path}/ckpt", "eval.max_tasks=3", "eval.workers=2"]
    summary, runs, parent = compare_in(tmp_path, empty_store, 1, 2, overrides, wm.CONTROL_ROWS, setting="control")
    assert parent.info.run_name == "control-1-seeds" and parent.data.params["setting"] == "control"
    assert list(summary) == ["baseline", "baseline:filtered", "critic", "verifiable", "verifiable:shuffled"]
    params = lambda name, key: runs[name].data.params[key]
    assert {params(n, "dataset.train") for n in runs if n != parent.info.run_name} == {"builtin:sums"}
    assert (params("baseline-mtp", "data_sampling.correct_ratio"),  # the floor keeps the harmful answers,
            params("baseline-mtp-filtered", "data_sampling.correct_ratio")) == ("0.3334", "1.0")  # the ceiling not
    assert params("verifiable-wmtp", "training.policy_on_incorrect") == "True"
    assert params("verifiable-wmtp-shuffled", "training.weight_control") == "shuffled"
    for row, name in (("baseline", "baseline-mtp"), ("verifiable:shuffled", "verifiable-wmtp-shuffled")):
        assert summary[row]["eval/pass_at_1"]["values"] == [runs[name].data.metrics["eval/pass_at_1"]]
    assert summary["critic"]["val/auc_logprob"]["values"] == [runs["critic-pretrain"].data.metrics["val/auc_logprob"]]
    head = format_compare(summary, 1, 2, 4).splitlines()[1].split()
    assert head[:4] == ["pipeline", "started", "from", "val/loss"] and "val/accuracy" not in head   # no checker
    assert {"val/auc", "val/auc_logprob", "val/token_credit", "val/token_credit_logprob"} <= set(head)


def test_compare_on_policy_trains_critic_and_verifiable_on_the_warm_ups_own_graded_answers(tmp_path, empty_store):
    """eval.dataset: two tasks on one prompt, which any one-token answer passes ("anything") or fails ("never"),
    so the warm-up's 4 sampled answers to each are graded right and wrong whatever it writes."""
    from test_sample import ANYTHING, NEVER
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in (ANYTHING, NEVER)))
    overrides = [*TINY, f"checkpoint.dir={tmp_path}/ckpt", f"eval.dataset={tasks}", "eval.max_new_tokens=1",
                 "eval.workers=2"]
    summary, runs, parent = compare_in(tmp_path, empty_store, 1, 2, overrides, ["verifiable"], on_policy=True)
    assert list(summary) == ["critic", "verifiable"] and parent.data.params["on_policy"] == "True"
    warm = tmp_path / "ckpt" / "warmup" / runs["warmup"].info.run_id
    for name in ("critic-pretrain", "verifiable-wmtp"):
        assert runs[name].data.params["dataset.train"] == str(warm / "on_policy_train.jsonl")
        assert runs[name].data.params["dataset.validation"] == str(warm / "on_policy_validation.jsonl")
    for split in ("train", "validation"):
        records = [json.loads(line) for line in (warm / f"on_policy_{split}.jsonl").read_text().splitlines()]
        assert [(r["task_id"], r["is_correct"]) for r in records] == [("anything", True)] * 4 + [("never", False)] * 4
        assert {r["provenance"]["checkpoint"] for r in records} == {str(warm / "checkpoint_final.pt")}
        assert {r["provenance"]["temperature"] for r in records} == {1.0}
    critic = runs["critic-pretrain"].data.metrics
    assert summary["critic"]["val/auc"]["values"] == [critic["val/auc"]]
    assert summary["critic"]["val/auc_logprob"]["values"] == [critic["val/auc_logprob"]]
