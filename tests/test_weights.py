"""Tests for weights.py: every function against numbers worked out by hand below."""
import math

import torch
from torch.testing import assert_close

import weights as W

T_, F_ = True, False


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


# -----------------------------------------------------------------------------
# alignment


def test_shift_targets():
    labels = t([[-100, 5, 6, 7]], torch.long)
    out = W.shift_targets(labels, 2)
    # head 0 at t -> labels[t+1]: 5, 6, 7, past end
    # head 1 at t -> labels[t+2]: 6, 7, past end, past end
    expected = t([[[5, 6], [6, 7], [7, -100], [-100, -100]]], torch.long)
    assert out.dtype == torch.long
    assert torch.equal(out, expected)


def test_shift_targets_more_heads_than_positions():
    out = W.shift_targets(t([[1, 2]], torch.long), 4)
    expected = t([[[2, -100, -100, -100], [-100, -100, -100, -100]]], torch.long)
    assert torch.equal(out, expected)


def test_heads_from_tokens():
    w_tok = t([[0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0, 13.0]])
    out = W.heads_from_tokens(w_tok, 2)
    # out[b,t,k] = w_tok[b,t+1+k], 0 past the end
    expected = t([[[1, 2], [2, 3], [3, 0], [0, 0]], [[11, 12], [12, 13], [13, 0], [0, 0]]])
    assert_close(out, expected)


def test_heads_from_tokens_matches_shift_targets():
    # A weight that is the token's own id must land where that token is the target:
    # head k at t uses w_tok[b,t+1+k], whose token is labels[b,t+1+k] = targets[b,t,k].
    labels = t([[-100, -100, 4, 9, 2, 7, -100], [-100, 3, 8, 1, -100, -100, -100]], torch.long)
    H = 3
    targets = W.shift_targets(labels, H)
    w_head = W.heads_from_tokens(labels.float(), H)
    valid = targets != -100
    assert valid.sum() > 0
    assert_close(w_head[valid], targets[valid].float())
    # past the end the weight is 0 and the target -100
    T = labels.shape[1]
    for k in range(H):
        assert torch.all(w_head[:, T - 1 - k :, k] == 0)
        assert torch.all(targets[:, T - 1 - k :, k] == -100)


def test_reference_ce_to_heads():
    ce_ref = t([[10.0, 11.0, 12.0, 13.0]])
    out = W.reference_ce_to_heads(ce_ref, 3)
    # out[b,t,k] = ce_ref[b,t+k]: k=0 unshifted, k=1 by one, k=2 by two, 0 past the end
    expected = t([[[10, 11, 12], [11, 12, 13], [12, 13, 0], [13, 0, 0]]])
    assert_close(out, expected)


def test_reference_ce_to_heads_alignment_with_targets():
    # The reference NTP CE at position p is for the token at p+1. Encode that token id as the "CE"
    # and check head k at t receives the id of its own target labels[t+1+k].
    labels = t([[-100, 4, 9, 2, 7, 5]], torch.long)
    ce_ref = torch.cat([labels[:, 1:], t([[0]], torch.long)], dim=1).float()  # ce_ref[p] ~ token p+1
    H = 3
    out = W.reference_ce_to_heads(ce_ref, H)
    targets = W.shift_targets(labels, H)
    valid = targets != -100
    assert_close(out[valid], targets[valid].float())


# -----------------------------------------------------------------------------
# mtp_loss


def _ce_valid():
    # B=1, T=2, H=3; ce[:, :, k]: head0 [1, 2], head1 [3, 4 (invalid: nan)], head2 invalid (inf)
    ce = t([[[1.0, 3.0, math.inf], [2.0, math.nan, math.inf]]])
    valid = t([[[T_, T_, F_], [T_, F_, F_]]], torch.bool)
    return ce, valid


def test_mtp_loss_unweighted_ignores_heads_without_targets():
    ce, valid = _ce_valid()
    ce.requires_grad_(True)
    loss = W.mtp_loss(ce, valid)
    # head0 (1+2)/2 = 1.5, head1 3/1 = 3, head2 has no valid target -> mean(1.5, 3) = 2.25
    assert_close(loss, t(2.25))
    loss.backward()
    # d/dce = w / n_valid(head) / n_heads_with_targets(2): head0 1/2/2 = 0.25, head1 1/1/2 = 0.5
    expected = t([[[0.25, 0.5, 0.0], [0.25, 0.0, 0.0]]])
    assert_close(ce.grad, expected)


