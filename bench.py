"""
bench.py: what the trainer's features cost, as ratios of two things measured side by side in one process.

    python bench.py [--quick] [--out bench/results.json]    # the figures: P1-P10 (P6 on a GPU), checkpoint, logging
    python bench.py --checkpoint PATH                       # adds P9: speculative decoding on a trained checkpoint
    python bench.py --scaling [--out bench/results.json]    # tokens/s and peak memory over seq x H (slow)

Every figure runs the trainer's own code (weighted_mtp.train_step, the pipelines' losses, MTPTransformer,
MetricLogger, s3ckpt) against a plain alternative. The two sides alternate (A B, B A, ...) so that whatever else the
machine does hits both alike; each repeat gives one ratio and the table shows its median, min and max over the
repeats. P1-P5 and the checkpoint/logging ratios run on the CPU (2 threads) with the micro model scaled up (dim 256,
seq 256, batch 8, H=4); P6 only where CUDA is present. Ratios, not absolute times, are the point: they carry across
machines.
"""
import os

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # the profiler (peak_memory) would print two lines per step
import argparse
import contextlib
import dataclasses
import json
import logging
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import s3ckpt
import weighted_mtp as wm
from wmtp.config import load_config
from wmtp.model import Block, generate
from wmtp.pretrained import ByteTokenizer
from wmtp.data import collate
from wmtp.parallel import Meter, model_state, wrap_and_compile
from wmtp.pipelines import Baseline, Critic, Rho1, Verifiable
from wmtp.tracking import MetricLogger
from wmtp.checkpointing import training_parts
from wmtp import sandbox

ROOT = Path(__file__).resolve().parent
CPU = torch.device("cpu")
BYTES = ByteTokenizer.vocab_size
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
             ("L4", 121e12), ("A10G", 70e12)]  # dense bf16 FLOP/s by GPU name, first match wins
FULL = SimpleNamespace(dim=256, seq=256, batch=8, repeats=5, steps=3, block=6, mem_batch=4, gpu_batch=4, quick=False,
                       vocab=32000, data=(), warmup=2)
# --quick checks that every figure runs, not its value: smaller everything, vocab 4096 where a figure says 32000,
# setup()'s trainers 64 training and 8 validation records (only prepare() reads them: the figures time make_batch's
# batches; the FSDP figures keep theirs, the data counts in their peak RSS), one untimed call a side before the timed
# ones (which are still past the first, the one that creates the optimizer state)
QUICK = SimpleNamespace(dim=128, seq=128, batch=4, repeats=2, steps=3, block=4, mem_batch=2, gpu_batch=1, quick=True,
                        vocab=4096, data=("data_sampling.n_samples=64", "data_sampling.val_samples=8"), warmup=1)

# -----------------------------------------------------------------------------
# the trainer, set up as train() sets it up, and timing


def setup(S, kind=Baseline, H=4, dim=None, vocab=0, device=CPU, micro=()):
    """The trainer of pipeline class `kind` as train() prepares it (wm.prepare, no run): (setup, model, optimizer,
    params, meter), from its local config (kind.local_config()) with the sizes' data overrides (S.data), at width
    `dim` (default S.dim). Nothing to start from: verifiable starts from fresh weights with its value head on the
    policy (the production configs' critic.model), rho1's reference is a frozen copy of the starting policy."""
    cfg = load_config(kind.local_config(),
                      [f"experiment.pipeline={kind.name}", f"model.n_future_tokens={H}",
                       f"model.micro.dim={dim or S.dim}", f"model.micro.vocab_size={vocab}", "critic.checkpoint=",
                       "reference.path=", "model.init_from=", "checkpoint.resume=never", "mlflow.enable_logging=false",
                       *POLICY_CRITIC, *S.data, *micro])
    s = wm.prepare(cfg, use_micro=True, device=device)
    return s, s.model, s.optimizer, s.params, Meter(device)


def step_fn(trainer, batch):
    """A function of no arguments that runs one wm.train_step of `trainer` (setup's tuple) on the one micro-batch
    `batch`, at a step past the TD EMA's warm-up (the steady state); what compare and timed call."""
    s, model, optimizer, params, meter = trainer
    step = s.cfg.training.td_ema_warmup_steps  # past the EMA warm-up: the steady state
    return lambda: wm.train_step(s.pipeline, model, optimizer, params, [batch], meter, step)


def make_batch(B, T, vocab=BYTES, device=CPU):
    """B rows of T random tokens through the trainer's collate: first quarter prompt (-100), every other row correct."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(B):
        ids = torch.randint(0, 256 if vocab == BYTES else vocab, (T,), generator=g).tolist()
        rows.append((ids, [-100] * (T // 4) + ids[T // 4:], float(i % 2 == 0), {}))
    return collate(rows, ByteTokenizer.pad_id, device)


def timed(fn, device=CPU):
    """Seconds one fn() takes (perf_counter), the CUDA queue synchronised before and after on a cuda `device`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def compare(a, b, S, settle=lambda: None, warmup=None):
    """time(b) / time(a) per repeat: S.steps calls of each, alternating (A B, B A, ...), each side's time the median
    of its calls (robust to other processes on a shared machine), after `warmup` untimed calls of each (default
    S.warmup). settle() runs untimed after every call."""
    for _ in range(S.warmup if warmup is None else warmup):
        a(), settle(), b(), settle()
    ratios = []
    for r in range(S.repeats):
        times = {a: [], b: []}
        for i in range(S.steps):
            for fn in ((a, b) if (r + i) % 2 == 0 else (b, a)):
                times[fn].append(timed(fn))
                settle()
        ratios.append(statistics.median(times[b]) / statistics.median(times[a]))
    return ratios


