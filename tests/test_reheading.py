"""Re-heading a next-token model without hurting it: a tiny LLaMA trained as a next-token model (H = 1), exported as
a Hugging Face dir, then trained as a 4-head policy. With the defaults (the new-heads warm-up, the new heads'
losses weighed 0.02^k) head 0's held-out loss does not rise; with equal weights and no warm-up it does, and the
head-0 watch warns. A run that adds no heads is not watched. The starting model's val/head_k_loss is logged at
step 0, read back from MLflow."""
import json
import logging

import pytest
import torch
from mlflow import MlflowClient

import weighted_mtp as wm
import weights as W
from wmtp.config import UserError
from wmtp.data import arith_records
from wmtp.parallel import Meter
from wmtp.pipelines import PIPELINE_TYPES
from wmtp.pretrained import build_model, export
from conftest import new_store, tiny_config, train_keeping_setup
from test_hf import CONFIG, random_llama, write_hf

ARITH = ["data_sampling.n_samples=0", "data_sampling.val_samples=64", "training.batch_size=16",
         "checkpoint.save_every=0", "training.log_interval=10", "training.warmup_steps=5"]
# a fine-tune's learning rate, a tenth of the next-token training's peak (at a third of it, 1e-3, even a next-token-only
# fine-tune's held-out loss rose 2.5 % in 30 steps on one data order: docs/models.md)
REHEAD = [*ARITH, "model.n_future_tokens=4", "training.max_steps=60", "training.eval_interval=30",
          "training.learning_rate=3e-4"]
OLD = ["training.head_loss_weights=[1.0]", "training.new_heads_warmup_steps=0"]  # equal weights, no warm-up


@pytest.fixture(scope="module")
def ntp(tmp_path_factory, empty_store):
    """(a next-token model's HF dir, its val/head_0_loss, the MLflow URI, the data's overrides): a tiny random
    LLaMA trained for 300 steps as a one-head model on two-digit additions (a JSONL copy of builtin:arith: no
    checker, so validation measures losses and decodes nothing), exported."""
    root = tmp_path_factory.mktemp("reheading")
    uri = new_store(empty_store, root)
    for split in ("train", "validation"):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in arith_records(split)))
    data = [f"dataset.train={root / 'train.jsonl'}", f"dataset.validation={root / 'validation.jsonl'}"]
    shape = {**CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4}
    start = write_hf(root / "random", shape, random_llama(shape))
    cfg = tiny_config("baseline", root / "ntp", f"model.path={start}", "model.n_future_tokens=1", *ARITH, *data,
                      "training.max_steps=300", "training.eval_interval=0", "training.learning_rate=3e-3",
                      f"mlflow.tracking_uri={uri}")
    result = wm.train(cfg)
    export(next((root / "ntp" / "ckpt" / "baseline-mtp").glob("*/checkpoint_final.pt")), "hf", root / "ntp_hf")
    return root / "ntp_hf", result["val/head_0_loss"], uri, data


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def history(uri, run_id, key):
    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def reheaded(ntp, tmp_path_factory):
    """{"old" | "defaults" | "defaults, order k": (val/head_0_loss history [(step, value)], the warnings it logged,
    its run id)}: 60 steps as a 4-head policy, with equal weights and no warm-up, and with the defaults (also on two
    other data orders: data_sampling.seed 1 and 2 sample other training and validation records)."""
    model_dir, _, uri, data = ntp
    runs = {}
    orders = [(f"defaults, order {k}", [f"data_sampling.seed={k}"]) for k in (1, 2)]
    for name, extra in (("old", OLD), ("defaults", []), *orders):
        warnings, logger = Warnings(), logging.getLogger("weighted_mtp")
        logger.addHandler(warnings)
        try:
            result = wm.train(tiny_config("baseline", tmp_path_factory.mktemp(name), f"model.path={model_dir}",
                                          *REHEAD, *data, f"mlflow.tracking_uri={uri}", *extra))
        finally:
            logger.removeHandler(warnings)
        runs[name] = (history(uri, result["run_id"], "val/head_0_loss"), warnings.messages, result["run_id"])
    return runs