def test_mtp_loss_weighted():
    ce, valid = _ce_valid()
    ce.requires_grad_(True)
    w = t([[[1.0, 2.0, 7.0], [0.5, 9.0, 7.0]]], ).requires_grad_(True)
    loss = W.mtp_loss(ce, valid, w)
    # head0 (1*1 + 0.5*2)/2 = 1, head1 (2*3)/1 = 6 -> mean 3.5
    assert_close(loss, t(3.5))
    loss.backward()
    # d/dce: head0 [1, 0.5]/2/2 = [0.25, 0.125]; head1 2/1/2 = 1
    assert_close(ce.grad, t([[[0.25, 1.0, 0.0], [0.125, 0.0, 0.0]]]))
    # d/dw = ce / n_valid / 2: head0 [1, 2]/2/2 = [0.25, 0.5]; head1 3/1/2 = 1.5
    assert_close(w.grad, t([[[0.25, 1.5, 0.0], [0.5, 0.0, 0.0]]]))


def test_mtp_loss_float_mask_same_as_bool():
    ce, valid = _ce_valid()
    assert_close(W.mtp_loss(ce, valid.float()), W.mtp_loss(ce, valid))


def test_mtp_loss_no_valid_target_is_zero_with_grad_path():
    ce = torch.rand(2, 3, 2, requires_grad=True)
    loss = W.mtp_loss(ce, torch.zeros(2, 3, 2, dtype=torch.bool))
    assert_close(loss, t(0.0))
    assert loss.requires_grad
    loss.backward()
    assert_close(ce.grad, torch.zeros_like(ce))


def test_mtp_loss_rho1_selection_averages_over_selected():
    # loss = mtp_loss(ce, valid & (w > 0)): each head averaged over its selected tokens only
    ce = t([[[4.0], [1.0], [2.0], [8.0]]])  # B=1, T=4, H=1
    valid = t([[[T_], [T_], [T_], [F_]]], torch.bool)
    w = W.topk_weights(ce, valid, 0.5)  # n=3, ceil(1.5)=2: scores 4 and 2 (positions 0 and 2)
    assert_close(w, t([[[1.0], [0.0], [1.0], [0.0]]]))
    assert_close(W.mtp_loss(ce, valid & (w > 0)), t(3.0))  # (4 + 2) / 2


# -----------------------------------------------------------------------------
# TD errors, GAE, value targets


