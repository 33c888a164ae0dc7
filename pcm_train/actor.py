"""The chunk-level GRPO actor update on a shrunk batch (only the kept chunks).

One optimizer step: micro-batches of trajectories (all their kept chunks in
one packed varlen forward), per-token PPO-clip loss normalized over the whole
batch, backward per micro-batch, gradient clipping, AdamW step. With the
``full`` strategy's index this is SimpleVLA-RL's update over every valid chunk.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from verl import DataProto

import pcm_kernels as pk
from pcm_train.config import ActorSection
from pcm_train.distributed import DistInfo, all_reduce_gradients, shard_by_trajectory
from pcm_train.grpo import policy_loss
from pcm_train.memory import SavedActivations, peak_memory_bytes, reset_peak_memory


@dataclass
class UpdateStats:
    """Measurements of one actor update."""

    update_time_s: float
    forward_time_s: float
    backward_time_s: float
    chunks: int
    tokens: int
    activation_bytes: int  # largest micro-batch: bytes saved for backward
    activation_bytes_total: int  # summed over micro-batches
    peak_memory_bytes: int
    grad_norm: float
    loss: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(policy: torch.nn.Module, cfg: ActorSection) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (LoRA adapters when LoRA is on)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("policy has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _micro_batches(traj_index: torch.Tensor, num_traj: int, per_micro: int):
    """Contiguous (start, end) row ranges covering ``per_micro`` trajectories each (rows are trajectory-major)."""
    bounds = torch.searchsorted(traj_index, torch.arange(0, num_traj + per_micro, per_micro,
                                                         device=traj_index.device).clamp(max=num_traj))
    bounds = bounds.tolist()
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def chunk_log_probs(policy, kept: DataProto, start: int, end: int, temperature: float) -> torch.Tensor:
    """float [end - start, A] log-probs of the kept rows' responses, one packed forward."""
    ids = kept.batch["input_ids"][start:end]
    attention = kept.batch["attention_mask"][start:end].bool()
    ids = ids.gather(1, torch.argsort((~attention).to(torch.int8), dim=1, stable=True))  # left- or right-padded
    lengths = attention.sum(-1)
    rows = ids.shape[0]
    prompts = pk.gather_chunks(ids.view(rows, 1, -1), torch.zeros(rows, 1, dtype=torch.int64, device=ids.device),
                               lengths.view(rows, 1))
    logits = policy.action_logits_packed(prompts.values, prompts.cu_seqlens, kept.batch["pixel_values"][start:end])
    return policy.log_probs(logits, kept.batch["responses"][start:end], temperature)


@dataclass
class _Accumulated:
    forward_s: float = 0.0
    backward_s: float = 0.0
    activation_peak: int = 0
    activation_total: int = 0
    loss: float = 0.0


