"""Triton kernels for budgeted chunk sampling: one program draws one trajectory's chunks.

``select_chunks_kernel`` fuses labeling, the per-phase keep weights and the
draw in one launch; ``sample_chunks_kernel`` draws from given weights. Both
regenerate their uniforms from ``tl.rand(seed, n * C + k)`` with the seed read
from device memory, so no host synchronization is needed. Both race each row's
weights over its largest in float64, rounded to float32 (``race_weights``). With
``WITH_WEIGHTS=True`` they also store the threshold (Horvitz-Thompson) weights
of the kept chunks in the same launch.
"""
import triton
import triton.language as tl

from ..phases.kernels import block_sizes, row_labels
from ..phases.vectorized import float32_threshold

MAX_KEY = tl.constexpr(3.0e38)  # = vectorized.MAX_KEY
MIN_RACE_WEIGHT = tl.constexpr(2.0**-126)  # = vectorized.MIN_RACE_WEIGHT


@triton.jit
def one_minus_exp_neg(y):
    """float32 ``1 - exp(-y) = -expm1(-y)`` for ``y >= 0`` (``inf`` gives 1), to a few ulp.

    libdevice ``expm1`` does not run under TRITON_INTERPRET (no extern calls there), so this
    is portable: for ``y < 0.5``, where ``1 - exp(-y)`` cancels, the Taylor series to the
    ``y**8`` term in Horner form (truncation < 1.1e-8 relative); above, ``1 - exp(-y)``
    loses at most 1.6x the error of ``exp``.
    """
    s = tl.minimum(y, 0.5)  # keeps the unused branch finite
    series = s * (1.0 - s * 0.5 * (1.0 - s * (1.0 / 3.0) * (1.0 - s * 0.25 * (1.0 - s * 0.2 * (
        1.0 - s * (1.0 / 6.0) * (1.0 - s * (1.0 / 7.0) * (1.0 - s * 0.125)))))))
    return tl.where(y < 0.5, series, 1.0 - tl.exp(-y))


@triton.jit
def race_weights(w, eligible):
    """float32 race weights of one row (= ``vectorized.race_weights``): ``w`` (any float dtype) over the
    row's largest eligible weight in float64, rounded to float32, at least MIN_RACE_WEIGHT where
    ``eligible``, 0.0 elsewhere."""
    wide = tl.where(eligible, w.to(tl.float64), 0.0)
    top = tl.max(wide, axis=0)
    ratio = (wide / tl.where(top > 0, top, 1.0)).to(tl.float32)
    return tl.where(eligible, tl.maximum(ratio, MIN_RACE_WEIGHT), 0.0)


