"""Loop reference for budgeted chunk sampling given the uniforms (PCM.md §5)."""
import torch


def exponential_key(u: float, w: float) -> float:
    """The race time ``-log(1 - u) / w`` in float32; smaller wins (Gumbel-top-k in exp form)."""
    u32 = torch.tensor(u, dtype=torch.float32)
    w32 = torch.tensor(w, dtype=torch.float32)
    return float(torch.clamp(-torch.log(1.0 - u32) / w32, max=3.0e38))


def sample_rows(weights, uniforms, budget: int, num_chunks):
    """int64 [N, budget]: per row the ``budget`` eligible chunks with the smallest keys, ascending."""
    N, C = weights.shape
    out = torch.full((N, budget), -1, dtype=torch.int64)
    for n in range(N):
        keys = []
        for k in range(C):
            w = float(weights[n, k])
            if k < int(num_chunks[n]) and w > 0:
                keys.append((exponential_key(float(uniforms[n, k]), w), k))
        chosen = sorted(k for _, k in sorted(keys)[:budget])
        out[n, :len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
    return out


def plackett_luce_probability(subset, weights) -> float:
    """Probability that sequential weighted draws without replacement pick exactly ``subset`` (any order)."""
    total = float(sum(weights))
    prob = 0.0
    for order in _permutations(list(subset)):
        p, left = 1.0, total
        for k in order:
            p *= weights[k] / left
            left -= weights[k]
        prob += p
    return prob


def _permutations(items):
    if len(items) <= 1:
        yield items
        return
    for i, first in enumerate(items):
        for rest in _permutations(items[:i] + items[i + 1:]):
            yield [first] + rest

