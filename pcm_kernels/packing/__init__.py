"""Varlen packing of selected chunks: the inputs a flash-attention varlen call takes, and back."""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .._backend import resolve_backend
from .._checks import check_int, check_same_device, check_shape, check_tensor
from . import vectorized


@dataclass
class PackedChunks:
    """Selected chunks' valid tokens packed back to back, trajectory-major then index order.

    Attributes:
        values: [T, *F] packed tokens of the gathered tensor (None for a bare layout).
        cu_seqlens: int32 [M + 1] token offsets of the M packed chunks.
        max_seqlen: longest packed chunk (tokens).
        position_ids: int64 [T] position of each token inside its chunk (0, 1, ...).
        chunk_ids: int64 [M] ``n * C + c`` of each packed chunk.
        token_chunk_ids: int64 [T] ``n * C + c`` of each packed token.
        slot: int64 [N * C] packed chunk number of each dense chunk, -1 if not gathered.
        num_trajectories, num_chunks, chunk_len: the dense ``N, C, S``.
    """

    values: Optional[torch.Tensor]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor
    chunk_ids: torch.Tensor
    token_chunk_ids: torch.Tensor
    slot: torch.Tensor
    num_trajectories: int
    num_chunks: int
    chunk_len: int

    @property
    def seqlens(self) -> torch.Tensor:
        """int32 [M] tokens per packed chunk."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def trajectory_ids(self) -> torch.Tensor:
        """int64 [M] trajectory of each packed chunk."""
        return self.chunk_ids // self.num_chunks

    @property
    def token_trajectory_ids(self) -> torch.Tensor:
        """int64 [T] trajectory of each packed token."""
        return self.token_chunk_ids // self.num_chunks

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Pack another [N, C, S, *F] tensor with this layout; differentiable in ``x``."""
        _check_dense("x", x, self)
        return _GatherChunks.apply(x, self)


def _check_dense(name: str, x: torch.Tensor, layout: PackedChunks) -> None:
    check_tensor(name, x, min_ndim=3)
    expected = (layout.num_trajectories, layout.num_chunks, layout.chunk_len)
    if tuple(x.shape[:3]) != expected:
        raise ValueError(f"{name} must have leading shape [N, C, S] = {expected}, got {tuple(x.shape)}")
    check_same_device(**{name: x, "layout": layout.cu_seqlens})


def plan_chunks(index: torch.Tensor, num_chunks: int, chunk_len: int,
                seqlens: Optional[torch.Tensor] = None) -> PackedChunks:
    """Packing layout (no values) for ``index`` [N, B] over chunks of ``chunk_len`` tokens.

    Args:
        index: int [N, B] chunk ids per trajectory, each -1 (none) or in ``[0, num_chunks)``,
            no id twice in a row.
        num_chunks: int >= 0, the dense ``C``.
        chunk_len: int >= 0, the dense ``S`` (tokens per chunk).
        seqlens: int [N, C] valid leading tokens per chunk, in ``[0, S]`` (default S), on
            ``index``'s device.

    One host synchronization (for T and max_seqlen, which allocation and flash-attention need);
    the range checks of ``index`` and ``seqlens`` share it.
    """
    check_tensor("index", index, ndim=2, integer=True)
    num_chunks = check_int("num_chunks", num_chunks, minimum=0)
    chunk_len = check_int("chunk_len", chunk_len, minimum=0)
    N = index.shape[0]
    device = index.device
    if seqlens is not None:
        check_tensor("seqlens", seqlens, ndim=2, integer=True)
        check_shape("seqlens", seqlens, (N, num_chunks), "[N, C]")
        check_same_device(index=index, seqlens=seqlens)
    index = index.to(torch.int64)
    keep = index >= 0
    traj = torch.arange(N, device=device).view(N, 1).expand_as(index)
    chunk_ids = traj[keep] * num_chunks + index[keep]
    if seqlens is None:
        lengths = torch.full_like(chunk_ids, chunk_len)
    else:
        lengths = seqlens.reshape(-1).to(torch.int64)[chunk_ids.clamp(0, max(N * num_chunks - 1, 0))]
    sorted_rows = torch.sort(torch.where(keep, index, -1 - torch.arange(index.shape[1], device=device)), 1).values
    checks = torch.stack([
        (index < -1).sum() + (index >= num_chunks).sum(),
        (sorted_rows[:, 1:] == sorted_rows[:, :-1]).sum() if index.shape[1] > 1 else index.new_zeros(()),
        ((seqlens < 0) | (seqlens > chunk_len)).sum() if seqlens is not None else index.new_zeros(()),
        lengths.sum(),
        lengths.max() if lengths.numel() else index.new_zeros(()),
    ]).tolist()
    bad_range, duplicates, bad_seqlens, total, max_seqlen = checks
    if bad_range:
        raise ValueError(f"index values must be -1 or in [0, {num_chunks}), got range "
                         f"[{int(index.min())}, {int(index.max())}]")
    if duplicates:
        raise ValueError("index rows must not repeat a chunk id")
    if bad_seqlens:
        raise ValueError(f"seqlens must be in [0, {chunk_len}] (S), got range [{int(seqlens.min())}, {int(seqlens.max())}]")
    cu_seqlens = torch.zeros(chunk_ids.numel() + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = lengths.cumsum(0)
    token_chunk_ids = torch.repeat_interleave(chunk_ids, lengths, output_size=total)
    starts = torch.repeat_interleave(cu_seqlens[:-1].to(torch.int64), lengths, output_size=total)
    position_ids = torch.arange(total, device=device) - starts
    slot = torch.full((N * num_chunks,), -1, dtype=torch.int64, device=device)
    slot[chunk_ids] = torch.arange(chunk_ids.numel(), device=device)
    return PackedChunks(None, cu_seqlens, int(max_seqlen), position_ids, chunk_ids, token_chunk_ids, slot,
                        N, num_chunks, chunk_len)


def _flat_features(t: torch.Tensor, lead: int) -> torch.Tensor:
    """View t [*lead dims, *F] as [*lead dims, prod(F)], copying only if F's strides don't collapse."""
    feature_shape = t.shape[lead:]
    try:
        return t.view(*t.shape[:lead], math.prod(feature_shape))
    except RuntimeError:
        return t.contiguous().view(*t.shape[:lead], math.prod(feature_shape))


def _use_triton(t: torch.Tensor) -> bool:
    if resolve_backend(t.device) != "triton":
        return False
    from .kernels import SUPPORTED_DTYPES

    return t.dtype in SUPPORTED_DTYPES


def _gather(x: torch.Tensor, layout: PackedChunks) -> torch.Tensor:
    T = layout.token_chunk_ids.numel()
    feature_shape = x.shape[3:]
    if not _use_triton(x):
        return vectorized.gather(x, layout.token_chunk_ids, layout.position_ids)
    from .kernels import launch_gather

    x4 = _flat_features(x, 3)
    out = torch.empty(T, x4.shape[3], dtype=x.dtype, device=x.device)
    launch_gather(x4, out, layout.chunk_ids, layout.cu_seqlens, layout.max_seqlen)
    return out.view(T, *feature_shape)


def _scatter(values: torch.Tensor, layout: PackedChunks) -> torch.Tensor:
    shape = (layout.num_trajectories, layout.num_chunks, layout.chunk_len) + tuple(values.shape[1:])
    if not _use_triton(values):
        return vectorized.scatter(values, layout.token_chunk_ids, layout.position_ids, shape)
    from .kernels import launch_scatter

    values2 = _flat_features(values, 1)
    out = torch.empty(shape[:3] + (values2.shape[1],), dtype=values.dtype, device=values.device)
    launch_scatter(values2, out, layout.slot, layout.cu_seqlens)
    return out.view(shape)


class _GatherChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout):
        ctx.layout = layout
        return _gather(x, layout)

    @staticmethod
    def backward(ctx, grad_values):
        return _scatter(grad_values, ctx.layout), None


