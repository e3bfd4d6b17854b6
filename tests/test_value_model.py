"""The separate value model (critic.model copy or a model dir) and what verifiable does with it: each critic loss
worked by hand, the tokenizer check, its checkpoint through path / s3:// / runs:/ / auto into a frozen verifiable,
the controls (shuffled weights, shuffled labels) and the near-miss pairs of val/token_credit."""
import math
import shutil

import pytest
import torch
from mlflow import MlflowClient

import weighted_mtp as wm
from wmtp.config import UserError, load_config
from wmtp.pipelines import Verifiable, critic_loss, near_miss_pairs, prompt_ids, shuffled_labels
from conftest import ROOT, TINY, tiny_config
from s3server import moto_s3  # noqa: F401  (fixture)
from test_hf import CONFIG, random_llama, write_hf
from test_s3_training import S3_ROOT, store  # noqa: F401  (fixture)

SEPARATE = ["critic.model=copy", "critic.head=mlp", "critic.features=hidden+logprob"]


def hand_batch():
    """Two answers to prompt [1, 2] (right: R 1, wrong: R 0) and one to prompt [1, 3] (right); answer tokens at
    positions 2..3, value states at 1..2 (the state before each answer token)."""
    tokens = torch.tensor([[1, 2, 5, 6], [1, 2, 5, 7], [1, 3, 5, 6]])
    labels = torch.tensor([[-100, -100, 5, 6], [-100, -100, 5, 7], [-100, -100, 5, 6]])
    return tokens, labels, torch.tensor([1.0, 0.0, 1.0])


class MC:  # Monte Carlo targets: every value state's target is R
    gamma, critic_lambda = 1.0, 1.0


def test_mse_loss_by_hand():
    # V at the value states 1, 2: row 0 (R 1): 0.5, 1.0 -> errors .25, 0; row 1 (R 0): 0.5, 0 -> .25, 0;
    # row 2 (R 1): 0, 1 -> 1, 0. Mean over 6 states: 1.5 / 6 = 0.25
    values = torch.tensor([[9.0, 0.5, 1.0, 9.0], [9.0, 0.5, 0.0, 9.0], [9.0, 0.0, 1.0, 9.0]])
    loss, targets, vmask = critic_loss("mse", hand_batch(), values, values, MC)
    assert vmask.tolist() == [[False, True, True, False]] * 3
    assert targets[:, 1].tolist() == [1.0, 0.0, 1.0]
    assert loss.item() == pytest.approx(0.25)


def test_bce_loss_by_hand():
    # score 0 everywhere: σ = ½, each of the 6 states costs ln 2; score ln 3 (σ = ¾) on row 0: −ln ¾ twice
    score = torch.zeros(3, 4)
    score[0] = math.log(3)
    loss, _, _ = critic_loss("bce", hand_batch(), score, torch.sigmoid(score), MC)
    assert loss.item() == pytest.approx((2 * -math.log(0.75) + 4 * math.log(2)) / 6)


def test_pairwise_loss_by_hand():
    # end-of-answer state = position 2. Prompt [1, 2]: right 2.0 vs wrong 0.5: −log σ(1.5); prompt [1, 3] has no
    # wrong answer: no pair. One pair: softplus(−1.5).
    score = torch.zeros(3, 4)
    score[:, 2] = torch.tensor([2.0, 0.5, -7.0])
    loss, _, _ = critic_loss("pairwise", hand_batch(), score, torch.sigmoid(score), MC)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.5)))
    assert prompt_ids(*hand_batch()[:2]).tolist() == [0, 0, 1]


def test_pairwise_without_pairs_is_one_line_error(tmp_path):
    cfg = tiny_config("critic", tmp_path, *SEPARATE, "critic.loss=pairwise", "data_sampling.correct_ratio=1.0")
    with pytest.raises(UserError, match=r"builtin:arith\+pyfunc\*4: critic.loss pairwise needs right and wrong "
                                        "answers to the same prompt, and no prompt has both"):
        wm.prepare(cfg, use_micro=True)


