"""The memory-efficient MTP loss (HeadsCrossEntropy: each head's unembedding computed once, its gradient taken in the
forward pass) gives the naive path's loss and gradients for every pipeline: with padding, with a head that has no
target, under LoRA, under bf16 autocast, under 2-process DDP, and over a 20-step training curve.

Tolerance: fp32 on the CPU, loss and every gradient within atol 1e-6 + rtol 1e-5 of the naive path's (the two
differ only in the order of float sums); bf16 autocast within 2e-2 (bf16 has an 8-bit mantissa)."""
import contextlib
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import weighted_mtp as wm
from wmtp.config import load_config
from wmtp.model import MTPTransformer
from wmtp.pretrained import ByteTokenizer, build_model
from wmtp.data import collate
from wmtp.parallel import Meter
from wmtp.pipelines import PIPELINE_TYPES
import weights as W
from conftest import ROOT, TINY

VALUE_HEAD = {"baseline": False, "critic": True, "verifiable": True, "rho1": False}
TOL = {"atol": 1e-6, "rtol": 1e-5}


def test_mtp_scale_worked_values_and_the_identity_with_mtp_loss():
    # B=1, T=3, H=3: head 0 has targets at t=0,1 (weights 2, 4), head 1 at t=0 (weight 3), head 2 none.
    valid = torch.tensor([[[1, 1, 0], [1, 0, 0], [0, 0, 0]]], dtype=torch.bool)
    weights = torch.tensor([[[2.0, 3.0, 9.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0]]])
    scale = W.mtp_scale(valid, weights)
    # head 0: w / n_0 / n_heads = 2/2/2, 4/2/2; head 1: 3/1/2; head 2 masked: 0. loss = ((2+12)/2 + 6/1) / 2
    assert scale.tolist() == [[[0.5, 1.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]
    ce = torch.tensor([[[1.0, 2.0, 5.0], [3.0, 7.0, 5.0], [float("inf"), 1.0, 5.0]]])
    assert (scale * torch.where(valid, ce, 0)).sum().item() == W.mtp_loss(ce, valid, weights).item() == 6.5
    assert W.mtp_scale(valid).tolist() == [[[0.25, 0.5, 0.0], [0.25, 0.0, 0.0], [0.0, 0.0, 0.0]]]
    assert W.mtp_scale(torch.zeros(2, 3, 2, dtype=torch.bool)).abs().sum().item() == 0.0
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        valid = torch.rand(3, 5, 4, generator=g) < 0.4
        weights, ce = torch.rand(3, 5, 4, generator=g), torch.rand(3, 5, 4, generator=g) * 5
        torch.testing.assert_close((W.mtp_scale(valid, weights) * ce).sum(), W.mtp_loss(ce, valid, weights), **TOL)


def batch(masked_head):
    """Rows of different lengths, right-padded (collate), prompts -100, rewards alternating. masked_head: every
    response sits at positions 1-2, so head 2 (H=3, target t+3) has no target anywhere."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for i, n in enumerate([3] * 4 if masked_head else [14, 9, 11, 6]):
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        prompt = 1 if masked_head else 3
        rows.append((ids, [-100] * prompt + ids[prompt:], float(i % 2 == 0), {}))
    return collate(rows, ByteTokenizer.pad_id, torch.device("cpu"))


def trainer(pipeline, *overrides):
    """(pipeline object, model): the tiny micro model as prepare() sets it up (critic: only the value head
    trains), naive path; rho1's reference another random model."""
    cfg = load_config(ROOT / "configs" / pipeline / f"{pipeline}_local.yaml",
                         [*TINY, "model.memory_efficient_loss=false", "training.policy_on_incorrect=false", *overrides])
    _, model = build_model(cfg, True, VALUE_HEAD[pipeline])
    with torch.no_grad():  # LoRA's B starts at 0, which would leave every A gradient 0: give them something to say
        for name, p in model.named_parameters():
            if ".lora_b" in name:
                p.normal_(0, 0.05)
    pipe = PIPELINE_TYPES[pipeline](cfg, model.args.n_future_tokens)
    if pipeline == "critic":
        pipe.attach(model, None, None, torch.device("cpu"))
    if pipeline == "rho1":  # another model, so that the excess loss (and the top-k) is not trivial
        torch.manual_seed(7)
        pipe.reference = MTPTransformer(model.args).requires_grad_(False).eval()
    return pipe, model


def loss_and_grads(pipe, model, data, memory_efficient, autocast=contextlib.nullcontext, wrap=lambda m: m):
    """(loss, {name: grad}, metrics) of one pipeline loss on a copy of model (wrap: e.g. in DDP)."""
    model, pipe = copy.deepcopy(model), copy.copy(pipe)  # the same weights, and each its own EMA state
    model.memory_efficient_loss = memory_efficient
    meter = Meter(torch.device("cpu"))
    wrapped = wrap(model)  # held until backward: a DDP object that is gone takes its gradient hooks along
    with autocast():
        loss = pipe.loss(wrapped, data, meter, 1)  # step 1: a logged step (TINY: log_interval 2)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, meter.reduce()


@pytest.mark.parametrize("masked_head", [False, True], ids=["padding", "masked-head"])
@pytest.mark.parametrize("pipeline", ["baseline", "critic", "verifiable", "rho1"])
def test_loss_and_every_gradient_equal_the_naive_path(pipeline, masked_head):
    pipe, model = trainer(pipeline)
    data = batch(masked_head)
    loss, grads, metrics = loss_and_grads(pipe, model, data, True)
    ref_loss, ref_grads, ref_metrics = loss_and_grads(pipe, model, data, False)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys() and len(grads) == {"critic": 2, "verifiable": 41}.get(pipeline, 39)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-5, abs=1e-6), name
    if masked_head:
        assert metrics["train/head_1_loss"] > 0 and "train/head_2_loss" not in metrics  # no target: no mean
    if pipeline != "critic":
        assert grads["output.weight"].abs().sum() > 0 and loss > 0


def test_rho1_selection_reads_each_heads_own_ce():
    """The top-k mask passed to the loss is what topk_weights gives on all heads at once (a check that the per-head
    call and the excess alignment are right): the loss equals mtp_loss over the selection made from the naive CE."""
    pipe, model = trainer("rho1")
    data = batch(False)
    loss, _, _ = loss_and_grads(pipe, model, data, True)
    tokens, labels, _ = data
    targets = W.shift_targets(labels, 3)
    with torch.no_grad():
        _, ce, _ = model(tokens, targets)
        _, ce_ref, _ = pipe.reference(tokens, W.shift_targets(labels, 1))
        excess = W.excess_loss(ce, W.reference_ce_to_heads(ce_ref[..., 0], 3))
        w = W.topk_weights(excess, targets != -100, pipe.t.k_percent)
    assert 0 < (w > 0).sum() < (targets != -100).sum()
    torch.testing.assert_close(loss, W.mtp_loss(ce, (targets != -100) & (w > 0)), **TOL)


def test_rho1_against_a_copy_of_itself_ties_alike():
    """rho1's default reference is a frozen copy of the starting policy: head 0's excess loss is then 0 everywhere
    and its top-k all ties (lower index first). Both paths must see exactly 0, hence select the same tokens."""
    pipe, model = trainer("rho1")
    results = {}
    for memory_efficient in (True, False):
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        reference.memory_efficient_loss = memory_efficient
        ref_pipe = copy.copy(pipe)
        ref_pipe.reference = reference
        results[memory_efficient] = loss_and_grads(ref_pipe, model, batch(False), memory_efficient)
    (loss, grads, metrics), (ref_loss, ref_grads, ref_metrics) = results[True], results[False]
    torch.testing.assert_close(loss, ref_loss, **TOL)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)
    assert metrics["train/weight_sparsity"] == ref_metrics["train/weight_sparsity"] > 0


