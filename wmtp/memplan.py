"""
The memory plan: the estimated peak bytes per GPU of a run, from the model's shape alone (no weight is read), so
that `train --dry-run` can say before a launch whether it fits.
"""
import dataclasses
from pathlib import Path

import torch

from wmtp.model import Block
from wmtp.pipelines import PIPELINE_TYPES, Pipeline
from wmtp.pretrained import ByteTokenizer, micro_args, pretrained_args


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


TORCH_ITSELF = 0.4 * 2**30  # a CPU process's resident memory before any model: Python, torch and the trainer's imports


PLAN_ROWS = {"parameters": "trainable parameters (fp32 masters)", "gradients": "gradients (fp32)",
             "buckets": "DDP all-reduce buckets (fp32)", "optimizer": "AdamW moments (2 x fp32)",
             "frozen": "frozen weights (LoRA base, critic trunk)", "reference": "reference model (frozen)",
             "value": "separate value model (frozen)",
             "gathered": "FSDP gathered blocks + their grads", "copies": "bf16 autocast weight copies",
             "activations": "activations saved for backward", "logits": "loss logits (one head at a time)",
             "peak": "peak", "validation": "validation: gathered weights + KV cache",
             "setup": "setup: host RAM per rank while loading"}


def block_shape(args):
    """(parameters of one block, its k/v width, its FFN width), read off a Block built on the meta device."""
    with torch.device("meta"):
        block = Block(args)
    attention, ffn = block.attention, block.feed_forward
    return sum(p.numel() for p in block.parameters()), attention.wk.out_features, ffn.w1.out_features


def pipeline_type(pipeline):
    """The class of the pipeline named `pipeline`; None: the base Pipeline (a policy trained whole, nothing beside)."""
    return PIPELINE_TYPES[pipeline] if pipeline else Pipeline


def parameter_counts(args, pipeline, lora_rank):
    """(trainable, frozen) parameters of the policy of `pipeline` (a name, None: pipeline_type). L blocks of P_b,
    embedding and output V·d each, final norm d; LoRA adds r·(in + out) per projection: r·(9d + 2·d_kv + 3f) per
    block; the value head d + 1 (its class's value_head). LoRA trains adapters and value head; a pipeline that
    trains no policy (trains_policy false: the critic) only its value head."""
    kind = pipeline_type(pipeline)
    p_block, kv, hidden = block_shape(args)
    d, L, V = args.dim, args.n_layers, args.vocab_size
    base = L * p_block + 2 * V * d + d
    adapters = L * lora_rank * (9 * d + 2 * kv + 3 * hidden)
    value_head = d + 1 if kind.value_head else 0
    if not kind.trains_policy:
        return value_head, base + adapters
    if lora_rank:
        return adapters + value_head, base
    return base + value_head, 0


def block_activations(args, lora_rank, trains_norms, act_bytes):
    """Bytes one block saves for backward per token. The method is Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", §4.1: add up what every op saves), applied to this block (RMSNorm,
    GQA with fused SDPA: no T² scores kept, SwiGLU of width f, no dropout), the residual stream in fp32 and the
    matmul inputs in act_bytes (4; 2 under bf16 autocast):
        s = 4·d·(2 + 2·[norm weights train])   the norms' inputs x, h (+ their normalised x̂ when the weights train)
          + a·(4d + 2·d_kv + 4f + 7r)          the inputs of wq/wk/wv, wo, w1/w3, w2 (d, d, d, f); q after RoPE (d),
                                               k after RoPE and v (d_kv each); silu's input and output, w3's output
                                               (f each); LoRA's x·Aᵀ (r for each of the 7 projections)"""
    _, kv, hidden = block_shape(args)
    d = args.dim
    return 4 * d * (2 + 2 * trains_norms) + act_bytes * (4 * d + 2 * kv + 4 * hidden + 7 * lora_rank)