def test_a_separate_value_model_without_a_critic_checkpoint_is_one_line_error(tmp_path):
    cfg = tiny_config("verifiable", tmp_path, *SEPARATE, "critic.checkpoint=", "model.init_from=")
    with pytest.raises(UserError) as e:
        wm.prepare(cfg, use_micro=True)
    assert str(e.value) == ("critic.checkpoint: verifiable with critic.model=copy takes its value model from a "
                            "trained critic: a path, s3://, runs:/ or auto")


def test_shuffled_labels_permute_the_training_labels(tmp_path):
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    moved = [shuffled_labels(rewards, seed) for seed in range(10)]
    assert all(sorted(m.tolist()) == sorted(rewards.tolist()) for m in moved)
    assert sum(not torch.equal(m, rewards) for m in moved) >= 9
    assert torch.equal(shuffled_labels(rewards, 3), moved[3])  # seeded: every rank alike
    # the critic trains on the same examples with their labels permuted over the whole sample (data_sampling.seed)
    plain = wm.prepare(tiny_config("critic", tmp_path, *SEPARATE, "model.init_from="), use_micro=True)
    s = wm.prepare(tiny_config("critic", tmp_path, *SEPARATE, "critic.shuffle_labels=true", "model.init_from="),
                   use_micro=True)
    before = torch.tensor([ex[2] for ex in plain.data.train])
    assert [ex[0] for ex in s.data.train] == [ex[0] for ex in plain.data.train]
    assert [ex[2] for ex in s.data.train] == shuffled_labels(before, s.cfg.data_sampling.seed).tolist()
    assert [ex[2] for ex in s.data.train] != before.tolist()


def test_weight_control_shuffled_moves_the_weights_across_the_batchs_answers():
    cfg = load_config(ROOT / "configs" / "verifiable" / "verifiable_local.yaml", [*TINY])
    shuffled_cfg = load_config(ROOT / "configs" / "verifiable" / "verifiable_local.yaml",
                               [*TINY, "training.weight_control=shuffled"])
    g = torch.Generator().manual_seed(0)
    values = torch.rand(4, 9, generator=g)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[:, 3:8] = True
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    _, plain = Verifiable(cfg, 3).token_weights(values, rewards, mask, 0.95, 0, update_ema=True)
    _, moved = Verifiable(shuffled_cfg, 3).token_weights(values, rewards, mask, 0.95, 0, update_ema=True)
    assert sorted(moved[mask].tolist()) == pytest.approx(sorted(plain[mask].tolist()))  # the batch's weights
    assert any(sorted(moved[b][mask[b]].tolist()) != pytest.approx(sorted(plain[b][mask[b]].tolist()))
               for b in range(4))  # some of them on other answers
    assert not torch.equal(moved, plain) and (moved[~mask] == 0).all()


def test_near_miss_pairs_find_the_first_wrong_token():
    ex = lambda ids, n_prompt, r: (ids, [-100] * n_prompt + ids[n_prompt:], r, {})
    examples = [ex([1, 9, 4, 2, 0], 2, 1.0), ex([1, 9, 4, 3, 0], 2, 0.0),   # 42 vs 43: position 3
                ex([1, 8, 5, 0], 2, 1.0), ex([1, 8, 6, 7, 0], 2, 0.0),     # 5 vs 67: position 2
                ex([1, 7, 5, 0], 2, 1.0), ex([1, 7, 5, 0, 0], 2, 0.0),     # differ only at the wrong's EOS: left out
                ex([1, 6, 5, 0], 2, 1.0)]                                  # no wrong answer: no pair
    pairs = near_miss_pairs(examples)
    assert [(r[0], w[0], j) for r, w, j in pairs] == [([1, 9, 4, 2, 0], [1, 9, 4, 3, 0], 3),
                                                      ([1, 8, 5, 0], [1, 8, 6, 7, 0], 2)]


