"""Confirmatory statistics over seeds: one-sided t-tests, TOST equivalence, Holm's step-down, the exact
sign-flip permutation p, leave-one-seed-out intervals; and the pre-registered claims built from them.

Every test takes per-seed values (the seed is the unit: each is one seed's mean paired difference) and a
null that the claim must reject:

- ``greater``: H0 mean <= 0, the claim is mean > 0 (full beats frozen);
- ``less``: H0 mean >= 0, the claim is mean < 0 (random / top-phase behind full);
- ``equivalent``: H0 |mean| >= margin, the claim is |mean| < margin (PCM matches full), by two one-sided
  tests (TOST): p is the larger of the two, and the interval TOST uses is the 1 − 2α (90%) interval.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import integrate, stats

from pcm_train.tools.study_stats import paired_difference, t_interval
from pcm_train.training.evaluation import record_cell

ALTERNATIVES = ("greater", "less", "equivalent")


def _values(values) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) < 2 or not np.isfinite(values).all():
        raise ValueError(f"values must be at least 2 finite per-seed numbers, got {values.tolist()}")
    return values


def one_sided_t(values, alternative: str, null: float = 0.0) -> float:
    """p of Student's one-sided one-sample t-test (n − 1 degrees of freedom) of mean > ``null``
    (``greater``) or mean < ``null`` (``less``). With zero spread: 0 if every value is beyond ``null``, else 1."""
    values = _values(values) - null
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    sign = 1.0 if alternative == "greater" else -1.0
    sd = values.std(ddof=1)
    if sd == 0.0:
        return 0.0 if sign * values[0] > 0 else 1.0
    t = sign * values.mean() / (sd / math.sqrt(len(values)))
    return float(stats.t.sf(t, len(values) - 1))


def tost(values, margin: float) -> float:
    """p of the two one-sided tests of |mean| < ``margin``: the larger of p(mean > −margin), p(mean < margin)."""
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    return max(one_sided_t(values, "greater", -margin), one_sided_t(values, "less", margin))


def tost_power(sd: float, seeds: int, margin: float, alpha: float = 0.05, true_difference: float = 0.0) -> float:
    """Power of ``tost`` at level ``alpha`` over ``seeds`` per-seed differences drawn from
    N(``true_difference``, ``sd``²). Exact: given the sample SD s the test passes when the mean lies
    within ±(margin − t_{1−α, n−1} s / √n); that normal probability is integrated over s² ~ sd² χ²_{n−1} / (n − 1)."""
    if not (sd > 0 and margin > 0 and 0 < alpha < 0.5):
        raise ValueError(f"need sd > 0, margin > 0 and 0 < alpha < 0.5, got {sd}, {margin}, {alpha}")
    if seeds < 2:
        raise ValueError(f"seeds must be >= 2, got {seeds}")
    df = seeds - 1
    t_crit = stats.t.ppf(1 - alpha, df)
    se = sd / math.sqrt(seeds)

    def passing(u: float) -> float:  # u = df s² / sd², chi-square with df degrees of freedom
        half = margin - t_crit * sd * math.sqrt(u / df) / math.sqrt(seeds)
        if half <= 0:
            return 0.0
        inside = stats.norm.cdf((half - true_difference) / se) - stats.norm.cdf((-half - true_difference) / se)
        return inside * stats.chi2.pdf(u, df)

    u_max = df * (margin * math.sqrt(seeds) / (t_crit * sd)) ** 2  # beyond it no sample passes
    # the chi-square mass beyond its 1 - 1e-12 quantile is negligible; integrating past it misses the peak
    value, _ = integrate.quad(passing, 0.0, min(u_max, stats.chi2.ppf(1 - 1e-12, df)), limit=200)
    return float(min(max(value, 0.0), 1.0))


def seeds_for_tost_power(sd: float, margin: float, power: float = 0.8, alpha: float = 0.05,
                         true_difference: float = 0.0, max_seeds: int = 1000) -> int | None:
    """The fewest seeds (>= 2) at which ``tost_power`` reaches ``power``; None if more than ``max_seeds``."""
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    for seeds in range(2, max_seeds + 1):
        if tost_power(sd, seeds, margin, alpha, true_difference) >= power:
            return seeds
    return None


def sd_for_tost_power(seeds: int, margin: float, power: float = 0.8, alpha: float = 0.05) -> float:
    """The largest per-seed SD at which ``tost`` over ``seeds`` equal-mean differences still has ``power``
    (``tost_power`` falls with the SD; found by bisection between 1 % and 10 times the margin, to 1e-4 of it;
    0 if even 1 % of the margin is too much)."""
    if not 0 < power < 1:
        raise ValueError(f"power must lie in (0, 1), got {power}")
    low, high = 0.01 * margin, 10.0 * margin
    if tost_power(low, seeds, margin, alpha) < power:
        return 0.0
    while high - low > 1e-4 * margin:
        middle = (low + high) / 2
        low, high = (middle, high) if tost_power(middle, seeds, margin, alpha) >= power else (low, middle)
    return low


def internal_pilot_seeds(sd_estimate: float, first: int, most: int, margin: float, power: float = 0.8,
                         alpha: float = 0.05) -> int:
    """The seed count of the internal-pilot rule: after the ``first`` seeds, the fewest seeds at which TOST
    has ``power`` at the per-seed SD ``sd_estimate`` (``seeds_for_tost_power``), but no fewer than ``first``
    and no more than ``most``."""
    if not 2 <= first <= most:
        raise ValueError(f"need 2 <= first <= most, got first={first}, most={most}")
    needed = seeds_for_tost_power(sd_estimate, margin, power, alpha, max_seeds=most) if sd_estimate > 0 else first
    return max(first, needed or most)


def internal_pilot_tost(sd: float, first: int, most: int, margin: float, true_difference: float = 0.0,
                        power: float = 0.8, alpha: float = 0.05, draws: int = 20000, seed: int = 0) -> dict:
    """Simulates the internal-pilot design on per-seed differences N(``true_difference``, ``sd``²): the SD of
    the ``first`` seeds sets the count (``internal_pilot_seeds``), then TOST at ``alpha`` runs once over all
    of them. Returns {"pass_rate" (power at a true difference inside the margin, type I error at the
    margin), "mean_seeds", "seeds_quantiles" (5 %, 50 %, 95 %)}."""
    rng = np.random.default_rng(seed)
    limits = {n: sd_for_tost_power(n, margin, power, alpha) for n in range(first, most + 1)}

    def count(sd_estimate: float) -> int:  # internal_pilot_seeds, by the SD limits of each count
        return next((n for n in range(first, most + 1) if sd_estimate <= limits[n]), most)

    values = rng.normal(true_difference, sd, size=(draws, most))
    counts = np.array([count(row[:first].std(ddof=1)) for row in values])
    passed = 0
    for n in range(first, most + 1):
        rows = values[counts == n, :n]
        if len(rows):
            mean, se = rows.mean(axis=1), rows.std(axis=1, ddof=1) / math.sqrt(n)
            t_crit = stats.t.ppf(1 - alpha, n - 1)
            passed += int(np.sum((mean - t_crit * se > -margin) & (mean + t_crit * se < margin)))
    return {"pass_rate": passed / draws, "mean_seeds": float(counts.mean()),
            "seeds_quantiles": [int(q) for q in np.quantile(counts, (0.05, 0.5, 0.95))]}


def t_test(values, alternative: str, margin: float = 0.0) -> float:
    """p of the claim's test: ``one_sided_t`` against 0, or ``tost`` with ``margin`` for ``equivalent``."""
    if alternative == "equivalent":
        return tost(values, margin)
    return one_sided_t(values, alternative)


