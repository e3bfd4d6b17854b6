"""
weighted-mtp: train multi-token-prediction (MTP) language models in which every token's loss can be weighted.

    python -m weighted_mtp train --config configs/verifiable/verifiable_local.yaml --use-micro-model
    torchrun --standalone --nproc_per_node=gpu -m weighted_mtp train --config configs/verifiable/verifiable.yaml

The trainer, read top to bottom: prepare() (everything that can reject bad input), the step, the loop and its
guards, the compare driver, the CLI. Each other concern is a module of its own (README: "For the next engineer").
"""
import dataclasses
import itertools
import logging
import math
import os
from pathlib import Path
import sys
import time
import traceback

from wmtp.config import cli

if __name__ == "__main__":  # the arguments first: --help and a usage error come back without waiting for torch
    cli(__doc__).parse_args()

import s3ckpt
import torch
import torch.nn as nn
import yaml

from wmtp.checkpointing import (Checkpointer, LoopStart, checkpoint_on_node, checkpoint_tensors, fetcher,
                                load_checkpoint_into, load_shards, read_resumed, resume_components, resume_from)
from wmtp.config import CONFIGS, Config, UserError, load_config, redacted, tracking_uri
from wmtp.data import Batches, Examples, chat_template, encode_records, epoch_order, load_records, sample_records
from wmtp.evaluation import Head0Watch, Validation, eval_tasks, evaluate, sample
from wmtp.memplan import dry_run_report
from wmtp.parallel import (Meter, Preempted, StopSignal, all_reduce, autocast_for, broadcast, gradient_sync,
                           end_distributed, setup_distributed, shard, shard_from_meta, transformer_blocks,
                           wrap_and_compile)
from wmtp.pipelines import CONTROL_ROWS, PIPELINE_TYPES, WARMUP_CONFIG, Pipeline, policy_pipelines
from wmtp.pretrained import (added_heads, build_model, check_micro, export, initial_params, load_pretrained,
                             next_token_logits, pretrained_params)
from wmtp.report import compare_rows, format_compare, list_configs, report, summarize_compare
from wmtp.tracking import (NoTracking, Tracking, TrainLog, closing_summary, console_logging, doctor, experiment_id,
                           log_params, preflight, provenance_tags, quiet_console, run_description, run_url, source_tags,
                           start_text, ui_url)
# load_pretrained and next_token_logits are fixed contracts: callers outside the repo reach them as weighted_mtp.*
__all__ = ["load_pretrained", "next_token_logits", "prepare", "train", "evaluate", "sample", "compare", "main"]
log = logging.getLogger("weighted_mtp")
record = logging.getLogger("weighted_mtp.record")  # training.log only: the console shows the progress bar


