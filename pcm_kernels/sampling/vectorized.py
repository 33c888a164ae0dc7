"""Vectorized torch path for budgeted sampling (exponential race = Gumbel-top-k)."""
import torch

from .._philox import philox_uniform

MAX_KEY = 3.0e38


def race_keys(weights: torch.Tensor, eligible: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """float32 [N, C] keys ``-log(1 - u) / w`` (finite), ``inf`` where not eligible."""
    N, C = weights.shape
    offsets = torch.arange(N * C, device=weights.device, dtype=torch.int64).view(N, C)
    u = philox_uniform(seed, offsets)
    keys = torch.clamp(-torch.log(1.0 - u) / weights.to(torch.float32), max=MAX_KEY)
    return torch.where(eligible, keys, torch.inf)


def smallest_keys(keys: torch.Tensor, eligible: torch.Tensor, budget: int) -> torch.Tensor:
    """int64 [N, budget]: ascending ids of the ``budget`` smallest eligible keys per row, -1 padded."""
    N, C = keys.shape
    order = torch.sort(keys, dim=1, stable=True).indices[:, :budget]
    chosen = torch.zeros_like(eligible)
    chosen.scatter_(1, order, True)
    chosen &= eligible
    ids = torch.where(chosen, torch.arange(C, device=keys.device), C)
    ids = torch.sort(ids, dim=1).values[:, :budget]
    if budget > C:
        ids = torch.nn.functional.pad(ids, (0, budget - C), value=C)
    return torch.where(ids == C, -1, ids)


def sample(weights, eligible, budget, seed) -> torch.Tensor:
    return smallest_keys(race_keys(weights, eligible, seed), eligible, budget)
