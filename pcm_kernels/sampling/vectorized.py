"""Vectorized torch path for budgeted sampling (exponential race = Gumbel-top-k)."""
import torch

MAX_KEY = 3.0e38


def race_keys(weights: torch.Tensor, eligible: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """float32 [N, C] keys ``-log(1 - u) / w`` (finite), ``inf`` where not eligible."""
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


def sample(weights, eligible, budget, uniforms) -> torch.Tensor:
    """Plackett-Luce draw of ``budget`` chunks per row from float uniforms [N, C] in [0, 1)."""
    return smallest_keys(race_keys(weights, eligible, uniforms), eligible, budget)