def test_step_0_logs_the_starting_models_head_losses(ntp, reheaded):
    _, ntp_loss, uri, _ = ntp
    for name in ("old", "defaults"):
        head_0, _, run_id = reheaded[name]
        assert [step for step, _ in head_0] == [0, 30, 60], name
        assert head_0[0][1] == pytest.approx(ntp_loss, rel=1e-5)  # the exported model's own, before any step
        head_1 = history(uri, run_id, "val/head_1_loss")
        assert head_1[0][0] == 0 and head_1[0][1] > 2 * head_0[0][1]  # a copy of head 0 predicting a token later
        assert [step for step, _ in history(uri, run_id, "val/loss")] == [30, 60]  # best checkpoint: trained only


def test_defaults_keep_head_0_where_equal_weights_raise_it(reheaded):
    (old, old_warnings, _), (new, new_warnings, _) = reheaded["old"], reheaded["defaults"]
    start = old[0][1]
    # measured (lr 3e-4, prompts without BOS: the test tokenizer adds none): start 1.1001; equal weights, no warm-up
    # 1.8570 at step 30, 1.8602 at 60 (+69 %); the defaults 1.1001 at 30 (frozen), 1.0973 at 60 (-0.26 %); the
    # decay 0.1 with the same warm-up ended +0.12 % on order 2; a next-token-only fine-tune of the 60 steps 1.0767
    assert old[-1][1] > 1.5 * start, (start, old[-1][1])
    assert new[-1][1] < start, (start, new[-1][1])  # does not rise
    assert new[1][1] == start  # step 30: through the 30-step warm-up head 0 has not moved at all
    for k, (start_k, end_k) in ((1, (1.1328, 1.1303)), (2, (1.1438, 1.1379))):  # other records: the same verdict
        head_0 = reheaded[f"defaults, order {k}"][0]
        assert [round(v, 4) for _, v in head_0[::2]] == [start_k, end_k], head_0
    rose = [m for m in old_warnings if "val/head_0_loss" in m]
    assert rose and rose[0].startswith(f"step 30: val/head_0_loss {old[1][1]:.4f} is ")
    assert f"above its step 0 value {start:.4f} (training.head_0_max_rise 0.05)" in rose[0]
    assert not [m for m in new_warnings if "val/head_0_loss" in m]


def test_the_warmup_freezes_exactly_the_trunk_and_head_0(ntp, tmp_path):
    model_dir, _, _, data = ntp
    _, start = wm.load_pretrained(model_dir, n_future_tokens=4)
    cfg = tiny_config("baseline", tmp_path, f"model.path={model_dir}", *ARITH, *data, "model.n_future_tokens=4",
                      "training.max_steps=5", "training.new_heads_warmup_steps=5", "training.eval_interval=0",
                      "mlflow.enable_logging=false")
    _, setup = train_keeping_setup(cfg)
    trained, before = dict(setup.model.named_parameters()), dict(start.named_parameters())
    new = {name for name in trained if name.startswith("extra_heads.")}
    assert {id(p) for p in setup.pipeline.warmup_frozen} == {id(trained[n]) for n in set(trained) - new}
    for name, p in trained.items():
        if name in new:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name
            assert p not in setup.optimizer.state  # AdamW never saw it: no moments, no step count
    assert setup.pipeline.head_weights.tolist() == pytest.approx([1.0, 0.02, 0.0004, 0.000008])
    assert setup.pipeline.new_heads == (1, 2, 3)


def test_a_run_that_adds_no_heads_is_not_watched(ntp, tmp_path):
    """The same next-token model trained on as one head at a learning rate that raises head 0's loss well past
    training.head_0_max_rise: no heads were added, so no warning (the watch guards re-heading only), while its step-0
    and later val/head_0_loss are still logged."""
    model_dir, _, uri, data = ntp
    warnings, logger = Warnings(), logging.getLogger("weighted_mtp")
    logger.addHandler(warnings)
    try:
        result, setup = train_keeping_setup(tiny_config(
            "baseline", tmp_path, f"model.path={model_dir}", *ARITH, *data, "model.n_future_tokens=1",
            "training.max_steps=10", "training.eval_interval=10", "training.learning_rate=1e-2",
            "training.warmup_steps=0", f"mlflow.tracking_uri={uri}"))
    finally:
        logger.removeHandler(warnings)
    head_0 = history(uri, result["run_id"], "val/head_0_loss")
    assert setup.pipeline.new_heads == () and setup.pipeline.head_weights is None
    assert [step for step, _ in head_0] == [0, 10]
    assert head_0[1][1] > 1.05 * head_0[0][1], head_0  # past the watch's 5 %: a re-headed run would warn here
    assert not [m for m in warnings.messages if "val/head_0_loss" in m]


