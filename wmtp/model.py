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

from wmtp.config import UserError


@dataclasses.dataclass
class ModelArgs:
    """A LLaMA's shape: Meta's params.json fields plus what an HF config.json may state. n_layers counts the
    trunk blocks and the H = n_future_tokens head blocks; n_kv_heads None means n_heads (no grouped-query)."""
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
    tie_word_embeddings: bool = False  # the unembedding is the embedding matrix itself (HF's tied checkpoints)


def rms_norm(x, eps):
    """x / sqrt(mean(x²) + eps) over the last dim, computed in fp32 and returned in x's dtype: RMSNorm before its
    weight (the blocks' RMSNorm and the stacked heads' share it)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    """rms_norm(x, eps) · weight, weight [dim] starting at 1."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """rms_norm(x) · weight."""
        return rms_norm(x, self.eps) * self.weight


def rope_angles(head_dim, length, theta, device):
    """(cos, sin) [length, head_dim / 2] fp32 of the angles p·θ_i, θ_i = theta^(-2i / head_dim), for positions
    p = 0..length-1."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[2i], x[2i+1]) by angle pos·θ_i: Meta's interleaved convention, so its weights load as-is."""
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    cos, sin = cos[..., None, :], sin[..., None, :]  # [T, d/2] for every row alike, or [B, T, d/2] per row
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with RoPE, x [B,T,dim] -> [B,T,dim]; keys and values have n_kv_heads heads, each
    shared by n_heads / n_kv_heads query heads (grouped-query attention)."""

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
    """SwiGLU: w2(silu(w1 x) · w3 x). Hidden width: hidden_dim when given, else Meta's rule: 2/3 · 4 · dim, times
    ffn_dim_multiplier, rounded up to a multiple of multiple_of."""

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
        """[..., dim] -> [..., dim]."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """A pre-norm transformer block (compute), [B,T,dim] -> [B,T,dim]."""

    checkpointed = False  # training.activation_checkpointing: keep the block's input only, recompute in backward

    def __init__(self, a):
        super().__init__()
        self.attention, self.feed_forward = Attention(a), FeedForward(a)
        self.attention_norm, self.ffn_norm = RMSNorm(a.dim, a.norm_eps), RMSNorm(a.dim, a.norm_eps)

    def forward(self, x, cos, sin, cache=None):
        """compute, under activation checkpointing when `checkpointed` and training (grad enabled, no cache)."""
        if self.checkpointed and torch.is_grad_enabled() and cache is None:
            return activation_checkpoint(self.compute, x, cos, sin, use_reentrant=False)
        return self.compute(x, cos, sin, cache)

    def compute(self, x, cos, sin, cache=None):
        """h = x + attention(attention_norm(x)), then h + feed_forward(ffn_norm(h)); cache as in Attention.forward."""
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
        """(loss, a scalar, and ce [B,T,h] fp32, not differentiable) of the normed head states xs, h of [B,T,d], against
        targets [B,T,h] and the unembedding weight [V,d]; the gradients are computed here and saved."""
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
        """forward's saved gradients of weight and of each x, times grad_loss; None for targets and head_weights."""
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return scaled[0], None, None, *scaled[1:]


