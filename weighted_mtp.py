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
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import yaml
from torch.utils.checkpoint import checkpoint as activation_checkpoint

import s3ckpt
import weights as W

ROOT = Path(__file__).resolve().parent
EXPERIMENT_KIND = "mlflow.experimentKind"
SECRET_KEY = re.compile(r"password|secret|token|access_key|credential", re.IGNORECASE)
log = logging.getLogger("weighted_mtp")


class UserError(Exception):
    """Bad input (config, data, checkpoint): reported as one line, exit code 2, before any training."""


# -----------------------------------------------------------------------------
# config: defaults.yaml <- pipeline file <- --override a.b=c, every key checked against the defaults, then typed
# into frozen dataclasses. defaults.yaml is the one source of defaults and comments; the dataclasses name the keys,
# their types and their ranges (tests/test_config.py checks that the two agree key for key).


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


def rule(ok, what):
    """A field whose value must satisfy ok(value); `what` (or what()) completes "must be ..." in the error."""
    return dataclasses.field(metadata={"ok": ok, "what": what})


ONE_OR_MORE, NON_NEGATIVE, POSITIVE = (lambda v: v >= 1, ">= 1"), (lambda v: v >= 0, ">= 0"), (lambda v: v > 0, "> 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
frozen = dataclasses.dataclass(frozen=True)


@frozen
class ExperimentConfig:
    name: str
    pipeline: str = rule(lambda v: v in PIPELINES, lambda: "one of " + ", ".join(PIPELINES))
    description: str


@frozen
class MicroConfig:
    dim: int = rule(lambda v: v >= 2, ">= 2")
    n_trunk_layers: int = rule(lambda v: v >= 1, ">= 1 (a shared trunk)")
    n_heads: int = rule(*ONE_OR_MORE)
    n_kv_heads: int = rule(*ONE_OR_MORE)
    multiple_of: int = rule(*ONE_OR_MORE)
    norm_eps: float = rule(*POSITIVE)
    rope_theta: float
    vocab_size: int = rule(*NON_NEGATIVE)

    def check(self, source):
        if self.dim % (2 * self.n_heads) or self.n_heads % self.n_kv_heads:
            raise UserError(f"{source}: 'model.micro.dim' ({self.dim}) must split into 'model.micro.n_heads' "
                            f"({self.n_heads}) heads of even size, and n_heads be a multiple of n_kv_heads "
                            f"({self.n_kv_heads})")


@frozen
class LoraConfig:
    rank: int = rule(*NON_NEGATIVE)
    alpha: float = rule(*POSITIVE)


@frozen
class ModelConfig:
    path: str
    tokenizer: str
    n_future_tokens: int = rule(*ONE_OR_MORE)
    dtype: str = rule(lambda v: v in DTYPES, "float32 or bfloat16")
    micro: MicroConfig
    lora: LoraConfig
    init_from: str
    memory_efficient_loss: bool
    compile: bool


@frozen
class DatasetConfig:
    train: str
    validation: str
    max_length: int = rule(lambda v: v >= 8, ">= 8")
    on_overlong: str = rule(lambda v: v in ("truncate", "skip", "error"), "truncate, skip or error")
    template: str = rule(lambda v: v in TEMPLATES, lambda: " or ".join(TEMPLATES))


@frozen
class DataSamplingConfig:
    n_samples: int = rule(*NON_NEGATIVE)
    correct_ratio: float = rule(*FRACTION)
    seed: int
    val_samples: int = rule(*ONE_OR_MORE)


@frozen
class TrainingConfig:
    max_steps: int = rule(*NON_NEGATIVE)
    n_epochs: int = rule(*ONE_OR_MORE)
    batch_size: int = rule(*ONE_OR_MORE)
    group_by_length: bool
    gradient_accumulation_steps: int = rule(*ONE_OR_MORE)
    learning_rate: float = rule(*POSITIVE)
    weight_decay: float = rule(*NON_NEGATIVE)
    warmup_steps: int = rule(*NON_NEGATIVE)
    min_lr_ratio: float = rule(*FRACTION)
    max_grad_norm: float = rule(*POSITIVE)
    log_interval: int = rule(*ONE_OR_MORE)
    eval_interval: int = rule(*NON_NEGATIVE)
    seed: int
    max_skipped_steps: int = rule(*ONE_OR_MORE)
    collective_timeout_s: int
    gamma: float = rule(*FRACTION)
    td_lambda: float = rule(*FRACTION)
    critic_lambda: float = rule(*FRACTION)
    beta: float = rule(*POSITIVE)
    weight_clip_min: float = rule(*NON_NEGATIVE)
    weight_clip_max: float
    td_ema_momentum: float = rule(lambda v: 0 < v <= 1, "in (0, 1]")
    td_ema_warmup_steps: int = rule(*NON_NEGATIVE)
    value_coef: float = rule(*NON_NEGATIVE)
    k_percent: float = rule(lambda v: 0 < v <= 1, "in (0, 1]")
    policy_on_incorrect: bool
    parallel: str = rule(lambda v: v in ("ddp", "fsdp"), "ddp or fsdp")
    activation_checkpointing: bool

    def check(self, source):
        if self.weight_clip_min >= self.weight_clip_max:
            raise UserError(f"{source}: 'training.weight_clip_min' ({self.weight_clip_min}) must be < "
                            f"'training.weight_clip_max' ({self.weight_clip_max})")


@frozen
class CheckpointConfig:
    dir: str
    save_every: int = rule(*NON_NEGATIVE)
    save_total_limit: int = rule(*NON_NEGATIVE)
    resume: str
    upload_retry_budget_s: int
    verify_etag: bool
    upload_timeout_s: int
    preempt_grace_s: int
    format: str = rule(lambda v: v in ("full", "sharded"), "full or sharded")


@frozen
class MlflowConfig:
    tracking_uri: str
    experiment: str
    run_name: str
    tags: dict
    s3_artifacts: str
    enable_logging: bool
    system_metrics_interval_s: int


@frozen
class CriticConfig:
    checkpoint: str


@frozen
class ReferenceConfig:
    path: str


@frozen
class EvalConfig:
    dataset: str
    max_tasks: int = rule(*NON_NEGATIVE)
    n_samples: int = rule(*ONE_OR_MORE)
    temperature: float = rule(*POSITIVE)
    top_p: float = rule(lambda v: 0 < v <= 1, "in (0, 1]")
    max_new_tokens: int = rule(*ONE_OR_MORE)
    batch_size: int = rule(*ONE_OR_MORE)
    seed: int
    k: list = rule(lambda v: bool(v) and all(type(k) is int and k >= 1 for k in v), "a list of whole numbers >= 1")
    timeout_s: float = rule(*POSITIVE)
    memory_mb: int = rule(lambda v: v >= 64, ">= 64")
    workers: int = rule(*NON_NEGATIVE)


@frozen
class Config:
    experiment: ExperimentConfig
    model: ModelConfig
    dataset: DatasetConfig
    data_sampling: DataSamplingConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    mlflow: MlflowConfig
    critic: CriticConfig
    reference: ReferenceConfig
    eval: EvalConfig

    def to_dict(self):
        return dataclasses.asdict(self)


def typed(cls, tree, source, prefix=""):
    """The merged tree as a frozen `cls`, every field's rule checked (in field order), then the section's own check."""
    values = {}
    for f in dataclasses.fields(cls):
        value = tree[f.name]
        if dataclasses.is_dataclass(f.type):
            value = typed(f.type, value, source, f"{prefix}{f.name}.")
        elif "ok" in f.metadata and not f.metadata["ok"](value):
            what = f.metadata["what"]() if callable(f.metadata["what"]) else f.metadata["what"]
            raise UserError(f"{source}: '{prefix}{f.name}' must be {what}, got {value!r}")
        values[f.name] = value
    section = cls(**values)
    if hasattr(section, "check"):
        section.check(source)
    return section


def load_config(path, overrides=()):
    """defaults.yaml <- the pipeline file <- overrides, as a frozen Config; raises UserError naming the file and key
    on bad input."""
    tree = json.loads(json.dumps(DEFAULTS))
    merge(tree, read_yaml(path), str(path), DEFAULTS)
    for text in overrides:
        merge(tree, parse_override(text), f"--override {text}", DEFAULTS)
    return typed(Config, tree, str(path))


def config_from_dict(tree, source):
    """A Config from a plain tree such as a checkpoint's "config": keys added since it was written get defaults."""
    merged = json.loads(json.dumps(DEFAULTS))
    merge(merged, tree, source, DEFAULTS)
    return typed(Config, merged, source)


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


def redacted(tree):
    return {k: redacted(v) if isinstance(v, dict) else v for k, v in tree.items() if not SECRET_KEY.search(str(k))}


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


class HFTokenizer:
    """A Hugging Face tokenizer.json (the `tokenizers` package). BOS/EOS are the tokens tokenizer_config.json names
    beside it, else the ids in config.json; the trainer adds BOS itself, so encoding adds no special tokens."""

    def __init__(self, path):
        from tokenizers import Tokenizer
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"{path}: not a readable tokenizer.json ({e})")
        self.bos_id, self.eos_id = special_ids(Path(path).parent, self.tok)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.pad_id = self.eos_id  # as for sentencepiece: pads are masked out of every loss

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({e})")


def special_ids(model_dir, tok):
    """[BOS id, EOS id]: the tokens tokenizer_config.json names, else config.json's bos/eos_token_id."""
    names = read_json(model_dir / "tokenizer_config.json") if (model_dir / "tokenizer_config.json").exists() else {}
    config = read_json(model_dir / "config.json") if (model_dir / "config.json").exists() else {}
    ids = []
    for which in ("bos", "eos"):
        name = names.get(f"{which}_token")
        name = name.get("content") if isinstance(name, dict) else name
        token_id = tok.token_to_id(name) if isinstance(name, str) else None
        token_id = config.get(f"{which}_token_id") if token_id is None else token_id
        token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id  # LLaMA 3.1 lists its EOS ids
        if not isinstance(token_id, int):
            raise UserError(f"{model_dir}: no {which.upper()} token (name it as {which}_token in tokenizer_config.json "
                            f"or give {which}_token_id in config.json)")
        ids.append(token_id)
    return ids


def load_tokenizer(explicit, model_dir):
    """model.tokenizer when given (a tokenizer.json, or a sentencepiece .model), else the model dir's tokenizer.model
    or tokenizer.json, whichever it has; None when it has neither."""
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise UserError(f"model.tokenizer: {path} does not exist")
    else:
        found = [p for p in (Path(model_dir) / "tokenizer.model", Path(model_dir) / "tokenizer.json") if p.exists()]
        if not found:
            return None
        path = found[0]
    return HFTokenizer(path) if path.suffix == ".json" else SentencePieceTokenizer(path)


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
    hidden_dim: int = None  # the FFN width a checkpoint states (HF's intermediate_size); None: derived from dim
    max_seq_len: int = None  # the context a checkpoint was trained for (HF's max_position_embeddings), if known


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
    cos, sin = cos[..., None, :], sin[..., None, :]  # [T, d/2] for every row alike, or [B, T, d/2] per row
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

    def forward(self, x, cos, sin, cache=None):
        """Training: causal attention over x alone. Generation: cache = (keys, values, where, mask) — this layer's
        KV cache [B, S, n_kv_heads, head_dim], the (rows, positions) this forward's tokens are written to, and
        which of the first `width` slots each query may read, [B, 1, T, width]."""
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=gqa)
        else:
            keys, values, where, mask = cache
            keys[where], values[where] = k, v
            width = mask.shape[-1]
            k, v = keys[:, :width].transpose(1, 2), values[:, :width].transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, a):
        super().__init__()
        hidden = int(2 * 4 * a.dim / 3)
        if a.ffn_dim_multiplier:
            hidden = int(a.ffn_dim_multiplier * hidden)
        hidden = a.hidden_dim or a.multiple_of * math.ceil(hidden / a.multiple_of)
        self.w1 = nn.Linear(a.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    checkpointed = False  # training.activation_checkpointing: keep the block's input only, recompute in backward

    def __init__(self, a):
        super().__init__()
        self.attention, self.feed_forward = Attention(a), FeedForward(a)
        self.attention_norm, self.ffn_norm = RMSNorm(a.dim, a.norm_eps), RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin, cache=None):
        if self.checkpointed and torch.is_grad_enabled() and cache is None:
            return activation_checkpoint(self.compute, x, cos, sin, use_reentrant=False)
        return self.compute(x, cos, sin, cache)

    def compute(self, x, cos, sin, cache=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, cache)
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
        # .float(): the value head is trained, so fp32, while a frozen trunk may be bf16 (model.dtype)
        vals = self.value_head(self.norm(states[0]).detach().float()).squeeze(-1) if values else None
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

    def next_logits(self, tokens, positions, width, cache, read):
        """Head 0's logits [B, V] (fp32) at column `read` [B] of each row, for tokens [B, T] at positions [B, T],
        through the KV cache: each token's keys and values go to the slot of its position, and a query at
        position p reads slots 0..p of its row (`width` = 1 + the largest position). Generation only."""
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device)
        mask = (torch.arange(width, device=tokens.device) <= positions[..., None])[:, None]
        cos, sin, where = cache.cos[positions], cache.sin[positions], (rows[:, None], positions)
        h = self.tok_embeddings(tokens)
        for layer, keys, values in zip(self.layers, cache.keys, cache.values):
            h = layer(h, cos, sin, (keys, values, where, mask))
        return self.output(self.norm(h[rows, read])).float()

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
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none")
        return ce.view_as(target)


