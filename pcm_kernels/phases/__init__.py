"""Phase labels per chunk from the gripper signal, and success/failure phase scores."""
import enum
from typing import List, Optional, Tuple

import torch

from .._backend import resolve_backend
from .._checks import (ValueCheck, check_bool, check_fraction, check_int, check_real, check_same_device, check_shape,
                       check_tensor, first_position, nan_check, raise_failed, range_check)
from . import vectorized

PAD = -1


class Phase(enum.IntEnum):
    """Manipulation phase of a chunk. Padding chunks carry ``PAD = -1``."""

    APPROACH = 0
    PRE_GRASP = 1
    ACTIVE_GRIP = 2
    RELEASE_RAMP = 3
    TAIL = 4


LabelArgs = Tuple[torch.Tensor, float, float, float, float, int]


def prepare_label_args(gripper, num_steps, close_above, sustain, grip, low, window, validate=True,
                       checks: Optional[List[ValueCheck]] = None) -> LabelArgs:
    """Validate labeling arguments before any launch.

    Returns ``(num_steps int64 [N] on gripper's device, close_above, sustain, grip, low, window)``
    as plain Python numbers, ``window`` clamped to ``C`` (a window of ``C`` chunks already reaches
    every chunk, so the labels are the same; it keeps huge windows out of int64 arithmetic).

    With ``validate`` the value checks (NaN in ``gripper``, ``num_steps`` in ``[0, C * L]``) are
    appended to ``checks`` when given (the caller raises them together with its own, one host
    synchronization on CUDA), else raised here.
    """
    check_tensor("gripper", gripper, ndim=3, floating=True)
    check_bool("validate", validate)
    N, C, L = gripper.shape
    given_steps = num_steps is not None
    if given_steps:
        check_tensor("num_steps", num_steps, ndim=1, integer=True)
        check_shape("num_steps", num_steps, (N,), "[N] (gripper is [N, C, L])")
        check_same_device(gripper=gripper, num_steps=num_steps)
        num_steps = num_steps.to(torch.int64)
    else:
        num_steps = torch.full((N,), C * L, dtype=torch.int64, device=gripper.device)
    close_above = check_real("close_above", close_above)
    sustain = check_fraction("sustain", sustain)
    grip = check_fraction("grip", grip)
    low = check_fraction("low", low)
    if not low <= grip <= sustain:
        raise ValueError(f"low <= grip <= sustain must hold, got low = {low}, grip = {grip}, sustain = {sustain}")
    window = check_int("window", window, minimum=0)
    values: List[ValueCheck] = []
    if validate:
        values.append(nan_check("gripper", gripper, " (a NaN command is neither open nor closed; "
                                                    "+-inf are valid commands)"))
        if given_steps:
            values.append(range_check("num_steps", num_steps, 0, C * L,
                                      f"env steps executed, at most C * L = {C} * {L} of gripper [N, C, L]"))
    if checks is None:
        raise_failed(values)
    else:
        checks.extend(values)
    return num_steps, close_above, sustain, grip, low, min(window, C)


def label_phases(gripper: torch.Tensor, num_steps: Optional[torch.Tensor] = None, *, close_above: float = 0.0,
                 sustain: float = 0.75, grip: float = 0.5, low: float = 0.1, window: int = 3,
                 validate: bool = True) -> torch.Tensor:
    """Label every chunk with its manipulation phase (PCM.md §2).

    Args:
        gripper: float [N, C, L] executed env-space gripper commands (+1 close, -1 open);
            a step is closed when ``> close_above``. Any float dtype, any strides. NaN is refused
            (with ``validate``); ``+-inf`` are valid commands (closed / open). ``L = 0`` (chunks
            without steps) is allowed: every chunk is ``PAD``, on both backends.
        num_steps: int [N] env steps executed (SimpleVLA-RL's ``finish_step``), in
            ``[0, C * L]``; steps at or past it are ignored. Default: all ``C * L`` steps.
        close_above: finite threshold.
        sustain, grip, low: grip fractions in [0, 1] with ``low <= grip <= sustain``.
            A grasp interval is a maximal run of chunks with grip fraction ``>= sustain``;
            ``ACTIVE_GRIP`` at grip fraction ``>= grip``; ``PRE_GRASP`` needs ``>= low``.
        window: int >= 0, chunks before a grasp start / after a grasp end that count as
            pre-grasp / release (any window >= C acts as C).
        validate: scan the values (NaN in ``gripper``, ``num_steps`` range). On CUDA this costs
            one host synchronization; pass False for a sync-free call (bad values are then
            not detected: NaN counts as open, out-of-range ``num_steps`` act as clamped).

    Returns:
        int8 [N, C] ``Phase`` ids, ``-1`` for chunks with no valid step.
    """
    num_steps, close_above, sustain, grip, low, window = prepare_label_args(
        gripper, num_steps, close_above, sustain, grip, low, window, validate)
    N, C, L = gripper.shape
    if resolve_backend(gripper.device) == "triton" and L > 0:
        from .kernels import launch_label_phases

        out = torch.empty(gripper.shape[:2], dtype=torch.int8, device=gripper.device)
        return launch_label_phases(gripper, num_steps, out, close_above, sustain, grip, low, window)
    # L = 0 runs here on both backends (all PAD): the kernel's step block cannot be empty
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
        With ``N = 0`` or ``C = 0`` no phase is defined: zeros and all False.

    Labels outside ``[-1, P)`` and non-finite actions on labeled chunks are refused (NaN/inf on
    ``PAD`` chunks are ignored). These scans and the grouping cost host synchronizations on CUDA.
    """
    check_tensor("actions", actions, ndim=3, floating=True)
    N, C, _ = actions.shape
    check_tensor("labels", labels, ndim=2, integer=True)
    check_shape("labels", labels, (N, C), "[N, C] (actions is [N, C, F])")
    check_tensor("success", success, ndim=1, boolean=True)
    check_shape("success", success, (N,), "[N]")
    check_tensor("group", group, ndim=1, integer=True)
    check_shape("group", group, (N,), "[N]")
    num_phases = check_int("num_phases", num_phases, minimum=1)
    check_same_device(actions=actions, labels=labels, success=success, group=group)
    empty = (torch.zeros(num_phases, dtype=torch.float32, device=actions.device),
             torch.zeros(num_phases, dtype=torch.bool, device=actions.device))
    if N == 0 or C == 0:  # no chunk: no phase defined (also the value scans have nothing to read)
        return empty
    bad_actions = ~torch.isfinite(actions) & (labels >= 0).unsqueeze(-1)

    def actions_message() -> str:
        n, c, f = first_position(bad_actions)
        return (f"actions must be finite on labeled chunks (labels >= 0), found {actions[n, c, f].item()} "
                f"at [{n}, {c}, {f}]")
    raise_failed([range_check("labels", labels, PAD, num_phases - 1, f"PAD = -1 or a phase id < {num_phases}"),
                  (bad_actions.any(), actions_message)])
    return vectorized.phase_scores(actions, labels, success, group, num_phases)
