"""The memory plan (weighted_mtp.memory_plan) against measured peaks, against numbers worked by hand, and the
plan, launch size and paths that `train --dry-run` prints.

How a peak is measured (CPU): torch.profiler with profile_memory records every allocation and free of the CPU
tensor allocator with the running total since the profile started; the profile spans the whole worker (process
group, wm.prepare, DDP or FSDP wrapping, two optimizer steps), so its maximum is the peak of tensor bytes alive at
once, everything included. (RSS counts allocator caches and the Python heap, tracemalloc sees no tensor memory.)
The FSDP2 and per-block activation-checkpointing wrapping is done here the way torchtitan does it, since this
branch's trainer has neither yet.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from wmtp.config import PIPELINES, load_config
from wmtp.model import MTPTransformer, ModelArgs, apply_lora
from wmtp.pretrained import ByteTokenizer, micro_args
from wmtp.pipelines import PIPELINE_TYPES
from wmtp import memplan
from wmtp.memplan import block_shape, memory_plan, parameter_counts
from wmtp.pretrained import pretrained_args
from conftest import main_in_process

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30

MEASURE = textwrap.dedent("""
    import json, os, socket, sys, tempfile
    from pathlib import Path
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    import torch._dynamo  # torch.optim imports it on first use (2 s): once here, not in every rank (no tensor in it)
    sys.path.insert(0, sys.argv[1])
    import weighted_mtp as wm
    from wmtp.config import load_config
    from wmtp.parallel import Meter, setup_distributed


    def measure(rank, nproc, port, out, config, overrides, parallel, checkpointing, B, T):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))  # what torchrun gives a worker
        cfg = load_config(config, overrides)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            rank, world, device, _ = setup_distributed(120)
            s = wm.prepare(cfg, use_micro=True, rank=rank, world=world, device=device)
            model, s.optimizer = s.model, None  # the optimizer is built again after wrapping
            if checkpointing:
                from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
                for blocks in (model.layers, model.extra_heads):
                    for i, block in enumerate(blocks):
                        blocks[i] = checkpoint_wrapper(block)
            if parallel == "fsdp":
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard
                mesh = init_device_mesh("cpu", (world,))
                for block in [*model.layers, *model.extra_heads]:
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
            elif world > 1:
                model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-4, fused=parallel == "ddp")
            tokens = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(rank))
            labels = tokens.clone()
            labels[:, :T // 4] = -100
            batch, meter = (tokens, labels, (torch.arange(B) % 2).float()), Meter(device)
            for step in range(2):  # the second step has the optimizer state
                for _ in range(cfg.training.gradient_accumulation_steps):
                    s.pipeline.loss(model, batch, meter, 100).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(tmp + "/trace.json")
            events = json.loads(Path(tmp + "/trace.json").read_text())["traceEvents"]
        peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
        Path(out).joinpath(f"rank{rank}.json").write_text(json.dumps({"peak": peak}))
        dist.destroy_process_group()


    # each case's ranks are processes forked from this one, which imported the modules and measured nothing
    for nproc, *case in json.loads(sys.argv[2]):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(measure, (nproc, port, *case), nprocs=nproc, start_method="fork")
""")

# (pipeline, processes, parallel, activation checkpointing, overrides): micro model, batch 4 x 64 tokens
MEASURED = {
    "baseline-ddp-2": ("baseline", 2, "ddp", False, []),
    "baseline-fsdp-2": ("baseline", 2, "fsdp", False, []),
    "baseline-fsdp-2-checkpointing": ("baseline", 2, "fsdp", True, []),
    "rho1-lora-accum-1": ("rho1", 1, "ddp", False, ["model.lora.rank=4", "training.gradient_accumulation_steps=2"]),
}
B, T = 4, 64


def measured_config(case):
    """(config path, overrides) of a MEASURED case."""
    pipeline, extra = MEASURED[case][0], MEASURED[case][4]
    return str(ROOT / "configs" / pipeline / f"{pipeline}_local.yaml"), [
        "mlflow.enable_logging=false", "critic.checkpoint=", "reference.path=", "model.init_from=",
        f"training.batch_size={B}", "data_sampling.n_samples=64", *extra]


@pytest.fixture(scope="module")
def measurements(tmp_path_factory):
    """Every MEASURED case, measured by MEASURE in one interpreter: (its CompletedProcess, the folder holding each
    case's rank<r>.json). Each rank is a process of its own, forked for that case alone from one that imported torch
    and the trainer and ran nothing: its profile starts where a torchrun worker's did, after the same imports, so its
    peak is still one process's own, with no allocator state or cache of another case in it. A torchrun launch per
    case cost its agent and its interpreters' imports, none of it inside a profile."""
    tmp = tmp_path_factory.mktemp("memplan")
    cases = [[MEASURED[case][1], str(tmp / case), *measured_config(case), *MEASURED[case][2:4], B, T]
             for case in MEASURED]
    for case in MEASURED:
        (tmp / case).mkdir()
    (tmp / "measure.py").write_text(MEASURE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KINETO_LOG_LEVEL": "99"}
    r = subprocess.run([sys.executable, str(tmp / "measure.py"), str(ROOT), json.dumps(cases)], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=600)
    return r, tmp


@pytest.mark.parametrize("case", MEASURED)
def test_plan_is_within_25_percent_of_the_measured_peak(case, measurements):
    pipeline, nproc, parallel, checkpointing, _ = MEASURED[case]
    r, out = measurements
    assert r.returncode == 0, r.stderr[-3000:]
    config, overrides = measured_config(case)
    cfg = load_config(config, overrides)
    plan = memory_plan(micro_args(cfg, ByteTokenizer.vocab_size), pipeline, cfg.model.lora.rank, parallel,
                          nproc, batch_size=B, seq_len=T, activation_checkpointing=checkpointing,
                          grad_accum=cfg.training.gradient_accumulation_steps, device="cpu")
    for rank in range(nproc):
        measured = json.loads((out / case / f"rank{rank}.json").read_text())["peak"]
        assert abs(plan["peak"] / measured - 1) <= 0.25, (rank, plan, measured)


def test_fsdp_plan_halves_the_weight_rows_and_adds_the_gathered_working_set():
    args = ModelArgs(dim=128, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=259, multiple_of=32,
                        n_future_tokens=4)
    ddp, fsdp = (memory_plan(args, parallel=p, world=2, device="cpu") for p in ("ddp", "fsdp"))
    for row in ("parameters", "gradients", "optimizer"):
        assert fsdp[row] * 2 == ddp[row]
    assert ddp["buckets"] == ddp["gradients"] and fsdp["buckets"] == 0
    p_block = 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 352 + 2 * 128
    root = 2 * 259 * 128
    assert fsdp["gathered"] == (4 + 4) * (root + 2 * p_block) and ddp["gathered"] == 0


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("lora", [0, 4])
def test_parameter_counts_equal_the_models_own(pipeline, lora):
    """The formula against the modules themselves, built on the meta device, with the pipeline's freezing."""
    args = ModelArgs(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32,
                        n_future_tokens=3)
    with torch.device("meta"):
        model = MTPTransformer(args, value_head=PIPELINE_TYPES[pipeline].value_head)
        if lora:
            apply_lora(model, lora, 16.0)
    if pipeline == "critic":
        model.requires_grad_(False)
        model.value_head.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert parameter_counts(args, pipeline, lora) == (trainable, frozen)


LLAMA_7B_MTP = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, n_future_tokens=4)


def test_7b_rows_worked_by_hand():
    """Meta's 7B_1T_4 (LLaMA-2 7B shape, FFN 11008), 4 GPUs, batch 4 x 2048 tokens, bf16 autocast."""
    block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # wq wk wv wo, w1 w2 w3, two norms
    assert block == 202_383_360
    total = 32 * block + 2 * 32000 * 4096 + 4096  # + embedding, output, final norm
    assert total == 6_738_415_616  # LLaMA-2 7B's 6.74B
    adapters = 32 * 16 * (4 * 2 * 4096 + 3 * (4096 + 11008))  # r·(in + out) of wq wk wv wo, w1 w2 w3
    N = 4 * 2048

    fsdp = memory_plan(LLAMA_7B_MTP, parallel="fsdp", world=4, batch_size=4, seq_len=2048)
    assert fsdp["parameters"] == fsdp["gradients"] == 4 * total // 4
    assert fsdp["optimizer"] == 8 * total // 4 and fsdp["frozen"] == fsdp["buckets"] == fsdp["copies"] == 0
    root = 2 * 32000 * 4096
    assert fsdp["gathered"] == (2 + 4) * (root + 2 * block)  # bf16 params, fp32 grads
    # bf16 block activations per token: fp32 x, x̂, h, ĥ (16d) + bf16 (4d + 2·d_kv + 4f)
    s = 16 * 4096 + 2 * (4 * 4096 + 2 * 4096 + 4 * 11008)
    assert s == 202_752
    assert fsdp["activations"] == 32 * s * N + 4 * 4096 * N
    assert fsdp["logits"] == (12 + 2) * N * 32000
    assert fsdp["peak"] == 4 * total // 4 + 8 * total // 4 + fsdp["activations"] + fsdp["logits"] + fsdp["gathered"]
    fsdp_ckpt = memory_plan(LLAMA_7B_MTP, parallel="fsdp", world=4, batch_size=4, seq_len=2048,
                               activation_checkpointing=True)
    assert fsdp_ckpt["activations"] == 33 * 4 * 4096 * N + s * N

    lora = memory_plan(LLAMA_7B_MTP, lora_rank=16, world=4, batch_size=4, seq_len=2048)
    assert lora["parameters"] == 4 * adapters and lora["buckets"] == 4 * adapters and lora["frozen"] == 4 * total
    assert lora["copies"] == 2 * 32 * block  # bf16 copies of the fp32 base weights, saved for backward
    s_lora = 8 * 4096 + 2 * (4 * 4096 + 2 * 4096 + 4 * 11008 + 7 * 16)  # norm weights frozen: no x̂, ĥ
    assert lora["activations"] == 32 * s_lora * N + 4 * 4096 * N
    bf16 = memory_plan(LLAMA_7B_MTP, lora_rank=16, world=4, frozen_dtype="bfloat16", batch_size=4, seq_len=2048)
    assert bf16["frozen"] == 2 * total and bf16["copies"] == 0


def write_meta_dir(path, **params):
    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(params))
    return path


def dry_run(*args, env=None):
    """`train ... --dry-run` in this process (its real process: test_config.py's test_cli_dry_run_prints_...)."""
    return main_in_process("train", *args, "--dry-run", env=env, cwd=ROOT)


def test_dry_run_plans_a_7b_meta_dir_and_names_the_missing_paths(tmp_path):
    model = write_meta_dir(tmp_path / "7B_1T_4", dim=4096, n_layers=32, n_heads=32, vocab_size=32000,
                           multiple_of=256, norm_eps=1e-5, rope_theta=10000.0, n_future_tokens=4)  # no weights
    r = dry_run("--config", "configs/verifiable/verifiable.yaml", "--override", f"model.path={model}",
                "--override", "model.dtype=float32", "--nproc", "4", "--gpu-memory-gb", "80")
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["model"]["path"] == str(model)  # the plan is YAML comments: still the config
    lines = [line for line in r.stdout.splitlines() if line.startswith("#")]
    assert "# launch: 4 process(es) (--nproc)" in lines
    plan = memory_plan(LLAMA_7B_MTP, "verifiable", 16, "ddp", 4, batch_size=4, seq_len=2048, grad_accum=4)
    plan_ckpt = memory_plan(LLAMA_7B_MTP, "verifiable", 16, "ddp", 4, batch_size=4, seq_len=2048, grad_accum=4,
                               activation_checkpointing=True)
    peak = next(line for line in lines if line.startswith("#   peak")).split()
    assert peak[-2:] == [f"{plan['peak'] / GiB:.2f}", f"{plan_ckpt['peak'] / GiB:.2f}"]
    assert plan["peak"] > 0.9 * 80 * GiB > plan_ckpt["peak"]
    assert ("# --gpu-memory-gb 80: does NOT fit as configured (activation checkpointing off); with it on: fits"
            in lines)
    assert f"#   model.path          {model}  found" in lines
    assert "#   dataset.train       /mnt/wmtp/data/train.jsonl  MISSING on this machine" in lines
    shipped = dry_run("--config", "configs/verifiable/verifiable.yaml", "--override", f"model.path={model}",
                      "--nproc", "4", "--gpu-memory-gb", "80")  # its base in bf16 (model.dtype): it fits
    assert "# --gpu-memory-gb 80: fits as configured (activation checkpointing off); with it on: fits" in shipped.stdout


def test_dry_run_without_the_model_dir_says_so_and_takes_world_size_from_the_environment():
    r = dry_run("--config", "configs/baseline/baseline.yaml", env={"WORLD_SIZE": "8"})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("#")]
    assert lines[0] == "# launch: 8 process(es) (WORLD_SIZE)"
    assert lines[1].startswith("# memory plan per GPU: model.path /mnt/wmtp/model is not on this machine")
    assert "#   model.path          /mnt/wmtp/model  MISSING on this machine" in lines