class KVCache:
    """Generation's memory for the trunk and head 0: per block, keys and values [B, length, n_kv_heads, head_dim],
    slot s holding position s of its row; and the RoPE angles of positions 0..length-1."""

    def __init__(self, model, batch, length, dtype, device):
        a = model.args
        shape = (batch, length, a.n_kv_heads or a.n_heads, a.dim // a.n_heads)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.cos, self.sin = rope_angles(shape[-1], length, a.rope_theta, device)


class LoRALinear(nn.Module):
    """y = x Wᵀ + (α/r)·(x Aᵀ) Bᵀ with W frozen; B starts at 0, so training starts from the base layer.

    The base weight keeps its name (`wq.weight`), so Meta checkpoints load into a LoRA model unchanged."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        a = torch.randn(rank, base.in_features, device=base.weight.device) / math.sqrt(base.in_features)
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        self.scale = alpha / rank

    def forward(self, x):
        low_rank = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return F.linear(x, self.weight) + low_rank * self.scale

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


# -----------------------------------------------------------------------------
# model loading: Meta dirs (params.json + consolidated.pth) and Hugging Face LLaMA dirs (config.json + safetensors)
# go into a model built on the meta device, tensor by tensor: no rank ever makes a random full-size model first

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_state(model, state, source, partial=False):
    """Load `state` into `model`, strictly but for value-head and LoRA keys (absent from policy checkpoints and
    Meta files, freshly initialised then) — and any key when `partial` (a LoRA run saves only what it trains);
    a mismatch is a UserError naming the source and the keys. A model on the meta device takes the tensors
    themselves (assign), in their dtype; a materialised one copies them into its own."""
    own = model.state_dict()
    optional = lambda k: partial or k.startswith("value_head.") or ".lora_" in k
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if k not in state and not optional(k)]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or missing or shapes:
        problems = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                    f"shape {shapes[:2]}" if shapes else ""]
        raise UserError(f"{source}: does not match the model ({'; '.join(p for p in problems if p)}) "
                        "— another model size?")
    model.load_state_dict(state, strict=False, assign=any(p.is_meta for p in model.parameters()))


def meta_device_model(args, value_head=False, memory_efficient_loss=True):
    """The architecture without storage: shapes to check against, and a model for load_state to fill."""
    with torch.device("meta"):
        return MTPTransformer(args, value_head, memory_efficient_loss)


def model_args_from_meta(model_dir):
    path = Path(model_dir) / "params.json"
    params = read_json(path)
    known = {f.name for f in dataclasses.fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in params.items() if k in known})


def read_consolidated(model_dir):
    """(path, state) of a Meta dir's consolidated.pth, memory-mapped; unreadable is a one-line UserError."""
    path = Path(model_dir) / "consolidated.pth"
    try:
        return path, torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({e})")


def load_meta_weights(model, model_dir):
    path, state = read_consolidated(model_dir)
    load_state(model, state, f"{path} (vs params.json)")


def read_meta_dir(model_dir, dtype):
    """(args, state) of a Meta dir: checked against params.json, each tensor copied out of the memory-mapped file
    in `dtype` (so the model never holds pages of a file that may be replaced)."""
    args = model_args_from_meta(model_dir)
    path, state = read_consolidated(model_dir)
    load_state(meta_device_model(args), state, f"{path} (vs params.json)")  # shapes only: nothing is allocated
    return args, {k: v.to(dtype, copy=True) for k, v in state.items()}


HF_BLOCK = [("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
            ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
            ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
            ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
            ("post_attention_layernorm", "ffn_norm")]


def hf_key_map(n_layers, tied):
    """{Hugging Face tensor name: Meta name} for a next-token LLaMA of n_layers blocks."""
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    if not tied:
        names["lm_head.weight"] = "output.weight"
    for i in range(n_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"layers.{i}.{meta}.weight" for hf, meta in HF_BLOCK})
    return names


def rotary_to_meta(w, n_heads):
    """HF orders each head's q/k rows as [first halves | second halves] for its rotate-half RoPE; Meta interleaves
    the pairs: HF row h·d + c·d/2 + i is Meta row h·d + 2i + c (inverse of transformers' conversion `permute`)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def rotary_to_hf(w, n_heads):
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def model_args_from_hf(model_dir):
    """(ModelArgs of a one-head model, tie_word_embeddings) from config.json; what we cannot compute is an error."""
    path = Path(model_dir) / "config.json"
    c = read_json(path)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers >= 5 keeps rope_theta in there
    rope_theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    try:
        dim, n_heads = c["hidden_size"], c["num_attention_heads"]
        n_kv = c.get("num_key_value_heads") or n_heads
        args = ModelArgs(dim=dim, n_layers=c["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv,
                         vocab_size=c["vocab_size"], hidden_dim=c["intermediate_size"],
                         norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=rope_theta,
                         max_seq_len=c.get("max_position_embeddings"), n_future_tokens=1)
    except KeyError as e:
        raise UserError(f"{path}: missing {e}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    checks = [(c.get("model_type", "llama") == "llama", f"model_type {c.get('model_type')!r}"),
              (c.get("hidden_act", "silu") == "silu", f"hidden_act {c.get('hidden_act')!r}"),
              (not c.get("attention_bias") and not c.get("mlp_bias"), "biases"),
              (rope_type == "default", f"rope_type {rope_type!r}"),
              (c.get("head_dim", dim // n_heads) == dim // n_heads, f"head_dim {c.get('head_dim')} != {dim}/{n_heads}"),
              (dim % (2 * n_heads) == 0 and n_heads % n_kv == 0, f"{n_heads} heads, {n_kv} kv heads of dim {dim}")]
    unsupported = [what for ok, what in checks if not ok]
    if unsupported:
        raise UserError(f"{path}: not a LLaMA this trainer computes exactly ({', '.join(unsupported)})")
    return args, bool(c.get("tie_word_embeddings", False))


def hf_weight_files(model_dir):
    """{tensor name: safetensors file}: the shards model.safetensors.index.json names, or model.safetensors."""
    from safetensors import safe_open
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map' of tensor names to files")
        return {name: Path(model_dir) / file for name, file in weight_map.items()}
    single = Path(model_dir) / "model.safetensors"
    if not single.exists():
        raise UserError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                        "(a pytorch_model.bin must be converted to safetensors first)")
    try:
        with safe_open(str(single), framework="pt", device="cpu") as f:
            return {name: single for name in f.keys()}
    except Exception as e:
        raise UserError(f"{single}: not a readable safetensors file ({e})")


def read_hf_dir(model_dir, dtype):
    """(args, state in Meta names) of a Hugging Face LLaMA dir. Names and shapes are checked against config.json
    before any tensor is read; then the memory-mapped files give one tensor at a time, cast to dtype, q/k rows
    put back in Meta's RoPE order; a tied lm_head becomes a copy of the embedding."""
    from safetensors import safe_open
    args, tied = model_args_from_hf(model_dir)
    names, files = hf_key_map(args.n_layers, tied), hf_weight_files(model_dir)
    ignored = {n for n in files if n.endswith("rotary_emb.inv_freq") or (tied and n == "lm_head.weight")}
    missing = [n for n in names if n not in files]
    unexpected = [n for n in files if n not in names and n not in ignored]
    if missing or unexpected:
        what = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else ""]
        raise UserError(f"{model_dir}: tensors do not match config.json ({'; '.join(w for w in what if w)})")
    expected, state = meta_device_model(args).state_dict(), {}
    for path in sorted(set(files[n] for n in names)):
        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:
            raise UserError(f"{path}: not a readable safetensors file ({e})")
        for name in [n for n in names if files[n] == path]:
            meta = names[name]
            if name not in f.keys():
                raise UserError(f"{path}: has no tensor {name}, which model.safetensors.index.json places there")
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(expected[meta].shape):
                raise UserError(f"{path}: {name} has shape {shape}, config.json implies {tuple(expected[meta].shape)}")
            w = f.get_tensor(name).to(dtype)
            if meta.endswith(("wq.weight", "wk.weight")):
                w = rotary_to_meta(w, args.n_heads if meta.endswith("wq.weight") else args.n_kv_heads)
            state[meta] = w
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    return args, state


def with_heads(args, state, H, source):
    """Re-head a checkpoint for H future tokens (Gloeckle et al.'s fine-tuning setting): the trunk and head 0 stay;
    a head the checkpoint lacks starts as a copy of head 0's block (the last of `layers`), so head 0 still gives
    the checkpoint's own logits; heads beyond H are dropped."""
    own = args.n_future_tokens
    if H == own:
        return args, state
    n_blocks = args.n_layers - own + 1  # trunk + head 0
    head0 = f"layers.{n_blocks - 1}."
    state = {k: v for k, v in state.items() if not (k.startswith("extra_heads.") and int(k.split(".")[1]) >= H - 1)}
    for j in range(own - 1, H - 1):
        block = {k[len(head0):]: v for k, v in state.items() if k.startswith(head0)}
        state.update({f"extra_heads.{j}.{k}": v.clone() for k, v in block.items()})
    change = (f"heads {own}..{H - 1} start as copies of head 0's block ({head0[:-1]})" if H > own
              else f"heads {H}..{own - 1} dropped")
    log.info(f"{source}: a {own}-head checkpoint as a {H}-head model: the trunk keeps {n_blocks - 1} blocks, {change}")
    return dataclasses.replace(args, n_layers=n_blocks + H - 1, n_future_tokens=H), state


def load_pretrained(path, n_future_tokens=None, dtype=torch.float32, value_head=False, memory_efficient_loss=True,
                    tokenizer=""):
    """(tokenizer or None, model) of a Meta or Hugging Face LLaMA directory, on the CPU, its weights in `dtype`
    (a value head, when asked for, fresh and fp32). n_future_tokens=None keeps the checkpoint's own head count,
    another H re-heads it (with_heads). `tokenizer`: a file to use instead of the directory's own."""
    d = Path(path)
    if not (d / "config.json").exists() and not (d / "params.json").exists():
        raise UserError(f"{d}: not a model directory (no config.json for Hugging Face, no params.json for Meta)")
    tok = load_tokenizer(tokenizer, d)
    args, state = read_hf_dir(d, dtype) if (d / "config.json").exists() else read_meta_dir(d, dtype)
    args, state = with_heads(args, state, n_future_tokens or args.n_future_tokens, d)
    if tok is not None and tok.vocab_size > args.vocab_size:
        raise UserError(f"{d}: its tokenizer has {tok.vocab_size} tokens, the model only {args.vocab_size}")
    model = meta_device_model(args, value_head, memory_efficient_loss)
    load_state(model, state, str(d))
    if value_head:
        model.value_head.to_empty(device="cpu")
        model.value_head.reset_parameters()
    return tok, model


def is_model_dir(path):
    return bool(path) and ((Path(path) / "params.json").exists() or (Path(path) / "config.json").exists())


def load_reference(path, vocab_size, dtype):
    """rho1's reference from a Meta or HF dir: its own architecture and size, one head, frozen weights in dtype."""
    _, reference = load_pretrained(path, n_future_tokens=1, dtype=dtype)
    if reference.args.vocab_size != vocab_size:
        raise UserError(f"reference.path: {path} has a vocabulary of {reference.args.vocab_size}, the policy "
                        f"{vocab_size}: the reference must share the policy's tokenizer")
    log.info(f"rho1 reference: {path} ({reference.args.n_layers} blocks, one head, {dtype})")
    return reference


def next_token_logits(model, tokens):
    """tokens [B,T] -> head 0's logits [B,T,V] in float32: the next-token distribution at every position."""
    logits, _ = model(tokens.to(model.tok_embeddings.weight.device), n_heads=1)
    return logits[:, :, 0].float()


