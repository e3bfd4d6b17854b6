"""The Meta MTP layout: strict save/load, head shapes, RoPE convention, memory-efficient CE == naive, LoRA."""
import json

import pytest
import torch
import torch.nn.functional as F

from wmtp.config import ROOT, UserError, load_config
from wmtp.model import MTPTransformer, ModelArgs, ValueModel, apply_lora, apply_rope, generate, init_parts, rope_angles
from wmtp.memplan import config_plans, parameter_counts
from wmtp.pretrained import (ByteTokenizer, build_model, load_state, model_args_from_meta, pretrained_args,
                             save_byte_tokenizer, save_hf, save_meta)
import weights as W
from conftest import load_meta_weights

ARGS = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, n_future_tokens=3)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MTPTransformer(ARGS, **kw)


def test_layout_and_shapes():
    model = tiny_model()
    keys = model.state_dict().keys()
    assert len(model.layers) == 2 and len(model.extra_heads) == 2    # n_layers - H + 1 = 2: one trunk block + head 0
    for key in ["tok_embeddings.weight", "layers.1.attention.wq.weight", "layers.0.feed_forward.w3.weight",
                "extra_heads.1.attention_norm.weight", "extra_heads.0.ffn_norm.weight", "norm.weight", "output.weight"]:
        assert key in keys
    assert model.layers[0].attention.wk.weight.shape == (2 * 8, 32)   # GQA: n_kv_heads * head_dim
    assert model.logits(torch.randint(0, 50, (2, 7))).shape == (2, 7, 3, 50)
    tokens, targets = torch.randint(0, 50, (2, 7)), torch.zeros(2, 7, 3, dtype=torch.long)
    loss, ce, values = tiny_model(value_head=True)(tokens, targets, values=True)
    assert loss.shape == () and ce.shape == (2, 7, 3) and values.shape == (2, 7)


def test_meta_format_round_trip_is_strict_and_exact(tmp_path):
    model = tiny_model().eval()
    save_meta(model, tmp_path)
    assert json.loads((tmp_path / "params.json").read_text())["n_future_tokens"] == 3
    loaded = MTPTransformer(model_args_from_meta(tmp_path)).eval()
    load_meta_weights(loaded, tmp_path)
    tokens = torch.randint(0, 50, (2, 9))
    assert torch.equal(model.logits(tokens), loaded.logits(tokens))

    state = torch.load(tmp_path / "consolidated.pth")
    state.pop("extra_heads.1.ffn_norm.weight")
    torch.save(state, tmp_path / "consolidated.pth")
    with pytest.raises(UserError, match=r"consolidated.pth \(vs params.json\): does not match the model "
                                        r"\(missing \['extra_heads.1.ffn_norm.weight'\]\)"):
        load_meta_weights(MTPTransformer(ARGS), tmp_path)


def test_rope_matches_metas_complex_formulation():
    x = torch.randn(1, 5, 2, 8)
    cos, sin = rope_angles(8, 5, 10000.0, "cpu")
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    cis = torch.polar(torch.ones(5, 4), torch.outer(torch.arange(5).float(), freqs))
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(1, 5, 2, 4, 2)) * cis[None, :, None, :]).flatten(3)
    torch.testing.assert_close(apply_rope(x, cos, sin), expected)


def test_causal_right_padding_never_changes_a_sequence():
    model = tiny_model().eval()
    short = torch.randint(0, 50, (1, 5))
    padded = torch.cat([short, torch.full((1, 4), 7)], dim=1)
    torch.testing.assert_close(model.logits(short), model.logits(padded)[:, :5])


