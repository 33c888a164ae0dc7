"""Drop-in for SimpleVLA-RL / verl actors: shrink a rollout batch to the chunks PCM keeps.

``pcm_shrink_batch`` takes SimpleVLA-RL's training batch (LAYOUT.md) and a
``PCMController`` and returns the kept chunks as rows, with everything the loss
needs. ``docs/simplevla_rl.md`` shows the change to ``update_policy``.
"""
from __future__ import annotations

import torch
from verl import DataProto

from pcm_train.algorithm.batch import check_rollout_batch, executed_actions, group_ids, shrink_batch
from pcm_train.algorithm.controller import PCMController, Selection

OPENVLA_ACTION_TOKEN_START = 31744  # the last 256 ids of OpenVLA's 32000-token vocabulary


def pcm_shrink_batch(batch: DataProto, controller: PCMController, *,
                     action_token_start: int = OPENVLA_ACTION_TOKEN_START, action_chunk: int = 8,
                     action_dim: int = 7) -> tuple[DataProto, Selection]:
    """Label, score and select chunks of ``batch``, then keep only those.

    ``batch`` holds ``responses`` [N, C, L*D], ``input_ids``/``attention_mask`` [N, C, P],
    ``pixel_values`` [N, C, ...], ``finish_step`` [N], ``complete`` [N], ``old_log_probs`` and
    ``advantages`` [N, C*L*D] and ``uid`` in ``non_tensor_batch``. The executed actions are decoded
    from ``responses``; so is the phase labeler's gripper signal (dim 6), unless the controller's
    ``gripper_signal`` is ``"fingers"``: then it is the batch's ``gripper`` float [N, C, L] (+1 where
    the env reported the fingers closed, as ``pcm_train``'s rollout records it).

    Returns ``(kept, selection)``: ``kept`` is ``shrink_batch``'s DataProto of M chunk rows
    (``input_ids``, ``attention_mask``, ``pixel_values``, ``responses``, ``response_mask``,
    ``old_log_probs``, ``advantages``, ``traj_index``, and ``chunk_weight`` (1/q) under
    ``pcm.estimator=unbiased``; ``meta_info["traj_token_counts"]``, ``["traj_valid_tokens"]`` and
    ``["num_traj"]`` normalize the loss); ``selection`` has the labels, index, estimator weights,
    scores, keep probabilities and per-step metrics.
    """
    check_rollout_batch(batch, action_chunk=action_chunk, action_dim=action_dim)
    normalized, gripper = executed_actions(batch.batch["responses"], action_token_start=action_token_start,
                                           action_chunk=action_chunk, action_dim=action_dim)
    if controller.cfg.gripper_signal == "fingers":
        gripper = _recorded_fingers(batch, tuple(gripper.shape))
    groups = group_ids(batch.non_tensor_batch["uid"]).to(gripper.device)
    selection = controller.step(gripper, batch.batch["finish_step"], normalized, batch.batch["complete"].bool(),
                                groups)
    kept = shrink_batch(batch, selection.index, action_chunk=action_chunk, action_dim=action_dim,
                        chunk_weights=selection.weights)
    return kept, selection


def _recorded_fingers(batch: DataProto, shape: tuple[int, int, int]) -> torch.Tensor:
    """The batch's ``gripper`` float [N, C, L]: the finger signal ``gripper_signal="fingers"`` labels from."""
    if "gripper" not in batch.batch.keys():
        raise KeyError("pcm.gripper_signal=fingers labels phases from batch['gripper'] float [N, C, L] (+1 where the "
                       "fingers are closed), which this batch lacks; a rollout that records only actions needs "
                       "pcm.gripper_signal=command")
    gripper = batch.batch["gripper"]
    if tuple(gripper.shape) != shape or not gripper.is_floating_point():
        raise ValueError(f"batch['gripper'] must be float [N, C, L] = {list(shape)}, got {gripper.dtype} "
                         f"{list(gripper.shape)}")
    return gripper