def learning_rate(step, total, t):
    """Linear warmup over warmup_steps, then cosine from learning_rate down to learning_rate·min_lr_ratio."""
    base, warmup = t.learning_rate, t.warmup_steps
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclasses.dataclass
class Setup:
    """Everything training needs, ready before any run exists: what `prepare` returns."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    pipeline: Pipeline
    tok: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: Examples
    total_steps: int
    run_name: str
    starts: dict = None  # rank 0's {config key: (what it starts, its value, what that resolved to)}
    resume_path: str = None  # the checkpoint resumed from (a sharded one: the directory this rank read), or None
    start: LoopStart = dataclasses.field(default_factory=LoopStart)  # a fresh run's, or the resumed checkpoint's

    @property
    def params(self):
        """What the optimizer trains (after sharding: this rank's shards)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def prepare_data(cfg, tok, pipeline):
    """The run's Examples: sampled to their correct ratios, rendered (with the model dir's chat template for
    dataset.template: chat) and encoded; the pipeline sees them (verifiable's validation looks for near-miss pairs)."""
    s, ds, chat = cfg.data_sampling, cfg.dataset, chat_template(cfg.model.path)  # chat: None if the dir has none
    train_records, checker = load_records(ds.train, "train")
    val_records, _ = load_records(ds.validation, "validation")
    encode = lambda records, source: encode_records(records, tok, ds.max_length, ds.on_overlong, source, ds.template,
                                                    chat)
    train_examples, n_truncated = encode(sample_records(train_records, s.n_samples, s.correct_ratio, s.seed), ds.train)
    encode_val = lambda records: encode(records, ds.validation)[0]
    val_examples = encode_val(sample_records(val_records, s.val_samples, pipeline.val_correct_ratio, s.seed + 1))
    pipeline.see_data(train_examples, val_records, encode_val)
    return Examples(train_examples, val_examples, checker, n_truncated)


def step_count(cfg, n_examples, rank, world):
    """The run's optimizer steps: training.max_steps, else n_epochs of this rank's batches (too few examples for
    one step is an error)."""
    t = cfg.training
    batches_per_epoch = len(epoch_order(n_examples, 0, cfg.data_sampling.seed, rank, world)) // t.batch_size
    if batches_per_epoch < t.gradient_accumulation_steps:
        raise UserError(f"{cfg.dataset.train}: {n_examples} examples make fewer than one step of "
                        f"{t.gradient_accumulation_steps} x {t.batch_size} x {world} processes")
    return t.max_steps or t.n_epochs * batches_per_epoch // t.gradient_accumulation_steps


def policy_start(cfg, pipeline):
    """Where the policy's weights come from when no checkpoint is fetched for it: model.path, else random weights
    (prepare() replaces this with model.init_from's or, for verifiable on the critic's value head,
    critic.checkpoint's resolved checkpoint)."""
    if pipeline.start_from()[0]:
        return {}
    if cfg.model.path:
        return {"model.path": ("policy", cfg.model.path, str(Path(cfg.model.path).resolve()))}
    return {"model.init_from": ("policy", "", "random weights")}


def prepare(cfg, use_micro=False, rank=0, world=1, device=torch.device("cpu")):
    """Model, data, optimizer, starting weights and resume point: everything that can reject bad input, checked
    before any MLflow run, thread or file exists. Every rank calls it (the checkpoints to load come from rank 0).
    Read top to bottom: the start path (the weights a run starts from, pipeline.attach), then the resume path (a
    resumed checkpoint's model, then, once the optimizer exists, each component's part)."""
    t = cfg.training
    master, fsdp = rank == 0, t.parallel == "fsdp" and world > 1  # FSDP: built on the meta device, filled sharded
    kind = PIPELINE_TYPES[cfg.experiment.pipeline]
    if fsdp and (refusal := kind.fsdp_refusal(cfg)):
        raise UserError(refusal)
    tok, model = build_model(cfg, use_micro, value_head=kind.value_head_on_policy(cfg), meta=fsdp)
    pipeline = kind(cfg, model.args.n_future_tokens)
    data = prepare_data(cfg, tok, pipeline)
    if master and cfg.mlflow.enable_logging:
        preflight(cfg)  # credentials and bucket, before the server is asked for any checkpoint
    run_name = cfg.mlflow.run_name or pipeline.run_name
    cache = Path(cfg.checkpoint.dir) / ".cache"

    starts = policy_start(cfg, pipeline)  # {config key: (what it starts, its value, what that resolved to)}

    fetch = fetcher(cfg.mlflow, master, cache, starts)
    resume_path, resume_uri, sharded = checkpoint_on_node(
        cfg.mlflow, resume_from(cfg, run_name, cache, starts) if master else None, cache)
    start_path = load_start(pipeline, model, fetch, fsdp)  # also when resuming: rho1's copy is the *starting* policy
    for block in transformer_blocks(model):
        block.checkpointed = t.activation_checkpointing
    model = pipeline.attach(model, fetch, lambda: build_model(cfg, use_micro, value_head=False, meta=fsdp)[1],
                            torch.device("cpu") if fsdp else device, tok) or model  # sharded: shards only (shard())
    if pipeline.reference is not None and "reference.path" not in starts:
        ref = cfg.reference.path  # a model dir, or empty: a frozen copy of the starting policy
        starts["reference.path"] = ("reference", ref, str(Path(ref).resolve()) if ref else "the starting policy")
    resumed = read_resumed(model, resume_path, sharded, fsdp) if resume_path else None
    if fsdp:
        shard_from_start(cfg, use_micro, model, pipeline, start_path, device, world, resume_path, resumed)
    else:
        model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: the optimizer holds the shards
    pipeline.heads_added(model, () if start_path else added_heads(cfg, use_micro))  # a checkpoint's has them all
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=True)
    setup = Setup(cfg, rank, world, device, pipeline, tok, model, optimizer, data,
                  step_count(cfg, len(data.train), rank, world), run_name, starts, resume_path)
    if sharded:  # each node's ranks read from a directory of its own (a shared disk's, else its cache)
        shards = s3ckpt.checkpoint_part(resumed, "shards").get("shards", {})  # (older checkpoints list none)
        setup.resume_path = load_shards(tracking_uri(cfg.mlflow.tracking_uri), model, optimizer, resume_path,
                                        resume_uri, shards, cache)
    if resumed:
        setup.start = resume_components(resumed, model, optimizer, pipeline, fsdp)
    return setup


