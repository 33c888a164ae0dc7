import pytest
import torch

import pcm_kernels as pk
from pcm_train.config import load_config
from pcm_train.algorithm.controller import STRATEGY_REGISTRY, PCMController, keep_probabilities, register_strategy

from gripper_cases import random_gripper


def _step_inputs(gen, N=8, C=16, L=8, F=56):
    gripper = random_gripper(N, C, L, generator=gen)
    steps = torch.randint(C * L // 2, C * L + 1, (N,), generator=gen)
    actions = torch.randn(N, C, F, generator=gen)
    success = torch.tensor([True, False] * (N // 2))
    group = torch.arange(N) // 4
    return gripper, steps, actions, success, group


def _controller(*overrides, seed=0):
    return PCMController(load_config(list(overrides)).pcm, seed=seed)


def test_keep_probabilities_share_max_floor():
    probs = keep_probabilities(torch.tensor([1.0, 3.0, 0.0, 6.0, 0.2]), 0.1)
    # share = s/10.2, max-normalized = s/6, floored at 0.1
    torch.testing.assert_close(probs, torch.tensor([1 / 6, 0.5, 0.1, 1.0, 0.1]))
    assert keep_probabilities(torch.zeros(5), 0.1).tolist() == [1.0] * 5


def test_refresh_schedule_first_step_then_every_t_rc(gen):
    controller = _controller("pcm.refresh_every=3")
    inputs = _step_inputs(gen)
    refreshed, probs = [], []
    for _ in range(7):
        sel = controller.step(*inputs)
        refreshed.append(sel.metrics["pcm/refreshed"])
        probs.append(sel.keep_probs)
    assert refreshed == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert not torch.equal(probs[0], torch.ones(5))  # step 0 already uses its own scores
    assert torch.equal(probs[0], probs[1]) and torch.equal(probs[1], probs[2])
    # after a refresh the buffers restart: only the steps since the last refresh are left
    assert all(len(b) <= 1 for b in controller.buffers)


def test_refresh_uses_buffer_mean():
    controller = _controller("pcm.refresh_every=2", "pcm.p_min=0.05")
    selections = [controller.step(*_step_inputs(torch.Generator().manual_seed(i))) for i in range(3)]
    # the refresh at step 2 averages, per phase, the scores defined at steps 1 and 2
    total, count = torch.zeros(5), torch.zeros(5)
    for sel in selections[1:]:
        total += torch.where(sel.defined, sel.scores, 0.0)
        count += sel.defined.float()
    assert count.sum() > 0
    expected = keep_probabilities(total / count.clamp(min=1), 0.05)
    torch.testing.assert_close(selections[2].keep_probs, expected)
    assert all(len(b) == 0 for b in controller.buffers)


def test_all_zero_scores_give_uniform(gen):
    gripper, steps, actions, _, group = _step_inputs(gen)
    sel = _controller().step(gripper, steps, actions, torch.ones(8, dtype=torch.bool), group)
    assert sel.keep_probs.tolist() == [1.0] * 5 and not sel.defined.any()


def test_full_keeps_every_valid_chunk(gen):
    gripper, steps, *rest = _step_inputs(gen)
    sel = _controller("pcm.strategy=full").step(gripper, steps, *rest)
    assert torch.equal(sel.index >= 0, sel.labels >= 0)
    assert sel.metrics["pcm/kept_fraction"] == 1.0


def test_pcm_selection_is_budgeted_and_valid(gen):
    sel = _controller("pcm.budget=5").step(*_step_inputs(gen))
    assert sel.index.shape == (8, 5)
    picked = sel.labels.gather(1, sel.index.clamp(min=0))[sel.index >= 0]
    assert (picked >= 0).all() and ((sel.index >= 0).sum(1) == 5).all()
    assert sum(sel.metrics[f"pcm/kept_per_traj/{p.name.lower()}"] for p in pk.Phase) == pytest.approx(5.0)


def test_top_phase_keeps_only_the_best_phase(gen):
    controller = _controller("pcm.strategy=top_phase", "pcm.budget=4")
    sel = controller.step(*_step_inputs(gen))
    best = int(torch.argmax(sel.keep_probs))
    picked = sel.labels.gather(1, sel.index.clamp(min=0))[sel.index >= 0]
    assert picked.numel() > 0 and (picked == best).all()


def test_random_is_uniform_over_valid_chunks():
    N, C, L = 200, 6, 4
    gripper = torch.ones(N, C, L)
    steps = torch.full((N,), C * L - L)  # last chunk invalid
    actions, success, group = torch.zeros(N, C, 28), torch.zeros(N, dtype=torch.bool), torch.arange(N)
    counts = torch.zeros(C)
    controller = _controller("pcm.strategy=random", "pcm.budget=2")
    for _ in range(10):
        sel = controller.step(gripper, steps, actions, success, group)
        counts += torch.bincount(sel.index.flatten(), minlength=C)[:C].float()
    assert counts[-1] == 0
    expected = 10 * N * 2 / (C - 1)
    assert (counts[:-1] - expected).abs().max() < 0.08 * expected


def test_state_dict_resumes_identical_draws(gen):
    inputs = [_step_inputs(torch.Generator().manual_seed(i)) for i in range(6)]
    a = _controller("pcm.refresh_every=2", seed=3)
    for x in inputs[:3]:
        a.step(*x)
    state = a.state_dict()
    first = [a.step(*x) for x in inputs[3:]]
    b = _controller("pcm.refresh_every=2", seed=99)
    b.load_state_dict(state)
    second = [b.step(*x) for x in inputs[3:]]
    for s1, s2 in zip(first, second):
        assert torch.equal(s1.index, s2.index) and torch.equal(s1.keep_probs, s2.keep_probs)
    with pytest.raises(ValueError, match="strategy"):
        _controller("pcm.strategy=random").load_state_dict(state)


def test_registry_rejects_duplicates_and_unknown():
    assert set(STRATEGY_REGISTRY) >= {"full", "random", "top_phase", "pcm"}
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("pcm")(lambda controller: None)
    cfg = load_config([]).pcm
    cfg.strategy = "nope"
    with pytest.raises(ValueError, match="pcm.strategy"):
        PCMController(cfg)