def sign_flip_p(values, alternative: str, margin: float = 0.0) -> float:
    """Exact sign-flip permutation p (all 2^n sign patterns, the observed one included) of the same claim:
    under H0 the values minus the null mean are symmetric about 0, so flipping signs gives the null
    distribution of their mean. ``equivalent``: the larger of the two one-sided permutation p's."""
    values = _values(values)
    if alternative == "equivalent":
        return max(_flip_p(values + margin, 1.0), _flip_p(values - margin, -1.0))
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    return _flip_p(values, 1.0 if alternative == "greater" else -1.0)


def _flip_p(centred: np.ndarray, sign: float) -> float:
    """Share of sign patterns whose mean of ``sign * centred`` is at least the observed one."""
    if len(centred) > 20:
        raise ValueError(f"the exact sign-flip test enumerates 2^n patterns; n = {len(centred)} is too many")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(centred))))
    means = signs @ (sign * centred) / len(centred)
    observed = (sign * centred).mean()
    return float(np.mean(means >= observed - 1e-12 * max(1.0, abs(observed))))


def holm(pvalues: dict[str, float], alpha: float = 0.05) -> dict[str, dict]:
    """Holm–Bonferroni step-down over ``{name: p}`` at family-wise ``alpha``: sorted ascending, the k-th
    smallest (k = 0, 1, ...) is rejected if p ≤ alpha / (m − k) and every smaller one was; the first that
    fails stops it. Returns per name {"p", "rank" (0-based), "threshold", "reject", "adjusted_p"} (the Holm
    adjusted p: the running maximum of min(1, (m − k) p))."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    order = sorted(pvalues, key=lambda name: pvalues[name])
    m, out, stopped, running = len(order), {}, False, 0.0
    for rank, name in enumerate(order):
        p = pvalues[name]
        threshold = alpha / (m - rank)
        stopped = stopped or not p <= threshold
        running = max(running, min(1.0, (m - rank) * p))
        out[name] = {"p": p, "rank": rank, "threshold": threshold, "reject": not stopped, "adjusted_p": running}
    return out


def leave_one_out(per_seed: dict[int, float], level: float = 0.95) -> dict:
    """The t-interval of the mean with each seed left out in turn: {"per_seed": {left-out seed: {"mean",
    "low", "high"}}, "mean_range", "low_range", "high_range"} (each a [min, max] over the left-out seeds)."""
    seeds = sorted(per_seed)
    each = {}
    for seed in seeds:
        mean, low, high, _ = t_interval([per_seed[s] for s in seeds if s != seed], level)
        each[seed] = {"mean": mean, "low": low, "high": high}
    span = lambda key: [min(e[key] for e in each.values()), max(e[key] for e in each.values())]  # noqa: E731
    return {"per_seed": each, "mean_range": span("mean"), "low_range": span("low"), "high_range": span("high")}


def evaluate_claim(per_seed: dict[int, float], alternative: str, margin: float = 0.0) -> dict:
    """Every number a claim's row reports: mean, 95% interval (and the 90% one), t-test p, permutation p,
    leave-one-out intervals, and the seeds used."""
    values = [per_seed[s] for s in sorted(per_seed)]
    mean, low, high, n = t_interval(values, 0.95)
    _, low90, high90, _ = t_interval(values, 0.90)
    return {"mean": mean, "low": low, "high": high, "low90": low90, "high90": high90, "seeds": n,
            "p": t_test(values, alternative, margin), "permutation_p": sign_flip_p(values, alternative, margin),
            "leave_one_out": leave_one_out(per_seed), "per_seed": dict(sorted(per_seed.items()))}


# The pre-registered claims (docs/results/metaworld_confirm/README.md): id, statement, variant, reference,
# alternative. (b) is tested as equivalence within ±margin.
CLAIMS = (("a", "GRPO learns: full beats the frozen policy", "full", "frozen", "greater"),
          ("b", "PCM matches full (|pcm − full| < margin)", "pcm", "full", "equivalent"),
          ("c", "random selection falls behind full", "random", "full", "less"),
          ("d", "top-phase selection falls behind full", "top_phase", "full", "less"))


def decide_claims(per_seed: dict[str, dict[int, float]], seeds: list[int], margin: float = 0.05,
                  alpha: float = 0.05, complete: str = "a complete run") -> list[dict]:
    """Tests the claims in ``per_seed`` (``{claim id: {seed: value}}``, ids from ``CLAIMS``, in their order):
    each gets ``evaluate_claim`` fields plus "id", "claim", "variant", "reference", "alternative", "holm"
    (``holm`` over the claims' p's) and "decision" ("holds" if Holm rejects its null, else "not shown").
    Raises ValueError when a claim lacks one of ``seeds`` (those lacking ``complete`` in both runs): a
    confirmatory test never runs on fewer seeds than fixed."""
    out, pvalues = [], {}
    for key, text, variant, reference, alternative in CLAIMS:
        if key not in per_seed:
            continue
        missing = sorted(set(seeds) - set(per_seed[key]))
        if missing:
            raise ValueError(f"claim ({key}) {variant} − {reference}: seeds {missing} lack {complete} in both")
        result = evaluate_claim({s: per_seed[key][s] for s in seeds}, alternative, margin)
        out.append({"id": key, "claim": text.replace("margin", f"{margin:g}"), "variant": variant,
                    "reference": reference, "alternative": alternative, **result})
        pvalues[key] = result["p"]
    decisions = holm(pvalues, alpha)
    for claim in out:
        claim["holm"] = decisions[claim["id"]]
        claim["decision"] = "holds" if claim["holm"]["reject"] else "not shown"
    return out


def confirm_claims(runs, window: tuple[int, int], seeds: list[int], margin: float = 0.05,
                   alpha: float = 0.05, claims: tuple[str, ...] = ("a", "b", "c", "d")) -> list[dict]:
    """The ``claims`` on training success: per seed the mean over steps [window[0], window[1]) (0-based
    rows) of the variant minus the reference (``decide_claims``; each claim also has "steps"). Raises
    ValueError when a run lacks the window's steps for one of ``seeds``."""
    start, stop = window
    per_seed = {key: paired_difference(runs, variant, reference, stop, start)["per_seed"]
                for key, _, variant, reference, _ in CLAIMS if key in claims}
    return [dict(c, steps=[start, stop])
            for c in decide_claims(per_seed, seeds, margin, alpha, f"a complete run of {stop} steps")]