def test_memory_efficient_ce_equals_naive_logits_in_loss_and_gradients():
    tokens = torch.randint(0, 50, (3, 10))
    labels = tokens.clone()
    labels[:, :4] = -100
    targets = W.shift_targets(labels, 3)
    valid = targets != -100
    wts = torch.rand(3, 10, 3)
    efficient, naive = tiny_model(memory_efficient_loss=True), tiny_model(memory_efficient_loss=False)
    loss_fast, _, _ = efficient(tokens, targets, weigh=lambda values: (valid, wts))
    loss_fast.backward()
    logits = naive.logits(tokens)   # the reference: the whole [B,T,H,V] tensor at once
    ce_ref = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=-100, reduction="none")
    ce_ref = ce_ref.view(3, 10, 3)
    loss_ref = W.mtp_loss(ce_ref, valid, wts)
    loss_ref.backward()
    torch.testing.assert_close(loss_fast, loss_ref, atol=1e-5, rtol=1e-5)
    for (name, a), (_, b) in zip(efficient.named_parameters(), naive.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_lora_starts_at_the_base_trains_only_adapters_and_merges_for_export(tmp_path):
    model = tiny_model(value_head=True).eval()
    tokens = torch.randint(0, 50, (2, 6))
    before = model.logits(tokens)
    apply_lora(model, rank=4, alpha=8.0)
    torch.testing.assert_close(model.logits(tokens), before)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable[0] == "extra_heads.0.attention.wk.lora_a" and "value_head.weight" in trainable
    assert all(".lora_" in n or n.startswith("value_head.") for n in trainable)
    assert len(trainable) == 4 * 7 * 2 + 2              # 4 blocks x 7 projections x (A, B) + value head
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_b" in n:
                p.fill_(0.01)
    changed = model.logits(tokens)
    save_meta(model, tmp_path)
    plain = MTPTransformer(ARGS).eval()
    load_meta_weights(plain, tmp_path)
    torch.testing.assert_close(plain.logits(tokens), changed, atol=1e-5, rtol=1e-5)


def test_load_state_rejects_another_model_size():
    big = MTPTransformer(ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=50, multiple_of=16, n_future_tokens=3))
    with pytest.raises(UserError, match=r"ckpt.pt: does not match the model "
                                        r"\(shape \['tok_embeddings.weight \(50, 64\) != \(50, 32\)'"):
        load_state(tiny_model(), big.state_dict(), "ckpt.pt")


def test_micro_model_has_a_shared_trunk():
    cfg = load_config(ROOT / "configs/baseline/baseline_local.yaml")
    tok, model = build_model(cfg, use_micro=True, value_head=False)
    assert isinstance(tok, ByteTokenizer) and model.args.vocab_size == 259
    assert len(model.layers) - 1 == 2 and len(model.extra_heads) == 3


def frozen_example():
    """The seeded model, batch and weights that the worked values below were computed on, with the code before the
    forward became methods (MTPTransformer.forward's six modes, issue 33)."""
    torch.manual_seed(0)
    model = MTPTransformer(ARGS, value_head=True)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (2, 8), generator=g)
    labels = tokens.clone()
    labels[:, :3] = -100
    return model, tokens, labels, torch.rand(2, 8, 3, generator=g)


def test_the_model_methods_give_the_numbers_of_the_six_mode_forward():
    model, tokens, labels, wts = frozen_example()
    targets = W.shift_targets(labels, 3)
    with torch.no_grad():
        logits = model.logits(tokens)
        _, ce, values = model(tokens, targets, values=True)
    close = lambda got, want: torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)
    close(logits[1, -1, :, :4], [[-0.43095118, 0.08421044, 0.78904063, -0.19625694],
                                 [-0.23010056, -0.14941584, 0.63459378, -0.02938925],
                                 [-0.33852234, -0.04093857, 0.44805294, -0.23927370]])
    close(ce[0, 3], [3.6606023, 3.7482636, 3.1785736])
    close(values[0, :4], [-0.14055859, 0.07929604, 0.03677030, -0.46680212])
    loss, _, _ = model(tokens, targets, weigh=lambda v: (targets != -100, wts), values=True)
    loss.backward()
    close(loss, 2.1761734)
    close(model.output.weight.grad[5, :3], [-0.0029308468, 0.0036552257, -0.0069358214])
    assert model.value_head.weight.grad is None  # the policy loss never reaches the value head
    # the same numbers the long way: trunk, head blocks, shared norm and output, cross-entropy per head
    with torch.no_grad():
        cos, sin = model.rope(8, "cpu")
        states = model.head_states(model.trunk_states(tokens, cos, sin), cos, sin, 3)
        torch.testing.assert_close(torch.stack([model.unembed(s) for s in states], 2), logits, rtol=0, atol=0)
        long_ce = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), ignore_index=-100, reduction="none")
        torch.testing.assert_close(long_ce.view(2, 8, 3), ce, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.value(states[0]), values, rtol=0, atol=0)


