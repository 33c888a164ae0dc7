"""Non-causal attention for transformers' Llama: padded batches and packed (varlen) chunks.

Importing this module registers ``ATTENTION_NAME`` with transformers' ``AttentionInterface``
(the attention function) and ``AttentionMaskInterface`` (mask construction, reusing the SDPA
boolean mask builder). A ``LlamaModel`` whose config has ``_attn_implementation = ATTENTION_NAME``
and ``is_causal = False`` then attends bidirectionally:

* padded batch ``[B, L]``: pass ``key_padding_mask(lengths, L)`` (bool [B, 1, 1, L], which transformers
  passes through as-is) as the model's ``attention_mask`` and ``bidirectional_attention`` runs SDPA with
  it, broadcast over the queries; a 2D padding mask works too (transformers then builds the full
  [B, 1, L, L] mask with ``create_bidirectional_mask``: the same result, more work per call);
* packed sequences ``[1, total]``: pass ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 [M+1]) and
  ``max_length_q``/``max_length_k`` (int) as keyword arguments of the model call (transformers
  forwards them to every attention layer) and no attention mask; each chunk attends only to itself.
"""
import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

ATTENTION_NAME = "pcm_bidirectional"
FLASH, PADDED_SDPA = "flash_attn_varlen", "sdpa_padded"

logger = logging.getLogger(__name__)
_reported: set[tuple[str, str]] = set()


def packed_attention_path(query: torch.Tensor) -> tuple[str, str]:
    """(path, reason) the packed attention takes for ``query``: ``FLASH`` (flash-attn's varlen kernel,
    fp16/bf16 CUDA tensors with flash-attn installed) or ``PADDED_SDPA`` (chunks scattered into a padded
    batch for torch SDPA: more memory and time on a GPU)."""
    if not query.is_cuda:
        return PADDED_SDPA, "CPU tensors"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return PADDED_SDPA, f"{query.dtype} (flash-attn takes fp16/bf16)"
    if flash_attn_varlen_func is None:
        return PADDED_SDPA, "flash-attn is not installed (pip install flash-attn --no-build-isolation)"
    return FLASH, "fp16/bf16 CUDA tensors, flash-attn installed"


def _report(path: str, reason: str) -> None:
    """Log each (path, reason) once per process: a GPU run says which attention it got, and why."""
    if (path, reason) not in _reported:
        _reported.add((path, reason))
        level = logging.WARNING if path == PADDED_SDPA and "not installed" in reason else logging.INFO
        logger.log(level, "packed attention: %s (%s)", path, reason)


def _check_packed_shapes(query, key, value, cu_seqlens):
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise ValueError("query, key, value must be [total, heads, head_dim]; got shapes "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]:
        raise ValueError(f"key and value must be [total, kv_heads, head_dim] matching query {tuple(query.shape)}; "
                         f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be an int32 tensor [M+1] with M >= 1, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens))} {tuple(getattr(cu_seqlens, 'shape', ()))}")


def key_padding_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of ``width`` tokens whose first ``lengths`` (int [B]) are real -> the attention mask bool
    [B, 1, 1, width] (True = attend to that key). Query rows past a row's length attend to its real keys and
    are discarded by the caller."""
    return (torch.arange(width, device=lengths.device) < lengths[:, None])[:, None, None, :]


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int) -> None:
    """Value check (one device sync): cu_seqlens int32 [M+1] starts at 0, increases strictly, ends at
    ``total``, and ``max_seqlen`` is its longest chunk. Raises ValueError naming the argument."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != total or min(lengths) <= 0:
        raise ValueError(f"cu_seqlens must start at 0, increase strictly and end at total={total}; got {bounds}")
    if max_seqlen != max(lengths):
        raise ValueError(f"max_seqlen must be the longest chunk ({max(lengths)}), got {max_seqlen}")