def cast_frozen(model, dtype):
    """Frozen weights (a LoRA base, the critic's trunk) in `dtype` — bf16 halves them; trainable ones stay fp32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def micro_args(cfg, vocab_size):
    m, H = cfg.model.micro, cfg.model.n_future_tokens
    return ModelArgs(dim=m.dim, n_layers=m.n_trunk_layers + H, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                     vocab_size=m.vocab_size or vocab_size, multiple_of=m.multiple_of, norm_eps=m.norm_eps,
                     rope_theta=m.rope_theta, n_future_tokens=H)


def build_model(cfg, use_micro, value_head):
    """(tokenizer, model): the micro model (random init from training.seed, byte tokenizer) or model.path (a Meta
    or HF dir, re-headed to model.n_future_tokens), with LoRA adapters when model.lora.rank > 0 — built before any
    checkpoint loads into it. Under LoRA the frozen base is held in model.dtype (read straight into it)."""
    mcfg = cfg.model
    torch.manual_seed(cfg.training.seed)  # every rank builds the same initial weights
    lora, frozen = mcfg.lora.rank > 0, DTYPES[mcfg.dtype]
    if use_micro or not mcfg.path:
        tok = ByteTokenizer()
        model = MTPTransformer(micro_args(cfg, tok.vocab_size), value_head, mcfg.memory_efficient_loss)
    else:
        tok, model = load_meta_model(mcfg, value_head, frozen if lora else torch.float32)
    if lora:
        apply_lora(model, mcfg.lora.rank, mcfg.lora.alpha)
        cast_frozen(model, frozen)
    return tok, model


def load_meta_model(mcfg, value_head, dtype=torch.float32):
    """model.path, a Meta or Hugging Face dir, with its tokenizer (model.tokenizer, else the dir's own)."""
    tok, model = load_pretrained(mcfg.path, mcfg.n_future_tokens, dtype, value_head,
                                 mcfg.memory_efficient_loss, mcfg.tokenizer)
    if tok is None:
        raise UserError(f"model.tokenizer: {mcfg.path} has no tokenizer.model or tokenizer.json "
                        "(set model.tokenizer)")
    return tok, model


def merged_state(model):
    """The policy's weights in Meta names: LoRA merged into its base, the value head left out."""
    state = {f"{name}.weight": m.merged_weight().detach()
             for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for key, value in model.state_dict().items():
        if not key.startswith("value_head.") and ".lora_" not in key:
            state.setdefault(key, value.detach())
    return {k: v.cpu() for k, v in state.items()}


def save_meta(model, out_dir):
    """Write params.json + consolidated.pth in Meta's layout: LoRA merged in, value head left out; params.json
    holds only the fields that are set, as Meta's own do."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "consolidated.pth.tmp"
    torch.save(merged_state(model), tmp)
    os.replace(tmp, out_dir / "consolidated.pth")
    params = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    (out_dir / "params.json").write_text(json.dumps(params, indent=2))


def save_hf(model, out_dir, tok=None, max_shard_bytes=5 * 2**30):
    """Write a Hugging Face LLaMA dir of head 0's next-token model (HF's LLaMA has no extra heads: Meta's format
    keeps them): config.json + model.safetensors, or shards + model.safetensors.index.json past max_shard_bytes."""
    from safetensors.torch import save_file
    a, meta = model.args, merged_state(model)
    n_blocks = a.n_layers - a.n_future_tokens + 1
    state = {}
    for hf, name in hf_key_map(n_blocks, tied=False).items():
        w = meta[name]
        if name.endswith(("wq.weight", "wk.weight")):
            w = rotary_to_hf(w, a.n_heads if name.endswith("wq.weight") else a.n_kv_heads or a.n_heads)
        state[hf] = w.contiguous()
    shards, size = [[]], 0
    for name, w in state.items():
        if shards[-1] and size + w.nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += w.nbytes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        save_file({n: state[n] for n in names}, str(out_dir / file), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(w.nbytes for w in state.values())},
                 "weight_map": {n: file for file, names in zip(files, shards) for n in names}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.dim,
              "intermediate_size": meta["layers.0.feed_forward.w1.weight"].shape[0], "num_hidden_layers": n_blocks,
              "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_kv_heads or a.n_heads,
              "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps, "rope_theta": a.rope_theta, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": str(meta["norm.weight"].dtype).removeprefix("torch.")}
    config.update({"max_position_embeddings": a.max_seq_len} if a.max_seq_len else {})
    config.update({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id} if tok is not None else {})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def policy_from_checkpoint(state, cfg, use_micro, source):
    """The policy a trainer checkpoint holds, value head dropped. A full one needs only its model_args; a LoRA one
    (model_partial) is its adapters over the base model.path (or the micro model's seeded init), rebuilt in fp32."""
    args = ModelArgs(**state["model_args"])
    weights = {k: v for k, v in state["model"].items() if not k.startswith("value_head.")}
    if not state.get("model_partial"):
        model = meta_device_model(args)
        load_state(model, weights, source)
        return model
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
    _, model = build_model(cfg, use_micro, value_head=False)
    if model.args != args:
        raise UserError(f"{source}: trained on {args}, but its config rebuilds {model.args} as the LoRA base "
                        "(pass the run's --config, or --use-micro-model for a micro-model run)")
    load_state(model, weights, source, partial=True)
    return model


def copy_tokenizer_files(source, out_dir):
    """The tokenizer (a given file, or the dir's tokenizer.model / tokenizer.json) and the JSON beside it that names
    BOS/EOS, so an exported dir is complete."""
    folder = source if source.is_dir() else source.parent
    names = ["tokenizer.model", "tokenizer.json"] if source.is_dir() else [source.name]
    for name in names + ["tokenizer_config.json", "special_tokens_map.json"]:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, Path(out_dir) / name)


def export(checkpoint, fmt, out, config="", use_micro=False):
    """Write a trainer checkpoint's policy (LoRA merged, value head left out) as a Hugging Face or Meta model dir,
    with the base model's tokenizer files. Everything goes to a temporary dir renamed to `out` at the end: an
    error leaves nothing behind."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty directory")
    try:
        path = s3ckpt.resolve_checkpoint(checkpoint, Path(tempfile.gettempdir()) / "wmtp-export-cache",
                                         tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")
        state = s3ckpt.load_checkpoint(path)
    except s3ckpt.CheckpointError as e:
        raise UserError(str(e))
    lacking = [k for k in ("model", "config", "model_args") if not isinstance(state, dict) or k not in state]
    if lacking:
        raise UserError(f"{path}: not a trainer checkpoint (no {', '.join(lacking)})")
    cfg = load_config(config) if config else config_from_dict(state["config"], f"{path} (its config)")
    model = policy_from_checkpoint(state, cfg, use_micro, path)
    mcfg = cfg.model
    tok = None if use_micro or not mcfg.path else load_tokenizer(mcfg.tokenizer, mcfg.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "hf":
            save_hf(model, tmp, tok)
        else:
            save_meta(model, tmp)
        if tok is not None:
            copy_tokenizer_files(Path(mcfg.tokenizer or mcfg.path), tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    heads = "head 0 (HF's LLaMA has no extra heads)" if fmt == "hf" else f"{model.args.n_future_tokens} heads"
    log.info(f"exported {path} -> {out} ({fmt}: {heads}{', LoRA merged' if state.get('model_partial') else ''})")
    return out


# -----------------------------------------------------------------------------
# data: JSONL records {instruction, input?, output, is_correct?, task_id?, metadata?}, Alpaca template

ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n"
          "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


# plain: the instruction and input on a line each, the answer right after: a built-in addition is then 10-11 tokens
# of which 3-4 are trained, where Alpaca's ~150 would buy a step no more signal at 14x the compute.
TEMPLATES = {"alpaca": (ALPACA, ALPACA_NO_INPUT), "plain": ("{instruction}\n{input}\n", "{instruction}\n")}


def render_prompt(record, template="alpaca"):
    """The prompt of a record in dataset.template (training, validation and evaluate all render it here)."""
    with_input, without_input = TEMPLATES[template]
    text = with_input if record.get("input") else without_input
    return text.format(instruction=record["instruction"], input=record.get("input", ""))


def arith_records(split):
    """Two-digit additions, the instruction the problem itself (operands zero-padded: 07+35, so digits sit at fixed
    places; no words around it: 10-11 tokens with the plain template), each once with its sum
    (is_correct) and once with a near miss (is_correct: false).
    The 10 000 problems are shuffled with a fixed seed: the first 1 000 are held out (validation, eval), the rest
    train."""
    rng = random.Random(1234)
    problems = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(problems)
    records = []
    for a, b in problems[1000:] if split == "train" else problems[:1000]:
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        wrong = wrong if wrong >= 0 else a + b + 1
        for output, ok in ((str(a + b), True), (str(wrong), False)):
            records.append({"instruction": f"{a:02d}+{b:02d}", "output": output, "is_correct": ok,
                            "task_id": f"arith-{a}-{b}", "metadata": {"difficulty": len(str(max(a, b)))}})
    return records


def check_arith(record, answer):
    a, b = record["instruction"].split("+")
    return answer.strip() == str(int(a) + int(b))


# (name, what f returns, argument, right body, wrong bodies, constants): {n} is the task's constant, {m} another one.
# Short words, and only the expression f returns to write: a task is ~35 bytes, thousands of them in a CPU minute
PYFUNC_TEMPLATES = [
    ("add", "x plus {n}", "x", "x + {n}", ["x - {n}", "x + {m}"], range(1, 100)),
    ("sub", "x minus {n}", "x", "x - {n}", ["x + {n}", "{n} - x", "x - {m}"], range(1, 100)),
    ("rsub", "{n} minus x", "x", "{n} - x", ["x - {n}", "{m} - x"], range(1, 100)),
    ("mul", "x times {n}", "x", "x * {n}", ["x + {n}", "x * {m}"], range(2, 50)),
    ("floordiv", "x divided by {n}, rounded down", "x", "x // {n}", ["x % {n}", "x / {n}", "x // {m}"], range(2, 30)),
    ("mod", "x modulo {n}", "x", "x % {n}", ["x // {n}", "x % {m}"], range(2, 30)),
    ("max", "the larger of x and {n}", "x", "max(x, {n})", ["min(x, {n})", "max(x, {m})"], range(0, 60)),
    ("min", "the smaller of x and {n}", "x", "min(x, {n})", ["max(x, {n})", "min(x, {m})"], range(0, 60)),
    ("gt", "whether x exceeds {n}", "x", "x > {n}", ["x < {n}", "x >= {n}"], range(0, 60)),
    ("divisible", "whether {n} divides x", "x", "x % {n} == 0", ["x % {n} != 0", "x // {n} == 0"], range(2, 20)),
    ("head", "the first {n} characters of s", "s", "s[:{n}]", ["s[{n}:]", "s[:{m}]"], range(1, 12)),
    ("tail", "the last {n} characters of s", "s", "s[-{n}:]", ["s[:{n}]", "s[-{m}:]"], range(1, 12)),
    ("drop", "s without its first {n} characters", "s", "s[{n}:]", ["s[:{n}]", "s[{m}:]"], range(1, 12)),
    ("repeat", "s repeated {n} times", "s", "s * {n}", ["s * {m}", "s + s"], range(2, 10)),
    ("char", "the character at index {n} of s", "s", "s[{n}]", ["s[{m}]", "s[-{n}]"], range(0, 12)),
    ("longer", "whether s is longer than {n}", "s", "len(s) > {n}", ["len(s) < {n}", "len(s) >= {n}"], range(0, 15)),
    ("count", "how often {n} occurs in s", "s", "s.count('{n}')", ["s.count('{m}')", "len(s)"],
     "abcdefghijklmnopqrstuvwxyz"),
    ("sum", "the sum of xs plus {n}", "xs", "sum(xs) + {n}", ["sum(xs) - {n}", "len(xs) + {n}"], range(0, 60)),
    ("addeach", "xs with {n} added to each", "xs", "[v + {n} for v in xs]",
     ["[v - {n} for v in xs]", "[v + {m} for v in xs]"], range(1, 60)),
    ("above", "the elements of xs above {n}", "xs", "[v for v in xs if v > {n}]",
     ["[v for v in xs if v < {n}]", "[v for v in xs if v >= {n}]"], range(0, 60)),
]
PYFUNC_INPUTS = {"x": [0, 1, 2, 7, 12, 30, 45, -5],
                 "s": ["", "a", "hello", "banana", "abcdefghijkl", "python code", "mississippi river",
                       "the quick brown fox jumps over the lazy dog"],
                 "xs": [[], [1, 2, 3], [5, -2, 40, 7], [30, 31, 0, 12]]}


def pyfunc_task(template, i):
    """(task_id, instruction, code prefix, right solution, [wrong solutions], assert test) for constant number i of
    a template; a solution is the expression f returns, the code prefix the def line before it.
    Tests use the inputs the right solution handles; a wrong solution is kept only if some test tells it apart."""
    name, what, arg, body, wrong_bodies, constants = template
    n, m = constants[i], constants[(i + 1) % len(constants)]

    def results(code):  # our own template code, trusted: evaluated here to compute the tests' expected values
        f = eval(f"lambda {arg}: {code.format(n=n, m=m)}")
        return [_result_or_error(f, value) for value in PYFUNC_INPUTS[arg]]

    want = results(body)
    test = "def check(f):\n" + "".join(f"    assert f({value!r}) == {w!r}\n"
                                       for value, w in zip(PYFUNC_INPUTS[arg], want) if not isinstance(w, Exception))
    wrong = [w for w in wrong_bodies if [r for r, ok in zip(results(w), want) if not isinstance(ok, Exception)]
             != [ok for ok in want if not isinstance(ok, Exception)]]
    return (f"pyfunc-{name}-{n}", f"f({arg}) returns {what.format(n=n)}", f"def f({arg}): return ",
            body.format(n=n, m=m), [w.format(n=n, m=m) for w in wrong], test)


def _result_or_error(f, value):
    try:
        return f(value)
    except Exception as e:
        return e


def pyfunc_records(split):
    """Small Python functions from templates (x plus 7, the first 3 characters of s, ...) with assert tests
    (metadata.test, entry_point f); the answer is the expression after metadata.code_prefix (def f(x): return ).
    Each task once with its right solution (is_correct) and once with a wrong one
    that its tests reject. The 872 tasks are shuffled with a fixed seed: the first 64 are held out (validation,
    eval; few, since evaluating runs each of them)."""
    tasks = [pyfunc_task(t, i) for t in PYFUNC_TEMPLATES for i in range(len(t[5]))]
    rng = random.Random(1234)
    rng.shuffle(tasks)
    cut = 64
    records = []
    for task_id, instruction, prefix, right, wrongs, test in tasks[cut:] if split == "train" else tasks[:cut]:
        metadata = {"test": test, "entry_point": "f", "code_prefix": prefix}
        for output, ok in ((right, True), (rng.choice(wrongs), False)):
            records.append({"instruction": instruction, "input": "", "output": output, "is_correct": ok,
                            "task_id": task_id, "metadata": metadata})
    return records


def check_pyfunc(record, answer):
    """Runs the answer against the record's tests in the sandbox (sandbox.py): True when they all pass."""
    import sandbox  # no torch there; imported here so training on other data never loads it
    limits = sandbox.Limits(timeout_s=5.0, memory_mb=512, cpu_s=5)
    return all(sandbox.run_program(p, limits).status == "passed" for p in sandbox.programs(record, answer))


BUILTIN = {"arith": (arith_records, check_arith), "pyfunc": (pyfunc_records, check_pyfunc)}


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


def load_records(spec, split, key=None):
    """(records, checker or None) for a JSONL path or builtin:<name>[*<times>][+<name>...] (several built-ins,
    concatenated, each <times> over — the mixture's weights; each record carries _source builtin:<name>, and the
    checker asks that built-in's); split: train or validation; key names the config key in errors (default
    dataset.<split>)."""
    if not spec.startswith("builtin:"):
        return read_jsonl(spec), None
    records = []
    for part in spec.split(":", 1)[1].split("+"):
        name, star, times = part.partition("*")
        if name not in BUILTIN:
            raise UserError(f"{key or 'dataset.' + split}: unknown built-in dataset '{name}' "
                            f"(known: {', '.join(BUILTIN)})")
        if star and not (times.isdigit() and int(times) >= 1):
            raise UserError(f"{key or 'dataset.' + split}: '{part}': the count after * must be a whole number >= 1")
        records += [{**r, "_source": f"builtin:{name}"} for r in BUILTIN[name][0](split)] * int(times or 1)
    return records, check_builtin


def check_builtin(record, answer):
    return BUILTIN[record["_source"].split(":", 1)[1]][1](record, answer)


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


def encode_records(records, tok, max_length, on_overlong, source, template="alpaca"):
    """[(ids, labels, reward, record)]: [BOS] prompt response [EOS], labels -100 on BOS and prompt."""
    examples, truncated = [], 0
    for record in records:
        prompt = [tok.bos_id] + tok.encode(render_prompt(record, template))
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


GROUP_WINDOW = 32  # batches per window that length grouping sorts: wide enough to group, narrow enough to mix


def length_grouped(order, lengths, size, seed):
    """The order cut into windows of GROUP_WINDOW·size examples, each window sorted by length and cut into batches,
    the window's batches then shuffled (seeded): each batch holds examples of similar length, so little of it is
    padding, while every window keeps the order's random mix of examples."""
    g = torch.Generator().manual_seed(seed)
    grouped = []
    for start in range(0, len(order), GROUP_WINDOW * size):
        window = sorted(order[start:start + GROUP_WINDOW * size], key=lambda i: (lengths[i] - 1).bit_length())
        batches = [window[i:i + size] for i in range(0, len(window), size)]
        grouped += [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]
    return grouped


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
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def experiment_artifact_location(cfg, uri):
    """Where a self-created experiment keeps artifacts: mlflow.s3_artifacts when set; a tracking server decides
    for itself; a local sqlite store gets a mlartifacts/ folder beside its database (not the CWD)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.mlflow.experiment).strip("-")
    if cfg.mlflow.s3_artifacts:
        return None if uri.startswith("http") else cfg.mlflow.s3_artifacts.rstrip("/") + "/" + slug
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / slug).as_uri()
    return None


def experiment_id(client, cfg):
    """The id of mlflow.experiment, created if needed, marked as model development (else MLflow 3's UI opens it as
    a GenAI experiment: an empty Traces page)."""
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        cfg.mlflow.experiment, artifact_location=experiment_artifact_location(cfg, tracking_uri(cfg)))
    if not exp or EXPERIMENT_KIND not in exp.tags:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND, "custom_model_development")
    return exp_id


def log_params(client, run_id, params):
    """params {name: value} on a run: values as text cut to MLflow's 6000 characters, 100 per request (its limit)."""
    from mlflow.entities import Param
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def newest_run(client, experiment, where):
    """The newest run (by start time) of `experiment` that matches the MLflow filter `where`, or None. Every `auto`
    is one of these searches: a pipeline's newest finished run, or the newest unfinished run of this config."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], where, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def finished(pipeline):
    return f"tags.pipeline = '{pipeline}' and attributes.status = 'FINISHED'"


def resolve_uri(cfg, uri, pipeline_for_auto, artifact, cache_dir):
    """A checkpoint path, s3:// or runs:/ URI, or `auto` (the newest finished run of a pipeline) -> (local file,
    the URI it was downloaded from or None)."""
    uri_tracking = tracking_uri(cfg)
    if uri == "auto":
        from mlflow import MlflowClient
        run = newest_run(MlflowClient(uri_tracking), cfg.mlflow.experiment, finished(pipeline_for_auto))
        if run is None:
            raise UserError(f"no finished '{RUN_NAMES[pipeline_for_auto]}' run in experiment "
                            f"'{cfg.mlflow.experiment}': run the {pipeline_for_auto} pipeline first")
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


class Tracking:
    """Rank 0's MLflow run, from its start (or resumption) to its end status, as one context manager: the experiment
    (created if needed), params, tags and config.yaml, metrics sent off the training thread, MLflow's system
    metrics, the checkpoint uploader and logs/training.log. Leaving it ends the run FINISHED, KILLED (preempted: the
    checkpoint to resume from is tagged first) or FAILED, with the metrics and uploads drained — whatever fails."""

    def __init__(self, cfg, run_name, run_dir_root, steps, resume_run_id=None, unsent_metrics=(), resumed=False):
        self.cfg, self.run_name, self.run_dir_root, self.steps = cfg, run_name, run_dir_root, steps
        self.run_id, self.unsent_metrics, self.resumed = resume_run_id, list(unsent_metrics), resumed
        self.client = self.metrics = self.uploader = self.system = self.file_log = None

    def __enter__(self):
        logged_through = 0
        if self.cfg.mlflow.enable_logging:
            logged_through = self._start_run()
        self.run_id = self.run_id or f"local-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.run_dir = self.run_dir_root / self.run_id
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file_log = logging.FileHandler(self.run_dir / "training.log")
        self.file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self.file_log)
        if self.client:
            self.metrics = MetricLogger(self.client, self.run_id, logged_through=logged_through)
            self.metrics.replay(self.unsent_metrics)
            self.system = self._start_system_metrics()
            c = self.cfg.checkpoint
            self.uploader = s3ckpt.CheckpointUploader(self.run_id, tracking_uri(self.cfg),
                                                      retry_budget_s=c.upload_retry_budget_s,
                                                      verify_etag=c.verify_etag)
        return self

    def _start_run(self):
        """A new run (tags, params, config.yaml) or the resumed one continued; returns the last step it logged."""
        from mlflow import MlflowClient
        cfg, uri = self.cfg, tracking_uri(self.cfg)
        self.client = MlflowClient(uri)
        exp_id = experiment_id(self.client, cfg)
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "train/loss")
            return max((m.step for m in history), default=0)
        tags = {"pipeline": cfg.experiment.pipeline, **{str(k): str(v) for k, v in cfg.mlflow.tags.items()}}
        if cfg.experiment.description:
            tags["mlflow.note.content"] = cfg.experiment.description
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id
        log_params(self.client, self.run_id, flatten(cfg.to_dict()))
        self.client.log_text(self.run_id, yaml.safe_dump(redacted(cfg.to_dict()), sort_keys=False), "config.yaml")
        return 0

    def _start_system_metrics(self):
        """MLflow's own monitor (CPU, memory, disk, network; GPU with nvidia-ml-py) on a thread."""
        interval = self.cfg.mlflow.system_metrics_interval_s
        if not interval:
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=self.resumed,
                                       tracking_uri=tracking_uri(self.cfg))
        monitor.start()
        return monitor

    def log(self, metrics, step):
        if self.metrics:
            self.metrics.log(metrics, step)

    def unsent(self):
        return self.metrics.unsent() if self.metrics else []

    def __exit__(self, exc_type, exc, tb):
        status, resume_from = log_outcome(exc_type, exc, tb, f"{self.cfg.experiment.pipeline}, run {self.run_id}")
        if self.system:
            self.system.finish()
        self._finish(status, resume_from)

    def _finish(self, status, resume_from):
        """Drain metrics and uploads (bounded: the preemption grace period when preempted), upload training.log
        through the same retrying uploader, tag what stayed only local, end the run."""
        client, run_id, uploader = self.client, self.run_id, self.uploader
        timeout = self.cfg.checkpoint.preempt_grace_s if status == "KILLED" else self.cfg.checkpoint.upload_timeout_s
        if client and resume_from:  # first, in case the grace period ends with a SIGKILL
            uri = f"runs:/{run_id}/checkpoints/{Path(resume_from).name}"
            client.set_tag(run_id, "resume_from", f"{uri} ({resume_from})")
            client.set_terminated(run_id, status)
        try:
            if self.metrics and not self.metrics.close(timeout=timeout):
                log.error("some metrics could not be sent to the tracking server")
            local_only = []
            if uploader:
                log.info(f"waiting up to {timeout}s for checkpoint uploads")
                local_only = [p for p in uploader.wait(timeout) if Path(p).exists()]  # pruned ones are not wanted
                if local_only:
                    log.error(f"checkpoints NOT uploaded, only local: {', '.join(local_only)}")
            self.file_log.close()
            log.removeHandler(self.file_log)
            if uploader:
                uploader.upload_to_s3_async(self.run_dir / "training.log", artifact_path="logs")
                local_only = [p for p in uploader.wait(min(timeout, 60)) if Path(p).exists()]
                uploader.close()
            if client:
                if local_only:
                    client.set_tag(run_id, "checkpoints_local_only", ", ".join(local_only))
                client.set_tag(run_id, "wmtp.steps", str(self.steps))
        finally:
            if client:
                client.set_terminated(run_id, status)


