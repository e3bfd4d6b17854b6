"""
Evaluation: validation during training (val/loss and heads, accuracy and pass@1 by greedy decoding, the critic's
explained variance and AUC) and `evaluate` (pass@k of a model's or a file's completions, run in sandbox.py), with
its results logged to the evaluated run.
"""
import contextlib
import itertools
import json
import logging
import math
import os
from pathlib import Path
import re
import sys
import time
import uuid
from datetime import datetime, timezone

import s3ckpt
import torch
import torch.distributed as dist
from tqdm import tqdm

from wmtp.checkpointing import load_checkpoint_into, on_this_node, resolve_uri
from wmtp.config import flatten, tracking_uri, UserError
from wmtp.data import chat_template, collate, eval_records, json_rows, render_chat, render_prompt
from wmtp.model import add_stats, decode_stats, generate
from wmtp.parallel import (Meter, all_reduce, autocast_for, end_distributed, gathered, is_sharded,
                           setup_distributed)
from wmtp.pretrained import build_model
from wmtp.tracking import experiment_id, log_params, metric_name
log = logging.getLogger("weighted_mtp")


def quiet_rank():
    """True on ranks other than 0: one progress display per job, rank 0's."""
    return dist.is_initialized() and dist.get_rank() != 0


def progress(items, desc, leave=False):
    """A progress bar on stdout over items, on rank 0 and a terminal only (a log file would get its redraws)."""
    return tqdm(list(items), desc, leave=leave, file=sys.stdout, disable=quiet_rank() or not sys.stdout.isatty())


def batches_of(examples, size):
    """examples cut into consecutive lists of `size`, the last one possibly shorter."""
    return [examples[i:i + size] for i in range(0, len(examples), size)]


class Validation:
    """Validation on this rank's share of the examples, every eval_interval steps and at the end; the pipeline
    decides what it measures. Decoding pipelines add val/accuracy and val/pass@1 (decoded_metrics); test programs
    run under eval's sandbox limits, and a validation record with malformed tests fails here, before training."""

    def __init__(self, setup, autocast):
        self.pipeline, self.examples, self.checker = setup.pipeline, setup.data.val, setup.data.checker
        self.tok = setup.tok
        self.interval, self.batch_size = setup.cfg.training.eval_interval, setup.cfg.training.batch_size
        self.rank, self.world, self.device, self.autocast = setup.rank, setup.world, setup.device, autocast
        e = setup.cfg.eval
        # ranks of one sharded model must decode alike (see Decoding's lockstep); auto is otherwise decided once
        lockstep = is_sharded(setup.model) and setup.world > 1
        self.workers, self.decoding = e.workers or os.cpu_count() or 1, Decoding(e.speculative, lockstep)
        self.limits = None
        if self.pipeline.decodes and any(has_tests(ex[3]) for ex in self.examples):
            from wmtp import sandbox
            self.limits = sandbox.Limits.of(e)
            try:
                for ex in self.examples:
                    if has_tests(ex[3]):
                        sandbox.programs(ex[3], "")
                sandbox.isolation(self.limits.mode)  # no sandbox, no training: a one-line refusal naming the fix
            except (sandbox.TaskError, sandbox.SandboxUnavailable) as err:
                raise UserError(str(err))

    def due(self, done, total):
        """Whether to validate after step `done` of `total`: every eval_interval steps (0: never), and at the end."""
        return bool(self.interval and done % self.interval == 0) or done == total

    @torch.no_grad()
    def run(self, model, decode=True):
        """{metric: value} over every rank's share: the pipeline's val_end of its val_step on each batch, and with
        `decode` decoded_metrics for a decoding pipeline. Every rank must call it; model is left in train mode."""
        model.eval()
        meter, mine = Meter(self.device), self.examples[self.rank::self.world]
        self.pipeline.val_begin()
        with gathered(model) if is_sharded(model) else contextlib.nullcontext():
            for chunk in progress(batches_of(mine, self.batch_size), "validation"):
                with self.autocast():
                    self.pipeline.val_step(model, collate(chunk, self.tok.pad_id, self.device), meter)
            out = self.pipeline.val_end(meter.reduce(), self.world)
            if decode and self.pipeline.decodes:
                out.update(decoded_metrics(model, mine, self.checker, self.tok, self.device, self.autocast,
                                           self.limits, self.workers, self.decoding))
        model.train()
        return out