def compare_blocks(a_block, b_block, S):
    """mean step time of b_block() / a_block() (each returns its S.block step times), blocks alternating per
    repeat. For costs that come and go in the background (uploads, metric flushes): a median would hide them."""
    ratios = []
    for r in range(S.repeats):
        first, second = (a_block, b_block) if r % 2 == 0 else (b_block, a_block)
        times = {first: first(), second: second()}
        ratios.append(statistics.mean(times[b_block]) / statistics.mean(times[a_block]))
    return ratios


@contextlib.contextmanager
def spare_core():
    """torch threads - 1 (at least 1) for the figures with background threads: a GPU run leaves them idle CPU cores;
    on a CPU run that uses every core, any other thread stalls torch's parallel regions, whatever it does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


def summary(ratios, goal, higher_is_better=False, **extra):
    """A figure's result: {median, min, max, goal, ok, ratios (rounded to 4 places), **extra}; ok is median <= goal
    (a cost), or >= goal with higher_is_better (a speed-up, an efficiency)."""
    med = statistics.median(ratios)
    return {"median": med, "min": min(ratios), "max": max(ratios), "goal": goal,
            "ok": med >= goal if higher_is_better else med <= goal, "ratios": [round(r, 4) for r in ratios], **extra}


def flops_per_token(args, T):
    """(whole model, one head): model FLOPs of a training step per token (PaLM, appendix B): 6 per weight of every
    matmul the token passes, plus 12·dim·T per block for attention. A head is its block plus one unembedding."""
    with torch.device("meta"):
        block = 6 * sum(p.numel() for p in Block(args).parameters() if p.dim() == 2) + 12 * args.dim * T
    head = block + 6 * args.dim * args.vocab_size
    return (args.n_layers - args.n_future_tokens) * block + args.n_future_tokens * head, head


def peak_memory(step, model, optimizer, batch, device=CPU):
    """Peak bytes of one training step: what is alive at its start (weights, optimizer state, batch) plus the highest
    the step's own allocations climb. CUDA: torch.cuda.max_memory_allocated. CPU: torch.profiler(profile_memory)
    records every tensor allocation and free of the CPU allocator with its running total from the profile's start;
    the maximum of that total is the step's transient peak. (Process RSS would count allocator caches and the
    Python heap too; tracemalloc sees no tensor memory.)"""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        return torch.cuda.max_memory_allocated()
    alive = [*model.parameters(), *model.buffers(), *batch,
             *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
    start = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}.values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        events = json.loads(Path(f"{tmp}/trace.json").read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return start + max([0, *totals])


# -----------------------------------------------------------------------------
# the figures


def p1_verifiable(S):
    """P1: verifiable train_step / baseline train_step: same weights, batch and H; the extra is the value head,
    TD errors, GAE, whitening, EMA and the weighted loss."""
    batch = make_batch(S.batch, S.seq)
    base, ver = setup(S, Baseline), setup(S, Verifiable)
    return summary(compare(step_fn(base, batch), step_fn(ver, batch), S), 1.10)


def p2_rho1(S):
    """P2: rho1 train_step / baseline train_step; the extra is the frozen reference's forward and the top-k."""
    batch = make_batch(S.batch, S.seq)
    base, rho = setup(S, Baseline), setup(S, Rho1)
    return summary(compare(step_fn(base, batch), step_fn(rho, batch), S), 1.40)


POLICY_CRITIC = ["critic.model=policy", "critic.head=linear", "critic.features=hidden"]


def p10_critic(S):
    """P10: critic train_step / baseline train_step, vocab 32000 (where a critic that ran every head's CE paid most):
    the value head on the policy's frozen trunk (P10), and a frozen separate value model (a copy of the policy, MLP
    head: P10_separate). The critic runs the trunk and head 0 alone, no logits (on log steps only the heads' CE, for
    train/head_k_loss: not timed here, 1 step in log_interval). Goal 0.15 each (before: 0.53)."""
    batch, vocab = make_batch(S.batch, S.seq, S.vocab), S.vocab
    base = setup(S, Baseline, vocab=vocab)
    policy = setup(S, Critic, vocab=vocab, micro=POLICY_CRITIC)
    separate = setup(S, Critic, vocab=vocab, micro=["critic.model=copy", "critic.head=mlp", "critic.features=hidden"])
    for trainer in (policy, separate):  # a step that logs nothing: the steady state
        trainer[0].pipeline.t = dataclasses.replace(trainer[0].pipeline.t, log_interval=10**9)
    return (summary(compare(step_fn(base, batch), step_fn(policy, batch), S), 0.15),
            summary(compare(step_fn(base, batch), step_fn(separate, batch), S), 0.15))