class MTPTransformer(nn.Module):
    """A shared trunk and H one-block heads; every head reads the trunk output; one shared norm and output.

    `layers` holds n_layers - H + 1 blocks (all but the last are the trunk, the last is head 0), `extra_heads`
    the other H - 1. Head k at position t predicts the token at t+1+k. The optional value head is
    Linear(dim, 1) on the final-normed hidden state of head 0, read detached: value losses train the value head
    only, never the policy.

    Methods of fixed return types: trunk_states (hidden, the one place the trunk runs), head_states, unembed
    (logits), value (V); forward, training's one entry point, (loss, ce, V); logits for evaluation; next_logits and
    heads_states through a KV cache.
    """

    def __init__(self, args, value_head=False, memory_efficient_loss=True):
        super().__init__()
        H = args.n_future_tokens
        if args.n_layers - H < 1:
            raise UserError(f"model: n_layers={args.n_layers} leaves no shared trunk block for {H} heads")
        self.args, self.memory_efficient_loss = args, memory_efficient_loss
        parts = dict(init_parts(args, value_head))  # drawn in init_parts' order, the one order of the random init
        self.tok_embeddings = parts["tok_embeddings"]
        self.layers = nn.ModuleList(m for name, m in parts.items() if name.startswith("layers."))
        self.extra_heads = nn.ModuleList(m for name, m in parts.items() if name.startswith("extra_heads."))
        self.norm, self.output, self.value_head = parts["norm"], parts["output"], parts.get("value_head")
        self.tie()

    def tie(self):
        """A tied checkpoint's output is its embedding, one parameter trained as one (and exported as one); loading
        by assignment replaces parameters, so loaders call this again."""
        if self.args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def to_empty(self, *, device, recurse=True):
        """nn.Module.to_empty gives each module a new parameter of its own: a tied output would come out untied."""
        super().to_empty(device=device, recurse=recurse)
        self.tie()
        return self

    def rope(self, length, device):
        """(cos, sin) [length, head_dim / 2] of positions 0..length-1."""
        return rope_angles(self.args.dim // self.args.n_heads, length, self.args.rope_theta, device)

    def trunk_states(self, tokens, cos, sin, caches=None):
        """hidden [B,T,d]: tokens [B,T] embedded and run through the shared blocks (all of `layers` but head 0's),
        the one place the trunk runs. caches (generation): one (keys, values, where, mask) per block, as in
        Attention.forward; None in training (causal attention over the tokens alone)."""
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers[:-1]):
            h = layer(h, cos, sin, None if caches is None else caches[i])
        return h

    def head_states(self, hidden, cos, sin, n_heads):
        """[state [B,T,d] of head k for k < n_heads]: each head's block on the trunk's hidden state (no cache)."""
        if n_heads > self.args.n_future_tokens:
            raise ValueError(f"{n_heads} heads asked of a model of {self.args.n_future_tokens}")
        return [head(hidden, cos, sin) for head in [self.layers[-1], *self.extra_heads][:n_heads]]

    def unembed(self, state):
        """logits [..., V] of a head's state [..., d]: the shared final norm, then the output matrix."""
        return self.output(self.norm(state))

    def value(self, state):
        """V [B,T] fp32: the value head on head 0's final-normed state [B,T,d], read detached (a value loss trains
        the value head alone). fp32: the value head trains while a frozen trunk may be bf16 (model.dtype)."""
        return self.value_head(self.norm(state).detach().float()).squeeze(-1)

    def forward(self, tokens, targets, weigh=None, values=False):
        """Training's one entry point (DDP syncs gradients and FSDP gathers the root's weights on a call of the
        wrapped module): tokens [B,T], targets [B,T,h] (-100 = none) for heads 0..h-1 (h <= H; 0: no LM head, the
        critic's value alone) -> (loss, ce [B,T,h] detached, V [B,T] fp32 when `values`, else None).

        loss = W.mtp_loss(ce, valid, weights) with (valid, weights) = weigh(V detached, or None), called once, after
        the value head and before any CE; without weigh, valid = targets != -100 and weights = 1. valid and weights
        (None = 1) are each a [B,T,h] tensor or a function (k, ce_k) -> [B,T] of head k's detached CE (heads_loss).
        Only the heads with targets run (head 0 also for V): a reference model needs head 0 alone."""
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        h = targets.shape[-1]
        states = self.head_states(self.trunk_states(tokens, cos, sin), cos, sin, max(h, int(values)))
        vals = self.value(states[0]) if values else None
        valid, weights = (targets != -100, None) if weigh is None else weigh(None if vals is None else vals.detach())
        loss, ce = self.heads_loss(states[:h], targets, valid, weights)
        return loss, ce, vals

    def logits(self, tokens, n_heads=None):
        """tokens [B,T] -> logits [B,T,h,V] of heads 0..h-1, h = n_heads (default H): every head's at once, for
        evaluation and tests (training's loss never holds them: forward)."""
        cos, sin = self.rope(tokens.shape[1], tokens.device)
        hidden = self.trunk_states(tokens, cos, sin)
        states = self.head_states(hidden, cos, sin, n_heads or self.args.n_future_tokens)
        return torch.stack([self.unembed(s) for s in states], dim=2)

    def next_logits(self, tokens, positions, width, cache, read):
        """Head 0's logits [B, V] (fp32) at column `read` [B] of each row, for tokens [B, T] at positions [B, T],
        through the KV cache: each token's keys and values go to the slot of its position, and a query at
        position p reads slots 0..p of its row (`width` = 1 + the largest position). Generation only."""
        cos, sin, caches = cache.at(positions, width)
        h = self.layers[-1](self.trunk_states(tokens, cos, sin, caches), cos, sin, caches[-1])
        return self.unembed(h[torch.arange(tokens.shape[0], device=tokens.device), read]).float()

    def heads_states(self, tokens, positions, width, cache, heads):
        """Speculative decoding's forward: (head 0's logits [B, T, V] fp32, every head's state [H, B, T, d]) for
        tokens [B, T] at positions [B, T], through a KVCache(..., heads=True): the trunk as in next_logits, then
        the H head blocks at once (heads: StackedHeads). A head attends over its own keys and values of the
        earlier positions, so every head writes its slots at every position, whichever head's logits are read."""
        cos, sin, caches = cache.at(positions, width)
        states = heads(self.trunk_states(tokens, cos, sin, caches), cos, sin, caches[-1])
        return self.unembed(states[0]).float(), states

    def heads_loss(self, states, targets, valid, weights):
        """(loss = W.mtp_loss(ce, valid, weights), ce [B,T,h] detached) of the heads' states [B,T,d] x h.
        memory_efficient_loss: HeadsCrossEntropy, one head's logits alive at a time and each computed once (O(V + d)
        per token, Gloeckle et al.); else the naive reference, every head's logits kept for backward."""
        head_weights = lambda k, ce_k: head_columns(valid, weights, k, ce_k)
        if not states:  # no LM head asked for (the critic's values): nothing to score
            return torch.zeros((), device=targets.device), torch.zeros(targets.shape, device=targets.device)
        if self.memory_efficient_loss:
            return HeadsCrossEntropy.apply(self.output.weight, targets, head_weights, *map(self.norm, states))
        ce = torch.stack([self._ce(s, targets[..., k]) for k, s in enumerate(states)], dim=2)
        cols = [head_weights(k, ce[..., k].detach()) for k in range(len(states))]
        weights = None if cols[0][1] is None else torch.stack([w for _, w in cols], dim=-1)
        return W.mtp_loss(ce, torch.stack([v for v, _ in cols], dim=-1), weights), ce.detach()

    def _ce(self, state, target):
        logits = self.unembed(state).float()
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="none")
        return ce.view_as(target)