def test_no_targets_run_head_0_for_the_value_alone_and_generation_keeps_its_tokens():
    model, tokens, labels, _ = frozen_example()
    with torch.no_grad():
        loss, ce, values = model(tokens, tokens.new_empty(2, 8, 0), values=True)  # the critic's value head
        assert loss.item() == 0 and ce.shape == (2, 8, 0)
        torch.testing.assert_close(values[0, :4], torch.tensor([-0.14055859, 0.07929604, 0.03677030, -0.46680212]))
        for speculative in (False, True):  # plain and speculative decoding's KV-cache paths over the same trunk
            assert generate(model, [[1, 2, 3], [4, 5]], eos_id=49, pad_id=0, max_new_tokens=6,
                            speculative=speculative) == [[39, 18, 42, 1, 25, 9], [27, 8, 21, 23, 26, 13]]
        torch.manual_seed(2)
        value_model = ValueModel(MTPTransformer(ARGS), head="mlp", logprob=True)
        torch.nn.init.normal_(value_model.head[-1].weight)
        torch.testing.assert_close(value_model(tokens, labels)[0][1, :4],
                                   torch.tensor([3.1815114, 0.9948337, 0.9375007, -4.6031713]))


def test_the_constructor_draws_its_weights_as_init_parts_does():
    torch.manual_seed(3)
    model = MTPTransformer(ARGS, value_head=True)
    torch.manual_seed(3)
    parts = {f"{name}.{k}": v for name, part in init_parts(ARGS, value_head=True) for k, v in part.state_dict().items()}
    state = model.state_dict()
    assert list(state) == list(parts)  # the same names in the same order (the optimizer's and checkpoints' order)
    assert all(torch.equal(state[k], parts[k]) for k in state)


def test_a_dir_with_both_config_json_and_params_json_is_planned_and_built_in_one_shape(tmp_path):
    """dir_format's one precedence: config.json (d=64, 4 blocks, one head) over a params.json of another shape
    (d=32, 2 blocks), for the memory plan (--dry-run) and the model training builds, whole or on the meta device.
    Re-headed to H=4: 3 trunk blocks + 4 heads = 7 blocks of 4·64² + 2·2·32·64 (wq, wo; wk, wv at 2 kv heads of 16)
    + 3·64·192 (SwiGLU, 170 rounded up to 32s) + 2·64 = 49,280 parameters, 2·259·64 embedding and output, 64 norm."""
    torch.manual_seed(0)
    save_hf(MTPTransformer(ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=259, multiple_of=32)),
            tmp_path)
    save_byte_tokenizer(tmp_path, ByteTokenizer())
    (tmp_path / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 259}))
    cfg = load_config(ROOT / "configs/baseline/baseline_local.yaml", [f"model.path={tmp_path}"])
    what, _ = config_plans(cfg, 1, use_micro=False)
    assert what.startswith("baseline, 7 blocks (4 heads), d=64, V=259, 0.4M parameters")
    assert parameter_counts(pretrained_args(tmp_path, 4), "baseline", 0) == (7 * 49_280 + 2 * 259 * 64 + 64, 0)
    for meta in (False, True):
        _, model = build_model(cfg, use_micro=False, value_head=False, meta=meta)
        assert (model.args.dim, model.args.n_layers, model.args.n_future_tokens) == (64, 7, 4)
        assert sum(p.numel() for p in model.parameters()) == 7 * 49_280 + 2 * 259 * 64 + 64 == 378_176
