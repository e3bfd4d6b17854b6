"""
All the weighting math of weighted-mtp, as pure tensor functions.

No I/O, no globals, no torch.distributed: the trainer all-reduces whatever needs reducing
and passes the result in (see `whiten`'s mean/std). Shapes: B batch, T positions, H heads.

Token alignment (shared by every function here): labels[b, t] is the token at position t
(-100 on prompt and padding); head k at position t predicts the token at t+1+k; a per-token
weight w_tok[b, j] belongs to the token at j, so head k at t uses w_tok[b, t+1+k].

Masks may be bool or float (0/1) tensors; they are converted with .bool().
"""
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# alignment


def _per_head(x, n_heads, first, fill):
    # out[..., t, k] = x[..., t + first + k], `fill` past the end. F.pad keeps dtype and autograd.
    T = x.shape[-1]
    cols = []
    for k in range(n_heads):
        s = min(first + k, T)
        cols.append(F.pad(x[..., s:], (0, s), value=fill))
    return torch.stack(cols, dim=-1)


def shift_targets(labels, n_heads):
    """
    targets[b, t, k] = labels[b, t+1+k], -100 past the end.
    labels [B, T] long -> [B, T, H] long.
    """
    return _per_head(labels.long(), n_heads, 1, -100)


def heads_from_tokens(w_tok, n_heads):
    """
    out[b, t, k] = w_tok[b, t+1+k], 0 past the end: the weight of the token head k at t predicts.
    w_tok [B, T] -> [B, T, H].
    """
    return _per_head(w_tok, n_heads, 1, 0)


def reference_ce_to_heads(ce_ref_ntp, n_heads):
    """
    out[b, t, k] = ce_ref_ntp[b, t+k], 0 past the end.
    The reference is a next-token model: its CE at position t+k is for the token at t+1+k,
    which is the target of head k at t.
    ce_ref_ntp [B, T] -> [B, T, H].
    """
    return _per_head(ce_ref_ntp, n_heads, 0, 0)


# -----------------------------------------------------------------------------
# losses


def mtp_loss(ce, valid, weights=None):
    """
    loss_k = sum_{b,t} w * ce * valid / sum_{b,t} valid       (per head k)
    loss   = mean of loss_k over the heads with >= 1 valid target  (0 if there is none)
    ce [B, T, H], valid [B, T, H] (bool or 0/1), weights [B, T, H] or None (= 1) -> scalar.
    """
    valid = valid.bool()
    # where, not multiply by the mask: ce (or w) at invalid targets may be inf/nan, and inf*0 = nan,
    # in the loss and in the gradient alike; so mask each factor before the product.
    wce = torch.where(valid, ce, torch.zeros_like(ce))
    if weights is not None:
        w = weights.to(ce.dtype)
        wce = wce * torch.where(valid, w, torch.zeros_like(w))
    num = wce.sum(dim=(0, 1))  # [H]
    den = valid.sum(dim=(0, 1))  # [H]
    has = den > 0
    per_head = num / den.clamp(min=1).to(num.dtype)
    # no .item(): stays on device, and with no valid head this is 0 with a grad path to ce.
    return (per_head * has.to(num.dtype)).sum() / has.sum().clamp(min=1).to(num.dtype)


def head_loss_weights(spec, n_heads):
    """
    lambda_k for k = 0..H-1 from training.head_loss_weights: one number r is a decay, lambda_k = r^k (head 0
    always 1); H numbers are lambda_k as given. The trainer multiplies them into mtp_loss's weights, so
    loss = mean over heads of lambda_k * loss_k. spec: a list of floats -> [H] float tensor.
    """
    if len(spec) == 1:
        return torch.tensor(float(spec[0])) ** torch.arange(n_heads, dtype=torch.float32)
    return torch.tensor([float(x) for x in spec])


def mtp_scale(valid, weights=None):
    """
    scale[b,t,k] = w * valid / max(n_k, 1) / max(#heads with n_k > 0, 1),   n_k = sum_{b,t} valid[b,t,k]
    mtp_loss is linear in ce with this (detached) coefficient: mtp_loss(ce, valid, weights) == (scale * ce).sum()
    for every ce finite on the valid entries, so scale is also d mtp_loss / d ce. On one head's column
    ([B,T,1]) it gives that head's loss_k alone.
    valid [B, T, H] (bool or 0/1), weights [B, T, H] or None (= 1) -> [B, T, H] float. Detached.
    """
    with torch.no_grad():
        valid = valid.bool()
        w = torch.ones(valid.shape, device=valid.device) if weights is None else weights.detach()
        w = w if w.is_floating_point() else w.float()
        n = valid.sum(dim=(0, 1))  # [H]
        per_head = torch.where(valid, w, torch.zeros_like(w)) / n.clamp(min=1).to(w.dtype)
        return per_head / (n > 0).sum().clamp(min=1).to(w.dtype)