class NoTracking:
    """What ranks other than 0 get: the same interface, doing nothing but reporting how training ended."""
    run_id, uploader, run_dir = None, None, None

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __enter__(self):
        return self

    def log(self, metrics, step):
        pass

    def unsent(self):
        return []

    def __exit__(self, exc_type, exc, tb):
        log_outcome(exc_type, exc, tb, f"{self.pipeline}, run {self.run_id}")


def log_outcome(exc_type, exc, tb, what):
    """Logs how training ended; returns the run's end status and, when preempted, the checkpoint to resume from."""
    if exc_type is None:
        return "FINISHED", None
    if issubclass(exc_type, Preempted):
        log.warning(f"{exc}")
        return "KILLED", exc.checkpoint
    log.error(f"training failed ({what})", exc_info=(exc_type, exc, tb))
    return "FAILED", None


ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_S3_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def tracking_checks(cfg, timeout=5.0):
    """Yield (ok, line) for the guide's troubleshooting steps, in order, stopping at the first failure: server
    reachable (/health), credentials accepted by the API (/health answers 200 even to a wrong password),
    experiment visible, S3 artifact root writable (put + delete of a probe object)."""
    import requests
    uri = tracking_uri(cfg)
    experiment, artifact_root = cfg.mlflow.experiment, cfg.mlflow.s3_artifacts
    if uri.startswith("http"):
        try:
            requests.get(f"{uri}/health", timeout=timeout).raise_for_status()
        except requests.RequestException as e:
            yield False, (f"tracking server {uri} unreachable ({type(e).__name__}): is it up? "
                          f"is MLFLOW_TRACKING_URI right?")
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
    needed = tracking_uri(cfg).startswith("http") or cfg.mlflow.s3_artifacts.startswith("s3://")
    where = "found" if found else "not found (copy .env.example to .env)"
    lines = [(found or bool(set_vars) or not needed, f"{env_path} {where}; set: {', '.join(set_vars) or 'none'}")]
    lines += list(tracking_checks(cfg))
    for ok, line in lines:
        print(f"{'ok' if ok else 'FAIL':<4} {line}")
    return 0 if all(ok for ok, _ in lines) else 1


# -----------------------------------------------------------------------------
# the four pipelines: one object each owns what makes it different — value head or not, what it starts from, what
# it trains, its loss, its validation metrics, and its own state with that state's share of a checkpoint


def policy_ce(model, tokens, labels, H, values=False):
    targets = W.shift_targets(labels, H)
    ce, vals = model(tokens, targets, values=values)
    return ce, targets != -100, vals


def log_head_losses(meter, prefix, ce, valid):
    for k in range(ce.shape[-1]):
        meter.add(f"{prefix}/head_{k}_loss", (ce[..., k] * valid[..., k]).sum(), valid[..., k].sum())


class Baseline:
    """MTP on correct answers: loss = mtp_loss(ce, valid). The other pipelines change what differs from it."""
    name, run_name = "baseline", "baseline-mtp"
    value_head = False
    decodes = True  # validation also decodes answers (val/accuracy) when the dataset has a checker

    def __init__(self, cfg, H):
        self.cfg, self.t, self.H = cfg, cfg.training, H

    def start_from(self):
        """(checkpoint spec, the pipeline whose newest finished run `auto` names, the artifact of that run)."""
        return self.cfg.model.init_from, "baseline", "checkpoints/checkpoint_final.pt"

    def attach(self, model, fetch, build_model, device):
        """Called once the starting weights are in `model`: freeze what this pipeline does not train, build what
        it needs beside the model (`fetch(spec, pipeline, artifact)` gives a checkpoint file on this node)."""

    def loss(self, model, batch, meter, step):
        tokens, labels, _ = batch
        targets = W.shift_targets(labels, self.H)
        valid = targets != -100
        loss, ce, _ = model(tokens, targets, weigh=lambda values: (valid, None))  # W.mtp_loss(ce, valid)
        log_head_losses(meter, "train", ce, valid)
        return loss

    def begin_step(self):
        """Before a step's micro-batches: remember what a skipped step must leave unchanged."""

    def end_step(self, skip):
        """After the step's one collective: `skip` (a 0-d device bool) is set when the step was skipped."""

    def val_begin(self):
        pass

    def val_step(self, model, batch, meter):
        tokens, labels, _ = batch
        ce, valid, _ = policy_ce(model, tokens, labels, self.H)
        log_head_losses(meter, "val", ce, valid)

    def val_end(self, out, world):
        heads = [v for k, v in out.items() if k.startswith("val/head_")]
        out["val/loss"] = sum(heads) / len(heads)
        return out

    def state_dict(self):
        """This pipeline's share of a checkpoint (saved under "ema")."""
        return None

    def load_state_dict(self, state):
        pass


def critic_targets(model, batch, H, t):
    """(ce, valid, values, λ-return targets, value mask) for the critic's loss and its validation alike."""
    tokens, labels, rewards = batch
    ce, valid, values = policy_ce(model, tokens, labels, H, values=True)
    targets, value_mask = W.value_targets(values, rewards, labels != -100, t.gamma, t.critic_lambda)
    return ce, valid, values, targets, value_mask


class Critic(Baseline):
    """The value head alone learns (trunk and LM heads frozen): loss = value_loss(V, λ-returns of R = is_correct).
    Validation: val/loss (the value MSE), val/explained_variance and val/auc (do values rank right above wrong)."""
    name, run_name = "critic", "critic-pretrain"
    value_head, decodes = True, False

    def attach(self, model, fetch, build_model, device):
        model.requires_grad_(False)
        model.value_head.requires_grad_(True)
        cast_frozen(model, DTYPES[self.cfg.model.dtype])

    def loss(self, model, batch, meter, step):
        ce, valid, values, targets, value_mask = critic_targets(model, batch, self.H, self.t)  # CE for the metrics
        loss = W.value_loss(values, targets, value_mask)
        log_head_losses(meter, "train", ce.detach(), valid)
        meter.add("train/value_loss", loss.detach() * value_mask.sum(), value_mask.sum())
        return loss

    def val_begin(self):
        self.last_values, self.last_rewards = [], []

    def val_step(self, model, batch, meter):
        ce, valid, values, targets, vmask = critic_targets(model, batch, self.H, self.t)
        log_head_losses(meter, "val", ce, valid)
        err = (targets - values) * vmask
        meter.add("val/loss", err.pow(2).sum(), vmask.sum())
        for name, x in (("ev/t", targets * vmask), ("ev/t2", targets.pow(2) * vmask), ("ev/e", err),
                        ("ev/e2", err.pow(2))):
            meter.add(name, x.sum(), vmask.sum())
        # the value of the last state with a target: the whole answer seen, before its EOS
        last = (vmask * torch.arange(vmask.shape[1], device=vmask.device)).argmax(1)
        self.last_values += values.gather(1, last[:, None]).squeeze(1).tolist()
        self.last_rewards += batch[2].tolist()

    def val_end(self, out, world):
        """explained variance = 1 − Var(target − V) / Var(target) over value states; AUC over all ranks' answers."""
        var_t = out.pop("ev/t2") - out.pop("ev/t") ** 2
        var_e = out.pop("ev/e2") - out.pop("ev/e") ** 2
        out["val/explained_variance"] = 1.0 - var_e / var_t if var_t > 1e-12 else 0.0
        gathered = [(self.last_values, self.last_rewards)]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, (self.last_values, self.last_rewards))
        out["val/auc"] = auc([v for g in gathered for v in g[0]], [r for g in gathered for r in g[1]])
        return out


class Verifiable(Baseline):
    """w_tok = clamp(exp(whiten(GAE(δ))/β), w_min, w_max), whitening stats all-reduced then EMA-smoothed;
    loss = mtp_loss(ce, valid, heads_from_tokens(w_tok)) + value_coef · value_loss. Starts from the critic."""
    name, run_name = "verifiable", "verifiable-wmtp"
    value_head = True

    def __init__(self, cfg, H):
        super().__init__(cfg, H)
        self.ema = self.ema_before = None  # running mean/var of the advantages

    def start_from(self):
        return self.cfg.critic.checkpoint, "critic", "checkpoints/checkpoint_best.pt"

    def loss(self, model, batch, meter, step):
        t, H = self.t, self.H
        tokens, labels, rewards = batch
        head_targets, mask = W.shift_targets(labels, H), labels != -100
        valid = head_targets != -100
        policy_valid = valid if t.policy_on_incorrect else valid & (rewards > 0)[:, None, None]
        found = {}  # what weigh() computes, for the metrics

        def weigh(values):  # the model calls it with the value head's output (detached), before any CE
            td = W.td_errors(values, rewards, mask, t.gamma)
            adv = W.gae(td, mask, t.gamma, t.td_lambda)
            n, s, s2 = all_reduce(torch.stack([mask.sum().float(), (adv * mask).sum(), (adv.pow(2) * mask).sum()]))
            mean = s / n.clamp(min=1)
            var = (s2 / n.clamp(min=1) - mean.pow(2)).clamp(min=0)
            self.ema = W.ema_update(self.ema, mean, var, t.td_ema_momentum)
            if step >= t.td_ema_warmup_steps:
                mean, var = self.ema["mean"], self.ema["var"]
            w_tok = W.exp_weights(W.whiten(adv, mask, mean, var.sqrt()), mask, t.beta, t.weight_clip_min,
                                  t.weight_clip_max)
            found.update(td=td, w_tok=w_tok)
            return policy_valid, W.heads_from_tokens(w_tok, H)

        policy, ce, values = model(tokens, head_targets, values=True, weigh=weigh)
        td, w_tok = found["td"], found["w_tok"]
        targets, value_mask = W.value_targets(values, rewards, mask, t.gamma, t.td_lambda)
        v_loss = W.value_loss(values, targets, value_mask)
        n_tok = mask.sum()
        log_head_losses(meter, "train", ce, valid)
        meter.add("train/value_loss", v_loss.detach() * value_mask.sum(), value_mask.sum())
        meter.add("train/td_error_mean", (td * mask).sum(), n_tok)
        meter.add("train/weight_mean", (w_tok * mask).sum(), n_tok)
        meter.add("train/weight_entropy", W.weight_entropy(w_tok, mask), 1)
        meter.extreme("train/weight_min", w_tok.masked_fill(~mask, float("inf")).min(), torch.minimum)
        meter.extreme("train/weight_max", w_tok.masked_fill(~mask, float("-inf")).max(), torch.maximum)
        return policy + t.value_coef * v_loss

    def begin_step(self):
        self.ema_before = self.ema

    def end_step(self, skip):
        """A skipped step leaves the TD statistics as they were, on the device (one sync: the very first step)."""
        before = self.ema_before
        if self.ema is before:
            return
        self.ema = ({k: torch.where(skip, before[k], v) for k, v in self.ema.items()} if before
                    else None if skip.item() else self.ema)

    def state_dict(self):
        return self.ema

    def load_state_dict(self, state):
        self.ema = state


class Rho1(Baseline):
    """Keep, per head, the top k_percent tokens by excess loss ce_policy − ce_reference; average CE over them. The
    reference is a frozen next-token model: reference.path, the newest baseline, or a copy of the starting policy."""
    name, run_name = "rho1", "rho1-wmtp"

    def attach(self, model, fetch, build_model, device):
        ref, dtype = self.cfg.reference.path, DTYPES[self.cfg.model.dtype]
        if is_model_dir(ref):  # a Meta or HF dir: its own architecture (a smaller model, say), one head
            self.reference = load_reference(ref, model.args.vocab_size, dtype)
        else:
            self.reference = build_model()  # the policy's architecture, LoRA included
            if ref:
                load_checkpoint_into(self.reference, fetch(ref, "baseline", "checkpoints/checkpoint_final.pt"))
            else:  # also when resuming: the frozen copy is the *starting* policy
                self.reference.load_state_dict(model.state_dict())
        self.reference.requires_grad_(False).eval().to(device, dtype)

    def loss(self, model, batch, meter, step):
        H, ratio = self.H, self.t.k_percent
        tokens, labels, _ = batch
        with torch.inference_mode():
            ce_ref, _ = self.reference(tokens, W.shift_targets(labels, 1), n_heads=1)
        ref = W.reference_ce_to_heads(ce_ref[..., 0].clone(), H)  # clone: inference tensors may not enter autograd
        targets = W.shift_targets(labels, H)
        valid = targets != -100

        chosen = {}  # head k -> its 0/1 weights, kept for the metrics

        def selected(k, ce_k):  # head k's top tokens by excess loss, from its own detached CE [B,T]
            chosen[k] = W.topk_weights(W.excess_loss(ce_k, ref[..., k])[..., None], valid[..., k, None], ratio)[..., 0]
            return valid[..., k] & (chosen[k] > 0)

        loss, ce, _ = model(tokens, targets, weigh=lambda values: (selected, None))  # mtp_loss(ce, valid & (w > 0))
        excess = W.excess_loss(ce, ref)
        w = torch.stack([chosen[k] for k in range(ce.shape[-1])], dim=-1)
        log_head_losses(meter, "train", ce, valid)
        meter.add("train/excess_loss_mean", (excess * valid).sum(), valid.sum())
        meter.add("train/weight_sparsity", W.weight_sparsity(w, valid) * valid.sum(), valid.sum())
        return loss


