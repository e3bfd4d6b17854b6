"""
Evaluation: validation during training (val/loss and heads, accuracy and pass@1 by greedy decoding, the critic's
explained variance and AUC) and `evaluate` (pass@k of a model's or a file's completions, run in sandbox.py), with
its results logged to the evaluated run.
"""
import contextlib
import json
import logging
import os
from pathlib import Path
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from checkpointing import load_checkpoint_into, on_this_node, resolve_uri
from config import flatten, tracking_uri, UserError
from data import collate, load_records, render_prompt
from model import generate
from parallel import Meter, all_reduce, autocast_for, gathered, is_sharded, setup_distributed
from pretrained import build_model
from tracking import experiment_id, log_params, metric_name
log = logging.getLogger("weighted_mtp")


def quiet_rank():
    """True on ranks other than 0: one progress display per job, rank 0's."""
    return dist.is_initialized() and dist.get_rank() != 0


def progress(items, desc, leave=False):
    """A progress bar on stdout over items, on rank 0 and a terminal only (a log file would get its redraws)."""
    return tqdm(list(items), desc, leave=leave, file=sys.stdout, disable=quiet_rank() or not sys.stdout.isatty())


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
            self.limits = sandbox.Limits.of(e)
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
            for chunk in progress(batches_of(mine, self.batch_size), "validation"):
                with self.autocast():
                    self.pipeline.val_step(model, collate(chunk, self.tok.pad_id, self.device), meter)
            out = self.pipeline.val_end(meter.reduce(), self.world)
            if self.pipeline.decodes:
                out.update(decoded_metrics(model, mine, self.checker, self.tok, self.device, self.autocast,
                                           self.limits, self.workers))
        model.train()
        return out


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
    for chunk in progress(batches_of([p for p, _ in pairs], 64), "validation: decoding"):
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
    for chunk in progress(batches_of(prompts, e.batch_size), "evaluate: generating", leave=True):
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
        print(f"evaluate: running the tests of {len(pairs)} completions in the sandbox", flush=True)
        results = sandbox.score(tasks, pairs, sandbox.Limits.of(e), workers=e.workers or os.cpu_count() or 1)
        summary, isolation = sandbox.summarize(results, e.k), sandbox.isolation().mode  # probed by score()
        print(f"sandbox: {sandbox.describe()}", flush=True)
    except (sandbox.TaskError, sandbox.SandboxUnavailable) as err:
        raise UserError(str(err))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(sandbox.format_summary(summary), flush=True)
    if json_out:
        sandbox.write_atomic(json_out, json.dumps(summary, indent=2) + "\n")  # random temp name: no planted link
    if cfg.mlflow.enable_logging:
        log_evaluation(cfg, run_id, step, summary, results, isolation)
    return summary


def log_evaluation(cfg, run_id, step, summary, results, isolation):
    """eval/pass@k and eval/samples.jsonl on the training run, or on a new run `evaluate` when there is none;
    the tag sandbox.isolation says which isolation the programs ran under (bwrap, or a fallback: uid, none)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    client, own_run = MlflowClient(tracking_uri(cfg.mlflow.tracking_uri)), run_id is None
    if own_run:
        run_id = client.create_run(experiment_id(client, cfg), run_name="evaluate",
                                   tags={"pipeline": "evaluate", "sandbox.isolation": isolation}).info.run_id
        log_params(client, run_id, flatten({"eval": cfg.to_dict()["eval"], "experiment": cfg.to_dict()["experiment"]}))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(metric_name(f"eval/{k}"), float(v), now, step)
                                      for k, v in summary.items() if k.startswith("pass@")])
    client.log_text(run_id, "".join(json.dumps(r) + "\n" for r in results), "eval/samples.jsonl")
    if not own_run:
        client.set_tag(run_id, "sandbox.isolation", isolation)
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    log.info(f"logged {', '.join(k for k in summary if k.startswith('pass@'))} to run {run_id}")