def load_start(pipeline, model, fetch, fsdp):
    """The start path: the checkpoint the pipeline starts from (model.init_from, or critic.checkpoint for verifiable
    on the critic's value head) fetched onto this node and, unless FSDP fills the shards later (shard_from_start),
    loaded into `model`. -> its path, or None for a start from model.path or random weights (policy_start)."""
    spec, source, name, key, what = pipeline.start_from()
    if not spec:
        return None
    start_path = fetch(spec, source, name, key, what)
    if not fsdp:
        load_checkpoint_into(model, start_path)
    return start_path


def shard_from_start(cfg, use_micro, model, pipeline, start_path, device, world, resume_path=None, resume=None):
    """FSDP: the policy, built on the meta device, sharded and filled with what DDP would load whole — its initial
    weights (initial_params), model.init_from / critic.checkpoint's (start_path), a full checkpoint resumed from
    (its memory-mapped state `resume`) — each rank reading its own rows only; rho1's frozen reference likewise from
    its reference_start (a model dir, a checkpoint, or the starting policy), or, already whole, just sharded."""
    def starting(m, path):
        return [("initial weights", initial_params(cfg, use_micro, m))] + (
            [checkpoint_tensors(m, path)] if path else [])
    resumed = [checkpoint_tensors(model, resume_path, resume)] if s3ckpt.checkpoint_part(resume or {}, "model") else []
    shard_from_meta(model, device, world, starting(model, start_path) + resumed)
    if resumed:
        del resume["model"]  # its pages are released: the mapping goes with the last reference
    reference, ref_start = pipeline.reference, pipeline.reference_start
    if reference is None:
        return
    if not reference.output.weight.is_meta:
        shard(reference, device, world)
    elif ref_start and Path(ref_start).is_dir():
        shard_from_meta(reference, device, world, [("reference.path", pretrained_params(ref_start, 1))])
    else:
        shard_from_meta(reference, device, world, starting(reference, ref_start or start_path))


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
    for p in pipeline.frozen_now(step):  # no gradient: the fused AdamW leaves the weight and its state untouched
        p.grad = None
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
        """The flags swap() queued, as a list, once their copy has landed (None when none are queued); empties the
        slot."""
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


RANDOM_START_VAL_SAMPLES = 64


def validation_for_a_random_start(cfg, use_micro):
    """The micro model from random weights validates on RANDOM_START_VAL_SAMPLES records, not the local configs' 512:
    it answers none of them right yet, and decoding 512 answers at every validation was most of a standalone
    `--local` run's time. Said in the first log line; the params record the number used."""
    kind = PIPELINE_TYPES[cfg.experiment.pipeline](cfg, cfg.model.n_future_tokens)
    if not use_micro or kind.start_from()[0] or cfg.data_sampling.val_samples <= RANDOM_START_VAL_SAMPLES:
        return cfg, ""
    return (dataclasses.replace(cfg, data_sampling=dataclasses.replace(
        cfg.data_sampling, val_samples=RANDOM_START_VAL_SAMPLES)),
        f" (validation on {RANDOM_START_VAL_SAMPLES} of data_sampling.val_samples={cfg.data_sampling.val_samples} "
        "records: from random weights)")


