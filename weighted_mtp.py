"""
weighted-mtp: train multi-token-prediction (MTP) language models in which every token's loss can be weighted.

    python -m weighted_mtp train --config configs/verifiable/verifiable_local.yaml --use-micro-model
    torchrun --standalone --nproc_per_node=gpu -m weighted_mtp train --config configs/verifiable/verifiable.yaml

One file, read top to bottom: config, tokenizers, model, data, distributed helpers, tracking, the four
pipelines' losses, the training loop, the CLI. The weighting math itself lives in weights.py, checkpoint
files and uploads in s3ckpt.py.
"""
import argparse
import contextlib
import dataclasses
import datetime
import difflib
import functools
import json
import logging
import math
import os
import queue
import random
import re
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml

import s3ckpt
import weights as W

ROOT = Path(__file__).resolve().parent
PIPELINES = ("baseline", "critic", "verifiable", "rho1")
RUN_NAMES = {"baseline": "baseline-mtp", "critic": "critic-pretrain", "verifiable": "verifiable-wmtp", "rho1": "rho1-wmtp"}
SECRET_KEY = re.compile(r"password|secret|token|access_key|credential", re.IGNORECASE)
log = logging.getLogger("weighted_mtp")


class UserError(Exception):
    """Bad input (config, data, checkpoint): reported as one line, exit code 2, before any training."""


# -----------------------------------------------------------------------------
# config: defaults.yaml <- pipeline file <- --override a.b=c, every key checked against the defaults


def read_yaml(path):
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e})")
    except ValueError as e:  # PyYAML's constructors, e.g. an impossible date such as 2001-13-45
        raise UserError(f"{path}: invalid YAML ({e})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of config sections")
    return data


def dotted_keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from dotted_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def checked_value(value, default, key, source):
    """The value, coerced to the default's type; a wrong type is an error naming the key."""
    kind = type(default)
    if kind is str and value is None:
        return ""
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError):  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise UserError(f"{source}: '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r}")


