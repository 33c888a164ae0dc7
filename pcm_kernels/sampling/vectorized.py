"""Vectorized torch path for budgeted sampling (exponential race = Gumbel-top-k).

Written for the CPU, where every torch call costs a few microseconds at the trainer's shapes
(80 x 64): each step below is one call, and nothing is computed that the result does not need.
"""
import torch

MAX_KEY = 3.0e38
MIN_RACE_WEIGHT = torch.finfo(torch.float32).tiny  # 2**-126, float32's smallest normal number
# the smallest positive (subnormal) number of each dtype the ratio is computed in
_SMALLEST_POSITIVE = {torch.float32: 2.0**-149, torch.float64: 2.0**-1074}


def race_weights(weights: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """float32 [N, C] weights the race uses: each row's weights over its largest eligible one.

    The ratio is the float64 quotient rounded once to float32, so any positive finite scale races
    alike; an eligible weight whose ratio is below ``MIN_RACE_WEIGHT`` (e.g. 1e-300 beside 1e300
    in one float64 row) races as ``MIN_RACE_WEIGHT``: it stays eligible. 0.0 where not eligible.
    Float32 and narrower weights divide in float32: IEEE division of float32 operands rounds to the
    same value as the float64 quotient rounded to float32 (double rounding is innocuous for
    division when 53 >= 2 * 24 + 2). ``weights``: float [N, C]; ``eligible``: bool [N, C].
    """
    return torch.where(eligible, _eligible_race_weights(weights, eligible), 0.0)


def _eligible_race_weights(weights: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """``race_weights`` where ``eligible``; elsewhere unspecified (the draw reads only eligible entries)."""
    wide = torch.float64 if weights.dtype == torch.float64 else torch.float32
    masked = torch.where(eligible, weights if weights.dtype == wide else weights.to(wide), 0.0)
    if masked.shape[1] == 0:
        return masked.to(torch.float32)
    # a row with no eligible weight divides 0 by the smallest positive float: 0, not eligible anyway
    ratio = masked.div_(masked.amax(1, keepdim=True).clamp_(min=_SMALLEST_POSITIVE[wide]))
    return (ratio if wide == torch.float32 else ratio.to(torch.float32)).clamp_(min=MIN_RACE_WEIGHT)


def race_keys(weights: torch.Tensor, eligible: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """float32 [N, C] keys ``-log(1 - u) / w`` (finite) of the race weights ``w``, ``inf`` where not eligible."""
    weights = weights if weights.dtype == torch.float32 else weights.to(torch.float32)
    keys = torch.log(1.0 - uniforms).div_(weights).neg_().clamp_(max=MAX_KEY)
    return torch.where(eligible, keys, torch.inf)


def smallest_keys(keys: torch.Tensor, eligible: torch.Tensor, budget: int) -> torch.Tensor:
    """int64 [N, budget]: ascending ids of the ``budget`` smallest eligible keys per row, -1 padded.

    ``keys`` must be ``inf`` exactly where not eligible (as ``race_keys`` makes them)."""
    N, C = keys.shape
    if budget > C:
        out = torch.full((N, budget), -1, dtype=torch.int64, device=keys.device)
        out[:, :C] = smallest_keys(keys, eligible, C)
        return out
    smallest = torch.topk(keys, budget, dim=1, largest=False, sorted=False)
    short = smallest.values == torch.inf  # picks past a row's eligible chunks (it has fewer than `budget`)
    if not short.any():
        return smallest.indices.sort(dim=1).values
    index = smallest.indices.masked_fill_(short, C).sort(dim=1).values  # they sort last as C, then read -1
    return index.masked_fill_(index == C, -1)


def threshold(keys: torch.Tensor, budget: int) -> torch.Tensor:
    """float32 [N]: the ``budget + 1``-th smallest key per row (``inf`` if the row has <= budget eligible)."""
    N, C = keys.shape
    if C <= budget:
        return torch.full((N,), torch.inf, dtype=keys.dtype, device=keys.device)
    return torch.kthvalue(keys, budget + 1, dim=1).values


def ht_weights(weights: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, budget: int) -> torch.Tensor:
    """float32 [N, budget] ``1 / q_c`` at the kept ``index`` entries, ``q_c = 1 - exp(-w_c tau)`` with
    ``w_c`` the race weight (``weights``: ``race_weights``' float32 [N, C]; only kept entries are read).

    Exactly 1.0 where the threshold ``tau`` is ``inf`` (the row kept all its eligible chunks),
    0.0 at the -1 padding, at most ``MAX_KEY`` (``q_c`` underflowing to 0).
    """
    N, C = keys.shape
    kept = index >= 0
    if C == 0:
        return torch.zeros(index.shape, dtype=torch.float32, device=keys.device)
    tau = threshold(keys, budget).view(N, 1)
    w = torch.where(kept, weights.to(torch.float32).gather(1, index.clamp(min=0)), 1.0)
    q = -torch.expm1(-w * tau)
    ht = torch.where(torch.isinf(tau), 1.0, torch.clamp(1.0 / q, max=MAX_KEY))
    return torch.where(kept, ht, 0.0)


def sample(weights, eligible, budget, uniforms) -> torch.Tensor:
    """Plackett-Luce draw of ``budget`` chunks per row from float uniforms [N, C] in [0, 1)."""
    return smallest_keys(race_keys(_eligible_race_weights(weights, eligible), eligible, uniforms), eligible, budget)


def sample_with_weights(weights, eligible, budget, uniforms):
    """``sample`` plus the threshold (Horvitz-Thompson) weights: ``(index int64, ht float32)``, both [N, budget]."""
    raced = _eligible_race_weights(weights, eligible)
    keys = race_keys(raced, eligible, uniforms)
    index = smallest_keys(keys, eligible, budget)
    return index, ht_weights(raced, keys, index, budget)