def memory_plan(args, pipeline=None, lora_rank=0, parallel="ddp", world=1, frozen_dtype="float32",
                batch_size=1, seq_len=2048, activation_checkpointing=False, memory_efficient_loss=True,
                grad_accum=1, reference=None, device="cuda", value=None, eval_batch_size=16, eval_length=2048 + 256):
    """Estimated bytes per GPU, {row: bytes} (rows: PLAN_ROWS), for a policy of shape `args` (L blocks, H heads, V)
    trained by `pipeline` (a name; None: the base Pipeline), whose class says what it trains (trains_policy) and
    holds (holds_reference).

    Weights: a trained one costs 4 (fp32 master) + 4 (gradient) + 8 (AdamW's two fp32 moments) bytes, and under DDP
    with world > 1 4 more (the all-reduce buckets: gradient_as_bucket_view is off); a frozen one (LoRA base, critic
    trunk, the rho1 reference: `reference` or a copy of the policy) frozen_dtype's bytes. fsdp divides all of these
    by world and holds, unsharded in the compute dtype, the root (embedding, output) and two blocks (the current
    and the prefetched one), plus as much in fp32 gradients (a block's unsharded gradients, their copy in the
    reduce-scatter buffer, the root's until the end of backward). On CUDA, DDP keeps a bf16 autocast
    copy of every fp32 weight that a block saves for backward.
    Activations, N = batch_size·seq_len tokens, s = block_activations(): L·s·N + 4d·N (the H head outputs the loss
    reads, less H − 1 shared head inputs); with a checkpoint per block each keeps its fp32 input and backward
    recomputes one block at a time: (L + 1)·4d·N + s·N. The critic trains no block: its forward only holds one
    block's residual, normed input, trunk output and SwiGLU's three f-wide tensors, (16d + 3·a·f)·N.
    Logits: the memory-efficient loss holds, in one head's backward, its fp32 log-softmax, the gradient of that
    and of the logits, 3·N·V·4 bytes (+ the bf16 logit gradient, 2·N·V, on CUDA); without it every head also keeps
    its log-softmax (H·N·V·4). A forward-only loss (critic) holds logits and log-softmax, 2·N·V·4.
    Peak = weights + moments + buckets + the larger of: the start of backward (activations + logits + copies +
    gathered, + gradients when accumulating) and its end (gradients + one block's activations + gathered).
    value: the shape of a separate value model held frozen beside the policy (verifiable), in frozen_dtype.
    Validation and setup are phases of their own (validation_and_setup); setup is the host's memory."""
    cuda, fsdp, ddp = device == "cuda", parallel == "fsdp", parallel == "ddp" and world > 1
    d, V, L, H, N = args.dim, args.vocab_size, args.n_layers, args.n_future_tokens, batch_size * seq_len
    shard, act_bytes = (world if fsdp else 1), (2 if cuda else 4)
    p_block, _, hidden = block_shape(args)
    kind = pipeline_type(pipeline)
    trainable, frozen = parameter_counts(args, pipeline, lora_rank)
    ref = sum(parameter_counts(reference or args, None, 0)) if kind.holds_reference else 0
    trains_blocks, full_ft = kind.trains_policy, kind.trains_policy and not lora_rank
    rows = {"parameters": 4 * trainable / shard, "gradients": 4 * trainable / shard, "buckets": 4 * trainable * ddp,
            "optimizer": 8 * trainable / shard, "frozen": DTYPE_BYTES[frozen_dtype] * frozen / shard,
            "reference": DTYPE_BYTES[frozen_dtype] * ref / shard,
            "value": DTYPE_BYTES[frozen_dtype] * sum(parameter_counts(value, None, 0)) if value else 0}
    gathered = 2 * V * d + 2 * p_block  # the root's embedding and output, the current and the prefetched block
    rows["gathered"] = (act_bytes + 4 * full_ft) * gathered * fsdp
    fp32_block_weights = p_block if full_ft or frozen_dtype == "float32" else 0
    saved_blocks = L if trains_blocks and not activation_checkpointing else 1
    rows["copies"] = 2 * fp32_block_weights * saved_blocks * (cuda and not fsdp)
    s = block_activations(args, lora_rank, full_ft, act_bytes) * N
    if not trains_blocks:
        rows["activations"] = (16 * d + 3 * act_bytes * hidden) * N
    elif activation_checkpointing:
        rows["activations"] = (L + 1) * 4 * d * N + s
    else:
        rows["activations"] = L * s + 4 * d * N
    per_logit = (3 * 4 + 2 * cuda + 4 * H * (not memory_efficient_loss)) if trains_blocks else 2 * 4
    rows["logits"] = per_logit * N * V
    start = rows["activations"] + rows["logits"] + rows["copies"] + rows["gathered"]
    start += rows["gradients"] * (grad_accum > 1)
    end = rows["gradients"] + s * trains_blocks + rows["gathered"]
    static = sum(rows[k] for k in ("parameters", "optimizer", "frozen", "reference", "buckets", "value"))
    rows["peak"] = static + max(start, end)
    decodes = eval_batch_size * eval_length * kind.decodes  # the critic's validation decodes nothing
    rows.update(validation_and_setup(args, rows, static, trainable + frozen, fsdp, act_bytes, decodes, N))
    return {k: int(v) for k, v in rows.items()}