def merge(base, update, source, defaults, prefix=""):
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            close = difflib.get_close_matches(dotted, list(dotted_keys(DEFAULTS)), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{source}: unknown key {dotted!r}{hint}")
        if isinstance(defaults[key], dict) and defaults[key]:
            if not isinstance(value, dict):
                raise UserError(f"{source}: '{dotted}' must be a mapping, got {value!r}")
            merge(base[key], value, source, defaults[key], dotted + ".")
        else:
            base[key] = checked_value(value, defaults[key], dotted, source)


def parse_override(text):
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UserError(f"--override {text}: expected key=value, e.g. training.learning_rate=1e-4")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except (yaml.YAMLError, ValueError):  # not YAML (or an impossible date): the string it is
        value = raw
    tree = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


RANGES = [  # (key, ok, what it must be)
    ("experiment.pipeline", lambda v: v in PIPELINES, "one of " + ", ".join(PIPELINES)),
    ("model.n_future_tokens", lambda v: v >= 1, ">= 1"),
    ("model.lora.rank", lambda v: v >= 0, ">= 0"),
    ("dataset.max_length", lambda v: v >= 8, ">= 8"),
    ("dataset.on_overlong", lambda v: v in ("truncate", "skip", "error"), "truncate, skip or error"),
    ("data_sampling.n_samples", lambda v: v >= 0, ">= 0"),
    ("data_sampling.correct_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("data_sampling.val_samples", lambda v: v >= 1, ">= 1"),
    ("training.max_steps", lambda v: v >= 0, ">= 0"),
    ("training.n_epochs", lambda v: v >= 1, ">= 1"),
    ("training.batch_size", lambda v: v >= 1, ">= 1"),
    ("training.gradient_accumulation_steps", lambda v: v >= 1, ">= 1"),
    ("training.learning_rate", lambda v: v > 0, "> 0"),
    ("training.weight_decay", lambda v: v >= 0, ">= 0"),
    ("model.lora.alpha", lambda v: v > 0, "> 0"),
    ("model.micro.norm_eps", lambda v: v > 0, "> 0"),
    ("model.micro.dim", lambda v: v >= 2, ">= 2"),
    ("model.micro.n_trunk_layers", lambda v: v >= 1, ">= 1 (a shared trunk)"),
    ("model.micro.n_heads", lambda v: v >= 1, ">= 1"),
    ("model.micro.n_kv_heads", lambda v: v >= 1, ">= 1"),
    ("model.micro.multiple_of", lambda v: v >= 1, ">= 1"),
    ("training.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("training.warmup_steps", lambda v: v >= 0, ">= 0"),
    ("training.max_grad_norm", lambda v: v > 0, "> 0"),
    ("training.log_interval", lambda v: v >= 1, ">= 1"),
    ("training.eval_interval", lambda v: v >= 0, ">= 0"),
    ("training.max_skipped_steps", lambda v: v >= 1, ">= 1"),
    ("training.gamma", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("training.td_lambda", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("training.critic_lambda", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("training.beta", lambda v: v > 0, "> 0"),
    ("training.weight_clip_min", lambda v: v >= 0, ">= 0"),
    ("training.td_ema_momentum", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("training.td_ema_warmup_steps", lambda v: v >= 0, ">= 0"),
    ("training.value_coef", lambda v: v >= 0, ">= 0"),
    ("training.k_percent", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("checkpoint.save_every", lambda v: v >= 0, ">= 0"),
    ("checkpoint.save_total_limit", lambda v: v >= 0, ">= 0"),
]


def get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def load_config(path, overrides=()):
    """defaults.yaml <- the pipeline file <- overrides; raises UserError naming the file and key on bad input."""
    cfg = json.loads(json.dumps(DEFAULTS))
    merge(cfg, read_yaml(path), str(path), DEFAULTS)
    for text in overrides:
        merge(cfg, parse_override(text), f"--override {text}", DEFAULTS)
    for key, ok, what in RANGES:
        if not ok(get(cfg, key)):
            raise UserError(f"{path}: '{key}' must be {what}, got {get(cfg, key)!r}")
    t, micro = cfg["training"], cfg["model"]["micro"]
    if micro["dim"] % (2 * micro["n_heads"]) or micro["n_heads"] % micro["n_kv_heads"]:
        raise UserError(f"{path}: 'model.micro.dim' ({micro['dim']}) must split into 'model.micro.n_heads' "
                        f"({micro['n_heads']}) heads of even size, and n_heads be a multiple of n_kv_heads ({micro['n_kv_heads']})")
    if t["weight_clip_min"] >= t["weight_clip_max"]:
        raise UserError(f"{path}: 'training.weight_clip_min' ({t['weight_clip_min']}) must be < "
                        f"'training.weight_clip_max' ({t['weight_clip_max']})")
    return cfg


DEFAULTS = read_yaml(ROOT / "configs" / "defaults.yaml")


def flatten(tree, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1}; lists as JSON; keys that look secret are dropped."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if SECRET_KEY.search(str(key)):
            continue
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


# -----------------------------------------------------------------------------
# tokenizers


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus BOS/EOS/PAD: needs no vocabulary file, so the micro model runs anywhere."""
    bos_id, eos_id, pad_id, vocab_size = 256, 257, 258, 259

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """Meta's tokenizer.model; sentencepiece is an optional extra, imported only here."""

    def __init__(self, path):
        try:
            import sentencepiece
        except ImportError:
            raise UserError(f"model.tokenizer: {path} needs the sentencepiece package (pip install sentencepiece)")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id, self.vocab_size = self.sp.bos_id(), self.sp.eos_id(), self.sp.vocab_size()
        self.pad_id = self.eos_id  # pads sit after EOS and are masked out of every loss, so any id will do

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode(list(ids))


# -----------------------------------------------------------------------------
# model: Meta's MTP LLaMA layout (strict load of params.json + consolidated.pth)


@dataclasses.dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32  # trunk blocks + H head blocks
    n_heads: int = 32
    n_kv_heads: int = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    n_future_tokens: int = 1


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_angles(head_dim, length, theta, device):
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[2i], x[2i+1]) by angle pos·θ_i: Meta's interleaved convention, so its weights load as-is."""
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.n_heads, self.n_kv_heads = a.n_heads, a.n_kv_heads or a.n_heads
        self.head_dim = a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, a.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, a):
        super().__init__()
        hidden = int(2 * 4 * a.dim / 3)
        if a.ffn_dim_multiplier:
            hidden = int(a.ffn_dim_multiplier * hidden)
        hidden = a.multiple_of * math.ceil(hidden / a.multiple_of)
        self.w1 = nn.Linear(a.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.attention, self.feed_forward = Attention(a), FeedForward(a)
        self.attention_norm, self.ffn_norm = RMSNorm(a.dim, a.norm_eps), RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


def head_columns(valid, weights, k, ce_k):
    """Head k's (valid [B,T], weights [B,T] or None): column k of a [B,T,H] tensor, or what a function
    (k, ce_k) -> [B,T] makes of head k's detached CE ce_k [B,T] (rho1's per-head top-k)."""
    column = lambda x: x(k, ce_k) if callable(x) else None if x is None else x[..., k]
    return column(valid), column(weights)


class HeadsCrossEntropy(torch.autograd.Function):
    """loss = W.mtp_loss(ce, valid, weights), ce[b,t,k] = CE(x_k[b,t] @ weightᵀ, targets[b,t,k]) (0 where -100),
    each head's [B·T, V] logits computed once, its gradients taken right there and the logits freed:

        d loss / d logits_k = scale_k · (softmax(logits_k) − onehot(target_k)),   scale = W.mtp_scale(valid, weights)
        d loss / d x_k = (d loss / d logits_k) @ weight,   d loss / d weight = Σ_k (d loss / d logits_k)ᵀ @ x_k

    The loss is linear in ce with detached coefficients, so these are exact; head_weights(k, ce_k) -> (valid_k,
    weights_k) may read head k's own detached CE (rho1's top-k) but no other head's. backward only scales the
    stored gradients by its incoming one: what remains of a step's cost is one unembedding per head, as in the
    naive path (which also keeps every head's logits for backward). Memory: one head's logits at a time, plus one
    [V, d] and H [B, T, d] gradients. Under autocast the matmuls run in its dtype, softmax and CE in fp32."""

    @staticmethod
    def forward(ctx, weight, targets, head_weights, *xs):
        device = weight.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        need_weight, need_xs = ctx.needs_input_grad[0], ctx.needs_input_grad[3:]
        w = weight.to(dtype)
        grad_weight = torch.zeros(weight.shape, device=weight.device) if need_weight else None
        ces, losses, has, grad_xs = [], [], [], []
        with torch.autocast(device, enabled=False):  # the casts are explicit: matmuls in `dtype`, the rest in fp32
            for k, x in enumerate(xs):
                x2, target = x.flatten(0, 1).to(dtype), targets[..., k].flatten()
                logits = (x2 @ w.T).float()  # [N, V]
                known = target != -100
                label = torch.where(known, target, 0)[:, None]
                picked = logits.gather(1, label)[:, 0]
                top = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(top).exp_()  # in place, unnormalised: one [N, V] buffer per head
                total = probs.sum(dim=-1, keepdim=True)
                ce = torch.where(known, (top + total.log())[:, 0] - picked, 0.0)  # logsumexp - picked logit
                valid_k, weights_k = head_weights(k, ce.view(x.shape[:-1]))
                scale = W.mtp_scale(valid_k[..., None], None if weights_k is None else weights_k[..., None])
                scale = torch.where(known, scale.flatten().float(), 0.0)  # an ignored target has no gradient
                ces.append(ce.view(x.shape[:-1]))
                losses.append((scale * ce).sum())
                has.append(valid_k.bool().any())
                grad_xs.append(None)
                if need_weight or need_xs[k]:
                    grad = probs.mul_(scale[:, None] / total)  # scale · softmax, in place
                    grad = grad.scatter_add_(1, label, -scale[:, None]).to(dtype)  # − scale · onehot
                    if need_xs[k]:
                        grad_xs[-1] = (grad @ w).to(x.dtype).view_as(x)
                    if need_weight:
                        grad_weight.add_(grad.T @ x2)
                    del grad
                del logits, probs  # before the next head's
        n_heads = torch.stack(has).sum().clamp(min=1).float()  # mtp_loss: the mean over heads with a target
        grad_xs = [None if g is None else g / n_heads.to(g.dtype) for g in grad_xs]
        grad_weight = None if grad_weight is None else grad_weight.div_(n_heads).to(weight.dtype)
        ctx.save_for_backward(grad_weight, *grad_xs)
        ce = torch.stack(ces, dim=-1)
        ctx.mark_non_differentiable(ce)
        return torch.stack(losses).sum() / n_heads, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):  # ce is not differentiable: grad_ce is unused
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return scaled[0], None, None, *scaled[1:]


class MTPTransformer(nn.Module):
    """A shared trunk and H one-block heads; every head reads the trunk output; one shared norm and output.

    `layers` holds n_layers - H + 1 blocks (all but the last are the trunk, the last is head 0), `extra_heads`
    the other H - 1. Head k at position t predicts the token at t+1+k. The optional value head is
    Linear(dim, 1) on the final-normed hidden state of head 0, read detached: value losses train the value head
    only, never the policy.
    """

    def __init__(self, args, value_head=False, memory_efficient_loss=True):
        super().__init__()
        H = args.n_future_tokens
        if args.n_layers - H < 1:
            raise UserError(f"model: n_layers={args.n_layers} leaves no shared trunk block for {H} heads")
        self.args, self.memory_efficient_loss = args, memory_efficient_loss
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers - H + 1))
        self.extra_heads = nn.ModuleList(Block(args) for _ in range(H - 1))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.value_head = nn.Linear(args.dim, 1) if value_head else None

    def forward(self, tokens, targets=None, n_heads=None, values=False, weigh=None):
        """tokens [B,T] -> (logits [B,T,h,V], values) without targets; with targets [B,T,>=h] (-100 = none):
        (ce [B,T,h], values) without weigh, (loss, ce [B,T,h] detached, values) with it. h = n_heads, default H
        (a reference model or greedy decoding needs head 0 only); values [B,T] or None.

        weigh(values) -> (valid, weights) is called once, after the value head (its output detached, or None) and
        before any CE; loss = W.mtp_loss(ce, valid, weights). valid and weights (None = 1) are each a [B,T,h]
        tensor or a function (k, ce_k) -> [B,T] of head k's detached CE [B,T] (see heads_loss)."""
        h_count = n_heads or self.args.n_future_tokens
        cos, sin = rope_angles(self.args.dim // self.args.n_heads, tokens.shape[1], self.args.rope_theta, tokens.device)
        h = self.tok_embeddings(tokens)
        for layer in self.layers[:-1]:
            h = layer(h, cos, sin)
        states = [head(h, cos, sin) for head in [self.layers[-1], *self.extra_heads][:h_count]]
        vals = self.value_head(self.norm(states[0]).detach()).squeeze(-1).float() if values else None
        if targets is None:
            return torch.stack([self.output(self.norm(s)) for s in states], dim=2), vals
        wants_grad = torch.is_grad_enabled() and (states[0].requires_grad or self.output.weight.requires_grad)
        if weigh is None and self.memory_efficient_loss and not wants_grad:
            # no gradient wanted (evaluation, the critic's frozen trunk, rho1's reference): the loss path's own CE, so
            # that a policy and its frozen copy agree to the bit (rho1's excess loss starts at exactly 0, tied)
            return self.heads_loss(states, targets[..., :h_count], targets[..., :h_count] != -100, None)[1], vals
        if weigh is None:
            return torch.stack([self._ce(s, targets[..., k]) for k, s in enumerate(states)], dim=2), vals
        valid, weights = weigh(None if vals is None else vals.detach())
        return *self.heads_loss(states, targets[..., :h_count], valid, weights), vals

    def heads_loss(self, states, targets, valid, weights):
        """(loss = W.mtp_loss(ce, valid, weights), ce [B,T,h] detached) of the heads' states [B,T,d] x h.
        memory_efficient_loss: HeadsCrossEntropy, one head's logits alive at a time and each computed once (O(V + d)
        per token, Gloeckle et al.); else the naive reference, every head's logits kept for backward."""
        head_weights = lambda k, ce_k: head_columns(valid, weights, k, ce_k)
        if self.memory_efficient_loss:
            return HeadsCrossEntropy.apply(self.output.weight, targets, head_weights, *map(self.norm, states))
        ce = torch.stack([self._ce(s, targets[..., k]) for k, s in enumerate(states)], dim=2)
        cols = [head_weights(k, ce[..., k].detach()) for k in range(len(states))]
        weights = None if cols[0][1] is None else torch.stack([w for _, w in cols], dim=-1)
        return W.mtp_loss(ce, torch.stack([v for v, _ in cols], dim=-1), weights), ce.detach()

    def _ce(self, state, target):
        logits = self.output(self.norm(state)).float()
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none").view_as(target)


class LoRALinear(nn.Module):
    """y = x Wᵀ + (α/r)·(x Aᵀ) Bᵀ with W frozen; B starts at 0, so training starts from the base layer.

    The base weight keeps its name (`wq.weight`), so Meta checkpoints load into a LoRA model unchanged."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, device=base.weight.device) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.scale

    def merged_weight(self):
        return self.weight + self.scale * (self.lora_b @ self.lora_a).to(self.weight.dtype)


def apply_lora(model, rank, alpha):
    """Freeze everything but the value head; add rank-r adapters to every attention and FFN projection."""
    for p in model.parameters():
        p.requires_grad_(False)
    if model.value_head is not None:
        model.value_head.requires_grad_(True)
    for block in [*model.layers, *model.extra_heads]:
        for parent, names in ((block.attention, ("wq", "wk", "wv", "wo")), (block.feed_forward, ("w1", "w2", "w3"))):
            for name in names:
                setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))


def load_state(model, state, source, partial=False):
    """Load `state` into `model`, strictly but for value-head and LoRA keys (absent from policy checkpoints and
    Meta files, freshly initialised then) — and any key when `partial` (a LoRA run saves only what it trains);
    a mismatch is a UserError naming the source and the keys."""
    own = model.state_dict()
    optional = lambda k: partial or k.startswith("value_head.") or ".lora_" in k
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not optional(k)]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or missing or shapes:
        problems = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                    f"shape {shapes[:2]}" if shapes else ""]
        raise UserError(f"{source}: does not match the model ({'; '.join(p for p in problems if p)}) — another model size?")
    model.load_state_dict(state, strict=False)


def model_args_from_meta(model_dir):
    path = Path(model_dir) / "params.json"
    try:
        params = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})")
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in params.items() if k in known})


def load_meta_weights(model, model_dir):
    path = Path(model_dir) / "consolidated.pth"
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({e})")
    load_state(model, state, f"{path} (vs params.json)")


def save_meta(model, out_dir):
    """Write params.json + consolidated.pth in Meta's layout: LoRA merged in, value head left out."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            state[f"{name}.weight"] = module.merged_weight().detach().cpu()
    for key, value in model.state_dict().items():
        if not key.startswith("value_head.") and ".lora_" not in key:
            state.setdefault(key, value.cpu())
    tmp = out_dir / "consolidated.pth.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out_dir / "consolidated.pth")
    (out_dir / "params.json").write_text(json.dumps(dataclasses.asdict(model.args), indent=2))


def micro_args(cfg, vocab_size):
    m, H = cfg["model"]["micro"], cfg["model"]["n_future_tokens"]
    return ModelArgs(dim=m["dim"], n_layers=m["n_trunk_layers"] + H, n_heads=m["n_heads"], n_kv_heads=m["n_kv_heads"],
                     vocab_size=vocab_size, multiple_of=m["multiple_of"], norm_eps=m["norm_eps"],
                     rope_theta=m["rope_theta"], n_future_tokens=H)


def build_model(cfg, use_micro, value_head):
    """(tokenizer, model): the micro model (random init from training.seed, byte tokenizer) or a Meta-format
    directory, with LoRA adapters when model.lora.rank > 0 — built before any checkpoint loads into it."""
    mcfg = cfg["model"]
    torch.manual_seed(cfg["training"]["seed"])  # every rank builds the same initial weights
    if use_micro or not mcfg["path"]:
        tok = ByteTokenizer()
        model = MTPTransformer(micro_args(cfg, tok.vocab_size), value_head, mcfg["memory_efficient_loss"])
    else:
        tok, model = load_meta_model(mcfg, value_head)
    if mcfg["lora"]["rank"] > 0:
        apply_lora(model, mcfg["lora"]["rank"], mcfg["lora"]["alpha"])
    return tok, model


def load_meta_model(mcfg, value_head):
    tok_path = Path(mcfg["tokenizer"] or Path(mcfg["path"]) / "tokenizer.model")
    if not tok_path.exists():
        raise UserError(f"model.tokenizer: {tok_path} does not exist")
    tok = SentencePieceTokenizer(tok_path)
    model = MTPTransformer(model_args_from_meta(mcfg["path"]), value_head, mcfg["memory_efficient_loss"])
    load_meta_weights(model, mcfg["path"])
    return tok, model


# -----------------------------------------------------------------------------
# data: JSONL records {instruction, input?, output, is_correct?, task_id?, metadata?}, Alpaca template

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def render_prompt(record):
    template = ALPACA if record.get("input") else ALPACA_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def arith_records(split):
    """Two-digit additions, each once with its sum (is_correct) and once with a near miss (is_correct: false).
    The 10 000 problems are shuffled with a fixed seed: the first 1 000 are validation, the rest train."""
    rng = random.Random(1234)
    problems = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(problems)
    records = []
    for a, b in problems[:1000] if split == "validation" else problems[1000:]:
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        wrong = wrong if wrong >= 0 else a + b + 1
        for output, ok in ((str(a + b), True), (str(wrong), False)):
            records.append({"instruction": "Add the two numbers.", "input": f"{a}+{b}", "output": output,
                            "is_correct": ok, "task_id": f"arith-{a}-{b}", "metadata": {"difficulty": len(str(max(a, b)))}})
    return records


def check_arith(record, answer):
    a, b = record["input"].split("+")
    return answer.strip() == str(int(a) + int(b))


BUILTIN = {"arith": (arith_records, check_arith)}


def read_jsonl(path):
    """Records of a JSONL file; a bad line is a UserError naming file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})")
        except RecursionError:
            raise UserError(f"{path}:{number}: not valid JSON (nested too deeply)")
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object")
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise UserError(f"{path}:{number}: missing '{key}' (a string)")
        if not isinstance(record.get("input", ""), str) or not isinstance(record.get("is_correct", True), bool):
            raise UserError(f"{path}:{number}: 'input' must be a string and 'is_correct' a boolean")
        record["_source"] = f"{path}:{number}"
        records.append(record)
    return records


def load_records(spec, split):
    """(records, checker or None) for a JSONL path or builtin:<name>."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise UserError(f"dataset.{split}: unknown built-in dataset '{name}' (known: {', '.join(BUILTIN)})")
        make, checker = BUILTIN[name]
        return make(split), checker
    return read_jsonl(spec), None


def sample_records(records, n_samples, correct_ratio, seed):
    """round(n·ratio) correct and the rest incorrect records (n = n_samples or all), drawn with a fixed seed."""
    rng = random.Random(seed)
    correct = [r for r in records if r.get("is_correct", True)]
    incorrect = [r for r in records if not r.get("is_correct", True)]
    n = n_samples or len(records)
    n_correct = min(round(n * correct_ratio), len(correct))
    n_incorrect = min(n - round(n * correct_ratio), len(incorrect))
    chosen = rng.sample(correct, n_correct) + rng.sample(incorrect, n_incorrect)
    rng.shuffle(chosen)
    return chosen


def encode_records(records, tok, max_length, on_overlong, source):
    """[(ids, labels, reward, record)]: [BOS] prompt response [EOS], labels -100 on BOS and prompt."""
    examples, truncated = [], 0
    for record in records:
        prompt = [tok.bos_id] + tok.encode(render_prompt(record))
        response = tok.encode(record["output"]) + [tok.eos_id]
        ids, labels = prompt + response, [-100] * len(prompt) + response
        if len(ids) > max_length:
            where = record.get("_source", source)
            if on_overlong == "error":
                raise UserError(f"{where}: sequence of {len(ids)} tokens exceeds dataset.max_length={max_length}")
            truncated += 1
            if on_overlong == "skip" or len(prompt) >= max_length:
                continue  # nothing of the response would be left to learn from
            ids, labels = ids[:max_length], labels[:max_length]
        examples.append((ids, labels, float(record.get("is_correct", True)), record))
    if not examples:
        raise UserError(f"{source}: no examples left after sampling and dataset.max_length filtering")
    return examples, truncated


def collate(examples, pad_id, device):
    """Right-pad to the longest sequence of the batch: tokens, labels (-100 on pads), rewards [B]."""
    T = max(len(e[0]) for e in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (ids, lab, _, _) in enumerate(examples):
        tokens[i, :len(ids)], labels[i, :len(lab)] = torch.tensor(ids), torch.tensor(lab)
    rewards = torch.tensor([e[2] for e in examples])
    return tokens.to(device), labels.to(device), rewards.to(device)


@functools.lru_cache(maxsize=2)
def epoch_order(n, epoch, seed, rank, world):
    """This rank's indices for an epoch: one seeded permutation, cut to a multiple of world (drop_last, as
    DistributedSampler does), then every world-th index, so all ranks run the same number of batches."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return order[: n - n % world][rank::world]


# -----------------------------------------------------------------------------
# distributed


def setup_distributed(timeout_s):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python -m` is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


def all_reduce(t, op=None):
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def broadcast(obj):
    """Rank 0's Python object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Meter:
    """Token-weighted means across micro-batches and ranks: sums of (value·count, count) stay on the device, one
    all-reduce at log time turns them into means; mins and maxes reduce with MIN/MAX."""

    def __init__(self, device):
        self.device, self.sums, self.mins, self.maxs = device, {}, {}, {}

    def add(self, name, total, count):
        pair = torch.stack([torch.as_tensor(total, dtype=torch.float32, device=self.device).detach().reshape(()),
                            torch.as_tensor(count, dtype=torch.float32, device=self.device).reshape(())])
        self.sums[name] = self.sums[name] + pair if name in self.sums else pair

    def extreme(self, name, value, fn):
        table = self.mins if fn is torch.minimum else self.maxs
        value = value.detach().float().reshape(())
        table[name] = fn(table[name], value) if name in table else value

    def merge(self, other, keep):
        """Adds other's sums and extremes where keep (a 0/1 device tensor) is 1; where it is 0 they count as nothing."""
        for name, pair in other.sums.items():
            kept = torch.nan_to_num(pair) * keep
            self.add(name, kept[0], kept[1])
        for table, fn, nothing in ((other.mins, torch.minimum, math.inf), (other.maxs, torch.maximum, -math.inf)):
            for name, value in table.items():
                self.extreme(name, torch.where(keep > 0, value, nothing), fn)

    def reduce(self):
        out = {}
        if self.sums:
            names = sorted(self.sums)
            sums = all_reduce(torch.stack([self.sums[n] for n in names]))
            out.update({n: total / count for n, (total, count) in zip(names, sums.tolist()) if count > 0})
        for table, op in ((self.mins, dist.ReduceOp.MIN), (self.maxs, dist.ReduceOp.MAX)):
            if table:
                names = sorted(table)
                values = all_reduce(torch.stack([table[n] for n in names]), op)
                out.update({n: v for n, v in zip(names, values.tolist()) if math.isfinite(v)})
        self.sums, self.mins, self.maxs = {}, {}, {}
        return out


# -----------------------------------------------------------------------------
# tracking (rank 0 only): experiment, run, params, metrics off the training thread, artifacts


def tracking_uri(cfg):
    return cfg["mlflow"]["tracking_uri"] or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def experiment_artifact_location(cfg, uri):
    """Where a self-created experiment keeps artifacts: mlflow.s3_artifacts when set; a tracking server decides
    for itself; a local sqlite store gets a mlartifacts/ folder beside its database (not the CWD)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg["mlflow"]["experiment"]).strip("-")
    if cfg["mlflow"]["s3_artifacts"]:
        return None if uri.startswith("http") else cfg["mlflow"]["s3_artifacts"].rstrip("/") + "/" + slug
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / slug).as_uri()
    return None


def newest_finished_run(client, experiment, pipeline):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.pipeline = '{pipeline}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def resolve_uri(cfg, uri, pipeline_for_auto, artifact, cache_dir):
    """A checkpoint path, s3:// or runs:/ URI, or `auto` (the newest finished run of a pipeline) -> (local file,
    the URI it was downloaded from or None)."""
    uri_tracking = tracking_uri(cfg)
    if uri == "auto":
        from mlflow import MlflowClient
        run = newest_finished_run(MlflowClient(uri_tracking), cfg["mlflow"]["experiment"], pipeline_for_auto)
        if run is None:
            raise UserError(f"no finished '{RUN_NAMES[pipeline_for_auto]}' run in experiment "
                            f"'{cfg['mlflow']['experiment']}': run the {pipeline_for_auto} pipeline first")
        uri = f"runs:/{run.info.run_id}/{artifact}"
    try:
        path = s3ckpt.resolve_checkpoint(uri, cache_dir, tracking_uri=uri_tracking)
    except s3ckpt.CheckpointError as e:
        raise UserError(str(e))
    return str(path), (uri if uri.startswith(("s3://", "runs:/")) else None)


def on_this_node(cfg, found, cache_dir):
    """Rank 0's (path, URI) of a checkpoint -> a file on this rank's node: rank 0's path where this node sees it (one
    machine, a shared disk), else this node's own download of the URI, by its local rank 0 while the others wait."""
    path, uri = broadcast(found)
    missing = bool(path) and not Path(path).exists()
    if missing and not uri:
        raise UserError(f"{path}: on rank 0's node only and in no run's artifacts: give every node one checkpoint.dir")
    node_first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if missing and node_first:
        path = resolve_uri(cfg, uri, None, None, cache_dir)[0]
    if dist.is_initialized():
        dist.barrier()
    if missing and not node_first:
        path = resolve_uri(cfg, uri, None, None, cache_dir)[0]  # in the node's cache by now
    return path


class MetricLogger:
    """Metrics go into a queue; a thread sends them with log_batch every `interval` seconds and keeps them, retrying
    with backoff, while the server is slow or away — the training loop never waits on the network.

    Metrics are (key, value, timestamp_ms, step) tuples; `unsent()` goes into each checkpoint, so a process killed
    with metrics still queued loses none: the resumed run sends them (`replay`) before its own."""

    def __init__(self, client, run_id, interval=1.0, logged_through=0):
        self.client, self.run_id, self.interval = client, run_id, interval
        self.logged_through = logged_through  # a resumed run repeats steps up to its checkpoint; logged ones are kept
        self.queue, self.pending, self.stopping = queue.Queue(), [], False
        self.thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def log(self, metrics, step):
        now = int(time.time() * 1000)
        self.replay([(key, float(value), now, step) for key, value in metrics.items()])

    def replay(self, items):
        for item in items:
            if item[3] > self.logged_through:
                self.queue.put(item)

    def unsent(self):
        return list(self.pending) + list(self.queue.queue)

    def _loop(self):
        from mlflow.entities import Metric
        failures = 0
        while True:
            time.sleep(self.interval if failures == 0 else min(30.0, 2.0 ** failures))
            while not self.queue.empty():
                self.pending.append(self.queue.get())
            try:
                while self.pending:
                    batch = self.pending[:1000]  # MLflow's per-request limit
                    self.client.log_batch(self.run_id, metrics=[Metric(*m) for m in batch])
                    del self.pending[:len(batch)]
                failures = 0
            except Exception as e:
                failures += 1
                log.warning(f"metric logging failed ({type(e).__name__}); {len(self.pending)} metrics kept, retrying")
            if self.stopping and not self.pending and self.queue.empty():
                return

    def close(self, timeout):
        """Send everything still queued; False when the server stayed away for `timeout` seconds."""
        self.stopping = True
        self.thread.join(timeout)
        return not self.thread.is_alive()


def start_tracking(cfg, run_name, resume_run_id):
    """Rank 0: (client, run_id, last logged step) — the experiment created if needed, a new run (params, tags,
    config.yaml) or the resumed one continued."""
    from mlflow import MlflowClient
    uri = tracking_uri(cfg)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg["mlflow"]["experiment"])
    exp_id = exp.experiment_id if exp else client.create_experiment(
        cfg["mlflow"]["experiment"], artifact_location=experiment_artifact_location(cfg, uri))
    if resume_run_id:
        client.update_run(resume_run_id, status="RUNNING")
        history = client.get_metric_history(resume_run_id, "train/loss")
        return client, resume_run_id, max((m.step for m in history), default=0)
    tags = {"pipeline": cfg["experiment"]["pipeline"], **{str(k): str(v) for k, v in cfg["mlflow"]["tags"].items()}}
    if cfg["experiment"]["description"]:
        tags["mlflow.note.content"] = cfg["experiment"]["description"]
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    from mlflow.entities import Param
    params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    client.log_text(run.info.run_id, yaml.safe_dump(redacted(cfg), sort_keys=False), "config.yaml")
    return client, run.info.run_id, 0


ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def tracking_checks(cfg, timeout=5.0):
    """Yield (ok, line) for the guide's troubleshooting steps, in order, stopping at the first failure: server
    reachable (/health), credentials accepted by the API (/health answers 200 even to a wrong password),
    experiment visible, S3 artifact root writable (put + delete of a probe object)."""
    import requests
    uri = tracking_uri(cfg)
    experiment, artifact_root = cfg["mlflow"]["experiment"], cfg["mlflow"]["s3_artifacts"]
    if uri.startswith("http"):
        try:
            requests.get(f"{uri}/health", timeout=timeout).raise_for_status()
        except requests.RequestException as e:
            yield False, f"tracking server {uri} unreachable ({type(e).__name__}): is it up? is MLFLOW_TRACKING_URI right?"
            return
        yield True, f"tracking server {uri} reachable"
        auth = (os.environ.get("MLFLOW_TRACKING_USERNAME", ""), os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        try:
            r = requests.get(f"{uri}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": experiment},
                             auth=auth if auth[0] else None, timeout=timeout)
        except requests.RequestException as e:
            yield False, f"tracking server {uri} API unreachable ({type(e).__name__})"
            return
        if r.status_code == 401:
            yield False, (f"tracking server {uri} answered 401 Unauthorized: wrong MLFLOW_TRACKING_USERNAME/PASSWORD "
                          f"(check .env: grep MLFLOW .env)")
            return
        if r.status_code == 403:
            yield False, f"tracking server {uri} answered 403: user '{auth[0]}' may not read experiment '{experiment}'"
            return
        yield True, f"credentials accepted by {uri} (user '{auth[0] or '-'}')"
        if r.status_code == 200:
            artifact_root = r.json()["experiment"]["artifact_location"]
            yield True, f"experiment '{experiment}' visible (artifacts at {artifact_root})"
        else:
            yield True, f"experiment '{experiment}' does not exist yet: the first run creates it"
    else:
        yield True, f"embedded tracking store {uri} (no server to check)"
    if not artifact_root.startswith("s3://"):
        yield True, f"artifact store {artifact_root or 'local'}: not S3, nothing to check"
        return
    bucket, _, prefix = artifact_root[len("s3://"):].partition("/")
    key = f"{prefix.rstrip('/')}/.wmtp-probe-{os.getpid()}-{int(time.time())}".lstrip("/")
    try:
        client = s3ckpt.s3_client(max_attempts=2, connect_timeout=timeout, read_timeout=timeout)
        client.put_object(Bucket=bucket, Key=key, Body=b"probe")
        client.delete_object(Bucket=bucket, Key=key)
    except Exception as e:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__)
        yield False, (f"S3 bucket '{bucket}' not writable at {artifact_root} ({code}): check AWS_ACCESS_KEY_ID/"
                      f"AWS_SECRET_ACCESS_KEY/AWS_DEFAULT_REGION and MLFLOW_S3_ENDPOINT_URL")
        return
    yield True, f"S3 bucket '{bucket}' reachable and writable under {artifact_root}"


def preflight(cfg):
    """The trainer's fail-fast: the same checks as `doctor`, before any run exists or any step is taken."""
    for ok, line in tracking_checks(cfg):
        if not ok:
            raise UserError(line)


def doctor(cfg, env_path):
    """Print one line per check with its fix; exit code 0 only when all pass. Never prints a secret's value."""
    found = Path(env_path).exists()
    set_vars = [v for v in ENV_VARS if os.environ.get(v)]
    needed = tracking_uri(cfg).startswith("http") or cfg["mlflow"]["s3_artifacts"].startswith("s3://")
    lines = [(found or bool(set_vars) or not needed, f"{env_path} {'found' if found else 'not found (copy .env.example to .env)'}; "
                                       f"set: {', '.join(set_vars) or 'none'}")]
    lines += list(tracking_checks(cfg))
    for ok, line in lines:
        print(f"{'ok' if ok else 'FAIL':<4} {line}")
    return 0 if all(ok for ok, _ in lines) else 1


def start_system_metrics(cfg, run_id, resumed):
    """MLflow's own monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) on a thread of rank 0."""
    interval = cfg["mlflow"]["system_metrics_interval_s"]
    if not interval:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=resumed, tracking_uri=tracking_uri(cfg))
    monitor.start()
    return monitor


def redacted(tree):
    return {k: redacted(v) if isinstance(v, dict) else v for k, v in tree.items() if not SECRET_KEY.search(str(k))}


# -----------------------------------------------------------------------------
# the four pipelines: each turns a batch into (loss, metrics into the Meter)


def policy_ce(model, tokens, labels, H, values=False):
    targets = W.shift_targets(labels, H)
    ce, vals = model(tokens, targets, values=values)
    return ce, targets != -100, vals


def log_head_losses(meter, prefix, ce, valid):
    for k in range(ce.shape[-1]):
        meter.add(f"{prefix}/head_{k}_loss", (ce[..., k] * valid[..., k]).sum(), valid[..., k].sum())


def baseline_loss(ctx, model, batch, meter):
    tokens, labels, _ = batch
    targets = W.shift_targets(labels, ctx["H"])
    valid = targets != -100
    loss, ce, _ = model(tokens, targets, weigh=lambda values: (valid, None))  # W.mtp_loss(ce, valid)
    log_head_losses(meter, "train", ce, valid)
    return loss


def critic_loss(ctx, model, batch, meter):
    t = ctx["cfg"]["training"]
    tokens, labels, rewards = batch
    ce, valid, values = policy_ce(model, tokens, labels, ctx["H"], values=True)  # CE only for the head-loss metrics
    targets, value_mask = W.value_targets(values, rewards, labels != -100, t["gamma"], t["critic_lambda"])
    loss = W.value_loss(values, targets, value_mask)
    log_head_losses(meter, "train", ce.detach(), valid)
    meter.add("train/value_loss", loss.detach() * value_mask.sum(), value_mask.sum())
    return loss


def verifiable_loss(ctx, model, batch, meter):
    """w_tok = clamp(exp(whiten(GAE(δ))/β), w_min, w_max), whitening stats all-reduced then EMA-smoothed;
    loss = mtp_loss(ce, valid, heads_from_tokens(w_tok)) + value_coef · value_loss."""
    t, H = ctx["cfg"]["training"], ctx["H"]
    tokens, labels, rewards = batch
    head_targets = W.shift_targets(labels, H)
    valid, mask = head_targets != -100, labels != -100
    policy_valid = valid if t["policy_on_incorrect"] else valid & (rewards > 0)[:, None, None]
    td = w_tok = None  # set by weigh, for the metrics

    def weigh(values):  # the model calls it with the value head's output (detached), before any CE
        nonlocal td, w_tok
        td = W.td_errors(values, rewards, mask, t["gamma"])
        adv = W.gae(td, mask, t["gamma"], t["td_lambda"])
        n, s, s2 = all_reduce(torch.stack([mask.sum().float(), (adv * mask).sum(), (adv.pow(2) * mask).sum()]))
        mean = s / n.clamp(min=1)
        var = (s2 / n.clamp(min=1) - mean.pow(2)).clamp(min=0)
        ctx["ema"] = W.ema_update(ctx["ema"], mean, var, t["td_ema_momentum"])
        if ctx["step"] >= t["td_ema_warmup_steps"]:
            mean, var = ctx["ema"]["mean"], ctx["ema"]["var"]
        w_tok = W.exp_weights(W.whiten(adv, mask, mean, var.sqrt()), mask, t["beta"], t["weight_clip_min"], t["weight_clip_max"])
        return policy_valid, W.heads_from_tokens(w_tok, H)
    policy, ce, values = model(tokens, head_targets, values=True, weigh=weigh)
    targets, value_mask = W.value_targets(values, rewards, mask, t["gamma"], t["td_lambda"])
    v_loss = W.value_loss(values, targets, value_mask)
    n_tok = mask.sum()
    log_head_losses(meter, "train", ce, valid)
    meter.add("train/value_loss", v_loss.detach() * value_mask.sum(), value_mask.sum())
    meter.add("train/td_error_mean", (td * mask).sum(), n_tok)
    meter.add("train/weight_mean", (w_tok * mask).sum(), n_tok)
    meter.add("train/weight_entropy", W.weight_entropy(w_tok, mask), 1)
    meter.extreme("train/weight_min", w_tok.masked_fill(~mask, float("inf")).min(), torch.minimum)
    meter.extreme("train/weight_max", w_tok.masked_fill(~mask, float("-inf")).max(), torch.maximum)
    return policy + t["value_coef"] * v_loss


def rho1_loss(ctx, model, batch, meter):
    """Keep, per head, the top k_percent tokens by excess loss ce_policy - ce_reference; average CE over them."""
    H, ratio = ctx["H"], ctx["cfg"]["training"]["k_percent"]
    tokens, labels, _ = batch
    with torch.inference_mode():
        ce_ref, _ = ctx["reference"](tokens, W.shift_targets(labels, 1), n_heads=1)
    ref = W.reference_ce_to_heads(ce_ref[..., 0].clone(), H)  # clone: inference tensors may not enter autograd
    targets = W.shift_targets(labels, H)
    valid = targets != -100

    def selected(k, ce_k):  # head k's top tokens by excess loss, from its own detached CE [B,T]
        w_k = W.topk_weights(W.excess_loss(ce_k, ref[..., k])[..., None], valid[..., k, None], ratio)[..., 0]
        return valid[..., k] & (w_k > 0)
    loss, ce, _ = model(tokens, targets, weigh=lambda values: (selected, None))  # W.mtp_loss(ce, valid & (w > 0))
    excess = W.excess_loss(ce, ref)
    w = W.topk_weights(excess, valid, ratio)  # the same selection, all heads at once, for the metrics
    log_head_losses(meter, "train", ce, valid)
    meter.add("train/excess_loss_mean", (excess * valid).sum(), valid.sum())
    meter.add("train/weight_sparsity", W.weight_sparsity(w, valid) * valid.sum(), valid.sum())
    return loss


LOSSES = {"baseline": baseline_loss, "critic": critic_loss, "verifiable": verifiable_loss, "rho1": rho1_loss}


# -----------------------------------------------------------------------------
# evaluation: val/loss (+ heads), accuracy by greedy decoding, and the critic's explained variance and AUC


def batches_of(examples, size):
    return [examples[i:i + size] for i in range(0, len(examples), size)]


@torch.no_grad()
def evaluate(ctx, model, examples, checker):
    cfg, pipeline, device, rank, world = ctx["cfg"], ctx["pipeline"], ctx["device"], ctx["rank"], ctx["world"]
    model.eval()
    meter, mine = Meter(device), examples[rank::world]
    last_values, last_rewards = [], []
    for chunk in batches_of(mine, cfg["training"]["batch_size"]):
        tokens, labels, rewards = collate(chunk, ctx["tok"].pad_id, device)
        with ctx["autocast"]():
            ce, valid, values = policy_ce(model, tokens, labels, ctx["H"], values=pipeline == "critic")
            log_head_losses(meter, "val", ce, valid)
            if pipeline == "critic":
                mask = labels != -100
                t = cfg["training"]
                targets, vmask = W.value_targets(values, rewards, mask, t["gamma"], t["critic_lambda"])
                err = (targets - values) * vmask
                meter.add("val/loss", err.pow(2).sum(), vmask.sum())
                meter.add("ev/t", (targets * vmask).sum(), vmask.sum())
                meter.add("ev/t2", (targets.pow(2) * vmask).sum(), vmask.sum())
                meter.add("ev/e", err.sum(), vmask.sum())
                meter.add("ev/e2", err.pow(2).sum(), vmask.sum())
                # the value of the last state with a target: the whole answer seen, before its EOS
                last = (vmask * torch.arange(vmask.shape[1], device=device)).argmax(1)
                last_values += values.gather(1, last[:, None]).squeeze(1).tolist()
                last_rewards += rewards.tolist()
    out = meter.reduce()
    if pipeline == "critic":
        var_t = out.pop("ev/t2") - out.pop("ev/t") ** 2
        var_e = out.pop("ev/e2") - out.pop("ev/e") ** 2
        out["val/explained_variance"] = 1.0 - var_e / var_t if var_t > 1e-12 else 0.0
        gathered = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, (last_values, last_rewards))
        else:
            gathered = [(last_values, last_rewards)]
        out["val/auc"] = auc([v for g in gathered for v in g[0]], [r for g in gathered for r in g[1]])
    else:
        heads = [v for k, v in out.items() if k.startswith("val/head_")]
        out["val/loss"] = sum(heads) / len(heads)
        if checker is not None:
            out["val/accuracy"] = accuracy(ctx, model, mine, checker)
    model.train()
    return out