class Head0Watch:
    """Next-token prediction against where it started: head k's val loss of the starting weights (logged as
    val/head_k_loss at step 0; after a resume, those of the resumed weights, not logged again) in every pipeline that
    trains the LM heads. Where heads were added to the starting weights (re-heading, Pipeline.new_heads), at every
    validation a warning, or with training.head_0_on_rise stop a failed run, once val/head_0_loss exceeds its start
    by more than training.head_0_max_rise (a fraction). Only there: the added heads' gradients through the trunk are
    the harm it guards against, and a run that adds none may raise head 0's loss on purpose (verifiable and rho1
    weigh the policy's own wrong answers down, and on-policy validation holds them)."""

    def __init__(self, setup, validation, train_log, start_step):
        self.t, self.start = setup.cfg.training, None
        if not setup.pipeline.watches_head_0:
            return
        heads = {k: v for k, v in validation.run(setup.model, decode=False).items() if k.startswith("val/head_")}
        if setup.pipeline.new_heads:
            self.start, self.since = heads.get("val/head_0_loss"), f"step {start_step}"
        if start_step == 0:
            train_log.validation(0, heads)

    def check(self, done, val):
        """After step `done`'s validation metrics `val`: a warning, or under head_0_on_rise stop a UserError, when
        val/head_0_loss > start · (1 + head_0_max_rise); nothing when unwatched or val has no head 0 loss."""
        if self.start is None or "val/head_0_loss" not in val:
            return
        now, limit = val["val/head_0_loss"], self.start * (1 + self.t.head_0_max_rise)
        if now <= limit:
            return
        message = (f"step {done}: val/head_0_loss {now:.4f} is {now / self.start - 1:.1%} above its {self.since} "
                   f"value {self.start:.4f} (training.head_0_max_rise {self.t.head_0_max_rise}): next-token "
                   "prediction is getting worse; lower training.head_loss_weights of the other heads or the learning "
                   "rate, or raise training.new_heads_warmup_steps (docs/models.md)")
        if self.t.head_0_on_rise == "stop":
            raise UserError(message + "; stopped (training.head_0_on_rise stop)")
        log.warning(message)


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
    """Whether a record carries tests to run: a non-empty metadata.test or metadata.tests."""
    meta = record.get("metadata")
    return isinstance(meta, dict) and bool(meta.get("test") or meta.get("tests"))


def greedy_answers(model, pairs, tok, device, autocast, decoding):
    """The greedy answer text of each (prompt, record), at most the longest reference output + 2 tokens long."""
    max_new = max(len(tok.encode(r["output"])) for _, r in pairs) + 2
    answers = []
    for chunk in progress(batches_of([p for p, _ in pairs], 64), "validation: decoding"):
        with autocast():
            outs = decoding.generate(model, chunk, tok.eos_id, tok.pad_id, max_new)
        answers += [tok.decode(out) for out in outs]
    return answers


def decode_clock(model):
    """Seconds for timing decoding: on CUDA the wall clock once the GPU is done; on the CPU this process's CPU time,
    which other processes on a shared machine do not inflate (time spent waiting for a core is not counted)."""
    if model.output.weight.is_cuda:
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


