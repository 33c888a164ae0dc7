"""The rollout batch (SimpleVLA-RL layout, LAYOUT.md) and its shrinking to the kept chunks.

A rollout batch is a ``verl.DataProto`` over N trajectories of C chunks:

| key | shape | dtype |
| --- | --- | --- |
| ``responses`` | [N, C, A] | int64 action token ids, A = L * D |
| ``input_ids``, ``attention_mask`` | [N, C, P] | int64 prompts (BOS first), left- or right-padded |
| ``pixel_values`` | [N, C, *image] | float |
| ``finish_step`` | [N] | int64 env steps executed, <= C * L |
| ``complete`` | [N] | bool success |
| ``old_log_probs``, ``advantages`` | [N, C * A] | float |
| ``uid`` (non-tensor) | [N] | group id |

``shrink_batch`` keeps the rows of the ``[N * C, ...]`` view named by the
controller's index: the forward, backward and activations then scale with
the kept chunks.
"""
from __future__ import annotations

import numpy as np
import torch
from verl import DataProto

import pcm_kernels as pk
from pcm_train.policies import action_tokens
from pcm_train.algorithm.grpo import chunk_seqlens

CHUNK_KEYS = ("responses", "input_ids", "attention_mask", "pixel_values")
TOKEN_KEYS = ("old_log_probs", "advantages")


def check_rollout_batch(batch: DataProto, *, action_chunk: int, action_dim: int,
                        need_advantages: bool = True) -> tuple[int, int]:
    """Validate keys and shapes; returns (N, C)."""
    if not isinstance(batch, DataProto):
        raise TypeError(f"batch must be a verl DataProto, got {type(batch).__name__}")
    required = CHUNK_KEYS + ("finish_step", "complete") + (TOKEN_KEYS if need_advantages else ("old_log_probs",))
    missing = [k for k in required if k not in batch.batch.keys()]
    if missing:
        raise KeyError(f"batch is missing keys {missing} (has {sorted(batch.batch.keys())})")
    if "uid" not in batch.non_tensor_batch:
        raise KeyError("batch.non_tensor_batch is missing 'uid' (one group id per trajectory)")
    responses = batch.batch["responses"]
    if responses.dim() != 3 or responses.shape[2] != action_chunk * action_dim:
        raise ValueError(f"responses must be [N, C, {action_chunk * action_dim}] (L * D action tokens per chunk), "
                         f"got {tuple(responses.shape)}")
    N, C, A = responses.shape
    for key in ("input_ids", "attention_mask"):
        t = batch.batch[key]
        if t.dim() != 3 or tuple(t.shape[:2]) != (N, C):
            raise ValueError(f"{key} must be [N, C, P] = [{N}, {C}, P], got {tuple(t.shape)}")
    if tuple(batch.batch["pixel_values"].shape[:2]) != (N, C):
        raise ValueError(f"pixel_values must be [N, C, *image] with N, C = {N}, {C}, "
                         f"got {tuple(batch.batch['pixel_values'].shape)}")
    for key in TOKEN_KEYS:
        if key in batch.batch.keys() and tuple(batch.batch[key].shape) != (N, C * A):
            raise ValueError(f"{key} must be [N, C * A] = [{N}, {C * A}], got {tuple(batch.batch[key].shape)}")
    finish = batch.batch["finish_step"]
    if finish.shape != (N,) or finish.is_floating_point():
        raise ValueError(f"finish_step must be an int tensor [N] = [{N}], got {finish.dtype} {tuple(finish.shape)}")
    if N and (int(finish.min()) < 0 or int(finish.max()) > C * action_chunk):
        raise ValueError(f"finish_step must be in [0, {C * action_chunk}] (C * L env steps), "
                         f"got range [{int(finish.min())}, {int(finish.max())}]")
    return N, C


def group_ids(uid) -> torch.Tensor:
    """int64 [N] dense group ids from any array of hashable uids."""
    _, inverse = np.unique(np.asarray(uid, dtype=object).astype(str), return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64))