def auc(scores, labels):
    """P(score of a correct answer > score of an incorrect one), ties counting 1/2 (Mann-Whitney U)."""
    pos = [s for s, y in zip(scores, labels) if y > 0.5]
    neg = [s for s, y in zip(scores, labels) if y <= 0.5]
    if not pos or not neg:
        return 0.5
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@torch.no_grad()
def greedy_decode(model, prompts, eos_id, pad_id, max_new, device):
    """Greedy continuation of each prompt with head 0. Right padding: each row reads its logits at its own last
    position, and causal attention keeps the pads after it from mattering, so one batch serves all lengths."""
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((len(prompts), int(lengths.max()) + max_new), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    rows = torch.arange(len(prompts), device=device)
    for _ in range(max_new):
        width = int(lengths.max())
        logits, _ = model(tokens[:, :width], n_heads=1)
        nxt = logits[rows, lengths - 1, 0].argmax(-1)
        tokens[rows[~done], lengths[~done]] = nxt[~done]
        done |= nxt == eos_id
        lengths = lengths + (~done).long()
        if done.all():
            break
    ends = (lengths + done.long()).tolist()  # a finished row's EOS sits at its length
    return [tokens[i, len(p):ends[i]].tolist() for i, p in enumerate(prompts)]


def accuracy(ctx, model, examples, checker):
    """Share of distinct validation prompts whose greedy answer the dataset's checker accepts, over all ranks."""
    tok, device = ctx["tok"], ctx["device"]
    records = list({e[3]["task_id"] if "task_id" in e[3] else id(e[3]): e[3] for e in examples}.values())
    max_new = max(len(tok.encode(r["output"])) for r in records) + 2
    right = 0
    for chunk in batches_of(records, 64):
        prompts = [[tok.bos_id] + tok.encode(render_prompt(r)) for r in chunk]
        with ctx["autocast"]():
            outs = greedy_decode(model, prompts, tok.eos_id, tok.pad_id, max_new, device)
        for r, out in zip(chunk, outs):
            answer = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
            right += bool(checker(r, tok.decode(answer)))
    right, total = all_reduce(torch.tensor([float(right), float(len(records))], device=device)).tolist()
    return right / max(total, 1.0)


# -----------------------------------------------------------------------------
# training


def learning_rate(step, total, t):
    """Linear warmup over warmup_steps, then cosine from learning_rate down to learning_rate·min_lr_ratio."""
    base, warmup = t["learning_rate"], t["warmup_steps"]
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (t["min_lr_ratio"] + (1 - t["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state(model):
    """(state, partial): LoRA runs save the trainable tensors only (the base is model.path), others the whole model."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, True
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, False


def load_checkpoint_into(model, path):
    """Load a trainer checkpoint's model weights; returns the whole checkpoint dict."""
    try:
        state = s3ckpt.load_checkpoint(path)
    except s3ckpt.CheckpointError as e:
        raise UserError(str(e))
    load_state(model, state["model"], path, partial=state.get("model_partial", False))
    return state


def find_resume(cfg, run_name, root, cache_dir):
    """`auto`: the newest checkpoint of an unfinished run of this config under checkpoint.dir, else (a machine that
    lost its disk: spot reclaim, a new VESSL container) the newest one in the MLflow artifacts of the newest
    unfinished run of that name; else the given path/URI; `never`: nothing. -> (local file, its URI in the run's
    artifacts or None), (None, None) for nothing to resume."""
    choice = cfg["checkpoint"]["resume"]
    if choice == "never":
        return None, None
    if choice != "auto":
        return resolve_uri(cfg, choice, None, None, cache_dir)
    candidates = [p for d in (root / run_name).glob("*") if not (d / "checkpoint_final.pt").exists()
                  for p in d.glob("checkpoint_*.pt")]
    if candidates:
        newest = max(candidates, key=lambda p: p.stat().st_mtime)  # in <run name>/<run id>/
        uploaded = cfg["mlflow"]["enable_logging"] and not newest.parent.name.startswith("local-")
        return str(newest), f"runs:/{newest.parent.name}/checkpoints/{newest.name}" if uploaded else None
    remote = newest_remote_checkpoint(cfg, run_name) if cfg["mlflow"]["enable_logging"] else None
    return resolve_uri(cfg, remote, None, None, cache_dir) if remote else (None, None)


def newest_remote_checkpoint(cfg, run_name):
    """runs:/ URI of the newest step checkpoint (by step number: a preemption writes one), else checkpoint_best.pt,
    of the newest unfinished run with this run name and experiment.name; None when there is none to resume from."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg["mlflow"]["experiment"])
    same_config = (f"tags.mlflow.runName = '{run_name}' and params.`experiment.name` = '{cfg['experiment']['name']}' "
                   "and attributes.status != 'FINISHED'")
    runs = client.search_runs([exp.experiment_id], same_config, order_by=["attributes.start_time DESC"],
                              max_results=1) if exp else []
    if not runs:
        return None
    run_id = runs[0].info.run_id
    names = [Path(f.path).name for f in client.list_artifacts(run_id, "checkpoints")]
    if "checkpoint_final.pt" in names:  # trained to the end, only its ending was lost: as finished locally
        return None
    steps = [n for n in names if s3ckpt.checkpoint_step(n) is not None]
    newest = max(steps, key=s3ckpt.checkpoint_step) if steps else "checkpoint_best.pt"
    return f"runs:/{run_id}/checkpoints/{newest}" if newest in names else None


def train_step(ctx, ddp_model, optimizer, params, batches, meter, stop_requested=0):
    """One optimizer step over the micro-batches (DDP syncs gradients on the last one), clipped to max_grad_norm.

    Returns the device tensor [non-finite, stop], summed over ranks by the step's one collective, so ranks never
    disagree: a non-finite loss or gradient on any rank skips the update everywhere, a signal on any rank stops
    every rank. Nothing here waits for the device: the fused AdamW reads the flag itself (found_inf) and leaves
    weights, moments and step count untouched where it is set; the TD-statistics EMA is kept the same way."""
    world, accum, ema_before = ctx["world"], len(batches), ctx["ema"]
    step_loss, step_meter = torch.zeros((), device=ctx["device"]), Meter(ctx["device"])
    for micro, batch in enumerate(batches):
        sync = ddp_model.no_sync() if world > 1 and micro < accum - 1 else contextlib.nullcontext()
        with sync:
            with ctx["autocast"]():
                loss = LOSSES[ctx["pipeline"]](ctx, ddp_model, batch, step_meter)
            (loss / accum).backward()
        n_tok = (batch[1] != -100).sum()
        step_meter.add("train/loss", loss.detach() * n_tok, n_tok)
        step_loss += loss.detach() / accum
    grad_norm = torch.nn.utils.clip_grad_norm_(params, ctx["cfg"]["training"]["max_grad_norm"])  # the pre-clip norm
    step_meter.add("train/grad_norm", grad_norm, 1)
    flags = all_reduce(torch.stack([(~torch.isfinite(step_loss + grad_norm)).float(),
                                    torch.tensor(float(stop_requested), device=ctx["device"])]))
    skip = flags[0] > 0
    optimizer.found_inf = skip.float()  # the fused AdamW's own skip switch
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ctx["ema"] is not ema_before:  # nor does a skipped step move the TD statistics (one sync, on the first step)
        ctx["ema"] = ({k: torch.where(skip, ema_before[k], v) for k, v in ctx["ema"].items()} if ema_before
                      else None if skip.item() else ctx["ema"])
    meter.merge(step_meter, keep=1.0 - skip.float())  # a skipped step's values stay out of the logged means
    return flags


class OneStepLate:
    """Hands the host a step's flags one step late: copied to (pinned) host memory without blocking now, waited
    for only once the next step is queued, so the GPU never idles while the host decides."""

    def __init__(self, device):
        self.device, self.host, self.ready = device, None, None

    def swap(self, flags):
        """Queues flags' copy; returns the previous ones as a list (None the first time)."""
        previous = self.read()
        self.host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=self.device.type == "cuda")
        self.host.copy_(flags, non_blocking=True)
        if self.device.type == "cuda":
            self.ready = torch.cuda.Event()
            self.ready.record()
        return previous

    def read(self):
        if self.host is None:
            return None
        if self.ready is not None:
            self.ready.synchronize()
        value, self.host, self.ready = self.host.tolist(), None, None
        return value


class Preempted(Exception):
    """A SIGTERM/SIGINT stopped training at a step boundary after a resumable checkpoint was written."""

    def __init__(self, signum, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume from {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class StopSignal:
    """Remembers a SIGTERM/SIGINT (spot reclaim, Ctrl-C) so the loop can stop cleanly at the next step boundary."""

    def __init__(self):
        self.received = 0
        self.previous = {signum: signal.signal(signum, self.handle) for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        # A second Ctrl-C means "now". A second SIGTERM does not: torchrun forwards the one every process of a
        # container already got, and SIGKILLs 30 s later anyway.
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum
        log.warning(f"{signal.Signals(signum).name} received: stopping at the end of this step")


def train(cfg, use_micro=False):
    t, pipeline = cfg["training"], cfg["experiment"]["pipeline"]
    rank, world, device = setup_distributed(t["collective_timeout_s"])
    master = rank == 0
    log.setLevel(logging.INFO if master else logging.WARNING)
    run_name = cfg["mlflow"]["run_name"] or RUN_NAMES[pipeline]
    ckpt_root = Path(cfg["checkpoint"]["dir"])
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    # --- everything that can reject bad input comes before the MLflow run exists
    tok, model = build_model(cfg, use_micro, value_head=pipeline in ("critic", "verifiable"))
    H = model.args.n_future_tokens
    ds = cfg["dataset"]
    train_records, checker = load_records(ds["train"], "train")
    val_records, _ = load_records(ds["validation"], "validation")
    s = cfg["data_sampling"]
    mixed = pipeline == "critic"  # the critic must see wrong answers to rank them; the others validate on right ones
    train_examples, n_truncated = encode_records(sample_records(train_records, s["n_samples"], s["correct_ratio"], s["seed"]),
                                                 tok, ds["max_length"], ds["on_overlong"], ds["train"])
    val_examples, _ = encode_records(sample_records(val_records, s["val_samples"], 0.5 if mixed else 1.0, s["seed"] + 1),
                                     tok, ds["max_length"], ds["on_overlong"], ds["validation"])

    init = cfg["critic"]["checkpoint"] if pipeline == "verifiable" else cfg["model"]["init_from"]
    started_from = ""
    if master and cfg["mlflow"]["enable_logging"]:
        preflight(cfg)  # credentials and bucket, before the server is asked for any checkpoint
    cache = ckpt_root / ".cache"
    resume_path = on_this_node(cfg, find_resume(cfg, run_name, ckpt_root, cache) if master else None, cache)
    if init:  # also when resuming: rho1's frozen-copy reference is the *starting* policy
        source = "critic" if pipeline == "verifiable" else "baseline"
        artifact = "checkpoints/checkpoint_best.pt" if source == "critic" else "checkpoints/checkpoint_final.pt"
        path = on_this_node(cfg, resolve_uri(cfg, init, source, artifact, cache) if master else None, cache)
        load_checkpoint_into(model, path)
        started_from = f", initialised from {init} ({path})"
    reference = None
    if pipeline == "rho1":
        reference = build_model(cfg, use_micro, value_head=False)[1]  # the policy's architecture, LoRA included
        ref = cfg["reference"]["path"]
        if ref and (Path(ref) / "params.json").exists():
            load_meta_weights(reference, ref)
        elif ref:
            artifact = "checkpoints/checkpoint_final.pt"
            path = on_this_node(cfg, resolve_uri(cfg, ref, "baseline", artifact, cache) if master else None, cache)
            load_checkpoint_into(reference, path)
        else:
            reference.load_state_dict(model.state_dict())
        reference.requires_grad_(False).eval().to(device)
    if pipeline == "critic":  # trunk and LM heads frozen: only the value head learns
        model.requires_grad_(False)
        model.value_head.requires_grad_(True)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t["learning_rate"], weight_decay=t["weight_decay"], fused=True)
    batches_per_epoch = len(epoch_order(len(train_examples), 0, s["seed"], rank, world)) // t["batch_size"]
    accum = t["gradient_accumulation_steps"]
    if batches_per_epoch < accum:
        raise UserError(f"{ds['train']}: {len(train_examples)} examples make fewer than one step of "
                        f"{accum} x {t['batch_size']} x {world} processes")
    total_steps = t["max_steps"] or t["n_epochs"] * batches_per_epoch // accum

    ctx = {"cfg": cfg, "pipeline": pipeline, "H": H, "tok": tok, "device": device, "rank": rank, "world": world,
           "autocast": autocast, "reference": reference, "ema": None, "step": 0}
    start_step, position, best_val, run_id, unsent_metrics = 0, 0, float("inf"), None, []
    if resume_path:
        state = load_checkpoint_into(model, resume_path)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start_step, position, best_val = state["step"], state["position"], state["best_val_loss"]
        ctx["ema"], run_id, unsent_metrics = state["ema"], state["run_id"], state.get("unsent_metrics", [])

    # --- the run: from here on it ends FINISHED or FAILED, with training.log uploaded either way
    client = metrics = uploader = writer = file_log = system = None
    logged_through = 0
    if master and cfg["mlflow"]["enable_logging"]:
        client, run_id, logged_through = start_tracking(cfg, run_name, run_id)
    run_id = broadcast(run_id or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    run_dir = ckpt_root / run_name / run_id

    def save(name, step, finished=False, wait=False):
        """Rank 0 writes behind the loop; wait=True returns once the file is on disk and queued for upload."""
        if not master:
            return
        weights, partial = model_state(model)
        writer.save({"unsent_metrics": metrics.unsent() if metrics else [],
            "model": weights, "model_partial": partial, "optimizer": optimizer.state_dict(), "scheduler": {"step": step},
            "step": step, "position": position, "rng": rng_state(), "ema": ctx["ema"], "config": cfg,
            "run_id": run_id, "best_val_loss": best_val, "pipeline": pipeline, "finished": finished,
            "model_args": dataclasses.asdict(model.args)}, run_dir / name)
        if wait:
            writer.wait()

    status, resume_from, stop_signal = "FAILED", None, None
    try:
        if master:
            run_dir.mkdir(parents=True, exist_ok=True)
            file_log = logging.FileHandler(run_dir / "training.log")
            file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(file_log)
            if client:
                metrics = MetricLogger(client, run_id, logged_through=logged_through)
                metrics.replay(unsent_metrics)
                system = start_system_metrics(cfg, run_id, resumed=bool(resume_path))
                uploader = s3ckpt.CheckpointUploader(run_id, tracking_uri(cfg),
                                                     retry_budget_s=cfg["checkpoint"]["upload_retry_budget_s"],
                                                     verify_etag=cfg["checkpoint"]["verify_etag"])
            writer = s3ckpt.CheckpointWriter(cfg["checkpoint"]["save_total_limit"], uploader)
            log.info(f"{pipeline}: run {run_id}, {world} process(es) on {device}, {len(train_examples)} train / "
                     f"{len(val_examples)} val examples ({n_truncated} truncated), {total_steps} steps"
                     + started_from + (f", resumed at step {start_step} from {resume_path}" if resume_path else ""))
        ddp_model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
        if cfg["model"]["compile"]:
            ddp_model = torch.compile(ddp_model)
        meter, late, tokens_seen, t_log = Meter(device), OneStepLate(device), torch.zeros((), device=device), time.time()
        skipped = 0

        def check(flagged_step, flags):
            """The host's look at a step's [non-finite, stop] flags (None: nothing yet). Counts the skipped steps in
            a row, logged at the step they happened, and fails the run at max_skipped_steps. Returns stop."""
            nonlocal skipped
            if flags is None:
                return False
            non_finite, stop = flags
            skipped = skipped + 1 if non_finite else 0
            if non_finite:
                log.warning(f"step {flagged_step}: non-finite loss or gradient, step skipped ({skipped} in a row)")
                if metrics:
                    metrics.log({"train/skipped_steps": skipped}, flagged_step)
            if skipped >= t["max_skipped_steps"]:
                raise RuntimeError(f"{skipped} non-finite steps in a row (training.max_skipped_steps): "
                                   f"lower training.learning_rate or check the data")
            return stop > 0

        stop_signal = StopSignal()
        t_start, val = time.time(), {}
        for step in range(start_step, total_steps):
            ctx["step"] = step
            lr = learning_rate(step, total_steps, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = []
            for _ in range(accum):
                epoch, index = divmod(position, batches_per_epoch)
                order = epoch_order(len(train_examples), epoch, s["seed"], rank, world)
                batches.append(collate([train_examples[i] for i in order[index * t["batch_size"]:(index + 1) * t["batch_size"]]],
                                       tok.pad_id, device))
                position += 1
                tokens_seen += (batches[-1][0] != tok.pad_id).sum()
            flags = train_step(ctx, ddp_model, optimizer, params, batches, meter, stop_signal.received)
            done = step + 1
            if os.environ.get("WMTP_TEST_FAULT") == f"{rank}:{done}" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                raise RuntimeError(f"WMTP_TEST_FAULT: rank {rank} fails once at step {done}")  # for the restart tests
            stop = check(done - 1, late.swap(flags))  # the last step's flags: this step is queued, the GPU stays busy
            if done == total_steps:
                stop = check(done, late.read()) or stop
            if done % t["log_interval"] == 0 or done == total_steps or stop:
                elapsed = time.time() - t_log
                stats = meter.reduce()
                stats["train/learning_rate"] = lr
                stats["train/tokens_per_sec"] = all_reduce(tokens_seen.clone()).item() / max(elapsed, 1e-9)
                tokens_seen.zero_()
                t_log = time.time()
                if master:
                    eta = (time.time() - t_start) / (done - start_step) * (total_steps - done)
                    print(f"step {done}/{total_steps} | loss {stats.get('train/loss', math.nan):.4f} | lr {lr:.2e} | "
                          f"{stats['train/tokens_per_sec']:,.0f} tok/s | ETA {eta:.0f}s", flush=True)
                    log.info(" ".join(f"{k}={v:.5g}" for k, v in sorted(stats.items())))
                    if metrics:
                        metrics.log(stats, done)
            if stop:
                save(f"checkpoint_step_{done}.pt", done, wait=True)  # on disk before anyone is told to resume from it
                raise Preempted(stop_signal.received or signal.SIGTERM, run_dir / f"checkpoint_step_{done}.pt")
            if (t["eval_interval"] and done % t["eval_interval"] == 0) or done == total_steps:
                val = evaluate(ctx, model, val_examples, checker)
                if master:
                    log.info(f"step {done}: " + " ".join(f"{k}={v:.5g}" for k, v in sorted(val.items())))
                    if metrics:
                        metrics.log(val, done)
                if val["val/loss"] < best_val:
                    best_val = val["val/loss"]
                    save("checkpoint_best.pt", done)
            if cfg["checkpoint"]["save_every"] and done % cfg["checkpoint"]["save_every"] == 0 and done < total_steps:
                save(f"checkpoint_step_{done}.pt", done)
        save("checkpoint_final.pt", total_steps, finished=True, wait=True)
        status = "FINISHED"
        if master:
            log.info(f"done: {total_steps} steps in {time.time() - t_start:.1f}s, best val/loss {best_val:.4f}")
        return {"run_id": run_id, "steps": total_steps, "model": model, **val}
    except Preempted as e:
        status, resume_from = "KILLED", e.checkpoint
        log.warning(f"{e}")
        raise
    except Exception:
        log.exception(f"training failed ({pipeline}, run {run_id})")
        raise
    finally:
        if master:  # still under StopSignal: torchrun's SIGTERM after a crash must not cut the cleanup short
            if writer:
                writer.close()
            if system:
                system.finish()
            finish_run(cfg, client, run_id, metrics, uploader, file_log, run_dir, status, total_steps, resume_from)
        if stop_signal:
            stop_signal.restore()
        if dist.is_initialized():
            dist.destroy_process_group()


def finish_run(cfg, client, run_id, metrics, uploader, file_log, run_dir, status, steps, resume_from=None):
    """Drain metrics and uploads (bounded: the preemption grace period when preempted), upload training.log through
    the same retrying uploader, tag what stayed only local, end the run — KILLED ones tagged with the checkpoint to
    resume from. The run is ended whatever fails on the way."""
    timeout = cfg["checkpoint"]["preempt_grace_s" if status == "KILLED" else "upload_timeout_s"]
    if client and resume_from:  # first, in case the grace period ends with a SIGKILL
        client.set_tag(run_id, "resume_from", f"runs:/{run_id}/checkpoints/{Path(resume_from).name} ({resume_from})")
        client.set_terminated(run_id, status)
    try:
        if metrics and not metrics.close(timeout=timeout):
            log.error("some metrics could not be sent to the tracking server")
        local_only = []
        if uploader:
            log.info(f"waiting up to {timeout}s for checkpoint uploads")
            local_only = [p for p in uploader.wait(timeout) if Path(p).exists()]  # pruned ones are not wanted anywhere
            if local_only:
                log.error(f"checkpoints NOT uploaded, only local: {', '.join(local_only)}")
        if file_log:
            file_log.close()
            log.removeHandler(file_log)
        if uploader:
            if (run_dir / "training.log").exists():
                uploader.upload_to_s3_async(run_dir / "training.log", artifact_path="logs")
                local_only = [p for p in uploader.wait(min(timeout, 60)) if Path(p).exists()]
            uploader.close()
        if client:
            if local_only:
                client.set_tag(run_id, "checkpoints_local_only", ", ".join(local_only))
            client.set_tag(run_id, "wmtp.steps", str(steps))
    finally:
        if client:
            client.set_terminated(run_id, status)


# -----------------------------------------------------------------------------
# report: the demo's closing table


def report(uri, experiment):
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    print(f"{'pipeline':<11} {'run id':<33} {'steps':>6} {'val/loss':>9} {'accuracy':>9} {'wall':>7}")
    for pipeline in PIPELINES:
        runs = client.search_runs([exp.experiment_id], f"tags.pipeline = '{pipeline}'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if exp else []
        if not runs:
            print(f"{pipeline:<11} (no run)")
            continue
        r = runs[0]
        m = r.data.metrics
        acc = m.get("val/accuracy", m.get("val/auc"))
        acc_text = "-" if acc is None else (f"{acc:.3f}" + (" auc" if "val/accuracy" not in m else ""))
        wall = ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000
        print(f"{pipeline:<11} {r.info.run_id:<33} {r.data.tags.get('wmtp.steps', '?'):>6} "
              f"{m.get('val/loss', float('nan')):>9.4f} {acc_text:>9} {wall:>6.0f}s")


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m weighted_mtp", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one pipeline")
    p.add_argument("--config", required=True)
    p.add_argument("--use-micro-model", action="store_true", help="the small random-init CPU model, byte tokenizer")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", nargs="?", const="auto", help="PATH, URI or auto (default when given without a value)")
    p.add_argument("--dry-run", action="store_true", help="print the merged config and exit")
    d = sub.add_parser("doctor", help="check .env, tracking server, credentials, experiment and S3 bucket")
    d.add_argument("--config", default=str(ROOT / "configs" / "defaults.yaml"))
    d.add_argument("--env-file", default=".env")
    d.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("report", help="table of the newest run of each pipeline")
    r.add_argument("--experiment", default=DEFAULTS["mlflow"]["experiment"])
    r.add_argument("--tracking-uri", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "doctor":
            return doctor(load_config(args.config, args.override), args.env_file)
        if args.command == "report":
            return report(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db", args.experiment)
        overrides = args.override + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            print(yaml.safe_dump(redacted(cfg), sort_keys=False), end="")
            return 0
        train(cfg, use_micro=args.use_micro_model)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return 128 + e.signum  # what a shell reports for a process the signal ended: torchrun sees a failure


def exit_worker(code):
    """Ends a torchrun worker without Python's finalisation. A gloo worker thread can still hold DDP's last
    all-reduce (its tensors) after destroy_process_group(); when it lets go during finalisation it cannot take the
    GIL and the process aborts (SIGABRT, "terminate called without an active exception": once in CI, and in about
    1 of 12 runs of a bare DDP + gloo script, read off its core with gdb), which torchrun takes for a failed job.
    Everything worth keeping is closed by then; only the log handlers and std streams need flushing."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    if "RANK" not in os.environ:
        sys.exit(main())
    try:
        exit_code = main()
    except SystemExit as e:  # argparse
        exit_code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # a crash: its traceback, then the same way out (the abort would hide its exit code)
        traceback.print_exc()
        exit_code = 1
    exit_worker(exit_code)
