"""
The four pipelines, one class each: its name and MLflow run name, what it starts from, what it freezes or builds
beside the model (value head, reference) and what the memory plan and FSDP must know of that, its loss, its
validation metrics and its own state with that state's share of a checkpoint. The weighting math is weights.py's.
A fifth pipeline is one subclass of Pipeline with a `name` (defining it registers it in PIPELINE_TYPES) and its
configs in configs/<name>/ (<name>_local.yaml at least: config.PIPELINES reads the names from there).
"""
import s3ckpt
import torch
import torch.distributed as dist
import weights as W

from wmtp.checkpointing import load_checkpoint_into
from wmtp.config import CONFIGS, UserError
from wmtp.data import collate
from wmtp.parallel import all_reduce
from wmtp.pretrained import DTYPES, build_value_model, cast_frozen, is_model_dir, load_reference, next_token_logits


def policy_ce(model, tokens, labels, H):
    """(ce [B,T,H] detached, valid [B,T,H]) of the policy's H heads on the answer tokens of `labels`."""
    targets = W.shift_targets(labels, H)
    _, ce, _ = model(tokens, targets)
    return ce, targets != -100


def policy_values(model, tokens):
    """V [B,T] of the policy's value head: its forward with no LM head to score (targets [B,T,0])."""
    return model(tokens, tokens.new_empty((*tokens.shape, 0)), values=True)[2]


def starting_logprobs(policy, tokens):
    """[B,T] log-probability of each token under `policy`'s head 0 given those before it (W.token_logprobs)."""
    with torch.no_grad():
        return W.token_logprobs(next_token_logits(policy, tokens), tokens)


def log_head_losses(meter, prefix, ce, valid):
    """Adds `<prefix>/head_k_loss` for each head k to `meter`: the mean of ce [B,T,H] over the valid [B,T,H] tokens
    (as sum and count, so the logged mean is per token over micro-batches and ranks)."""
    for k in range(ce.shape[-1]):
        meter.add(f"{prefix}/head_{k}_loss", (ce[..., k] * valid[..., k]).sum(), valid[..., k].sum())


# Heads added to a next-token checkpoint start as copies of head 0, ~15 nats from their targets on SmolLM2; with
# equal weights their gradients through the shared trunk raised head 0's held-out loss 1.100 -> 1.860 (+69 %) on a
# re-headed tiny LLaMA (docs/models.md: Re-heading). At 0.02 each new head still trains its own block at full speed
# (AdamW scales every parameter's step) but pulls on the shared trunk 50x (2,500x, 125,000x) less than head 0: head 0
# ended 0.2-0.5 % below its start on three data orders, where 0.1 ended 0.1 % above it on one.
REHEADED_DECAY = 0.02


PIPELINE_TYPES = {}  # experiment.pipeline -> its class, in the order they are defined (Pipeline.__init_subclass__)


