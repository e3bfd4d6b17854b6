"""
Processes and devices: the process group, collectives, the Meter that averages metrics over ranks, DDP wrapping,
autocast, and FSDP2 (training.parallel: fsdp): every transformer block and the root sharded over the ranks, with
full (gathered into rank 0's one file) or sharded (torch.distributed.checkpoint directory) model state.
"""
import contextlib
import datetime
import logging
import math
import os
import signal

import s3ckpt
import torch
import torch.distributed as dist
import torch.nn as nn

from wmtp.config import UserError
from wmtp.model import LoRALinear

log = logging.getLogger("weighted_mtp")


def setup_distributed(timeout_s):
    """(rank, world, device, owned). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python -m` is rank 0 of 1. A
    process group the caller already initialized (a launcher's, a notebook's, several trainings in one process) is
    used as it is and stays the caller's to destroy; owned: this call made the group (end_distributed destroys it)."""
    owned = not dist.is_initialized()
    if "RANK" not in os.environ and owned:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"), owned
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if owned:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device, owned


def end_distributed(owned):
    """Destroys the process group if the run's setup_distributed made it (its `owned`), so a caller's group outlives
    the training, evaluation or sampling run in it."""
    if owned and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t, op=None):
    """t reduced over every rank in place (SUM unless op says otherwise) and returned; t itself on one process."""
    if dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def broadcast(obj):
    """Rank 0's Python object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj, group=None):
    """[every rank's Python object obj], in rank order ([obj] without a process group)."""
    if not dist.is_initialized():
        return [obj]
    box = [None] * dist.get_world_size(group)
    dist.all_gather_object(box, obj, group=group)
    return box


class Meter:
    """Token-weighted means across micro-batches and ranks: sums of (value·count, count) stay on the device, one
    all-reduce at log time turns them into means; mins and maxes reduce with MIN/MAX."""

    def __init__(self, device):
        self.device, self.sums, self.mins, self.maxs = device, {}, {}, {}

    def add(self, name, total, count):
        """Adds (total, count) to name's running sums: its logged value is sum(total) / sum(count) over steps and ranks.
        """
        pair = torch.stack([torch.as_tensor(total, dtype=torch.float32, device=self.device).detach().reshape(()),
                            torch.as_tensor(count, dtype=torch.float32, device=self.device).reshape(())])
        self.sums[name] = self.sums[name] + pair if name in self.sums else pair

    def extreme(self, name, value, fn):
        """Keeps fn(kept, value) under name (fn torch.minimum or torch.maximum): logged as the min or max over ranks."""
        table = self.mins if fn is torch.minimum else self.maxs
        value = value.detach().float().reshape(())
        table[name] = fn(table[name], value) if name in table else value

    def merge(self, other, keep):
        """Adds other's sums and extremes where keep (a 0/1 device tensor) is 1; where it is 0 they count as nothing."""
        for name, pair in other.sums.items():
            kept = torch.nan_to_num(pair) * keep
            self.add(name, kept[0], kept[1])
        for table, fn, nothing in ((other.mins, torch.minimum, math.inf), (other.maxs, torch.maximum, -math.inf)):
            for name, value in table.items():
                self.extreme(name, torch.where(keep > 0, value, nothing), fn)

    def reduce(self):
        """{name: sum(total) / sum(count)} and the extremes, over every rank (every rank must call it); then empties the
        meter. Names with a zero count, or no finite extreme, are left out."""
        out = {}
        if self.sums:
            names = sorted(self.sums)
            sums = all_reduce(torch.stack([self.sums[n] for n in names]))
            out.update({n: total / count for n, (total, count) in zip(names, sums.tolist()) if count > 0})
        for table, op in ((self.mins, dist.ReduceOp.MIN), (self.maxs, dist.ReduceOp.MAX)):
            if table:
                names = sorted(table)
                values = all_reduce(torch.stack([table[n] for n in names]), op)
                out.update({n: v for n, v in zip(names, values.tolist()) if math.isfinite(v)})
        self.sums, self.mins, self.maxs = {}, {}, {}
        return out


def transformer_blocks(model):
    """The blocks of the trunk and the heads (a separate value model's trunk's), the units FSDP shards and activation
    checkpointing recomputes one at a time."""
    model = getattr(model, "trunk", model)  # a separate value model: its trunk's blocks
    return [*model.layers, *model.extra_heads]


def shard(model, device, world):
    """fully_shard each block (trunk and heads), then the root (embedding, norm, output, value head): parameters
    become dim-0 shards (DTensors) on `device`, gathered per block just before its forward and backward and freed
    after. On CUDA blocks compute in bf16 and gradients are reduced in fp32; on the CPU everything stays fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (world,))  # explicit: the default mesh would pick an accelerator
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def shard_rows(rows, rank, world):
    """[start, stop) of rank's dim-0 shard of `rows` rows as FSDP2 cuts them (torch.chunk): ceil(rows / world)
    each, the last ranks' possibly fewer or none."""
    size = -(-rows // world)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def local_rows(p, full):
    """(p's local tensor, the rows of `full` it holds): a sharded parameter's own rows, else all of them."""
    if not hasattr(p, "to_local"):
        return p, full
    start, stop = shard_rows(full.shape[0], p.device_mesh.get_local_rank(), p.device_mesh.size())
    return p.to_local(), full[start:stop]


def fill_shards(model, groups, source):
    """Copies this rank's rows of each full tensor of `groups` (dicts {name: tensor}) into the model's parameters,
    cast to theirs: each rank reads only its own rows of a memory-mapped file, so the file is read once per node in
    all and whole by no rank. -> the names filled; a name the model lacks or another shape is a UserError."""
    params, filled = dict(model.named_parameters()), set()
    with torch.no_grad():
        for group in groups:
            for name, full in group.items():
                p = params.get(name)
                if p is None or tuple(p.shape) != tuple(full.shape):
                    raise UserError(f"{source}: {name} {tuple(full.shape)} does not fit the model "
                                    f"({'no such parameter' if p is None else tuple(p.shape)})")
                local, rows = local_rows(p, full)
                local.copy_(rows)
                filled.add(name)
            group.clear()  # before the next group is made or read: one alive at a time
            full = rows = None
    return filled


def shard_from_meta(model, device, world, sources):
    """A model built on the meta device, sharded (shard()), its shards alone allocated on `device`, then filled from
    `sources` [(what, groups)] in order (a later source overwrites an earlier one's tensors: a checkpoint over the
    initial weights). No rank ever holds a whole model: what it holds beyond its shards is one group (≤ a block)."""
    shard(model, device, world)
    model.to_empty(device=device)
    filled = set()
    for what, groups in sources:
        filled |= fill_shards(model, groups, what)
    missing = [n for n, _ in model.named_parameters() if n not in filled]
    if missing:
        raise UserError(f"{sources[-1][0]}: no weights for {missing[:3]}")
    return model


def is_sharded(model):
    """True when model is an FSDP2 module (its parameters are DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """Whole parameters on every rank for the duration (validation, greedy decoding): forwards need no collective
    then, so ranks may run different numbers of them (uneven validation shares, decodes that stop early)."""
    units = [m for m in model.modules() if is_sharded(m)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # the root keeps its params for backward
            unit.reshard()


def trainable_names(model):
    """Names of the optimizer's parameters, in the order `prepare` hands them to it."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def by_index(state, names):
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) -> keyed by index, as
    optimizer.state_dict() is: a full checkpoint is then the same file whether DDP or FSDP wrote it."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def by_name(state, names):
    """The inverse of by_index: an optimizer state keyed by parameter index -> keyed by name."""
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def full_state(model, optimizer):
    """(weights, partial, optimizer state) of a full checkpoint; see model_state. Sharded, every rank must call it:
    the whole tensors are gathered to rank 0's CPU one at a time, the other ranks get empty dicts."""
    if not is_sharded(model):
        return (*model_state(model), optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    partial = adapters_only(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=partial)
    weights = get_model_state_dict(model, options=options)
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    return weights, partial, by_index(optim, trainable_names(model)) if optim else {}


def load_optimizer(model, optimizer, state):
    """A full checkpoint's optimizer state into the optimizer; sharded, every rank keeps its slice of each tensor."""
    if not is_sharded(model):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, by_name(state, trainable_names(model)),
                             options=StateDictOptions(full_state_dict=True))


def load_optimizer_rows(model, optimizer, state):
    """A full checkpoint's AdamW state (keyed by parameter index, memory-mapped: checkpointing.read_checkpoint) into
    a sharded model's optimizer: of each moment only this rank's rows are read (then its pages released), into a
    tensor sharded as its parameter; steps and the groups' hyperparameters as saved."""
    params = [p for p in model.parameters() if p.requires_grad]  # trainable_names' order
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})
    with torch.no_grad():
        for index, saved in state["state"].items():
            p, entry = params[index], {}
            for key, value in saved.items():
                if key == "step" or not hasattr(p, "to_local"):
                    entry[key] = value.detach().clone().to(p.device)
                    continue
                entry[key] = torch.empty_like(p)
                local, rows = local_rows(entry[key], value)
                local.copy_(rows)
                s3ckpt.release_pages(value)
            optimizer.state[p] = entry