def executed_actions(responses: torch.Tensor, *, action_token_start: int, action_chunk: int,
                     action_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From action tokens [N, C, L*D]: (normalized actions float32 [N, C, L*D],
    env-space gripper commands float32 [N, C, L], +1 close)."""
    N, C, _ = responses.shape
    normalized = action_tokens.tokens_to_normalized(responses, action_token_start)
    gripper = action_tokens.gripper_to_env(normalized.view(N, C, action_chunk, action_dim)[..., -1])
    return normalized, gripper


def all_valid_chunks(finish_step: torch.Tensor, num_chunks: int, action_chunk: int) -> torch.Tensor:
    """int64 [N, C]: every chunk id that holds an executed step (``finish_step`` int [N]), -1 past the end:
    the ``index`` that makes ``shrink_batch`` keep every valid chunk (the ``full`` strategy)."""
    ids = torch.arange(num_chunks, device=finish_step.device).expand(finish_step.shape[0], num_chunks)
    return torch.where(ids < ((finish_step + action_chunk - 1) // action_chunk).unsqueeze(-1), ids, -1)


def shrink_batch(batch: DataProto, index: torch.Tensor, *, action_chunk: int, action_dim: int,
                 chunk_weights: torch.Tensor | None = None) -> DataProto:
    """Keep the chunks named by ``index`` int64 [N, B] (-1 = none): a DataProto of M chunk rows.

    Rows are trajectory-major, then index order. Keys: ``input_ids``, ``attention_mask`` [M, P],
    ``pixel_values`` [M, *image], ``responses`` [M, A], ``response_mask`` bool [M, A] (valid tokens),
    ``old_log_probs``, ``advantages`` [M, A] (where present), ``traj_index`` int64 [M],
    ``chunk_index`` int64 [M], and with ``chunk_weights`` float [N, B] (the unbiased estimator's
    1/q per kept chunk, aligned with ``index``) ``chunk_weight`` float32 [M]. ``meta_info``:
    ``num_traj`` N, ``traj_token_counts`` int64 [N] (kept valid tokens per trajectory),
    ``traj_valid_tokens`` int64 [N] (valid tokens per trajectory, kept or not), ``num_chunks`` C,
    and ``rows``, the ``PackedChunks`` layout that ``scatter_chunks`` takes to put [M, ...] rows
    back as [N, C, ...].
    """
    N, C = check_rollout_batch(batch, action_chunk=action_chunk, action_dim=action_dim,
                               need_advantages=False)
    A = action_chunk * action_dim
    rows = pk.plan_chunks(index, C, 1)
    kept = {key: rows.gather(batch.batch[key].unsqueeze(2)) for key in CHUNK_KEYS}
    valid_tokens = chunk_seqlens(batch.batch["finish_step"], C, action_chunk, action_dim)
    kept["response_mask"] = rows.gather(
        (torch.arange(A, device=valid_tokens.device) < valid_tokens.unsqueeze(-1)).unsqueeze(2))
    for key in TOKEN_KEYS:
        if key in batch.batch.keys():
            kept[key] = rows.gather(batch.batch[key].view(N, C, 1, A))
    kept["traj_index"] = rows.trajectory_ids
    kept["chunk_index"] = rows.chunk_ids % C
    if chunk_weights is not None:
        if chunk_weights.shape != index.shape or not chunk_weights.is_floating_point():
            raise ValueError(f"chunk_weights must be a float tensor shaped like index {tuple(index.shape)}, "
                             f"got {chunk_weights.dtype} {tuple(chunk_weights.shape)}")
        kept["chunk_weight"] = chunk_weights.to(device=index.device, dtype=torch.float32)[index >= 0]
    counts = torch.zeros(N, dtype=torch.int64, device=index.device)
    counts.index_add_(0, rows.trajectory_ids, kept["response_mask"].sum(-1))
    return DataProto.from_dict(tensors=kept, meta_info={
        "num_traj": N, "traj_token_counts": counts, "traj_valid_tokens": valid_tokens.sum(-1).to(index.device),
        "num_chunks": C, "rows": rows})