def _episode():
    # row0: prompt at 0,1; response at 2,3,4; R = 1
    # row1: one-token response at 1, then padding; R = 0
    # row2: empty response; R = 1
    values = t([[0.0, 0.5, 0.25, 0.75, 2.0], [1.0, 3.0, 7.0, 7.0, 7.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    rewards = t([1.0, 0.0, 1.0])
    mask = t([[F_, F_, T_, T_, T_], [F_, T_, F_, F_, F_], [F_, F_, F_, F_, F_]], torch.bool)
    return values, rewards, mask


def test_td_errors_worked():
    values, rewards, mask = _episode()
    td = W.td_errors(values, rewards, mask, 0.5)
    # row0: j=2: 0.5*0.25 - 0.5 = -0.375; j=3: 0.5*0.75 - 0.25 = 0.125; j=4 (last): 1 - 0.75 = 0.25
    # row1: j=1 is the last (only) token: 0 - 1.0 = -1.0
    # row2: empty response -> all 0
    expected = t([[0, 0, -0.375, 0.125, 0.25], [0, -1.0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert_close(td, expected)


def test_td_errors_float_mask_and_long_rewards():
    values, rewards, mask = _episode()
    td = W.td_errors(values, rewards.long(), mask.float(), 0.5)
    assert_close(td, W.td_errors(values, rewards, mask, 0.5))


def test_td_errors_response_at_position_zero_uses_zero_previous_value():
    values = t([[2.0, 4.0]])
    # j=0: gamma*V0 - V_{-1}(=0) = 2; j=1 (last): R - V0 = 1 - 2 = -1
    td = W.td_errors(values, t([1.0]), t([[T_, T_]], torch.bool), 1.0)
    assert_close(td, t([[2.0, -1.0]]))


def test_gae_worked():
    values, rewards, mask = _episode()
    td = W.td_errors(values, rewards, mask, 0.5)
    adv = W.gae(td, mask, 0.5, 0.5)
    # gamma*lam = 0.25; row0: A4 = 0.25; A3 = 0.125 + 0.25*0.25 = 0.1875;
    # A2 = -0.375 + 0.25*0.1875 = -0.328125. row1: A1 = -1. row2: 0.
    expected = t([[0, 0, -0.328125, 0.1875, 0.25], [0, -1.0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert_close(adv, expected)


def test_gae_non_contiguous_mask_skips_gaps():
    td = t([[1.0, 2.0, 3.0, 4.0, 5.0]])
    mask = t([[F_, T_, F_, T_, T_]], torch.bool)
    adv = W.gae(td, mask, 1.0, 0.5)
    # A4 = 5; A3 = 4 + 0.5*5 = 6.5; A1 = 2 + 0.5*A3 = 5.25 (position 2 is skipped); off mask 0
    assert_close(adv, t([[0.0, 5.25, 0.0, 6.5, 5.0]]))


def test_gae_lambda_zero_is_td_exactly():
    torch.manual_seed(0)
    values = torch.randn(4, 9)
    rewards = t([1.0, 0.0, 1.0, 0.0])
    mask = torch.zeros(4, 9, dtype=torch.bool)
    mask[0, 3:] = True
    mask[1, 5:7] = True
    mask[2, 8] = True
    mask[3, [2, 4, 5, 8]] = True  # non-contiguous
    td = W.td_errors(values, rewards, mask, 0.9)
    assert torch.equal(W.gae(td, mask, 0.9, 0.0), td)


def test_value_targets_worked():
    values, rewards, mask = _episode()
    tgt, vmask = W.value_targets(values, rewards, mask, 0.5, 0.5)
    # targets[j-1] = V_{j-1} + A_j: row0: 0.5 - 0.328125 = 0.171875, 0.25 + 0.1875 = 0.4375,
    # 0.75 + 0.25 = 1.0; row1: V0 + A1 = 1 - 1 = 0 (= R); row2: none
    assert_close(tgt, t([[0, 0.171875, 0.4375, 1.0, 0], [0.0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]))
    assert vmask.dtype == torch.bool
    assert torch.equal(vmask, t([[F_, T_, T_, T_, F_], [T_, F_, F_, F_, F_], [F_] * 5], torch.bool))


def test_value_targets_monte_carlo():
    torch.manual_seed(1)
    values = torch.randn(3, 7)
    rewards = t([1.0, 0.0, 1.0])
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:] = True  # long response
    mask[1, 3] = True  # one-token response
    # row2: empty response
    tgt, vmask = W.value_targets(values, rewards, mask, 1.0, 1.0)
    # gamma = lam = 1: A_j telescopes to R - V_{j-1}, so every target is R
    expected_mask = torch.zeros(3, 7, dtype=torch.bool)
    expected_mask[0, 1:6] = True
    expected_mask[1, 2] = True
    assert torch.equal(vmask, expected_mask)
    assert_close(tgt[0, 1:6], torch.full((5,), 1.0))
    assert_close(tgt[1, 2], t(0.0))
    assert_close(tgt[~vmask], torch.zeros(int((~vmask).sum())))


def test_value_targets_response_at_zero_has_no_target():
    tgt, vmask = W.value_targets(t([[2.0, 4.0, 9.0]]), t([1.0]), t([[T_, T_, F_]], torch.bool), 1.0, 1.0)
    # j=0 has no previous state; j=1 gives target at 0 = V0 + (R - V0) = 1
    assert torch.equal(vmask, t([[T_, F_, F_]], torch.bool))
    assert_close(tgt, t([[1.0, 0.0, 0.0]]))


def test_value_targets_carry_no_grad():
    values, rewards, mask = _episode()
    values.requires_grad_(True)
    tgt, vmask = W.value_targets(values, rewards, mask, 1.0, 0.95)
    assert not tgt.requires_grad and not vmask.requires_grad
    loss = W.value_loss(values, tgt, vmask)
    loss.backward()
    # the only path to values is the (V - target) term: d/dV = 2 (V - target) / n on the mask
    n = vmask.sum()
    assert_close(values.grad, torch.where(vmask, 2 * (values - tgt) / n, torch.zeros_like(values)).detach())


# -----------------------------------------------------------------------------
# value_loss


def test_value_loss_worked_and_grad():
    values = t([[1.0, 2.0, 3.0]]).requires_grad_(True)
    targets = t([[0.0, 4.0, 100.0]]).requires_grad_(True)
    mask = t([[T_, T_, F_]], torch.bool)
    loss = W.value_loss(values, targets, mask)
    # ((1-0)^2 + (2-4)^2) / 2 = 2.5
    assert_close(loss, t(2.5))
    loss.backward()
    # 2 (V - target) / 2 on the mask: [1, -2, 0]
    assert_close(values.grad, t([[1.0, -2.0, 0.0]]))
    assert targets.grad is None


def test_value_loss_empty_mask_is_zero():
    values = torch.randn(2, 3, requires_grad=True)
    loss = W.value_loss(values, torch.zeros(2, 3), torch.zeros(2, 3))
    assert_close(loss, t(0.0))
    loss.backward()
    assert_close(values.grad, torch.zeros(2, 3))


# -----------------------------------------------------------------------------
# whiten, ema_update


def test_whiten_own_stats():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[T_, T_, T_, F_]], torch.bool)
    out = W.whiten(x, mask, eps=0.0)
    # mean 2, population var (1 + 0 + 1)/3 = 2/3, std sqrt(2/3); (x - 2)/std = -+sqrt(3/2)
    s = math.sqrt(1.5)
    assert_close(out, t([[-s, 0.0, s, 0.0]]))


def test_whiten_given_stats_used_as_is():
    x = t([[1.0, 2.0, 3.0, 100.0]])
    mask = t([[1.0, 1.0, 1.0, 0.0]])  # float mask
    out = W.whiten(x, mask, mean=t(1.0), std=t(2.0), eps=0.0)
    # (x - 1)/2 = 0, 0.5, 1; off mask 0
    assert_close(out, t([[0.0, 0.5, 1.0, 0.0]]))
    out = W.whiten(x, mask, mean=1.0, std=2.0)  # default eps = 1e-8 is negligible here
    assert_close(out, t([[0.0, 0.5, 1.0, 0.0]]))


def test_whiten_empty_mask_is_zero_not_nan():
    out = W.whiten(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2, 3))


def test_ema_update_start_and_step_is_pure():
    bm, bv = t(3.0), t(0.0)
    s0 = W.ema_update(None, t(1.0), t(4.0), 0.25)
    assert_close(s0["mean"], t(1.0))
    assert_close(s0["var"], t(4.0))
    s1 = W.ema_update(s0, bm, bv, 0.25)
    # 0.75*1 + 0.25*3 = 1.5; 0.75*4 + 0.25*0 = 3.0
    assert_close(s1["mean"], t(1.5))
    assert_close(s1["var"], t(3.0))
    # the input dict is untouched
    assert s1 is not s0
    assert_close(s0["mean"], t(1.0))
    assert_close(s0["var"], t(4.0))


def test_ema_update_start_clones():
    bm = t(2.0)
    s = W.ema_update(None, bm, t(1.0), 0.1)
    bm.add_(5.0)
    assert_close(s["mean"], t(2.0))


# -----------------------------------------------------------------------------
# weights


def test_exp_weights_worked_and_detached():
    adv = t([[math.log(2.0), 0.0, -10.0, 10.0, 5.0]]).requires_grad_(True)
    mask = t([[T_, T_, T_, T_, F_]], torch.bool)
    w = W.exp_weights(adv, mask, 1.0, 0.1, 3.0)
    # exp: 2, 1, e^-10 -> clamp 0.1, e^10 -> clamp 3; off mask 0
    assert_close(w, t([[2.0, 1.0, 0.1, 3.0, 0.0]]))
    assert not w.requires_grad
    # beta scales the advantage: exp(2 ln2 / 2) = 2
    w2 = W.exp_weights(t([[2 * math.log(2.0)]]), t([[1.0]]), 2.0, 0.1, 3.0)
    assert_close(w2, t([[2.0]]))


def test_exp_weights_overflow_clamps():
    w = W.exp_weights(t([[1000.0, -1000.0]]), t([[T_, T_]], torch.bool), 1.0, 0.1, 3.0)
    assert_close(w, t([[3.0, 0.1]]))


def test_weight_entropy_all_equal_is_one():
    assert_close(W.weight_entropy(t([[2.0, 2.0, 2.0, 2.0]]), t([[T_] * 4], torch.bool)), t(1.0))
    # only the masked entries count: [1, 1] over the mask
    assert_close(W.weight_entropy(t([[1.0, 1.0, 0.0, 5.0]]), t([[T_, T_, F_, F_]], torch.bool)), t(1.0))


def test_weight_entropy_worked():
    # p = [0.25, 0.75]: -(0.25 ln 0.25 + 0.75 ln 0.75)/ln 2 = 0.5 + 0.75 log2(4/3) = 0.8112781
    h = W.weight_entropy(t([[1.0, 3.0]]), t([[T_, T_]], torch.bool))
    assert_close(h, t(0.8112781))


def test_weight_entropy_edges():
    ones = t([[T_, T_, T_, T_]], torch.bool)
    # one-hot: 0 log 0 = 0, 1 log 1 = 0 -> 0
    assert_close(W.weight_entropy(t([[1.0, 0.0, 0.0, 0.0]]), ones), t(0.0))
    # N = 1 and N = 0 -> 1.0
    assert_close(W.weight_entropy(t([[5.0, 7.0]]), t([[T_, F_]], torch.bool)), t(1.0))
    assert_close(W.weight_entropy(t([[5.0, 7.0]]), t([[F_, F_]], torch.bool)), t(1.0))
    # N > 1 and every weight 0 -> 0.0 (our choice: no distribution)
    assert_close(W.weight_entropy(t([[0.0, 0.0, 9.0]]), t([[T_, T_, F_]], torch.bool)), t(0.0))


def test_excess_loss():
    assert_close(W.excess_loss(t([3.0, 1.0]), t([1.0, 2.0])), t([2.0, -1.0]))


# -----------------------------------------------------------------------------
# top-k


def test_sort_stable_descending_keeps_ties_in_index_order():
    # topk_weights relies on this for its tie rule
    x = t([1.0, 2.0, 1.0, 2.0, 1.0] * 200)
    idx = torch.sort(x, descending=True, stable=True).indices
    twos = torch.arange(1000)[x == 2.0]
    ones = torch.arange(1000)[x == 1.0]
    assert torch.equal(idx, torch.cat([twos, ones]))


def test_topk_weights_worked_per_head():
    # B=1, T=5, H=4; columns are heads
    s0 = [0.5, 0.9, 0.5, 0.5, 0.1]  # all valid, n=5, ceil(0.6*5)=3: 0.9 (t1), then ties 0.5 at t0, t2
    s1 = [5.0, 4.0, 3.0, 2.0, 1.0]  # valid t1..t4, n=4, ceil(2.4)=3: t1, t2, t3 (t0 invalid despite 5.0)
    s2 = [1.0, 1.0, 1.0, 1.0, 1.0]  # nothing valid -> all 0
    inf = -math.inf
    s3 = [inf, inf, inf, inf, inf]  # only t2 valid, n=1, ceil(0.6)=1 -> t2, even at -inf
    scores = t([list(r) for r in zip(s0, s1, s2, s3)]).unsqueeze(0)
    v0 = [T_] * 5
    v1 = [F_, T_, T_, T_, T_]
    v2 = [F_] * 5
    v3 = [F_, F_, T_, F_, F_]
    valid = t([list(r) for r in zip(v0, v1, v2, v3)], torch.bool).unsqueeze(0)
    w = W.topk_weights(scores, valid, 0.6)
    e0 = [1, 1, 1, 0, 0]
    e1 = [0, 1, 1, 1, 0]
    e2 = [0, 0, 0, 0, 0]
    e3 = [0, 0, 1, 0, 0]
    expected = t([list(r) for r in zip(e0, e1, e2, e3)], torch.float32).unsqueeze(0)
    assert_close(w, expected)


def test_topk_weights_ties_across_batch_use_flat_index():
    # one head, B=2, T=2; flat indices 0..3 with scores 0, 1, 1, 1; n=4, ratio 0.5 -> 2
    # ties at 1, 2, 3 -> flat 1 (b0,t1) and 2 (b1,t0)
    scores = t([[[0.0], [1.0]], [[1.0], [1.0]]])
    valid = torch.ones(2, 2, 1, dtype=torch.bool)
    w = W.topk_weights(scores, valid, 0.5)
    assert_close(w, t([[[0.0], [1.0]], [[1.0], [0.0]]]))


def test_topk_weights_ratio_one_and_zero():
    scores = torch.randn(2, 3, 2)
    valid = t([[[T_, F_], [T_, T_], [F_, F_]], [[T_, T_], [F_, T_], [T_, F_]]], torch.bool)
    assert_close(W.topk_weights(scores, valid, 1.0), valid.float())
    assert_close(W.topk_weights(scores, valid.float(), 0.0), torch.zeros(2, 3, 2))


def test_topk_weights_ceil_is_guarded_against_float_error():
    assert 0.14 * 50 > 7  # 7.000000000000001: a bare ceil would select 8
    torch.manual_seed(2)
    scores = torch.randn(1, 50, 1)
    w = W.topk_weights(scores, torch.ones(1, 50, 1, dtype=torch.bool), 0.14)
    assert w.sum().item() == 7
    top7 = torch.topk(scores.flatten(), 7).indices
    assert torch.all(w.flatten()[top7] == 1)
    # and the brief's example: ceil(0.6 * 5) = 3
    w = W.topk_weights(torch.randn(1, 5, 1), torch.ones(1, 5, 1), 0.6)
    assert w.sum().item() == 3
    # a real fraction still rounds up: 0.5 * 5 = 2.5 -> 3
    w = W.topk_weights(torch.randn(1, 5, 1), torch.ones(1, 5, 1), 0.5)
    assert w.sum().item() == 3


def test_topk_weights_detached():
    scores = torch.randn(2, 4, 3, requires_grad=True)
    w = W.topk_weights(scores, torch.ones(2, 4, 3, dtype=torch.bool), 0.5)
    assert not w.requires_grad
    assert set(w.unique().tolist()) <= {0.0, 1.0}


def test_weight_sparsity():
    w = t([[0.0, 1.0, 0.0, 0.0]])
    valid = t([[T_, T_, T_, F_]], torch.bool)
    # valid entries 0,1,2; zeros among them 0 and 2 -> 2/3 (the invalid zero at 3 is not counted)
    assert_close(W.weight_sparsity(w, valid), t(2.0 / 3.0))
    assert_close(W.weight_sparsity(w, valid.float()), t(2.0 / 3.0))
    assert_close(W.weight_sparsity(w, torch.zeros_like(valid)), t(0.0))


# -----------------------------------------------------------------------------
# the verifiable pipeline end to end: weights do not push the value head


def test_policy_loss_does_not_reach_values():
    values, rewards, mask = _episode()
    values.requires_grad_(True)
    td = W.td_errors(values, rewards, mask, 1.0)
    adv = W.whiten(W.gae(td, mask, 1.0, 0.95), mask)
    w_tok = W.exp_weights(adv, mask, 1.0, 0.1, 3.0)
    labels = torch.where(mask, t([[1, 2, 3, 4, 5]] * 3, torch.long), t(-100, torch.long))
    valid = W.shift_targets(labels, 2) != -100
    ce = torch.rand(3, 5, 2, requires_grad=True)
    loss = W.mtp_loss(ce, valid, W.heads_from_tokens(w_tok, 2))
    loss.backward()
    assert values.grad is None
    assert ce.grad is not None and ce.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# value models: losses, features, the credit checks


def test_bce_value_loss():
    # z = 0 -> σ = ½: −log ½ = ln 2 whatever the target; z = ln 3 -> σ = ¾: target 1 gives −ln ¾, target 0 −ln ¼
    logits = t([[0.0, math.log(3), math.log(3), 9.0]])
    targets = t([[1.0, 1.0, 0.0, 1.0]])
    mask = t([[T_, T_, T_, F_]], torch.bool)  # the last state masked out
    expected = (math.log(2) - math.log(0.75) - math.log(0.25)) / 3
    assert_close(W.bce_value_loss(logits, targets, mask), t(expected))


def test_pairwise_value_loss():
    # prompt 0: right (score 2) vs wrong (score 0): −log σ(2); prompt 1: right 0 vs wrong 0: ln 2;
    # prompt 2 has only a right answer: no pair. softplus(−2) = log(1 + e^−2).
    scores, rewards, groups = t([2.0, 0.0, 0.0, 0.0, 5.0]), t([1.0, 0.0, 1.0, 0.0, 1.0]), t([0, 0, 1, 1, 2])
    expected = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    assert_close(W.pairwise_value_loss(scores, rewards, groups), t(expected))
    assert W.pairwise_value_loss(scores[:1], rewards[:1], groups[:1]).item() == 0.0  # no pair: 0, not nan


def test_pairwise_value_loss_gradient_pushes_right_up():
    scores = t([0.0, 0.0]).requires_grad_(True)
    W.pairwise_value_loss(scores, t([1.0, 0.0]), t([7, 7])).backward()
    # d/ds_r −log σ(s_r − s_w) = −(1 − σ(0)) = −½; the wrong answer's gradient +½
    assert_close(scores.grad, t([-0.5, 0.5]))


def test_token_logprobs():
    # uniform logits over 4 ids: every token ln ¼; position 0 has no context: 0
    lp = W.token_logprobs(torch.zeros(1, 3, 4), t([[1, 2, 3]], torch.long))
    assert_close(lp, t([[0.0, math.log(0.25), math.log(0.25)]]))
    # logits favouring id 2 at position 0: log softmax([0, 0, ln 2, 0])[2] = ln(2 / 5)
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 2] = math.log(2)
    assert_close(W.token_logprobs(logits, t([[0, 2]], torch.long))[0, 1], t(math.log(0.4)))


def test_answer_logprob_features():
    lp = t([[-9.0, -1.0, -2.0, -0.5, -7.0]])  # prompt at 0, answer at 1..3, padding at 4
    mask = t([[F_, T_, T_, T_, F_]], torch.bool)
    expected = t([[[0.0, 0.0], [-1.0, -1.0], [-2.0, -3.0], [-0.5, -3.5], [0.0, -3.5]]])
    assert_close(W.answer_logprob_features(lp, mask), expected)


def test_answer_state_index():
    # row 0: value states 2..5 (n = 4): fraction 1 -> 2 + 3 = 5, ½ -> 2 + floor(1.5) = 3; row 1: states 1, 2
    vmask = t([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0, 0]], torch.bool)
    assert W.answer_state_index(vmask, 1.0).tolist() == [5, 2]
    assert W.answer_state_index(vmask, 0.5).tolist() == [3, 1]


def test_shuffled_across_permutes_the_masks_values_over_the_whole_batch():
    w = t([[0.0, 1.0, 2.0, 3.0, 4.0, 0.0], [5.0, 6.0, 7.0, 0.0, 0.0, 0.0]])
    mask = w > 0
    crossed, moved = 0, 0
    for seed in range(40):
        out = W.shuffled_across(w, mask, torch.Generator().manual_seed(seed))
        assert sorted(out[mask].tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # the batch's multiset on the mask
        assert (out[~mask] == 0).all()  # off it, in place
        crossed += sorted(out[0][mask[0]].tolist()) != [1.0, 2.0, 3.0, 4.0]  # a value went to the other answer
        moved += not torch.equal(out, w)
    # 7! orderings; the first row keeps its own 4 values in 4!·3!/7! = 1/35 of them
    assert moved == 40 and crossed >= 35
    # a wrong answer's lower weights as a whole: within-answer shuffles keep P(right > wrong) at 1, this one ~0.5
    right, wrong = torch.full((1, 200), 2.0), torch.full((1, 200), 1.0)
    out = W.shuffled_across(torch.cat([right, wrong]), torch.ones(2, 200, dtype=torch.bool),
                            torch.Generator().manual_seed(0))
    assert abs(W.token_credit(out[0], out[1]).item() - 0.5) < 0.1


def test_token_credit():
    # 1 > 0.5 wins, 0.2 < 0.5 loses, a tie counts ½: (1 + 0 + ½) / 3
    assert_close(W.token_credit(t([1.0, 0.2, 0.7]), t([0.5, 0.5, 0.7])), t(0.5))
    assert math.isnan(W.token_credit(t([]), t([])).item())