PIPELINE_TYPES = {p.name: p for p in (Baseline, Critic, Verifiable, Rho1)}  # a fifth pipeline: one class, one entry
PIPELINES = tuple(PIPELINE_TYPES)
RUN_NAMES = {name: p.run_name for name, p in PIPELINE_TYPES.items()}


# -----------------------------------------------------------------------------
# validation: val/loss (+ heads), accuracy by greedy decoding, and the critic's explained variance and AUC


def batches_of(examples, size):
    return [examples[i:i + size] for i in range(0, len(examples), size)]


class Validation:
    """Validation on this rank's share of the examples, every eval_interval steps and at the end; the pipeline
    decides what it measures. Decoding pipelines add val/accuracy and val/pass@1 (decoded_metrics); test programs
    run under eval's sandbox limits, and a validation record with malformed tests fails here, before training."""

    def __init__(self, setup, autocast):
        self.pipeline, self.examples, self.checker = setup.pipeline, setup.val_examples, setup.checker
        self.tok = setup.tok
        self.interval, self.batch_size = setup.cfg.training.eval_interval, setup.cfg.training.batch_size
        self.rank, self.world, self.device, self.autocast = setup.rank, setup.world, setup.device, autocast
        e = setup.cfg.eval
        self.workers = e.workers or os.cpu_count() or 1
        self.limits = None
        if self.pipeline.decodes and any(has_tests(ex[3]) for ex in self.examples):
            import sandbox
            self.limits = sandbox.Limits(timeout_s=e.timeout_s, memory_mb=e.memory_mb, cpu_s=math.ceil(e.timeout_s))
            try:
                for ex in self.examples:
                    if has_tests(ex[3]):
                        sandbox.programs(ex[3], "")
            except sandbox.TaskError as err:
                raise UserError(str(err))

    def due(self, done, total):
        return bool(self.interval and done % self.interval == 0) or done == total

    @torch.no_grad()
    def run(self, model):
        model.eval()
        meter, mine = Meter(self.device), self.examples[self.rank::self.world]
        self.pipeline.val_begin()
        with gathered(model) if is_sharded(model) else contextlib.nullcontext():
            for chunk in batches_of(mine, self.batch_size):
                with self.autocast():
                    self.pipeline.val_step(model, collate(chunk, self.tok.pad_id, self.device), meter)
            out = self.pipeline.val_end(meter.reduce(), self.world)
            if self.pipeline.decodes:
                out.update(decoded_metrics(model, mine, self.checker, self.tok, self.device, self.autocast,
                                           self.limits, self.workers))
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


def next_token(logits, temperature, top_p, generator):
    """argmax when temperature is 0; else a draw from softmax(logits / temperature) cut to the nucleus (Holtzman et
    al. 2020): the most likely tokens up to and including the first whose cumulative probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0.0  # the tokens before it already reach top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, eos_id, pad_id, max_new_tokens, temperature=0.0, top_p=1.0, generator=None):
    """Continue each prompt (a list of token ids) with head 0, batched, through a KV cache: one forward over the
    prompts, then one token per row per step. Returns each completion's ids up to and excluding EOS, at most
    max_new_tokens. Sampling draws from `generator` (on the model's device) when temperature > 0.

    Right padding with per-row positions: row b's token at position p sits in cache slot p, so its slots hold its
    own tokens only, RoPE reads the same angle tables as training, and one mask (slot <= position) serves the
    prompt forward and every step. The pads after a short prompt are written to slots its next tokens overwrite
    before any query can read them."""
    if not prompts or not all(prompts):
        raise ValueError("generate: needs at least one prompt, and every prompt at least one token (BOS)")
    device = model.output.weight.device
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else model.output.weight.dtype  # what wk, wv give
    B, width = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.full((B, width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    cache = KVCache(model, B, width + max_new_tokens, dtype, device)
    logits = model.next_logits(tokens, torch.arange(width, device=device).expand(B, width), width, cache, lengths - 1)
    out = torch.full((B, max_new_tokens), eos_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt = torch.where(done, eos_id, next_token(logits, temperature, top_p, generator))  # a finished row stays put
        out[:, step] = nxt
        done |= nxt == eos_id
        if step == max_new_tokens - 1 or done.all():
            break
        positions = (lengths + step)[:, None]  # the token just chosen sits right after the row's last one
        logits = model.next_logits(nxt[:, None], positions, width + step + 1, cache, torch.zeros_like(lengths))
    return [row[:row.index(eos_id)] if eos_id in row else row for row in out.tolist()]


def distinct_prompts(examples):
    """[(prompt ids, record)], one per task: the prompt exactly as training encoded it (the ids before the first
    trained label), so validation renders prompts the way training did."""
    seen = {}
    for ids, labels, _, record in examples:
        key = record.get("task_id", id(record))
        if key not in seen:
            seen[key] = (ids[:next(i for i, label in enumerate(labels) if label != -100)], record)
    return list(seen.values())


def has_tests(record):
    meta = record.get("metadata")
    return isinstance(meta, dict) and bool(meta.get("test") or meta.get("tests"))


def greedy_answers(model, pairs, tok, device, autocast):
    """The greedy answer text of each (prompt, record), at most the longest reference output + 2 tokens long."""
    max_new = max(len(tok.encode(r["output"])) for _, r in pairs) + 2
    answers = []
    for chunk in batches_of([p for p, _ in pairs], 64):
        with autocast():
            outs = generate(model, chunk, tok.eos_id, tok.pad_id, max_new)
        answers += [tok.decode(out) for out in outs]
    return answers


def decoded_metrics(model, examples, checker, tok, device, autocast, limits, workers):
    """Greedy answers to this rank's distinct prompts, summed over ranks. val/accuracy: the share of prompts
    without tests that the dataset's checker accepts; val/pass@1 (logged as val/pass_at_1): the share of those
    with tests (metadata.test/tests) whose answer passes them, run once each in the sandbox (sandbox.py)."""
    tested, checked = [], []
    for pair in distinct_prompts(examples):
        if has_tests(pair[1]):
            tested.append(pair)
        elif checker is not None:
            checked.append(pair)
    counts = [0.0, len(checked), 0.0, len(tested)]  # right, checked, passed, tested
    if checked:
        answers = greedy_answers(model, checked, tok, device, autocast)
        counts[0] = sum(bool(checker(r, a)) for (_, r), a in zip(checked, answers))
    if tested:
        import sandbox  # no torch there; imported here so validation on other data never loads it
        answers = greedy_answers(model, tested, tok, device, autocast)
        tasks = {str(i): r for i, (_, r) in enumerate(tested)}
        results = sandbox.score(tasks, [(str(i), a) for i, a in enumerate(answers)], limits, workers)
        counts[2] = sum(r["passed"] for r in results)
    right, n_checked, passed, n_tested = all_reduce(torch.tensor(counts, dtype=torch.float64, device=device)).tolist()
    out = {"val/accuracy": right / n_checked} if n_checked else {}
    if n_tested:
        out[metric_name("val/pass@1")] = passed / n_tested
    return out


# -----------------------------------------------------------------------------
# FSDP2 (training.parallel: fsdp): every transformer block and the root sharded over the ranks. Checkpoints are
# either gathered into rank 0's one file, the same file DDP writes (checkpoint.format: full), or written by every
# rank as its own shards into a torch.distributed.checkpoint directory (sharded)


def transformer_blocks(model):
    return [*model.layers, *model.extra_heads]


def shard(model, device, world):
    """fully_shard each block (trunk and heads), then the root (embedding, norm, output, value head): parameters
    become dim-0 shards (DTensors) on `device`, gathered per block just before its forward and backward and freed
    after. On CUDA blocks compute in bf16 and gradients are reduced in fp32; on the CPU everything stays fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))  # explicit: the default mesh would pick an accelerator
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """Whole parameters on every rank for the duration (validation, greedy decoding): forwards need no collective
    then, so ranks may run different numbers of them (uneven validation shares, decodes that stop early)."""
    units = [m for m in model.modules() if is_sharded(m)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # the root keeps its params for backward
            unit.reshard()


def trainable_names(model):
    """Names of the optimizer's parameters, in the order `prepare` hands them to it."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def by_index(state, names):
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) -> keyed by index, as
    optimizer.state_dict() is: a full checkpoint is then the same file whether DDP or FSDP wrote it."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def by_name(state, names):
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def full_state(model, optimizer):
    """(weights, partial, optimizer state) of a full checkpoint; see model_state. Sharded, every rank must call it:
    the whole tensors are gathered to rank 0's CPU one at a time, the other ranks get empty dicts."""
    if not is_sharded(model):
        return (*model_state(model), optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    partial = any(isinstance(m, LoRALinear) for m in model.modules())
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=partial)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    return weights, partial, by_index(optim, trainable_names(model)) if optim else {}


def load_optimizer(model, optimizer, state):
    """A full checkpoint's optimizer state into the optimizer; sharded, every rank keeps its slice of each tensor."""
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, by_name(state, trainable_names(model)),
                             options=StateDictOptions(full_state_dict=True))


def sharded_state(model, optimizer):
    """{"model", "optimizer"}: this rank's shards (frozen weights left out, as in a LoRA run's full checkpoint), what
    torch.distributed.checkpoint saves and loads in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    lora = any(isinstance(m, LoRALinear) for m in model.modules())
    return {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=lora)),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(model, optimizer, path, group):
    """Starts writing this rank's shards into the directory `path`; returns a Future that completes once every
    rank's shards and the directory's metadata are on disk. The state is staged (copied) before it returns."""
    import torch.distributed.checkpoint as dcp
    saved = dcp.async_save(sharded_state(model, optimizer), checkpoint_id=str(path), process_group=group,
                           no_dist=not dist.is_initialized())
    return getattr(saved, "upload_completion", saved)  # newer versions answer an AsyncSaveResponse


def load_sharded(model, optimizer, path):
    """A sharded checkpoint directory into the model and the optimizer; any number of ranks may have written it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    state = sharded_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except Exception as e:
        raise UserError(f"{path}: not a readable sharded checkpoint for this model ({type(e).__name__}: {e})")
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


# -----------------------------------------------------------------------------
# training


def learning_rate(step, total, t):
    """Linear warmup over warmup_steps, then cosine from learning_rate down to learning_rate·min_lr_ratio."""
    base, warmup = t.learning_rate, t.warmup_steps
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


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


def read_trainer_state(directory):
    """A sharded checkpoint's trainer.pt: everything but the model and optimizer shards (step, data position, ...)."""
    try:
        return s3ckpt.load_checkpoint(Path(directory) / "trainer.pt")
    except s3ckpt.CheckpointError as e:
        raise UserError(f"{directory}: incomplete sharded checkpoint ({e})")


def find_resume(cfg, run_name, root, cache_dir):
    """`auto`: the newest checkpoint of an unfinished run of this config under checkpoint.dir, else (a machine that
    lost its disk: spot reclaim, a new VESSL container) the newest one in the MLflow artifacts of the newest
    unfinished run of that name; else the given path/URI; `never`: nothing. -> (local file, its URI in the run's
    artifacts or None), (None, None) for nothing to resume."""
    choice = cfg.checkpoint.resume
    if choice == "never":
        return None, None
    if choice != "auto":
        return resolve_uri(cfg, choice, None, None, cache_dir)
    candidates = [p for d in (root / run_name).glob("*") if not (d / "checkpoint_final.pt").exists()
                  for p in [*d.glob("checkpoint_*.pt"), *(m.parent for m in d.glob("checkpoint_step_*/trainer.pt"))]]
    if candidates:
        newest = max(candidates, key=lambda p: p.stat().st_mtime)  # in <run name>/<run id>/
        uploaded = cfg.mlflow.enable_logging and not newest.parent.name.startswith("local-")
        return str(newest), f"runs:/{newest.parent.name}/checkpoints/{newest.name}" if uploaded else None
    remote = newest_remote_checkpoint(cfg, run_name) if cfg.mlflow.enable_logging else None
    return resolve_uri(cfg, remote, None, None, cache_dir) if remote else (None, None)