@pytest.mark.parametrize("pipeline", ["baseline", "verifiable"])
def test_lora_equal_gradients_and_no_output_weight_gradient(pipeline):
    pipe, model = trainer(pipeline, "model.lora.rank=2")
    assert not model.output.weight.requires_grad
    loss, grads, _ = loss_and_grads(pipe, model, batch(False), True)
    ref_loss, ref_grads, _ = loss_and_grads(pipe, model, batch(False), False)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert grads.keys() == ref_grads.keys() and all(".lora_" in n or n.startswith("value_head") for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=name)


def test_bf16_autocast_matches_the_naive_path():
    """CPU autocast stands in for CUDA's: the same code path (matmuls in bf16, softmax and CE in fp32)."""
    pipe, model = trainer("verifiable")
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    loss, grads, _ = loss_and_grads(pipe, model, batch(False), True, bf16)
    ref_loss, ref_grads, _ = loss_and_grads(pipe, model, batch(False), False, bf16)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    for name in grads:
        scale = ref_grads[name].abs().max().clamp(min=1e-6)
        torch.testing.assert_close(grads[name] / scale, ref_grads[name] / scale, atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.parametrize("pipeline", ["baseline", "verifiable", "rho1"])
def test_twenty_step_training_curve_matches_the_naive_one(pipeline):
    pipe, model = trainer(pipeline)
    batches = [batch(i % 5 == 4) for i in range(20)]

    def curve(memory_efficient):
        m, c = copy.deepcopy(model), copy.copy(pipe)
        m.memory_efficient_loss = memory_efficient
        params = [p for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=3e-3, fused=True)
        losses = []
        for step in range(20):
            meter = Meter(torch.device("cpu"))
            assert wm.train_step(c, m, optimizer, params, [batches[step]], meter, step).tolist() == [0.0, 0.0]
            losses.append(meter.reduce()["train/loss"])
        return losses, m.state_dict()
    losses, state = curve(True)
    ref_losses, ref_state = curve(False)
    assert losses == pytest.approx(ref_losses, rel=1e-5) and losses[-1] < 0.7 * losses[0]
    # AdamW divides by sqrt(v): a gradient near 0 turns float noise into lr-sized steps, so the weights after 20
    # steps agree to 1e-4 (measured: <= 2e-5), 1/600 of the most any weight can move (20 steps x lr 3e-3)
    for key in state:
        torch.testing.assert_close(state[key], ref_state[key], atol=1e-4, rtol=0, msg=key)


DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import test_heads as th, weighted_mtp as wm
dist.init_process_group("gloo")
rank = dist.get_rank()
out = {{}}
for pipeline in ("baseline", "critic", "verifiable", "rho1"):
    pipe, model = th.trainer(pipeline)
    tokens, labels, rewards = th.batch(False)
    mine = (tokens[rank::2], labels[rank::2], rewards[rank::2])  # each rank its own rows
    ddp = lambda m: torch.nn.parallel.DistributedDataParallel(m, broadcast_buffers=False)
    for memory_efficient in (True, False):
        out[pipeline, memory_efficient] = th.loss_and_grads(pipe, model, mine, memory_efficient, wrap=ddp)[:2]
    out[pipeline, "local"] = th.loss_and_grads(pipe, model, mine, True)[:2]  # no DDP: this rank's gradient alone
torch.save(out, os.path.join({out!r}, f"rank{{rank}}.pt"))
dist.destroy_process_group()
wm.exit_worker(0)  # as the CLI's torchrun workers leave: a gloo thread can abort Python's finalisation after DDP
"""


def test_two_process_ddp_gradients_equal_the_naive_paths_and_reach_the_all_reduce(tmp_path):
    script = tmp_path / "ddp_heads.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    for pipeline in ("baseline", "critic", "verifiable", "rho1"):
        for rank in ranks:
            (loss, grads), (ref_loss, ref_grads) = rank[pipeline, True], rank[pipeline, False]
            torch.testing.assert_close(loss, ref_loss, **TOL)
            for name in ref_grads:
                torch.testing.assert_close(grads[name], ref_grads[name], **TOL, msg=(pipeline, name))
        # DDP averaged them: both ranks hold the mean of the two local gradients (so the hooks saw every one)
        local = [rank[pipeline, "local"][1] for rank in ranks]
        for name in local[0]:
            mean = (local[0][name] + local[1][name]) / 2
            assert not torch.allclose(local[0][name], local[1][name]), (pipeline, name)
            for rank in ranks:
                torch.testing.assert_close(rank[pipeline, True][1][name], mean, **TOL,
                                           msg=lambda m: f"{pipeline} {name}: {m}")
