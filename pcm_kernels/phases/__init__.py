"""Phase labels per chunk from the gripper signal, and success/failure phase scores."""
import enum
from typing import Optional

import torch

from .._backend import resolve_backend
from .._checks import check_fraction, check_int, check_same_device, check_shape, check_tensor
from . import vectorized

PAD = -1


class Phase(enum.IntEnum):
    """Manipulation phase of a chunk. Padding chunks carry ``PAD = -1``."""

    APPROACH = 0
    PRE_GRASP = 1
    ACTIVE_GRIP = 2
    RELEASE_RAMP = 3
    TAIL = 4


def prepare_label_args(gripper, num_steps, close_above, sustain, grip, low, window):
    """Validate labeling arguments; returns num_steps as an int64 tensor [N] on gripper's device."""
    check_tensor("gripper", gripper, ndim=3, floating=True)
    N, C, L = gripper.shape
    if num_steps is None:
        num_steps = torch.full((N,), C * L, dtype=torch.int64, device=gripper.device)
    else:
        check_tensor("num_steps", num_steps, ndim=1, integer=True)
        check_shape("num_steps", num_steps, (N,), "[N] (gripper is [N, C, L])")
        check_same_device(gripper=gripper, num_steps=num_steps)
        num_steps = num_steps.to(torch.int64)
        if gripper.device.type == "cpu" and N and bool((num_steps < 0).any()):
            raise ValueError(f"num_steps must be >= 0, got min {int(num_steps.min())}")
    if not isinstance(close_above, (int, float)) or close_above != close_above:
        raise ValueError(f"close_above must be a finite number, got {close_above!r}")
    check_fraction("sustain", sustain)
    check_fraction("grip", grip)
    check_fraction("low", low)
    check_int("window", window, minimum=0)
    return num_steps


def label_phases(gripper: torch.Tensor, num_steps: Optional[torch.Tensor] = None, *, close_above: float = 0.0,
                 sustain: float = 0.75, grip: float = 0.5, low: float = 0.1, window: int = 3) -> torch.Tensor:
    """Label every chunk with its manipulation phase (PCM.md §2).

    Args:
        gripper: float [N, C, L] executed env-space gripper commands (+1 close, -1 open);
            a step is closed when ``> close_above``. Any float dtype, any strides.
        num_steps: int [N] env steps executed (SimpleVLA-RL's ``finish_step``); steps at or
            past it are ignored. Default: all ``C * L`` steps.
        sustain: a grasp interval is a maximal run of chunks with grip fraction ``>= sustain``.
        grip: ``ACTIVE_GRIP`` at grip fraction ``>= grip``.
        low: ``PRE_GRASP`` needs grip fraction ``>= low``.
        window: chunks before a grasp start / after a grasp end that count as pre-grasp / release.

    Returns:
        int8 [N, C] ``Phase`` ids, ``-1`` for chunks with no valid step.
    """
    num_steps = prepare_label_args(gripper, num_steps, close_above, sustain, grip, low, window)
    if resolve_backend(gripper.device) == "triton":
        from .kernels import launch_label_phases

        out = torch.empty(gripper.shape[:2], dtype=torch.int8, device=gripper.device)
        return launch_label_phases(gripper, num_steps, out, close_above, sustain, grip, low, window)
    return vectorized.label_phases(gripper, num_steps, close_above, sustain, grip, low, window)


def phase_scores(actions: torch.Tensor, labels: torch.Tensor, success: torch.Tensor, group: torch.Tensor,
                 num_phases: int = len(Phase)):
    """Success/failure action divergence per phase (PCM.md §3).

    Args:
        actions: float [N, C, F] executed action vector per chunk (normalized space, F = L*D).
        labels: int [N, C] phase ids from ``label_phases`` (``-1`` = padding, ignored).
        success: bool [N] trajectory outcome.
        group: int [N] group id (one per prompt; arbitrary values).

    Returns:
        ``(scores float32 [P], defined bool [P])``: per phase, the mean over groups with both
        outcomes in that phase of ``||mean succ action - mean fail action||_2``; 0 where undefined.
    """
    check_tensor("actions", actions, ndim=3, floating=True)
    N, C, _ = actions.shape
    check_tensor("labels", labels, ndim=2, integer=True)
    check_shape("labels", labels, (N, C), "[N, C] (actions is [N, C, F])")
    check_tensor("success", success, ndim=1, boolean=True)
    check_shape("success", success, (N,), "[N]")
    check_tensor("group", group, ndim=1, integer=True)
    check_shape("group", group, (N,), "[N]")
    check_int("num_phases", num_phases, minimum=1)
    check_same_device(actions=actions, labels=labels, success=success, group=group)
    if N and (int(labels.min()) < PAD or int(labels.max()) >= num_phases):
        raise ValueError(f"labels must be in [-1, {num_phases}), got range [{int(labels.min())}, {int(labels.max())}]")
    if N and not bool(torch.isfinite(actions[labels >= 0]).all()):
        raise ValueError("actions must be finite on labeled chunks")
    if N == 0:
        return torch.zeros(num_phases, dtype=torch.float32, device=actions.device), \
            torch.zeros(num_phases, dtype=torch.bool, device=actions.device)
    return vectorized.phase_scores(actions, labels, success, group, num_phases)