def held_out_endpoint(validation, variant: str, reference: str, points: tuple[int, ...],
                      cell: tuple[str, str] = ("held_out", "greedy")) -> dict[int, float]:
    """Per seed: the mean over validation ``points`` (trained steps) of ``variant``'s success minus
    ``reference``'s, paired per episode (same task, placement and sampling stream) within the seed, on prompt
    set and decoder ``cell``. ``reference`` ``"frozen"`` is the start: the variant's own validation before
    training (trained steps 0), the same episodes at every point. Seeds lacking any point in either run are
    left out; ValueError if a seed's two runs scored different episodes at a point."""
    if not points:
        raise ValueError("points must name at least one validation point (trained steps)")
    a = validation.get(variant, {})
    b = a if reference == "frozen" else validation.get(reference, {})
    out = {}
    for seed in sorted(set(a) & set(b)):
        differences = []
        for t in points:
            x = validation_outcomes(a[seed], t, cell)
            y = validation_outcomes(b[seed], 0 if reference == "frozen" else t, cell)
            if not x or not y:
                break
            if set(x) != set(y):
                raise ValueError(f"seed {seed}: {variant} and {reference} were validated on different episodes "
                                 f"after {t} steps")
            differences.append(np.mean([x[k] - y[k] for k in sorted(x)]))
        else:
            out[seed] = float(np.mean(differences))
    return out


