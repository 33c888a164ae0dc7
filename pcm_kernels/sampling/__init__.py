"""Budgeted weighted chunk sampling without replacement (Plackett-Luce via Gumbel-top-k).

Optionally with the threshold (Horvitz-Thompson) weights that make sums over the kept
chunks unbiased: W. Kool, H. van Hoof, M. Welling, "Stochastic Beams and Where to Find
Them" (ICML 2019) and "Estimating Gradients for Discrete Random Variables by Sampling
without Replacement" (ICLR 2020).
"""
from typing import Optional, Sequence, Union

import torch

from .._backend import resolve_backend
from .._checks import check_int, check_same_device, check_shape, check_tensor
from .._philox import draw_seed
from ..phases import Phase, prepare_label_args
from ..phases import vectorized as phase_vectorized
from . import vectorized


def _check_weights(name: str, weights: torch.Tensor, validate: bool) -> None:
    if validate and weights.numel() and not bool((torch.isfinite(weights) & (weights >= 0)).all()):
        bad = weights[~(torch.isfinite(weights) & (weights >= 0))][0].item()
        raise ValueError(f"{name} must be finite and >= 0, found {bad}")


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def sample_chunks(weights: torch.Tensor, budget: int, num_chunks: Optional[torch.Tensor] = None, *,
                  generator: Optional[torch.Generator] = None, validate: bool = True,
                  return_weights: bool = False):
    """Draw up to ``budget`` distinct chunks per trajectory, weighted, without replacement.

    Eligible chunks are ``k < num_chunks[n]`` with ``weights[n, k] > 0``; each row gets
    ``min(budget, #eligible)`` of them with Plackett-Luce probabilities (repeatedly pick
    with probability proportional to the remaining weights). The draw is an exponential
    race: keys ``E_c / w_c``, ``E_c ~ Exp(1)``, the ``budget`` smallest are kept.

    Threshold weights (Kool, van Hoof & Welling, ICML 2019 and ICLR 2020): with ``tau`` the
    ``budget + 1``-th smallest eligible key of the row (``inf`` if it has <= budget eligible),
    chunk c is kept with probability ``q_c = 1 - exp(-w_c * tau)`` given ``tau``, so for any
    fixed ``x``, ``E[sum_j x[n, index[n, j]] * ht_weights[n, j]] = sum_{c eligible} x[n, c]``.
    ``w_c`` is the weight in float32, as the race uses it.

    Args:
        weights: float [N, C] non-negative finite weights (any float dtype, any strides).
        budget: chunks to draw per trajectory, >= 1.
        num_chunks: int [N] valid chunks per trajectory (default C).
        generator: torch.Generator on the weights' device; same state, same draw (on a given
            backend: the Triton kernels regenerate their uniforms from a seed drawn from it,
            the torch path draws them with ``torch.rand``).
        validate: check weights for NaN/inf/negatives. On CUDA this costs one host
            synchronization; pass False for a sync-free call.
        return_weights: also return the threshold weights (same draw as without; the Triton
            kernel computes them in the same launch).

    Returns:
        ``index`` int64 [N, budget]: chosen chunk ids ascending, then -1. With
        ``return_weights``, ``(index, ht_weights)``, ``ht_weights`` float32 [N, budget]:
        ``1 / q_c`` per kept chunk (exactly 1.0 where the row kept all its eligible chunks,
        finite: at most 3e38), 0.0 at the -1s.
    """
    check_tensor("weights", weights, ndim=2, floating=True)
    check_int("budget", budget, minimum=1)
    _check_bool("return_weights", return_weights)
    N, C = weights.shape
    if num_chunks is None:
        num_chunks = torch.full((N,), C, dtype=torch.int64, device=weights.device)
    else:
        check_tensor("num_chunks", num_chunks, ndim=1, integer=True)
        check_shape("num_chunks", num_chunks, (N,), "[N] (weights is [N, C])")
        check_same_device(weights=weights, num_chunks=num_chunks)
        num_chunks = num_chunks.to(torch.int64)
    _check_weights("weights", weights, validate)
    if resolve_backend(weights.device) == "triton" and C > 0:
        from .kernels import launch_sample_chunks

        out = torch.empty(N, budget, dtype=torch.int64, device=weights.device)
        ht = torch.empty(N, budget, dtype=torch.float32, device=weights.device) if return_weights else None
        return launch_sample_chunks(weights, num_chunks, draw_seed(generator, weights.device), out, ht)
    eligible = (torch.arange(C, device=weights.device) < num_chunks.view(N, 1)) & (weights > 0)
    uniforms = torch.rand(N, C, generator=generator, device=weights.device)
    if return_weights:
        return vectorized.sample_with_weights(weights, eligible, budget, uniforms)
    return vectorized.sample(weights, eligible, budget, uniforms)