class _ScatterChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, layout):
        ctx.layout = layout
        return _scatter(values, layout)

    @staticmethod
    def backward(ctx, grad_dense):
        return _gather(grad_dense, ctx.layout), None


def gather_chunks(x: torch.Tensor, index: torch.Tensor, seqlens: Optional[torch.Tensor] = None) -> PackedChunks:
    """Pack the chunks named in ``index`` (their first ``seqlens`` tokens) back to back.

    Args:
        x: [N, C, S, *F] any dtype, contiguous or not (values are data: NaN/inf are copied).
        index: int [N, B] chunk ids per trajectory (as ``sample_chunks`` returns), -1 = none,
            else in ``[0, C)``, no id twice in a row; on ``x``'s device.
        seqlens: int [N, C] valid leading tokens per chunk, in [0, S] (default S); on ``x``'s device.

    Returns:
        ``PackedChunks`` with ``values`` [T, *F] (differentiable in ``x``: the backward
        writes the gradient into a dense [N, C, S, *F] buffer in one kernel).
    """
    check_tensor("x", x, min_ndim=3)
    N, C, S = x.shape[:3]
    check_tensor("index", index, ndim=2, integer=True)
    if index.shape[0] != N:
        raise ValueError(f"index must have shape [N, B] with N = {N} (x is {tuple(x.shape)}), got {tuple(index.shape)}")
    if seqlens is not None:
        check_tensor("seqlens", seqlens, ndim=2, integer=True)
    check_same_device(x=x, index=index, seqlens=seqlens)
    layout = plan_chunks(index, C, S, seqlens)
    layout.values = _GatherChunks.apply(x, layout)
    return layout


def scatter_chunks(values: torch.Tensor, packed: PackedChunks) -> torch.Tensor:
    """Inverse of ``gather_chunks``: values [T, *F] -> dense [N, C, S, *F], zeros elsewhere.

    Differentiable in ``values``.
    """
    if not isinstance(packed, PackedChunks):
        raise TypeError(f"packed must be a PackedChunks, got {type(packed).__name__}")
    check_tensor("values", values, min_ndim=1)
    T = packed.token_chunk_ids.numel()
    if values.shape[0] != T:
        raise ValueError(f"values must have T = {T} rows (the packed tokens), got shape {tuple(values.shape)}")
    check_same_device(values=values, packed=packed.cu_seqlens)
    return _ScatterChunks.apply(values, packed)