def value_loss(values, targets, value_mask):
    """
    loss = sum(mask * (V - target)^2) / max(sum(mask), 1)
    values, targets, value_mask [B, T] -> scalar. Gradient flows to values only.
    """
    mask = value_mask.bool()
    sq = (values - targets.detach().to(values.dtype)) ** 2
    return torch.where(mask, sq, torch.zeros_like(sq)).sum() / mask.sum().clamp(min=1).to(sq.dtype)


# -----------------------------------------------------------------------------
# verifiable rewards: TD errors, GAE, value targets


def td_errors(values, rewards, response_mask, gamma):
    """
    For each response token j (mask true), with V_{j-1} the value at the previous position:
      delta_j = gamma * V_j - V_{j-1}   if j is not the last response token of its row
      delta_j = R - V_{j-1}             if it is (the episode ends with reward R)
    and 0 outside the response. A response token at j = 0 uses V_{-1} = 0 (never happens in
    practice: a prompt precedes the response).
    values [B, T], rewards [B], response_mask [B, T] -> [B, T].
    """
    mask = response_mask.bool()
    R = rewards.to(values.dtype).unsqueeze(-1)  # [B, 1]
    v_prev = F.pad(values[..., :-1], (1, 0), value=0.0)
    # the last response token is the one with exactly one response token at or after it
    left = mask.flip(-1).cumsum(-1).flip(-1)
    is_last = mask & (left == 1)
    delta = torch.where(is_last, R - v_prev, gamma * values - v_prev)
    return torch.where(mask, delta, torch.zeros_like(delta))


def gae(td, response_mask, gamma, lam):
    """
    A_j = delta_j + gamma * lam * A_{j'}, j' the next response token of the row (non-response
    positions are skipped); the last response token has A = delta. 0 off the mask. lam = 0 gives delta.
    td [B, T], response_mask [B, T] -> [B, T].
    """
    mask = response_mask.bool()
    T = td.shape[-1]
    zero = torch.zeros_like(td[..., 0])
    a_next = zero  # A of the next response token to the right, 0 after the last one
    cols = [None] * T
    for t in range(T - 1, -1, -1):  # a [B] column per step; T is a few thousand at most
        m = mask[..., t]
        a = torch.where(m, td[..., t] + gamma * lam * a_next, zero)
        a_next = torch.where(m, a, a_next)
        cols[t] = a
    return torch.stack(cols, dim=-1) if T > 0 else torch.zeros_like(td)


def value_targets(values, rewards, response_mask, gamma, lam):
    """
    lambda-return of the state before each response token j:
      targets[b, j-1] = V_{j-1} + A_j,  A = gae(td_errors(V, R, mask, gamma), mask, gamma, lam)
      value_mask[b, j-1] = True; elsewhere target 0, mask False.
    With gamma = lam = 1 (and a contiguous response) every target is R: Monte Carlo.
    A response token at j = 0 has no state before it and gets no target.
    Computed on detached values: targets carry no gradient.
    values [B, T], rewards [B], response_mask [B, T] -> (targets [B, T], value_mask [B, T] bool).
    """
    with torch.no_grad():
        v = values.detach()
        mask = response_mask.bool()
        adv = gae(td_errors(v, rewards, mask, gamma), mask, gamma, lam)
        vmask = F.pad(mask[..., 1:], (0, 1), value=False)
        tgt = F.pad(v[..., :-1] + adv[..., 1:], (0, 1), value=0.0)
        tgt = torch.where(vmask, tgt, torch.zeros_like(tgt))
    return tgt, vmask


# -----------------------------------------------------------------------------
# normalisation and weights


def whiten(x, mask, mean=None, std=None, eps=1e-8):
    """
    out = (x - mu) / (sigma + eps) on the mask, 0 off it.
    mu, sigma: the given mean/std as they are (the trainer passes all-reduced or EMA stats), else
    the masked mean and population std (unbiased=False) of x; each missing stat is computed from x.
    x, mask [B, T] -> [B, T].
    """
    mask = mask.bool()
    if mean is None or std is None:
        n = mask.sum().clamp(min=1).to(x.dtype)
        mu_x = torch.where(mask, x, torch.zeros_like(x)).sum() / n
        if mean is None:
            mean = mu_x
        if std is None:
            d2 = (x - mu_x) ** 2
            std = (torch.where(mask, d2, torch.zeros_like(d2)).sum() / n).sqrt()
    out = (x - mean) / (std + eps)
    return torch.where(mask, out, torch.zeros_like(out))