def _keep_probs_tensor(keep_probs, device) -> torch.Tensor:
    if not isinstance(keep_probs, torch.Tensor):
        keep_probs = torch.as_tensor(keep_probs, dtype=torch.float32)
    check_tensor("keep_probs", keep_probs, ndim=1, floating=True)
    check_shape("keep_probs", keep_probs, (len(Phase),), "[P] (one per Phase)")
    if keep_probs.device.type == "cpu":
        _check_weights("keep_probs", keep_probs, True)
    return keep_probs.to(device=device, dtype=torch.float32)


def select_chunks(gripper: torch.Tensor, num_steps: Optional[torch.Tensor],
                  keep_probs: Union[torch.Tensor, Sequence[float]], budget: int, *,
                  generator: Optional[torch.Generator] = None, close_above: float = 0.0,
                  sustain: float = 0.75, grip: float = 0.5, low: float = 0.1, window: int = 3,
                  return_weights: bool = False):
    """Label chunks, weight them by their phase's keep probability and draw ``budget`` per row.

    The path the trainer uses: one kernel launch on CUDA. Same distribution as
    ``label_phases`` then ``sample_chunks(keep_probs[labels], budget, ...)``, and the same draw
    for the same generator state on the same backend.

    Args:
        gripper: float [N, C, L] executed env-space gripper commands (see ``label_phases``).
        num_steps: int [N] env steps executed, or None for all.
        keep_probs: float [5] keep probability per ``Phase`` (a CPU tensor or a sequence is
            validated for free; a CUDA tensor is used as is).
        budget: chunks to draw per trajectory, >= 1.
        return_weights: also return the threshold weights (see ``sample_chunks``).

    Returns:
        ``(labels int8 [N, C], index int64 [N, budget])``, with ``return_weights``
        ``(labels, index, ht_weights float32 [N, budget])``.
    """
    num_steps = prepare_label_args(gripper, num_steps, close_above, sustain, grip, low, window)
    check_int("budget", budget, minimum=1)
    _check_bool("return_weights", return_weights)
    keep = _keep_probs_tensor(keep_probs, gripper.device)
    N, C, _ = gripper.shape
    if resolve_backend(gripper.device) == "triton" and C > 0:
        from .kernels import launch_select_chunks

        labels = torch.empty(N, C, dtype=torch.int8, device=gripper.device)
        index = torch.empty(N, budget, dtype=torch.int64, device=gripper.device)
        ht = torch.empty(N, budget, dtype=torch.float32, device=gripper.device) if return_weights else None
        return launch_select_chunks(gripper, num_steps, keep, draw_seed(generator, gripper.device), labels, index,
                                    close_above, sustain, grip, low, window, ht)
    labels = phase_vectorized.label_phases(gripper, num_steps, close_above, sustain, grip, low, window)
    labeled = labels >= 0
    weights = torch.where(labeled, keep[labels.long().clamp(min=0)], 0.0)
    uniforms = torch.rand(N, C, generator=generator, device=gripper.device)
    if return_weights:
        return (labels, *vectorized.sample_with_weights(weights, labeled & (weights > 0), budget, uniforms))
    return labels, vectorized.sample(weights, labeled & (weights > 0), budget, uniforms)
