import itertools

import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

import pcm_kernels as pk
from pcm_kernels._philox import philox_uniform
from pcm_kernels.sampling import naive
from pcm_kernels.sampling import vectorized
from pcm_kernels.sampling.kernels import launch_sample_chunks, launch_select_chunks
from pcm_kernels.sampling.vectorized import race_keys

from gripper_cases import random_gripper


@triton.jit
def _rand_kernel(seed_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.rand(tl.load(seed_ptr), offs), mask=offs < n)


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, 2**62 - 1, 123456789012345])
def test_philox_equals_triton_rand(seed):
    n = 3000
    seed_t = torch.tensor([seed], dtype=torch.int64)
    out = torch.empty(n)
    _rand_kernel[(triton.cdiv(n, 1024),)](seed_t, out, n, BLOCK=1024)
    assert torch.equal(philox_uniform(seed_t, torch.arange(n)), out)
    assert 0.0 <= out.min() and out.max() < 1.0


def _check_same_draw(got, expected, keys, budget):
    """Equal draws, except swaps between keys equal to float tolerance (log differs by an ulp)."""
    for n in range(got.shape[0]):
        a, b = set(got[n].tolist()) - {-1}, set(expected[n].tolist()) - {-1}
        if a == b:
            continue
        assert len(a) == len(b)
        cut = torch.sort(keys[n]).values[min(budget, keys.shape[1]) - 1]
        for k in a ^ b:
            assert abs(keys[n, k] - cut) <= 1e-5 * abs(cut), f"row {n}: draws differ beyond a tie"


def test_torch_matches_loop(gen):
    N, C, B = 7, 30, 12
    weights = torch.rand(N, C, generator=gen) * (torch.rand(N, C, generator=gen) > 0.3)
    num_chunks = torch.randint(0, C + 1, (N,), generator=gen)
    state = gen.get_state()
    got = pk.sample_chunks(weights, B, num_chunks, generator=gen)
    gen.set_state(state)
    uniforms = torch.rand(N, C, generator=gen)
    assert torch.equal(got, naive.sample_rows(weights, uniforms, B, num_chunks))