class Decoding:
    """Greedy decoding as eval.speculative says: true, false, or auto — the first greedy batch of a model with extra
    heads is decoded both ways (the same tokens), each timed, and the faster way decodes the rest. Speculative
    decoding pays only where its tokens per forward outweigh a verify forward's cost over a plain step (untrained
    heads: ~1.04 tokens per forward; trained ones several), which depends on the device and the batch: measured,
    not guessed. `measured`: speculative (1 or 0: how it decoded) and, under auto, speculative_speedup (the first
    batch's plain time / speculative time).

    lockstep: the ranks share one sharded (FSDP) model. Each rank timing its own first batch could choose
    differently, and a rank decoding plain calls head 0's block where a speculative one calls the stacked heads:
    FSDP's hooks then leave the ranks one all-gather apart, and the next training step's collectives mismatch
    (gloo aborts: "Received data size doesn't match expected size"; seen in 2 of 11 FSDP rho1 runs). So under
    lockstep auto decodes plain on every rank, untimed; eval.speculative=true still drafts, on every rank alike."""

    def __init__(self, setting, lockstep=False):
        if setting == "auto" and lockstep:
            setting = False
            if not quiet_rank():
                log.info("eval.speculative auto: plain decoding (the ranks of a sharded model decode alike, untimed; "
                         "eval.speculative=true drafts)")
        self.speculative, self.measured = None if setting == "auto" else setting, {}  # None: not decided yet

    def generate(self, model, prompts, eos_id, pad_id, max_new_tokens, stats=None, stop=None, **sampling):
        """model.generate's completions (id lists), speculative or plain as decided; sampling, or a one-head
        model, decodes plain. Undecided (auto), this batch decodes both ways and `stats` gets the kept way's counts."""
        greedy = sampling.get("temperature", 0.0) == 0 and model.args.n_future_tokens > 1
        if self.speculative is not None or not greedy:
            self.measured["speculative"] = float(bool(self.speculative) and greedy)
            return generate(model, prompts, eos_id, pad_id, max_new_tokens, speculative=bool(self.speculative),
                            stats=stats, stop=stop, **sampling)
        outs, seconds, counts = {}, {}, {}
        for speculative in (True, False):
            counts[speculative], start = {}, decode_clock(model)
            outs[speculative] = generate(model, prompts, eos_id, pad_id, max_new_tokens, speculative=speculative,
                                         stats=counts[speculative], stop=stop, **sampling)
            seconds[speculative] = decode_clock(model) - start
        self.speculative = seconds[True] < seconds[False]
        kept, drafted = counts[self.speculative], decode_stats(counts[True])
        add_stats(stats, kept["tokens"], kept["forwards"], kept.get("accepted", []), kept.get("verified", 0))
        self.measured = {"speculative": float(self.speculative), "speculative_speedup": seconds[False] / seconds[True]}
        if not quiet_rank():
            log.info(f"eval.speculative auto: {'speculative' if self.speculative else 'plain'} decoding (first batch: "
                     f"{drafted['tokens_per_forward']:.2f} tokens per forward drafted, {seconds[True]:.2f} s "
                     f"speculative vs {seconds[False]:.2f} s plain)")
        return outs[self.speculative]


def decoded_metrics(model, examples, checker, tok, device, autocast, limits, workers, decoding):
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
        answers = greedy_answers(model, checked, tok, device, autocast, decoding)
        counts[0] = sum(bool(checker(r, a)) for (_, r), a in zip(checked, answers))
    if tested:
        from wmtp import sandbox  # no torch there; imported here so validation on other data never loads it
        answers = greedy_answers(model, tested, tok, device, autocast, decoding)
        tasks = {str(i): r for i, (_, r) in enumerate(tested)}
        if not quiet_rank():
            tqdm.write(f"validation: running the tests of {len(tasks)} programs in the sandbox", file=sys.stdout)
        results = sandbox.score(tasks, [(str(i), a) for i, a in enumerate(answers)], limits, workers)
        counts[2] = sum(r["passed"] for r in results)
    right, n_checked, passed, n_tested = all_reduce(torch.tensor(counts, dtype=torch.float64, device=device)).tolist()
    out = {"val/accuracy": right / n_checked} if n_checked else {}
    if n_tested:
        out[metric_name("val/pass@1")] = passed / n_tested
    return out


def eval_tasks(spec, max_tasks=0):
    """task_id -> record for eval.dataset (see eval_records): the first record of each task (the tests are the
    task's, whichever answer a record carries), in the file's order; max_tasks keeps the first N."""
    tasks = {}
    for record in eval_records(spec):
        tasks.setdefault(str(record.get("task_id", record.get("_source"))), record)
    return dict(itertools.islice(tasks.items(), max_tasks or None))


def read_samples(path, tasks):
    """[(task_id, completion)] from JSONL {"task_id", "completion"} (evaluate --samples); a bad line or an unknown
    task_id is a UserError naming file:line."""
    samples = []
    for where, sample in json_rows(path):
        if not (isinstance(sample.get("task_id"), str) and isinstance(sample.get("completion"), str)):
            raise UserError(f"{where}: expected {{\"task_id\": str, \"completion\": str}}")
        if sample["task_id"] not in tasks:
            raise UserError(f"{where}: unknown task_id {sample['task_id']!r} (not in the evaluated dataset)")
        samples.append((sample["task_id"], sample["completion"]))
    if not samples:
        raise UserError(f"{path}: no samples")
    return samples