def varlen_bidirectional_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   cu_seqlens: torch.Tensor, max_seqlen: int, *, scale: float | None = None,
                                   dropout: float = 0.0) -> torch.Tensor:
    """Block-diagonal, non-causal attention over packed chunks.

    query [total, heads, d], key/value [total, kv_heads, d] (float, heads a multiple of kv_heads),
    cu_seqlens int32 [M+1] (chunk m is rows cu_seqlens[m]:cu_seqlens[m+1]), max_seqlen int = longest
    chunk. Returns [total, heads, d] in query's dtype, equal to attending within each chunk separately.

    Uses ``flash_attn_varlen_func(causal=False)`` for fp16/bf16 CUDA tensors when flash-attn is
    installed; otherwise scatters the chunks into a padded [M, heads, max_seqlen, d] batch and runs
    SDPA with a key-padding mask (``packed_attention_path`` says which, and the first use of each
    path is logged with the reason).
    """
    _check_packed_shapes(query, key, value, cu_seqlens)
    check_cu_seqlens(cu_seqlens, query.shape[0], max_seqlen)
    return _packed_attention(query, key, value, cu_seqlens, max_seqlen, scale, dropout)


def _packed_attention(query, key, value, cu_seqlens, max_seqlen, scale, dropout):
    path, reason = packed_attention_path(query)
    _report(path, reason)
    if path == FLASH:
        return flash_attn_varlen_func(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      dropout_p=dropout, softmax_scale=scale, causal=False)

    total, num_chunks = query.shape[0], cu_seqlens.numel() - 1
    lengths = cu_seqlens.diff()
    chunk = torch.repeat_interleave(torch.arange(num_chunks, device=query.device), lengths, output_size=total)
    offset = torch.arange(total, device=query.device) - cu_seqlens[:-1].long()[chunk]

    def to_padded(packed: torch.Tensor) -> torch.Tensor:
        padded = packed.new_zeros(num_chunks, max_seqlen, *packed.shape[1:])
        return padded.index_put((chunk, offset), packed).transpose(1, 2)  # [M, heads, max_len, d]

    out = F.scaled_dot_product_attention(
        to_padded(query), to_padded(key), to_padded(value), attn_mask=key_padding_mask(lengths, max_seqlen),
        dropout_p=dropout, scale=scale, is_causal=False, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)[chunk, offset]


def bidirectional_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                            max_length_q: int | None = None, max_length_k: int | None = None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface`` signature), never causal.

    query [B, heads, L, d], key/value [B, kv_heads, L, d]; ``attention_mask`` None or bool
    [B, 1, L or 1, L] (True = attend; ``key_padding_mask`` builds the second). With ``cu_seq_lens_q``
    the batch must be one packed row (B = 1, no mask) and attention is block-diagonal over its chunks;
    only shapes are checked here (this runs once per layer: no device sync), the caller checks the
    values once with ``check_cu_seqlens`` and passes the same ``cu_seq_lens_k`` tensor (or none).
    Returns ([B, L, heads, d], None).
    """
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling, is_causal=False,
                                             enable_gqa=key.shape[1] != query.shape[1])
        return out.transpose(1, 2), None
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("packed attention (cu_seq_lens_q given) needs batch size 1 and no attention_mask; got "
                         f"batch {query.shape[0]}, attention_mask {'set' if attention_mask is not None else 'None'}")
    if (cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q
            and cu_seq_lens_k.shape != cu_seq_lens_q.shape) or \
            (max_length_k is not None and max_length_k != max_length_q):
        raise ValueError("cu_seq_lens_k/max_length_k must equal cu_seq_lens_q/max_length_q (self-attention)")
    if max_length_q is None:
        raise ValueError("max_length_q (int, longest chunk) is required with cu_seq_lens_q")
    packed = [t[0].transpose(0, 1) for t in (query, key, value)]
    _check_packed_shapes(*packed, cu_seq_lens_q)
    out = _packed_attention(*packed, cu_seq_lens_q, max_length_q, scaling, dropout)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, bidirectional_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