def confirm_held_out_claims(validation, points: tuple[int, ...], seeds: list[int], margin: float = 0.05,
                            alpha: float = 0.05, claims: tuple[str, ...] = ("a", "b", "c"),
                            cell: tuple[str, str] = ("held_out", "greedy")) -> list[dict]:
    """The ``claims`` on held-out success (``held_out_endpoint`` over ``points`` in ``cell``), tested by
    ``decide_claims``; each claim also has "points" and "cell"."""
    per_seed = {key: held_out_endpoint(validation, variant, reference, points, cell)
                for key, _, variant, reference, _ in CLAIMS if key in claims}
    return [dict(c, points=list(points), cell=list(cell)) for c in decide_claims(per_seed, seeds, margin, alpha)]


def validation_outcomes(rows: list[dict], trained_steps: int, cell: tuple[str, str] = ("held_out", "greedy"),
                        ) -> dict[tuple, float]:
    """``{(task, placement, seed): success}`` of one run's validation after ``trained_steps`` steps on prompt
    set and decoder ``cell`` (rows of its ``validation.jsonl``; rows from before decoders and sets were
    recorded are held-out greedy); ValueError if an episode appears twice."""
    out = {}
    for row in rows:
        if row["trained_steps"] == trained_steps and record_cell(row) == tuple(cell):
            key = (int(row["task"]), int(row["placement"]), row.get("seed"))
            if key in out:
                raise ValueError(f"validation after {trained_steps} steps lists episode {key} twice")
            out[key] = float(bool(row["success"]))
    return out