def sharded_state(model, optimizer):
    """{"model", "optimizer"}: this rank's shards (frozen weights left out, as in a LoRA run's full checkpoint), what
    torch.distributed.checkpoint saves and loads in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    return {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=adapters_only(model))),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(model, optimizer, path, group):
    """Starts writing this rank's shards into the directory `path`; returns a Future that completes once every
    rank's shards and the directory's metadata are on disk. The state is staged (copied) before it returns."""
    import torch.distributed.checkpoint as dcp
    saved = dcp.async_save(sharded_state(model, optimizer), checkpoint_id=str(path), process_group=group,
                           no_dist=not dist.is_initialized())
    return getattr(saved, "upload_completion", saved)  # newer versions answer an AsyncSaveResponse


def own_files(metadata, rank):
    """The files of a finished sharded save (its Future's Metadata) that `rank` wrote: DCP names each rank's
    __<rank>_<n>.distcp, and its coordinator, rank 0, writes .metadata."""
    names = {info.relative_path for info in metadata.storage_data.values()}
    return sorted(n for n in names if n.startswith(f"__{rank}_")) + ([".metadata"] if rank == 0 else [])


def files_to_read(model, optimizer, path):
    """The files of the sharded checkpoint directory `path` (its .metadata, at least, there) that load_sharded
    reads on this rank: DCP's load plan for this rank's shards names them (its own shards' files when the world is
    the one that saved, and, as every rank loads every replicated tensor, whichever rank's file holds each)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        planner = DefaultLoadPlanner()
        planner.set_up_planner(sharded_state(model, optimizer), metadata, is_coordinator=False)
        items = planner.create_local_plan().items
    except Exception as e:
        raise UserError(f"{path}: not a readable sharded checkpoint for this model ({type(e).__name__}: {e})")
    return sorted({metadata.storage_data[item.storage_index].relative_path for item in items})


def load_sharded(model, optimizer, path):
    """A sharded checkpoint directory into the model and the optimizer; any number of ranks may have written it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    state = sharded_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except Exception as e:
        raise UserError(f"{path}: not a readable sharded checkpoint for this model ({type(e).__name__}: {e})")
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def adapters_only(model):
    """True for a LoRA model: its checkpoints hold the trainable tensors only (the frozen base is model.path)."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def model_state(model):
    """(state, partial): LoRA runs save the trainable tensors only (the base is model.path), others the whole model."""
    if adapters_only(model):
        return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, True
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, False


def gradient_sync(model, last):
    """Gradients are reduced over the ranks in the last micro-batch's backward only: DDP's no_sync() before it,
    FSDP2's set_requires_gradient_sync (its reduce-scatter) likewise."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def autocast_for(device):
    """bf16 autocast on CUDA; fp32 (no autocast) on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def wrap_and_compile(model, compile, world):
    """The model the training step calls: DDP across processes (gradients all-reduced in backward; a model prepare()
    sharded is used as it is), then torch.compile when `compile` (model.compile) says so."""
    ddp = world > 1 and not is_sharded(model)
    wrapped = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if ddp else model
    return torch.compile(wrapped) if compile else wrapped


# ------------------------------------------------- preemption: a SIGTERM/SIGINT to the run's processes

class Preempted(Exception):
    """A SIGTERM/SIGINT stopped training at a step boundary after a resumable checkpoint was written."""

    def __init__(self, signum, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name}; resume from {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class StopSignal:
    """Remembers a SIGTERM/SIGINT (spot reclaim, Ctrl-C) so the loop can stop cleanly at the next step boundary;
    held through the end of the run, so torchrun's SIGTERM after a crash cannot cut the cleanup short."""

    def __enter__(self):
        self.received = 0
        self.previous = {signum: signal.signal(signum, self.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        # A second Ctrl-C means "now". A second SIGTERM does not: torchrun forwards the one every process of a
        # container already got, and SIGKILLs 30 s later anyway.
        """The SIGTERM/SIGINT handler: remembers the first signal in `received` (the loop stops at the step's end); a
        second SIGINT after a SIGINT raises KeyboardInterrupt."""
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum
        log.warning(f"{signal.Signals(signum).name} received: stopping at the end of this step")
