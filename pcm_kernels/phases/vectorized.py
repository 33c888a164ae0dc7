"""Vectorized torch path for phase labels and scores; the reference the kernels are tested against."""
import functools

import torch

PAD, APPROACH, PRE_GRASP, ACTIVE_GRIP, RELEASE_RAMP, TAIL = -1, 0, 1, 2, 3, 4


@functools.lru_cache(maxsize=64)
def float32_threshold(close_above: float) -> float:
    """The largest float32 ``t <= close_above``: for any fp32/bf16/fp16 value ``x``, ``x > close_above``
    (exact, as the loop reference compares) equals the float32 comparison ``x > t``."""
    t = torch.tensor(close_above, dtype=torch.float32)
    if float(t) > close_above:
        t = torch.nextafter(t, torch.tensor(float("-inf")))
    return float(t)


def grip_fraction(gripper: torch.Tensor, num_steps: torch.Tensor, close_above: float):
    """(gf float32 [N, C], chunk_valid bool [N, C]) from gripper [N, C, L] and num_steps int [N].

    The command is compared in float32 against ``float32_threshold(close_above)`` whatever its
    dtype, so bf16/fp16/fp32 signals and both backends label alike. Chunk k executed
    ``clamp(num_steps - k L, 0, L)`` steps: its first ones count, the rest are ignored."""
    N, C, L = gripper.shape
    count = (num_steps.view(N, 1) - torch.arange(C, device=gripper.device) * L).clamp_(0, L)
    executed = torch.arange(L, device=gripper.device) < count.unsqueeze(-1)
    closed = executed.logical_and_(gripper.to(torch.float32) > float32_threshold(close_above))
    gf = closed.sum(-1, dtype=torch.int32).to(torch.float32).div_(count.clamp(min=1))
    return gf, count > 0


def labels_from_fraction(gf, chunk_valid, sustain: float, grip: float, low: float, window: int) -> torch.Tensor:
    """int8 [N, C] labels from per-chunk grip fractions (PCM.md §2 priority rule), ``window <= C``.

    Window tests are differences of running counts of grasp starts and ends, read at fixed offsets
    (slices, no gathers): pre-grasp = a start in ``(k, k + window]``, release = an end in
    ``[k - window, k)``, approach = a start after k, or no grasp in the row."""
    N, C = gf.shape
    in_grasp = chunk_valid & (gf >= sustain)
    padded = torch.nn.functional.pad(in_grasp.to(torch.int8), (1, 1))  # [N, C + 2], not grasping outside
    step = padded[:, 1:] - padded[:, :-1]  # [N, C + 1]: +1 where a grasp starts, -1 after it ends
    starts = (step[:, :C] == 1).cumsum(1, dtype=torch.int32)  # starts at chunks <= k
    ends = torch.nn.functional.pad((step[:, 1:] == -1).cumsum(1, dtype=torch.int32), (window + 1, 0))  # [N, C + w + 1]
    ahead = torch.cat([starts[:, window:], starts[:, -1:].expand(N, min(window, C))], 1)  # starts <= min(k + w, C - 1)
    total = starts[:, -1:]
    label = torch.full((N, C), TAIL, dtype=torch.int8, device=gf.device)
    label.masked_fill_((total != starts) | (total == 0), APPROACH)
    label.masked_fill_(ends[:, window:window + C] != ends[:, :C], RELEASE_RAMP)
    label.masked_fill_((ahead != starts) & (gf >= low), PRE_GRASP)
    label.masked_fill_(gf >= grip, ACTIVE_GRIP)
    return label.masked_fill_(~chunk_valid, PAD)


def label_phases(gripper, num_steps, close_above, sustain, grip, low, window) -> torch.Tensor:
    gf, chunk_valid = grip_fraction(gripper, num_steps, close_above)
    return labels_from_fraction(gf, chunk_valid, sustain, grip, low, window)


def phase_scores(actions, labels, success, group, num_phases):
    """(float32 [P], bool [P]) with one scatter-add over (group, outcome, phase) cells.

    One host synchronization on CUDA (``torch.unique`` sizes its output); padding chunks go to a
    spare cell instead of being filtered out (a boolean index would synchronize)."""
    N, C, F = actions.shape
    uniques, group_idx = torch.unique(group, return_inverse=True)
    num_groups = uniques.numel()
    cells = num_groups * 2 * num_phases
    cell = (group_idx.view(N, 1) * 2 + success.view(N, 1).long()) * num_phases + labels.long()
    cell = torch.where(labels >= 0, cell, cells).flatten()  # cell `cells` collects the padding
    sums = torch.zeros(cells + 1, F, dtype=torch.float64, device=actions.device)
    counts = torch.zeros(cells + 1, dtype=torch.float64, device=actions.device)
    sums.index_add_(0, cell, actions.reshape(N * C, F).to(torch.float64))
    counts.index_add_(0, cell, torch.ones(N * C, dtype=torch.float64, device=actions.device))
    sums = sums[:cells].view(num_groups, 2, num_phases, F)
    counts = counts[:cells].view(num_groups, 2, num_phases)
    means = sums / counts.clamp(min=1).unsqueeze(-1)
    per_group = (means[:, 1] - means[:, 0]).norm(dim=-1)
    defined_in_group = (counts > 0).all(1)
    total = torch.where(defined_in_group, per_group, 0.0).sum(0)
    n_defined = defined_in_group.sum(0)
    scores = (total / n_defined.clamp(min=1)).to(torch.float32)
    return scores, n_defined > 0
