"""Backend choice: Triton kernels for CUDA tensors, vectorized torch for CPU tensors.

``PCM_KERNELS_BACKEND=torch|triton|auto`` (read at every call) overrides the
choice. ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` set before
``pcm_kernels`` is imported (the interpreter is chosen when kernels are
decorated).
"""
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(device: torch.device) -> str:
    """Return ``"torch"`` or ``"triton"`` for tensors on ``device``."""
    choice = os.environ.get("PCM_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"PCM_KERNELS_BACKEND must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"PCM_KERNELS_BACKEND=triton on {device.type} tensors needs TRITON_INTERPRET=1 "
            "set before pcm_kernels is imported (or use CUDA tensors)"
        )
    return choice