def test_dry_run_reads_a_hugging_face_config_and_the_rho1_reference(tmp_path):
    """config.json alone (no safetensors) gives the shape; a next-token checkpoint becomes H heads (n − 1 trunk
    blocks + H), the reference stays one head, in its own shape."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
                                                "num_key_value_heads": 2, "vocab_size": 259,
                                                "intermediate_size": 100, "rms_norm_eps": 1e-6}))
    ref = write_meta_dir(tmp_path / "ref", dim=32, n_layers=2, n_heads=2, vocab_size=259, multiple_of=32)
    args = pretrained_args(hf, 4)
    assert (args.n_layers, args.n_future_tokens, args.n_kv_heads, block_shape(args)[2]) == (7, 4, 2, 100)
    r = dry_run("--config", "configs/rho1/rho1_local.yaml", "--override", f"model.path={hf}",
                "--override", f"reference.path={ref}", "--override", "dataset.train=/nonexistent/train.jsonl")
    assert r.returncode == 0, r.stderr
    reference = memory_plan(args, "rho1", reference=pretrained_args(ref, 1), batch_size=16, seq_len=256)["reference"]
    assert reference == 4 * (2 * (2 * 32 * 32 + 2 * 32 * 32 + 3 * 32 * 96 + 2 * 32) + 2 * 259 * 32 + 32)
    assert "# memory plan per GPU: rho1, 7 blocks (4 heads), d=64, V=259" in r.stdout
    assert f"#   reference.path      {ref}  found" in r.stdout
    assert "#   dataset.train       /nonexistent/train.jsonl  MISSING on this machine" in r.stdout


def test_dry_run_plans_a_cpu_run_and_reads_critic_model_copy_as_no_path():
    """critic_local.yaml's critic.model copy (and policy) name no directory: nothing MISSING. The CPU line is the
    configured plan in fp32 (memory_plan device=cpu): 4-byte activations, no bf16 copies."""
    r = dry_run("--config", "configs/critic/critic_local.yaml", "--use-micro-model")
    assert r.returncode == 0, r.stderr
    assert "critic.model" not in "".join(line for line in r.stdout.splitlines() if line.startswith("#  "))
    assert "MISSING" not in r.stdout
    cfg = load_config(ROOT / "configs/critic/critic_local.yaml")
    args = micro_args(cfg, ByteTokenizer.vocab_size)
    # the critic trains its separate value model alone: a frozen copy of the policy's trunk and head 0
    value = memplan.value_model_shape("copy", args)
    cpu = memory_plan(value, "critic", 0, "ddp", 1, batch_size=64, seq_len=256, device="cpu",
                      eval_batch_size=16, eval_length=256 + 32)
    cuda = memory_plan(value, "critic", 0, "ddp", 1, batch_size=64, seq_len=256, eval_batch_size=16,
                       eval_length=256 + 32)
    assert cpu["logits"] == cuda["logits"] == 2 * 4 * 64 * 256 * 259  # a forward-only loss: logits, log-softmax
    assert cpu["activations"] == (16 * 128 + 3 * 4 * 352) * 64 * 256 != cuda["activations"]  # fp32 matmul inputs
    assert (f"# on the CPU instead (fp32, no autocast; host RAM per process, + 0.4 GiB for Python and torch): peak "
            f"{cpu['peak'] / 2**30:.2f} GiB, validation {cpu['validation'] / 2**30:.2f} GiB") in r.stdout.splitlines()


def test_dry_run_of_a_bad_model_dir_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    r = dry_run("--config", "configs/baseline/baseline_local.yaml", "--override", f"model.path={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'config.json'}: missing 'num_attention_heads'"]


# ----------------------------------------------------------------------------------------- scripts/gpu_check.sh
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"


def gpu_check(tmp_path, *args, **env):
    return subprocess.run([str(GPU_CHECK), "--summary", str(tmp_path / "summary.txt"), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(tmp_path), **env})


def test_gpu_check_is_shellcheck_clean():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    r = subprocess.run(["shellcheck", str(GPU_CHECK)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert os.access(GPU_CHECK, os.X_OK)


def test_gpu_check_cpu_dry_runs_every_step(tmp_path):
    r = gpu_check(tmp_path, "--cpu-dry")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[1] for line in lines[1:-1]] == [
        "device", "step", "pipeline-baseline", "pipeline-critic", "pipeline-rho1", "pipeline-verifiable", "ddp",
        "ddp-replicas", "fsdp2", "trainer-fsdp", "bench-p6"]
    assert all(line.startswith(("PASS", "SKIP")) for line in lines[1:-1]) and lines[-1] == "ALL PASSED"
    assert "found_inf skip ok" in lines[2] and "2 replica(s) identical" in lines[8] and "(gloo)" in lines[9]
    assert lines[10].startswith("PASS trainer-fsdp")   # the trainer itself under FSDP2: run, never skipped
    assert [p.name for p in tmp_path.iterdir()] == ["summary.txt"]  # its work dir is gone


def test_gpu_check_stops_loudly_at_the_first_broken_step(tmp_path):
    """A venv whose python runs `-m weighted_mtp` as tests/faults.py: the trainer's rank 0 raises at step 2. The
    steps before it (device, step: `python -` programs, run for real by the dry run above) pass at once."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(
        '#!/bin/sh\nif [ "$1" = - ]; then echo "RESULT stand-in"; exit 0; fi\n'
        f'if [ "$1 $2" = "-m weighted_mtp" ]; then shift 2; set -- {ROOT / "tests" / "faults.py"} "$@"; fi\n'
        f'exec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    r = gpu_check(tmp_path, "--cpu-dry", WMTP_TEST_FAULT="0:2", WMTP_VENV=str(venv))
    assert r.returncode == 1
    lines = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in lines[1:3]] == [["PASS", "device"], ["PASS", "step"]]
    assert all(line.endswith("stand-in ") for line in lines[1:3])  # WMTP_VENV's python ran them
    assert lines[-1].startswith("FAIL pipeline-baseline (exit 1")
    assert "WMTP_TEST_FAULT: rank 0 fails once at step 2" in r.stderr
    assert "gpu_check.sh: step 'pipeline-baseline' failed (exit 1)" in r.stderr


def test_gpu_check_without_a_gpu_says_so(tmp_path):
    r = gpu_check(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 1 and "torch sees no CUDA device" in r.stderr
    r = gpu_check(tmp_path, "--bogus")
    assert r.returncode == 2 and "unknown argument '--bogus'" in r.stderr