def newest_remote_checkpoint(cfg, run_name):
    """runs:/ URI of the newest step checkpoint (by step number: a preemption writes one), else checkpoint_best.pt,
    of the newest unfinished run with this run name and experiment.name; None when there is none to resume from."""
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri(cfg))
    same_config = (f"tags.mlflow.runName = '{run_name}' and params.`experiment.name` = '{cfg.experiment.name}' "
                   "and attributes.status != 'FINISHED'")
    run = newest_run(client, cfg.mlflow.experiment, same_config)
    if run is None:
        return None
    names = [Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoints")]
    if "checkpoint_final.pt" in names:  # trained to the end, only its ending was lost: as finished locally
        return None
    # a sharded checkpoint (a directory) is whole once its trainer.pt, uploaded last, is there
    whole = lambda n: n.endswith(".pt") or "trainer.pt" in [
        Path(f.path).name for f in client.list_artifacts(run.info.run_id, f"checkpoints/{n}")]
    steps = sorted((n for n in names if s3ckpt.checkpoint_step(n) is not None), key=s3ckpt.checkpoint_step)
    newest = next((n for n in reversed(steps) if whole(n)), "checkpoint_best.pt")
    return f"runs:/{run.info.run_id}/checkpoints/{newest}" if newest in names else None


@dataclasses.dataclass
class Setup:
    """Everything training needs, ready before any run exists: what `prepare` returns."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    pipeline: Baseline
    tok: object
    model: nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    train_examples: list
    val_examples: list
    checker: object
    total_steps: int
    run_name: str
    n_truncated: int = 0
    started_from: str = ""
    resume_path: str = None
    resume: dict = None  # the resumed checkpoint: step, position, best_val_loss, run_id, unsent_metrics


def prepare(cfg, use_micro=False, rank=0, world=1, device=torch.device("cpu")):
    """Model, data, optimizer, starting weights and resume point: everything that can reject bad input, checked
    before any MLflow run, thread or file exists. Every rank calls it (the checkpoints to load come from rank 0)."""
    t, s, ds = cfg.training, cfg.data_sampling, cfg.dataset
    master = rank == 0
    tok, model = build_model(cfg, use_micro, value_head=PIPELINE_TYPES[cfg.experiment.pipeline].value_head)
    pipeline = PIPELINE_TYPES[cfg.experiment.pipeline](cfg, model.args.n_future_tokens)
    train_records, checker = load_records(ds.train, "train")
    val_records, _ = load_records(ds.validation, "validation")
    correct = 0.5 if pipeline.name == "critic" else 1.0  # the critic must see wrong answers to rank them
    train_examples, n_truncated = encode_records(sample_records(train_records, s.n_samples, s.correct_ratio, s.seed),
                                                 tok, ds.max_length, ds.on_overlong, ds.train, ds.template)
    val_examples, _ = encode_records(sample_records(val_records, s.val_samples, correct, s.seed + 1),
                                     tok, ds.max_length, ds.on_overlong, ds.validation, ds.template)
    if master and cfg.mlflow.enable_logging:
        preflight(cfg)  # credentials and bucket, before the server is asked for any checkpoint
    run_name = cfg.mlflow.run_name or pipeline.run_name
    cache = Path(cfg.checkpoint.dir) / ".cache"

    def fetch(spec, pipeline_for_auto, artifact):
        return on_this_node(cfg, resolve_uri(cfg, spec, pipeline_for_auto, artifact, cache) if master else None, cache)

    resume_path = on_this_node(cfg, find_resume(cfg, run_name, Path(cfg.checkpoint.dir), cache) if master else None,
                               cache)
    spec, source, artifact = pipeline.start_from()
    started_from = ""
    if spec:  # also when resuming: rho1's frozen-copy reference is the *starting* policy
        path = fetch(spec, source, artifact)
        load_checkpoint_into(model, path)
        started_from = f", initialised from {spec} ({path})"
    fsdp = t.parallel == "fsdp" and world > 1
    for block in transformer_blocks(model):
        block.checkpointed = t.activation_checkpointing
    pipeline.attach(model, fetch, lambda: build_model(cfg, use_micro, value_head=False)[1],
                    torch.device("cpu") if fsdp else device)  # sharded: on the device as shards only (shard())
    resume = resume_path and (read_trainer_state(resume_path) if Path(resume_path).is_dir()
                              else load_checkpoint_into(model, resume_path))  # a full file: weights before sharding
    if fsdp:
        for module in filter(None, (model, getattr(pipeline, "reference", None))):  # rho1's frozen reference too
            shard(module, device, world)
    else:
        model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: the optimizer holds the shards
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=True)
    batches_per_epoch = len(epoch_order(len(train_examples), 0, s.seed, rank, world)) // t.batch_size
    if batches_per_epoch < t.gradient_accumulation_steps:
        raise UserError(f"{ds.train}: {len(train_examples)} examples make fewer than one step of "
                        f"{t.gradient_accumulation_steps} x {t.batch_size} x {world} processes")
    total_steps = t.max_steps or t.n_epochs * batches_per_epoch // t.gradient_accumulation_steps
    setup = Setup(cfg, rank, world, device, pipeline, tok, model, params, optimizer, train_examples, val_examples,
                  checker, total_steps, run_name, n_truncated, started_from, resume_path)
    if resume:
        setup.resume = resume
        if Path(resume_path).is_dir():
            load_sharded(model, optimizer, resume_path)
        else:
            load_optimizer(model, optimizer, resume["optimizer"])
        set_rng_state(resume["rng"])
        pipeline.load_state_dict(resume["ema"])
    return setup


def train_step(pipeline, ddp_model, optimizer, params, batches, meter, step, stop_requested=0):
    """One optimizer step over the micro-batches (DDP/FSDP sync gradients on the last one), clipped to max_grad_norm
    (the norm of all gradients: with FSDP, of every rank's shards together).

    Returns the device tensor [non-finite, stop], summed over ranks by the step's one collective, so ranks never
    disagree: a non-finite loss or gradient on any rank skips the update everywhere, a signal on any rank stops
    every rank. Nothing here waits for the device: the fused AdamW reads the flag itself (found_inf) and leaves
    weights, moments and step count untouched where it is set; the pipeline's own state is kept the same way."""
    device, accum = params[0].device, len(batches)
    step_loss, step_meter = torch.zeros((), device=device), Meter(device)
    pipeline.begin_step()
    for micro, batch in enumerate(batches):
        last = micro == accum - 1
        with gradient_sync(ddp_model, last):
            with autocast_for(device):
                loss = pipeline.loss(ddp_model, batch, step_meter, step)
            (loss / accum).backward()
        n_tok = (batch[1] != -100).sum()
        step_meter.add("train/loss", loss.detach() * n_tok, n_tok)
        step_loss += loss.detach() / accum
    grad_norm = torch.nn.utils.clip_grad_norm_(params, pipeline.t.max_grad_norm)  # the pre-clip norm
    if hasattr(grad_norm, "full_tensor"):  # sharded: a DTensor, already the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    step_meter.add("train/grad_norm", grad_norm, 1)
    flags = all_reduce(torch.stack([(~torch.isfinite(step_loss + grad_norm)).float(),
                                    torch.tensor(float(stop_requested), device=device)]))
    skip = flags[0] > 0
    optimizer.found_inf = skip.float()  # the fused AdamW's own skip switch
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    pipeline.end_step(skip)
    meter.merge(step_meter, keep=1.0 - skip.float())  # a skipped step's values stay out of the logged means
    return flags


def gradient_sync(model, last):
    """Gradients are reduced over the ranks in the last micro-batch's backward only: DDP's no_sync() before it,
    FSDP2's set_requires_gradient_sync (its reduce-scatter) likewise."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def autocast_for(device):
    """bf16 autocast on CUDA; fp32 (no autocast) on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class Batches:
    """This rank's micro-batches: every epoch one seeded order of the examples (see epoch_order), cut into
    batch_size pieces. `position` counts the micro-batches consumed — what a resume restores exactly."""

    def __init__(self, setup, position=0):
        self.examples, self.pad_id, self.device = setup.train_examples, setup.tok.pad_id, setup.device
        self.size, self.seed = setup.cfg.training.batch_size, setup.cfg.data_sampling.seed
        self.rank, self.world, self.position = setup.rank, setup.world, position
        self.per_epoch = len(epoch_order(len(self.examples), 0, self.seed, self.rank, self.world)) // self.size
        self.tokens_seen = torch.zeros((), device=self.device)
        self.grouped, self.epoch_indices = setup.cfg.training.group_by_length, (None, None)

    def order(self, epoch):
        """This epoch's example indices (epoch_order, then length_grouped if so configured), kept for the epoch."""
        if self.epoch_indices[0] != epoch:
            order = epoch_order(len(self.examples), epoch, self.seed, self.rank, self.world)
            if self.grouped:
                order = length_grouped(order, [len(e[0]) for e in self.examples], self.size, self.seed + epoch)
            self.epoch_indices = (epoch, order)
        return self.epoch_indices[1]

    def take(self, n):
        batches = []
        for _ in range(n):
            epoch, index = divmod(self.position, self.per_epoch)
            order = self.order(epoch)
            chosen = [self.examples[i] for i in order[index * self.size:(index + 1) * self.size]]
            batches.append(collate(chosen, self.pad_id, self.device))
            self.position += 1
            self.tokens_seen += (batches[-1][0] != self.pad_id).sum()
        return batches


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


class StepFlags:
    """The host's look at each step's [non-finite, stop] flags, one step late (OneStepLate): counts the skipped
    steps in a row, logs them at the step they happened, fails the run at max_skipped_steps, and says stop."""

    def __init__(self, device, max_skipped, tracking):
        self.late, self.max_skipped, self.tracking, self.skipped = OneStepLate(device), max_skipped, tracking, 0

    def after(self, done, flags, last):
        """Called after step `done` was queued; True when training must stop (a signal reached some rank)."""
        stop = self._check(done - 1, self.late.swap(flags))  # the previous step's: this one keeps the device busy
        if last:
            stop = self._check(done, self.late.read()) or stop
        return stop

    def _check(self, step, flags):
        if flags is None:
            return False
        non_finite, stop = flags
        self.skipped = self.skipped + 1 if non_finite else 0
        if non_finite:
            log.warning(f"step {step}: non-finite loss or gradient, step skipped ({self.skipped} in a row)")
            self.tracking.log({"train/skipped_steps": self.skipped}, step)
        if self.skipped >= self.max_skipped:
            raise RuntimeError(f"{self.skipped} non-finite steps in a row (training.max_skipped_steps): "
                               f"lower training.learning_rate or check the data")
        return stop > 0


class TrainLog:
    """Every log_interval steps (and at a stop or the end): the step's means over ranks, the learning rate and
    tokens/s — printed, written to training.log and sent to the run."""

    def __init__(self, setup, batches, tracking, start_step):
        self.interval, self.total, self.master = setup.cfg.training.log_interval, setup.total_steps, setup.rank == 0
        self.batches, self.tracking, self.start_step = batches, tracking, start_step
        self.meter, self.t_start, self.t_log = Meter(setup.device), time.time(), time.time()

    def step(self, done, lr, stop):
        if done % self.interval and done != self.total and not stop:
            return
        stats = self.meter.reduce()
        stats["train/learning_rate"] = lr
        elapsed, self.t_log = time.time() - self.t_log, time.time()
        stats["train/tokens_per_sec"] = all_reduce(self.batches.tokens_seen.clone()).item() / max(elapsed, 1e-9)
        self.batches.tokens_seen.zero_()
        if self.master:
            eta = (time.time() - self.t_start) / (done - self.start_step) * (self.total - done)
            print(f"step {done}/{self.total} | loss {stats.get('train/loss', math.nan):.4f} | lr {lr:.2e} | "
                  f"{stats['train/tokens_per_sec']:,.0f} tok/s | ETA {eta:.0f}s", flush=True)
            log.info(" ".join(f"{k}={v:.5g}" for k, v in sorted(stats.items())))
        self.tracking.log(stats, done)

    def validation(self, done, val):
        if self.master:
            log.info(f"step {done}: " + " ".join(f"{k}={v:.5g}" for k, v in sorted(val.items())))
        self.tracking.log(val, done)


class Checkpointer:
    """Checkpoints written behind the loop (s3ckpt.CheckpointWriter, rank 0's) and uploaded into the run: the best
    by val/loss, one every save_every steps, one at a preemption, the final one. It decides when; a checkpoint
    holds what an exact resume needs (model, optimizer, step, data position, RNG, the pipeline's state, ...).
    A full checkpoint is rank 0's one file (gathered from every rank when sharded); with checkpoint.format: sharded
    the step checkpoints (periodic and preemption) are directories each rank writes its shards into, rank 0 adding
    trainer.pt (the rest of the state) once all are in; best and final stay files that any tool reads."""

    def __init__(self, setup, batches, tracking, run_id, run_dir):
        self.setup, self.batches, self.tracking, self.run_id, self.run_dir = setup, batches, tracking, run_id, run_dir
        self.save_every, self.total = setup.cfg.checkpoint.save_every, setup.total_steps
        self.best_val = setup.resume["best_val_loss"] if setup.resume else float("inf")
        self.sharded, self.shards = setup.cfg.checkpoint.format == "sharded", None  # this rank's shards in flight
        # sharded saves finish in a background thread: their collectives get a group of their own
        self.group = dist.new_group(backend="gloo") if self.sharded and dist.is_initialized() else None
        self.writer = None
        if setup.rank == 0:
            self.writer = s3ckpt.CheckpointWriter(setup.cfg.checkpoint.save_total_limit, tracking.uploader)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.shards:
            with contextlib.suppress(Exception):  # rank 0's writer reports a failed save
                self.shards.result()
        if self.writer:
            self.writer.close()

    def step_name(self, done):
        return f"checkpoint_step_{done}" + ("" if self.sharded else ".pt")

    def after_validation(self, done, val):
        if val["val/loss"] < self.best_val:
            self.best_val = val["val/loss"]
            self.save("checkpoint_best.pt", done)

    def after_step(self, done):
        if self.save_every and done % self.save_every == 0 and done < self.total:
            self.save(self.step_name(done), done)

    def preempt(self, done, signum):
        """A resumable checkpoint on disk before anyone is told to resume from it; then the run ends KILLED."""
        self.save(self.step_name(done), done, wait=True)
        raise Preempted(signum or signal.SIGTERM, self.run_dir / self.step_name(done))

    def final(self):
        self.save("checkpoint_final.pt", self.total, finished=True, wait=True)

    def save(self, name, step, finished=False, wait=False):
        s, path = self.setup, self.run_dir / name
        state = {"unsent_metrics": self.tracking.unsent(), "scheduler": {"step": step}, "step": step,
                 "position": self.batches.position, "rng": rng_state(), "ema": s.pipeline.state_dict(),
                 "config": s.cfg.to_dict(), "run_id": self.run_id, "best_val_loss": self.best_val,
                 "pipeline": s.pipeline.name, "finished": finished, "model_args": dataclasses.asdict(s.model.args)}
        if not name.endswith(".pt"):
            self.wait_shards()  # one sharded save in flight per rank, as the writer keeps one write in flight
            written = save_sharded(s.model, s.optimizer, path, self.group)
            if self.writer:
                self.writer.save_dir(written, state, path)
            else:
                self.shards = written
        elif self.writer or is_sharded(s.model):  # every rank takes part in gathering a sharded model
            weights, partial, optimizer = full_state(s.model, s.optimizer)
            if self.writer:
                self.writer.save({**state, "model": weights, "model_partial": partial, "optimizer": optimizer}, path)
        if wait:
            self.wait_shards()
            if self.writer:
                self.writer.wait()

    def wait_shards(self):
        shards, self.shards = self.shards, None
        if shards is not None:
            shards.result()


class Preempted(Exception):
    """A SIGTERM/SIGINT stopped training at a step boundary after a resumable checkpoint was written."""

    def __init__(self, signum, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume from {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class StopSignal:
    """Remembers a SIGTERM/SIGINT (spot reclaim, Ctrl-C) so the loop can stop cleanly at the next step boundary;
    held through the end of the run, so torchrun's SIGTERM after a crash cannot cut the cleanup short."""

    def __enter__(self):
        self.received = 0
        self.previous = {signum: signal.signal(signum, self.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        # A second Ctrl-C means "now". A second SIGTERM does not: torchrun forwards the one every process of a
        # container already got, and SIGKILLs 30 s later anyway.
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum
        log.warning(f"{signal.Signals(signum).name} received: stopping at the end of this step")


def injected_fault(rank, done):
    """For the restart tests: WMTP_TEST_FAULT=<rank>:<step> makes that rank fail once, in the first attempt."""
    if (os.environ.get("WMTP_TEST_FAULT") == f"{rank}:{done}"
            and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
        raise RuntimeError(f"WMTP_TEST_FAULT: rank {rank} fails once at step {done}")


def wrap(model, cfg, world):
    """DDP across processes (gradients all-reduced in backward; a model prepare() sharded is used as it is), then
    torch.compile when asked."""
    ddp = world > 1 and not is_sharded(model)
    wrapped = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if ddp else model
    return torch.compile(wrapped) if cfg.model.compile else wrapped


def train(cfg, use_micro=False):
    rank, world, device = setup_distributed(cfg.training.collective_timeout_s)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        s = prepare(cfg, use_micro, rank, world, device)
        resume = s.resume or {}
        start, run_root = resume.get("step", 0), Path(cfg.checkpoint.dir) / s.run_name
        tracking = (Tracking(cfg, s.run_name, run_root, s.total_steps, resume.get("run_id"),
                             resume.get("unsent_metrics", []), resumed=bool(s.resume))
                    if rank == 0 else NoTracking(s.pipeline.name))
        with StopSignal() as signals, tracking:
            run_id = tracking.run_id = broadcast(tracking.run_id)
            log.info(f"{s.pipeline.name}: run {run_id}, {world} process(es) on {device}, {len(s.train_examples)} "
                     f"train / {len(s.val_examples)} val examples ({s.n_truncated} truncated), {s.total_steps} steps"
                     + s.started_from + (f", resumed at step {start} from {s.resume_path}" if s.resume else ""))
            batches = Batches(s, resume.get("position", 0))
            model, validation = wrap(s.model, cfg, world), Validation(s, lambda: autocast_for(device))
            flags, train_log = StepFlags(device, cfg.training.max_skipped_steps, tracking), TrainLog(s, batches,
                                                                                                    tracking, start)
            with Checkpointer(s, batches, tracking, run_id, run_root / run_id) as checkpointer:
                val = {}
                for step in range(start, s.total_steps):
                    lr = learning_rate(step, s.total_steps, cfg.training)
                    for group in s.optimizer.param_groups:
                        group["lr"] = lr
                    step_flags = train_step(s.pipeline, model, s.optimizer, s.params,
                                            batches.take(cfg.training.gradient_accumulation_steps),
                                            train_log.meter, step, signals.received)
                    done = step + 1
                    injected_fault(rank, done)
                    stop = flags.after(done, step_flags, last=done == s.total_steps)
                    train_log.step(done, lr, stop)
                    if stop:
                        checkpointer.preempt(done, signals.received)
                    if validation.due(done, s.total_steps):
                        val = validation.run(s.model)
                        train_log.validation(done, val)
                        checkpointer.after_validation(done, val)
                    checkpointer.after_step(done)
                checkpointer.final()
            log.info(f"done: {s.total_steps} steps in {time.time() - train_log.t_start:.1f}s, "
                     f"best val/loss {checkpointer.best_val:.4f}")
        return {"run_id": run_id, "steps": s.total_steps, "model": s.model, "pipeline": s.pipeline, **val}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# evaluation by execution: completions for tasks with tests, run in the sandbox (sandbox.py), scored as pass@k


def eval_tasks(spec, max_tasks=0):
    """task_id -> record for a JSONL path or builtin:<name>: the first record of each task (the tests are the
    task's, whichever answer a record carries); max_tasks keeps the first N task ids in sorted order."""
    tasks = {}
    for record in load_records(spec, "validation", "eval.dataset")[0]:  # a built-in's held-out tasks
        tasks.setdefault(str(record.get("task_id", record.get("_source"))), record)
    return {tid: tasks[tid] for tid in sorted(tasks)[:max_tasks or None]}


def model_to_evaluate(cfg, use_micro, checkpoint, rank, device):
    """(tok, model, the training run to log into or None, its step): the model of the config, with a trainer
    checkpoint loaded unless it is none (a path, s3://, runs:/, or auto = the newest finished run of the config's
    pipeline)."""
    tok, model = build_model(cfg, use_micro, value_head=True)  # so every pipeline's checkpoint loads strictly
    run_id, step = None, 0
    if checkpoint and checkpoint != "none":
        cache = Path(cfg.checkpoint.dir) / ".cache"
        found = (resolve_uri(cfg, checkpoint, cfg.experiment.pipeline, "checkpoints/checkpoint_final.pt", cache)
                 if rank == 0 else None)
        state = load_checkpoint_into(model, on_this_node(cfg, found, cache))
        run_id = None if str(state["run_id"]).startswith("local-") else state["run_id"]
        step = state["step"]
    return tok, model.to(device).eval(), run_id, step


def sample_completions(model, tok, tasks, e, rank, world, device, template="alpaca"):
    """[(task_id, completion)] for every task, e.n_samples each (greedy when 1), generated in batches with the
    KV cache; each rank generates its share of the tasks and rank 0 gathers them all."""
    g = torch.Generator(device=device).manual_seed(e.seed + rank)
    prompts = [(tid, [tok.bos_id] + tok.encode(render_prompt(tasks[tid], template)))
               for tid in sorted(tasks)[rank::world] for _ in range(e.n_samples)]
    mine = []
    for chunk in batches_of(prompts, e.batch_size):
        with autocast_for(device):
            outs = generate(model, [p for _, p in chunk], tok.eos_id, tok.pad_id, e.max_new_tokens,
                            temperature=0.0 if e.n_samples == 1 else e.temperature, top_p=e.top_p, generator=g)
        mine += [(tid, tok.decode(out)) for (tid, _), out in zip(chunk, outs)]
    if world == 1:
        return mine
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return [pair for part in everyone for pair in part]


def evaluate(cfg, use_micro=False, checkpoint=None, samples=None, json_out=None):
    """pass@k of a model's completions (model mode) or of a file of completions (samples mode) on eval.dataset;
    printed as a table, written as JSON, and logged: eval/pass@k on the evaluated training run (samples mode and
    runs without one: a run `evaluate`), with eval/samples.jsonl holding every completion and its test outcomes."""
    import sandbox
    e = cfg.eval
    rank, world, device = setup_distributed(cfg.training.collective_timeout_s)
    try:
        tasks = eval_tasks(e.dataset, e.max_tasks)
        run_id, step = None, 0
        if samples:
            pairs = sandbox.read_samples(samples, tasks)
            tasks = {tid: tasks[tid] for tid in dict(pairs)}  # pass@k over the tasks that have samples
        else:
            tok, model, run_id, step = model_to_evaluate(cfg, use_micro, checkpoint, rank, device)
            with torch.no_grad():
                pairs = sample_completions(model, tok, tasks, e, rank, world, device, cfg.dataset.template)
        if rank != 0:
            return None
        limits = sandbox.Limits(timeout_s=e.timeout_s, memory_mb=e.memory_mb, cpu_s=math.ceil(e.timeout_s))
        results = sandbox.score(tasks, pairs, limits, workers=e.workers or os.cpu_count() or 1)
        summary = sandbox.summarize(results, e.k)
    except sandbox.TaskError as err:
        raise UserError(str(err))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(sandbox.format_summary(summary), flush=True)
    if json_out:
        tmp = Path(f"{json_out}.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, json_out)
    if cfg.mlflow.enable_logging:
        log_evaluation(cfg, run_id, step, summary, results)
    return summary


def metric_name(name):
    """MLflow allows no '@' in metric names: eval/pass@1 is logged as eval/pass_at_1."""
    return name.replace("@", "_at_")


def log_evaluation(cfg, run_id, step, summary, results):
    """eval/pass@k and eval/samples.jsonl on the training run, or on a new run `evaluate` when there is none."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    client, own_run = MlflowClient(tracking_uri(cfg)), run_id is None
    if own_run:
        run_id = client.create_run(experiment_id(client, cfg), run_name="evaluate",
                                   tags={"pipeline": "evaluate"}).info.run_id
        log_params(client, run_id, flatten({"eval": cfg.to_dict()["eval"], "experiment": cfg.to_dict()["experiment"]}))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(metric_name(f"eval/{k}"), float(v), now, step)
                                      for k, v in summary.items() if k.startswith("pass@")])
    client.log_text(run_id, "".join(json.dumps(r) + "\n" for r in results), "eval/samples.jsonl")
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    log.info(f"logged {', '.join(k for k in summary if k.startswith('pass@'))} to run {run_id}")


# -----------------------------------------------------------------------------
# report and compare: every policy pipeline from one shared warm-up for the same steps, over seeds, as mean ± 95 %
# intervals (Student t), a plot of the metrics over steps, all nested under one parent MLflow run

POLICY_PIPELINES = ("baseline", "verifiable", "rho1")
WARMUP_CONFIG = ROOT / "configs" / "baseline" / "warmup_local.yaml"  # the shared warm-up; each pipeline's own steps
COMPARED = ("val/loss", "val/accuracy", metric_name("eval/pass@1"))
PLOTTED = ("train/loss", "val/loss", "val/accuracy", metric_name("val/pass@1"))
STARTS = {"baseline": "warm-up", "verifiable": "critic (trunk = warm-up)", "rho1": "warm-up (ref: baseline)"}


def report(uri, experiment):
    """The newest run of each pipeline: steps, val/loss, val/accuracy (the critic: AUC), eval/pass@1, start, wall."""
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    print(f"{'pipeline':<11} {'run id':<33} {'steps':>6} {'val/loss':>9} {'accuracy':>9} {'pass@1':>7} {'wall':>6}  "
          "started from")
    for pipeline in PIPELINES:
        r = newest_run(client, experiment, f"tags.pipeline = '{pipeline}'")
        if r is None:
            print(f"{pipeline:<11} (no run)")
            continue
        m = r.data.metrics
        acc = m.get("val/accuracy", m.get("val/auc"))
        acc_text = "-" if acc is None else (f"{acc:.3f}" + (" auc" if "val/accuracy" not in m else ""))
        pass1 = m.get(metric_name("eval/pass@1"))
        wall = ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000
        print(f"{pipeline:<11} {r.info.run_id:<33} {r.data.tags.get('wmtp.steps', '?'):>6} "
              f"{m.get('val/loss', float('nan')):>9.4f} {acc_text:>9} {'-' if pass1 is None else f'{pass1:.3f}':>7} "
              f"{wall:>5.0f}s  {r.data.tags.get('wmtp.started_from', '-')}")


def mean_interval(values):
    """(mean, h): the 95 % Student-t interval mean ± h, h = t_{0.975, n−1} · s / √n, s the sample standard
    deviation (n − 1 in its denominator); h is nan for a single value."""
    from scipy.stats import t as student_t  # scipy comes with mlflow
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(student_t.ppf(0.975, n - 1)) * s / math.sqrt(n)


def local_config(pipeline):
    return ROOT / "configs" / pipeline / f"{pipeline}_local.yaml"


def train_child(path, overrides, parent_id, started_from, run_name=""):
    """Train the config at path on the micro model as a run nested under parent_id (tag mlflow.parentRunId);
    (config, run id, its run directory, where checkpoints are)."""
    cfg = load_config(path, overrides)
    cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(
        cfg.mlflow, run_name=run_name, tags={**cfg.mlflow.tags, "mlflow.parentRunId": parent_id,
                                             "wmtp.started_from": started_from}))
    run_id = train(cfg, use_micro=True)["run_id"]
    return cfg, run_id, Path(cfg.checkpoint.dir) / (run_name or RUN_NAMES[cfg.experiment.pipeline]) / run_id


def compare_seed(seed, warmup_steps, overrides, parent_id, pipelines):
    """One seed: the warm-up (WARMUP_CONFIG, for warmup_steps), then from its final weights each policy pipeline for
    the same steps and evaluate (eval/pass@k on its run). Verifiable starts from a critic trained on the warm-up's
    frozen trunk; rho1's reference is this seed's baseline (the warm-up trained on, as Rho-1's reference, correct
    answers only). -> {pipeline: run id}."""
    o = [*overrides, f"training.seed={seed}", "checkpoint.save_every=0"]  # resuming is not what this measures
    warm = train_child(WARMUP_CONFIG, [*o, f"training.max_steps={warmup_steps}"], parent_id, "random init",
                       "warmup")[2] / "checkpoint_final.pt"
    runs, dirs = {}, {}
    for p in pipelines:
        start = [f"model.init_from={warm}"]
        if p == "verifiable":
            critic = train_child(local_config("critic"), [*o, f"model.init_from={warm}"], parent_id, "warm-up")[2]
            start = [f"critic.checkpoint={critic / 'checkpoint_best.pt'}"]
        if p == "rho1":  # without a baseline of this seed: a frozen copy of the warm-up
            start.append(f"reference.path={dirs['baseline'] / 'checkpoint_final.pt' if 'baseline' in dirs else ''}")
        cfg, runs[p], dirs[p] = train_child(local_config(p), [*o, *start], parent_id, STARTS[p])
        evaluate(cfg, use_micro=True, checkpoint=str(dirs[p] / "checkpoint_final.pt"))
    return runs


def compare(seeds, warmup_steps=0, overrides=(), pipelines=POLICY_PIPELINES):
    """Every pipeline of `pipelines` over seeds 0..seeds-1 (compare_seed; warmup_steps 0 = the warm-up config's),
    under one parent run that gets, per pipeline and metric of COMPARED, <pipeline>/<metric>_mean and _ci95 (the
    interval's half-width), the table (compare/summary.json) and the plot (compare/metrics.png). Returns the
    summary."""
    from mlflow import MlflowClient
    cfgs = {p: load_config(local_config(p), overrides) for p in pipelines}
    steps = {p: c.training.max_steps for p, c in cfgs.items()}
    warmup_steps = warmup_steps or load_config(WARMUP_CONFIG, overrides).training.max_steps
    if len(set(steps.values())) != 1 or not warmup_steps > 0:
        raise UserError(f"compare: the policy pipelines must train the same steps after a warm-up of > 0 steps, "
                        f"got {steps} after --warmup-steps {warmup_steps}")
    cfg = cfgs[pipelines[0]]
    client = MlflowClient(tracking_uri(cfg))
    parent = client.create_run(experiment_id(client, cfg), run_name=f"compare-{seeds}-seeds",
                               tags={"pipeline": "compare"}).info.run_id
    log_params(client, parent, {"seeds": seeds, "warmup_steps": warmup_steps, "policy_steps": steps[pipelines[0]],
                                "overrides": " ".join(overrides) or "-"})
    status = "FAILED"
    try:
        runs = [compare_seed(seed, warmup_steps, overrides, parent, pipelines) for seed in range(seeds)]
        summary = summarize_compare(client, parent, pipelines, runs)
        print(format_compare(summary, seeds, warmup_steps, steps[pipelines[0]]), flush=True)
        print(f"\nparent run {parent} (experiment '{cfg.mlflow.experiment}'): ./run.sh ui", flush=True)
        status = "FINISHED"
        return summary
    finally:
        client.set_terminated(parent, status)


def summarize_compare(client, parent, pipelines, runs):
    """{pipeline: {metric: {values, mean, ci95}, runs, started_from}} from the runs' last logged values; logged on
    the parent run with the plot of PLOTTED over steps."""
    from mlflow.entities import Metric
    summary, now = {}, int(time.time() * 1000)
    for p in pipelines:
        ids = [seed_runs[p] for seed_runs in runs]
        last = [client.get_run(run_id).data.metrics for run_id in ids]
        summary[p] = {"runs": ids, "started_from": STARTS[p]}
        for m in COMPARED:
            values = [x[m] for x in last if m in x]
            if len(values) == len(ids):
                mean, h = mean_interval(values)
                summary[p][m] = {"values": values, "mean": mean, "ci95": h}
    client.log_batch(parent, metrics=[Metric(f"{p}/{m}_{k}", v[k], now, 0) for p, row in summary.items()
                                      for m, v in row.items() if m in COMPARED for k in ("mean", "ci95")
                                      if math.isfinite(v[k])])
    client.log_text(parent, json.dumps(summary, indent=2), "compare/summary.json")
    plot_compare(client, parent, summary)
    return summary


def plot_compare(client, parent, summary):
    """compare/metrics.png: one panel per metric of PLOTTED, a line per pipeline and seed over its steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.5 * len(PLOTTED), 3.6))
    for ax, metric in zip(axes, PLOTTED):
        for i, (p, row) in enumerate(summary.items()):
            for j, run_id in enumerate(row["runs"]):
                history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
                if history:
                    ax.plot(*zip(*history), color=f"C{i}", alpha=0.8, label=p if j == 0 else None)
        ax.set(title=metric, xlabel="policy step (after the warm-up)")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "metrics.png", dpi=100)
        client.log_artifact(parent, str(Path(tmp) / "metrics.png"), "compare")
    plt.close(fig)


def format_compare(summary, seeds, warmup_steps, steps):
    """The table: per policy pipeline, where it started and mean ± 95 % half-width of each metric of COMPARED."""
    head = f"{'pipeline':<11} {'started from':<26}" + "".join(f" {m:>17}" for m in COMPARED)
    lines = [f"{seeds} seed(s); a {warmup_steps}-step warm-up baseline, then {steps} steps of each pipeline", head]
    for p, row in summary.items():
        cells = ["-" if m not in row else f"{row[m]['mean']:.3f}" + (
            f" ± {row[m]['ci95']:.3f}" if math.isfinite(row[m]["ci95"]) else "") for m in COMPARED]
        lines.append(f"{p:<11} {row['started_from']:<26}" + "".join(f" {c:>17}" for c in cells))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# memory plan: the estimated peak bytes per GPU of a run, from the model's shape alone (no weight is read), so
# that `train --dry-run` can say before a launch whether it fits


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
PLAN_ROWS = {"parameters": "trainable parameters (fp32 masters)", "gradients": "gradients (fp32)",
             "buckets": "DDP all-reduce buckets (fp32)", "optimizer": "AdamW moments (2 x fp32)",
             "frozen": "frozen weights (LoRA base, critic trunk)", "reference": "rho1 reference (frozen)",
             "gathered": "FSDP gathered blocks + their grads", "copies": "bf16 autocast weight copies",
             "activations": "activations saved for backward", "logits": "loss logits (one head at a time)",
             "peak": "peak"}


def model_shape(path, n_future_tokens):
    """ModelArgs of a Meta (params.json) or Hugging Face LLaMA (config.json) dir, no weight read, as the policy is
    built from it: the checkpoint's n_layers − H_ckpt trunk blocks and `n_future_tokens` head blocks."""
    d = Path(path)
    args = model_args_from_meta(d) if (d / "params.json").exists() else model_args_from_hf(d)[0]
    trunk = args.n_layers - args.n_future_tokens
    return dataclasses.replace(args, n_layers=trunk + n_future_tokens, n_future_tokens=n_future_tokens)


def block_shape(args):
    """(parameters of one block, its k/v width, its FFN width), read off a Block built on the meta device."""
    with torch.device("meta"):
        block = Block(args)
    attention, ffn = block.attention, block.feed_forward
    return sum(p.numel() for p in block.parameters()), attention.wk.out_features, ffn.w1.out_features


def parameter_counts(args, pipeline, lora_rank):
    """(trainable, frozen) parameters of the policy. L blocks of P_b, embedding and output V·d each, final norm d;
    LoRA adds r·(in + out) per projection: r·(9d + 2·d_kv + 3f) per block; the value head d + 1 (critic,
    verifiable). LoRA trains adapters and value head; the critic only its value head."""
    p_block, kv, hidden = block_shape(args)
    d, L, V = args.dim, args.n_layers, args.vocab_size
    base = L * p_block + 2 * V * d + d
    adapters = L * lora_rank * (9 * d + 2 * kv + 3 * hidden)
    value_head = d + 1 if pipeline in ("critic", "verifiable") else 0
    if pipeline == "critic":
        return value_head, base + adapters
    if lora_rank:
        return adapters + value_head, base
    return base + value_head, 0


def block_activations(args, lora_rank, trains_norms, act_bytes):
    """Bytes one block saves for backward per token. The method is Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", §4.1: add up what every op saves), applied to this block (RMSNorm,
    GQA with fused SDPA: no T² scores kept, SwiGLU of width f, no dropout), the residual stream in fp32 and the
    matmul inputs in act_bytes (4; 2 under bf16 autocast):
        s = 4·d·(2 + 2·[norm weights train])   the norms' inputs x, h (+ their normalised x̂ when the weights train)
          + a·(4d + 2·d_kv + 4f + 7r)          the inputs of wq/wk/wv, wo, w1/w3, w2 (d, d, d, f); q after RoPE (d),
                                               k after RoPE and v (d_kv each); silu's input and output, w3's output
                                               (f each); LoRA's x·Aᵀ (r for each of the 7 projections)"""
    _, kv, hidden = block_shape(args)
    d = args.dim
    return 4 * d * (2 + 2 * trains_norms) + act_bytes * (4 * d + 2 * kv + 4 * hidden + 7 * lora_rank)


def memory_plan(args, pipeline="baseline", lora_rank=0, parallel="ddp", world=1, frozen_dtype="float32",
                batch_size=1, seq_len=2048, activation_checkpointing=False, memory_efficient_loss=True,
                grad_accum=1, reference=None, device="cuda"):
    """Estimated bytes per GPU, {row: bytes} (rows: PLAN_ROWS), for a policy of shape `args` (L blocks, H heads, V).

    Weights: a trained one costs 4 (fp32 master) + 4 (gradient) + 8 (AdamW's two fp32 moments) bytes, and under DDP
    with world > 1 4 more (the all-reduce buckets: gradient_as_bucket_view is off); a frozen one (LoRA base, critic
    trunk, the rho1 reference: `reference` or a copy of the policy) frozen_dtype's bytes. fsdp divides all of these
    by world and holds, unsharded in the compute dtype, the root (embedding, output) and two blocks (the current
    and the prefetched one), plus as much in fp32 gradients (a block's unsharded gradients, their copy in the
    reduce-scatter buffer, the root's until the end of backward). On CUDA, DDP keeps a bf16 autocast
    copy of every fp32 weight that a block saves for backward.
    Activations, N = batch_size·seq_len tokens, s = block_activations(): L·s·N + 4d·N (the H head outputs the loss
    reads, less H − 1 shared head inputs); with a checkpoint per block each keeps its fp32 input and backward
    recomputes one block at a time: (L + 1)·4d·N + s·N. The critic trains no block: its forward only holds one
    block's residual, normed input, trunk output and SwiGLU's three f-wide tensors, (16d + 3·a·f)·N.
    Logits: the memory-efficient loss holds, in one head's backward, its fp32 log-softmax, the gradient of that
    and of the logits, 3·N·V·4 bytes (+ the bf16 logit gradient, 2·N·V, on CUDA); without it every head also keeps
    its log-softmax (H·N·V·4). A forward-only loss (critic) holds logits and log-softmax, 2·N·V·4.
    Peak = weights + moments + buckets + the larger of: the start of backward (activations + logits + copies +
    gathered, + gradients when accumulating) and its end (gradients + one block's activations + gathered)."""
    cuda, fsdp, ddp = device == "cuda", parallel == "fsdp", parallel == "ddp" and world > 1
    d, V, L, H, N = args.dim, args.vocab_size, args.n_layers, args.n_future_tokens, batch_size * seq_len
    shard, act_bytes = (world if fsdp else 1), (2 if cuda else 4)
    p_block, _, hidden = block_shape(args)
    trainable, frozen = parameter_counts(args, pipeline, lora_rank)
    ref = sum(parameter_counts(reference or args, "baseline", 0)) if pipeline == "rho1" else 0
    trains_blocks, full_ft = pipeline != "critic", pipeline != "critic" and not lora_rank
    rows = {"parameters": 4 * trainable / shard, "gradients": 4 * trainable / shard, "buckets": 4 * trainable * ddp,
            "optimizer": 8 * trainable / shard, "frozen": DTYPE_BYTES[frozen_dtype] * frozen / shard,
            "reference": DTYPE_BYTES[frozen_dtype] * ref / shard}
    gathered = 2 * V * d + 2 * p_block  # the root's embedding and output, the current and the prefetched block
    rows["gathered"] = (act_bytes + 4 * full_ft) * gathered * fsdp
    fp32_block_weights = p_block if full_ft or frozen_dtype == "float32" else 0
    saved_blocks = L if trains_blocks and not activation_checkpointing else 1
    rows["copies"] = 2 * fp32_block_weights * saved_blocks * (cuda and not fsdp)
    s = block_activations(args, lora_rank, full_ft, act_bytes) * N
    if not trains_blocks:
        rows["activations"] = (16 * d + 3 * act_bytes * hidden) * N
    elif activation_checkpointing:
        rows["activations"] = (L + 1) * 4 * d * N + s
    else:
        rows["activations"] = L * s + 4 * d * N
    per_logit = (3 * 4 + 2 * cuda + 4 * H * (not memory_efficient_loss)) if trains_blocks else 2 * 4
    rows["logits"] = per_logit * N * V
    start = rows["activations"] + rows["logits"] + rows["copies"] + rows["gathered"]
    start += rows["gradients"] * (grad_accum > 1)
    end = rows["gradients"] + s * trains_blocks + rows["gathered"]
    static = sum(rows[k] for k in ("parameters", "optimizer", "frozen", "reference", "buckets"))
    rows["peak"] = static + max(start, end)
    return {k: int(v) for k, v in rows.items()}


def plan_settings(cfg):
    """(parallel, activation_checkpointing, frozen dtype) of a config: what the memory plan depends on."""
    return cfg.training.parallel, cfg.training.activation_checkpointing, cfg.model.dtype


def is_local_path(value):
    return bool(value) and value != "auto" and not value.startswith(("builtin:", "runs:/")) and "://" not in value


def expected_paths(cfg, use_micro):
    """[(key, path, exists)] for the config's paths that must be on this machine."""
    pipeline = cfg.experiment.pipeline
    model = cfg.model if not use_micro else dataclasses.replace(cfg.model, path="", tokenizer="")
    keys = {"model.path": model.path, "model.tokenizer": model.tokenizer,
            "model.init_from": cfg.model.init_from if pipeline != "verifiable" else "",
            "critic.checkpoint": cfg.critic.checkpoint if pipeline == "verifiable" else "",
            "reference.path": cfg.reference.path if pipeline == "rho1" else "",
            "dataset.train": cfg.dataset.train, "dataset.validation": cfg.dataset.validation}
    return [(key, path, Path(path).exists()) for key, path in keys.items() if is_local_path(path)]


def config_plans(cfg, world, use_micro):
    """(what was planned, {checkpointing off/on: memory_plan}) for the config on `world` processes, or (why not, {})."""
    m, t, pipeline = cfg.model, cfg.training, cfg.experiment.pipeline
    parallel, _, frozen_dtype = plan_settings(cfg)
    if use_micro or not m.path:
        args = micro_args(cfg, ByteTokenizer.vocab_size)
    elif not Path(m.path).is_dir():
        return f"model.path {m.path} is not on this machine: its params.json or config.json gives the shape", {}
    else:
        args = model_shape(m.path, m.n_future_tokens)
    ref = cfg.reference.path
    reference = model_shape(ref, 1) if pipeline == "rho1" and is_local_path(ref) and Path(ref).is_dir() else None
    kw = dict(pipeline=pipeline, lora_rank=m.lora.rank, parallel=parallel, world=world, frozen_dtype=frozen_dtype,
              batch_size=t.batch_size, seq_len=cfg.dataset.max_length, memory_efficient_loss=m.memory_efficient_loss,
              grad_accum=t.gradient_accumulation_steps, reference=reference)
    what = (f"{pipeline}, {args.n_layers} blocks ({args.n_future_tokens} heads), d={args.dim}, V={args.vocab_size}, "
            f"{sum(parameter_counts(args, pipeline, m.lora.rank)) / 1e6:,.1f}M parameters, "
            + (f"LoRA r={m.lora.rank}, " if m.lora.rank else "") + f"{parallel} x {world}, frozen {frozen_dtype}, "
            f"batch {t.batch_size} x {cfg.dataset.max_length} tokens, CUDA bf16 autocast")
    return what, {ac: memory_plan(args, activation_checkpointing=ac, **kw) for ac in (False, True)}


def dry_run_report(cfg, world, world_from, use_micro, gpu_gb):
    """The --dry-run lines after the merged config, as YAML comments (the output stays the config): the memory plan
    per GPU in GiB, whether it fits gpu_gb GiB (less 10 % for the CUDA context, NCCL buffers and allocator
    fragmentation), and the paths the config reads."""
    what, plans = config_plans(cfg, world, use_micro)
    lines = [f"launch: {world} process(es) ({world_from})", f"memory plan per GPU: {what}"]
    if plans:
        checkpointing = plan_settings(cfg)[1]
        unit, scale = ("GiB", 2**30) if plans[False]["peak"] >= 2**30 else ("MiB", 2**20)
        lines.append(f"{unit:<44}{'checkpointing off':>18}{'on':>8}")
        for key, label in PLAN_ROWS.items():
            if plans[False][key] or plans[True][key]:
                lines.append(f"  {label:<42}{plans[False][key] / scale:>18.2f}{plans[True][key] / scale:>8.2f}")
        if gpu_gb:
            fits = {ac: p["peak"] <= 0.9 * gpu_gb * 2**30 for ac, p in plans.items()}
            verdict, on_off = {True: "fits", False: "does NOT fit"}, {True: "on", False: "off"}
            lines.append(f"--gpu-memory-gb {gpu_gb:g}: {verdict[fits[checkpointing]]} as configured (activation "
                         f"checkpointing {on_off[checkpointing]}); with it {on_off[not checkpointing]}: "
                         f"{verdict[fits[not checkpointing]]}")
    paths = expected_paths(cfg, use_micro)
    lines.append("paths this config reads:" if paths else "paths this config reads: none (builtin data, micro model)")
    lines += [f"  {key:<19} {path}  {'found' if ok else 'MISSING on this machine'}" for key, path, ok in paths]
    return "\n".join(f"# {line}" for line in lines)


# -----------------------------------------------------------------------------
# CLI


def cli():
    """The argument parser: train and evaluate share the config arguments and --dry-run."""
    parser = argparse.ArgumentParser(prog="python -m weighted_mtp", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", required=True)
    config.add_argument("--use-micro-model", action="store_true", help="the small random-init CPU model, bytes")
    config.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    config.add_argument("--dry-run", action="store_true",
                        help="print the merged config, the memory plan per GPU and the paths it reads; run nothing")
    config.add_argument("--nproc", type=int, help="--dry-run: processes in the launch (default: $WORLD_SIZE, else 1)")
    config.add_argument("--gpu-memory-gb", type=float, help="--dry-run: say whether the plan fits GPUs this big")
    p = sub.add_parser("train", parents=[config], help="train one pipeline")
    p.add_argument("--resume", nargs="?", const="auto", help="PATH, URI or auto (default when given without a value)")
    e = sub.add_parser("evaluate", parents=[config],
                       help="pass@k of a checkpoint's completions (or of --samples) by running them")
    e.add_argument("--checkpoint", default="auto", help="PATH, s3://..., runs:/<id>/..., auto (default: the newest "
                   "finished run of the config's pipeline) or none (the config's model as it is)")
    e.add_argument("--samples", help="score these {task_id, completion} JSONL lines instead of generating")
    e.add_argument("--json", help="also write the summary here")
    d = sub.add_parser("doctor", help="check .env, tracking server, credentials, experiment and S3 bucket")
    d.add_argument("--config", default=str(ROOT / "configs" / "defaults.yaml"))
    d.add_argument("--env-file", default=".env")
    d.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    x = sub.add_parser("export", help="write a trained policy as a Hugging Face or Meta model directory")
    x.add_argument("--checkpoint", required=True, help="a trainer checkpoint: path, s3:// or runs:/ URI")
    x.add_argument("--format", required=True, choices=("hf", "meta"))
    x.add_argument("--out", required=True, help="a new directory")
    x.add_argument("--config", default="", help="the run's config, instead of the one stored in the checkpoint")
    x.add_argument("--use-micro-model", action="store_true", help="the checkpoint is a LoRA run of the micro model")
    c = sub.add_parser("compare", help="the policy pipelines from one warm-up over seeds: mean ± 95 %% intervals")
    c.add_argument("--seeds", type=int, default=3)
    c.add_argument("--warmup-steps", type=int, default=0,
                   help="the shared warm-up's steps (default: those of configs/baseline/warmup_local.yaml)")
    c.add_argument("--pipelines", default=",".join(POLICY_PIPELINES), help="comma-separated policy pipelines")
    c.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="for every run")
    r = sub.add_parser("report", help="table of the newest run of each pipeline")
    r.add_argument("--experiment", default=DEFAULTS["mlflow"]["experiment"])
    r.add_argument("--tracking-uri", default="")
    return parser


def main(argv=None):
    args = cli().parse_args(argv)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", 0)) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "doctor":
            return doctor(load_config(args.config, args.override), args.env_file)
        if args.command == "export":
            export(args.checkpoint, args.format, args.out, args.config, args.use_micro_model)
            return 0
        if args.command == "report":
            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
            return report(uri, args.experiment)
        if args.command == "compare":
            pipelines = tuple(args.pipelines.split(","))
            if args.seeds < 1 or not set(pipelines) <= set(POLICY_PIPELINES):
                raise UserError(f"compare: --seeds must be >= 1 and --pipelines among {', '.join(POLICY_PIPELINES)}")
            compare(args.seeds, args.warmup_steps, args.override, pipelines)
            return 0
        resume = [f"checkpoint.resume={args.resume}"] if getattr(args, "resume", None) else []
        cfg = load_config(args.config, args.override + resume)
        if args.dry_run:
            world, world_from = ((args.nproc, "--nproc") if args.nproc else
                                 (int(os.environ["WORLD_SIZE"]), "WORLD_SIZE") if "WORLD_SIZE" in os.environ else
                                 (1, "default"))
            report_lines = dry_run_report(cfg, world, world_from, args.use_micro_model, args.gpu_memory_gb)
            print(yaml.safe_dump(redacted(cfg.to_dict()), sort_keys=False) + report_lines)
        elif args.command == "evaluate":
            evaluate(cfg, args.use_micro_model, args.checkpoint, args.samples, args.json)
        else:
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