class Pipeline:
    """What every pipeline does unless it says otherwise: MTP on correct answers, loss = mtp_loss(ce, valid, λ) with
    λ_k training.head_loss_weights, from model.init_from, nothing frozen (but the trunk and head 0 through the
    new-heads warm-up), no state of its own. Each pipeline below overrides what makes it different; a subclass
    that sets `name` is a pipeline (registered in PIPELINE_TYPES, its MLflow run `run_name`, default <name>-mtp)."""
    name = None  # experiment.pipeline, the directory of its configs (configs/<name>/) and the run's tag `pipeline`
    run_name = None  # the guide's MLflow run name
    trains_policy = True  # its loss trains the policy's blocks (compare's rows, the memory plan's trained weights)
    trains_value_model = False  # a separate value model (critic.model not policy) is what it trains, the policy not
    holds_reference = False  # a frozen next-token model beside the policy (memory plan row "reference")
    reference = None  # that model, once attach has built it
    reference_start = None  # what FSDP fills the meta-device reference with (weighted_mtp.shard_from_start)
    on_policy = False  # compare (unless --gold or --control): it trains on the warm-up's own graded answers
    value_head = False  # a value head on the policy, when critic.model is policy (value_head_on_policy)
    decodes = True  # validation also decodes answers (val/accuracy) when the dataset has a checker
    watches_head_0 = True  # val/head_k_loss of the starting weights at step 0 (evaluation.Head0Watch): heads train
    val_correct_ratio = 1.0  # the share of right answers among the validation examples
    compare_start = "warm-up"  # where compare starts it (its table's "started from")
    compare_variants = {}  # compare rows "<name>:<variant>": the overrides that make the variant
    # how a finished run is continued (its closing lines): (config key, checkpoint file, who reads it)
    continued_by = ("model.init_from", s3ckpt.FINAL, "a run starts from it")

    def __init_subclass__(cls, **kwargs):
        """A subclass that names itself is a pipeline: registered under its name, its run name <name>-mtp unless it
        gives one."""
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.run_name = cls.__dict__.get("run_name") or f"{cls.name}-mtp"
            PIPELINE_TYPES[cls.name] = cls

    def __init__(self, cfg, H):
        self.cfg, self.t, self.H = cfg, cfg.training, H
        if len(self.t.head_loss_weights) not in (0, 1, H):
            raise UserError(f"training.head_loss_weights {self.t.head_loss_weights}: one number (a decay), one per "
                            f"head ({H}, model.n_future_tokens), or none (the default)")
        self.set_head_weights(self.t.head_loss_weights or [1.0])
        self.warmup_frozen = []  # the parameters the new-heads warm-up holds still (heads_added)
        self.new_heads = ()  # the heads the starting weights lacked (heads_added): what Head0Watch guards against

    def set_head_weights(self, spec):
        """Sets λ [H] from a training.head_loss_weights spec (W.head_loss_weights: [], a decay [r] or one per head);
        all ones is kept as None, so mtp_loss takes its unweighted path bit for bit."""
        lam = W.head_loss_weights(spec, self.H)
        self.head_weights = None if bool((lam == 1).all()) else lam  # None: mtp_loss's own path, bit for bit

    def weighed(self, valid, weights, targets):
        """(valid, weights) for the model's weigh(): `weights` (None = 1) times head k's training.head_loss_weights."""
        if self.head_weights is None:
            return valid, weights
        if self.head_weights.device != targets.device:  # moved once, not copied to the device every step
            self.head_weights = self.head_weights.to(targets.device)
        lam = self.head_weights.expand(targets.shape)
        return valid, lam if weights is None else weights * lam

    def heads_added(self, model, new_heads):
        """The starting weights lacked the heads `new_heads` (re-heading: they start as copies of head 0). Without
        training.head_loss_weights their losses weigh REHEADED_DECAY^k; and for the first
        training.new_heads_warmup_steps steps only their blocks train: the trunk, head 0, the shared norm and output
        (and any value head) keep their weights bit for bit (frozen_now)."""
        if not new_heads:
            return
        self.new_heads = tuple(new_heads)
        if not self.t.head_loss_weights:
            self.set_head_weights([REHEADED_DECAY])
        training = tuple(f"extra_heads.{k - 1}." for k in new_heads)
        self.warmup_frozen = [p for name, p in model.named_parameters()
                              if p.requires_grad and not name.startswith(training)]

    def frozen_now(self, step):
        """The parameters whose gradients step `step` drops (no update, no AdamW state): the warm-up's."""
        return self.warmup_frozen if step < self.t.new_heads_warmup_steps else []

    @classmethod
    def local_config(cls):
        """Its config for one machine: configs/<name>/<name>_local.yaml (the file config.PIPELINES finds it by)."""
        return CONFIGS / cls.name / f"{cls.name}_local.yaml"

    @classmethod
    def value_head_on_policy(cls, cfg):
        """Whether the value head sits on the policy: the pipeline has one and critic.model is policy."""
        return cls.value_head and cfg.critic.model == "policy"

    @classmethod
    def start_from_init(cls, cfg):
        """Whether the policy starts from model.init_from (True unless the pipeline starts from another run's
        checkpoint: verifiable with the value head on the policy starts from the critic's)."""
        return True

    @classmethod
    def separate_value_model(cls, cfg):
        """Whether this run holds a value model of its own beside the policy (critic.model copy or a model dir)."""
        return cls.value_head and not cls.value_head_on_policy(cfg)

    @classmethod
    def fsdp_refusal(cls, cfg):
        """None when training.parallel=fsdp can shard everything this pipeline holds, else why not (a UserError's
        text): a separate value model is not sharded yet."""
        if cls.separate_value_model(cfg):
            return (f"critic.model={cfg.critic.model} with training.parallel=fsdp: a separate value model is not "
                    "sharded yet; use training.parallel=ddp or critic.model=policy")
        return None

    @classmethod
    def compare_inputs(cls, warm, dirs, train_input):
        """compare's overrides that start this pipeline: from the warm-up's checkpoint `warm`; `dirs` holds the
        run directories of the rows of this seed so far ({name: dir}), train_input(kind) trains pipeline class
        `kind` from the warm-up (once per variant) and gives its run directory."""
        return [f"model.init_from={warm}"]

    def start_from(self):
        """(checkpoint spec, the pipeline whose newest finished run `auto` names, that run's checkpoint file, the
        config key of the spec, what it starts): model.init_from, `auto` meaning the newest policy trained on correct
        answers (a Baseline run)."""
        return self.cfg.model.init_from, Baseline.name, s3ckpt.FINAL, "model.init_from", "policy"

    def attach(self, model, fetch, build_model, device, tok=None):
        """Called once the starting weights are in `model`: freeze what this pipeline does not train, build what
        it needs beside the model (`fetch(spec, pipeline_for_auto, checkpoint file, config key, what)` gives a
        checkpoint file on this node). Returns the module to train instead of the policy (the critic's separate
        value model), else None."""

    def see_data(self, train_examples, val_records, encode):
        """Called once with the data: check what this pipeline needs of it, keep what it measures on."""

    def loss(self, model, batch, meter, step):
        """The scalar loss of one micro-batch `batch` = (tokens [B,T], labels [B,T], rewards [B]) at step `step`, its
        train/ metrics added to `meter`. Here mtp_loss(ce, valid, λ) = mean over heads k of λ_k · (head k's mean CE
        over its answer tokens)."""
        tokens, labels, _ = batch
        targets = W.shift_targets(labels, self.H)
        valid = targets != -100
        loss, ce, _ = model(tokens, targets, weigh=lambda values: self.weighed(valid, None, targets))
        log_head_losses(meter, "train", ce, valid)
        return loss

    def begin_step(self):
        """Before a step's micro-batches: remember what a skipped step must leave unchanged."""

    def end_step(self, skip):
        """After the step's one collective: `skip` (a 0-d device bool) is set when the step was skipped."""

    def val_begin(self):
        """Before a validation pass: resets what val_step gathers beside the meter (nothing here)."""

    def val_step(self, model, batch, meter):
        """One validation micro-batch: adds its val/ metrics to `meter` (here val/head_k_loss)."""
        tokens, labels, _ = batch
        ce, valid = policy_ce(model, tokens, labels, self.H)
        log_head_losses(meter, "val", ce, valid)

    def val_end(self, out, world):
        """The pass's metrics `out` ({name: mean over all `world` ranks}) completed and returned: here val/loss = the
        mean of the heads' val/head_k_loss."""
        heads = [v for k, v in out.items() if k.startswith("val/head_")]
        out["val/loss"] = sum(heads) / len(heads)
        return out

    def state_dict(self):
        """This pipeline's share of a checkpoint (saved under "pipeline_state")."""
        return None

    def load_state_dict(self, state):
        """Restores what state_dict() returned into a checkpoint (None here: nothing)."""


