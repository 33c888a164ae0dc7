"""The chunk-level GRPO actor update on a shrunk batch (only the kept chunks).

One update = ``ppo_epochs`` passes over the rollout batch; each pass shuffles
the trajectories (seeded) and splits them into PPO mini-batches of
``mini_batch_trajectories`` (verl's ``ppo_mini_batch_size`` x ``rollout.n``);
each mini-batch is one optimizer step: micro-batches of trajectories (all
their kept chunks in one packed varlen forward), a per-token PPO-clip loss
normalized over the mini-batch (verl's ``agg_loss``), backward per
micro-batch, gradient clipping, an optimizer step. Every ratio is against the
rollout's log-probs, so from the second step on the update is off-policy and
the clip acts. With the ``full`` strategy's index this is SimpleVLA-RL's
``update_policy`` over every valid chunk.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from verl import DataProto

import pcm_kernels as pk
from pcm_train.config import ActorSection
from pcm_train.runtime.distributed import DistInfo, all_reduce_gradients
from pcm_train.algorithm.grpo import policy_loss
from pcm_train.runtime.memory import SavedActivations, peak_memory_bytes, reset_peak_memory


@dataclass
class UpdateStats:
    """Measurements of one actor update (this rank's share)."""

    update_time_s: float
    forward_time_s: float
    backward_time_s: float
    chunks: int
    tokens: int
    activation_bytes: int  # largest micro-batch: bytes saved for backward
    activation_bytes_total: int  # summed over the micro-batches of one epoch
    peak_memory_bytes: int
    grad_norm: float  # mean over optimizer steps, before clipping
    loss: float  # mean over optimizer steps
    optimizer_steps: int


def _sync(device: torch.device) -> None:
    """Waits for the work this thread queued on ``device`` (its current stream only: a rollout in the
    background, ``trainer.overlap``, runs on a stream of its own and is not waited for)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def make_optimizer(policy: torch.nn.Module, cfg: ActorSection) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (LoRA adapters when LoRA is on)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params:
        raise ValueError("policy has no trainable parameters")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def mini_batches(num_traj: int, mini_batch_trajectories: int | None, *, shuffle: bool,
                 generator: torch.Generator | None = None) -> list[list[int]]:
    """Trajectory ids of each PPO mini-batch of one epoch: a seeded permutation (or 0..N-1) cut in order.

    ``mini_batch_trajectories`` None = the whole batch in one optimizer step; the last mini-batch
    may be smaller when it does not divide ``num_traj``.
    """
    if mini_batch_trajectories is not None and mini_batch_trajectories < 1:
        raise ValueError(f"mini_batch_trajectories must be >= 1 or None, got {mini_batch_trajectories}")
    order = (torch.randperm(num_traj, generator=generator) if shuffle else torch.arange(num_traj)).tolist()
    size = mini_batch_trajectories or max(num_traj, 1)
    return [order[i:i + size] for i in range(0, num_traj, size)]


def _rows_of(trajectories: list[int], bounds: list[int], device: torch.device) -> torch.Tensor:
    """int64 [rows]: the kept rows of ``trajectories`` (rows are trajectory-major; trajectory t owns
    rows ``bounds[t]:bounds[t + 1]``), in ascending trajectory order."""
    ranges = [torch.arange(bounds[t], bounds[t + 1]) for t in sorted(trajectories)]
    rows = torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.int64)
    return rows.to(device)


def chunk_log_probs(policy, rows: dict, temperature: float) -> torch.Tensor:
    """float [R, A] log-probs of the responses of R kept rows (a TensorDict slice), one packed forward."""
    ids = rows["input_ids"]
    attention = rows["attention_mask"].bool()
    ids = ids.gather(1, torch.argsort((~attention).to(torch.int8), dim=1, stable=True))  # left- or right-padded
    lengths = attention.sum(-1)
    count = ids.shape[0]
    prompts = pk.gather_chunks(ids.view(count, 1, -1), torch.zeros(count, 1, dtype=torch.int64, device=ids.device),
                               lengths.view(count, 1))
    logits = policy.action_logits_packed(prompts.values, prompts.cu_seqlens, rows["pixel_values"])
    return policy.log_probs(logits, rows["responses"], temperature)


def _reference_log_probs(policy, rows: dict, temperature: float) -> torch.Tensor:
    """float [R, A] log-probs under the base policy (LoRA adapters disabled), no gradient."""
    with torch.no_grad(), policy.adapters_disabled():
        return chunk_log_probs(policy, rows, temperature)


@dataclass
class MiniBatchNorm:
    """verl's global batch info of one optimizer step (see ``grpo.policy_loss``)."""

    traj_token_counts: torch.Tensor  # int64 [N]: token-mean denominator of each trajectory
    num_sequences: float  # trajectories of the mini-batch with valid tokens (SimpleVLA-RL's mean)
    num_tokens: float  # token-mean denominator of the mini-batch
    horizon: int  # tokens of a full-length trajectory (seq-mean-token-sum-norm)


def mini_batch_norm(kept: DataProto, trajectories: list[int]) -> MiniBatchNorm:
    """Denominators of the mini-batch made of ``trajectories``.

    Biased estimator: each trajectory's token-mean runs over its kept valid tokens. Unbiased
    (``chunk_weight`` in the batch): over all its valid tokens, kept or not, so the 1/q-weighted
    shrunk loss estimates the full loss. The seq-mean divides by the mini-batch's trajectories
    with any valid token in both cases.
    """
    unbiased = "chunk_weight" in kept.batch.keys()
    counts = kept.meta_info["traj_valid_tokens" if unbiased else "traj_token_counts"]
    member = torch.zeros_like(counts, dtype=torch.bool)
    member[torch.tensor(trajectories, dtype=torch.int64, device=counts.device)] = True
    valid = kept.meta_info["traj_valid_tokens"]
    return MiniBatchNorm(traj_token_counts=counts, num_sequences=float(((valid > 0) & member).sum()),
                         num_tokens=float(counts[member].sum()),
                         horizon=int(kept.meta_info["num_chunks"]) * int(kept.batch["responses"].shape[-1]))


@dataclass
class _Accumulated:
    forward_s: float = 0.0
    backward_s: float = 0.0
    activation_peak: int = 0
    activation_total: int = 0
    loss: float = 0.0  # this part's share of the mini-batch loss
    kl_loss: float = 0.0  # its share of the KL term (before kl_coef)
    tokens: int = 0


def accumulate_gradients(policy: torch.nn.Module, kept: DataProto, cfg: ActorSection,
                         rows: torch.Tensor | None = None, norm: MiniBatchNorm | None = None,
                         log_probs_out: torch.Tensor | None = None) -> tuple[_Accumulated, dict]:
    """Forward and backward over ``rows`` (int64 [R] kept rows in trajectory-major order; default all)
    in micro-batches of ``cfg.micro_batch_trajectories`` trajectories; gradients accumulate.

    Each micro-batch's loss is its share of the mini-batch loss (``norm``; default: the whole batch
    is the mini-batch), so the accumulated gradients equal one backward over all the rows whatever
    the micro-batch size.
    ``log_probs_out`` float [M, A], if given, receives the new log-probs of the rows.
    Returns (timings, sizes and loss shares; token-weighted sums of verl's per-token metrics).
    """
    num_traj = int(kept.meta_info["num_traj"])
    traj_index = kept.batch["traj_index"]
    if rows is None:
        rows = torch.arange(traj_index.shape[0], device=traj_index.device)
    if norm is None:
        norm = mini_batch_norm(kept, list(range(num_traj)))
    acc = _Accumulated()
    metrics_sum: dict[str, float] = {}
    policy.train()
    row_traj = traj_index[rows].tolist()
    starts = [i for i in range(len(row_traj)) if i == 0 or row_traj[i] != row_traj[i - 1]] + [len(row_traj)]
    per_micro = cfg.micro_batch_trajectories
    for first in range(0, len(starts) - 1, per_micro):
        micro_rows = rows[starts[first]:starts[min(first + per_micro, len(starts) - 1)]]
        micro = kept.batch[micro_rows]
        mask = micro["response_mask"]
        if not bool(mask.any()):
            continue
        t0 = time.perf_counter()
        ref = _reference_log_probs(policy, micro, cfg.temperature)[mask] if cfg.kl_coef > 0 else None
        with SavedActivations(policy) as saved:
            log_prob = chunk_log_probs(policy, micro, cfg.temperature)
            weights = micro["chunk_weight"].unsqueeze(-1).expand_as(mask)[mask] if "chunk_weight" in micro.keys() \
                else None
            loss, metrics = policy_loss(
                log_prob[mask], micro["old_log_probs"][mask], micro["advantages"][mask],
                micro["traj_index"].unsqueeze(-1).expand_as(mask)[mask], num_traj,
                cfg.clip_ratio_low, cfg.clip_ratio_high, weights=weights, traj_token_counts=norm.traj_token_counts,
                clip_ratio_c=cfg.clip_ratio_c, loss_agg_mode=cfg.loss_agg_mode, num_sequences=norm.num_sequences,
                num_tokens=norm.num_tokens, horizon=norm.horizon, ref_log_prob=ref, kl_coef=cfg.kl_coef,
                kl_type=cfg.kl_type)
        _sync(log_prob.device)
        t1 = time.perf_counter()
        loss.backward()
        _sync(log_prob.device)
        acc.forward_s += t1 - t0
        acc.backward_s += time.perf_counter() - t1
        acc.activation_peak = max(acc.activation_peak, saved.bytes)
        acc.activation_total += saved.bytes
        acc.loss += float(loss.detach())
        if log_probs_out is not None:
            log_probs_out[micro_rows] = log_prob.detach()
        weight = int(mask.sum())
        acc.tokens += weight
        acc.kl_loss += metrics.get("actor/kl_loss", 0.0)
        for key, value in metrics.items():
            if key not in ("actor/pg_loss", "actor/kl_loss"):  # shares, not means
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value * weight
    return acc, metrics_sum


def update_actor(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, kept: DataProto,
                 cfg: ActorSection, dist_info: DistInfo | None = None, *,
                 mini_batch_trajectories: int | None = None,
                 generator: torch.Generator | None = None) -> tuple[UpdateStats, dict, torch.Tensor]:
    """PPO epochs over the kept chunks (``shrink_batch`` output), one optimizer step per mini-batch.

    ``mini_batch_trajectories``: trajectories per optimizer step (``actor.ppo_mini_batch`` x the
    group size); None = the whole batch. ``generator`` (CPU) shuffles the trajectories into
    mini-batches every epoch when ``cfg.shuffle``; pass the same state on every rank.
    With ``dist_info`` of K ranks (every rank passing the same ``kept``), each rank trains its
    share of every mini-batch's trajectories and the gradients are summed before each step, so K
    ranks make the single-process update.

    Returns (stats of this rank's share, loss metrics: token means of verl's ``actor/*`` over every
    optimizer step, ``actor/pg_loss`` (the whole loss), ``actor/kl_loss`` (with ``kl_coef`` > 0)
    and ``actor/grad_norm`` means over steps,
    ``actor/grad_norm_max``, ``actor/optimizer_steps``; new log-probs float [N, C * A] in
    SimpleVLA-RL's layout, each kept chunk's as computed in its last epoch's forward pass,
    zeros elsewhere, complete on every rank).
    """
    info = dist_info or DistInfo()
    num_traj = int(kept.meta_info["num_traj"])
    traj_index = kept.batch["traj_index"]
    device = kept.batch["responses"].device
    reset_peak_memory(device)
    _sync(device)
    started = time.perf_counter()
    bounds = torch.searchsorted(traj_index, torch.arange(num_traj + 1, device=device)).tolist()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    new_log_probs = torch.zeros(kept.batch["response_mask"].shape, dtype=torch.float32, device=device)
    mine = torch.zeros(traj_index.shape[0], dtype=torch.bool, device=device)
    totals = _Accumulated()
    metrics_sum: dict[str, float] = {}
    grad_norms, losses, kl_losses = [], [], []
    for _ in range(cfg.ppo_epochs):
        epoch_activation = 0
        for trajectories in mini_batches(num_traj, mini_batch_trajectories, shuffle=cfg.shuffle, generator=generator):
            norm = mini_batch_norm(kept, trajectories)
            share = sorted(trajectories)[info.rank::info.world_size]
            new_log_probs[_rows_of(trajectories, bounds, device)] = 0.0  # another rank may own them this epoch
            rows = _rows_of(share, bounds, device)
            mine[rows] = True
            optimizer.zero_grad(set_to_none=True)
            acc, part = accumulate_gradients(policy, kept, cfg, rows, norm, new_log_probs)
            if info.enabled:
                all_reduce_gradients(trainable)
            else:
                _fill_missing_grads(trainable)
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)))
            optimizer.step()
            losses.append(_summed(acc.loss, info, device))
            kl_losses.append(_summed(acc.kl_loss, info, device) if cfg.kl_coef > 0 else 0.0)
            totals.forward_s += acc.forward_s
            totals.backward_s += acc.backward_s
            totals.activation_peak = max(totals.activation_peak, acc.activation_peak)
            totals.tokens += acc.tokens
            epoch_activation += acc.activation_total
            for key, value in part.items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value
        totals.activation_total = epoch_activation
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    steps = len(grad_norms)
    metrics = {key: value / max(totals.tokens, 1) for key, value in metrics_sum.items()}
    metrics.update({"actor/pg_loss": sum(losses) / max(steps, 1), "actor/grad_norm": sum(grad_norms) / max(steps, 1),
                    "actor/grad_norm_max": max(grad_norms, default=0.0), "actor/optimizer_steps": float(steps)})
    if cfg.kl_coef > 0:
        metrics["actor/kl_loss"] = sum(kl_losses) / max(steps, 1)
    stats = UpdateStats(
        update_time_s=time.perf_counter() - started, forward_time_s=totals.forward_s,
        backward_time_s=totals.backward_s, chunks=int(mine.sum()),
        tokens=int(kept.batch["response_mask"][mine].sum()), activation_bytes=totals.activation_peak,
        activation_bytes_total=totals.activation_total, peak_memory_bytes=peak_memory_bytes(device),
        grad_norm=metrics["actor/grad_norm"], loss=metrics["actor/pg_loss"], optimizer_steps=steps)
    if info.enabled:
        torch.distributed.all_reduce(new_log_probs)
    dense = pk.scatter_chunks(new_log_probs, kept.meta_info["rows"]).reshape(num_traj, -1)
    return stats, metrics, dense


def _fill_missing_grads(parameters) -> None:
    """Zero gradients for parameters no micro-batch reached (e.g. an all-masked mini-batch)."""
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _summed(value: float, info: DistInfo, device: torch.device) -> float:
    """``value`` summed over the ranks (each rank holds its share of a mini-batch's loss)."""
    if not info.enabled:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total)
