import itertools
import math

import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

import pcm_kernels as pk
from pcm_kernels._philox import philox_uniform
from pcm_kernels.sampling import naive
from pcm_kernels.sampling import vectorized
from pcm_kernels.sampling.kernels import launch_sample_chunks, launch_select_chunks, one_minus_exp_neg
from pcm_kernels.sampling.vectorized import MIN_RACE_WEIGHT, race_keys, race_weights

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
    _check_same_draw(out, expected, race_keys(race_weights(weights, eligible), eligible, uniforms), budget)
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
    eligible = ref_weights > 0
    _check_same_draw(index, ref_index, race_keys(race_weights(ref_weights, eligible), eligible, uniforms), B)
    assert (index[0] == -1).all()


# ---- threshold (Horvitz-Thompson) weights -----------------------------------------------------

def _weight_cases(N, C, generator, dtype=torch.float32):
    """Random weights with zeros and padding, plus edge rows: all-zero weights, num_chunks = 0,
    num_chunks < C, a row with 2 eligible chunks, a row of tiny weights (racing as a row of ones)."""
    weights = torch.rand(N, C, generator=generator) * (torch.rand(N, C, generator=generator) > 0.3)
    num_chunks = torch.randint(0, C + 1, (N,), generator=generator)
    weights[0] = 0.0
    num_chunks[1] = 0
    num_chunks[2] = C // 2
    weights[3] = 0.0
    weights[3, [1, C - 1]] = torch.tensor([0.5, 2.0])
    num_chunks[3] = C
    weights[4, :] = 1e-30
    num_chunks[4] = C
    return weights.to(dtype), num_chunks