@pytest.mark.parametrize("budget", [1, 5, 12, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_triton_matches_torch(budget, dtype, gen, use_backend):
    N, C = 6, 32
    weights = (torch.rand(N, C, generator=gen) * (torch.rand(N, C, generator=gen) > 0.25)).to(dtype)
    weights[0] = 0.0  # all-zero weights: an empty row
    num_chunks = torch.randint(1, C + 1, (N,), generator=gen)
    num_chunks[1] = 1
    seed = torch.randint(0, 2**62, (1,), generator=gen, dtype=torch.int64)
    uniforms = philox_uniform(seed, torch.arange(N * C).view(N, C))
    eligible = (torch.arange(C) < num_chunks[:, None]) & (weights > 0)
    expected = vectorized.sample(weights, eligible, budget, uniforms)
    assert torch.equal(expected, naive.sample_rows(weights, uniforms, budget, num_chunks))
    use_backend("triton")
    out = torch.full((N, budget), 77, dtype=torch.int64)
    launch_sample_chunks(weights, num_chunks, seed, out)
    assert not (out == 77).any(), "every index element must be written"
    _check_same_draw(out, expected, race_keys(weights, eligible, uniforms), budget)
    assert (out[0] == -1).all()
    assert (out[1, 1:] == -1).all()


def test_rows_are_valid(gen):
    N, C, B = 20, 16, 6
    weights = torch.rand(N, C, generator=gen) * (torch.rand(N, C, generator=gen) > 0.5)
    num_chunks = torch.randint(0, C + 1, (N,), generator=gen)
    index = pk.sample_chunks(weights, B, num_chunks, generator=gen)
    assert index.shape == (N, B) and index.dtype == torch.int64
    for n in range(N):
        eligible = [k for k in range(C) if k < num_chunks[n] and weights[n, k] > 0]
        row = index[n].tolist()
        taken = [k for k in row if k >= 0]
        assert len(taken) == min(B, len(eligible))
        assert taken == sorted(set(taken)) and set(taken) <= set(eligible)
        assert row[len(taken):] == [-1] * (B - len(taken))


def test_budget_larger_than_chunks_takes_all():
    weights = torch.tensor([[1.0, 0.0, 2.0, 3.0]])
    index = pk.sample_chunks(weights, 10)
    assert index.tolist() == [[0, 2, 3] + [-1] * 7]


def test_deterministic_under_seeded_generator(gen):
    weights = torch.rand(8, 64, generator=gen)
    a = pk.sample_chunks(weights, 12, generator=torch.Generator().manual_seed(5))
    b = pk.sample_chunks(weights, 12, generator=torch.Generator().manual_seed(5))
    c = pk.sample_chunks(weights, 12, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def _chi_square_against_plackett_luce(draw, weights, budget, trials):
    C = len(weights)
    subsets = list(itertools.combinations(range(C), budget))
    expected = torch.tensor([naive.plackett_luce_probability(s, weights) for s in subsets], dtype=torch.float64)
    assert expected.sum().item() == pytest.approx(1.0)
    index = draw(trials)
    code = {s: i for i, s in enumerate(subsets)}
    counts = torch.zeros(len(subsets), dtype=torch.float64)
    for row in index.tolist():
        counts[code[tuple(row)]] += 1
    result = stats.chisquare(counts.numpy(), (expected * trials).numpy())
    assert result.pvalue > 1e-4, f"draws do not follow Plackett-Luce (p = {result.pvalue:.2e})"


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_distribution_is_plackett_luce(budget):
    weights = [0.1, 1.0, 0.5, 2.0, 0.25]
    rows = torch.tensor(weights).expand(20000, 5)
    draw = lambda trials: pk.sample_chunks(rows[:trials], budget, generator=torch.Generator().manual_seed(budget))
    _chi_square_against_plackett_luce(draw, weights, budget, 20000)


def test_triton_distribution_is_plackett_luce(use_backend):
    use_backend("triton")
    weights = [0.2, 1.0, 0.5, 3.0]
    rows = torch.tensor(weights).expand(1500, 4)
    draw = lambda trials: pk.sample_chunks(rows[:trials], 2, generator=torch.Generator().manual_seed(3))
    _chi_square_against_plackett_luce(draw, weights, 2, 1500)


def test_select_equals_label_then_sample(gen):
    N, C, L = 10, 24, 8
    gripper = random_gripper(N, C, L, generator=gen)
    steps = torch.randint(1, C * L + 1, (N,), generator=gen)
    keep = torch.tensor([0.1, 0.5, 1.0, 0.7, 0.0])
    labels, index = pk.select_chunks(gripper, steps, keep, 6, generator=torch.Generator().manual_seed(9))
    ref_labels = pk.label_phases(gripper, steps)
    weights = torch.where(ref_labels >= 0, keep[ref_labels.long().clamp(min=0)], 0.0)
    ref_index = pk.sample_chunks(weights, 6, generator=torch.Generator().manual_seed(9))
    assert torch.equal(labels, ref_labels) and torch.equal(index, ref_index)
    picked = ref_labels.gather(1, index.clamp(min=0))[index >= 0]
    assert not (picked == pk.Phase.TAIL).any() and not (picked == pk.PAD).any()


def test_select_triton_matches_torch(gen, use_backend):
    N, C, L, B = 6, 20, 8, 7
    gripper = random_gripper(N, C, L, generator=gen)
    steps = torch.randint(0, C * L + 1, (N,), generator=gen)
    steps[0] = 0
    keep = torch.tensor([0.3, 0.9, 1.0, 0.6, 0.1])
    ref_labels = pk.label_phases(gripper, steps)
    ref_weights = torch.where(ref_labels >= 0, keep[ref_labels.long().clamp(min=0)], 0.0)
    seed = torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(4), dtype=torch.int64)
    uniforms = philox_uniform(seed, torch.arange(N * C).view(N, C))
    ref_index = vectorized.sample(ref_weights, ref_weights > 0, B, uniforms)
    use_backend("triton")
    labels = torch.full((N, C), 55, dtype=torch.int8)
    index = torch.full((N, B), 55, dtype=torch.int64)
    launch_select_chunks(gripper, steps, keep, seed, labels, index, 0.0, 0.75, 0.5, 0.1, 3)
    assert not (labels == 55).any() and not (index == 55).any()
    assert torch.equal(labels, ref_labels)
    _check_same_draw(index, ref_index, race_keys(ref_weights, ref_weights > 0, uniforms), B)
    assert (index[0] == -1).all()


def test_sampling_bad_input():
    w = torch.rand(2, 8)
    with pytest.raises(ValueError, match="budget"):
        pk.sample_chunks(w, 0)
    with pytest.raises(TypeError, match="budget"):
        pk.sample_chunks(w, 2.5)
    with pytest.raises(ValueError, match="weights"):
        pk.sample_chunks(torch.tensor([[1.0, -0.5]]), 1)
    with pytest.raises(ValueError, match="weights"):
        pk.sample_chunks(torch.tensor([[1.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="weights"):
        pk.sample_chunks(torch.tensor([[1.0, float("inf")]]), 1)
    with pytest.raises(ValueError, match="weights"):
        pk.sample_chunks(torch.rand(8), 1)
    with pytest.raises(ValueError, match="num_chunks"):
        pk.sample_chunks(w, 2, torch.tensor([1, 2, 3]))
    g = torch.zeros(2, 8, 8)
    with pytest.raises(ValueError, match="keep_probs"):
        pk.select_chunks(g, None, [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="keep_probs"):
        pk.select_chunks(g, None, [1.0, -1.0, 1.0, 1.0, 1.0], 2)
    with pytest.raises(ValueError, match="budget"):
        pk.select_chunks(g, None, [1.0] * 5, 0)
