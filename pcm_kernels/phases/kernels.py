"""Triton kernel for phase labels: one program labels one trajectory.

``row_labels`` is a ``@triton.jit`` helper shared with the fused selection
kernel in ``pcm_kernels.sampling.kernels``. Window searches run as
``[BLOCK_C, BLOCK_C]`` comparisons in registers, so one program holds a whole
trajectory (``C <= MAX_CHUNKS``).
"""
import torch
import triton
import triton.language as tl

from .vectorized import float32_threshold

MAX_CHUNKS = 256


@triton.jit
def row_labels(grip_ptr, n, num_steps, C, L, stride_n, stride_c, stride_l,
               close_above, sustain, grip, low, window,
               BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """int32 [BLOCK_C] labels of trajectory ``n`` (-1 for chunks without a valid step)."""
    offs_c = tl.arange(0, BLOCK_C)
    offs_l = tl.arange(0, BLOCK_L)
    step = offs_c[:, None] * L + offs_l[None, :]
    valid = (offs_c[:, None] < C) & (offs_l[None, :] < L) & (step < num_steps)
    ptrs = grip_ptr + n.to(tl.int64) * stride_n + offs_c[:, None] * stride_c + offs_l[None, :] * stride_l
    g = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)  # float32 compare for every input dtype
    closed = tl.sum(((g > close_above) & valid).to(tl.int32), axis=1)
    count = tl.sum(valid.to(tl.int32), axis=1)
    gf = tl.math.div_rn(closed.to(tl.float32), tl.maximum(count, 1).to(tl.float32))
    chunk_valid = count > 0
    in_grasp = (chunk_valid & (gf >= sustain)).to(tl.int32)

    # rows k (axis 0) against columns j (axis 1)
    k = offs_c[:, None]
    j = offs_c[None, :]
    grasp_k = in_grasp[:, None]
    before = tl.sum(tl.where(k == j - 1, grasp_k, 0), axis=0)  # in_grasp[j - 1]
    after = tl.sum(tl.where(k == j + 1, grasp_k, 0), axis=0)  # in_grasp[j + 1]
    starts = ((in_grasp > 0) & (before == 0))[None, :]
    ends = ((in_grasp > 0) & (after == 0))[None, :]
    pre = tl.sum((starts & (j > k) & (j - k <= window)).to(tl.int32), axis=1) > 0
    release = tl.sum((ends & (j < k) & (k - j <= window)).to(tl.int32), axis=1) > 0
    later_start = tl.sum((starts & (j > k)).to(tl.int32), axis=1) > 0
    never_grasps = tl.sum(in_grasp, axis=0) == 0

    label = tl.where(later_start | never_grasps, 0, 4)
    label = tl.where(release, 3, label)
    label = tl.where(pre & (gf >= low), 1, label)
    label = tl.where(gf >= grip, 2, label)
    return tl.where(chunk_valid, label, -1)


@triton.jit
def label_phases_kernel(grip_ptr, num_steps_ptr, labels_ptr, C, L,
                        stride_n, stride_c, stride_l,
                        close_above, sustain, grip, low, window,
                        BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    n = tl.program_id(0)
    num_steps = tl.load(num_steps_ptr + n)
    label = row_labels(grip_ptr, n, num_steps, C, L, stride_n, stride_c, stride_l,
                       close_above, sustain, grip, low, window, BLOCK_C, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_C)
    tl.store(labels_ptr + n.to(tl.int64) * C + offs_c, label.to(tl.int8), mask=offs_c < C)


def block_sizes(num_chunks: int, steps_per_chunk: int):
    """(BLOCK_C, BLOCK_L) for one program per trajectory."""
    if num_chunks > MAX_CHUNKS:
        raise ValueError(f"the Triton path supports up to {MAX_CHUNKS} chunks per trajectory, got {num_chunks}; "
                         "use PCM_KERNELS_BACKEND=torch")
    return triton.next_power_of_2(num_chunks), triton.next_power_of_2(steps_per_chunk)


def launch_label_phases(gripper, num_steps, out, close_above, sustain, grip, low, window):
    """Write int8 labels of gripper [N, C, L] into ``out`` [N, C] (contiguous)."""
    N, C, L = gripper.shape
    if N == 0 or C == 0:
        return out
    block_c, block_l = block_sizes(C, L)
    label_phases_kernel[(N,)](
        gripper, num_steps, out, C, L, *gripper.stride(),
        float32_threshold(close_above), float(sustain), float(grip), float(low), int(window),
        BLOCK_C=block_c, BLOCK_L=block_l,
    )
    return out