def model_to_evaluate(cfg, use_micro, checkpoint, rank, device):
    """(tok, model, the training run to log into or None, its step, the checkpoint it read): the model of the config,
    with a trainer checkpoint loaded unless it is none (a path, s3://, runs:/, or auto = the newest finished run of
    the config's pipeline). The checkpoint it read is, on rank 0, the URI it was fetched from (auto's runs:/<id>/...)
    or the path as given; else `checkpoint` as given."""
    tok, model = build_model(cfg, use_micro, value_head=True)  # so every pipeline's checkpoint loads strictly
    run_id, step, source = None, 0, checkpoint
    if checkpoint and checkpoint != "none":
        cache = Path(cfg.checkpoint.dir) / ".cache"
        found = (resolve_uri(cfg.mlflow, checkpoint, cfg.experiment.pipeline, s3ckpt.FINAL, cache)
                 if rank == 0 else None)
        state = load_checkpoint_into(model, on_this_node(cfg.mlflow, found, cache))
        run_id = s3ckpt.checkpoint_part(state, "tracking")["run_id"]
        run_id = None if str(run_id).startswith("local-") else run_id
        step = s3ckpt.checkpoint_part(state, "schedule")["step"]
        if found and found[1]:  # rank 0: the URI it fetched (auto's runs:/<id>/...); a path stays as given
            source = found[1]
    return tok, model.to(device).eval(), run_id, step, source


def prompt_chat(cfg, use_micro):
    """The chat template that eval.prompt chat renders a task through (task_prompt): the model dir's own
    (data.chat_template, as training's dataset.template chat uses it); None for the micro model, another eval.prompt,
    or a dir without one (then PLAIN_CHAT)."""
    return None if use_micro or cfg.eval.prompt != "chat" else chat_template(cfg.model.path)


class Progress:
    """evaluate's one progress display: tasks generated, then programs run, each phase with its time left from its
    own rate so far. A tqdm bar on `terminal` (a stream: rank 0's stdout when it is a terminal, as training's and
    validation's bars), else a log line per batch (a log file would get a bar's redraws)."""

    def __init__(self, n_tasks, n_samples, terminal=None):
        self.n_tasks, self.n_samples, self.terminal, self.bar = n_tasks, n_samples, terminal, None
        self.start, self.generated, self.ran = time.time(), 0, 0

    def tasks_generated(self, n):
        """Counts and shows n more tasks generated; once all are, the programs' phase starts its clock."""
        self.generated += n
        self.show("tasks generated", n, self.generated, self.n_tasks, f" (then {self.n_samples} programs to run)")
        if self.generated >= self.n_tasks:
            self.start = time.time()

    def programs_run(self, n):
        """Counts and shows n more programs run (sandbox.score's callback)."""
        self.ran += n
        self.show("programs run", n, self.ran, self.n_samples)

    def show(self, what, n, done, total, then=""):
        """A log line `done`/`total` with the ETA from the phase's rate so far, or the bar moved by n (closed at
        total)."""
        if self.terminal is None:
            rate = done / max(time.time() - self.start, 1e-9)
            log.info(f"evaluate: {done}/{total} {what}, ETA {f'{(total - done) / rate:.0f} s' if done else '?'}{then}")
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=f"evaluate: {what}", file=self.terminal, leave=False, mininterval=0)
        self.bar.update(n)
        if done >= total:
            self.bar.close()
            self.bar = None


def task_prompt(record, tok, e, template, chat=None):
    """A task's prompt ids under eval.prompt. completion: a completion-style task's prompt exactly as the dataset
    gives it (HumanEval's: _prompt), any other rendered in dataset.template, after what the tokenizer's own config
    puts first (tok.prefix_ids: BOS, or nothing). chat: the task as one user turn (what training's dataset.template
    chat puts there) through the model's chat template `chat` (which writes its own start), or PLAIN_CHAT after
    prefix_ids when the model has none."""
    if e.prompt == "chat":
        turn = [{"role": "user", "content": record.get("_prompt") or render_prompt(record, "plain")}]  # as trained
        start = tok.prefix_ids if chat is None else []
        return start + tok.encode(render_chat(turn, chat, True, tok.special_text))
    return tok.prefix_ids + tok.encode(record.get("_prompt") or render_prompt(record, template))


