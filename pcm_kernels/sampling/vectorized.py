"""Vectorized torch path for budgeted sampling (exponential race = Gumbel-top-k)."""
import torch

MAX_KEY = 3.0e38
MIN_RACE_WEIGHT = torch.finfo(torch.float32).tiny  # 2**-126, float32's smallest normal number


def race_weights(weights: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """float32 [N, C] weights the race uses: each row's weights over its largest eligible one.

    The ratio is computed in float64 (every float dtype converts to it exactly) and rounded once to
    float32, so any positive finite scale races alike; an eligible weight whose ratio is below
    ``MIN_RACE_WEIGHT`` (e.g. 1e-300 beside 1e300 in one float64 row) races as ``MIN_RACE_WEIGHT``:
    it stays eligible. 0.0 where not eligible. ``weights``: float [N, C]; ``eligible``: bool [N, C].
    """
    wide = torch.where(eligible, weights.to(torch.float64), 0.0)
    if wide.shape[1] == 0:
        return wide.to(torch.float32)
    top = wide.amax(1, keepdim=True)
    ratio = (wide / torch.where(top > 0, top, 1.0)).to(torch.float32)
    return torch.where(eligible, ratio.clamp(min=MIN_RACE_WEIGHT), 0.0)


def race_keys(weights: torch.Tensor, eligible: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """float32 [N, C] keys ``-log(1 - u) / w`` (finite) of the race weights ``w``, ``inf`` where not eligible."""
    keys = torch.clamp(-torch.log(1.0 - uniforms) / weights.to(torch.float32), max=MAX_KEY)
    return torch.where(eligible, keys, torch.inf)


def smallest_keys(keys: torch.Tensor, eligible: torch.Tensor, budget: int) -> torch.Tensor:
    """int64 [N, budget]: ascending ids of the ``budget`` smallest eligible keys per row, -1 padded."""
    N, C = keys.shape
    chosen = torch.zeros_like(eligible)
    if C:
        chosen.scatter_(1, torch.topk(keys, min(budget, C), dim=1, largest=False, sorted=False).indices, True)
    chosen &= eligible
    slot = torch.where(chosen, chosen.cumsum(1) - 1, budget)  # column `budget` collects the unchosen
    out = torch.full((N, budget + 1), -1, dtype=torch.int64, device=keys.device)
    out.scatter_(1, slot, torch.arange(C, device=keys.device).expand(N, C))
    out[:, budget] = -1
    return out[:, :budget]


def threshold(keys: torch.Tensor, budget: int) -> torch.Tensor:
    """float32 [N]: the ``budget + 1``-th smallest key per row (``inf`` if the row has <= budget eligible)."""
    N, C = keys.shape
    if C <= budget:
        return torch.full((N,), torch.inf, dtype=keys.dtype, device=keys.device)
    return torch.kthvalue(keys, budget + 1, dim=1).values


def ht_weights(weights: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, budget: int) -> torch.Tensor:
    """float32 [N, budget] ``1 / q_c`` at the kept ``index`` entries, ``q_c = 1 - exp(-w_c tau)`` with
    ``w_c`` the race weight (``weights``: ``race_weights``' float32 [N, C]).

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
    return smallest_keys(race_keys(race_weights(weights, eligible), eligible, uniforms), eligible, budget)


def sample_with_weights(weights, eligible, budget, uniforms):
    """``sample`` plus the threshold (Horvitz-Thompson) weights: ``(index int64, ht float32)``, both [N, budget]."""
    raced = race_weights(weights, eligible)
    keys = race_keys(raced, eligible, uniforms)
    index = smallest_keys(keys, eligible, budget)
    return index, ht_weights(raced, keys, index, budget)
