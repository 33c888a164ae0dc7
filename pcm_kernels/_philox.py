"""Triton's ``tl.rand(seed, offset)`` reproduced in torch: the reference for the kernels' RNG.

Philox-4x32-10 on int64 tensors holding uint32 values, then Triton's
uint-to-float mapping. The tests feed these uniforms to the torch sampling path
to check the Triton kernels draw for draw; ``draw_seed`` gives the kernels
their seed without a host synchronization.
"""
import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_FLOAT_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: int, x: torch.Tensor):
    """(high, low) 32-bit halves of ``a * x`` for a 32-bit constant and uint32 values in int64."""
    p_hi = a * (x >> 16)
    p_lo = a * (x & 0xFFFF)
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return high, low


def philox_uniform(seed: torch.Tensor, offset: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """float32 uniforms in [0, 1) equal to ``tl.rand(seed, offset)`` for int32 offsets.

    Args:
        seed: int64 tensor with one element (any value; used as uint64).
        offset: int64 tensor of offsets in [0, 2**31).
    """
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = offset.to(torch.int64) & _MASK32
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_FLOAT_SCALE, dtype=torch.float32)


def draw_seed(generator, device: torch.device) -> torch.Tensor:
    """One int64 seed on ``device`` from ``generator`` (no host synchronization)."""
    return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)