def train(cfg, use_micro=False):
    """Trains cfg on this process's rank -> {run_id, steps, the last validation's metrics}; a bad input is a
    UserError before any run, a signal a Preempted after a resumable checkpoint."""
    cfg, val_note = validation_for_a_random_start(cfg, use_micro)
    rank, world, device, owned = setup_distributed(cfg.training.collective_timeout_s)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    try:
        s = prepare(cfg, use_micro, rank, world, device)
        start, run_root = s.start.step, Path(cfg.checkpoint.dir) / s.run_name
        tags = {**provenance_tags(s.starts), "mlflow.note.content": run_description(cfg, use_micro, s.starts),
                "wmtp.model": "micro" if use_micro else cfg.model.path or "-"}
        tracking = (Tracking(cfg, s.run_name, run_root, s.total_steps, s.start.run_id, s.start.unsent_metrics,
                             resumed=bool(s.resume_path), tags=tags)
                    if rank == 0 else NoTracking(s.pipeline.name))
        with StopSignal() as signals, tracking:
            run_id = tracking.run_id = broadcast(tracking.run_id)
            log.info(f"{s.pipeline.name}: run {run_id}, {world} process(es) on {device}, {len(s.data.train)} "
                     f"train / {len(s.data.val)} val examples ({s.data.n_truncated} truncated), {s.total_steps} steps"
                     + f"{val_note}; {start_text({k: v for k, v in s.starts.items() if v[0] != 'resumed'})}"
                     + (f", resumed at step {start} from {s.resume_path}" if s.resume_path else ""))
            batches = Batches(s, s.start.position)
            model = wrap_and_compile(s.model, cfg.model.compile, world)
            validation = Validation(s, lambda: autocast_for(device))
            flags, train_log = StepFlags(device, cfg.training.max_skipped_steps, tracking), TrainLog(s, batches,
                                                                                                    tracking, start)
            head_0 = Head0Watch(s, validation, train_log, start)
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
                    stop = flags.after(done, step_flags, last=done == s.total_steps)
                    train_log.step(done, lr, stop)
                    if stop:
                        checkpointer.preempt(done, signals.received)
                    if validation.due(done, s.total_steps):
                        val = validation.run(s.model)
                        train_log.validation(done, val)
                        checkpointer.after_validation(done, val)
                        head_0.check(done, val)
                    checkpointer.after_step(done)
                checkpointer.final()
                train_log.close()
            record.info(f"done: {s.total_steps} steps in {time.time() - train_log.t_start:.1f}s, "
                        f"best val/loss {checkpointer.best_val:.4f}")
        if rank == 0:
            print(closing_summary(tracking, s.total_steps, time.time() - train_log.t_start, checkpointer.best_val,
                                  s.pipeline.continued_by), flush=True)
        return {"run_id": run_id, "steps": s.total_steps, **val}
    finally:
        end_distributed(owned)


def local_config(pipeline, setting="demo"):
    """The config compare trains `pipeline` (or "warmup") with: the demo's configs/<p>/<p>_local.yaml (and
    WARMUP_CONFIG), or the positive control's configs/control/<p>.yaml."""
    if setting == "control":
        return CONFIGS / "control" / f"{pipeline}.yaml"
    return WARMUP_CONFIG if pipeline == "warmup" else CONFIGS / pipeline / f"{pipeline}_local.yaml"


def train_child(path, overrides, parent_id, started_from, run_name=""):
    """Train the config at path on the micro model as a run nested under parent_id (tag mlflow.parentRunId);
    (config, run id, its run directory, where checkpoints are)."""
    cfg = load_config(path, overrides)
    cfg = dataclasses.replace(cfg, mlflow=dataclasses.replace(
        cfg.mlflow, run_name=run_name, tags={**cfg.mlflow.tags, "mlflow.parentRunId": parent_id,
                                             "wmtp.started_from": started_from}))
    started = time.time()
    with quiet_console():
        result = train(cfg, use_micro=True)
    name = run_name or PIPELINE_TYPES[cfg.experiment.pipeline].run_name
    print(f"{name:<28} run {result['run_id']}  {result['steps']} steps in {time.time() - started:4.0f}s  "
          f"val/loss {result.get('val/loss', math.nan):.4f}", flush=True)
    return cfg, result["run_id"], Path(cfg.checkpoint.dir) / name / result["run_id"]


ON_POLICY_TASKS = 256  # the warm-up's answers to this many training tasks of eval.dataset: the critic's data
ON_POLICY_SAMPLING = ["eval.n_samples=4", "eval.temperature=1.0", "eval.batch_size=64"]  # right and wrong ones