def validation_difference(validation, variant: str, reference: str, trained_steps: int,
                          alternative: str, margin: float = 0.0,
                          cell: tuple[str, str] = ("held_out", "greedy")) -> dict | None:
    """Held-out success of ``variant`` minus ``reference`` after ``trained_steps`` steps, paired per
    episode (same task and placement) within a seed, averaged per seed; ``evaluate_claim`` over the seeds
    both have (None with fewer than 2). ``validation``: ``{variant: {seed: validation.jsonl rows}}``.
    Adds "episodes" (per seed, the number paired). ValueError if a seed's two runs scored different episodes."""
    a, b = validation.get(variant, {}), validation.get(reference, {})
    per_seed, episodes = {}, {}
    for seed in sorted(set(a) & set(b)):
        x, y = validation_outcomes(a[seed], trained_steps, cell), validation_outcomes(b[seed], trained_steps, cell)
        if not x or not y:
            continue
        if set(x) != set(y):
            raise ValueError(f"seed {seed}: {variant} and {reference} were validated on different episodes "
                             f"after {trained_steps} steps")
        per_seed[seed] = float(np.mean([x[k] - y[k] for k in sorted(x)]))
        episodes[seed] = len(x)
    if len(per_seed) < 2:
        return None
    return {**evaluate_claim(per_seed, alternative, margin), "variant": variant, "reference": reference,
            "trained_steps": trained_steps, "alternative": alternative, "episodes": episodes}


def validation_success(validation, variant: str, trained_steps: int,
                       cell: tuple[str, str] = ("held_out", "greedy")) -> dict | None:
    """Held-out success of ``variant`` after ``trained_steps`` steps: per seed the share of its episodes
    that succeeded; a 95% t-interval over seeds ({"mean", "low", "high", "seeds", "per_seed"}), None if no
    seed has that validation."""
    per_seed = {}
    for seed, rows in sorted(validation.get(variant, {}).items()):
        outcomes = validation_outcomes(rows, trained_steps, cell)
        if outcomes:
            per_seed[seed] = float(np.mean(list(outcomes.values())))
    if not per_seed:
        return None
    mean, low, high, n = t_interval(list(per_seed.values()))
    return {"mean": mean, "low": low, "high": high, "seeds": n, "per_seed": per_seed}
