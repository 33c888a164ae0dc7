"""The confirmatory section of a pre-registered study page: the protocol's tests, the held-out validation
paired per episode, and what is exploratory.

``Protocol`` fixes what is tested before any run (the endpoint: training success over a window, or held-out
success over validation points; the claims, seeds or an internal-pilot seed rule, margin, α); the page shows
the confirmatory table only when every run it needs is complete, never on part of the seeds.
Numbers come from ``confirm_stats``; runs are ``{variant: {seed: metrics rows}}`` and validation
``{variant: {seed: validation.jsonl rows}}``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pcm_train.tools.confirm_stats import (CLAIMS, confirm_claims, confirm_held_out_claims,  # noqa: E402
                                           held_out_endpoint, internal_pilot_seeds, validation_difference,
                                           validation_outcomes, validation_success)
from pcm_train.tools.report import save_figure  # noqa: E402
from pcm_train.tools.study_stats import format_interval, paired_difference, t_band  # noqa: E402
from pcm_train.training.metrics_log import VALIDATION_FILE, read_metrics  # noqa: E402


@dataclass(frozen=True)
class Protocol:
    """What a confirmatory study tests, fixed before its first run.

    ``endpoint="training"``: the claims compare training success over ``window``. ``endpoint="held_out"``:
    they compare validation success in ``cells[0]`` averaged over ``points``, paired per episode within a
    seed (``confirm_stats.held_out_endpoint``; ``frozen`` is each run's own validation before training),
    every run needing ``window[1]`` steps; ``cells[1:]`` are secondary endpoints on the same claims."""

    primary: tuple[str, ...]  # the variants the claims compare
    seeds: tuple[int, ...]
    window: tuple[int, int]  # training endpoint: steps [start, stop) (0-based rows; (40, 80) = steps 41-80)
    validation_steps: tuple[int, ...]  # held-out validation after these many steps; the last is the secondary
    margin: float = 0.05  # claim (b): |pcm - full| < margin
    alpha: float = 0.05  # family-wise, Holm over the claims
    exploratory_windows: tuple[tuple[int, int], ...] = ()
    endpoint: str = "training"  # or "held_out"
    claims: tuple[str, ...] = ("a", "b", "c", "d")  # ids in confirm_stats.CLAIMS
    points: tuple[int, ...] = ()  # held_out: the validation points (trained steps) the endpoint averages
    cells: tuple[tuple[str, str], ...] = (("held_out", "greedy"),)  # held_out: (set, decoder), primary first
    target: float | None = None  # held_out: success that counts as reached (steps and time to it, secondary)
    # internal pilot: with first_seeds set, ``seeds`` is the most that may run; once the first ``first_seeds``
    # are complete, the SD of claim (b)'s per-seed values over them sets the count (``protocol_seeds``)
    first_seeds: int | None = None
    power: float = 0.8  # the power claim (b) is planned for, at a true difference of 0

    def __post_init__(self):
        if self.endpoint not in ("training", "held_out"):
            raise ValueError(f"endpoint must be 'training' or 'held_out', got {self.endpoint!r}")
        if self.endpoint == "held_out" and not (self.points and set(self.points) <= set(self.validation_steps) - {0}):
            raise ValueError(f"points {self.points} must be validation steps after training, "
                             f"from {self.validation_steps}")
        if self.first_seeds is not None and not (2 <= self.first_seeds <= len(self.seeds)
                                                 and self.endpoint == "held_out" and "b" in self.claims
                                                 and {"pcm", "full"} <= set(self.primary)):
            raise ValueError(f"first_seeds must lie in [2, {len(self.seeds)}] with a held-out claim (b) between "
                             f"primary variants pcm and full, got {self.first_seeds} and {self.primary}")


def collect_validation(root: Path, runs) -> dict[str, dict[int, list[dict]]]:
    """``validation.jsonl`` rows of every complete run in ``runs`` (``root/<variant>/seed<k>/``)."""
    out: dict[str, dict[int, list[dict]]] = {}
    for variant, seeds in runs.items():
        for seed in seeds:
            path = Path(root, variant, f"seed{seed}", VALIDATION_FILE)
            if path.is_file():
                out.setdefault(variant, {})[seed] = read_metrics(path)
    return out


def protocol_seeds(runs, validation, protocol: Protocol) -> tuple[list[int] | None, dict]:
    """The seeds the confirmatory tests use, and how they were set. Fixed seeds: all of ``seeds``. Internal
    pilot: None until the first ``first_seeds`` seeds' primary runs are complete, then the first N, N from
    ``internal_pilot_seeds`` at the SD of claim (b)'s per-seed values over those seeds (only the SD is
    used; no test is computed on them). Facts: {"rule", "first_seeds", "most_seeds", "sd", "seeds"}."""
    if protocol.first_seeds is None:
        return list(protocol.seeds), {"rule": "fixed", "seeds": len(protocol.seeds)}
    first = list(protocol.seeds[:protocol.first_seeds])
    facts = {"rule": "internal pilot", "first_seeds": protocol.first_seeds, "most_seeds": len(protocol.seeds),
             "sd": None, "seeds": None}
    if primary_complete(runs, protocol, validation, first):
        return None, facts
    _, _, variant, reference, _ = next(c for c in CLAIMS if c[0] == "b")
    per_seed = held_out_endpoint(validation, variant, reference, protocol.points, protocol.cells[0])
    facts["sd"] = float(np.std([per_seed[s] for s in first], ddof=1))
    facts["seeds"] = internal_pilot_seeds(facts["sd"], protocol.first_seeds, len(protocol.seeds), protocol.margin,
                                          protocol.power, protocol.alpha)
    return list(protocol.seeds[:facts["seeds"]]), facts


def primary_complete(runs, protocol: Protocol, validation=None, seeds=None) -> list[str]:
    """The (variant, seed) runs the confirmatory test still lacks ("variant seedK"): each needs ``window[1]``
    steps, and for a held-out endpoint its validation before training and at every point in every cell
    (``frozen`` is then no run of its own: it is each run's validation before training). ``seeds``: those
    to check, by default the protocol's."""
    seeds = protocol.seeds if seeds is None else seeds
    if protocol.endpoint == "training":
        return [f"{v} seed{s}" for v in protocol.primary for s in seeds
                if len(runs.get(v, {}).get(s, [])) < protocol.window[1]]
    validation = validation or {}
    missing = []
    for v in (v for v in protocol.primary if v != "frozen"):
        for s in seeds:
            rows = validation.get(v, {}).get(s, [])
            validated = all(validation_outcomes(rows, t, cell) for t in (0, *protocol.points) for cell in protocol.cells)
            if len(runs.get(v, {}).get(s, [])) < protocol.window[1] or not validated:
                missing.append(f"{v} seed{s}")
    return missing


def _p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def claims_table(claims: list[dict]) -> str:
    """claim / estimate with 95% interval / p / Holm decision / permutation p / leave-one-out range."""
    lines = ["| claim | difference | estimate [95% CI] | test | p | Holm (threshold) | decision | permutation p "
             "| leave-one-seed-out: estimate range; CI bounds range |", "|" + "---|" * 9]
    for c in claims:
        loo = c["leave_one_out"]
        test = "TOST ±" + f"{c['margin']:g}, 90% CI {format_interval(c, low='low90', high='high90')}" \
            if c["alternative"] == "equivalent" else f"one-sided t, H1: {c['alternative']} than 0"
        lines.append(
            f"| ({c['id']}) {c['claim']} | {c['variant']} − {c['reference']} | {format_interval(c)} | {test} "
            f"| {_p(c['p'])} "
            f"| {'reject' if c['holm']['reject'] else 'keep'} H0 ({c['holm']['threshold']:.4f}) "
            f"| **{c['decision']}** | {_p(c['permutation_p'])} "
            f"| {loo['mean_range'][0]:+.3f} … {loo['mean_range'][1]:+.3f}; low {loo['low_range'][0]:+.3f} … "
            f"{loo['low_range'][1]:+.3f}, high {loo['high_range'][0]:+.3f} … {loo['high_range'][1]:+.3f} |")
    return "\n".join(lines)


def validation_tables(validation, protocol: Protocol, variants: list[str]) -> tuple[list[str], dict]:
    """Held-out success per variant at each validation point, and the secondary endpoints (last point)."""
    steps = protocol.validation_steps
    success = {v: {str(t): validation_success(validation, v, t) for t in steps} for v in variants}
    lines = ["| variant | " + " | ".join(f"held-out success after {t} steps [95% CI]" for t in steps) + " | seeds |",
             "|" + "---|" * (len(steps) + 2)]
    for v in variants:
        cells = [format_interval(success[v][str(t)], ".3f") for t in steps]
        seeds = max((s["seeds"] for s in success[v].values() if s), default=0)
        lines.append(f"| {v} | {' | '.join(cells)} | {seeds} |")
    last = steps[-1]
    secondary = [validation_difference(validation, "full", "frozen", last, "greater"),
                 validation_difference(validation, "pcm", "full", last, "equivalent", protocol.margin)]
    lines += ["", f"Secondary endpoints after {last} steps (paired per episode within a seed, averaged per seed, "
              "t over seeds; not part of the Holm family):", "",
              "| difference | estimate [95% CI] | test | p | permutation p | episodes per seed | seeds |",
              "|" + "---|" * 7]
    for d, name in zip(secondary, ("full − frozen", "pcm − full")):
        if d is None:
            lines.append(f"| {name} | — | | | | | 0 |")
            continue
        test = f"TOST ±{protocol.margin:g}, 90% CI {format_interval(d, low='low90', high='high90')}" \
            if d["alternative"] == "equivalent" else "one-sided t, H1: greater than 0"
        lines.append(f"| {name} | {format_interval(d)} | {test} | {_p(d['p'])} | {_p(d['permutation_p'])} "
                     f"| {min(d['episodes'].values())} | {d['seeds']} |")
    return lines, {"success": success, "secondary": secondary}


def exploratory(runs, validation, protocol: Protocol) -> tuple[list[str], dict]:
    """Other windows for the four comparisons, the arms outside the claims against full and pcm, and
    held-out differences of the other comparisons: intervals only, labelled exploratory."""
    pairs = [(variant, reference) for _, _, variant, reference, _ in CLAIMS]
    pairs += [(v, ref) for v in runs if v not in protocol.primary for ref in ("full", "pcm", "frozen")]
    windows = (protocol.window, *protocol.exploratory_windows)
    lines = ["| difference | " + " | ".join(f"steps {a + 1}–{b}" for a, b in windows) + " | seeds |",
             "|" + "---|" * (len(windows) + 2)]
    numbers = {}
    for variant, reference in pairs:
        if variant not in runs or reference not in runs:
            continue
        ds = [paired_difference(runs, variant, reference, b, a) for a, b in windows]
        numbers[f"{variant}-{reference}"] = {f"{a + 1}-{b}": d for (a, b), d in zip(windows, ds)}
        lines.append(f"| {variant} − {reference} | " + " | ".join(format_interval(d) for d in ds)
                     + f" | {ds[0]['seeds']} |")
    last = protocol.validation_steps[-1]
    held = [(v, "full") for v in ("random", "top_phase") if v in runs] + [(v, "full") for v in runs
                                                                           if v not in protocol.primary]
    lines += ["", f"Held-out success after {last} steps, paired per episode (exploratory):", "",
              "| difference | estimate [95% CI] | seeds |", "|---|---|---|"]
    for variant, reference in held:
        d = validation_difference(validation, variant, reference, last, "less")
        numbers[f"val-{variant}-{reference}"] = d
        lines.append(f"| {variant} − {reference} | {format_interval(d)} | {d['seeds'] if d else 0} |")
    return lines, numbers


def fig_confirm(runs, protocol: Protocol, out: Path) -> Path:
    """Per-step training success per variant (mean over seeds, 95% t-band) and each claim's paired
    per-step difference with its band; the primary window shaded."""
    fig, (curves, diffs) = plt.subplots(1, 2, figsize=(13, 4.4))
    start, stop = protocol.window
    for variant, seeds in runs.items():
        n = min(len(rows) for rows in seeds.values())
        mean, low, high = t_band([[r["success_rate"] for r in rows[:n]] for rows in seeds.values()])
        (line,) = curves.plot(np.arange(1, n + 1), mean, lw=1, label=f"{variant} ({len(seeds)} seeds)")
        if np.isfinite(low).any():
            curves.fill_between(np.arange(1, n + 1), low, high, color=line.get_color(), alpha=0.12)
    for key, _, variant, reference, _ in CLAIMS:
        common = sorted(set(runs.get(variant, {})) & set(runs.get(reference, {})))
        if len(common) < 2:
            continue
        n = min(min(len(runs[variant][s]), len(runs[reference][s])) for s in common)
        d = [[a["success_rate"] - b["success_rate"] for a, b in zip(runs[variant][s][:n], runs[reference][s][:n])]
             for s in common]
        mean, low, high = t_band(d)
        (line,) = diffs.plot(np.arange(1, n + 1), mean, lw=1, label=f"({key}) {variant} − {reference}")
        diffs.fill_between(np.arange(1, n + 1), low, high, color=line.get_color(), alpha=0.12)
    diffs.axhline(0, color="black", lw=0.8)
    for bound in (-protocol.margin, protocol.margin):
        diffs.axhline(bound, color="grey", lw=0.8, ls=":")
    for ax in (curves, diffs):
        ax.axvspan(start + 0.5, stop + 0.5, color="grey", alpha=0.08)
        ax.set_xlabel("step")
    curves.set(ylabel="training success (per step)", ylim=(-0.02, 1.02),
               title="training success, mean and 95% t-band over seeds")
    diffs.set(ylabel="paired difference in training success", title="claims' per-step differences (95% t-band)")
    curves.legend(fontsize=7)
    diffs.legend(fontsize=7)
    return save_figure(fig, out / "confirm_curves.png", dpi=100)


_DECISION_RULE = ("A claim holds only if Holm rejects its null, else it is \"not shown\". The permutation p (all sign "
                  "flips) and the leave-one-seed-out ranges are robustness checks beside each claim; they do not "
                  "decide it.")


def _in_progress(missing: list[str], total: int, of: str = "") -> list[str]:
    """The line a confirmatory section shows instead of its table while runs are missing."""
    return [f"**In progress**: {len(missing)} of {total} primary runs {of}are not complete yet "
            f"({', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}). The confirmatory table appears when all "
            "are; it is never computed on part of the seeds.", ""]


def _exploratory_block(runs, validation, protocol: Protocol, figures: list[Path], what: str) -> tuple[list[str], dict]:
    """The exploratory heading, ``what`` it covers, its tables (``exploratory``) and the section's figures."""
    exp_lines, numbers = exploratory(runs, validation, protocol)
    return ["## Exploratory (not part of the claims)", "",
            f"{what}: 95% t-intervals over the seeds each has, no tests, no corrections.", "", *exp_lines, "",
            *[f"![{p.stem}]({p.name})" for p in figures], ""], numbers


def confirm_section(runs, validation, protocol: Protocol, out: Path) -> tuple[list[str], dict, list[Path]]:
    """Markdown lines, JSON-ready numbers and figures of the confirmatory section."""
    if protocol.endpoint == "held_out":
        return held_out_section(runs, validation, protocol, out)
    a, b = protocol.window
    missing = primary_complete(runs, protocol)
    lines = ["## Confirmatory analysis (fixed before the runs)", "",
             f"Primary endpoint: per seed, the mean over steps {a + 1}–{b} of the per-step difference in training "
             f"success between two variants trained on the same prompts; seeds {list(protocol.seeds)}. One-sided "
             f"Student-t tests over the {len(protocol.seeds)} per-seed values ({len(protocol.seeds) - 1} degrees of "
             f"freedom), (b) by TOST within ±{protocol.margin:g}; Holm–Bonferroni over the four p-values at "
             f"family-wise α = {protocol.alpha:g}. {_DECISION_RULE}", ""]
    numbers: dict = {"protocol": asdict(protocol), "missing_runs": missing}
    figures = [fig_confirm(runs, protocol, out)] if runs else []
    if missing:
        lines += _in_progress(missing, len(protocol.primary) * len(protocol.seeds))
    else:
        claims = confirm_claims(runs, protocol.window, list(protocol.seeds), protocol.margin, protocol.alpha)
        for claim in claims:
            claim["margin"] = protocol.margin
        numbers["claims"] = claims
        lines += [claims_table(claims), ""]
    variants = [v for v in runs if v in validation]
    val_lines, numbers["validation"] = validation_tables(validation, protocol, variants)
    lines += ["## Held-out validation", "",
              f"Greedy episodes on held-out placements, the same for every variant and seed, after "
              f"{' and '.join(str(t) for t in protocol.validation_steps)} steps; every episode's outcome is in the "
              f"run's `{VALIDATION_FILE}`.", "", *val_lines, ""]
    exp_lines, numbers["exploratory"] = _exploratory_block(
        runs, validation, protocol, figures, "Other windows, the arms outside the claims and other held-out comparisons")
    return lines + exp_lines, numbers, figures


def _cell_name(cell: tuple[str, str]) -> str:
    return f"{cell[1]} on {cell[0].replace('_', '-')} prompts"


def held_out_success_table(validation, protocol: Protocol, variants: list[str], cell) -> tuple[list[str], dict]:
    """Success in ``cell`` per variant at every validation point, mean over seeds [95% t-interval]; ``frozen``
    is the start (each seed's validation before training, of ``full``'s run)."""
    steps = protocol.validation_steps
    rows = {"frozen": {str(t): validation_success(validation, "full", 0, cell) for t in steps}}
    rows.update({v: {str(t): validation_success(validation, v, t, cell) for t in steps}
                 for v in variants if v != "frozen"})
    lines = ["| variant | " + " | ".join(f"after {t}" for t in steps) + " | seeds |", "|" + "---|" * (len(steps) + 2)]
    for v, cells in rows.items():
        seeds = max((c["seeds"] for c in cells.values() if c), default=0)
        lines.append(f"| {v} | " + " | ".join(format_interval(cells[str(t)], ".3f") for t in steps) + f" | {seeds} |")
    return lines, rows


def steps_to_target(runs, validation, protocol: Protocol, variants: list[str]) -> tuple[list[str], dict]:
    """Per variant and seed, the first validation point after training at which success in ``cells[0]``
    reaches ``target``, and the actor update seconds (``update_time_s``, summed over the steps before it)
    spent to get there: seeds reached, mean steps and mean update seconds over the seeds that reached it."""
    cell, numbers = protocol.cells[0], {}
    lines = [f"| variant | seeds reaching {protocol.target:g} | steps to it (mean over those) "
             "| actor update seconds to it (mean over those) |", "|---|---|---|---|"]
    for v in variants:
        if v == "frozen":
            continue
        reached = {}
        for seed, rows in sorted(validation.get(v, {}).items()):
            for t in (t for t in protocol.validation_steps if t > 0):
                outcomes = validation_outcomes(rows, t, cell)
                if outcomes and np.mean(list(outcomes.values())) >= protocol.target:
                    metrics = runs.get(v, {}).get(seed, [])
                    reached[seed] = {"steps": t, "update_s": float(sum(r.get("update_time_s", 0.0) for r in metrics[:t]))}
                    break
        numbers[v] = {"seeds": len(validation.get(v, {})), "reached": reached}
        mean = (lambda key: f"{np.mean([r[key] for r in reached.values()]):.1f}" if reached else "—")  # noqa: E731
        lines.append(f"| {v} | {len(reached)} of {len(validation.get(v, {}))} | {mean('steps')} | {mean('update_s')} |")
    return lines, numbers


def fig_held_out(validation, protocol: Protocol, variants: list[str], out: Path) -> Path:
    """Success per validation point, one panel per cell: mean over seeds with a 95% t-band per variant; the
    start dashed, the endpoint's points shaded."""
    fig, axes = plt.subplots(1, len(protocol.cells), figsize=(6.5 * len(protocol.cells), 4.4), squeeze=False)
    steps = list(protocol.validation_steps)
    for ax, cell in zip(axes[0], protocol.cells):
        start = validation_success(validation, "full", 0, cell)
        if start:
            ax.axhline(start["mean"], color="black", lw=0.8, ls="--", label="start (frozen)")
        for v in (v for v in variants if v != "frozen"):
            seeds = validation.get(v, {})
            curves = [[np.mean(list(validation_outcomes(rows, t, cell).values()) or [np.nan]) for t in steps]
                      for rows in seeds.values()]
            curves = [c for c in curves if np.isfinite(c).all()]
            if not curves:
                continue
            mean, low, high = t_band(curves)
            (line,) = ax.plot(steps, mean, marker="o", ms=3, lw=1, label=f"{v} ({len(curves)} seeds)")
            if np.isfinite(low).any():
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.12)
        ax.axvspan(min(protocol.points) - 0.5, max(protocol.points) + 0.5, color="grey", alpha=0.08)
        ax.set(xlabel="trained steps", ylabel="success", ylim=(-0.02, 1.02), title=_cell_name(cell))
        ax.legend(fontsize=7)
    return save_figure(fig, out / "held_out_curves.png", dpi=100)