def on_policy_data(warm, overrides):
    """The warm-up's own answers (sample: ON_POLICY_SAMPLING, graded in the sandbox) to eval.dataset's tasks,
    written beside its checkpoint `warm`: for training, the first ON_POLICY_TASKS (or eval.max_tasks) tasks of a
    built-in's training split; for validation, its held-out tasks (a JSONL eval.dataset: its tasks, both times).
    -> the overrides [dataset.train=..., dataset.validation=...] that make critic and verifiable train on them; a
    UserError when a split's answers are all wrong (a short warm-up's) or all right: nothing for the critic to tell."""
    cfg = load_config(local_config("warmup"), [*overrides, *ON_POLICY_SAMPLING])
    spec, n = cfg.eval.dataset, cfg.eval.max_tasks or ON_POLICY_TASKS
    train_tasks = {}
    for record in load_records(spec, "train")[0] if spec.startswith("builtin:") else []:
        train_tasks.setdefault(record["task_id"], record)
    files = {}
    for split, tasks in (("train", dict(itertools.islice(train_tasks.items(), n)) or None),
                         ("validation", eval_tasks(spec, cfg.eval.max_tasks))):
        files[split] = warm.parent / f"on_policy_{split}.jsonl"
        answers = sample(cfg, True, str(warm), str(files[split]), tasks)
        n_right = sum(r["is_correct"] for r in answers)
        if not 0 < n_right < len(answers):
            raise UserError(f"compare: the warm-up answered {'none' if n_right == 0 else 'all'} of {spec}'s {split} "
                            "tasks right, and critic and verifiable train on its right and wrong answers: warm up "
                            "longer (--warmup-steps) or train them on the written answers (--gold)")
    return [f"dataset.train={files['train']}", f"dataset.validation={files['validation']}"]


def compare_seed(seed, warmup_steps, overrides, parent_id, pipelines, setting="demo", on_policy=False):
    """One seed: the warm-up (local_config("warmup", setting), for warmup_steps), then from its final weights each
    row of `pipelines` ("<pipeline>" or "<pipeline>:<variant>", its class's compare_variants overrides added) for the
    same steps, and evaluate (eval/pass@k on its run). Each starts as its class's compare_inputs say: verifiable's
    critic is trained on the warm-up (once per variant), rho1's reference is this seed's baseline. on_policy: critic
    and verifiable train on the warm-up's own graded answers (on_policy_data). -> {row: run id}."""
    o = [*overrides, f"training.seed={seed}", "checkpoint.save_every=0"]  # resuming is not what this measures
    warm = train_child(local_config("warmup", setting), [*o, f"training.max_steps={warmup_steps}"], parent_id,
                       "random init",
                       "warmup")[2] / s3ckpt.FINAL
    runs, dirs = {}, {}
    kinds = [PIPELINE_TYPES[row.partition(":")[0]] for row in pipelines]
    own = on_policy_data(warm, o) if on_policy and any(kind.on_policy for kind in kinds) else []
    for row, kind in zip(pipelines, kinds):
        variant = row.partition(":")[2]
        extra = kind.compare_variants.get(variant, []) if variant else []

        def train_input(source):  # a run `kind` starts from (verifiable's critic), trained once per variant of the
            # overrides of its own config section (critic.*); a row of its own
            source_extra = [x for x in extra if x.startswith(source.name + ".")]
            source_row = f"{source.name}:{variant}" if source_extra else source.name
            if source_row not in runs:
                _, runs[source_row], dirs[source_row] = train_child(
                    local_config(source.name, setting),
                    [*o, *(own if source.on_policy else []), *source_extra, f"model.init_from={warm}"], parent_id,
                    "warm-up", f"{source.run_name}-{variant}" if source_extra else "")
            return dirs[source_row]

        start = kind.compare_inputs(warm, dirs, train_input) + (own if kind.on_policy else [])
        cfg, runs[row], dirs[row] = train_child(local_config(kind.name, setting), [*o, *extra, *start], parent_id,
                                                kind.compare_start, f"{kind.run_name}-{variant}" if variant else "")
        with quiet_console():
            evaluate(cfg, use_micro=True, checkpoint=str(dirs[row] / s3ckpt.FINAL))
    return runs


