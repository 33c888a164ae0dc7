"""GRPO advantages and the PPO-clip actor loss, computed through verl.

Token layout (LAYOUT.md): a trajectory has ``num_chunks`` chunks of
``steps_per_chunk * action_dim`` action tokens (64 x 56 = 3584 by default),
time-major; token ``j`` is valid iff ``j < finish_step * action_dim``.

verl supplies the math: ``compute_grpo_outcome_advantage`` for the group
baseline and the ``"vanilla"`` policy loss for the per-token PPO-clip term.
This module adds the layout, the packed (masked-chunk) token list, and the
global normalization that lets micro-batches sum to the full-batch loss.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos

from pcm_train.config import LOSS_AGG_MODES


def token_mask(
    finish_step: torch.Tensor, num_chunks: int = 64, steps_per_chunk: int = 8, action_dim: int = 7
) -> torch.Tensor:
    """Valid action tokens: bool [N, num_chunks * steps_per_chunk * action_dim].

    finish_step: integer [N], env steps executed, in [0, num_chunks * steps_per_chunk].
    """
    _check_finish_step(finish_step, num_chunks, steps_per_chunk)
    num_tokens = num_chunks * steps_per_chunk * action_dim
    positions = torch.arange(num_tokens, device=finish_step.device)
    return positions < (finish_step.long() * action_dim).unsqueeze(-1)


def chunk_seqlens(
    finish_step: torch.Tensor, num_chunks: int = 64, steps_per_chunk: int = 8, action_dim: int = 7
) -> torch.Tensor:
    """Valid action tokens per chunk: int64 [N, num_chunks], each in [0, steps_per_chunk * action_dim].

    Chunk k holds tokens [k*S, (k+1)*S) with S = steps_per_chunk * action_dim;
    the last valid chunk may be partly valid.
    """
    _check_finish_step(finish_step, num_chunks, steps_per_chunk)
    tokens_per_chunk = steps_per_chunk * action_dim
    chunk_starts = torch.arange(num_chunks, device=finish_step.device) * tokens_per_chunk
    valid_tokens = finish_step.long().unsqueeze(-1) * action_dim
    return (valid_tokens - chunk_starts).clamp(0, tokens_per_chunk)


def grpo_advantages(complete: torch.Tensor, uid: np.ndarray, token_mask: torch.Tensor) -> torch.Tensor:
    """GRPO outcome advantage broadcast to valid tokens: float32 [N, T].

    complete: bool [N], task success (reward 1/0). uid: np.ndarray [N] of
    hashable group ids (one per prompt). token_mask: bool [N, T], valid tokens.

    ``A_i = (r_i - mean_g r) / (std_g r + 1e-6)`` with unbiased std, via
    verl's ``compute_grpo_outcome_advantage``; zero on invalid tokens.
    Groups whose rewards are all equal get exactly zero. verl gives a
    single-member group mean 0 and std 1 (so ``A = r``, a success would be
    pushed up with no baseline); we zero those too: a lone rollout carries no
    contrast, like any all-equal group.
    """
    if complete.dim() != 1 or complete.dtype != torch.bool:
        raise ValueError(f"complete must be a 1-D bool tensor, got {complete.dtype} {tuple(complete.shape)}")
    num_traj = complete.shape[0]
    if not isinstance(uid, np.ndarray) or uid.shape != (num_traj,):
        shape = getattr(uid, "shape", None)
        raise ValueError(f"uid must be a np.ndarray of shape ({num_traj},), got {type(uid).__name__} of shape {shape}")
    if token_mask.dim() != 2 or token_mask.shape[0] != num_traj:
        raise ValueError(f"token_mask must have shape ({num_traj}, T), got {tuple(token_mask.shape)}")

    mask = token_mask.bool()
    # verl reads the outcome as the row sum of token_level_rewards; put it on
    # the last valid token (column 0 when a row has none, so its group still
    # counts it; its advantage is masked to zero anyway).
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last_valid = ((mask * positions).amax(dim=-1) - 1).clamp(min=0)
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rewards[torch.arange(num_traj, device=mask.device), last_valid] = complete.float().to(mask.device)

    advantages, _ = core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=rewards, response_mask=mask.float(), index=uid
    )
    group_sizes = Counter(uid.tolist())
    singleton = torch.tensor([group_sizes[g] == 1 for g in uid.tolist()], device=mask.device)
    return advantages.masked_fill(singleton.unsqueeze(-1), 0.0)


def policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    traj_id: torch.Tensor,
    num_traj: int,
    clip_low: float,
    clip_high: float,
    weights: torch.Tensor | None = None,
    traj_token_counts: torch.Tensor | None = None,
    clip_ratio_c: float | None = None,
    loss_agg_mode: str = "seq-mean-token-mean",
    *,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
    horizon: int | None = None,
    ref_log_prob: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "low_var_kl",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip loss over a packed 1-D list of kept valid action tokens.

    log_prob, old_log_prob, advantages: float [T]; traj_id: int64 [T] in
    [0, num_traj), the trajectory of each token. Returns (scalar loss, metrics).

    The per-token term ``-min(rho*A, clip(rho, 1-clip_low, 1+clip_high)*A)``
    is verl's ``"vanilla"`` policy loss. ``clip_ratio_c`` is verl's dual-clip
    bound for A < 0; None (default) disables it, as SimpleVLA-RL does.
    ``weights`` [T] (optional) multiplies each token's term (the unbiased
    estimator's 1/q weights); it does not change the normalization.

    Aggregation is verl's ``agg_loss`` over one optimizer step's batch (a PPO
    mini-batch), with its global batch info made explicit:

    - ``"seq-mean-token-mean"`` (SimpleVLA-RL): token-mean within each
      trajectory (over ``traj_token_counts[t]`` tokens), then sum over
      trajectories divided by ``num_sequences``;
    - ``"token-mean"``: sum over tokens divided by ``num_tokens``;
    - ``"seq-mean-token-sum"``: per-trajectory token sums divided by
      ``num_sequences``; ``"seq-mean-token-sum-norm"`` also by ``horizon``.

    ``traj_token_counts`` int64 [num_traj] counts each trajectory's tokens over
    the WHOLE mini-batch whose gradients are accumulated into one optimizer
    step, so a call on any subset of the tokens (a micro-batch, a rank's share)
    returns that subset's share of the full loss: the sum of ``backward()``
    over disjoint parts equals the full loss's gradient. ``num_sequences``
    defaults to the trajectories with a non-zero count (verl's rule),
    ``num_tokens`` to the counts' sum (``horizon`` has no default); None counts means this call holds the whole mini-batch.

    KL (verl's ``kl_penalty`` of ``kl_type``, e.g. ``low_var_kl``, against
    ``ref_log_prob`` [T]) is added as ``kl_coef`` times the same aggregation.

    Metrics are verl's (``actor/pg_clipfrac``, ``actor/ppo_kl``,
    ``actor/pg_clipfrac_lower``; token means over this call's tokens) plus
    ``actor/pg_loss`` (this call's share of the policy-gradient loss) and,
    with a reference, ``actor/kl_loss``.
    """
    token_count = _check_packed(log_prob, old_log_prob, advantages, traj_id, weights, ref_log_prob)
    if num_traj < 1:
        raise ValueError(f"num_traj must be >= 1, got {num_traj}")
    if int(traj_id.min()) < 0 or int(traj_id.max()) >= num_traj:
        raise ValueError(
            f"traj_id must lie in [0, {num_traj}), got range [{int(traj_id.min())}, {int(traj_id.max())}]"
        )
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    local_counts = torch.bincount(traj_id, minlength=num_traj)
    if traj_token_counts is None:
        traj_token_counts = local_counts
    elif traj_token_counts.shape != (num_traj,):
        raise ValueError(f"traj_token_counts must have shape ({num_traj},), got {tuple(traj_token_counts.shape)}")
    elif bool((traj_token_counts.to(local_counts.device) < local_counts).any()):
        raise ValueError("traj_token_counts is smaller than this call's token count for some trajectory")
    counts = traj_token_counts.to(device=log_prob.device, dtype=torch.float32)
    token_scale = token_scales(traj_id, counts, loss_agg_mode, num_sequences=num_sequences, num_tokens=num_tokens,
                               horizon=horizon)
    if weights is not None:
        token_scale = token_scale * weights.float()

    # verl always applies dual clip to A < 0 tokens (min with -A * clip_ratio_c);
    # an infinite bound makes that min a no-op.
    config = OmegaConf.create(
        {
            "clip_ratio": clip_low,
            "clip_ratio_low": clip_low,
            "clip_ratio_high": clip_high,
            "clip_ratio_c": float("inf") if clip_ratio_c is None else clip_ratio_c,
            "global_batch_info": {},
        }
    )
    # verl's per-token loss times our per-token scale, summed ("token-sum"),
    # is the aggregation above; verl's rollout_is_weights is that multiplier.
    loss, verl_metrics = core_algos.get_policy_loss_fn("vanilla")(
        old_log_prob=old_log_prob.float().view(1, -1),
        log_prob=log_prob.float().view(1, -1),
        advantages=advantages.float().view(1, -1),
        response_mask=torch.ones(1, token_count, device=log_prob.device),
        loss_agg_mode="token-sum",
        config=config,
        rollout_is_weights=token_scale.view(1, -1),
    )
    metrics = {key: float(value) for key, value in verl_metrics.items()}
    metrics["actor/pg_loss"] = float(loss.detach())
    if ref_log_prob is not None:
        kl = core_algos.kl_penalty(log_prob.float(), ref_log_prob.float(), kl_type)
        kl_loss = (kl * token_scale).sum()
        metrics["actor/kl_loss"] = float(kl_loss.detach())
        loss = loss + kl_coef * kl_loss
    return loss, metrics


