"""
The four pipelines, one class each: what it starts from, what it freezes or builds beside the model (value head,
reference), its loss, its validation metrics and its own state with that state's share of a checkpoint. The
weighting math is weights.py's. A fifth pipeline is one class and one PIPELINE_TYPES entry (and its configs).
"""
import torch
import torch.distributed as dist
import weights as W

from checkpointing import load_checkpoint_into
from parallel import all_reduce
from pretrained import DTYPES, cast_frozen, is_model_dir, load_reference


def policy_ce(model, tokens, labels, H, values=False):
    targets = W.shift_targets(labels, H)
    ce, vals = model(tokens, targets, values=values)
    return ce, targets != -100, vals


def log_head_losses(meter, prefix, ce, valid):
    for k in range(ce.shape[-1]):
        meter.add(f"{prefix}/head_{k}_loss", (ce[..., k] * valid[..., k]).sum(), valid[..., k].sum())


class Pipeline:
    """What every pipeline does unless it says otherwise: MTP on correct answers, loss = mtp_loss(ce, valid), from
    model.init_from, nothing frozen, no state of its own. Each pipeline below overrides what makes it different."""
    name = "baseline"
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


class Baseline(Pipeline):
    """MTP on correct answers: loss = mtp_loss(ce, valid)."""


def critic_targets(model, batch, H, t):
    """(ce, valid, values, λ-return targets, value mask) for the critic's loss and its validation alike."""
    tokens, labels, rewards = batch
    ce, valid, values = policy_ce(model, tokens, labels, H, values=True)
    targets, value_mask = W.value_targets(values, rewards, labels != -100, t.gamma, t.critic_lambda)
    return ce, valid, values, targets, value_mask


class Critic(Pipeline):
    """The value head alone learns (trunk and LM heads frozen): loss = value_loss(V, λ-returns of R = is_correct).
    Validation: val/loss (the value MSE), val/explained_variance and val/auc (do values rank right above wrong)."""
    name = "critic"
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


class Verifiable(Pipeline):
    """w_tok = clamp(exp(whiten(GAE(δ))/β), w_min, w_max), whitening stats all-reduced then EMA-smoothed;
    loss = mtp_loss(ce, valid, heads_from_tokens(w_tok)) + value_coef · value_loss. Starts from the critic."""
    name = "verifiable"
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


class Rho1(Pipeline):
    """Keep, per head, the top k_percent tokens by excess loss ce_policy − ce_reference; average CE over them. The
    reference is a frozen next-token model: reference.path, the newest baseline, or a copy of the starting policy."""
    name, run_name = "rho1", "rho1-wmtp"

    def attach(self, model, fetch, build_model, device):
        """On the meta device (FSDP) the reference gets its shape only; `reference_start` (a model dir, a checkpoint
        file, or None for the starting policy) says what weighted_mtp.shard_from_start fills it with."""
        ref, dtype, meta = self.cfg.reference.path, DTYPES[self.cfg.model.dtype], model.output.weight.is_meta
        self.reference_start = None
        if is_model_dir(ref):  # a Meta or HF dir: its own architecture (a smaller model, say), one head
            self.reference = load_reference(ref, model.args.vocab_size, dtype, meta)
            self.reference_start = ref
        else:
            self.reference = build_model()  # the policy's architecture, LoRA included
            if ref:
                self.reference_start = fetch(ref, "baseline", "checkpoints/checkpoint_final.pt")
                if not meta:
                    load_checkpoint_into(self.reference, self.reference_start)
            elif not meta:  # also when resuming: the frozen copy is the *starting* policy
                self.reference.load_state_dict(model.state_dict())
        self.reference.requires_grad_(False).eval().to(None if meta else device, dtype)

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


def auc(scores, labels):
    """P(score of a correct answer > score of an incorrect one), ties counting 1/2 (Mann-Whitney U)."""
    pos = [s for s, y in zip(scores, labels) if y > 0.5]
    neg = [s for s, y in zip(scores, labels) if y <= 0.5]
    if not pos or not neg:
        return 0.5
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))