class Baseline(Pipeline):
    """MTP on correct answers: loss = mtp_loss(ce, valid). compare's baseline:filtered trains on the right answers
    alone whatever the config's correct_ratio (the positive control's ceiling)."""
    name, run_name = "baseline", "baseline-mtp"
    continued_by = ("model.init_from", s3ckpt.FINAL,
                    "a policy or the critic starts from it; rho1's reference: reference.path")
    compare_variants = {"filtered": ["data_sampling.correct_ratio=1.0"]}


def prompt_ids(tokens, labels):
    """[B] ids, equal for rows with the same prompt (the tokens before the first label)."""
    starts = (labels != -100).float().argmax(dim=1).tolist()
    seen = {}
    return torch.tensor([seen.setdefault(tuple(row[:s]), len(seen)) for row, s in zip(tokens.tolist(), starts)],
                        device=tokens.device)


def critic_loss(kind, batch, score, values, t):
    """(loss, λ-return targets, value mask) of critic.loss: mse of V against the λ-returns of R = is_correct
    (Monte Carlo at γ = λ = 1), bce of σ(score) against them, or pairwise: Bradley–Terry on the end-of-answer
    scores of right and wrong answers to the same prompt within the batch."""
    tokens, labels, rewards = batch
    targets, value_mask = W.value_targets(values, rewards, labels != -100, t.gamma, t.critic_lambda)
    if kind == "mse":
        return W.value_loss(values, targets, value_mask), targets, value_mask
    if kind == "bce":
        return W.bce_value_loss(score, targets, value_mask), targets, value_mask
    last = W.answer_state_index(value_mask, 1.0)
    loss = W.pairwise_value_loss(score.gather(1, last[:, None])[:, 0], rewards, prompt_ids(tokens, labels))
    return loss, targets, value_mask