def held_out_section(runs, validation, protocol: Protocol, out: Path) -> tuple[list[str], dict, list[Path]]:
    """The confirmatory section of a held-out-endpoint protocol: the claims on ``cells[0]`` (Holm), the same
    comparisons on the other cells (secondary), success per validation point, steps to ``target``, and the
    exploratory training-success windows."""
    primary_cell, points = protocol.cells[0], protocol.points
    seeds, seed_rule = protocol_seeds(runs, validation, protocol)
    checked = seeds or list(protocol.seeds[:protocol.first_seeds])  # until the count is set: the first seeds
    missing = primary_complete(runs, protocol, validation, checked)
    ids = ", ".join(f"({c[0]})" for c in CLAIMS if c[0] in protocol.claims)
    if seed_rule["rule"] == "fixed":
        seed_text = f"Seeds {list(protocol.seeds)}."
    else:
        seed_text = (f"Seeds {protocol.seeds[0]}, {protocol.seeds[1]}, … in order: the first {protocol.first_seeds}, "
                     f"then as many as TOST needs for {protocol.power:.0%} power at the SD of (b)'s per-seed values "
                     f"over those, at most {len(protocol.seeds)} (internal pilot). ")
        seed_text += ("That count is set once the first seeds are complete." if seeds is None else
                      f"SD over the first {protocol.first_seeds}: {seed_rule['sd']:.4f}, so N = {len(seeds)}: "
                      f"seeds {seeds}.")
    lines = ["## Confirmatory analysis (fixed before the runs)", "",
             f"Primary endpoint: per seed, success {_cell_name(primary_cell)}, averaged over the validation points "
             f"after {', '.join(str(t) for t in points)} steps, of one variant minus another, paired per episode "
             f"within the seed; `frozen` is the seed's validation before training. {seed_text} One-sided "
             "Student-t tests over the per-seed values (N − 1 degrees of freedom), (b) by TOST within "
             f"±{protocol.margin:g}; "
             f"Holm–Bonferroni over the p-values of {ids} at family-wise α = {protocol.alpha:g}. {_DECISION_RULE}", ""]
    numbers: dict = {"protocol": asdict(protocol), "missing_runs": missing, "seed_rule": seed_rule}
    variants = [v for v in runs if v in validation]
    figures = [fig_held_out(validation, protocol, variants, out)] if variants else []
    if missing:
        total = len([v for v in protocol.primary if v != "frozen"]) * len(checked)
        lines += _in_progress(missing, total, "" if seeds else "of the first seeds ")
    else:
        claims = confirm_held_out_claims(validation, points, seeds, protocol.margin, protocol.alpha,
                                         protocol.claims, primary_cell)
        for claim in claims:
            claim["margin"] = protocol.margin
        numbers["claims"] = claims
        lines += [claims_table(claims), ""]
        secondary = {}
        for cell in protocol.cells[1:]:
            rows = confirm_held_out_claims(validation, points, seeds, protocol.margin, protocol.alpha,
                                           protocol.claims, cell)
            secondary["/".join(cell)] = rows
            lines += [f"Secondary, the same comparisons {_cell_name(cell)} (unadjusted p, not in the Holm family):",
                      "", "| difference | estimate [95% CI] | test | p | permutation p |", "|---|---|---|---|---|"]
            for c in rows:
                test = f"TOST ±{protocol.margin:g}" if c["alternative"] == "equivalent" else \
                    f"one-sided t, H1: {c['alternative']} than 0"
                lines.append(f"| {c['variant']} − {c['reference']} | {format_interval(c)} | {test} | {_p(c['p'])} "
                             f"| {_p(c['permutation_p'])} |")
            lines.append("")
        numbers["secondary"] = secondary
    lines += ["## Held-out success per validation point", ""]
    numbers["success"] = {}
    for cell in protocol.cells:
        table, numbers["success"]["/".join(cell)] = held_out_success_table(validation, protocol, variants, cell)
        lines += [f"Success {_cell_name(cell)}, mean over seeds [95% t-interval]:", "", *table, ""]
    if protocol.target is not None:
        table, numbers["to_target"] = steps_to_target(runs, validation, protocol, variants)
        lines += [f"Steps and actor update time until success {_cell_name(primary_cell)} first reaches "
                  f"{protocol.target:g} at a validation point (secondary, descriptive):", "", *table, ""]
    exp_lines, numbers["exploratory"] = _exploratory_block(
        runs, validation, protocol, figures,
        "Training success over other windows, the arms outside the claims and other held-out comparisons")
    return lines + exp_lines, numbers, figures
