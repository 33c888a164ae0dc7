"""Data-parallel actor updates across ``torchrun`` processes.

For every PPO mini-batch each rank forwards and backwards its share of the
mini-batch's trajectories (whole trajectories, so micro-batches stay per
trajectory); the loss of every token is already normalized over the whole
mini-batch, so summing the ranks' gradients with one all-reduce before each
optimizer step gives exactly the single-process update.
Every rank then clips and steps the same gradients, keeping the weights in sync
without a DDP wrapper (LoRA trains a few MB of adapters; the frozen base is
never communicated). Every rank rolls out its share of a step's episodes
(``rank_share``) with its own env workers; rank 0 gathers the batch (``gather_batch``:
tensors by ``dist.send``/``recv``, no pickling), computes advantages and the chunk selection
once, and broadcasts the shrunk batch (``broadcast_batch``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the ``torchrun`` process group (NCCL with CUDA, gloo otherwise); a no-op in a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():  # before the process group: NCCL binds each rank to its device
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if torch.cuda.is_available():
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group(backend="gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def all_reduce_gradients(parameters) -> None:
    """Sum every trainable parameter's gradient over the ranks (one flat all-reduce)."""
    params = [p for p in parameters if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def broadcast_batch(batch, info: DistInfo, device: torch.device, src: int = 0):
    """Rank ``src``'s ``verl.DataProto`` on every rank, its tensors on ``device``.

    The batch tensors (pixels: the bulk of a rollout batch) travel by ``dist.broadcast`` on
    ``device`` with no pickling; only their shapes and dtypes, ``meta_info`` (on the CPU) and the
    non-tensor entries are pickled. Other ranks pass ``batch=None``.
    """
    from verl import DataProto

    if not info.enabled:
        return batch
    header = None
    if info.rank == src:
        header = {"specs": {key: (tuple(t.shape), t.dtype) for key, t in batch.batch.items()},
                  "meta_info": tensors_to(batch.meta_info, torch.device("cpu")),
                  "non_tensor": dict(batch.non_tensor_batch)}
    header = broadcast_object(header, info, src)
    tensors = {}
    for key, (shape, dtype) in header["specs"].items():
        if info.rank == src:
            tensor = batch.batch[key].to(device).contiguous()
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(_wire(tensor), src=src)
        tensors[key] = tensor
    return DataProto.from_dict(tensors=tensors, non_tensors=header["non_tensor"] or None,
                               meta_info=tensors_to(header["meta_info"], device))


def tensors_to(obj, device: torch.device):
    """``obj`` with every tensor inside (dicts, lists, tuples, dataclasses) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {key: tensors_to(value, device) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tensors_to(value, device) for value in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: tensors_to(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def gather_object(obj, info: DistInfo, dst: int = 0) -> list | None:
    """Every rank's ``obj`` in rank order on rank ``dst`` (pickled, on the CPU), None on the others;
    ``[obj]`` in a single process."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size if info.rank == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """``obj`` from rank ``src`` on every rank (tensors travel through pickling, on the CPU)."""
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def rank_share(count: int, info: DistInfo) -> range:
    """This rank's contiguous block of ``count`` items (the first ``count % world_size`` ranks take one
    more); rank by rank the blocks cover 0 .. count - 1 in order."""
    base, extra = divmod(count, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return range(start, start + base + (info.rank < extra))


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on any."""
    if not info.enabled:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_batch(batch, info: DistInfo, device: torch.device, dst: int = 0):
    """Every rank's ``verl.DataProto`` (rows of equal layout, possibly none) concatenated in rank order on
    rank ``dst``, its tensors on ``device``; None on the other ranks.

    The tensors travel by ``dist.send``/``dist.recv`` on ``device`` with no pickling; only their shapes
    and dtypes and the non-tensor entries are pickled (``gather_object``). ``meta_info`` is ``dst``'s own.
    """
    from verl import DataProto

    if not info.enabled:
        return batch.to(device)
    header = {"specs": {key: (tuple(t.shape), t.dtype) for key, t in batch.batch.items()},
              "non_tensor": dict(batch.non_tensor_batch)}
    headers = [None] * info.world_size if info.rank == dst else None
    dist.gather_object(header, headers, dst=dst)
    if info.rank != dst:
        for key in header["specs"]:
            dist.send(_wire(batch.batch[key].to(device).contiguous()), dst=dst)
        return None
    parts = []
    for rank, specs in enumerate(headers):
        tensors = {}
        for key, (shape, dtype) in specs["specs"].items():
            if rank == dst:
                tensors[key] = batch.batch[key].to(device)
                continue
            tensor = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(_wire(tensor), src=rank)
            tensors[key] = tensor
        parts.append(DataProto.from_dict(tensors=tensors, non_tensors=specs["non_tensor"] or None))
    gathered = DataProto.concat(parts)
    gathered.meta_info = dict(batch.meta_info)
    return gathered


def _wire(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes every backend can move (bool tensors as uint8)."""
    return tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor
