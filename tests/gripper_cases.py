"""Gripper signals with known structure for the labeling and selection tests."""
import torch


def random_gripper(N, C, L, *, generator, p_switch=0.15, dtype=torch.float32):
    """Piecewise-constant ±1 commands with occasional single-step flips: realistic grasp cycles."""
    g = torch.empty(N, C * L)
    state = torch.where(torch.rand(N, generator=generator) < 0.3, 1.0, -1.0)
    for t in range(C * L):
        flip = torch.rand(N, generator=generator) < p_switch / L * 4
        state = torch.where(flip, -state, state)
        noise = torch.rand(N, generator=generator) < 0.05
        g[:, t] = torch.where(noise, -state, state)
    return g.view(N, C, L).to(dtype)


def named_cases(C=12, L=4):
    """(name, gripper [1, C, L], num_steps [1]) edge cases."""
    open_ = -torch.ones(1, C, L)
    closed = torch.ones(1, C, L)
    cycles = open_.clone()
    cycles[0, 2:4] = 1.0
    cycles[0, 7:9] = 1.0
    overlap = open_.clone()
    overlap[0, 3] = 1.0
    overlap[0, 5] = 1.0
    overlap[0, 2, :1] = 1.0
    overlap[0, 4, :2] = 1.0
    ramp = open_.clone()
    ramp[0, 5:8] = 1.0
    ramp[0, 4, :1] = 1.0
    ramp[0, 8, :1] = 1.0
    ramp[0, 10, :1] = 1.0
    full = torch.tensor([C * L])
    return [
        ("never_grasps", open_, full),
        ("always_grasps", closed, full),
        ("two_cycles", cycles, full),
        ("overlapping_windows", overlap, full),
        ("ramps_and_tail", ramp, full),
        ("partial_last_chunk", ramp, torch.tensor([C * L - L - 1])),
        ("one_step", cycles, torch.tensor([1])),
        ("no_step", cycles, torch.tensor([0])),
    ]
