"""Action-token log-probs and sampling, shared by every policy class."""
from __future__ import annotations

import torch

from pcm_train.policies.action_tokens import NUM_ACTION_BINS, tokens_to_normalized


def check_int_tensor(name: str, value, ndim: int, described: str) -> None:
    """ValueError unless ``value`` is an integer tensor of rank ``ndim`` (``described`` names its shape)."""
    if not isinstance(value, torch.Tensor) or value.dim() != ndim or value.is_floating_point() \
            or value.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor {described}, got "
                         f"{getattr(value, 'dtype', type(value))} {tuple(getattr(value, 'shape', ()))}")


def check_packed_prompts(prompt_ids, prompt_cu_seqlens) -> list[int]:
    """ValueError unless prompt_ids is an integer tensor [Tp] and prompt_cu_seqlens an int32 tensor [M+1]
    with M >= 1 that starts at 0, increases strictly and ends at Tp (one device sync); returns the M
    prompt lengths."""
    check_int_tensor("prompt_ids", prompt_ids, 1, "[Tp]")
    if not isinstance(prompt_cu_seqlens, torch.Tensor) or prompt_cu_seqlens.dim() != 1 \
            or prompt_cu_seqlens.dtype != torch.int32 or prompt_cu_seqlens.numel() < 2:
        raise ValueError("prompt_cu_seqlens must be an int32 tensor [M+1] with M >= 1, got "
                         f"{getattr(prompt_cu_seqlens, 'dtype', None)} "
                         f"{tuple(getattr(prompt_cu_seqlens, 'shape', ()))}")
    bounds = prompt_cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != prompt_ids.numel() or min(lengths) <= 0:
        raise ValueError(f"prompt_cu_seqlens must start at 0, increase strictly and end at "
                         f"len(prompt_ids)={prompt_ids.numel()}; got {bounds}")
    return lengths


def sample_bins(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One draw per token from probs float [B, A, K] -> int64 [B, A].

    ``generator``: a ``torch.Generator`` (or None) shared by all rows (``torch.multinomial``), or a sequence
    of B CPU generators, one per row: row b then draws its A uniforms from its own generator and takes the
    inverse CDF, so its tokens depend only on its own stream and probs, not on which other rows share the
    batch, their order or the device (the uniforms are drawn on the CPU)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:-1])
    generators = list(generator)
    if len(generators) != probs.shape[0] or not all(isinstance(g, torch.Generator) and g.device.type == "cpu"
                                                    for g in generators):
        raise ValueError(f"generator must be a torch.Generator, None or {probs.shape[0]} CPU generators (one per "
                         f"row), got {len(generators)} items")
    uniforms = torch.stack([torch.rand(probs.shape[1], generator=g, dtype=torch.float64) for g in generators])
    cdf = probs.double().cumsum(-1)
    targets = (uniforms.to(probs.device) * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


class ActionTokensMixin:
    """For a policy with ``action_logits(input_ids, attention_mask, pixel_values) -> [B, A, 256]`` and a
    ``config`` holding ``num_action_tokens``, ``action_token_start``, ``vocab_size``, ``action_chunk`` and
    ``action_dim``."""

    def log_probs(self, logits: torch.Tensor, responses: torch.Tensor, temperature: float) -> torch.Tensor:
        """Per-token log-probs: logits float [*, A, 256], responses int action token ids [*, A],
        temperature > 0 -> float [*, A] = log_softmax(logits / temperature) at responses - action_token_start."""
        expected = (self.config.num_action_tokens, NUM_ACTION_BINS)
        if not isinstance(logits, torch.Tensor) or logits.dim() < 2 or tuple(logits.shape[-2:]) != expected:
            raise ValueError(f"logits must be [*, A, 256] with (A, 256) = {expected}, "
                             f"got {tuple(getattr(logits, 'shape', ()))}")
        check_int_tensor("responses", responses, logits.dim() - 1, f"{tuple(logits.shape[:-1])}")
        if responses.shape != logits.shape[:-1]:
            raise ValueError(f"responses must have shape {tuple(logits.shape[:-1])}, got {tuple(responses.shape)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        bins = responses.long() - self.config.action_token_start
        if bool(((bins < 0) | (bins >= NUM_ACTION_BINS)).any()):
            raise ValueError("responses must be action token ids in "
                             f"[{self.config.action_token_start}, {self.config.vocab_size})")
        log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
        return log_probs.gather(-1, bins.unsqueeze(-1)).squeeze(-1)

    def _sample(self, input_ids, attention_mask, pixel_values, temperature, greedy, generator):
        """Sample (or argmax) one chunk per row at ``temperature``: (logits float32 [B, A, 256], responses
        int64 [B, A], normalized actions float32 [B, action_chunk, action_dim] in [-1, 1]). ``generator``: as
        ``sample_bins``."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        cfg = self.config
        logits = self.action_logits(input_ids, attention_mask, pixel_values).float()
        bins = logits.argmax(-1) if greedy else sample_bins(torch.softmax(logits / temperature, dim=-1), generator)
        responses = bins + cfg.action_token_start
        normalized = tokens_to_normalized(responses, cfg.action_token_start).view(-1, cfg.action_chunk, cfg.action_dim)
        return logits, responses, normalized