def task_stops(record, e):
    """The stop sequences of a task's completions: eval.stop when it is a list, else (auto) the benchmark's own for a
    completion prompt (HumanEval's) and none for a chat answer, which ends with the template's EOS."""
    if isinstance(e.stop, list):
        return e.stop
    return record.get("_stop", []) if e.prompt == "completion" else []


class StopAt:
    """Row b's completion ends at the first of stops[b] in its text: asked during decoding (model.generate's stop),
    then cut() takes the text up to it, as the benchmarks' harnesses do.

    Each call decodes only the last `window` ids: a stop of L characters is at most 4L bytes, so at most 4L
    tokens (every token is at least a byte), and it is asked after every token: a stop is seen when its last token
    arrives, and decoding stays O(window) per token, not O(length)."""

    def __init__(self, decode, stops):
        self.decode, self.stops = decode, stops
        self.window = 4 * max((len(s) for row in stops for s in row), default=0) + 1

    def __call__(self, b, ids):
        text = self.decode(ids[-self.window:])
        return any(s in text for s in self.stops[b])

    @staticmethod
    def cut(text, stops):
        """text before the earliest occurrence of any of `stops`; all of it when none occurs."""
        return text[:min([text.index(s) for s in stops if s in text], default=len(text))]


FENCED = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)


def answer_code(answer):
    """The code of a chat answer: its first fenced block (an unclosed one runs to the end), else the answer."""
    found = FENCED.search(answer)
    return found.group(1) if found else answer