def value_model_shape(spec, policy_args):
    """ModelArgs of a separate value model: critic.model copy (the policy's trunk and head 0: its other heads are
    dropped) or a model dir (one head); None when the dir is not here."""
    if spec == "copy":
        return dataclasses.replace(policy_args, n_layers=policy_args.n_layers - policy_args.n_future_tokens + 1,
                                   n_future_tokens=1)
    return pretrained_args(spec, 1) if Path(spec).is_dir() else None


def validation_and_setup(args, rows, static, weights, fsdp, act_bytes, decoded_tokens, N):
    """The two phases beside training. Validation: the static rows (gradients are freed by then) + under FSDP the
    whole policy gathered in the compute dtype (parallel.gathered) + the KV cache of the decoded tokens
    (eval.batch_size sequences of dataset.max_length + eval.max_new_tokens), 2 (k, v) · act_bytes · n_kv_heads ·
    head_dim per token and block of trunk + head 0, + the loss forward's fp32 logits and log-softmax of one head,
    2·N·V·4.
    Setup (host RAM per rank while loading): DDP builds the whole policy and reference on the host (trained
    weights fp32, frozen ones in model.dtype); FSDP builds them on the meta device and holds on the host only the
    part being drawn or read and the one before it, each at most a block or the embedding, in fp32."""
    p_block, kv, _ = block_shape(args)
    d, V, L, H = args.dim, args.vocab_size, args.n_layers, args.n_future_tokens
    kv_cache = 2 * act_bytes * kv * (L - H + 1) * decoded_tokens
    validation = static + act_bytes * weights * fsdp + kv_cache + 2 * N * V * 4
    held = sum(rows[k] for k in ("parameters", "frozen", "reference", "value"))
    setup = 2 * 4 * max(p_block, V * d) if fsdp else held
    return {"validation": validation, "setup": setup}


def plan_settings(cfg):
    """(parallel, activation_checkpointing, frozen dtype) of a config: what the memory plan depends on."""
    return cfg.training.parallel, cfg.training.activation_checkpointing, cfg.model.dtype


def is_local_path(value):
    """Whether a config value names a path on this machine: not empty, auto, builtin:, runs:/ or any other scheme://
    URI."""
    return bool(value) and value != "auto" and not value.startswith(("builtin:", "runs:/")) and "://" not in value


def expected_paths(cfg, use_micro):
    """[(key, path, exists)] for the config's paths that must be on this machine."""
    kind = PIPELINE_TYPES[cfg.experiment.pipeline]
    model = cfg.model if not use_micro else dataclasses.replace(cfg.model, path="", tokenizer="")
    keys = {"model.path": model.path, "model.tokenizer": model.tokenizer,
            "model.init_from": cfg.model.init_from if kind.start_from_init(cfg) else "",
            # a pipeline with a value model that it does not train itself takes it from a trained critic
            "critic.checkpoint": cfg.critic.checkpoint if kind.value_head and not kind.trains_value_model else "",
            "critic.model": cfg.critic.model if kind.value_head and cfg.critic.model not in
            ("policy", "copy") else "",  # policy and copy name no directory
            "reference.path": cfg.reference.path if kind.holds_reference else "",
            "dataset.train": cfg.dataset.train, "dataset.validation": cfg.dataset.validation}
    return [(key, path, Path(path).exists()) for key, path in keys.items() if is_local_path(path)]