def compare(seeds, warmup_steps=0, overrides=(), pipelines=(), setting="demo", on_policy=False):
    """Every row of `pipelines` (default: policy_pipelines()) over seeds 0..seeds-1 (compare_seed; warmup_steps 0 =
    the warm-up config's), under one parent run that gets, per pipeline and metric of COMPARED,
    <pipeline>/<metric>_mean and _ci95 (the interval's half-width), the table (compare/summary.json) and the plot
    (compare/metrics.png). setting: the demo's configs, or the positive control's (local_config); on_policy: the
    demo's critic and verifiable train on the warm-up's own answers (compare_seed). Returns the summary."""
    from mlflow import MlflowClient
    pipelines = pipelines or policy_pipelines()
    cfgs = {p: load_config(local_config(p.partition(":")[0], setting), overrides) for p in pipelines}
    steps = {p: c.training.max_steps for p, c in cfgs.items()}
    warmup_steps = warmup_steps or load_config(local_config("warmup", setting), overrides).training.max_steps
    if len(set(steps.values())) != 1 or not warmup_steps > 0:
        raise UserError(f"compare: the policy pipelines must train the same steps after a warm-up of > 0 steps, "
                        f"got {steps} after --warmup-steps {warmup_steps}")
    cfg = cfgs[pipelines[0]]
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    client, exp_id = MlflowClient(uri), experiment_id(MlflowClient(uri), cfg)
    name = "control" if setting == "control" else "compare"
    parent = client.create_run(exp_id, run_name=f"{name}-{seeds}-seeds",
                               tags={"pipeline": "compare", **source_tags()}).info.run_id
    log_params(client, parent, {"seeds": seeds, "warmup_steps": warmup_steps, "policy_steps": steps[pipelines[0]],
                                "overrides": " ".join(overrides) or "-", "setting": setting, "on_policy": on_policy})
    status = "FAILED"
    try:
        runs = [compare_seed(seed, warmup_steps, overrides, parent, pipelines, setting, on_policy)
                for seed in range(seeds)]
        summary = summarize_compare(client, parent, list(runs[0]), runs)  # the rows, with the critics they trained
        print(format_compare(summary, seeds, warmup_steps, steps[pipelines[0]]), flush=True)
        print(f"\nparent run {parent}: {run_url(uri, exp_id, parent)}"
              + ("" if uri.startswith("http") else "   (start the UI with ./run.sh ui)"), flush=True)
        status = "FINISHED"
        return summary
    finally:
        client.set_terminated(parent, status)


def main(argv=None):
    """The CLI: runs the command of argv (default sys.argv) -> the exit code: 0, 2 after a UserError's one line on
    stderr, 128 + the signal when preempted (doctor, ls and report return their own)."""
    args = cli(__doc__).parse_args(argv)
    if args.command in ("train", "evaluate", "sample", "compare", "export"):
        console_logging(getattr(args, "verbose", False))
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.command == "doctor":
            return doctor(load_config(args.config, args.override), args.env_file)
        if args.command == "export":
            export(args.checkpoint, args.format, args.out, args.config, args.use_micro_model)
            return 0
        if args.command == "ls":
            return list_configs()
        if args.command in ("report", "ui-url"):
            uri = tracking_uri(args.tracking_uri)
            return report(uri, args.experiment, args.all) if args.command == "report" else print(
                ui_url(uri, args.experiment))
        if args.command == "compare":
            rows = args.pipelines or ",".join(CONTROL_ROWS if args.control else policy_pipelines())
            compare(args.seeds, args.warmup_steps, args.override, compare_rows(args.seeds, rows),
                    "control" if args.control else "demo", on_policy=not (args.control or args.gold))
            return 0
        resume = [f"checkpoint.resume={args.resume}"] if getattr(args, "resume", None) else []
        cfg = load_config(args.config, args.override + resume)
        check_micro(cfg, args.use_micro_model)
        if args.dry_run:
            world, world_from = ((args.nproc, "--nproc") if args.nproc else
                                 (int(os.environ["WORLD_SIZE"]), "WORLD_SIZE") if "WORLD_SIZE" in os.environ else
                                 (1, "default"))
            report_lines = dry_run_report(cfg, world, world_from, args.use_micro_model, args.gpu_memory_gb)
            print(yaml.safe_dump(redacted(cfg.to_dict()), sort_keys=False) + report_lines)
        elif args.command == "evaluate":
            if not PIPELINE_TYPES[cfg.experiment.pipeline].decodes and not args.samples:
                *others, last = [p for p, kind in PIPELINE_TYPES.items() if kind.decodes]
                raise UserError(f"{args.config}: the {cfg.experiment.pipeline} has no pass@k (it generates "
                                f"nothing): evaluate {', '.join(others)} or {last}")
            evaluate(cfg, args.use_micro_model, args.checkpoint, args.samples, args.json)
        elif args.command == "sample":
            sample(cfg, args.use_micro_model, args.checkpoint, args.out)
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


def entry():
    """`python -m weighted_mtp ...`: main(), and under torchrun the way out through exit_worker."""
    if "RANK" not in os.environ:
        try:
            sys.exit(main())
        except BrokenPipeError:  # `ls | head` closed the pipe: the reader has what it wanted (Python's own recipe)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            sys.exit(1)
    try:
        exit_code = main()
    except SystemExit as e:  # argparse
        exit_code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # a crash: its traceback, then the same way out (the abort would hide its exit code)
        traceback.print_exc()
        exit_code = 1
    exit_worker(exit_code)


if __name__ == "__main__":
    entry()
