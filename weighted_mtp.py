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
    checkpointed = False  # training.activation_checkpointing: keep the block's input only, recompute in backward

    def __init__(self, a):
        super().__init__()
        self.attention, self.feed_forward = Attention(a), FeedForward(a)
        self.attention_norm, self.ffn_norm = RMSNorm(a.dim, a.norm_eps), RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin):
        if self.checkpointed and torch.is_grad_enabled():
            return activation_checkpoint(self.compute, x, cos, sin, use_reentrant=False)
        return self.compute(x, cos, sin)

    def compute(self, x, cos, sin):
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


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

    def forward(self, tokens, targets=None, n_heads=None, values=False):
        """tokens [B,T] -> (out, values [B,T] or None).

        out = CE [B,T,h] of head k against targets[..., k] when targets [B,T,>=h] are given (0 where -100),
        else logits [B,T,h,V]; h = n_heads, default H (a reference model or greedy decoding needs head 0 only)."""
        h_count = n_heads or self.args.n_future_tokens
        cos, sin = rope_angles(self.args.dim // self.args.n_heads, tokens.shape[1], self.args.rope_theta, tokens.device)
        h = self.tok_embeddings(tokens)
        for layer in self.layers[:-1]:
            h = layer(h, cos, sin)
        states = [head(h, cos, sin) for head in [self.layers[-1], *self.extra_heads][:h_count]]
        vals = self.value_head(self.norm(states[0]).detach()).squeeze(-1).float() if values else None
        if targets is None:
            return torch.stack([self.output(self.norm(s)) for s in states], dim=2), vals
        return torch.stack([self.head_ce(s, targets[..., k]) for k, s in enumerate(states)], dim=2), vals

    def head_ce(self, state, target):
        # Checkpointing norm -> output -> CE keeps one head's [B,T,V] logits alive at a time, in forward and in
        # backward (it recomputes them), so H heads cost O(V + d) memory rather than O(HV + d).
        if self.memory_efficient_loss and torch.is_grad_enabled():
            return activation_checkpoint(self._ce, state, target, use_reentrant=False)
        return self._ce(state, target)

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
    m, H = cfg.model.micro, cfg.model.n_future_tokens
    return ModelArgs(dim=m.dim, n_layers=m.n_trunk_layers + H, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads,
                     vocab_size=m.vocab_size or vocab_size, multiple_of=m.multiple_of, norm_eps=m.norm_eps,
                     rope_theta=m.rope_theta, n_future_tokens=H)


def build_model(cfg, use_micro, value_head):
    """(tokenizer, model): the micro model (random init from training.seed, byte tokenizer) or a Meta-format
    directory, with LoRA adapters when model.lora.rank > 0 — built before any checkpoint loads into it."""
    mcfg = cfg.model
    torch.manual_seed(cfg.training.seed)  # every rank builds the same initial weights
    if use_micro or not mcfg.path:
        tok = ByteTokenizer()
        model = MTPTransformer(micro_args(cfg, tok.vocab_size), value_head, mcfg.memory_efficient_loss)
    else:
        tok, model = load_meta_model(mcfg, value_head)
    if mcfg.lora.rank > 0:
        apply_lora(model, mcfg.lora.rank, mcfg.lora.alpha)
    return tok, model


def load_meta_model(mcfg, value_head):
    tok_path = Path(mcfg.tokenizer or Path(mcfg.path) / "tokenizer.model")
    if not tok_path.exists():
        raise UserError(f"model.tokenizer: {tok_path} does not exist")
    tok = SentencePieceTokenizer(tok_path)
    model = MTPTransformer(model_args_from_meta(mcfg.path), value_head, mcfg.memory_efficient_loss)
    load_meta_weights(model, mcfg.path)
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


# (name, what f returns, argument, right body, wrong bodies, constants): {n} is the task's constant, {m} another one
PYFUNC_TEMPLATES = [
    ("add", "x plus {n}", "x", "x + {n}", ["x - {n}", "x + {m}"], range(1, 50)),
    ("sub", "x minus {n}", "x", "x - {n}", ["x + {n}", "{n} - x", "x - {m}"], range(1, 50)),
    ("rsub", "{n} minus x", "x", "{n} - x", ["x - {n}", "{m} - x"], range(1, 50)),
    ("mul", "x times {n}", "x", "x * {n}", ["x + {n}", "x * {m}"], range(2, 30)),
    ("floordiv", "x divided by {n}, rounded down", "x", "x // {n}", ["x % {n}", "x / {n}", "x // {m}"], range(2, 20)),
    ("mod", "the remainder of x divided by {n}", "x", "x % {n}", ["x // {n}", "x % {m}"], range(2, 20)),
    ("max", "the larger of x and {n}", "x", "max(x, {n})", ["min(x, {n})", "max(x, {m})"], range(0, 30)),
    ("min", "the smaller of x and {n}", "x", "min(x, {n})", ["max(x, {n})", "min(x, {m})"], range(0, 30)),
    ("gt", "whether x is greater than {n}", "x", "x > {n}", ["x < {n}", "x >= {n}"], range(0, 30)),
    ("divisible", "whether x is divisible by {n}", "x", "x % {n} == 0", ["x % {n} != 0", "x // {n} == 0"],
     range(2, 12)),
    ("head", "the first {n} characters of s", "s", "s[:{n}]", ["s[{n}:]", "s[:{m}]"], range(1, 10)),
    ("tail", "the last {n} characters of s", "s", "s[-{n}:]", ["s[:{n}]", "s[-{m}:]"], range(1, 10)),
    ("drop", "s without its first {n} characters", "s", "s[{n}:]", ["s[:{n}]", "s[{m}:]"], range(1, 10)),
    ("repeat", "s repeated {n} times", "s", "s * {n}", ["s * {m}", "s + s"], range(2, 10)),
    ("char", "the character at index {n} of s", "s", "s[{n}]", ["s[{m}]", "s[-{n}]"], range(0, 10)),
    ("longer", "whether s is longer than {n}", "s", "len(s) > {n}", ["len(s) < {n}", "len(s) >= {n}"], range(0, 10)),
    ("count", "how often the letter {n} occurs in s", "s", "s.count('{n}')", ["s.count('{m}')", "len(s)"],
     "abcdefghijklmnopqrstuvwxyz"),
    ("sum", "the sum of xs plus {n}", "xs", "sum(xs) + {n}", ["sum(xs) - {n}", "len(xs) + {n}"], range(0, 30)),
    ("addeach", "xs with {n} added to each element", "xs", "[v + {n} for v in xs]",
     ["[v - {n} for v in xs]", "[v + {m} for v in xs]"], range(1, 30)),
    ("above", "the elements of xs greater than {n}", "xs", "[v for v in xs if v > {n}]",
     ["[v for v in xs if v < {n}]", "[v for v in xs if v >= {n}]"], range(0, 30)),
]
PYFUNC_INPUTS = {"x": [0, 1, 2, 7, 12, 30, 45, -5],
                 "s": ["", "a", "hello", "banana", "abcdefghijkl", "python code", "mississippi river",
                       "the quick brown fox jumps over the lazy dog"],
                 "xs": [[], [1, 2, 3], [5, -2, 40, 7], [30, 31, 0, 12]]}


def pyfunc_task(template, i):
    """(task_id, instruction, right solution, [wrong solutions], assert test) for constant number i of a template.
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
    solution = f"def f({arg}):\n    return {{}}"
    return (f"pyfunc-{name}-{n}", f"Write a Python function f({arg}) that returns {what.format(n=n)}.",
            solution.format(body.format(n=n, m=m)), [solution.format(w.format(n=n, m=m)) for w in wrong], test)


def _result_or_error(f, value):
    try:
        return f(value)
    except Exception as e:
        return e


def pyfunc_records(split):
    """Small Python functions from templates (x plus 7, the first 3 characters of s, ...) with assert tests
    (metadata.test, entry_point f): each task once with its right solution (is_correct) and once with a wrong one
    that its tests reject. The ~530 tasks are shuffled with a fixed seed: the first 10 % are validation."""
    tasks = [pyfunc_task(t, i) for t in PYFUNC_TEMPLATES for i in range(len(t[5]))]
    rng = random.Random(1234)
    rng.shuffle(tasks)
    cut = len(tasks) // 10
    records = []
    for task_id, instruction, right, wrongs, test in tasks[:cut] if split == "validation" else tasks[cut:]:
        metadata = {"test": test, "entry_point": "f"}
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
        from mlflow.entities import Param
        cfg, uri = self.cfg, tracking_uri(self.cfg)
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(cfg.mlflow.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            cfg.mlflow.experiment, artifact_location=experiment_artifact_location(cfg, uri))
        if not exp or EXPERIMENT_KIND not in exp.tags:  # else MLflow 3's UI opens it as a GenAI experiment
            self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND, "custom_model_development")
        if self.run_id:
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "train/loss")
            return max((m.step for m in history), default=0)
        tags = {"pipeline": cfg.experiment.pipeline, **{str(k): str(v) for k, v in cfg.mlflow.tags.items()}}
        if cfg.experiment.description:
            tags["mlflow.note.content"] = cfg.experiment.description
        self.run_id = self.client.create_run(exp_id, run_name=self.run_name, tags=tags).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg.to_dict()).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
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
            client.set_tag(run_id, "resume_from", f"runs:/{run_id}/checkpoints/{Path(resume_from).name} ({resume_from})")
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
    needed = tracking_uri(cfg).startswith("http") or cfg.mlflow.s3_artifacts.startswith("s3://")
    lines = [(found or bool(set_vars) or not needed, f"{env_path} {'found' if found else 'not found (copy .env.example to .env)'}; "
                                       f"set: {', '.join(set_vars) or 'none'}")]
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
        ce, valid, _ = policy_ce(model, tokens, labels, self.H)
        log_head_losses(meter, "train", ce.detach(), valid)
        return W.mtp_loss(ce, valid)

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
        ce, valid, values = policy_ce(model, tokens, labels, H, values=True)
        mask = labels != -100
        with torch.no_grad():
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
        policy_valid = valid if t.policy_on_incorrect else valid & (rewards > 0)[:, None, None]
        policy = W.mtp_loss(ce, policy_valid, W.heads_from_tokens(w_tok, H))
        targets, value_mask = W.value_targets(values, rewards, mask, t.gamma, t.td_lambda)
        v_loss = W.value_loss(values, targets, value_mask)
        n_tok = mask.sum()
        log_head_losses(meter, "train", ce.detach(), valid)
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
        self.reference = build_model()  # the policy's architecture, LoRA included
        ref = self.cfg.reference.path
        if ref and (Path(ref) / "params.json").exists():
            load_meta_weights(self.reference, ref)
        elif ref:
            load_checkpoint_into(self.reference, fetch(ref, "baseline", "checkpoints/checkpoint_final.pt"))
        else:  # also when resuming: the frozen copy is the *starting* policy
            self.reference.load_state_dict(model.state_dict())
        self.reference.requires_grad_(False).eval().to(device)

    def loss(self, model, batch, meter, step):
        H = self.H
        tokens, labels, _ = batch
        ce, valid, _ = policy_ce(model, tokens, labels, H)
        with torch.inference_mode():
            ce_ref, _ = self.reference(tokens, W.shift_targets(labels, 1), n_heads=1)
        ce_ref = ce_ref[..., 0].clone()  # a normal tensor again: inference tensors may not enter autograd
        excess = W.excess_loss(ce.detach(), W.reference_ce_to_heads(ce_ref, H))
        w = W.topk_weights(excess, valid, self.t.k_percent)
        log_head_losses(meter, "train", ce.detach(), valid)
        meter.add("train/excess_loss_mean", (excess * valid).sum(), valid.sum())
        meter.add("train/weight_sparsity", W.weight_sparsity(w, valid) * valid.sum(), valid.sum())
        return W.mtp_loss(ce, valid & (w > 0))


PIPELINE_TYPES = {p.name: p for p in (Baseline, Critic, Verifiable, Rho1)}  # a fifth pipeline: one class, one entry
PIPELINES = tuple(PIPELINE_TYPES)
RUN_NAMES = {name: p.run_name for name, p in PIPELINE_TYPES.items()}


# -----------------------------------------------------------------------------
# validation: val/loss (+ heads), accuracy by greedy decoding, and the critic's explained variance and AUC


def batches_of(examples, size):
    return [examples[i:i + size] for i in range(0, len(examples), size)]


class Validation:
    """Validation on this rank's share of the examples, every eval_interval steps and at the end; the pipeline
    decides what it measures."""

    def __init__(self, setup, autocast):
        self.pipeline, self.examples, self.checker, self.tok = setup.pipeline, setup.val_examples, setup.checker, setup.tok
        self.interval, self.batch_size = setup.cfg.training.eval_interval, setup.cfg.training.batch_size
        self.rank, self.world, self.device, self.autocast = setup.rank, setup.world, setup.device, autocast

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
            if self.pipeline.decodes and self.checker is not None:
                out["val/accuracy"] = accuracy(model, mine, self.checker, self.tok, self.device, self.autocast)
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


def accuracy(model, examples, checker, tok, device, autocast):
    """Share of distinct validation prompts whose greedy answer the dataset's checker accepts, over all ranks."""
    records = list({e[3]["task_id"] if "task_id" in e[3] else id(e[3]): e[3] for e in examples}.values())
    max_new = max(len(tok.encode(r["output"])) for r in records) + 2
    right = 0
    for chunk in batches_of(records, 64):
        prompts = [[tok.bos_id] + tok.encode(render_prompt(r)) for r in chunk]
        with autocast():
            outs = greedy_decode(model, prompts, tok.eos_id, tok.pad_id, max_new, device)
        for r, out in zip(chunk, outs):
            answer = out[:out.index(tok.eos_id)] if tok.eos_id in out else out
            right += bool(checker(r, tok.decode(answer)))
    right, total = all_reduce(torch.tensor([float(right), float(len(records))], device=device)).tolist()
    return right / max(total, 1.0)


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
                                                 tok, ds.max_length, ds.on_overlong, ds.train)
    val_examples, _ = encode_records(sample_records(val_records, s.val_samples, correct, s.seed + 1),
                                     tok, ds.max_length, ds.on_overlong, ds.validation)
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

    def take(self, n):
        batches = []
        for _ in range(n):
            epoch, index = divmod(self.position, self.per_epoch)
            order = epoch_order(len(self.examples), epoch, self.seed, self.rank, self.world)
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
        return {"run_id": run_id, "steps": s.total_steps, "model": s.model, **val}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# evaluation by execution: completions for tasks with tests, run in the sandbox (sandbox.py), scored as pass@k


