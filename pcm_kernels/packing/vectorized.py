"""Vectorized torch path for varlen chunk gather/scatter (row index_select / index_copy)."""
import torch


def _token_rows(shape, token_chunk_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Row of each packed token in the [N * C * S, ...] view of a dense tensor."""
    return token_chunk_ids * shape[2] + position_ids


def gather(x: torch.Tensor, token_chunk_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """values [T, *F] = x[n, c, s] for each packed token (chunk n*C + c, position s)."""
    N, C, S = x.shape[:3]
    try:
        rows = x.view(N * C * S, *x.shape[3:])
    except RuntimeError:  # N, C, S strides do not collapse: index the three dims
        return x[token_chunk_ids // C, token_chunk_ids % C, position_ids]
    return rows.index_select(0, _token_rows(x.shape, token_chunk_ids, position_ids))


def scatter(values: torch.Tensor, token_chunk_ids: torch.Tensor, position_ids: torch.Tensor, shape) -> torch.Tensor:
    """Dense [N, C, S, *F]: zeros, with each packed token written back to its place."""
    out = values.new_zeros(shape)
    out.view(-1, *shape[3:]).index_copy_(0, _token_rows(shape, token_chunk_ids, position_ids), values)
    return out
