"""Loop references for varlen chunk gather/scatter."""
import torch


def gather(x, index, seqlens):
    """(values [T, *F], cu_seqlens list, chunk_ids list): selected chunks' valid tokens, in order."""
    N, C, S = x.shape[:3]
    rows, cu, chunk_ids = [], [0], []
    for n in range(N):
        for c in index[n].tolist():
            if c < 0:
                continue
            length = S if seqlens is None else int(seqlens[n, c])
            rows.extend(x[n, c, s] for s in range(length))
            cu.append(cu[-1] + length)
            chunk_ids.append(n * C + c)
    values = torch.stack(rows) if rows else x.new_zeros((0,) + tuple(x.shape[3:]))
    return values, cu, chunk_ids


def scatter(values, cu, chunk_ids, shape):
    """Dense [N, C, S, *F] with the packed chunks put back and zeros elsewhere."""
    out = values.new_zeros(shape)
    C = shape[1]
    for m, chunk in enumerate(chunk_ids):
        n, c = divmod(chunk, C)
        for s in range(cu[m + 1] - cu[m]):
            out[n, c, s] = values[cu[m] + s]
    return out