def ema_update(state, batch_mean, batch_var, momentum):
    """
    new = (1 - momentum) * old + momentum * batch, for "mean" and "var".
    state None starts it: {"mean": batch_mean, "var": batch_var}. Never mutates `state`.
    state {"mean": tensor, "var": tensor} or None -> new dict (detached tensors).
    """
    bm = torch.as_tensor(batch_mean).detach().clone()
    bv = torch.as_tensor(batch_var).detach().clone()
    if state is None:
        return {"mean": bm, "var": bv}
    new = dict(state)  # keeps any extra keys the caller stores, without touching the original
    new["mean"] = (1 - momentum) * state["mean"].detach() + momentum * bm
    new["var"] = (1 - momentum) * state["var"].detach() + momentum * bv
    return new


def exp_weights(adv, mask, beta, w_min, w_max):
    """
    w = clamp(exp(adv / beta), w_min, w_max) on the mask, 0 off it. Detached.
    adv, mask [B, T] -> [B, T].
    """
    with torch.no_grad():
        mask = mask.bool()
        w = torch.exp(adv.detach() / beta).clamp(w_min, w_max)  # exp overflow -> inf -> w_max
        return torch.where(mask, w, torch.zeros_like(w))


def excess_loss(ce_policy, ce_ref):
    """excess = ce_policy - ce_ref, elementwise (same shape)."""
    return ce_policy - ce_ref


def topk_weights(scores, valid, ratio):
    """
    Per head k, with n_k valid entries over all (b, t): the m_k = ceil(ratio * n_k) valid entries
    with the largest score get 1, everything else 0. Ties: lower flat index b*T + t first.
    Invalid entries always get 0. Detached.
    scores [B, T, H], valid [B, T, H] -> [B, T, H] float in {0, 1}.
    """
    with torch.no_grad():
        H = scores.shape[-1]
        s = scores.detach().reshape(-1, H)
        v = valid.bool().reshape(-1, H)
        # two stable sorts give the order (valid first, then score descending, then flat index):
        # invalid entries never come before a valid one, not even one whose score is -inf.
        o1 = torch.sort(s, dim=0, descending=True, stable=True).indices
        o2 = torch.sort(v.gather(0, o1).to(torch.uint8), dim=0, descending=True, stable=True).indices
        order = o1.gather(0, o2)
        rank = torch.empty_like(order)
        rank.scatter_(0, order, torch.arange(s.shape[0], device=s.device).unsqueeze(-1).expand_as(order))
        n = v.sum(dim=0)  # [H]
        # ratio * n in float64 can land just above an integer (0.6 * 5 = 3.0000000000000004); the
        # 1e-9 slack takes it back. Float64's error on ratio * n stays far below 1e-9 for any
        # realistic n (< 1e6 tokens per head per step), so a true fraction above 1e-9 still rounds up.
        m = torch.ceil(n.to(torch.float64) * float(ratio) - 1e-9).clamp(min=0)
        m = torch.minimum(m, n.to(torch.float64)).to(rank.dtype)
        sel = (rank < m) & v
        dtype = scores.dtype if scores.is_floating_point() else torch.float32
        return sel.to(dtype).reshape(scores.shape)


# -----------------------------------------------------------------------------
# weight statistics (metrics; detached)


def weight_entropy(w, mask):
    """
    p = w / sum(w) over the mask; entropy = -sum p log p / log N, N = number of masked entries.
    In [0, 1]; 1.0 when N <= 1; 0 log 0 = 0; 0.0 when N > 1 and every masked weight is 0
    (no distribution at all: report it as maximally concentrated rather than uniform).
    w, mask (same shape) -> scalar tensor.
    """
    with torch.no_grad():
        mask = mask.bool()
        w = w.detach()
        if not w.is_floating_point():
            w = w.float()
        w = torch.where(mask, w, torch.zeros_like(w))
        n = mask.sum()
        total = w.sum()
        p = w / torch.where(total > 0, total, torch.ones_like(total))
        plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
        logn = torch.log(n.clamp(min=2).to(w.dtype))
        # all-zero weights leave p = 0 everywhere, hence 0.0; clamp absorbs rounding past 1
        h = (-plogp.sum() / logn).clamp(0.0, 1.0)
        return torch.where(n <= 1, torch.ones_like(h), h)


