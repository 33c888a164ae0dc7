"""Vectorized torch path for varlen chunk gather/scatter (advanced indexing)."""
import torch


def gather(x: torch.Tensor, token_chunk_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """values [T, *F] = x[n, c, s] for each packed token (chunk n*C + c, position s)."""
    C = x.shape[1]
    return x[token_chunk_ids // C, token_chunk_ids % C, position_ids]


def scatter(values: torch.Tensor, token_chunk_ids: torch.Tensor, position_ids: torch.Tensor, shape) -> torch.Tensor:
    """Dense [N, C, S, *F]: zeros, with each packed token written back to its place."""
    C = shape[1]
    out = values.new_zeros(shape)
    out[token_chunk_ids // C, token_chunk_ids % C, position_ids] = values
    return out