def init_parts(args, value_head=False):
    """(name, module) of MTPTransformer's parts, each built when asked for: the one statement of the parts and of
    the order their random init draws from the RNG. MTPTransformer.__init__ builds itself from it, and a model built
    on the meta device gets the same weights from it a part (at most a block) at a time (pretrained.initial_params)."""
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


class ValueModel(nn.Module):
    """A separate value model (critic.model copy or a model dir): V_t = head(features_t) on its own trunk, an
    MTPTransformer read through head 0's block alone (its extra heads are dropped: a value needs one state per
    position). features_t = the final-normed head-0 state; with `logprob` also the log-probability of the answer
    token read at t under that trunk — a frozen copy of the starting policy — and the answer's running sum
    (W.answer_logprob_features). head: Linear(d, 1), or "mlp": d -> d -> 1 with SiLU. forward -> (score, V) [B,T]
    fp32: V = score (mse targets), or V = σ(score) when `squash` (bce, pairwise: the score is V's logit)."""

    def __init__(self, trunk, head="linear", logprob=False, squash=False):
        super().__init__()
        trunk.extra_heads, trunk.value_head = nn.ModuleList(), None
        self.trunk, self.logprob, self.squash, self.args = trunk, logprob, squash, trunk.args
        d = trunk.args.dim + (2 if logprob else 0)
        self.head = nn.Linear(d, 1) if head == "linear" else nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 1))
        last = self.head if head == "linear" else self.head[-1]
        nn.init.zeros_(last.weight)  # V starts constant: a ranking the head did not learn (a random projection of
        nn.init.zeros_(last.bias)    # log-probabilities that separate right from wrong) cannot show in val/auc

    def forward(self, tokens, labels):
        """(score, V) [B,T] fp32 of tokens [B,T]; labels [B,T] (-100 off the answer) mark the answer for the
        log-probability features."""
        t = self.trunk
        trains_trunk = torch.is_grad_enabled() and any(p.requires_grad for p in t.parameters())
        with torch.set_grad_enabled(trains_trunk):  # a frozen trunk keeps no activations
            cos, sin = t.rope(tokens.shape[1], tokens.device)
            h = t.norm(t.head_states(t.trunk_states(tokens, cos, sin), cos, sin, 1)[0])
            features = h.float()
            if self.logprob:  # the one vocabulary projection: a feature, not a metric
                lp = W.token_logprobs(t.output(h.detach()), tokens)
                features = torch.cat([features, W.answer_logprob_features(lp, labels != -100)], dim=-1)
        score = self.head(features).squeeze(-1)
        return score, torch.sigmoid(score) if self.squash else score


