"""Triton kernels for budgeted chunk sampling: one program draws one trajectory's chunks.

``select_chunks_kernel`` fuses labeling, the per-phase keep weights and the
draw in one launch; ``sample_chunks_kernel`` draws from given weights. Both
regenerate their uniforms from ``tl.rand(seed, n * C + k)`` with the seed read
from device memory, so no host synchronization is needed.
"""
import triton
import triton.language as tl

from ..phases.kernels import block_sizes, row_labels


@triton.jit
def draw_row(index_ptr, n, seed, weight, eligible, C, budget,
             BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    """Store the ascending ids of the ``budget`` smallest race keys of row ``n``, then -1s."""
    offs_c = tl.arange(0, BLOCK_C)
    u = tl.rand(seed, n * C + offs_c)
    key = tl.minimum(-tl.log(1.0 - u) / tl.where(eligible, weight, 1.0), 3.0e38)
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
    count = tl.sum(chosen.to(tl.int32), axis=0)
    for start in range(0, budget, BLOCK_B):
        offs_b = start + tl.arange(0, BLOCK_B)
        tl.store(row + offs_b, tl.full((BLOCK_B,), -1, tl.int64), mask=(offs_b >= count) & (offs_b < budget))


@triton.jit
def sample_chunks_kernel(weights_ptr, num_chunks_ptr, seed_ptr, index_ptr, C, budget,
                         stride_n, stride_c,
                         BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    n = tl.program_id(0)
    offs_c = tl.arange(0, BLOCK_C)
    in_row = offs_c < C
    w = tl.load(weights_ptr + n.to(tl.int64) * stride_n + offs_c * stride_c, mask=in_row, other=0.0)
    w = w.to(tl.float32)
    eligible = in_row & (offs_c < tl.load(num_chunks_ptr + n)) & (w > 0)
    draw_row(index_ptr, n, tl.load(seed_ptr), w, eligible, C, budget, BLOCK_C, BLOCK_B)


@triton.jit
def select_chunks_kernel(grip_ptr, num_steps_ptr, keep_ptr, seed_ptr, labels_ptr, index_ptr,
                         C, L, budget, stride_n, stride_c, stride_l,
                         close_above, sustain, grip, low, window,
                         BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_B: tl.constexpr):
    n = tl.program_id(0)
    label = row_labels(grip_ptr, n, tl.load(num_steps_ptr + n), C, L, stride_n, stride_c, stride_l,
                       close_above, sustain, grip, low, window, BLOCK_C, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    tl.store(labels_ptr + n.to(tl.int64) * C + offs_c, label.to(tl.int8), mask=offs_c < C)
    labeled = label >= 0
    w = tl.load(keep_ptr + tl.maximum(label, 0), mask=labeled, other=0.0).to(tl.float32)
    draw_row(index_ptr, n, tl.load(seed_ptr), w, labeled & (w > 0), C, budget, BLOCK_C, BLOCK_B)


def _block_b(budget: int) -> int:
    return min(triton.next_power_of_2(budget), 256)


def launch_sample_chunks(weights, num_chunks, seed, out):
    """Draw into ``out`` int64 [N, budget] from weights [N, C], num_chunks int64 [N], seed int64 [1]."""
    N, C = weights.shape
    budget = out.shape[1]
    if N == 0:
        return out
    block_c, _ = block_sizes(C, 1)
    sample_chunks_kernel[(N,)](weights, num_chunks, seed, out, C, budget, *weights.stride(),
                               BLOCK_C=block_c, BLOCK_B=_block_b(budget))
    return out


def launch_select_chunks(gripper, num_steps, keep_probs, seed, labels_out, index_out,
                         close_above, sustain, grip, low, window):
    """Fused labels + weights + draw; writes labels_out int8 [N, C] and index_out int64 [N, budget]."""
    N, C, L = gripper.shape
    budget = index_out.shape[1]
    if N == 0:
        return labels_out, index_out
    block_c, block_l = block_sizes(C, L)
    select_chunks_kernel[(N,)](
        gripper, num_steps, keep_probs, seed, labels_out, index_out, C, L, budget, *gripper.stride(),
        float(close_above), float(sustain), float(grip), float(low), int(window),
        BLOCK_C=block_c, BLOCK_L=block_l, BLOCK_B=_block_b(budget),
    )
    return labels_out, index_out