@triton.jit
def draw_row(index_ptr, ht_ptr, n, seed, weight, eligible, C, budget,
             BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, WITH_WEIGHTS: tl.constexpr):
    """Store the ascending ids of the ``budget`` smallest race keys of row ``n`` (``weight``: its float32
    race weights), then -1s.

    With ``WITH_WEIGHTS`` also store ``1 / q_c`` (``q_c = 1 - exp(-w_c tau)``, ``tau`` the
    ``budget + 1``-th smallest eligible key) at the same slots of ``ht_ptr``: 1.0 when
    ``tau = inf``, at most MAX_KEY, then 0.0s.
    """
    offs_c = tl.arange(0, BLOCK_C)
    u = tl.rand(seed, n * C + offs_c)
    key = tl.minimum(-tl.log(1.0 - u) / tl.where(eligible, weight, 1.0), MAX_KEY)
    key = tl.where(eligible, key, float("inf"))
    k = offs_c[:, None]
    j = offs_c[None, :]
    key_j = key[None, :]
    key_k = key[:, None]
    ahead = (key_j < key_k) | ((key_j == key_k) & (j < k))
    rank = tl.sum(ahead.to(tl.int32), axis=1)
    chosen = eligible & (rank < budget)
    slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
    row = index_ptr + n.to(tl.int64) * budget
    tl.store(row + slot, offs_c.to(tl.int64), mask=chosen)
    if WITH_WEIGHTS:
        tau = tl.min(tl.where(eligible & (rank >= budget), key, float("inf")), axis=0)
        q = one_minus_exp_neg(tl.where(chosen, weight, 1.0) * tau)
        ht = tl.where(tau == float("inf"), 1.0, tl.minimum(1.0 / q, MAX_KEY))
        ht_row = ht_ptr + n.to(tl.int64) * budget
        tl.store(ht_row + slot, ht, mask=chosen)
    count = tl.sum(chosen.to(tl.int32), axis=0)
    for start in range(0, budget, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        pad = (offs_b >= count) & (offs_b < budget)
        tl.store(row + offs_b, tl.full((BLOCK_B,), -1, tl.int64), mask=pad)
        if WITH_WEIGHTS:
            tl.store(ht_row + offs_b, tl.zeros((BLOCK_B,), tl.float32), mask=pad)


@triton.jit
def sample_chunks_kernel(weights_ptr, num_chunks_ptr, seed_ptr, index_ptr, ht_ptr, C, budget,
                         stride_n, stride_c,
                         BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, WITH_WEIGHTS: tl.constexpr):
    n = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    in_row = offs_c < C
    w = tl.load(weights_ptr + n.to(tl.int64) * stride_n + offs_c * stride_c, mask=in_row, other=0.0)
    eligible = in_row & (offs_c < tl.load(num_chunks_ptr + n)) & (w > 0)
    draw_row(index_ptr, ht_ptr, n, tl.load(seed_ptr), race_weights(w, eligible), eligible, C, budget,
             BLOCK_C, BLOCK_B, WITH_WEIGHTS)


@triton.jit
def select_chunks_kernel(grip_ptr, num_steps_ptr, keep_ptr, seed_ptr, labels_ptr, index_ptr, ht_ptr,
                         C, L, budget, stride_n, stride_c, stride_l,
                         close_above, sustain, grip, low, window,
                         BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr,
                         WITH_WEIGHTS: tl.constexpr):
    n = tl.program_id(0)
    label = row_labels(grip_ptr, n, tl.load(num_steps_ptr + n), C, L, stride_n, stride_c, stride_l,
                       close_above, sustain, grip, low, window, BLOCK_C, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    tl.store(labels_ptr + n.to(tl.int64) * C + offs_c, label.to(tl.int8), mask=offs_c < C)
    labeled = label >= 0
    w = tl.load(keep_ptr + tl.maximum(label, 0), mask=labeled, other=0.0)
    eligible = labeled & (w > 0)
    draw_row(index_ptr, ht_ptr, n, tl.load(seed_ptr), race_weights(w, eligible), eligible, C, budget,
             BLOCK_C, BLOCK_B, WITH_WEIGHTS)


def _block_b(budget: int) -> int:
    return min(triton.next_power_of_2(budget), 256)


def launch_sample_chunks(weights, num_chunks, seed, out, ht_out=None):
    """Draw into ``out`` int64 [N, budget] from weights [N, C], num_chunks int64 [N], seed int64 [1].

    With ``ht_out`` float32 [N, budget] (contiguous) also write the threshold weights there and
    return ``(out, ht_out)``.
    """
    N, C = weights.shape
    budget = out.shape[1]
    if N > 0:
        block_c, _ = block_sizes(C, 1)
        sample_chunks_kernel[(N,)](weights, num_chunks, seed, out, ht_out, C, budget, *weights.stride(),
                                   BLOCK_C=block_c, BLOCK_B=_block_b(budget), WITH_WEIGHTS=ht_out is not None)
    return out if ht_out is None else (out, ht_out)


def launch_select_chunks(gripper, num_steps, keep_probs, seed, labels_out, index_out,
                         close_above, sustain, grip, low, window, ht_out=None):
    """Fused labels + weights + draw; writes labels_out int8 [N, C] and index_out int64 [N, budget].
    ``keep_probs``: float [5] (``select_chunks`` passes float64).

    With ``ht_out`` float32 [N, budget] (contiguous) also write the threshold weights there and
    return ``(labels_out, index_out, ht_out)``.
    """
    N, C, L = gripper.shape
    budget = index_out.shape[1]
    if N > 0:
        block_c, block_l = block_sizes(C, L)
        select_chunks_kernel[(N,)](
            gripper, num_steps, keep_probs, seed, labels_out, index_out, ht_out, C, L, budget, *gripper.stride(),
            float32_threshold(close_above), float(sustain), float(grip), float(low), int(window),
            BLOCK_C=block_c, BLOCK_L=block_l, BLOCK_B=_block_b(budget), WITH_WEIGHTS=ht_out is not None,
        )
    return (labels_out, index_out) if ht_out is None else (labels_out, index_out, ht_out)
