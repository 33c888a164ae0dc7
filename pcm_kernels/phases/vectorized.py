"""Vectorized torch path for phase labels and scores; the reference the kernels are tested against."""
import torch

PAD, APPROACH, PRE_GRASP, ACTIVE_GRIP, RELEASE_RAMP, TAIL = -1, 0, 1, 2, 3, 4


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
    dtype, so bf16/fp16/fp32 signals and both backends label alike."""
    N, C, L = gripper.shape
    step = torch.arange(C * L, device=gripper.device).view(1, C, L)
    valid = step < num_steps.view(N, 1, 1)
    closed = ((gripper.to(torch.float32) > float32_threshold(close_above)) & valid).sum(-1, dtype=torch.int32)
    count = valid.sum(-1, dtype=torch.int32)
    gf = closed.to(torch.float32) / count.clamp(min=1).to(torch.float32)
    return gf, count > 0


def _count_in_window(marks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Per row and chunk k, how many marked chunks j satisfy lo[k] <= j < hi[k] (bounds clamped)."""
    N, C = marks.shape
    prefix = torch.zeros(N, C + 1, dtype=torch.int32, device=marks.device)
    prefix[:, 1:] = marks.to(torch.int32).cumsum(1)
    lo = lo.clamp(0, C).expand(N, C)
    hi = hi.clamp(0, C).expand(N, C)
    return (prefix.gather(1, hi) - prefix.gather(1, lo)).clamp(min=0)


def labels_from_fraction(gf, chunk_valid, sustain: float, grip: float, low: float, window: int) -> torch.Tensor:
    """int8 [N, C] labels from per-chunk grip fractions (PCM.md §2 priority rule)."""
    N, C = gf.shape
    in_grasp = chunk_valid & (gf >= sustain)
    before = torch.nn.functional.pad(in_grasp[:, :-1], (1, 0), value=False)
    after = torch.nn.functional.pad(in_grasp[:, 1:], (0, 1), value=False)
    starts = in_grasp & ~before
    ends = in_grasp & ~after
    k = torch.arange(C, device=gf.device).view(1, C)
    pre = _count_in_window(starts, k + 1, k + 1 + window) > 0
    release = _count_in_window(ends, k - window, k) > 0
    later_start = _count_in_window(starts, k + 1, torch.full_like(k, C)) > 0
    never_grasps = ~in_grasp.any(1, keepdim=True)
    label = torch.full((N, C), TAIL, dtype=torch.int8, device=gf.device)
    label = torch.where(later_start | never_grasps, APPROACH, label)
    label = torch.where(release, RELEASE_RAMP, label)
    label = torch.where(pre & (gf >= low), PRE_GRASP, label)
    label = torch.where(gf >= grip, ACTIVE_GRIP, label)
    return torch.where(chunk_valid, label, PAD).to(torch.int8)


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