def shuffled_labels(rewards, seed):
    """critic.shuffle_labels: is_correct permuted over all training examples (seeded: the same on every rank).
    Over the data, not within each batch: length-grouped batches hold different shares of right answers, which a
    within-batch shuffle keeps (a critic learned val/auc 0.74 from it in 100 steps)."""
    g = torch.Generator().manual_seed(seed)
    return rewards[torch.randperm(len(rewards), generator=g)]


class Critic(Pipeline):
    """A value function of is_correct, nothing else learns. critic.model policy: a linear head on the policy's frozen
    head-0 state, loss = value_loss(V, λ-returns of R) (the trunk and head 0 alone run: no other head, no logits,
    but on log steps for train/head_k_loss); copy or a model dir: a separate value model (ValueModel) with its own
    trunk (frozen, LoRA or full), head (linear, mlp), features (hidden, +logprob) and loss (mse, bce, pairwise).
    Validation: val/loss (the value MSE), val/explained_variance, val/auc (V at the end of the answer) and
    val/auc_half (V after half of it): P(V of a right answer > V of a wrong one); beside them the no-training
    baselines val/auc_logprob and val/auc_logprob_mean: the same AUC with the starting policy's log-probability of
    the answer (its sum, its mean per token) as the score. A critic is worth its margin over them."""
    name, run_name = "critic", "critic-pretrain"
    continued_by = ("critic.checkpoint", s3ckpt.BEST, "verifiable reads its value model from it")
    trains_policy, trains_value_model, on_policy = False, True, True
    value_head, decodes, watches_head_0 = True, False, False  # the LM heads stay as they are
    val_correct_ratio = 0.5  # the critic must see wrong answers to rank them
    compare_start = "warm-up (value model)"

    def attach(self, model, fetch, build_model, device, tok=None):
        model.requires_grad_(False)
        self.start_policy = model  # the baselines' scorer: the policy's LM part, frozen whatever trains
        if self.value_head_on_policy(self.cfg):
            model.value_head.requires_grad_(True)
            cast_frozen(model, DTYPES[self.cfg.model.dtype])
            return None
        value_model = build_value_model(self.cfg, model, tok)  # trained (and saved) instead of the policy
        c = self.cfg.critic
        if c.model == "copy" and c.trunk == "frozen":
            self.start_policy = value_model.trunk  # the same weights: no second copy in memory
        else:
            cast_frozen(model, DTYPES[self.cfg.model.dtype])
            self.start_policy = model.to(device)
        return value_model

    def heads_added(self, model, new_heads):
        """Nothing to protect: the critic trains no LM head."""

    def see_data(self, train_examples, val_records, encode):
        if self.cfg.critic.shuffle_labels:
            rewards = shuffled_labels(torch.tensor([ex[2] for ex in train_examples]), self.cfg.data_sampling.seed)
            train_examples[:] = [(ids, labels, r, record) for (ids, labels, _, record), r
                                 in zip(train_examples, rewards.tolist())]
        if self.cfg.critic.loss == "pairwise":
            prompts = {}
            for ids, labels, reward, _ in train_examples:
                prompts.setdefault(tuple(ids[:labels.index(next(x for x in labels if x != -100))]), set()).add(reward)
            if not any(len(r) == 2 for r in prompts.values()):
                raise UserError(f"{self.cfg.dataset.train}: critic.loss pairwise needs right and wrong answers to the "
                                "same prompt, and no prompt has both")

    def score_and_values(self, model, batch):
        """(score, V), each [B,T], of the value model being trained: V twice for the policy's value head; a separate
        value model's raw score, which bce and pairwise read (their V = σ(score))."""
        tokens, labels, _ = batch
        if self.value_head_on_policy(self.cfg):
            values = policy_values(model, tokens)
            return values, values
        return model(tokens, labels)

    def loss(self, model, batch, meter, step):
        tokens, labels, rewards = batch
        score, values = self.score_and_values(model, batch)
        loss, _, value_mask = critic_loss(self.cfg.critic.loss, batch, score, values, self.t)
        meter.add("train/value_loss", loss.detach() * value_mask.sum(), value_mask.sum())
        if self.value_head_on_policy(self.cfg) and (step + 1) % self.t.log_interval == 0:
            with torch.no_grad():  # the heads' CE only for the logged train/head_k_loss, 1 step in log_interval
                ce, valid = policy_ce(model, tokens, labels, self.H)
            log_head_losses(meter, "train", ce, valid)
        return loss

    def val_begin(self):
        self.answers = {"end": [], "half": [], "rewards": [], "lp_sum": [], "lp_mean": []}

    def val_step(self, model, batch, meter):
        tokens, labels, rewards = batch
        if self.value_head_on_policy(self.cfg):
            ce, valid = policy_ce(model, tokens, labels, self.H)
            log_head_losses(meter, "val", ce, valid)
        _, values = self.score_and_values(model, batch)
        targets, vmask = W.value_targets(values, rewards, labels != -100, self.t.gamma, self.t.critic_lambda)
        err = (targets - values) * vmask
        meter.add("val/loss", err.pow(2).sum(), vmask.sum())
        for name, x in (("ev/t", targets * vmask), ("ev/t2", targets.pow(2) * vmask), ("ev/e", err),
                        ("ev/e2", err.pow(2))):
            meter.add(name, x.sum(), vmask.sum())
        for key, fraction in (("end", 1.0), ("half", 0.5)):  # end: the whole answer read, before its EOS
            self.answers[key] += values.gather(1, W.answer_state_index(vmask, fraction)[:, None])[:, 0].tolist()
        self.answers["rewards"] += rewards.tolist()
        lp_sum, lp_mean = W.answer_logprob(starting_logprobs(self.start_policy, tokens), labels != -100)
        self.answers["lp_sum"] += lp_sum.tolist()
        self.answers["lp_mean"] += lp_mean.tolist()

    def val_end(self, out, world):
        """explained variance = 1 − Var(target − V) / Var(target) over value states; AUCs over all ranks'
        answers."""
        var_t = out.pop("ev/t2") - out.pop("ev/t") ** 2
        var_e = out.pop("ev/e2") - out.pop("ev/e") ** 2
        out["val/explained_variance"] = 1.0 - var_e / var_t if var_t > 1e-12 else 0.0
        gathered = [self.answers]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, self.answers)
        rewards = [r for g in gathered for r in g["rewards"]]
        out["val/auc"] = auc([v for g in gathered for v in g["end"]], rewards)
        out["val/auc_half"] = auc([v for g in gathered for v in g["half"]], rewards)
        out["val/auc_logprob"] = auc([v for g in gathered for v in g["lp_sum"]], rewards)
        out["val/auc_logprob_mean"] = auc([v for g in gathered for v in g["lp_mean"]], rewards)
        return out


