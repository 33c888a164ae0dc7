"""Straightforward per-trajectory loop references for phase labels and scores (PCM.md §2-3).

Slow on purpose: they spell the rules out one chunk at a time and are what the
vectorized and Triton paths are tested against.
"""
import math

import torch

PAD = -1
APPROACH, PRE_GRASP, ACTIVE_GRIP, RELEASE_RAMP, TAIL = range(5)


def grip_fractions(gripper: torch.Tensor, num_steps: torch.Tensor, close_above: float):
    """Per chunk the float32 fraction of valid steps that close, or None for a chunk with none."""
    N, C, L = gripper.shape
    rows = []
    for n in range(N):
        row = []
        for c in range(C):
            valid = [c * L + l < int(num_steps[n]) for l in range(L)]
            count = sum(valid)
            if count == 0:
                row.append(None)
                continue
            closed = sum(1 for l in range(L) if valid[l] and float(gripper[n, c, l]) > close_above)
            row.append(float(torch.tensor(closed, dtype=torch.float32) / torch.tensor(count, dtype=torch.float32)))
        rows.append(row)
    return rows


def label_row(gf, sustain: float, grip: float, low: float, window: int):
    """Labels of one trajectory given its per-chunk fractions (None = no valid step)."""
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))
    sustain, grip, low = f32(sustain), f32(grip), f32(low)
    C = len(gf)
    in_grasp = [g is not None and g >= sustain for g in gf]
    intervals = []
    c = 0
    while c < C:
        if in_grasp[c]:
            start = c
            while c + 1 < C and in_grasp[c + 1]:
                c += 1
            intervals.append((start, c))
        c += 1
    labels = []
    for k, g in enumerate(gf):
        if g is None:
            labels.append(PAD)
        elif g >= grip:
            labels.append(ACTIVE_GRIP)
        elif g >= low and any(s - window <= k < s for s, _ in intervals):
            labels.append(PRE_GRASP)
        elif any(e < k <= e + window for _, e in intervals):
            labels.append(RELEASE_RAMP)
        elif not intervals or any(s > k for s, _ in intervals):
            labels.append(APPROACH)
        else:
            labels.append(TAIL)
    return labels


def label_phases(gripper, num_steps, close_above, sustain, grip, low, window) -> torch.Tensor:
    """int8 [N, C] labels, one chunk at a time."""
    fractions = grip_fractions(gripper, num_steps, close_above)
    out = [label_row(gf, sustain, grip, low, window) for gf in fractions]
    return torch.tensor(out, dtype=torch.int8).reshape(gripper.shape[:2])


def phase_scores(actions, labels, success, group, num_phases):
    """(float32 [P], bool [P]): mean over mixed groups of ||mean succ − mean fail||_2 per phase."""
    per_phase = [[] for _ in range(num_phases)]
    for g in sorted(set(group.tolist())):
        members = [n for n in range(len(group)) if int(group[n]) == g]
        for p in range(num_phases):
            succ = [actions[n, c].double() for n in members if bool(success[n])
                    for c in range(labels.shape[1]) if int(labels[n, c]) == p]
            fail = [actions[n, c].double() for n in members if not bool(success[n])
                    for c in range(labels.shape[1]) if int(labels[n, c]) == p]
            if succ and fail:
                diff = torch.stack(succ).mean(0) - torch.stack(fail).mean(0)
                per_phase[p].append(math.sqrt(float((diff * diff).sum())))
    scores = torch.tensor([sum(v) / len(v) if v else 0.0 for v in per_phase], dtype=torch.float32)
    defined = torch.tensor([bool(v) for v in per_phase])
    return scores, defined