class KVCache:
    """Generation's memory for the trunk and head 0 (heads=True: the trunk, and the H heads stacked, [H, ...]): per
    block, keys and values [B, length, n_kv_heads, head_dim], slot s holding position s of its row; and the RoPE
    angles of positions 0..length-1."""

    def __init__(self, model, batch, length, dtype, device, heads=False):
        a = model.args
        shape = (batch, length, a.n_kv_heads or a.n_heads, a.dim // a.n_heads)
        blocks = model.layers[:-1] if heads else model.layers  # heads: the H head blocks' slots stacked apart
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in blocks]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in blocks]
        if heads:
            H = model.args.n_future_tokens
            self.head_keys = torch.zeros((H, *shape), dtype=dtype, device=device)
            self.head_values = torch.zeros((H, *shape), dtype=dtype, device=device)
        self.cos, self.sin = rope_angles(shape[-1], length, a.rope_theta, device)
        self.heads = heads

    def at(self, positions, width):
        """(cos, sin, caches) for tokens at positions [B, T] whose queries read the first `width` slots: caches
        holds (keys, values, where, mask) as Attention.forward takes it for each trunk block, then for head 0
        (heads=True: for the stacked heads); a query at position p reads slots 0..p of its row."""
        rows = torch.arange(positions.shape[0], device=positions.device)
        mask = (torch.arange(width, device=positions.device) <= positions[..., None])[:, None]
        where = (rows[:, None], positions)
        pairs = [*zip(self.keys, self.values), *([(self.head_keys, self.head_values)] if self.heads else [])]
        return self.cos[positions], self.sin[positions], [(keys, values, where, mask) for keys, values in pairs]