def test_head_0_on_rise_stop_fails_the_run_naming_both_losses(ntp, tmp_path):
    model_dir, _, uri, data = ntp
    cfg = tiny_config("baseline", tmp_path, f"model.path={model_dir}", *REHEAD, *data, *OLD, "training.max_steps=20",
                      "training.eval_interval=10", "training.head_0_on_rise=stop", f"mlflow.tracking_uri={uri}",
                      "mlflow.run_name=stopped")
    with pytest.raises(UserError) as stopped:
        wm.train(cfg)
    run = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
                                        "attributes.run_name = 'stopped'")[0]
    assert run.info.status == "FAILED"
    head_0 = history(uri, run.info.run_id, "val/head_0_loss")
    assert [step for step, _ in head_0] == [0, 10]
    assert str(stopped.value).startswith(
        f"step 10: val/head_0_loss {head_0[1][1]:.4f} is {head_0[1][1] / head_0[0][1] - 1:.1%} above its step 0 "
        f"value {head_0[0][1]:.4f} (training.head_0_max_rise 0.05)")
    assert str(stopped.value).endswith("; stopped (training.head_0_on_rise stop)")


def test_head_loss_weights_scale_each_heads_loss(tmp_path):
    assert W.head_loss_weights([0.5], 4).tolist() == [1.0, 0.5, 0.25, 0.125]
    assert W.head_loss_weights([1, 0.2, 0], 3).tolist() == pytest.approx([1.0, 0.2, 0.0])
    cfg = tiny_config("baseline", tmp_path, "training.head_loss_weights=[1, 0.5, 0.25]")
    _, model = build_model(cfg, True, value_head=False)
    pipeline = PIPELINE_TYPES["baseline"](cfg, 3)
    tokens = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[:, :4] = -100
    loss = pipeline.loss(model, (tokens, labels, torch.ones(2)), Meter(torch.device("cpu")), 0)
    _, ce, _ = model(tokens, W.shift_targets(labels, 3))
    valid = W.shift_targets(labels, 3) != -100
    per_head = (ce * valid).sum(dim=(0, 1)) / valid.sum(dim=(0, 1))
    assert valid.sum(dim=(0, 1)).tolist() == [16, 16, 16]  # each head: the 8 answer tokens of each row
    assert loss.item() == pytest.approx(((per_head * torch.tensor([1, 0.5, 0.25])).sum() / 3).item(), rel=1e-6)


@pytest.mark.parametrize("value, message", [
    ("[1, 0.5]", "training.head_loss_weights [1, 0.5]: one number (a decay), one per head (3, model.n_future_tokens), "
                 "or none (the default)"),
    ("[0, 1, 1]", "'training.head_loss_weights' must be [], a decay [r] or one weight per head: numbers >= 0, head "
                  "0's > 0, got [0, 1, 1]"),
])
def test_bad_head_loss_weights_are_one_line_errors(tmp_path, value, message):
    with pytest.raises(UserError) as bad:
        wm.prepare(tiny_config("baseline", tmp_path, f"training.head_loss_weights={value}"), use_micro=True)
    assert str(bad.value).endswith(message)


def test_a_checkpoint_with_fewer_heads_says_where_heads_are_added(tmp_path):
    """model.init_from (a trainer checkpoint) is loaded as it is: a one-head checkpoint under model.n_future_tokens 4
    is a one-line error naming the file, both head counts and the way to re-head it (a model dir)."""
    one_head = tiny_config("baseline", tmp_path / "one", "model.n_future_tokens=1", "training.max_steps=1",
                           "training.eval_interval=0", "mlflow.enable_logging=false")
    wm.train(one_head, use_micro=True)
    final = next((tmp_path / "one" / "ckpt").rglob("checkpoint_final.pt"))
    with pytest.raises(UserError) as fewer:
        wm.prepare(tiny_config("baseline", tmp_path / "four", "model.n_future_tokens=4", f"model.init_from={final}",
                               "mlflow.enable_logging=false"), use_micro=True)
    assert str(fewer.value) == (f"{final}: has 1 head(s), model.n_future_tokens is 4: heads are added to a model "
                                "dir's weights only (model.path; `export --format meta` writes one)")
