"""Budgeted weighted chunk sampling without replacement (Plackett-Luce via Gumbel-top-k).

Optionally with the threshold (Horvitz-Thompson) weights that make sums over the kept
chunks unbiased: W. Kool, H. van Hoof, M. Welling, "Stochastic Beams and Where to Find
Them" (ICML 2019) and "Estimating Gradients for Discrete Random Variables by Sampling
without Replacement" (ICLR 2020).
"""
import math
import numbers
from typing import List, Optional, Sequence, Union

import torch

from .._backend import resolve_backend
from .._checks import (ValueCheck, check_bool, check_generator, check_int, check_same_device, check_shape,
                       check_tensor, first_position, raise_failed, range_check)
from .._philox import draw_seed
from ..phases import Phase, prepare_label_args
from ..phases import vectorized as phase_vectorized
from . import vectorized

# Budgets above C only pad the output with -1; beyond this many entries per trajectory (and beyond C)
# a budget is refused instead of allocating N * budget int64 (512 KiB per trajectory at the cap).
MAX_PADDED_BUDGET = 2**16


def _check_budget(budget, C: int) -> int:
    cap = max(C, MAX_PADDED_BUDGET)
    return check_int("budget", budget, minimum=1, maximum=cap,
                     why_maximum=f" (the largest budget allowed is max(C, {MAX_PADDED_BUDGET}) = {cap} for C = {C} chunks "
                         "per trajectory: entries past C can only be -1 padding, and the output is N x budget)")


def _weights_check(name: str, weights: torch.Tensor) -> ValueCheck:
    """Value check: every weight finite and >= 0, from one min/max reduction (NaN propagates into both)."""
    def message() -> str:
        where = first_position(~(torch.isfinite(weights) & (weights >= 0)))
        return f"{name} must be finite and >= 0, found {weights[where].item()} at {list(where)}"
    if weights.numel() == 0:
        return False, message
    low, high = torch.aminmax(weights)
    if weights.device.type == "cpu":  # read now: no device to wait for
        return not (low.item() >= 0 and high.item() < math.inf), message
    return ~((low >= 0) & (high < torch.inf)), message


