"""Data-parallel actor updates across ``torchrun`` processes.

For every PPO mini-batch each rank forwards and backwards its share of the
mini-batch's trajectories (whole trajectories, so micro-batches stay per
trajectory); the loss of every token is already normalized over the whole
mini-batch, so summing the ranks' gradients with one all-reduce before each
optimizer step gives exactly the single-process update.
Every rank then clips and steps the same gradients, keeping the weights in sync
without a DDP wrapper (LoRA trains a few MB of adapters; the frozen base is
never communicated). Rollouts and the controller run on rank 0 only, which
broadcasts the shrunk batch.
"""
from __future__ import annotations

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


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """``obj`` from rank ``src`` on every rank (tensors travel through pickling, on the CPU)."""
    if not info.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