def accumulate_gradients(policy: torch.nn.Module, kept: DataProto, cfg: ActorSection,
                         log_probs_out: torch.Tensor | None = None) -> tuple[_Accumulated, dict]:
    """Forward and backward over the kept chunks in micro-batches of trajectories; grads accumulate.

    Each micro-batch's loss is its share of the full-batch loss (normalized by
    ``kept.meta_info["traj_token_counts"]``), so the accumulated gradients equal one backward
    over all kept chunks. ``log_probs_out`` float [M, A], if given, receives the new log-probs.
    """
    device = kept.batch["responses"].device
    num_traj = int(kept.meta_info["num_traj"])
    traj_index = kept.batch["traj_index"]
    mask = kept.batch["response_mask"]
    acc = _Accumulated()
    metrics_sum: dict[str, float] = {}
    policy.train()
    for start, end in _micro_batches(traj_index, num_traj, cfg.micro_batch_trajectories):
        micro_mask = mask[start:end]
        if not bool(micro_mask.any()):
            continue
        t0 = time.perf_counter()
        with SavedActivations(policy) as saved:
            log_prob = chunk_log_probs(policy, kept, start, end, cfg.temperature)
            loss, metrics = policy_loss(
                log_prob[micro_mask], kept.batch["old_log_probs"][start:end][micro_mask],
                kept.batch["advantages"][start:end][micro_mask],
                traj_index[start:end].unsqueeze(-1).expand_as(micro_mask)[micro_mask], num_traj,
                cfg.clip_ratio_low, cfg.clip_ratio_high, traj_token_counts=kept.meta_info["traj_token_counts"],
                clip_ratio_c=cfg.clip_ratio_c, loss_agg_mode=cfg.loss_agg_mode)
        _sync(device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(device)
        acc.forward_s += t1 - t0
        acc.backward_s += time.perf_counter() - t1
        acc.activation_peak = max(acc.activation_peak, saved.bytes)
        acc.activation_total += saved.bytes
        acc.loss += float(loss.detach())
        if log_probs_out is not None:
            log_probs_out[start:end] = log_prob.detach()
        weight = int(micro_mask.sum())
        for key, value in metrics.items():
            metrics_sum[key] = metrics_sum.get(key, 0.0) + value * weight
    tokens = max(int(mask.sum()), 1)
    metrics = {k: v / tokens for k, v in metrics_sum.items()}
    metrics["actor/pg_loss"] = acc.loss
    return acc, metrics


def update_actor(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, kept: DataProto,
                 cfg: ActorSection, dist_info: DistInfo | None = None) -> tuple[UpdateStats, dict, torch.Tensor]:
    """One optimizer step per PPO epoch on the kept chunks (``shrink_batch`` output).

    With ``dist_info`` of K ranks (every rank passing the same ``kept``), each rank trains its share
    of the trajectories and the gradients are summed, so K ranks make the single-process update.
    Returns (stats of this rank's share, loss metrics averaged over epochs, new log-probs float
    [N, C * A] of the last epoch in SimpleVLA-RL's layout: scattered back from the kept chunks,
    zeros elsewhere, complete on every rank).
    """
    info = dist_info or DistInfo()
    full = kept
    kept = shard_by_trajectory(full, info.rank, info.world_size)
    device = kept.batch["responses"].device
    mask = kept.batch["response_mask"]
    reset_peak_memory(device)
    _sync(device)
    started = time.perf_counter()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    new_log_probs = torch.zeros(mask.shape, dtype=torch.float32, device=device)
    totals = _Accumulated()
    metrics: dict[str, float] = {}
    grad_norm = torch.zeros(())
    for _ in range(cfg.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        acc, epoch_metrics = accumulate_gradients(policy, kept, cfg, new_log_probs)
        if info.enabled:
            all_reduce_gradients(trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        totals.forward_s += acc.forward_s
        totals.backward_s += acc.backward_s
        totals.activation_peak = max(totals.activation_peak, acc.activation_peak)
        totals.activation_total = acc.activation_total
        totals.loss += acc.loss / cfg.ppo_epochs
        for key, value in epoch_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value / cfg.ppo_epochs
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    stats = UpdateStats(
        update_time_s=time.perf_counter() - started, forward_time_s=totals.forward_s,
        backward_time_s=totals.backward_s, chunks=int(mask.shape[0]), tokens=int(mask.sum()),
        activation_bytes=totals.activation_peak, activation_bytes_total=totals.activation_total,
        peak_memory_bytes=peak_memory_bytes(device), grad_norm=float(grad_norm), loss=totals.loss)
    rows = full.meta_info["rows"]
    if info.enabled:
        every_row = torch.zeros(full.batch["response_mask"].shape, dtype=torch.float32, device=device)
        every_row[kept.meta_info["rows_in_full_batch"]] = new_log_probs
        torch.distributed.all_reduce(every_row)
        new_log_probs = every_row
    dense = pk.scatter_chunks(new_log_probs, rows).reshape(rows.num_trajectories, -1)
    return stats, metrics, dense