def eval_tasks(spec, max_tasks=0):
    """task_id -> record for a JSONL path or builtin:<name>: the first record of each task (the tests are the
    task's, whichever answer a record carries); max_tasks keeps the first N task ids in sorted order."""
    tasks = {}
    for record in load_records(spec, "eval")[0]:
        tasks.setdefault(str(record.get("task_id", record.get("_source"))), record)
    return {tid: tasks[tid] for tid in sorted(tasks)[:max_tasks or None]}


def model_to_evaluate(cfg, use_micro, checkpoint, rank, device):
    """(tok, model, the training run to log into or None, its step): the model of the config, with a trainer
    checkpoint loaded when given (a path, s3://, runs:/ or auto = the newest finished run of the config's pipeline)."""
    tok, model = build_model(cfg, use_micro, value_head=True)  # so every pipeline's checkpoint loads strictly
    run_id, step = None, 0
    if checkpoint:
        cache = Path(cfg.checkpoint.dir) / ".cache"
        found = (resolve_uri(cfg, checkpoint, cfg.experiment.pipeline, "checkpoints/checkpoint_final.pt", cache)
                 if rank == 0 else None)
        state = load_checkpoint_into(model, on_this_node(cfg, found, cache))
        run_id = None if str(state["run_id"]).startswith("local-") else state["run_id"]
        step = state["step"]
    return tok, model.to(device).eval(), run_id, step