def sample_chunks(weights: torch.Tensor, budget: int, num_chunks: Optional[torch.Tensor] = None, *,
                  generator: Optional[torch.Generator] = None, validate: bool = True,
                  return_weights: bool = False):
    """Draw up to ``budget`` distinct chunks per trajectory, weighted, without replacement.

    Eligible chunks are ``k < num_chunks[n]`` with ``weights[n, k] > 0``; each row gets
    ``min(budget, #eligible)`` of them with Plackett-Luce probabilities (repeatedly pick
    with probability proportional to the remaining weights). The draw is an exponential
    race in float32: keys ``E_c / w_c``, ``E_c ~ Exp(1)``, the ``budget`` smallest are kept.

    The race weight ``w_c`` is the chunk's weight over its row's largest eligible weight,
    computed in float64 and rounded to float32 (the law depends only on these ratios), so
    every positive finite weight stays eligible whatever its dtype and scale (a float64 row
    at 1e-300 or 1e300 draws as the same row at 1). A ratio below float32's smallest normal
    number 2**-126 (e.g. 1e-300 beside 1e300 in one float64 row) races as 2**-126: it stays
    eligible, at a weight above its true ratio (and its ``1 / q`` below follows that weight).

    Threshold weights (Kool, van Hoof & Welling, ICML 2019 and ICLR 2020): with ``tau`` the
    ``budget + 1``-th smallest eligible key of the row (``inf`` if it has <= budget eligible),
    chunk c is kept with probability ``q_c = 1 - exp(-w_c * tau)`` given ``tau``, so for any
    fixed ``x``, ``E[sum_j x[n, index[n, j]] * ht_weights[n, j]] = sum_{c eligible} x[n, c]``
    (``w_c`` the race weight above, as the draw uses it).

    Args:
        weights: float [N, C] non-negative finite weights (any float dtype, any strides);
            all-zero rows draw nothing.
        budget: chunks to draw per trajectory, in ``[1, max(C, 65536)]``. A budget above C is
            allowed (the rows are padded with -1); larger budgets than ``max(C, 65536)`` can only
            add padding and are refused before the ``N x budget`` output is allocated.
        num_chunks: int [N] valid chunks per trajectory, in ``[0, C]`` (default C).
        generator: torch.Generator on the weights' device type (or None); same state, same
            draw (on a given backend: the Triton kernels regenerate their uniforms from a seed
            drawn from it, the torch path draws them with ``torch.rand``).
        validate: check ``weights`` for NaN/inf/negatives and ``num_chunks`` for its range.
            On CUDA this costs one host synchronization (both scans share it); pass False for
            a sync-free call (bad values are then not detected).
        return_weights: also return the threshold weights (same draw as without; the Triton
            kernel computes them in the same launch).

    Returns:
        ``index`` int64 [N, budget]: chosen chunk ids ascending, then -1. With
        ``return_weights``, ``(index, ht_weights)``, ``ht_weights`` float32 [N, budget]:
        ``1 / q_c`` per kept chunk (exactly 1.0 where the row kept all its eligible chunks,
        finite: at most 3e38), 0.0 at the -1s.
    """
    check_tensor("weights", weights, ndim=2, floating=True)
    N, C = weights.shape
    budget = _check_budget(budget, C)
    check_bool("validate", validate)
    check_bool("return_weights", return_weights)
    check_generator(generator, weights.device)
    given_chunks = num_chunks is not None
    if given_chunks:
        check_tensor("num_chunks", num_chunks, ndim=1, integer=True)
        check_shape("num_chunks", num_chunks, (N,), "[N] (weights is [N, C])")
        check_same_device(weights=weights, num_chunks=num_chunks)
        num_chunks = num_chunks.to(torch.int64)
    if validate:
        checks = [_weights_check("weights", weights)]
        if given_chunks:
            checks.append(range_check("num_chunks", num_chunks, 0, C, f"valid chunks per trajectory, C = {C}"))
        raise_failed(checks)
    if resolve_backend(weights.device) == "triton" and C > 0:
        from .kernels import launch_sample_chunks

        if not given_chunks:
            num_chunks = torch.full((N,), C, dtype=torch.int64, device=weights.device)
        out = torch.empty(N, budget, dtype=torch.int64, device=weights.device)
        ht = torch.empty(N, budget, dtype=torch.float32, device=weights.device) if return_weights else None
        return launch_sample_chunks(weights, num_chunks, draw_seed(generator, weights.device), out, ht)
    eligible = weights > 0
    if given_chunks:
        eligible &= torch.arange(C, device=weights.device) < num_chunks.view(N, 1)
    uniforms = torch.rand(N, C, generator=generator, device=weights.device)
    if return_weights:
        return vectorized.sample_with_weights(weights, eligible, budget, uniforms)
    return vectorized.sample(weights, eligible, budget, uniforms)