def bare_step(model, optimizer, batch):
    """What a plain fine-tuning script does: logits, next-token cross-entropy, backward, AdamW (no clipping, no
    NaN guard)."""
    tokens, labels, _ = batch
    logits = model.logits(tokens)  # [B, T, 1, V]
    loss = F.cross_entropy(logits[:, :-1, 0].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def p3_overhead(S):
    """P3: baseline train_step with H=1 / a bare PyTorch loop on the same model (own AdamW): the trainer's own cost."""
    batch = make_batch(S.batch, S.seq)
    trainer = setup(S, Baseline, H=1)
    model, bare_opt = trainer[1], torch.optim.AdamW(trainer[3], lr=3e-4, weight_decay=0.0, fused=True)  # as train()
    return summary(compare(lambda: bare_step(model, bare_opt, batch), step_fn(trainer, batch), S), 1.05)


def p4_memory(S):
    """P4: peak memory of a baseline train_step, H=4 / H=1, vocab 32000 (the logits dominate). See peak_memory()."""
    batch, tiny = make_batch(S.mem_batch, S.seq, S.vocab), make_batch(1, 16, S.vocab)
    peaks = {1: [], 4: []}
    for H in peaks:
        trainer = setup(S, Baseline, H=H, vocab=S.vocab)
        step_fn(trainer, tiny)()  # creates the optimizer state, cheaply
        for _ in range(2):  # deterministic: two repeats show it
            peaks[H].append(peak_memory(step_fn(trainer, batch), trainer[1], trainer[2], batch))
    return summary([b / a for a, b in zip(peaks[1], peaks[4])], 1.30,
                   peak_mib={f"H{H}": p[0] / 2**20 for H, p in peaks.items()},
                   method="CPU: weights + optimizer state + batch, plus the profiler's peak of tensor allocations "
                          "in the step")


def p5_heads(S):
    """P5: baseline train_step, H=4 / H=1 (same trunk and batch). Goal 1 + 3·share + 0.05, share = model FLOPs of
    one head (block + unembedding) per token / those of the whole H=1 model."""
    batch = make_batch(S.batch, S.seq)
    one, four = setup(S, Baseline, H=1), setup(S, Baseline, H=4)
    total, head = flops_per_token(one[1].args, S.seq)
    share = head / total
    ratios = compare(step_fn(one, batch), step_fn(four, batch), S)
    return summary(ratios, 1 + 3 * share + 0.05, head_share=share)


def peer(S, H):
    """The P7/P8 model, set up as the trainer does: 3 trunk blocks + H heads (H=1: 4 blocks, as the Hugging Face
    peer), 8 attention heads, vocab 32000 (where the unembedding dominates a small model's step)."""
    return setup(S, Baseline, H=H, vocab=S.vocab, micro=(
        "model.micro.n_trunk_layers=3", "model.micro.n_heads=8", "model.micro.n_kv_heads=8",
        "model.micro.multiple_of=256"))


def hf_llama(model, seq):
    """A Hugging Face LlamaForCausalLM (sdpa attention) of our H=1 model's dims, or None without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    a = model.args
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, num_hidden_layers=a.n_layers,
                         intermediate_size=model.layers[0].feed_forward.w1.out_features, num_attention_heads=a.n_heads,
                         num_key_value_heads=a.n_kv_heads or a.n_heads, max_position_embeddings=seq,
                         rms_norm_eps=a.norm_eps, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def hf_step(hf, optimizer, batch):
    """What a user of the peer runs: forward with labels (it shifts them and takes the mean CE), backward, AdamW."""
    tokens, labels, _ = batch
    hf(input_ids=tokens, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def p7_peer(S):
    """P7: our baseline train_step, H=1 / a Hugging Face LlamaForCausalLM training step (forward with labels,
    backward, fused AdamW) at the same dims (dim, 4 blocks, 8 attention heads, vocab 32000, seq, batch)."""
    batch = make_batch(S.batch, S.seq, S.vocab)
    ours = peer(S, 1)
    hf = hf_llama(ours[1], S.seq)
    if hf is None:
        return {"skipped": "transformers is not installed (pip install -e '.[bench]')"}
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, weight_decay=0.0, fused=True)
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours[1].parameters())  # same dims
    return summary(compare(lambda: hf_step(hf, hf_opt, batch), step_fn(ours, batch), S), 1.00, vocab=S.vocab)


def p8_efficient_loss(S):
    """P8: baseline train_step, H=4, vocab 32000, memory-efficient loss (one head's logits alive at a time, each
    computed once) / the naive loss (every head's logits kept for backward): same weights and batch."""
    batch = make_batch(S.batch, S.seq, S.vocab)
    efficient, naive = peer(S, 4), peer(S, 4)
    efficient[1].memory_efficient_loss, naive[1].memory_efficient_loss = True, False
    return summary(compare(step_fn(naive, batch), step_fn(efficient, batch), S), 1.03, vocab=S.vocab)


def p6_mfu(S):
    """P6 (CUDA only): model FLOPs utilisation of a ~1B MTP model (H=4), bf16 autocast, seq 2048:
    flops_per_token · tokens/s / the GPU's peak dense bf16 FLOP/s."""
    device, name = torch.device("cuda"), torch.cuda.get_device_name()
    peak = next((v for key, v in PEAK_BF16 if key in name), None)
    if peak is None:
        return {"skipped": f"no peak bf16 FLOP/s known for {name}"}
    trainer = setup(S, Baseline, dim=2048, vocab=32000, device=device, micro=(
        "model.micro.n_trunk_layers=16", "model.micro.n_heads=16", "model.micro.n_kv_heads=8",
        "model.micro.multiple_of=256"))
    args = trainer[1].args
    step, T = step_fn(trainer, make_batch(S.gpu_batch, 2048, 32000, device)), 2048
    for _ in range(3):
        step()
    mfus = [flops_per_token(args, T)[0] * S.gpu_batch * T / timed(step, device) / peak for _ in range(S.repeats)]
    return summary(mfus, 0.40, higher_is_better=True, gpu=name, params=sum(p.numel() for p in trainer[1].parameters()),
                   batch=S.gpu_batch, seq=T)


def gen_kv_cache(S):
    """gen_kv_cache: generation tokens/s with model.generate's KV cache / re-running the whole prefix for
    every token (what the trainer did before): greedy, 256 new tokens for 4 random 32-token prompts, micro model
    (--quick: 1 prompt and 64 tokens, the same cache and loop; the uncached side's cost grows with the square of the
    tokens, and would take most of the minute)."""
    model, batch = setup(S, Baseline)[1].eval(), 1 if S.quick else 4
    prompt, new = 32, 64 if S.quick else 256
    prompts = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(0)).tolist()

    @torch.no_grad()
    def without_cache():
        tokens = torch.tensor(prompts)
        for _ in range(new):
            logits = model.logits(tokens, n_heads=1)
            tokens = torch.cat([tokens, logits[:, -1, 0].argmax(-1, keepdim=True)], dim=1)
        return tokens[:, prompt:].tolist()

    with_cache = lambda: generate(model, prompts, -1, BYTES - 1, new)  # EOS -1: every row makes `new` tokens
    assert with_cache() == without_cache(), "the two sides must generate the same tokens"
    ratios = compare(with_cache, without_cache, SimpleNamespace(repeats=S.repeats, steps=1), warmup=0)
    return summary(ratios, 5.0, higher_is_better=True, new_tokens=new, batch=batch, prompt_tokens=prompt, dim=S.dim)


def weights_read(model):
    """Parameters a verify forward reads ÷ those a plain decode step reads: the trunk, every head's block and the
    output matrix against the trunk, head 0's block and the output matrix (the embedding: a row or H rows). Where a
    step is bound by reading the weights, tokens per forward ÷ this bounds the speculative speed-up."""
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())
    shared = count([*model.layers[:-1], model.norm, model.output])
    return (shared + count([model.layers[-1], *model.extra_heads])) / (shared + count([model.layers[-1]]))