def sample_completions(model, tok, tasks, e, rank, world, device):
    """[(task_id, completion)] for every task, e.n_samples each (greedy when 1), generated in batches with the
    KV cache; each rank generates its share of the tasks and rank 0 gathers them all."""
    g = torch.Generator(device=device).manual_seed(e.seed + rank)
    prompts = [(tid, [tok.bos_id] + tok.encode(render_prompt(tasks[tid])))
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
                pairs = sample_completions(model, tok, tasks, e, rank, world, device)
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
    from mlflow.entities import Metric, Param
    client, own_run = MlflowClient(tracking_uri(cfg)), run_id is None
    if own_run:
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(
            cfg.mlflow.experiment, artifact_location=experiment_artifact_location(cfg, tracking_uri(cfg)))
        run_id = client.create_run(exp_id, run_name="evaluate", tags={"pipeline": "evaluate"}).info.run_id
        params = flatten({"eval": cfg.to_dict()["eval"], "experiment": cfg.to_dict()["experiment"]})
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(metric_name(f"eval/{k}"), float(v), now, step)
                                      for k, v in summary.items() if k.startswith("pass@")])
    client.log_text(run_id, "".join(json.dumps(r) + "\n" for r in results), "eval/samples.jsonl")
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    log.info(f"logged {', '.join(k for k in summary if k.startswith('pass@'))} to run {run_id}")


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
    e = sub.add_parser("evaluate", help="pass@k of a checkpoint's completions (or of --samples) by running them")
    e.add_argument("--config", required=True)
    e.add_argument("--use-micro-model", action="store_true", help="the small random-init CPU model, byte tokenizer")
    e.add_argument("--checkpoint", help="PATH, s3://..., runs:/<id>/..., or auto (the newest finished run)")
    e.add_argument("--samples", help="score these {task_id, completion} JSONL lines instead of generating")
    e.add_argument("--json", help="also write the summary here")
    e.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
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
        if args.command == "evaluate":
            cfg = load_config(args.config, args.override)
            evaluate(cfg, args.use_micro_model, args.checkpoint, args.samples, args.json)
            return 0
        overrides = args.override + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            print(yaml.safe_dump(redacted(cfg.to_dict()), sort_keys=False), end="")
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
