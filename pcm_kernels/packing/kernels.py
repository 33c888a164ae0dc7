"""One Triton kernel that copies whole chunks between the dense and the packed layout.

``SCATTER`` (a constexpr) picks the direction, so the same kernel serves the
forward of gather and the backward of scatter (dense -> packed) and the
forward of scatter and the backward of gather (packed -> dense). In the
scatter direction every element of the dense output is written exactly once,
zeros included: no zero-fill pass before it.
"""
import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
                    torch.int16, torch.int32, torch.int64, torch.bool)


@triton.jit
def copy_chunks_kernel(src_ptr, dst_ptr, chunk_ids_ptr, slot_ptr, cu_ptr, C, S, F,
                       stride_n, stride_c, stride_s, stride_f,
                       SCATTER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_F: tl.constexpr):
    """Program (r, s-block, f-block) copies one tile of chunk r.

    Gather: r is the packed chunk; src is the dense [N, C, S, F] tensor with the given strides;
    dst is the packed [T, F] buffer (contiguous). Scatter: r is the dense chunk n*C + c; src is
    the packed [T, F] buffer with row stride ``stride_s`` and feature stride ``stride_f``; dst is
    the dense buffer (contiguous), written in full.
    """
    r = tl.program_id(0).to(tl.int64)
    # 64-bit offsets: a position times a stride passes 2**31 for valid inputs (a permuted
    # [S, N, C, F] activation, a transposed [T, F] gradient)
    offs_s = (tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    offs_f = (tl.program_id(2) * BLOCK_F + tl.arange(0, BLOCK_F)).to(tl.int64)
    in_f = offs_f < F
    if SCATTER:
        m = tl.load(slot_ptr + r)
        kept = m >= 0
        m_safe = tl.maximum(m, 0)
        # cu_seqlens has M + 1 entries: with no chunk kept (M = 0) only entry 0 may be read
        start = tl.load(cu_ptr + m_safe, mask=kept, other=0).to(tl.int64)
        length = tl.load(cu_ptr + m_safe + 1, mask=kept, other=0).to(tl.int64) - start
        src = src_ptr + (start + offs_s)[:, None] * stride_s + offs_f[None, :] * stride_f
        tile = tl.load(src, mask=(offs_s < length)[:, None] & in_f[None, :], other=0)
        dst = dst_ptr + (r * S + offs_s)[:, None] * F + offs_f[None, :]
        tl.store(dst, tile, mask=(offs_s < S)[:, None] & in_f[None, :])
    else:
        chunk = tl.load(chunk_ids_ptr + r)
        n = chunk // C
        c = chunk % C
        start = tl.load(cu_ptr + r).to(tl.int64)
        length = tl.load(cu_ptr + r + 1) - start
        in_tile = (offs_s < length)[:, None] & in_f[None, :]
        src = src_ptr + n * stride_n + c * stride_c + offs_s[:, None] * stride_s + offs_f[None, :] * stride_f
        tile = tl.load(src, mask=in_tile)
        dst = dst_ptr + (start + offs_s)[:, None] * F + offs_f[None, :]
        tl.store(dst, tile, mask=in_tile)


def tile_sizes(seq_len: int, features: int):
    """(BLOCK_S, BLOCK_F): about 4096 elements per program."""
    block_f = min(triton.next_power_of_2(max(features, 1)), 512)
    block_s = min(triton.next_power_of_2(max(seq_len, 1)), max(4096 // block_f, 1))
    return block_s, block_f


def _as_kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def launch_gather(x4: torch.Tensor, out: torch.Tensor, chunk_ids, cu_seqlens, max_seqlen: int):
    """Pack x4 [N, C, S, F] (any strides) into out [T, F] (contiguous)."""
    N, C, S, F = x4.shape
    M = chunk_ids.numel()
    if M == 0 or max_seqlen == 0 or F == 0:
        return out
    block_s, block_f = tile_sizes(max_seqlen, F)
    grid = (M, triton.cdiv(max_seqlen, block_s), triton.cdiv(F, block_f))
    copy_chunks_kernel[grid](_as_kernel_dtype(x4), _as_kernel_dtype(out), chunk_ids, chunk_ids, cu_seqlens,
                             C, S, F, *x4.stride(), SCATTER=False, BLOCK_S=block_s, BLOCK_F=block_f)
    return out


def launch_scatter(values2: torch.Tensor, out4: torch.Tensor, slot, cu_seqlens):
    """Unpack values2 [T, F] (any strides) into out4 [N, C, S, F] (contiguous), zeros elsewhere."""
    N, C, S, F = out4.shape
    if N * C == 0 or S == 0 or F == 0:
        return out4
    block_s, block_f = tile_sizes(S, F)
    grid = (N * C, triton.cdiv(S, block_s), triton.cdiv(F, block_f))
    copy_chunks_kernel[grid](_as_kernel_dtype(values2), _as_kernel_dtype(out4), slot, slot, cu_seqlens,
                             C, S, F, 0, 0, *values2.stride(), SCATTER=True, BLOCK_S=block_s, BLOCK_F=block_f)
    return out4