def _keep_probs_tensor(keep_probs, device: torch.device, validate: bool, checks: List[ValueCheck]) -> torch.Tensor:
    expected = f"[{len(Phase)}] non-negative finite floats (one keep probability per Phase)"
    if not isinstance(keep_probs, torch.Tensor):
        refused = isinstance(keep_probs, (str, bytes, dict, set)) or isinstance(keep_probs, numbers.Number)
        try:
            converted = None if refused else torch.as_tensor(keep_probs, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            converted = None
        if converted is None:
            raise TypeError(f"keep_probs must be a float tensor or a sequence of {expected}, "
                            f"got {type(keep_probs).__name__} {keep_probs!r:.60}")
        keep_probs = converted
    check_tensor("keep_probs", keep_probs, ndim=1, floating=True)
    check_shape("keep_probs", keep_probs, (len(Phase),), "[P] (one per Phase)")
    if keep_probs.device.type == "cpu":  # free: no device to wait for
        raise_failed([_weights_check("keep_probs", keep_probs)])
    elif keep_probs.device != device:
        raise ValueError(f"keep_probs must be on the CPU or on gripper's device ({device}), got {keep_probs.device}")
    elif validate:
        checks.append(_weights_check("keep_probs", keep_probs))
    return keep_probs.to(device=device, dtype=torch.float64)  # exact for every float dtype: see race weights


def select_chunks(gripper: torch.Tensor, num_steps: Optional[torch.Tensor],
                  keep_probs: Union[torch.Tensor, Sequence[float]], budget: int, *,
                  generator: Optional[torch.Generator] = None, close_above: float = 0.0,
                  sustain: float = 0.75, grip: float = 0.5, low: float = 0.1, window: int = 3,
                  return_weights: bool = False, validate: bool = True):
    """Label chunks, weight them by their phase's keep probability and draw ``budget`` per row.

    The path the trainer uses: one kernel launch on CUDA. Same distribution as
    ``label_phases`` then ``sample_chunks(keep_probs[labels], budget, ...)``, and the same draw
    for the same generator state on the same backend.

    Args:
        gripper: float [N, C, L] executed env-space gripper commands (see ``label_phases``;
            NaN refused with ``validate``, ``L = 0``: every chunk PAD, nothing drawn).
        num_steps: int [N] env steps executed, in ``[0, C * L]``, or None for all.
        keep_probs: [5] non-negative finite keep weight per ``Phase``: a float tensor on the CPU
            or on gripper's device, or a sequence of numbers (a CPU tensor or a sequence is always
            checked, for free; a CUDA tensor only with ``validate``). Each row races with its
            weights over its largest, as ``sample_chunks`` does: any positive scale stays eligible.
        budget: chunks to draw per trajectory, in ``[1, max(C, 65536)]`` (see ``sample_chunks``).
        close_above, sustain, grip, low, window: the labeling rules (see ``label_phases``).
        return_weights: also return the threshold weights (see ``sample_chunks``).
        validate: scan the values (NaN in ``gripper``, ``num_steps`` range, a CUDA
            ``keep_probs``). On CUDA this costs one host synchronization (all scans share it);
            pass False for the sync-free single launch.

    Returns:
        ``(labels int8 [N, C], index int64 [N, budget])``, with ``return_weights``
        ``(labels, index, ht_weights float32 [N, budget])``.
    """
    checks: List[ValueCheck] = []
    num_steps, close_above, sustain, grip, low, window = prepare_label_args(
        gripper, num_steps, close_above, sustain, grip, low, window, validate, checks)
    N, C, L = gripper.shape
    budget = _check_budget(budget, C)
    check_bool("return_weights", return_weights)
    check_generator(generator, gripper.device)
    keep = _keep_probs_tensor(keep_probs, gripper.device, validate, checks)
    raise_failed(checks)
    if resolve_backend(gripper.device) == "triton" and C > 0 and L > 0:
        from .kernels import launch_select_chunks

        labels = torch.empty(N, C, dtype=torch.int8, device=gripper.device)
        index = torch.empty(N, budget, dtype=torch.int64, device=gripper.device)
        ht = torch.empty(N, budget, dtype=torch.float32, device=gripper.device) if return_weights else None
        return launch_select_chunks(gripper, num_steps, keep, draw_seed(generator, gripper.device), labels, index,
                                    close_above, sustain, grip, low, window, ht)
    # C = 0 or L = 0 run here on both backends (L = 0: every chunk PAD, nothing drawn)
    labels = phase_vectorized.label_phases(gripper, num_steps, close_above, sustain, grip, low, window)
    labeled = labels >= 0
    weights = torch.where(labeled, keep[labels.long().clamp(min=0)], 0.0)
    uniforms = torch.rand(N, C, generator=generator, device=gripper.device)
    if return_weights:
        return (labels, *vectorized.sample_with_weights(weights, labeled & (weights > 0), budget, uniforms))
    return labels, vectorized.sample(weights, labeled & (weights > 0), budget, uniforms)