def near_miss_pairs(examples, limit=128):
    """[(right example, wrong example, j)] for prompts with both, j the position of the first token where the two
    answers differ (the first wrong token), when it is not the wrong answer's last (EOS) token."""
    by_prompt = {}
    for ex in examples:
        start = next(i for i, x in enumerate(ex[1]) if x != -100)
        by_prompt.setdefault(tuple(ex[0][:start]), {})[ex[2] > 0.5] = ex
    pairs = []
    for both in by_prompt.values():
        if len(both) == 2:
            right, wrong = both[True], both[False]
            j = next((i for i, (a, b) in enumerate(zip(right[0], wrong[0])) if a != b), None)
            if j is not None and j < len(wrong[0]) - 1:
                pairs.append((right, wrong, j))
    return pairs[:limit]


def logprob_credit(policy, pairs):
    """P(log p(the right answer's token at j) > log p(the first wrong token at j)) under `policy` over near-miss
    pairs (right, wrong, j) (ties ½): the no-training baseline of val/token_credit. Both tokens follow the same
    prefix, so this asks whether the policy alone already prefers the right continuation."""
    device = next(policy.parameters()).device
    rights, wrongs, where = zip(*pairs)
    tokens, _, _ = collate([*rights, *wrongs], 0, device)
    return W.token_credit(*at_first_wrong(starting_logprobs(policy, tokens), where)).item()