class StackedHeads:
    """The H head blocks as one: each weight stacked on a leading head dim ([H, in, out], LoRA merged, in the
    cache's dtype; wq|wk|wv and w1|w3 side by side), so that the heads' matmuls run as one batched matmul each.
    Speculative decoding runs every head at every step; one block's kernel launches instead of H keeps a verify
    forward near a plain step's cost."""

    def __init__(self, model, dtype):
        blocks = [model.layers[-1], *model.extra_heads]
        weight = lambda lin: lin.merged_weight() if isinstance(lin, LoRALinear) else lin.weight
        part = lambda b, name: getattr(b.attention if name in ("wq", "wk", "wv", "wo") else b.feed_forward, name)
        stack = lambda *names: torch.stack([torch.cat([weight(part(b, n)).detach() for n in names]).T
                                            for b in blocks]).to(dtype)  # [H, in, out]
        self.wqkv, self.wo, self.w13, self.w2 = stack("wq", "wk", "wv"), stack("wo"), stack("w1", "w3"), stack("w2")
        self.attention_norm = torch.stack([b.attention_norm.weight.detach() for b in blocks])[:, None, None]
        self.ffn_norm = torch.stack([b.ffn_norm.weight.detach() for b in blocks])[:, None, None]
        self.eps, attention = blocks[0].attention_norm.eps, blocks[0].attention
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim

    def __call__(self, h, cos, sin, cache):
        """Block.compute of every head on the same trunk output h [B, T, d] -> [H, B, T, d]; cache as in
        Attention.forward, with keys and values [H, B, S, n_kv_heads, head_dim]."""
        keys, values, (rows, positions), mask = cache
        H, (B, T, _) = len(self.wo), h.shape
        mm = lambda x, w: torch.bmm(x.reshape(H, B * T, -1), w).view(H, B, T, -1)  # head k's x times head k's w
        x = rms_norm(h, self.eps)[None] * self.attention_norm
        q, k, v = mm(x, self.wqkv).split([self.n_heads * self.head_dim, *[self.n_kv_heads * self.head_dim] * 2], -1)
        q = apply_rope(q.view(H, B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(H, B, T, self.n_kv_heads, self.head_dim), cos, sin)
        heads = torch.arange(H, device=h.device)[:, None, None]
        keys[heads, rows[None], positions[None]] = k
        values[heads, rows[None], positions[None]] = v.view(H, B, T, self.n_kv_heads, self.head_dim)
        width = mask.shape[-1]
        k, v = (c[:, :, :width].flatten(0, 1).transpose(1, 2) for c in (keys, values))
        y = F.scaled_dot_product_attention(q.flatten(0, 1).transpose(1, 2), k, v, attn_mask=mask.repeat(H, 1, 1, 1),
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        h = h[None] + mm(y.transpose(1, 2), self.wo)
        gate, up = mm(rms_norm(h, self.eps) * self.ffn_norm, self.w13).chunk(2, -1)
        return h + mm(F.silu(gate) * up, self.w2)


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
        """x [..., in] -> [..., out] as above, the adapters cast to x's dtype."""
        low_rank = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return F.linear(x, self.weight) + low_rank * self.scale

    def merged_weight(self):
        """W + (α/r)·B A [out, in] in W's dtype, not detached: the plain weight this layer computes with (export,
        StackedHeads)."""
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


def padded(prompts, pad_id, device):
    """(tokens [B, width] right-padded, lengths [B]) of prompts (lists of ids, each at least one token long)."""
    if not prompts or not all(prompts):
        raise ValueError("generate: needs at least one prompt, and every prompt at least one token (BOS)")
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    return tokens, torch.tensor([len(p) for p in prompts], device=device)


def cache_dtype(model):
    """What wk and wv give: autocast's dtype when it is on, else the weights'."""
    device = model.output.weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else model.output.weight.dtype


@torch.no_grad()
def generate(model, prompts, eos_id, pad_id, max_new_tokens, temperature=0.0, top_p=1.0, generator=None,
             speculative=False, stats=None, stop=None):
    """Continue each prompt (a list of token ids) with head 0, batched, through a KV cache: one forward over the
    prompts, then one token per row per step. Returns each completion's ids up to and excluding EOS, at most
    max_new_tokens. Sampling draws from `generator` (on the model's device) when temperature > 0. `stop(b, ids)`,
    asked with row b's completion so far, ends the row as EOS does once it says True, the token that made it so
    kept (a benchmark's stop sequences: evaluation.StopAt), so that generation ends early.

    speculative (greedy only, H > 1): speculative_greedy below, the same tokens in fewer forwards. `stats`, a dict,
    receives the counts of decode_stats (tokens, forwards, and for speculative decoding drafts and acceptances).

    Right padding with per-row positions: row b's token at position p sits in cache slot p, so its slots hold its
    own tokens only, RoPE reads the same angle tables as training, and one mask (slot <= position) serves the
    prompt forward and every step. The pads after a short prompt are written to slots its next tokens overwrite
    before any query can read them."""
    device = model.output.weight.device
    tokens, lengths = padded(prompts, pad_id, device)
    if speculative and temperature == 0 and model.args.n_future_tokens > 1:
        return speculative_greedy(model, tokens, lengths, eos_id, max_new_tokens, stats, stop)
    (B, width), forwards = tokens.shape, torch.zeros(len(prompts), dtype=torch.long, device=device)
    cache = KVCache(model, B, width + max_new_tokens, cache_dtype(model), device)
    logits = model.next_logits(tokens, torch.arange(width, device=device).expand(B, width), width, cache, lengths - 1)
    out = torch.full((B, max_new_tokens), eos_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        forwards += ~done
        nxt = torch.where(done, eos_id, next_token(logits, temperature, top_p, generator))  # a finished row stays put
        out[:, step] = nxt
        done |= nxt == eos_id
        if stop is not None:
            rows = out[:, :step + 1].tolist()
            for b in (~done).nonzero()[:, 0].tolist():
                done[b] = bool(stop(b, rows[b]))
        if step == max_new_tokens - 1 or done.all():
            break
        positions = (lengths + step)[:, None]  # the token just chosen sits right after the row's last one
        logits = model.next_logits(nxt[:, None], positions, width + step + 1, cache, torch.zeros_like(lengths))
    add_stats(stats, forwards.sum(), forwards.sum(), [])  # plain: one token per forward per row
    return [row[:row.index(eos_id)] if eos_id in row else row for row in out.tolist()]


def add_stats(stats, tokens, forwards, accepted, verified=0):
    """decode_stats' counts, summed over calls: tokens decided (EOS included), forwards that decided them (a row's
    share of each forward it was still running in), per extra head k the verify forwards that accepted its draft,
    and the verify forwards."""
    if stats is None:
        return
    stats["tokens"] = stats.get("tokens", 0) + int(tokens)
    stats["forwards"] = stats.get("forwards", 0) + int(forwards)
    stats["verified"] = stats.get("verified", 0) + int(verified)
    old = stats.get("accepted", [])
    stats["accepted"] = [int(a) + (old[k] if k < len(old) else 0) for k, a in enumerate(accepted)] or old


def decode_stats(stats):
    """{tokens_per_forward: tokens / forwards (1.0 for plain decoding), accept_head_{k}: the share of verify
    forwards in which head k's draft was accepted (which needs heads 1..k-1's too)}."""
    out = {"tokens_per_forward": stats["tokens"] / max(stats["forwards"], 1)}
    for k, a in enumerate(stats.get("accepted", []) if stats.get("verified") else [], 1):  # none: nothing drafted
        out[f"accept_head_{k}"] = a / stats["verified"]
    return out


def first_stops(stop, out, start, end, done):
    """(n, stopped) for rows that decided out[b, start[b]:end[b]] in one verify forward: n[b] is the shortest length
    in (start, end] whose completion `stop` ends (the row then stopped), else end."""
    n, stopped = end.clone(), torch.zeros_like(done)
    if (~done).any():
        rows = out.tolist()
        for b in (~done).nonzero()[:, 0].tolist():
            k = next((k for k in range(int(start[b]) + 1, int(end[b]) + 1) if stop(b, rows[b][:k])), None)
            if k is not None:
                n[b], stopped[b] = k, True
    return n, stopped


@torch.no_grad()
def speculative_greedy(model, tokens, lengths, eos_id, max_new_tokens, stats=None, stop=None):
    """Self-speculative greedy decoding (Gloeckle et al. 2024, after Stern et al. 2018): plain greedy's tokens.

    Each row holds its pending token t (head 0's greedy choice after its last accepted token, not yet fed) and
    drafts d_1..d_{H-1}, heads 1..H-1's argmax at that last accepted position. One forward over [t, d_1, ...,
    d_{H-1}] gives head 0's greedy choice g_j after each; d_j is right when d_1..d_j equal g_0..g_{j-1}. With a
    the length of that prefix, g_0..g_a are exactly what plain greedy would decide next (cut after an EOS): a + 1
    tokens for one forward; g_a is the new pending token and the heads' argmax at column a the new drafts. Rows
    advance by their own a: the cache addresses slots by each row's positions, so a rejected draft's slots are
    overwritten by the next forward before any query reads them (a query at position p reads slots <= p); `out`
    likewise takes all H choices at a row's next slots, and the next forward's overwrite those past the accepted.
    `stop` is asked after each token a forward decided, in order, so a row ends where plain decoding ends it."""
    device, (B, width), H = tokens.device, tokens.shape, model.args.n_future_tokens
    cache = KVCache(model, B, width + max_new_tokens + H, cache_dtype(model), device, heads=True)
    heads = StackedHeads(model, cache_dtype(model))
    rows, cols = torch.arange(B, device=device), torch.arange(H, device=device)
    draft = lambda states, read: model.unembed(states[1:, rows, read]).argmax(-1).T  # [B, H - 1]
    logits, states = model.heads_states(tokens, torch.arange(width, device=device).expand(B, width), width, cache,
                                        heads)
    pending, drafts = logits[rows, lengths - 1].argmax(-1), draft(states, lengths - 1)
    out = torch.full((B, max_new_tokens + 2 * H), eos_id, dtype=torch.long, device=device)  # n may pass the end by H
    out[:, 0] = pending
    n = torch.ones(B, dtype=torch.long, device=device)  # tokens decided per row
    done = (pending == eos_id) | (n >= max_new_tokens)
    fed_at, history = (lengths - 1)[:, None] + cols, []  # the pending token goes right after the row's last one
    while not done.all():
        positions = fed_at + n.clamp(max=max_new_tokens)[:, None]  # a finished row's n may be past the end: clamped
        logits, states = model.heads_states(torch.cat([pending[:, None], drafts], 1), positions,
                                            int(positions.max()) + 1, cache, heads)
        greedy = logits.argmax(-1)  # [B, H]: head 0's choice after each fed token
        a = (drafts == greedy[:, :-1]).cumprod(1).sum(1)  # the longest right prefix of the drafts
        before_eos = ((greedy == eos_id).cumsum(1) == 0).sum(1)  # the column of the first EOS, H if none
        out.scatter_(1, n[:, None] + cols, greedy)
        history.append(torch.where(done, -1, a))
        n_before, n = n, n + torch.where(done, 0, torch.minimum(a, before_eos) + 1)
        if stop is not None:
            n, stopped = first_stops(stop, out, n_before, n.clamp(max=max_new_tokens), done)
            done = done | stopped
        done = done | (before_eos <= a) | (n >= max_new_tokens)
        pending, drafts = greedy[rows, a], draft(states, a)
    n = n.clamp(max=max_new_tokens)
    a = torch.stack(history) if history else torch.zeros(0, B, dtype=torch.long, device=device)  # [forwards, B]
    accepted = [int((a >= k).sum()) for k in range(1, H)]  # head k's draft is kept when a >= k
    verified = int((a >= 0).sum())
    add_stats(stats, n.sum(), B + verified, accepted, verified)
    rows_out = [row[:k] for row, k in zip(out.tolist(), n.tolist())]
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows_out]
