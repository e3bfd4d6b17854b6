"""
The model: Meta's MTP LLaMA layout (a shared trunk, head 0 as the last block of `layers`, H - 1 `extra_heads`, one
norm and unembedding), the fused heads loss (each head's logits once, gradients in forward), LoRA, the KV cache and
generation.

    logits[b, t, k] predicts the token at t + 1 + k (see weights.shift_targets)
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint
import weights as W

from config import UserError


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


def init_parts(args, value_head=False):
    """(name, module) of MTPTransformer's parts, each built when asked for, in its constructor's order: the order
    their random init draws from the RNG. A model built on the meta device gets the same weights from these a part
    (at most a block) at a time (pretrained.initial_weights)."""
    H = args.n_future_tokens
    yield "tok_embeddings", nn.Embedding(args.vocab_size, args.dim)
    for i in range(args.n_layers - H + 1):
        yield f"layers.{i}", Block(args)
    for j in range(H - 1):
        yield f"extra_heads.{j}", Block(args)
    yield "norm", RMSNorm(args.dim, args.norm_eps)
    yield "output", nn.Linear(args.dim, args.vocab_size, bias=False)
    if value_head:
        yield "value_head", nn.Linear(args.dim, 1)


class KVCache:
    """Generation's memory for the trunk and head 0: per block, keys and values [B, length, n_kv_heads, head_dim],
    slot s holding position s of its row; and the RoPE angles of positions 0..length-1."""

    def __init__(self, model, batch, length, dtype, device):
        a = model.args
        shape = (batch, length, a.n_kv_heads or a.n_heads, a.dim // a.n_heads)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.cos, self.sin = rope_angles(shape[-1], length, a.rope_theta, device)


def lora_a_init(rank, in_features, device=None):
    """LoRA's A: N(0, 1/in_features) entries, drawn from the global RNG."""
    return torch.randn(rank, in_features, device=device) / math.sqrt(in_features)


class LoRALinear(nn.Module):
    """y = x Wᵀ + (α/r)·(x Aᵀ) Bᵀ with W frozen; B starts at 0, so training starts from the base layer.

    The base weight keeps its name (`wq.weight`), so Meta checkpoints load into a LoRA model unchanged."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(lora_a_init(rank, base.in_features, base.weight.device))
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