def token_scales(traj_id: torch.Tensor, counts: torch.Tensor, loss_agg_mode: str, *,
                 num_sequences: float | None = None, num_tokens: float | None = None,
                 horizon: int | None = None) -> torch.Tensor:
    """float [T] per-token multipliers whose weighted token sum is verl's ``agg_loss`` (see ``policy_loss``).

    traj_id: int64 [T]; counts: float [num_traj] tokens of each trajectory in the mini-batch.
    """
    if num_sequences is None:
        num_sequences = (counts > 0).sum()
    if num_tokens is None:
        num_tokens = counts.sum()
    ones = torch.ones_like(traj_id, dtype=torch.float32)
    if loss_agg_mode == "token-mean":
        return ones / num_tokens
    if loss_agg_mode == "seq-mean-token-mean":
        return 1.0 / (counts[traj_id] * num_sequences)
    if loss_agg_mode == "seq-mean-token-sum":
        return ones / num_sequences
    if horizon is None:
        raise ValueError("loss_agg_mode 'seq-mean-token-sum-norm' needs horizon (tokens of a full-length trajectory)")
    return ones / (num_sequences * horizon)

def _check_finish_step(finish_step: torch.Tensor, num_chunks: int, steps_per_chunk: int) -> None:
    if finish_step.dim() != 1 or finish_step.dtype.is_floating_point or finish_step.dtype == torch.bool:
        raise ValueError(
            f"finish_step must be a 1-D integer tensor, got {finish_step.dtype} {tuple(finish_step.shape)}"
        )
    max_steps = num_chunks * steps_per_chunk
    if finish_step.numel() and (int(finish_step.min()) < 0 or int(finish_step.max()) > max_steps):
        raise ValueError(
            f"finish_step must lie in [0, {max_steps}], got range [{int(finish_step.min())}, {int(finish_step.max())}]"
        )


def _check_packed(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    traj_id: torch.Tensor,
    weights: torch.Tensor | None,
    ref_log_prob: torch.Tensor | None = None,
) -> int:
    """Checks the packed token arrays share one 1-D shape [T], T > 0; returns T."""
    if log_prob.dim() != 1 or log_prob.numel() == 0:
        raise ValueError(f"log_prob must be a non-empty 1-D tensor, got shape {tuple(log_prob.shape)}")
    named = {"old_log_prob": old_log_prob, "advantages": advantages, "traj_id": traj_id, "weights": weights,
             "ref_log_prob": ref_log_prob}
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != log_prob.shape:
            raise ValueError(f"{name} must have shape {tuple(log_prob.shape)} got {tuple(tensor.shape)}")
    if traj_id.dtype != torch.int64:
        raise ValueError(f"traj_id must be int64, got {traj_id.dtype}")
    return log_prob.shape[0]