def config_plans(cfg, world, use_micro):
    """(what was planned, {checkpointing off/on: memory_plan on CUDA, "cpu": the configured one in fp32 on the
    CPU}) for the config on `world` processes, or (why not, {})."""
    m, t, pipeline = cfg.model, cfg.training, cfg.experiment.pipeline
    kind = PIPELINE_TYPES[pipeline]
    parallel, _, frozen_dtype = plan_settings(cfg)
    if use_micro or not m.path:
        args = micro_args(cfg, ByteTokenizer.vocab_size)
    elif not Path(m.path).is_dir():
        return f"model.path {m.path} is not on this machine: its params.json or config.json gives the shape", {}
    else:
        args = pretrained_args(m.path, m.n_future_tokens)
    ref = cfg.reference.path
    reference = pretrained_args(ref, 1) if kind.holds_reference and is_local_path(ref) and Path(ref).is_dir() else None
    kw = dict(pipeline=pipeline, lora_rank=m.lora.rank, parallel=parallel, world=world, frozen_dtype=frozen_dtype,
              batch_size=t.batch_size, seq_len=cfg.dataset.max_length, memory_efficient_loss=m.memory_efficient_loss,
              grad_accum=t.gradient_accumulation_steps, reference=reference, eval_batch_size=cfg.eval.batch_size,
              eval_length=cfg.dataset.max_length + cfg.eval.max_new_tokens)
    if kind.separate_value_model(cfg):
        value = value_model_shape(cfg.critic.model, args)
        if value is None:
            return (f"critic.model {cfg.critic.model} is not on this machine: its config gives the value model's "
                    "shape"), {}
        if not kind.trains_value_model:
            kw["value"] = value
        else:  # the critic holds the value model alone: trained as a policy of its shape (LoRA, full) or frozen
            c = cfg.critic
            args, kw["pipeline"] = value, pipeline if c.trunk == "frozen" else None
            kw["lora_rank"] = c.lora.rank if c.trunk == "lora" else 0
    what = (f"{pipeline}, {args.n_layers} blocks ({args.n_future_tokens} heads), d={args.dim}, V={args.vocab_size}, "
            f"{sum(parameter_counts(args, pipeline, m.lora.rank)) / 1e6:,.1f}M parameters, "
            + (f"LoRA r={kw['lora_rank']}, " if kw["lora_rank"] else "")
            + f"{parallel} x {world}, frozen {frozen_dtype}, "
            f"batch {t.batch_size} x {cfg.dataset.max_length} tokens, CUDA bf16 autocast")
    if kw.get("value"):
        what += f"; a separate value model of {sum(parameter_counts(kw['value'], None, 0)) / 1e6:,.1f}M, frozen"
    plans = {ac: memory_plan(args, activation_checkpointing=ac, **kw) for ac in (False, True)}
    plans["cpu"] = memory_plan(args, activation_checkpointing=cfg.training.activation_checkpointing, device="cpu", **kw)
    return what, plans


def dry_run_report(cfg, world, world_from, use_micro, gpu_gb):
    """The --dry-run lines after the merged config, as YAML comments (the output stays the config): the memory plan
    per GPU in GiB, whether it fits gpu_gb GiB (less 10 % for the CUDA context, NCCL buffers and allocator
    fragmentation), and the paths the config reads."""
    what, plans = config_plans(cfg, world, use_micro)
    lines = [f"launch: {world} process(es) ({world_from})", f"memory plan per GPU: {what}"]
    if plans:
        checkpointing = plan_settings(cfg)[1]
        unit, scale = ("GiB", 2**30) if plans[False]["peak"] >= 2**30 else ("MiB", 2**20)
        lines.append(f"{unit:<44}{'checkpointing off':>18}{'on':>8}")
        for key, label in PLAN_ROWS.items():
            if plans[False][key] or plans[True][key]:
                lines.append(f"  {label:<42}{plans[False][key] / scale:>18.2f}{plans[True][key] / scale:>8.2f}")
        cpu = plans["cpu"]
        lines.append(f"on the CPU instead (fp32, no autocast; host RAM per process, + {TORCH_ITSELF / 2**30:.1f} "
                     f"GiB for Python and torch): peak {cpu['peak'] / 2**30:.2f} GiB, validation "
                     f"{cpu['validation'] / 2**30:.2f} GiB")
        if gpu_gb:  # the larger GPU phase: training's peak or validation
            fits = {ac: max(p["peak"], p["validation"]) <= 0.9 * gpu_gb * 2**30 for ac, p in plans.items()}
            verdict, on_off = {True: "fits", False: "does NOT fit"}, {True: "on", False: "off"}
            lines.append(f"--gpu-memory-gb {gpu_gb:g}: {verdict[fits[checkpointing]]} as configured (activation "
                         f"checkpointing {on_off[checkpointing]}); with it {on_off[not checkpointing]}: "
                         f"{verdict[fits[not checkpointing]]}")
    paths = expected_paths(cfg, use_micro)
    lines.append("paths this config reads:" if paths else "paths this config reads: none (builtin data, micro model)")
    lines += [f"  {key:<19} {path}  {'found' if ok else 'MISSING on this machine'}" for key, path, ok in paths]
    return "\n".join(f"# {line}" for line in lines)