def sample_completions(model, tok, tasks, e, rank, world, device, template="alpaca", progress=None, chat=None):
    """([(task_id, completion)] for every task, e.n_samples each (greedy when 1, speculative as e.speculative says:
    Decoding), generated in batches with the KV cache under the benchmark's protocol (task_prompt, task_stops;
    a chat answer's code: answer_code), decode_stats summed over ranks (with auto's choice): each rank generates
    its share of the tasks in the file's order and rank 0 gathers them all."""
    g, decoding = torch.Generator(device=device).manual_seed(e.seed + rank), Decoding(e.speculative)
    prompts = [(tid, task_prompt(tasks[tid], tok, e, template, chat), task_stops(tasks[tid], e))
               for tid in list(tasks)[rank::world] for _ in range(e.n_samples)]
    mine, stats = [], {}
    for chunk in batches_of(prompts, e.batch_size):
        stop = StopAt(tok.decode, [s for _, _, s in chunk]) if any(s for _, _, s in chunk) else None
        with autocast_for(device):
            outs = decoding.generate(model, [p for _, p, _ in chunk], tok.eos_id, tok.pad_id, e.max_new_tokens,
                                     stats, stop, temperature=0.0 if e.n_samples == 1 else e.temperature,
                                     top_p=e.top_p, generator=g)
        texts = [StopAt.cut(tok.decode(out), s) for (_, _, s), out in zip(chunk, outs)]
        mine += [(tid, answer_code(t) if e.prompt == "chat" else t) for (tid, _, _), t in zip(chunk, texts)]
        if progress:
            progress.tasks_generated(len(chunk) * world // e.n_samples)
    accepted = stats.get("accepted", [])  # [] where nothing was drafted: every rank sends H - 1 counts
    accepted += [0] * (model.args.n_future_tokens - 1 - len(accepted))
    counts = [stats.get("tokens", 0), stats.get("forwards", 0), stats.get("verified", 0), *accepted]
    counts = all_reduce(torch.tensor(counts, dtype=torch.float64, device=device)).tolist() if world > 1 else counts
    stats = decode_stats({"tokens": counts[0], "forwards": counts[1], "verified": counts[2], "accepted": counts[3:]})
    stats.update(decoding.measured)  # rank 0's choice under auto
    if world == 1:
        return mine, stats
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return [pair for part in everyone for pair in part], stats


def evaluate(cfg, use_micro=False, checkpoint=None, samples=None, json_out=None):
    """pass@k of a model's completions (model mode) or of a file of completions (samples mode) on eval.dataset;
    printed as a table, written as JSON, and logged: eval/pass@k on the evaluated training run (samples mode and
    runs without one: a run `evaluate`), with eval/<evaluation>/samples.jsonl holding every completion and its test
    outcomes (a local file under checkpoint.dir when MLflow logging is off). Model mode adds decoding's
    eval/tokens_per_forward and eval/accept_head_{k} (model.decode_stats), and eval.speculative auto's choice."""
    from wmtp import sandbox
    e = cfg.eval
    rank, world, device, owned = setup_distributed(cfg.training.collective_timeout_s)
    terminal = sys.stdout if sys.stdout.isatty() and rank == 0 else None
    try:
        sandbox.isolation(sandbox.Limits.of(e).mode)  # probed first: a refusal comes before any decoding
        tasks = eval_tasks(e.dataset, e.max_tasks)
        run_id, step, stats, n_heads = None, 0, {}, None
        if samples:
            pairs = read_samples(samples, tasks)
            tasks = {tid: tasks[tid] for tid in dict(pairs)}  # pass@k over the tasks that have samples
            progress = Progress(len(tasks), len(pairs), terminal)
        else:
            tok, model, run_id, step, _ = model_to_evaluate(cfg, use_micro, checkpoint, rank, device)
            progress, n_heads = Progress(len(tasks), len(tasks) * e.n_samples, terminal), model.args.n_future_tokens
            with torch.no_grad():
                pairs, stats = sample_completions(model, tok, tasks, e, rank, world, device, cfg.dataset.template,
                                                  progress, prompt_chat(cfg, use_micro))
        if rank != 0:
            return None
        results = sandbox.score(tasks, pairs, sandbox.Limits.of(e), e.workers or os.cpu_count() or 1,
                                progress.programs_run)
        iso = sandbox.isolation(sandbox.Limits.of(e).mode)  # probed by score()
        summary, isolation = {**sandbox.summarize(results, e.k), **stats, "sandbox": iso.mode}, iso.mode
        print(f"sandbox: {sandbox.describe(iso)}", flush=True)
    except (sandbox.TaskError, sandbox.SandboxUnavailable) as err:
        raise UserError(str(err))
    finally:
        end_distributed(owned)
    print(sandbox.format_summary(summary), flush=True)
    if json_out:
        sandbox.write_atomic(json_out, json.dumps(summary, indent=2) + "\n")  # random temp name: no planted link
    samples_text = "".join(json.dumps(r) + "\n" for r in results)
    # one folder per evaluation; microseconds so that names sort in the order the evaluations ran
    folder = f"eval/{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S-%f')}-{uuid.uuid4().hex[:4]}"
    if cfg.mlflow.enable_logging:
        log_evaluation(cfg, run_id, step, summary, samples_text, isolation, folder, logged_keys(e.k, n_heads))
    else:
        local = Path(cfg.checkpoint.dir) / folder / "samples.jsonl"
        local.parent.mkdir(parents=True, exist_ok=True)
        sandbox.write_atomic(str(local), samples_text)
        log.info(f"completions kept in {local} (MLflow logging is off)")
    return summary


def logged_keys(ks, n_heads):
    """The metrics every evaluation logs, so that none is left from an earlier one: pass@k for each eval.k, and in
    model mode decoding's (tokens per forward, each extra head's acceptance, auto's choice); NaN where not measured."""
    keys = [f"pass@{k}" for k in ks]
    if n_heads:
        keys += ["tokens_per_forward", *[f"accept_head_{k}" for k in range(1, n_heads)], "speculative",
                 "speculative_speedup"]
    return keys


def log_evaluation(cfg, run_id, step, summary, samples_text, isolation, folder, keys):
    """eval/<key> for each of `keys` (NaN where the summary has none) and <folder>/samples.jsonl on the training run,
    or on a new run `evaluate` when there is none; the tag eval.samples names the newest samples file, and
    sandbox.isolation which isolation the programs ran under (bwrap, or uid or none where eval.sandbox opted in)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    client, own_run = MlflowClient(tracking_uri(cfg.mlflow.tracking_uri)), run_id is None
    if own_run:
        run_id = client.create_run(experiment_id(client, cfg), run_name="evaluate",
                                   tags={"pipeline": "evaluate", "sandbox.isolation": isolation}).info.run_id
        log_params(client, run_id, flatten({"eval": cfg.to_dict()["eval"], "experiment": cfg.to_dict()["experiment"]}))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(metric_name(f"eval/{k}"), float(summary.get(k, math.nan)), now, step)
                                      for k in keys])
    client.log_text(run_id, samples_text, f"{folder}/samples.jsonl")
    client.set_tag(run_id, "eval.samples", f"{folder}/samples.jsonl")
    if not own_run:
        client.set_tag(run_id, "sandbox.isolation", isolation)
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    log.info(f"logged {', '.join(k for k in keys if k in summary)} and {folder}/samples.jsonl to run {run_id}")


# -----------------------------------------------------------------------------
# sample: the policy's own answers, graded, as training data

def sample(cfg, use_micro=False, checkpoint="auto", out=None, tasks=None):
    """eval.n_samples completions of each task of eval.dataset (or of `tasks`, task_id -> record) from a checkpoint,
    as evaluate generates them, graded in the sandbox, and written atomically to `out` as the trainer's JSONL
    (sampled_records): critic, verifiable and rho1 train on it as it is. Returns the records."""
    from wmtp import sandbox
    e = cfg.eval
    rank, world, device, owned = setup_distributed(cfg.training.collective_timeout_s)
    terminal = sys.stdout if sys.stdout.isatty() and rank == 0 else None
    try:
        if out and not Path(out).parent.is_dir():
            raise UserError(f"--out {out}: no directory {Path(out).parent} to write it in")
        tasks = tasks or eval_tasks(e.dataset, e.max_tasks)
        for record in tasks.values():
            sandbox.programs(record, "")  # a task without runnable tests fails here, before any generation
        tok, model, run_id, step, source = model_to_evaluate(cfg, use_micro, checkpoint, rank, device)
        progress = Progress(len(tasks), len(tasks) * e.n_samples, terminal)
        with torch.no_grad():
            pairs, _ = sample_completions(model, tok, tasks, e, rank, world, device, cfg.dataset.template, progress,
                                          prompt_chat(cfg, use_micro))
        if rank != 0:
            return None
        results = sandbox.score(tasks, pairs, sandbox.Limits.of(e), e.workers or os.cpu_count() or 1,
                                progress.programs_run)
        provenance = {"checkpoint": source, "run_id": run_id, "step": step, "n_samples": e.n_samples,
                      "temperature": e.temperature if e.n_samples > 1 else 0.0, "top_p": e.top_p, "seed": e.seed,
                      "max_new_tokens": e.max_new_tokens, "template": cfg.dataset.template,
                      "sandbox": sandbox.isolation().mode}
    except (sandbox.TaskError, sandbox.SandboxUnavailable) as err:
        raise UserError(str(err))
    finally:
        end_distributed(owned)
    records = sampled_records(tasks, results, provenance)
    if out:
        sandbox.write_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
    n_right = sum(r["is_correct"] for r in records)
    print(f"sample: {len(records)} answers to {len(tasks)} tasks, {n_right} right ({n_right / len(records):.1%})"
          + (f", written to {out}" if out else ""), flush=True)
    return records


def sampled_records(tasks, results, provenance):
    """Training records of graded completions: each task's record (instruction, input, task_id, metadata with its
    tests) with the completion as output, is_correct = the sandbox's verdict (every test ran and passed), and
    provenance = where it came from (checkpoint, sampling settings) plus the sandbox's status and its index among
    its task's samples. The task's own answer (output, completion, messages) and private keys (_source) stay out:
    training then renders the prompt from instruction and input, as sampling did (render_prompt)."""
    records, index = [], {}
    for r in results:
        task = tasks[r["task_id"]]
        i = index[r["task_id"]] = index.get(r["task_id"], -1) + 1
        record = {k: v for k, v in task.items()
                  if not k.startswith("_") and k not in ("output", "completion", "messages")}
        records.append({**record, "task_id": r["task_id"], "output": r["completion"], "is_correct": r["passed"],
                        "provenance": {**provenance, "sample": i, "status": r["status"]}})
    return records