def test_a_value_model_with_another_tokenizer_is_refused(tmp_path):
    policy = write_hf(tmp_path / "policy", CONFIG, random_llama(CONFIG))
    small = {**CONFIG, "num_hidden_layers": 2}
    same = write_hf(tmp_path / "same", small, random_llama(small, seed=1))
    other = write_hf(tmp_path / "other", small, random_llama(small, seed=2))
    (other / "tokenizer_config.json").write_text('{"bos_token": "</s>", "eos_token": "<s>"}')  # BOS/EOS swapped
    common = [f"model.path={policy}", "model.init_from=", "model.n_future_tokens=1", "critic.head=mlp"]
    s = wm.prepare(tiny_config("critic", tmp_path, *common, f"critic.model={same}"))
    assert len(s.model.trunk.layers) == 2 and s.model.head[0].in_features == 32  # the smaller model, its own dim
    with pytest.raises(UserError, match=rf"critic.model: the tokenizer of {other} differs from the policy's "
                                        rf"\({policy}\): BOS/EOS \(256, 257\) != \(257, 256\)"):
        wm.prepare(tiny_config("critic", tmp_path, *common, f"critic.model={other}"))


def test_a_separate_critic_round_trips_into_a_frozen_verifiable(moto_s3, store, tmp_path):
    """The critic's checkpoint through a path, s3://, runs:/ and auto: at step 0 verifiable's policy is the warm-up's
    bit for bit and its value model the critic's, frozen and in eval mode."""
    s3 = f"mlflow.s3_artifacts={S3_ROOT}"
    warm = wm.train(tiny_config("baseline", tmp_path, s3, "model.init_from="), use_micro=True)
    warm_path = tmp_path / "ckpt" / "baseline-mtp" / warm["run_id"] / "checkpoint_final.pt"
    critic = wm.train(tiny_config("critic", tmp_path, s3, *SEPARATE, f"model.init_from={warm_path}"), use_micro=True)
    critic_dir = tmp_path / "ckpt" / "critic-pretrain" / critic["run_id"]
    warm_state = torch.load(warm_path, weights_only=False)["model"]
    critic_state = torch.load(critic_dir / "checkpoint_best.pt", weights_only=False)["model"]
    assert "head.0.weight" in critic_state and "trunk.extra_heads.0.attention.wq.weight" not in critic_state
    for k in warm_state:  # a frozen copy of the warm-up: its trunk is the warm-up's, untouched
        if not k.startswith(("extra_heads.", "value_head.")):
            assert torch.equal(critic_state[f"trunk.{k}"], warm_state[k]), k
    artifact_uri = MlflowClient(store).get_run(critic["run_id"]).info.artifact_uri
    specs = [str(critic_dir / "checkpoint_best.pt"), f"{artifact_uri}/checkpoints/checkpoint_best.pt",
             f"runs:/{critic['run_id']}/checkpoints/checkpoint_best.pt", "auto"]
    for i, spec in enumerate(specs):
        if i == 1:  # from here on the critic can only come from S3
            shutil.rmtree(critic_dir)
        s = wm.prepare(tiny_config("verifiable", tmp_path / str(i), s3, *SEPARATE, f"model.init_from={warm_path}",
                                   f"critic.checkpoint={spec}"), use_micro=True)
        policy, value = s.model.state_dict(), s.pipeline.value_model.state_dict()
        assert sorted(policy) == sorted(warm_state) and sorted(value) == sorted(critic_state), spec
        assert all(torch.equal(policy[k], warm_state[k]) for k in warm_state), spec
        assert all(torch.equal(value[k], critic_state[k]) for k in critic_state), spec
        assert not s.pipeline.value_model.training
        assert not any(p.requires_grad for p in s.pipeline.value_model.parameters())
        assert all(p.requires_grad for p in s.model.parameters())  # no value head on the policy: all of it trains
