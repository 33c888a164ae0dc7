"""Loop reference for budgeted chunk sampling given the uniforms (PCM.md §5)."""
import math

import torch

MAX_KEY = 3.0e38
MIN_RACE_WEIGHT = 2.0**-126


def exponential_key(u: float, w: float) -> float:
    """The race time ``-log(1 - u) / w`` in float32; smaller wins (Gumbel-top-k in exp form)."""
    u32 = torch.tensor(u, dtype=torch.float32)
    w32 = torch.tensor(w, dtype=torch.float32)
    return float(torch.clamp(-torch.log(1.0 - u32) / w32, max=3.0e38))


def race_weight(w: float, top: float) -> float:
    """The float32 weight a chunk races with: ``w / top`` (its row's largest eligible weight) in
    float64 rounded to float32, at least float32's smallest normal number 2**-126."""
    ratio = float(torch.tensor(w / top, dtype=torch.float32))
    return max(ratio, MIN_RACE_WEIGHT)


def _row_weights(weights, num_chunks, n: int) -> dict[int, float]:
    """{chunk id: race weight} of row ``n``'s eligible chunks (``k < num_chunks[n]``, weight > 0)."""
    eligible = {k: float(weights[n, k]) for k in range(weights.shape[1])
                if k < int(num_chunks[n]) and float(weights[n, k]) > 0}
    top = max(eligible.values(), default=1.0)
    return {k: race_weight(w, top) for k, w in eligible.items()}


def _row_keys(weights, uniforms, num_chunks, n: int) -> list[tuple[float, int]]:
    """(race key, chunk id) of row ``n``'s eligible chunks."""
    return [(exponential_key(float(uniforms[n, k]), w), k) for k, w in _row_weights(weights, num_chunks, n).items()]


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

    ``ht = 1 / q_c`` with ``q_c = -expm1(-w_c * tau)`` in float64 (``w_c`` the race weight,
    ``tau`` the ``budget + 1``-th smallest float32 key), 1.0 if the row has <= budget
    eligible chunks, at most MAX_KEY; 0.0 at the -1 padding.
    """
    N, C = weights.shape
    index = torch.full((N, budget), -1, dtype=torch.int64)
    ht = torch.zeros((N, budget), dtype=torch.float64)
    for n in range(N):
        raced = _row_weights(weights, num_chunks, n)
        keys = sorted(_row_keys(weights, uniforms, num_chunks, n))
        tau = keys[budget][0] if len(keys) > budget else math.inf
        for j, k in enumerate(sorted(k for _, k in keys[:budget])):
            index[n, j] = k
            if math.isinf(tau):
                ht[n, j] = 1.0
            else:
                q = -math.expm1(-raced[k] * tau)
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