def at_first_wrong(x, where):
    """(x[i, j_i], x[n + i, j_i]) for i < n = len(where): a per-token value [2n, T] of n right answers then their n
    wrong ones, read at each pair's first wrong position j_i."""
    cols = torch.tensor(where, device=x.device)
    rows = torch.arange(len(where), device=x.device)
    return x[rows, cols], x[len(where) + rows, cols]


class Verifiable(Pipeline):
    """w_tok = clamp(exp(whiten(GAE(δ))/β), w_min, w_max), δ the TD errors of the critic's V, whitening stats
    all-reduced then EMA-smoothed; loss = mtp_loss(ce, valid, heads_from_tokens(w_tok)). critic.model policy: starts
    from the critic's checkpoint, its value head trains on (+ value_coef · value_loss); a separate value model: the
    policy starts from model.init_from and the value model is loaded frozen (eval) from critic.checkpoint, its loss
    on the batch logged as a diagnostic. training.weight_control shuffled: w_tok permuted over the batch's
    answer tokens.
    Validation adds val/token_credit: on held-out near-miss pairs, P(w of the right answer's token > w of the first
    wrong token at the same position) at λ = 0 (val/weight_right, val/weight_first_wrong: the means), and its
    no-training baseline val/token_credit_logprob: the same probability with the starting policy's log-probability
    of each token as its weight (measured once, before the first step)."""
    name, run_name = "verifiable", "verifiable-wmtp"
    value_head, on_policy = True, True
    compare_start = "warm-up; critic on it"
    compare_variants = {"shuffled": ["training.weight_control=shuffled"],  # no credit, the same weights
                        "shuffled-critic": ["critic.shuffle_labels=true"]}  # a critic that learned no label

    @classmethod
    def compare_inputs(cls, warm, dirs, train_input):
        return [f"model.init_from={warm}", f"critic.checkpoint={train_input(Critic) / s3ckpt.BEST}"]

    @classmethod
    def start_from_init(cls, cfg):
        return not cls.value_head_on_policy(cfg)  # else from critic.checkpoint: the policy and its value head

    def __init__(self, cfg, H):
        super().__init__(cfg, H)
        self.ema = self.ema_before = None  # running mean/var of the advantages
        self.value_model, self.pairs, self.credit_logprob = None, [], None

    def start_from(self):
        if not self.value_head_on_policy(self.cfg):
            return super().start_from()
        return self.cfg.critic.checkpoint, Critic.name, s3ckpt.BEST, "critic.checkpoint", "policy and value head"

    def attach(self, model, fetch, build_model, device, tok=None):
        if self.pairs and not model.output.weight.is_meta:  # FSDP builds on the meta device: no baseline there
            self.credit_logprob = logprob_credit(model.to(device), self.pairs)
        if self.value_head_on_policy(self.cfg):
            return None
        if not self.cfg.critic.checkpoint:
            raise UserError(f"critic.checkpoint: verifiable with critic.model={self.cfg.critic.model} takes its value "
                            "model from a trained critic: a path, s3://, runs:/ or auto")
        self.value_model = build_value_model(self.cfg, model, tok)
        load_checkpoint_into(self.value_model, fetch(self.cfg.critic.checkpoint, Critic.name, s3ckpt.BEST,
                                                     "critic.checkpoint", "critic"))
        self.value_model.requires_grad_(False).eval().to(device)
        return None

    def see_data(self, train_examples, val_records, encode):
        self.pairs = near_miss_pairs(encode(val_records))

    def frozen_values(self, model, tokens, labels):
        """V [B,T] without gradient: the separate value model's, or the policy's value head."""
        with torch.no_grad():
            if self.value_model is not None:
                return self.value_model(tokens, labels)[1].float()
            return policy_values(model, tokens)

    def token_weights(self, values, rewards, mask, lam, step, update_ema):
        """(td [B,T], w_tok [B,T]) of V = values [B,T] on the answer tokens `mask` [B,T]: δ the TD errors (γ),
        A = GAE(δ, lam), w_tok = clamp(exp(whiten(A)/β), w_min, w_max), 0 off the mask, whitened by the all-reduced
        batch mean and std (by their EMA from training.td_ema_warmup_steps on; update_ema folds this batch into it);
        training.weight_control shuffled permutes w_tok over the answer tokens."""
        t = self.t
        td = W.td_errors(values, rewards, mask, t.gamma)
        adv = W.gae(td, mask, t.gamma, lam)
        n, s, s2 = all_reduce(torch.stack([mask.sum().float(), (adv * mask).sum(), (adv.pow(2) * mask).sum()]))
        mean = s / n.clamp(min=1)
        var = (s2 / n.clamp(min=1) - mean.pow(2)).clamp(min=0)
        if update_ema:
            self.ema = W.ema_update(self.ema, mean, var, t.td_ema_momentum)
        if self.ema is not None and step >= t.td_ema_warmup_steps:
            mean, var = self.ema["mean"], self.ema["var"]
        w_tok = W.exp_weights(W.whiten(adv, mask, mean, var.sqrt()), mask, t.beta, t.weight_clip_min,
                              t.weight_clip_max)
        if t.weight_control == "shuffled":
            w_tok = W.shuffled_across(w_tok, mask, torch.Generator(w_tok.device).manual_seed(t.seed * 7919 + step))
        return td, w_tok

    def loss(self, model, batch, meter, step):
        t, H = self.t, self.H
        tokens, labels, rewards = batch
        head_targets, mask = W.shift_targets(labels, H), labels != -100
        valid = head_targets != -100
        policy_valid = valid if t.policy_on_incorrect else valid & (rewards > 0)[:, None, None]
        separate = self.value_model is not None
        frozen = self.frozen_values(model, tokens, labels) if separate else None
        found = {}  # what weigh() computes, for the metrics

        def weigh(head_values):  # the model calls it with the value head's output (detached), before any CE
            found["td"], found["w_tok"] = self.token_weights(frozen if separate else head_values, rewards, mask,
                                                             t.td_lambda, step, update_ema=True)
            return self.weighed(policy_valid, W.heads_from_tokens(found["w_tok"], H), head_targets)

        policy, ce, values = model(tokens, head_targets, values=not separate, weigh=weigh)
        values = frozen if separate else values
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
        return policy if separate else policy + t.value_coef * v_loss

    def val_step(self, model, batch, meter):
        super().val_step(model, batch, meter)
        self.val_model = model

    def val_end(self, out, world):
        out = super().val_end(out, world)
        if self.pairs:
            out.update(self.token_credit(self.val_model))
        if self.credit_logprob is not None:
            out["val/token_credit_logprob"] = self.credit_logprob
        return out

    def token_credit(self, model):
        """val/token_credit and the mean weights of right-answer tokens and of first wrong tokens, at λ = 0 (the
        label enters only the last token's δ, never a first wrong token's: near_miss_pairs leaves those out).
        Every rank computes it on all pairs alike."""
        device = next(model.parameters()).device
        rights, wrongs, where = zip(*self.pairs)
        # one batch, as in training: the same whitening for both sides, and a shuffle control pools them
        tokens, labels, rewards = collate([*rights, *wrongs], 0, device)
        mask = labels != -100
        _, w = self.token_weights(self.frozen_values(model, tokens, labels), rewards, mask, 0.0,
                                  self.t.td_ema_warmup_steps, update_ema=False)
        right_at, wrong_at = at_first_wrong(w, where)
        right_mask = mask[:len(where)]
        return {"val/token_credit": W.token_credit(right_at, wrong_at).item(),
                "val/weight_first_wrong": wrong_at.mean().item(),
                "val/weight_right": (w[:len(where)] * right_mask).sum().item() / right_mask.sum().item()}

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
    holds_reference = True
    compare_start = "warm-up (ref: baseline)"

    @classmethod
    def compare_inputs(cls, warm, dirs, train_input):  # without a baseline of this seed: a frozen copy of the warm-up
        reference = dirs[Baseline.name] / s3ckpt.FINAL if Baseline.name in dirs else ""
        return [f"model.init_from={warm}", f"reference.path={reference}"]

    def attach(self, model, fetch, build_model, device, tok=None):
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
                self.reference_start = fetch(ref, Baseline.name, s3ckpt.FINAL, "reference.path", "reference")
                if not meta:
                    load_checkpoint_into(self.reference, self.reference_start)
            elif not meta:  # also when resuming: the frozen copy is the *starting* policy
                self.reference.load_state_dict(model.state_dict())
        self.reference.requires_grad_(False).eval().to(None if meta else device, dtype)

    def loss(self, model, batch, meter, step):
        H, ratio = self.H, self.t.k_percent
        tokens, labels, _ = batch
        with torch.inference_mode():
            _, ce_ref, _ = self.reference(tokens, W.shift_targets(labels, 1))
        ref = W.reference_ce_to_heads(ce_ref[..., 0].clone(), H)  # clone: inference tensors may not enter autograd
        targets = W.shift_targets(labels, H)
        valid = targets != -100

        chosen = {}  # head k -> its 0/1 weights, kept for the metrics

        def selected(k, ce_k):  # head k's top tokens by excess loss, from its own detached CE [B,T]
            chosen[k] = W.topk_weights(W.excess_loss(ce_k, ref[..., k])[..., None], valid[..., k, None], ratio)[..., 0]
            return valid[..., k] & (chosen[k] > 0)

        loss, ce, _ = model(tokens, targets, weigh=lambda values: self.weighed(selected, None, targets))
        excess = W.excess_loss(ce, ref)
        w = torch.stack([chosen[k] for k in range(ce.shape[-1])], dim=-1)
        log_head_losses(meter, "train", ce, valid)
        meter.add("train/excess_loss_mean", (excess * valid).sum(), valid.sum())
        meter.add("train/weight_sparsity", W.weight_sparsity(w, valid) * valid.sum(), valid.sum())
        return loss




def policy_pipelines():
    """The names of the pipelines that train the policy, in PIPELINE_TYPES's order: compare's default rows."""
    return tuple(name for name, kind in PIPELINE_TYPES.items() if kind.trains_policy)


CONTROL_ROWS = ("baseline", "baseline:filtered", "verifiable", "verifiable:shuffled")  # compare --control's rows
WARMUP_CONFIG = CONFIGS / Baseline.name / "warmup_local.yaml"  # compare's shared warm-up: a short baseline


def auc(scores, labels):
    """P(score of a correct answer > score of an incorrect one), ties counting 1/2 (Mann-Whitney U)."""
    pos = [s for s, y in zip(scores, labels) if y > 0.5]
    neg = [s for s, y in zip(scores, labels) if y <= 0.5]
    if not pos or not neg:
        return 0.5
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))
