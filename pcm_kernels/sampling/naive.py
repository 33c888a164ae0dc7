"""Loop reference for budgeted chunk sampling given the uniforms (PCM.md §5)."""
import math

import torch

MAX_KEY = 3.0e38


def exponential_key(u: float, w: float) -> float:
    """The race time ``-log(1 - u) / w`` in float32; smaller wins (Gumbel-top-k in exp form)."""
    u32 = torch.tensor(u, dtype=torch.float32)
    w32 = torch.tensor(w, dtype=torch.float32)
    return float(torch.clamp(-torch.log(1.0 - u32) / w32, max=3.0e38))


def _row_keys(weights, uniforms, num_chunks, n: int) -> list[tuple[float, int]]:
    """(race key, chunk id) of row ``n``'s eligible chunks (``k < num_chunks[n]``, weight > 0)."""
    return [(exponential_key(float(uniforms[n, k]), float(weights[n, k])), k)
            for k in range(weights.shape[1]) if k < int(num_chunks[n]) and float(weights[n, k]) > 0]


def sample_rows(weights, uniforms, budget: int, num_chunks):
    """int64 [N, budget]: per row the ``budget`` eligible chunks with the smallest keys, ascending."""
    N, C = weights.shape
    out = torch.full((N, budget), -1, dtype=torch.int64)
    for n in range(N):
        chosen = sorted(k for _, k in sorted(_row_keys(weights, uniforms, num_chunks, n))[:budget])
        out[n, :len(chosen)] = torch.tensor(chosen, dtype=torch.int64)
    return out


def sample_rows_with_weights(weights, uniforms, budget: int, num_chunks):
    """``(index int64 [N, budget], ht float64 [N, budget])``: ``sample_rows`` plus threshold weights.

    ``ht = 1 / q_c`` with ``q_c = -expm1(-w_c * tau)`` in float64 (``w_c`` the float32 weight,
    ``tau`` the ``budget + 1``-th smallest float32 key), 1.0 if the row has <= budget
    eligible chunks, at most MAX_KEY; 0.0 at the -1 padding.
    """
    N, C = weights.shape
    index = torch.full((N, budget), -1, dtype=torch.int64)
    ht = torch.zeros((N, budget), dtype=torch.float64)
    for n in range(N):
        keys = sorted(_row_keys(weights, uniforms, num_chunks, n))
        tau = keys[budget][0] if len(keys) > budget else math.inf
        for j, k in enumerate(sorted(k for _, k in keys[:budget])):
            index[n, j] = k
            if math.isinf(tau):
                ht[n, j] = 1.0
            else:
                w32 = float(torch.tensor(float(weights[n, k]), dtype=torch.float32))
                q = -math.expm1(-w32 * tau)
                ht[n, j] = min(1.0 / q, MAX_KEY) if q > 0 else MAX_KEY
    return index, ht


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

