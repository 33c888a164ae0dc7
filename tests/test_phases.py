import pytest
import torch

import pcm_kernels as pk
from pcm_kernels.phases import naive
from pcm_kernels.phases.kernels import launch_label_phases

from gripper_cases import named_cases, random_gripper

RULES = dict(close_above=0.0, sustain=0.75, grip=0.5, low=0.1, window=3)


def test_phase_ids():
    assert [int(p) for p in pk.Phase] == [0, 1, 2, 3, 4]
    assert pk.Phase.ACTIVE_GRIP == 2 and pk.PAD == -1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", named_cases(), ids=lambda c: c[0])
def test_edge_cases_match_loop(case, backend, use_backend):
    use_backend(backend)
    _, gripper, steps = case
    expected = naive.label_phases(gripper, steps, **RULES)
    assert torch.equal(pk.label_phases(gripper, steps, **RULES), expected)


def test_edge_cases_have_the_expected_phases():
    cases = {name: (g, s) for name, g, s in named_cases()}
    label = lambda name: pk.label_phases(*cases[name]).tolist()[0]
    assert set(label("never_grasps")) == {pk.Phase.APPROACH}
    assert set(label("always_grasps")) == {pk.Phase.ACTIVE_GRIP}
    two = label("two_cycles")
    assert two[:2] == [pk.Phase.APPROACH] * 2 and two[2:4] == [pk.Phase.ACTIVE_GRIP] * 2
    assert two[4:7] == [pk.Phase.RELEASE_RAMP] * 3 and two[9:12] == [pk.Phase.RELEASE_RAMP] * 3
    ramp = label("ramps_and_tail")
    assert ramp[4] == pk.Phase.PRE_GRASP and ramp[8] == pk.Phase.RELEASE_RAMP and ramp[11] == pk.Phase.TAIL
    assert label("one_step")[0] == pk.Phase.APPROACH and set(label("one_step")[1:]) == {pk.PAD}
    assert set(label("no_step")) == {pk.PAD}
    partial = label("partial_last_chunk")
    assert partial[-1] == pk.PAD and partial[-2] != pk.PAD


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_random_torch_matches_loop(dtype, gen):
    N, C, L = 6, 20, 8
    gripper = random_gripper(N, C, L, generator=gen, dtype=dtype)
    steps = torch.randint(0, C * L + 1, (N,), generator=gen)
    assert torch.equal(pk.label_phases(gripper, steps), naive.label_phases(gripper, steps, **RULES))


@pytest.mark.parametrize("window", [0, 1, 2, 5, 19, 20, 500])
def test_random_torch_matches_loop_for_every_window(window, gen):
    """The torch path reads its windows at fixed offsets: every width up to (and past) C agrees with the loop."""
    N, C, L = 16, 20, 4
    gripper = random_gripper(N, C, L, generator=gen, p_switch=0.4)
    steps = torch.randint(0, C * L + 1, (N,), generator=gen)
    steps[0] = C * L
    rules = dict(RULES, window=window)
    assert torch.equal(pk.label_phases(gripper, steps, **rules), naive.label_phases(gripper, steps, **rules))


# low <= grip <= sustain is required (as the trainer config); grip == sustain is the boundary
@pytest.mark.parametrize("rules", [RULES, dict(close_above=0.3, sustain=0.6, grip=0.6, low=0.2, window=1),
                                   dict(close_above=-0.5, sustain=0.9, grip=0.3, low=0.0, window=0)])
def test_triton_matches_torch_random(rules, gen, use_backend):
    N, C, L = 5, 24, 8
    gripper = random_gripper(N, C, L, generator=gen) * torch.rand(N, C, L, generator=gen)
    steps = torch.randint(0, C * L + 1, (N,), generator=gen)
    use_backend("torch")
    expected = pk.label_phases(gripper, steps, **rules)
    assert torch.equal(expected, naive.label_phases(gripper, steps, **rules))
    use_backend("triton")
    out = torch.full((N, C), 99, dtype=torch.int8)
    launch_label_phases(gripper, steps, out, **rules)
    assert not (out == 99).any(), "every label must be written"
    assert torch.equal(out, expected)


def test_triton_non_contiguous_and_default_steps(gen, use_backend):
    actions = random_gripper(3, 10, 8, generator=gen).unsqueeze(-1).expand(3, 10, 8, 7).contiguous()
    gripper = actions[..., 6]
    assert not gripper.is_contiguous()
    use_backend("triton")
    got = pk.label_phases(gripper)
    use_backend("torch")
    assert torch.equal(got, pk.label_phases(gripper.contiguous()))


def test_scores_match_loop(gen):
    N, C, F = 12, 10, 56
    actions = torch.randn(N, C, F, generator=gen)
    labels = torch.randint(-1, 5, (N, C), generator=gen, dtype=torch.int8)
    success = torch.rand(N, generator=gen) < 0.5
    group = torch.tensor([7, 7, 7, 7, -3, -3, -3, -3, 100, 100, 100, 100])
    scores, defined = pk.phase_scores(actions, labels, success, group)
    ref_scores, ref_defined = naive.phase_scores(actions, labels, success, group, 5)
    assert scores.dtype == torch.float32 and defined.dtype == torch.bool
    assert torch.equal(defined, ref_defined)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_scores_known_value_and_uniform_groups():
    actions = torch.zeros(4, 2, 3)
    actions[0, 0] = torch.tensor([3.0, 4.0, 0.0])
    labels = torch.tensor([[2, 0], [2, 0], [2, 0], [2, 0]], dtype=torch.int8)
    success = torch.tensor([True, False, True, True])
    group = torch.tensor([0, 0, 1, 1])  # group 1 is all-success: contributes nothing
    scores, defined = pk.phase_scores(actions, labels, success, group)
    assert defined.tolist() == [True, False, True, False, False]
    assert scores[2].item() == pytest.approx(5.0) and scores[0].item() == 0.0 and scores[1].item() == 0.0


def test_label_bad_input():
    g = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="gripper"):
        pk.label_phases(torch.zeros(2, 4))
    with pytest.raises(TypeError, match="gripper"):
        pk.label_phases(torch.zeros(2, 4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_steps"):
        pk.label_phases(g, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="num_steps"):
        pk.label_phases(g, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="num_steps"):
        pk.label_phases(g, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="sustain"):
        pk.label_phases(g, sustain=1.5)
    with pytest.raises(ValueError, match="window"):
        pk.label_phases(g, window=-1)


def test_scores_bad_input():
    a, lab = torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.int8)
    s, grp = torch.tensor([True, False]), torch.tensor([0, 0])
    with pytest.raises(ValueError, match="labels"):
        pk.phase_scores(a, torch.zeros(2, 4, dtype=torch.int8), s, grp)
    with pytest.raises(TypeError, match="success"):
        pk.phase_scores(a, lab, torch.tensor([1, 0]), grp)
    with pytest.raises(ValueError, match="labels"):
        pk.phase_scores(a, lab + 7, s, grp)
    with pytest.raises(ValueError, match="actions"):
        pk.phase_scores(torch.full((2, 3, 4), float("nan")), lab, s, grp)