def p9_speculative(S, checkpoint, device=CPU):
    """P9 (with --checkpoint): decode tokens/s of self-speculative greedy decoding / plain greedy decoding (= plain's
    time / speculative's), max_new_tokens 32, over builtin:pyfunc's 64 held-out prompts at batch 1 (goal 1.5) and
    16 (P9_b16, goal 1.2), alternating repeats, on a trained checkpoint (random heads draft nothing right), on
    `device` (scripts/gpu_check.sh: cuda, bf16 autocast). Both sides must give the same completions; tokens per
    forward, pass@1, weights_read and the bound it sets where reading weights is the cost (weight_bound = tokens per
    forward / weights_read) come with the figure, and the share of completions identical to plain greedy's (1.0 in
    fp32; bf16 rounds a verify forward's wider matmuls differently, so a near tie may break the other way)."""
    from wmtp.config import config_from_dict
    from wmtp.evaluation import eval_tasks, model_to_evaluate, sample_completions
    cfg = config_from_dict(s3ckpt.checkpoint_part(s3ckpt.load_checkpoint(checkpoint), "about")["config"], checkpoint)
    cfg = config_from_dict({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "dataset": "builtin:pyfunc",
                                                      "n_samples": 1, "max_new_tokens": 32}}, checkpoint)
    tok, model, _, _, _ = model_to_evaluate(cfg, not cfg.model.path, checkpoint, 0, device)
    tasks = eval_tasks("builtin:pyfunc")
    results = {}
    for name, batch, goal in (("P9", 1, 1.5), ("P9_b16", 16, 1.2)):
        runs = {}

        def side(speculative):
            e = dataclasses.replace(cfg.eval, batch_size=batch, speculative=speculative)
            runs[speculative] = sample_completions(model, tok, tasks, e, 0, 1, device, cfg.dataset.template)
        plain, fast = lambda: side(False), lambda: side(True)
        ratios = compare(fast, plain, SimpleNamespace(repeats=max(2, S.repeats // 2), steps=1), warmup=1)
        same = sum(a == b for a, b in zip(runs[True][0], runs[False][0])) / len(tasks)  # 1.0 on the CPU (fp32)
        passed = [r["passed"] for r in sandbox.score(tasks, runs[True][0], sandbox.Limits(timeout_s=10), workers=2)]
        read = weights_read(model)
        results[name] = summary(ratios, goal, higher_is_better=True, batch=batch, tasks=len(tasks),
                                pass_at_1=sum(passed) / len(passed), identical_completions=same, weights_read=read,
                                weight_bound=runs[True][1]["tokens_per_forward"] / read, **runs[True][1])
    return results


def programs_per_second(workers, n_programs=64, limits=None, mode=None):
    """Programs per second through sandbox.score() with `workers` parallel workers (small assert programs: a candidate
    each, judged by the slots' judge servers) under isolation(mode)."""
    limits = limits or sandbox.Limits()
    task = {"task_id": "bench", "metadata": {"test": "def check(f):\n    assert f(2) == 3\n", "entry_point": "f"}}
    samples = [("bench", "def f(x):\n    return x + 1")] * n_programs
    sandbox.isolation(mode)  # probed once and cached: the probe is not part of the throughput
    start = time.perf_counter()
    results = sandbox.score({"bench": task}, samples, dataclasses.replace(limits, mode=mode or ""), workers)
    elapsed = time.perf_counter() - start
    assert all(r["passed"] for r in results), results[0]["stderr"]
    return n_programs / elapsed


def isolation_rates(workers, n_programs=64, repeats=3, start=0):
    """bwrap against the weaker mode one may opt in to (uid as root, else none), alternating which goes first
    (start: the first repeat's parity, for callers that repeat one at a time): {"bwrap", "fallback": programs/s
    (best of repeats), "mode": the weaker mode's, "ratio": bwrap / fallback, "overhead_ms": bwrap's extra wall time
    per program and worker}."""
    fallback = "uid" if os.geteuid() == 0 else "none"
    rates = {"bwrap": [], fallback: []}
    for r in range(repeats):
        for mode in ("bwrap", fallback)[::1 if (r + start) % 2 == 0 else -1]:
            rates[mode].append(programs_per_second(workers, n_programs, mode=mode))
    bwrap, other = max(rates["bwrap"]), max(rates[fallback])
    return {"bwrap": bwrap, "fallback": other, "mode": fallback, "ratio": bwrap / other,
            "overhead_ms": 1000 * workers * (1 / bwrap - 1 / other)}


def sandbox_throughput(S):
    """sandbox_throughput: programs/s with eval.workers = the CPU cores / with one worker — each program a sandboxed
    subprocess (sandbox.py) running a small function's asserts; goal 0.8 x cores. Alternating repeats."""
    cores, n = os.cpu_count() or 1, 4 if S.quick else 32
    ratios = []
    for r in range(S.repeats):
        sides = [1, cores] if r % 2 == 0 else [cores, 1]
        rate = {w: programs_per_second(w, n * w) for w in sides}  # the same time's worth of work per side
        ratios.append(rate[cores] / rate[1])
    return summary(ratios, 0.8 * cores, higher_is_better=True, cores=cores, programs_per_worker=n)


def sandbox_isolation(S):
    """sandbox_isolation: programs/s under bwrap / under the fallback this machine would use without it (uid as
    root, else none: the earlier isolation, the same judges), `cores` workers; goal 0.5. overhead_ms: bwrap's
    extra wall time per program. Alternating repeats (isolation_rates)."""
    try:
        sandbox.isolation("bwrap")
    except sandbox.SandboxUnavailable as e:
        return {"skipped": str(e)}
    cores, n = os.cpu_count() or 1, 4 if S.quick else 32
    runs = [isolation_rates(cores, n * cores, repeats=1, start=r) for r in range(S.repeats)]
    return summary([r["ratio"] for r in runs], 0.5, higher_is_better=True, fallback=runs[0]["mode"],
                   bwrap_per_s=statistics.median(r["bwrap"] for r in runs),
                   fallback_per_s=statistics.median(r["fallback"] for r in runs),
                   overhead_ms=statistics.median(r["overhead_ms"] for r in runs))


def fsdp_figures(S, tmp):
    """fsdp_step: an FSDP train_step / a DDP train_step of the same baseline model (dim S.dim, H=4), 2 CPU processes
    under torchrun (gloo), batch S.batch x S.seq; on the CPU nothing overlaps the all-gathers with compute.
    fsdp_memory: per-rank peak memory FSDP / DDP: each process's peak RSS over 3 steps (VmHWM, reset after the
    first step: building the whole model before sharding it is not training) less its RSS before prepare(), DDP and
    FSDP in separate torchrun jobs; a deeper model (16 blocks, dim 2·S.dim; --quick: 8 blocks, one step after the
    first) at batch 1 x 64, where weights, gradients and AdamW state dominate as in a full fine-tune of a 7B model.
    The data and the Python heap count on both sides. (peak_memory()'s profiler count misses FSDP2's frees of
    gathered weights: it resizes storages.)
    fsdp_setup_memory: per-rank peak RSS over prepare() under FSDP (the model built on the meta device, sharded,
    each rank filling its own rows) ÷ the whole model's fp32 bytes, 4 processes, dim 1024, 16 blocks (--quick: dim
    512, 8 blocks); the torch.distributed modules are imported before the baseline, the data counts.
    The processes run this file (--fsdp-worker); figures are rank 0's. Each measurement has a fresh torchrun launch
    of its own; --quick, which checks the code paths and not the values, runs them all in one launch of 2."""
    def launch(kinds, nproc=2):
        out = Path(tmp) / f"fsdp-{'-'.join(kinds)}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               "--fsdp-worker", f"{','.join(kinds)}:{out}", "--threads", "1", "--steps", str(S.steps)]
        cmd += ["--quick"] if S.quick else []
        # glibc: every allocation of 64 KiB or more its own mapping, returned at free: RSS follows the live tensors
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
               "MALLOC_TRIM_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"fsdp worker failed:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())
    kinds = ("times", "ddp", "fsdp", "setup")
    if S.quick:
        one = launch(kinds)
        got = {kind: [one[kind]] for kind in kinds}
    else:  # times: its repeats alternate inside one launch; each memory figure from two launches
        got = {kind: [launch([kind], 4 if kind == "setup" else 2)[kind] for _ in range(1 if kind == "times" else 2)]
               for kind in kinds}
    peaks, setup = {p: got[p] for p in ("ddp", "fsdp")}, got["setup"]
    return {"fsdp_step": summary(got["times"][0], 1.3, processes=2),
            "fsdp_memory": summary([f / d for d, f in zip(peaks["ddp"], peaks["fsdp"])], 0.6, batch="1 x 64",
                                   blocks=8 if S.quick else 16, peak_mib={k: v[0] / 2**20 for k, v in peaks.items()}),
            "fsdp_setup_memory": summary([peak / model for peak, model in setup], 0.5, processes=2 if S.quick else 4,
                                         model_mib=setup[0][1] / 2**20, peak_mib=setup[0][0] / 2**20)}


def parallel_trainer(S, rank, world, parallel, *micro):
    """The baseline (H=4, dim S.dim) prepared and wrapped as train() does under training.parallel."""
    cfg = load_config(Baseline.local_config(),
                         ["model.n_future_tokens=4", f"model.micro.dim={S.dim}", "checkpoint.resume=never",
                          "model.init_from=", "mlflow.enable_logging=false", f"training.parallel={parallel}", *micro])
    s = wm.prepare(cfg, use_micro=True, rank=rank, world=world, device=CPU)
    return s, wrap_and_compile(s.model, cfg.model.compile, world), s.optimizer, s.params, Meter(CPU)


def rss_kib(field):
    """VmRSS (resident now) or VmHWM (its peak) of this process, from /proc/self/status, in KiB."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def fsdp_worker(S, job):
    """fsdp_figures' processes: job "kind,kind,...:out" -> {kind: its result}, each measured in turn (fsdp_measure)."""
    import torch.distributed as dist
    kinds, out = job.split(":", 1)
    dist.init_process_group("gloo")
    results = {kind: fsdp_measure(S, kind, dist.get_rank(), dist.get_world_size()) for kind in kinds.split(",")}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def fsdp_measure(S, kind, rank, world):
    """times: DDP and FSDP steps alternating in lockstep -> the ratios; ddp or fsdp: the rise of peak RSS over
    preparing that trainer and 3 steps -> bytes; setup: (the rise of peak RSS over preparing a deeper FSDP trainer,
    its model's bytes). What it built is freed when it returns."""
    if kind == "times":
        batch = make_batch(S.batch, S.seq)
        ddp, fsdp = (parallel_trainer(S, rank, world, p) for p in ("ddp", "fsdp"))
        return compare(step_fn(ddp, batch), step_fn(fsdp, batch), S)
    if kind == "setup":  # (peak RSS rise over prepare(), the whole model's fp32 bytes)
        import torch.distributed.checkpoint.state_dict, torch.distributed.fsdp, torch.distributed.tensor  # noqa
        big = SimpleNamespace(dim=512 if S.quick else 1024)
        before = rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        s = parallel_trainer(big, rank, world, "fsdp", f"model.micro.n_trunk_layers={4 if S.quick else 12}",
                             "model.micro.n_heads=8", "model.micro.n_kv_heads=8", "model.micro.multiple_of=256")[0]
        return (rss_kib("VmHWM") - before) * 1024, 4 * sum(p.numel() for p in s.model.parameters())
    small, before = make_batch(1, 64), rss_kib("VmRSS")
    trainer = parallel_trainer(SimpleNamespace(dim=2 * S.dim), rank, world, kind,
                               f"model.micro.n_trunk_layers={4 if S.quick else 12}")
    step_fn(trainer, small)()  # creates the optimizer state
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts: building the model is not training
    for _ in range(1 if S.quick else 3):
        step_fn(trainer, small)()
    return (rss_kib("VmHWM") - before) * 1024


def trainer_checkpoint(trainer):
    """What the trainer's Checkpointer writes (checkpointing.training_parts + the model and optimizer)."""
    s, model, optimizer = trainer[:3]
    weights, partial = model_state(model)
    return s3ckpt.checkpoint_dict({**training_parts(s, 1, 1, "bench", 1.0, False),
                                   "model": {"model": weights, "model_partial": partial},
                                   "optimizer": {"optimizer": optimizer.state_dict()}})


@contextlib.contextmanager
def s3_run(tmp):
    """moto's S3 server (ThreadedMotoServer, 127.0.0.1, port 0) in a child process at nice 19 — S3 is another
    machine in production: its request handling is not the trainer's cost, so it gets only CPU the trainer leaves
    idle — and an MLflow run in a sqlite store whose artifacts live at s3://wmtp/bench. Yields its
    CheckpointUploader."""
    code = ("import logging, os, sys; os.nice(19); from moto.server import ThreadedMotoServer;"
            "logging.getLogger('werkzeug').setLevel(40);"
            "s = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False); s.start();"
            "print(s.get_host_and_port()[1], flush=True); sys.stdin.read()")  # lives until our end of stdin closes
    moto = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        os.environ.update(MLFLOW_S3_ENDPOINT_URL=f"http://127.0.0.1:{int(moto.stdout.readline())}",
                          AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            os.environ.pop(key, None)
        s3ckpt.s3_client().create_bucket(Bucket="wmtp")
        from mlflow import MlflowClient
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = MlflowClient(uri)
        run = client.create_run(client.create_experiment("bench", artifact_location="s3://wmtp/bench"))
        uploader = s3ckpt.CheckpointUploader(run.info.run_id, uri)
        yield uploader
        uploader.wait(120)
        uploader.close()
    finally:
        moto.stdin.close()
        moto.wait(30)


def s3_figures(S, tmp):
    """ckpt_stall: the training loop's block per step checkpoint (train()'s save(): CheckpointWriter.save, whose
    write, upload and retention run in the background) / a plain local torch.save of the same state; writes and
    uploads settle between calls. upload_step: train_step time while a checkpoint is being written and uploaded
    in the background (one saved every other step) / without."""
    trainer, batch = setup(S, Baseline), make_batch(S.batch, S.seq)
    step = step_fn(trainer, batch)
    step(), step()
    state, run_dir, n = trainer_checkpoint(trainer), Path(tmp) / "run", [0]
    with s3_run(tmp) as uploader, spare_core() as threads:
        writer = s3ckpt.CheckpointWriter(3, uploader)

        def trainer_save():
            n[0] += 1
            writer.save(state, run_dir / s3ckpt.step_name(n[0]))

        def settle():
            writer.wait()
            uploader.wait(120)
        stall = compare(lambda: torch.save(state, Path(tmp) / "plain.pt"), trainer_save, S, settle=settle)

        def with_checkpoint():
            times = []
            for i in range(S.block):
                if i % 2 == 0:  # waits (untimed) for the previous write: about one always in flight
                    trainer_save()
                times.append(timed(step))
            settle()
            return times
        upload = compare_blocks(lambda: [timed(step) for _ in range(S.block)], with_checkpoint, S)
        writer.close()
        ckpt = run_dir / s3ckpt.step_name(n[0])
    mib = ckpt.stat().st_size / 2**20
    return {"ckpt_stall": summary(stall, 1.1, checkpoint_mib=mib),
            "upload_step": summary(upload, 1.05, checkpoint_mib=mib, torch_threads=threads)}


def up(url):
    """Whether url answers HTTP 200 within 2 s (False on any connection error)."""
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(tmp):
    """A local `mlflow server` (sqlite, 127.0.0.1, a free port, one worker) at nice 19, standing in for a remote
    server as moto does for S3; stopped with its process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["nice", "-n", "19", str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--default-artifact-root", f"{tmp}/server-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while not up(f"{url}/health"):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow server did not start")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def log_figure(S, tmp):
    """log_overhead: verifiable train_step + Meter.reduce + MetricLogger.log of 20 metrics every step / the same
    with logging off. The logger sends in a background thread; blocks long enough for several flushes."""
    trainer, batch = setup(S, Verifiable), make_batch(S.batch, S.seq)
    meter, step_no = trainer[4], [0]
    from mlflow import MlflowClient

    def logged_step(metrics):
        step_fn(trainer, batch)()
        stats = {**meter.reduce(), "train/learning_rate": 3e-4, "train/tokens_per_sec": 1.0}
        stats.update({f"system/bench_{i}": float(i) for i in range(20 - len(stats))})
        if metrics:
            step_no[0] += 1
            metrics.log(stats, step_no[0])

    def block(metrics=None):
        return [timed(lambda: logged_step(metrics)) for _ in range(S.block)]

    store = contextlib.nullcontext(f"sqlite:///{tmp}/mlflow.db") if S.quick else mlflow_server(tmp)
    with store as uri, spare_core() as threads:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("bench-logging")).info.run_id
        block()

        def logging_on():
            metrics = MetricLogger(client, run_id)
            times = block(metrics)
            metrics.close(60)  # the final flush is the end of the run's, not a step's
            return times
        ratios = compare_blocks(block, logging_on, S)
    backend = "sqlite (embedded)" if S.quick else "mlflow server (sqlite)"
    return {"log_overhead": summary(ratios, 1.01, backend=backend, metrics_per_step=20, torch_threads=threads)}


# -----------------------------------------------------------------------------
# scaling, output, main


def scaling(device):
    """tokens/s and peak memory of a baseline train_step, micro model (dim 256, 2 trunk blocks), vocab 32000,
    batch 1."""
    rows = []
    for T in (256, 512, 1024, 2048):
        for H in (1, 2, 4, 8):
            trainer = setup(FULL, Baseline, H=H, vocab=32000, device=device)
            batch = make_batch(1, T, 32000, device)
            step_fn(trainer, make_batch(1, 16, 32000, device))()  # creates the optimizer state, cheaply
            step = step_fn(trainer, batch)
            t = min(timed(step, device) for _ in range(3))
            peak = peak_memory(step, *trainer[1:3], batch, device)
            rows.append({"seq": T, "H": H, "tokens_per_s": T / t, "peak_mib": peak / 2**20})
            print(f"seq {T:5d} H {H}: {T / t:9.0f} tok/s  {rows[-1]['peak_mib']:8.0f} MiB", flush=True)
    print("\n| seq | " + " | ".join(f"H={H} tok/s (peak MiB)" for H in (1, 2, 4, 8)) + " |\n|---|---|---|---|---|")
    for T in (256, 512, 1024, 2048):
        cells = [f"{r['tokens_per_s']:,.0f} ({r['peak_mib']:,.0f})" for r in rows if r["seq"] == T]
        print(f"| {T} | " + " | ".join(cells) + " |")
    return {"model": "micro dim 256, 2 trunk blocks, vocab 32000, batch 1", "device": str(device), "rows": rows}


def print_table(results):
    """Prints results {figure: summary} as a Markdown table (a skipped figure with its reason; entries without a
    median, such as meta and scaling, left out). Its ≥/≤ column names the figures whose goal is a floor."""
    print("\n| figure | median | min | max | goal | ok |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        if "skipped" in r:
            print(f"| {name} | skipped: {r['skipped']} | | | | |")
        elif "median" in r:
            higher = name in ("P6", "P9", "P9_b16", "gen_kv_cache", "sandbox_throughput", "sandbox_isolation")
            print(f"| {name} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | {'≥' if higher else '≤'} "
                  f"{r['goal']:.3f} | {'yes' if r['ok'] else 'NO'} |")


def cpu_name():
    """The CPU's model name from /proc/cpuinfo, else platform.processor(), else "cpu"."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    return platform.processor() or "cpu"


def figures(checkpoint=None):
    """name -> (function, gives several figures): every figure `--only` can name, in the order the full bench runs
    them. One figure: fig(S) -> its result; several: fig(S, tmp) -> {figure: result}."""
    timed = [p1_verifiable, p2_rho1, p3_overhead, p4_memory, p5_heads, p7_peer, p8_efficient_loss]
    timed += [p6_mfu] if torch.cuda.is_available() else []
    named = {f.__name__[:2].upper(): (f, False) for f in timed}
    named["P9"] = (lambda S, tmp: p9_speculative(S, checkpoint) if checkpoint else {"P9": {
        "skipped": "P9 (speculative decoding) needs a trained checkpoint: --checkpoint PATH"}}, True)
    named["P10"] = (lambda S, tmp: dict(zip(("P10", "P10_separate"), p10_critic(S))), True)
    named.update({f.__name__: (f, False) for f in (gen_kv_cache, sandbox_throughput, sandbox_isolation)})
    named.update({f.__name__.removesuffix("_figures").removesuffix("_figure"): (f, True)
                  for f in (s3_figures, log_figure, fsdp_figures)})
    return named


def run_figures(S, chosen):
    """{figure: result} of the chosen figures, each printed as it finishes."""
    results, t0 = {}, time.time()
    with tempfile.TemporaryDirectory(prefix="wmtp-bench-") as tmp:
        for name, (fig, several) in chosen.items():
            if several:
                results.update(fig(S, tmp))
                print(f"{name} ({time.time() - t0:.0f}s)", flush=True)
            else:
                results[name] = fig(S)
                print(f"{name}: {results[name].get('median', 0):.3f} ({time.time() - t0:.0f}s)", flush=True)
    gpu = f"; P6 on {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    results["meta"] = {"device": f"{cpu_name()}, {torch.get_num_threads()} torch threads{gpu}",
                       "torch": torch.__version__, "repeats": S.repeats, "quick": S.quick,
                       "seconds": round(time.time() - t0, 1), "sizes": vars(S), "figures": list(chosen)}
    return results


def main():
    """The CLI (see the module docstring): runs the chosen figures (--only, else all) and prints their table, or the
    scaling grid alone, and writes --out: --only and --scaling merge into what it held, a full run keeps only its
    scaling. --fsdp-worker: this process is one of fsdp_figures' torchrun workers."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (CI)")
    parser.add_argument("--only", help="comma-separated figures, e.g. P7,P8,s3 (merged into --out); default all: "
                        + ",".join(figures()))
    parser.add_argument("--scaling", action="store_true", help="only the seq x H scaling grid, merged into --out")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is steadier on a busy machine)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    parser.add_argument("--checkpoint", help="a trained checkpoint (e.g. the demo's warm-up) for P9, speculative "
                        "decoding; without one P9 is skipped")
    parser.add_argument("--steps", type=int, help="timed calls of each side per repeat (default 3); the test's "
                        "smoke run uses 1: every figure still computed, over the same repeats")
    parser.add_argument("--fsdp-worker", metavar="OUT", help=argparse.SUPPRESS)  # fsdp_figures' torchrun processes
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    S = SimpleNamespace(**{**vars(QUICK if args.quick else FULL), **({"steps": args.steps} if args.steps else {})})
    if args.fsdp_worker:
        return fsdp_worker(S, args.fsdp_worker)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables"
    out, known = Path(args.out), figures(args.checkpoint)
    old = json.loads(out.read_text()) if out.exists() else {}
    if args.scaling:
        results = {**old, "scaling": scaling(torch.device("cuda" if torch.cuda.is_available() else "cpu"))}
    else:
        names = args.only.split(",") if args.only else list(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            parser.error(f"--only: unknown figure(s) {', '.join(unknown)}; known: {', '.join(known)}")
        results = run_figures(S, {n: known[n] for n in names})
        results = {**old, **results} if args.only else {**results, **({"scaling": old["scaling"]} if "scaling" in old
                                                                     else {})}
        print_table(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