def weight_sparsity(w, valid):
    """
    sparsity = #(valid and w == 0) / #valid, 0.0 when nothing is valid.
    w, valid (same shape) -> scalar tensor.
    """
    with torch.no_grad():
        valid = valid.bool()
        zeros = ((w.detach() == 0) & valid).sum().to(torch.float32)
        return zeros / valid.sum().clamp(min=1).to(torch.float32)


# -----------------------------------------------------------------------------
# value models (the critic's losses and features) and the checks that its weights carry credit


def bce_value_loss(logits, targets, value_mask):
    """
    Masked binary cross-entropy of V = σ(logits) against targets in [0, 1]:
    mean over value states of −t·log σ(z) − (1 − t)·log(1 − σ(z)). 0 when the mask is empty.
    """
    m = value_mask.bool()
    ce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    return (ce * m).sum() / m.sum().clamp(min=1)


def pairwise_value_loss(scores, rewards, groups):
    """
    Bradley–Terry on right/wrong answers to the same prompt: mean over the pairs (i, j) with groups[i] == groups[j],
    rewards[i] > 0.5 >= rewards[j] of −log σ(scores[i] − scores[j]). scores, rewards, groups [B]; 0 without a pair.
    """
    right, wrong = rewards > 0.5, rewards <= 0.5
    pairs = (groups[:, None] == groups[None, :]) & right[:, None] & wrong[None, :]
    margin = scores[:, None] - scores[None, :]
    return (F.softplus(-margin) * pairs).sum() / pairs.sum().clamp(min=1)


def token_logprobs(logits, tokens):
    """
    out[b, t] = log softmax(logits[b, t−1])[tokens[b, t]]: the log-probability of the token at t given those
    before it; 0 at t = 0. logits [B, T, V], tokens [B, T] -> [B, T] float32.
    """
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, tokens[:, 1:, None].long())[..., 0]
    return F.pad(lp, (1, 0))


def answer_logprob_features(logprobs, response_mask):
    """
    The state at position t has read the tokens up to t: features[b, t] = (lp_t, Σ_{j <= t} lp_j) over response
    tokens j (lp = token_logprobs of a frozen policy; 0 for prompt and padding). [B, T] -> [B, T, 2].
    """
    lp = logprobs * response_mask.bool()
    return torch.stack([lp, lp.cumsum(dim=-1)], dim=-1)


def answer_state_index(value_mask, fraction):
    """
    Index [B] of the value state that has read floor(fraction·(n − 1)) answer tokens, n the row's value states
    (the states before each response token: the first has read none, the last all but the final one, its EOS).
    fraction 1 -> the last value state; 0.5 -> the state after half the answer.
    """
    m = value_mask.bool()
    first = m.float().argmax(dim=1)
    n = m.sum(dim=1)
    return first + torch.floor(fraction * (n - 1).clamp(min=0).float()).long()


def shuffled_across(w_tok, mask, generator=None):
    """
    The weights on the mask (every answer of the batch) permuted at random over the mask's tokens: a control with
    the batch's weights and none of their credit. Not within each answer: a wrong answer's weights are lower as a
    whole (its first wrong token's among them), and a within-answer shuffle keeps that. Off the mask, unchanged.
    """
    m, flat = mask.bool().expand_as(w_tok).flatten(), w_tok.flatten()
    n = m.numel()  # sorts rather than nonzero(): nothing waits for the device
    keys = torch.where(m, torch.rand(n, generator=generator, device=w_tok.device),
                       2.0 + torch.arange(n, device=w_tok.device) / n)  # off the mask: in place, after
    in_order = (~m).float().argsort(stable=True)  # the mask's positions first, in order
    at_random = keys.argsort()  # the mask's positions first, shuffled
    return flat.scatter(0, in_order, flat.gather(0, at_random)).view_as(w_tok)


def token_credit(w_right, w_wrong):
    """
    P(w_right > w_wrong) over paired entries [N] (ties count ½): the right answer's token against the first wrong
    token at the same position. 0.5 = no credit; nan without a pair.
    """
    if w_right.numel() == 0:
        return torch.tensor(float("nan"))
    return ((w_right > w_wrong).float() + 0.5 * (w_right == w_wrong).float()).mean()


def answer_logprob(logprobs, response_mask):
    """
    (sum [B], mean [B]) of each row's answer-token log-probabilities (token_logprobs of the starting policy):
    Σ_j lp_j and Σ_j lp_j / n_b over its response tokens j (n_b of them; the mean is 0 for a row without any).
    As scores of the answers they are the no-training baseline a critic must beat (val/auc_logprob).
    """
    lp = logprobs * response_mask.bool()
    total = lp.sum(dim=-1)
    return total, total / response_mask.bool().sum(dim=-1).clamp(min=1)
