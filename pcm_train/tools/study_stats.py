"""Statistics of the strategy study: intervals over seeds, paired differences, and the paper's claims.

Runs are ``{variant: {seed: rows}}`` (rows: a run's ``metrics.jsonl``, row ``i`` is step ``i``). Within a
seed every variant trains on the same prompt sequence, so variants are compared paired by seed. The seed
is the independent unit: steps within a run are autocorrelated, so every interval here is a Student-t
interval over per-seed numbers, never over (seed, step) pairs.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def t_interval(values, level: float = 0.95) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)``: Student-t interval (n − 1 degrees of freedom) of the mean of independent
    ``values``. One value gives ``(value, nan, nan, 1)`` (no spread to estimate); none gives all nan, n = 0.
    Equal values give a zero-width interval."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(values.mean())
    if n == 1:
        return mean, math.nan, math.nan, 1
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def t_band(curves, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column ``(mean, low, high)`` of ``curves`` (seeds × steps) with a t-interval across seeds;
    each of length steps (low/high nan with one seed)."""
    columns = [t_interval(column, level) for column in np.asarray(curves, dtype=float).T]
    return tuple(np.array([c[i] for c in columns]) for i in range(3))


def smoothed(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (fewer at the start)."""
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (sums[idx] - sums[start]) / (idx - start)


def train_seconds(rows: list[dict]) -> np.ndarray:
    """Cumulative training time after each step (step time without validation), seconds."""
    return np.cumsum([r["step_time_s"] - (r.get("val_time_s") or 0.0) for r in rows])


def target_index(rows: list[dict], target: float, smooth: int) -> int | None:
    """Index of the first step whose ``smooth``-step trailing mean training success is ≥ ``target``; None if none."""
    reached = np.flatnonzero(smoothed([r["success_rate"] for r in rows], smooth) >= target)
    return int(reached[0]) if reached.size else None


def steps_to_target(rows: list[dict], target: float, smooth: int) -> int | None:
    """Steps trained when the smoothed training success first reaches ``target`` (1-based); None if never."""
    first = target_index(rows, target, smooth)
    return None if first is None else first + 1


def minutes_to_target(rows: list[dict], target: float, smooth: int) -> float | None:
    """Training wall-clock (validation excluded) when the smoothed success first reaches ``target``, minutes."""
    first = target_index(rows, target, smooth)
    return None if first is None else float(train_seconds(rows)[first] / 60)


def _interval_dict(values, level: float) -> dict:
    mean, low, high, n = t_interval(values, level)
    return {"mean": mean, "low": low, "high": high, "seeds": n}


def _success(rows: list[dict], start: int, stop: int) -> np.ndarray:
    return np.array([r["success_rate"] for r in rows[start:stop]], dtype=float)


def paired_difference(runs, variant: str, reference: str, steps: int, first_step: int = 0,
                      level: float = 0.95) -> dict:
    """Training success of ``variant`` minus ``reference``, paired by seed, over steps [first_step, steps).

    Per seed present in both with ≥ ``steps`` rows: d_seed = mean over those steps of the per-step
    difference; the interval is ``t_interval`` over the d_seed. Returns {"mean", "low", "high", "seeds"
    (number of paired seeds), "per_seed" {seed: d_seed}, "steps" [first_step, steps)}."""
    a, b = runs.get(variant, {}), runs.get(reference, {})
    per_seed = {seed: float(np.mean(_success(a[seed], first_step, steps) - _success(b[seed], first_step, steps)))
                for seed in sorted(set(a) & set(b)) if min(len(a[seed]), len(b[seed])) >= steps}
    return {**_interval_dict(list(per_seed.values()), level), "per_seed": per_seed, "steps": [first_step, steps]}


def curve_band(runs, variant: str, steps: int, smooth: int = 1, level: float = 0.95):
    """``(mean, low, high)`` arrays of length ``steps``: the ``smooth``-step trailing mean training success of
    ``variant`` per step, with a t-band across its seeds that have ≥ ``steps`` rows."""
    curves = [smoothed([r["success_rate"] for r in rows[:steps]], smooth)
              for rows in runs.get(variant, {}).values() if len(rows) >= steps]
    return t_band(np.reshape(curves, (len(curves), steps)), level)


def success_at(runs, variant: str, step: int, window: int, level: float = 0.95) -> dict:
    """Success after ``step`` steps: per seed with ≥ ``step`` rows, the mean training success of steps
    (step − window, step] (1-based, i.e. rows step − window … step − 1); t-interval across seeds.
    Returns {"step", "window", "mean", "low", "high", "seeds", "per_seed"}."""
    start = max(step - window, 0)
    per_seed = {seed: float(_success(rows, start, step).mean())
                for seed, rows in sorted(runs.get(variant, {}).items()) if len(rows) >= step}
    return {"step": step, "window": step - start, **_interval_dict(list(per_seed.values()), level),
            "per_seed": per_seed}


def to_target(runs, variant: str, target: float, smooth: int, level: float = 0.95) -> dict:
    """Steps and training minutes to ``target`` (see ``steps_to_target``), t-interval over the seeds that
    reach it (seeds that never do are counted in "of", not averaged: the means are optimistic then)."""
    seeds = runs.get(variant, {}).values()
    reached = [rows for rows in seeds if target_index(rows, target, smooth) is not None]
    return {"steps": _interval_dict([steps_to_target(r, target, smooth) for r in reached], level),
            "minutes": _interval_dict([minutes_to_target(r, target, smooth) for r in reached], level),
            "of": len(seeds)}


def _greater(d: dict) -> str:
    """'holds' if the interval is above 0, 'does not hold' if below, else 'inconclusive'."""
    return "holds" if d["low"] > 0 else "does not hold" if d["high"] < 0 else "inconclusive"


def _behind(d: dict) -> str:
    """'holds' if the interval is below 0, 'does not hold' if above, else 'inconclusive'."""
    return "holds" if d["high"] < 0 else "does not hold" if d["low"] > 0 else "inconclusive"


def _matches(d: dict, margin: float) -> str:
    """'holds' if the interval lies in [−margin, margin], 'does not hold' if wholly below −margin, else
    'inconclusive' (also when wholly above +margin: the claim is that PCM loses no more than the margin)."""
    if -margin <= d["low"] and d["high"] <= margin:
        return "holds"
    return "does not hold" if d["high"] < -margin else "inconclusive"


def claims(runs, steps: int, first_step: int = 0, margin: float = 0.05, level: float = 0.95) -> list[dict]:
    """The paper's claims on paired success differences over steps [first_step, steps), each a
    ``paired_difference`` dict plus "id", "claim", "variant", "reference", "interval_verdict" (from the
    interval alone) and "verdict" ("holds" / "does not hold" / "inconclusive"):

    (a) GRPO learns: full − frozen above 0. (b) PCM matches full: pcm − full within ±``margin``.
    (c) random and (d) top_phase fall behind full: their difference to full below 0 (above 0: does not
    hold; containing 0: inconclusive). Comparisons with NaN (fewer than 2 paired seeds) are inconclusive.
    (b)–(d) are only meaningful if (a) holds; otherwise their verdict is
    "inconclusive (GRPO did not learn)" or "inconclusive (GRPO learning not shown)".
    """
    specs = [("a", "GRPO learns: full beats the frozen policy", "full", "frozen", _greater),
             ("b", f"PCM matches full (within ±{margin:g})", "pcm", "full", lambda d: _matches(d, margin)),
             ("c", "random selection falls behind full", "random", "full", _behind),
             ("d", "top-phase selection falls behind full", "top_phase", "full", _behind)]
    out = []
    for key, text, variant, reference, rule in specs:
        d = paired_difference(runs, variant, reference, steps, first_step, level)
        out.append({"id": key, "claim": text, "variant": variant, "reference": reference, **d,
                    "interval_verdict": rule(d)})
    learned = out[0]["interval_verdict"]
    for claim in out:
        claim["verdict"] = claim["interval_verdict"] if claim is out[0] or learned == "holds" else (
            "inconclusive (GRPO did not learn)" if learned == "does not hold"
            else "inconclusive (GRPO learning not shown)")
    return out


def format_interval(d: dict | None, fmt: str = "+.3f", low: str = "low", high: str = "high") -> str:
    """``mean [low, high]`` from a dict with "mean" and the ``low`` / ``high`` keys; "—" without a finite mean
    (no paired seeds), the mean alone without finite bounds (one seed)."""
    if d is None or d.get("mean") is None or not math.isfinite(d["mean"]):
        return "—"
    text = format(d["mean"], fmt)
    return text + f" [{d[low]:{fmt}}, {d[high]:{fmt}}]" if math.isfinite(d[low]) else text