def _check_against_loop(index, ht, ref_index, ref_ht, rtol):
    """Same index; weights close to the float64 loop; >= 1 where kept, 0 at the padding."""
    assert torch.equal(index, ref_index)
    assert ht.dtype == torch.float32 and ht.shape == index.shape
    assert torch.isfinite(ht).all()
    torch.testing.assert_close(ht.double(), ref_ht, rtol=rtol, atol=0.0)
    assert (ht[index >= 0] >= 1.0).all() and (ht[index < 0] == 0.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("budget", [1, 4, 40])
def test_weights_torch_matches_loop(budget, dtype, gen):
    N, C = 9, 24
    weights, num_chunks = _weight_cases(N, C, gen, dtype)
    state = gen.get_state()
    index, ht = pk.sample_chunks(weights, budget, num_chunks, generator=gen, return_weights=True)
    gen.set_state(state)
    assert torch.equal(index, pk.sample_chunks(weights, budget, num_chunks, generator=gen)), "draw must not change"
    gen.set_state(state)
    uniforms = torch.rand(N, C, generator=gen)
    ref_index, ref_ht = naive.sample_rows_with_weights(weights, uniforms, budget, num_chunks)
    _check_against_loop(index, ht, ref_index, ref_ht, rtol=1e-6)
    eligible = ((torch.arange(C) < num_chunks[:, None]) & (weights > 0)).sum(1)
    assert (ht[eligible <= budget] == (index[eligible <= budget] >= 0).float()).all(), "exactly 1.0 when all kept"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("budget", [1, 4, 40])
def test_weights_triton_matches_loop(budget, dtype, gen, use_backend):
    N, C = 9, 24
    weights, num_chunks = _weight_cases(N, C, gen, dtype)
    seed = torch.randint(0, 2**62, (1,), generator=gen, dtype=torch.int64)
    uniforms = philox_uniform(seed, torch.arange(N * C).view(N, C))
    ref_index, ref_ht = naive.sample_rows_with_weights(weights, uniforms, budget, num_chunks)
    use_backend("triton")
    index = torch.full((N, budget), 77, dtype=torch.int64)
    ht = torch.full((N, budget), -7.0)
    assert launch_sample_chunks(weights, num_chunks, seed, index, ht) == (index, ht)
    assert not (index == 77).any() and not (ht == -7.0).any(), "every output element must be written"
    plain = torch.full((N, budget), 77, dtype=torch.int64)
    launch_sample_chunks(weights, num_chunks, seed, plain)
    assert torch.equal(index, plain), "the draw must not depend on WITH_WEIGHTS"
    same = [n for n in range(N) if torch.equal(index[n], ref_index[n])]
    assert len(same) >= N - 1, "draws differ beyond a tie"  # tl.log and torch.log may differ by an ulp
    _check_against_loop(index[same], ht[same], ref_index[same], ref_ht[same], rtol=2e-6)
    assert (ht[:2] == 0).all()
    if budget >= 2:
        assert (ht[3, :2] == 1.0).all() and (ht[3, 2:] == 0.0).all()


def test_weights_public_api_same_draw(gen, use_backend):
    """Through ``sample_chunks`` on both backends: same generator state, same index with or without weights."""
    weights, num_chunks = _weight_cases(7, 16, gen)
    for backend in ("torch", "triton"):
        use_backend(backend)
        index, ht = pk.sample_chunks(weights, 5, num_chunks, generator=torch.Generator().manual_seed(3),
                                     return_weights=True)
        plain = pk.sample_chunks(weights, 5, num_chunks, generator=torch.Generator().manual_seed(3))
        assert torch.equal(index, plain) and ht.dtype == torch.float32 and ht.shape == (7, 5)
        assert torch.isfinite(ht).all() and (ht[index >= 0] >= 1).all() and (ht[index < 0] == 0).all()
        empty = pk.sample_chunks(torch.zeros(3, 0), 2, return_weights=True)
        assert empty[0].tolist() == [[-1, -1]] * 3 and empty[1].tolist() == [[0.0, 0.0]] * 3
        none = pk.sample_chunks(torch.zeros(0, 4), 2, return_weights=True)
        assert none[0].shape == (0, 2) and none[1].shape == (0, 2)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weights_extreme_values_are_finite(backend, use_backend):
    """Tiny, denormal and huge weights, ratios racing as 2**-126 (keys clamped at 3e38), tau = inf:
    never NaN/inf, always >= 1."""
    rows = torch.tensor([
        [1e-30, 1e-30, 1e-30, 1e-30],  # tiny, but a row of ones to the race
        [1e-40, 3e38, 1e-40, 1.0],  # denormal beside huge: ratios below 2**-126 race as 2**-126
        [1e-38, 1e-38, 0.0, 0.0],  # <= budget eligible: tau = inf, weights exactly 1
        [1e30, 1e-30, 1e30, 1e-30],  # ratio 1e-60: 2**-126, most of its keys clamped at 3e38
    ])
    use_backend(backend)
    for seed in range(3):
        index, ht = pk.sample_chunks(rows, 2, generator=torch.Generator().manual_seed(seed), return_weights=True)
        assert torch.isfinite(ht).all() and (ht[index >= 0] >= 1).all(), (index, ht)
        assert torch.equal(ht[2], torch.ones(2)) and index[2].tolist() == [0, 1]


def test_one_minus_exp_neg_is_accurate():
    """The in-kernel ``-expm1(-y)`` (libdevice expm1 does not run in the interpreter) to ~3 ulp."""
    @triton.jit
    def kernel(y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, one_minus_exp_neg(tl.load(y_ptr + offs, mask=offs < n)), mask=offs < n)

    y = torch.cat([torch.logspace(-40, 2.5, 2000), torch.linspace(0.4, 0.6, 500),
                   torch.tensor([0.0, 0.5, 3e38, float("inf")])]).float()
    out = torch.empty_like(y)
    kernel[(1,)](y, out, y.numel(), BLOCK=triton.next_power_of_2(y.numel()))
    ref = -torch.expm1(-y.double())
    assert out[-4] == 0 and (out[-2:] == 1).all()
    torch.testing.assert_close(out.double(), ref, rtol=3e-7, atol=0.0)


def test_select_weights_match(gen, use_backend):
    """``select_chunks(return_weights=True)``: the torch path equals label-then-sample, the kernel the loop."""
    N, C, L, B = 8, 20, 8, 6
    gripper = random_gripper(N, C, L, generator=gen)
    steps = torch.randint(0, C * L + 1, (N,), generator=gen)
    steps[0] = 0
    steps[1] = 3 * L  # 3 labeled chunks <= budget: weights exactly 1
    keep = torch.tensor([0.3, 0.9, 1.0, 0.6, 0.1])
    labels, index, ht = pk.select_chunks(gripper, steps, keep, B, generator=torch.Generator().manual_seed(2),
                                         return_weights=True)
    ref_labels = pk.label_phases(gripper, steps)
    weights = torch.where(ref_labels >= 0, keep[ref_labels.long().clamp(min=0)], 0.0)
    ref_index, ref_ht = pk.sample_chunks(weights, B, generator=torch.Generator().manual_seed(2),
                                         return_weights=True)
    assert torch.equal(labels, ref_labels) and torch.equal(index, ref_index) and torch.equal(ht, ref_ht)
    assert (ht[0] == 0).all() and (ht[1, :3] == 1).all()

    seed = torch.randint(0, 2**62, (1,), generator=gen, dtype=torch.int64)
    uniforms = philox_uniform(seed, torch.arange(N * C).view(N, C))
    loop_index, loop_ht = naive.sample_rows_with_weights(weights, uniforms, B, torch.full((N,), C))
    use_backend("triton")
    labels = torch.full((N, C), 55, dtype=torch.int8)
    index = torch.full((N, B), 55, dtype=torch.int64)
    ht = torch.full((N, B), -7.0)
    launch_select_chunks(gripper, steps, keep, seed, labels, index, 0.0, 0.75, 0.5, 0.1, 3, ht)
    assert not (labels == 55).any() and not (index == 55).any() and not (ht == -7.0).any()
    same = [n for n in range(N) if torch.equal(index[n], loop_index[n])]
    assert len(same) >= N - 1, "draws differ beyond a tie"
    _check_against_loop(index[same], ht[same], loop_index[same], loop_ht[same], rtol=2e-6)
    drawn = pk.select_chunks(gripper, steps, keep, B, generator=torch.Generator().manual_seed(2),
                             return_weights=True)
    plain = pk.select_chunks(gripper, steps, keep, B, generator=torch.Generator().manual_seed(2))
    assert len(drawn) == 3 and torch.equal(drawn[1], plain[1]) and torch.equal(drawn[0], plain[0])


# Template rows for the unbiasedness test (C = 8, budget 3): two rows with more eligible chunks
# than the budget (zero weights, padding past num_chunks with large weights), then rows where the
# estimate must be exact every draw: 2 and exactly 3 eligible, all-zero weights, num_chunks = 0.
_TEMPLATES = torch.tensor([
    [0.1, 1.0, 0.5, 2.0, 0.25, 0.0, 3.0, 0.7],
    [0.3, 0.0, 1.5, 0.05, 0.8, 9.0, 9.0, 9.0],
    [0.0, 0.4, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0],
    [1.0, 0.0, 5.0, 7.0, 7.0, 7.0, 7.0, 7.0],
    [1.0, 2.0, 0.5, 7.0, 7.0, 7.0, 7.0, 7.0],
    [0.0] * 8,
    [1.0] * 8,
])
_TEMPLATE_CHUNKS = torch.tensor([8, 5, 8, 3, 3, 8, 0])
_STOCHASTIC = 2


def _check_unbiased(backend, draws, exact_copies, use_backend, stochastic=tuple(range(_STOCHASTIC))):
    """E[sum_j x[index_j] ht_j] = sum_{c eligible} x[c] within 4 standard errors, per template row
    (``draws`` copies of each ``stochastic`` template; the others are skipped); also
    E[ht_j 1{index_j = c}] = 1 per eligible chunk (the estimate for every indicator x)."""
    T, C = _TEMPLATES.shape
    B = 3
    x = torch.linspace(-1.0, 2.0, T * C, dtype=torch.float64)
    x = x[torch.randperm(T * C, generator=torch.Generator().manual_seed(0))].view(T, C)
    copies = torch.tensor([draws if t in stochastic else 0 for t in range(_STOCHASTIC)]
                          + [exact_copies] * (T - _STOCHASTIC))
    template = torch.repeat_interleave(torch.arange(T), copies)
    use_backend(backend)
    index, ht = pk.sample_chunks(_TEMPLATES[template], B, _TEMPLATE_CHUNKS[template],
                                 generator=torch.Generator().manual_seed(11), return_weights=True)
    kept = index >= 0
    eligible = (torch.arange(C) < _TEMPLATE_CHUNKS[:, None]) & (_TEMPLATES > 0)
    per_chunk = torch.zeros(len(template), C, dtype=torch.float64)
    per_chunk.scatter_add_(1, index.clamp(min=0), torch.where(kept, ht.double(), 0.0))  # ht, 0 if not kept
    for t in range(T):
        rows = per_chunk[template == t]
        estimate = rows @ x[t]
        target = x[t][eligible[t]].sum().item()
        if t < _STOCHASTIC and t not in stochastic:
            continue
        if t >= _STOCHASTIC:
            assert torch.allclose(estimate, torch.full_like(estimate, target), rtol=0, atol=1e-12), t
            continue
        se = estimate.std().item() / math.sqrt(len(rows))
        assert abs(estimate.mean().item() - target) < 4 * se, (t, estimate.mean().item(), target, se)
        assert (rows[:, ~eligible[t]] == 0).all()
        for c in torch.nonzero(eligible[t]).flatten().tolist():
            se = rows[:, c].std().item() / math.sqrt(len(rows))
            assert abs(rows[:, c].mean().item() - 1.0) < 4 * se, (t, c, rows[:, c].mean().item(), se)


def test_weights_unbiased_torch(use_backend):
    _check_unbiased("torch", 20000, 2000, use_backend)


def test_weights_unbiased_triton(use_backend):
    """The interpreter takes ~3-9 ms per program on 2 CPU cores: 2 x 700 draws here;
    ``test_weights_unbiased_triton_full`` (slow) makes 20,000."""
    _check_unbiased("triton", 700, 20, use_backend)


@pytest.mark.slow
def test_weights_unbiased_triton_full(use_backend):
    """20,000 draws of the row with a zero weight and padding (num_chunks 5 of 8), under the interpreter
    (one program per draw: minutes on 2 CPU cores)."""
    _check_unbiased("triton", 20000, 20, use_backend, stochastic=(1,))


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
    with pytest.raises(TypeError, match="return_weights"):
        pk.sample_chunks(w, 2, return_weights=1)
    with pytest.raises(TypeError, match="return_weights"):
        pk.select_chunks(g, None, [1.0] * 5, 2, return_weights="yes")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float64_rows_at_any_scale_draw_as_at_scale_one(backend, use_backend):
    """The race sees each row over its largest weight: float64 rows at 1e-300 and 1e300 (beyond float32's
    range) give the same chunks and the same 1/q weights as at scale 1, on both backends."""
    gen = torch.Generator().manual_seed(5)
    N, C, B = 8, 16, 5
    base = (torch.rand(N, C, generator=gen) * (torch.rand(N, C, generator=gen) > 0.3)).double()
    num_chunks = torch.randint(1, C + 1, (N,), generator=gen)
    use_backend(backend)

    def draw(weights):
        return pk.sample_chunks(weights, B, num_chunks, generator=torch.Generator().manual_seed(7),
                                return_weights=True)

    index, ht = draw(base)
    assert (index >= 0).sum() > N and (ht > 1).any()  # rows with more eligible chunks than the budget
    for scale in (1e-300, 1e300):
        scaled_index, scaled_ht = draw(base * scale)
        assert torch.equal(scaled_index, index) and torch.equal(scaled_ht, ht), scale


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ratios_below_float32_range_race_as_its_smallest_normal(backend, use_backend):
    """1e-300 beside 1e300 in one float64 row: the ratio underflows float32, so it races as 2**-126
    (documented): still eligible, drawn when the budget reaches it, finite 1/q weights."""
    weights = torch.tensor([[1e300, 1e-300, 0.0, 1.0], [3e-300, 1e300, 1e-300, 0.0]], dtype=torch.float64)
    tiny = MIN_RACE_WEIGHT
    assert race_weights(weights, weights > 0).tolist() == [[1.0, tiny, 0.0, tiny], [tiny, 1.0, tiny, 0.0]]
    use_backend(backend)
    index, ht = pk.sample_chunks(weights, 3, generator=torch.Generator().manual_seed(0), return_weights=True)
    assert index.tolist() == [[0, 1, 3], [0, 1, 2]] and (ht == 1.0).all()
    rows = weights[:1].expand(40, 4)
    index, ht = pk.sample_chunks(rows, 2, generator=torch.Generator().manual_seed(1), return_weights=True)
    assert (index[:, 0] == 0).all() and set(index[:, 1].tolist()) == {1, 3}  # the largest always, then either
    assert torch.isfinite(ht).all() and (ht[:, 0] == 1.0).all() and (ht[:, 1] > 1.0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_select_keep_probs_at_any_scale_draw_as_at_scale_one(backend, use_backend):
    """``select_chunks`` races each row over its largest keep weight too: float64 keep probabilities
    at 1e-300 (a tensor or a sequence of floats) draw as at scale 1, labels and 1/q weights included."""
    gen = torch.Generator().manual_seed(3)
    N, C, L, B = 6, 12, 8, 4
    gripper = random_gripper(N, C, L, generator=gen)
    steps = torch.randint(C * L // 2, C * L + 1, (N,), generator=gen)
    keep = torch.tensor([0.3, 0.9, 1.0, 0.6, 0.1], dtype=torch.float64)
    use_backend(backend)

    def draw(keep_probs):
        return pk.select_chunks(gripper, steps, keep_probs, B, generator=torch.Generator().manual_seed(2),
                                return_weights=True)

    labels, index, ht = draw(keep)
    assert (index >= 0).all() and (ht > 1).any()
    for scaled in (keep * 1e-300, (keep * 1e-300).tolist(), keep * 1e300):
        again = draw(scaled)
        assert torch.equal(again[0], labels) and torch.equal(again[1], index) and torch.equal(again[2], ht)
