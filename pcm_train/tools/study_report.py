"""Tables and figures of the strategy study (``python -m pcm_train.study``) from its run directories.

Runs are ``{variant: {seed: rows}}`` where rows are a run's ``metrics.jsonl``. Success for the
target test is the training success rate averaged over the last ``smooth`` steps (the paper
validates every step on 50 rollouts; a step here has 16). Training time is rollout + update
+ selection, without validation. Intervals are 95% Student-t intervals over seeds, variants paired by
seed (``study_stats``).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pcm_train.algorithm.controller import PHASE_NAMES  # noqa: E402
from pcm_train.training.metrics_log import read_metrics  # noqa: E402
from pcm_train.training.evaluation import held_out_greedy_rate  # noqa: E402
from pcm_train.tools.confirm_report import Protocol, collect_validation, confirm_section  # noqa: E402
from pcm_train.tools.report import save_figure  # noqa: E402
from pcm_train.tools.study_stats import (claims, curve_band, format_interval, paired_difference, smoothed,  # noqa: E402
                                         success_at, t_band, target_index, to_target, train_seconds)

MIB = 2 ** 20
REFERENCES = ("full", "frozen")  # every variant's paired difference is taken to these
FRACTIONS = (0.25, 0.5, 1.0)  # success is reported after these fractions of the common horizon
MOVEMENT = {  # how far the update moved the policy: summary name -> (metrics key, table format); per-step means
    "advantage_nonzero": ("advantage/nonzero_fraction", ".0%"), "optimizer_steps": ("actor/optimizer_steps", ".0f"),
    "ppo_kl": ("actor/ppo_kl", ".1e"), "clip_fraction": ("actor/pg_clipfrac", ".2%"),
    "grad_norm": ("actor/grad_norm", ".2f")}


def collect_runs(root: Path, variants: list[str]) -> dict[str, dict[int, list[dict]]]:
    """Every complete ``root/<variant>/seed<k>/`` run (all ``trainer.total_steps`` of its ``config.json``
    in ``metrics.jsonl``), variants in the given order; runs still in progress are left out."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for variant in variants:
        for directory in sorted(Path(root, variant).glob("seed*")):
            metrics, config = directory / "metrics.jsonl", directory / "config.json"
            if not (metrics.is_file() and config.is_file() and directory.name[4:].isdigit()):
                continue
            rows = read_metrics(metrics)
            if rows and len(rows) >= json.loads(config.read_text())["trainer"]["total_steps"]:
                runs.setdefault(variant, {})[int(directory.name[4:])] = rows
    return runs


def summarize_run(rows: list[dict], target: float, smooth: int) -> dict:
    """Per-run figures: when the smoothed training success first reaches ``target``, and costs."""
    success = smoothed([r["success_rate"] for r in rows], smooth)
    first = target_index(rows, target, smooth)
    update = np.cumsum([r["update_time_s"] for r in rows])
    wall = train_seconds(rows)
    val = [rate for rate in map(held_out_greedy_rate, rows) if rate is not None]
    mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731

    def mean_logged(key):  # None where no step logged it (a run from before the key existed)
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.fmean(values) if values else None

    return {
        "steps": len(rows),
        "steps_to_target": None if first is None else first + 1,
        "minutes_to_target": None if first is None else float(wall[first] / 60),
        "update_s_to_target": None if first is None else float(update[first]),
        "initial_success": float(success[min(smooth, len(success)) - 1]),  # mean of the first `smooth` steps
        "final_success": float(success[-1]),
        "best_success": float(success.max()),
        "final_val_success": val[-1] if val else None,
        "update_s_per_step": mean("update_time_s"),
        "rollout_s_per_step": mean("rollout_time_s"),
        "val_s_per_step": sum(r.get("val_time_s") or 0.0 for r in rows) / len(rows),
        "step_s": mean("step_time_s"),
        "train_minutes": float(wall[-1] / 60),
        "update_s_total": float(update[-1]),
        "activation_mib": mean("activation_bytes") / MIB,
        "peak_mib": mean("peak_memory_bytes") / MIB,
        "chunks_kept_per_traj": statistics.fmean(r["pcm/kept_fraction"] * r["pcm/valid_chunks_per_traj"]
                                                 for r in rows),
        "valid_chunks_per_traj": mean("pcm/valid_chunks_per_traj"),
        **{name: mean_logged(key) for name, (key, _) in MOVEMENT.items()},
    }


def common_horizon(runs) -> int:
    """Steps every run has: tables compare runs over these, so an extended run is not compared at a later point."""
    return min(len(rows) for seeds in runs.values() for rows in seeds.values())


def summarize(runs, target: float, smooth: int) -> dict[str, dict]:
    """Per variant: each seed's summary over the common horizon, and the mean / standard deviation over seeds."""
    horizon, out = common_horizon(runs), {}
    for variant, seeds in runs.items():
        per_seed = {seed: {**summarize_run(rows[:horizon], target, smooth), "steps_run": len(rows)}
                    for seed, rows in sorted(seeds.items())}
        keys = next(iter(per_seed.values())).keys()
        aggregate = {}
        for key in keys:
            values = [s[key] for s in per_seed.values() if s[key] is not None]
            aggregate[key] = {"mean": statistics.fmean(values) if values else None,
                              "std": statistics.stdev(values) if len(values) > 1 else None,
                              "n": len(values)}
        out[variant] = {"seeds": per_seed, "aggregate": aggregate}
    return out


def variant_stats(runs, horizon: int, target: float, smooth: int) -> dict[str, dict]:
    """Per variant, over the common horizon: paired differences of training success to each of REFERENCES
    over all its steps and over its second half; success after FRACTIONS of it (mean of the last ``smooth``
    steps); steps and minutes to ``target``. All with 95% t-intervals over seeds."""
    runs = {variant: {seed: rows[:horizon] for seed, rows in seeds.items()} for variant, seeds in runs.items()}
    return {variant: {
        **{f"vs_{ref}": {"horizon": paired_difference(runs, variant, ref, horizon),
                        "second_half": paired_difference(runs, variant, ref, horizon, horizon // 2)}
           for ref in REFERENCES if ref != variant},
        "success_at": [success_at(runs, variant, max(1, round(f * horizon)), smooth) for f in FRACTIONS],
        "to_target": to_target(runs, variant, target, smooth)} for variant in runs}


def paired_table(stats: dict) -> str:
    """Each variant's paired difference of training success to full and to frozen, whole horizon and second half."""
    lines = ["| variant | vs full | vs frozen | vs full, 2nd half | vs frozen, 2nd half | seeds (full / frozen) |",
             "|" + "---|" * 6]
    for variant, st in stats.items():
        full, frozen = st.get("vs_full"), st.get("vs_frozen")
        seeds = " / ".join("—" if d is None else str(d["horizon"]["seeds"]) for d in (full, frozen))
        cells = [format_interval(d and d[part]) for part in ("horizon", "second_half") for d in (full, frozen)]
        lines.append(f"| {variant} | {' | '.join(cells)} | {seeds} |")
    return "\n".join(lines)


def success_table(stats: dict) -> str:
    """Training success after fixed numbers of steps, per variant."""
    first = next(iter(stats.values()))["success_at"]
    lines = ["| variant | " + " | ".join(f"after {s['step']} steps" for s in first) + " |",
             "|" + "---|" * (len(first) + 1)]
    lines += [f"| {variant} | " + " | ".join(format_interval(s, ".2f") for s in st["success_at"]) + " |"
              for variant, st in stats.items()]
    return "\n".join(lines)


def claims_section(claim_list: list[dict]) -> list[str]:
    """One line per claim: the difference it rests on, its interval, seeds and verdict."""
    return [f"- ({c['id']}) {c['claim']}: {c['variant']} − {c['reference']} = {format_interval(c)}, "
            f"{c['seeds']} seed{'' if c['seeds'] == 1 else 's'} → **{c['verdict']}**" for c in claim_list]


def _cell(stat: dict, fmt: str, of: int | None = None) -> str:
    if stat["mean"] is None:
        return "not reached" if of else "—"
    text = format(stat["mean"], fmt)
    if stat["std"] is not None:
        text += f" ± {format(stat['std'], fmt)}"
    if of is not None and stat["n"] < of:
        text += f" ({stat['n']}/{of} seeds)"
    return text


def table_one(summary: dict, target: float) -> str:
    """Table 1 analogue: steps / minutes / update seconds to the target, final success, update speed."""
    base = summary.get("full", {}).get("aggregate", {}).get("update_s_per_step", {}).get("mean")
    head = (f"| variant | seeds | steps to {target:.0%} | train min to {target:.0%} | update s to {target:.0%} "
            "| success: first → last (smoothed) | val success (last) | update s/step | update speed-up vs full "
            "| kept / valid chunks per traj |")
    lines = [head, "|" + "---|" * 10]
    for variant, data in summary.items():
        a, n = data["aggregate"], len(data["seeds"])
        speed = base / a["update_s_per_step"]["mean"] if base else float("nan")
        lines.append(
            f"| {variant} | {n} | {_cell(a['steps_to_target'], '.1f', n)} | {_cell(a['minutes_to_target'], '.1f', n)} "
            f"| {_cell(a['update_s_to_target'], '.1f', n)} | {_cell(a['initial_success'], '.2f')} → "
            f"{_cell(a['final_success'], '.2f')} | {_cell(a['final_val_success'], '.2f')} "
            f"| {_cell(a['update_s_per_step'], '.2f')} | {speed:.2f}× "
            f"| {a['chunks_kept_per_traj']['mean']:.1f} / {a['valid_chunks_per_traj']['mean']:.1f} |")
    return "\n".join(lines)


def cost_table(summary: dict) -> str:
    """Where a step's time goes and what the update holds in memory, per variant."""
    lines = ["| variant | step s | rollout s | update s | validation s (per step) | update share "
             "| activation MiB | peak RSS MiB |", "|" + "---|" * 8]
    for variant, data in summary.items():
        a = {k: v["mean"] for k, v in data["aggregate"].items()}
        lines.append(f"| {variant} | {a['step_s']:.1f} | {a['rollout_s_per_step']:.1f} | {a['update_s_per_step']:.2f} "
                     f"| {a['val_s_per_step']:.1f} | {a['update_s_per_step'] / a['step_s']:.1%} "
                     f"| {a['activation_mib']:.1f} | {a['peak_mib']:.0f} |")
    return "\n".join(lines)


def movement_table(summary: dict) -> str:
    """How far each variant's update moved the policy: the signal it had and the step it took, per rollout batch."""
    lines = ["| variant | trajectories with non-zero advantage | optimizer steps per batch | KL(old ‖ new) "
             "| clipped fraction | grad norm (before clipping) |", "|" + "---|" * 6]
    for variant, data in summary.items():
        cells = [_cell(data["aggregate"][name], fmt) for name, (_, fmt) in MOVEMENT.items()]
        lines.append(f"| {variant} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _band(ax, x: np.ndarray, band, label: str) -> None:
    """Mean line over seeds with its band; ``band`` is ``(mean, low, high)`` (a t-band: none with one seed)."""
    mean, low, high = band
    (line,) = ax.plot(x, mean, label=label)
    if np.isfinite(low).any():
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)


def fig_success(runs, out: Path, target: float, smooth: int) -> Path:
    """Fig. 3: smoothed training success vs step and vs training wall-clock (mean over seeds, 95% t-band
    across seeds, on the steps every seed of the variant has); validation as markers."""
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.2))
    for variant, seeds in runs.items():
        rows_list = list(seeds.values())
        n = min(len(rows) for rows in rows_list)
        band = curve_band(runs, variant, n, smooth)
        _band(by_step, np.arange(1, n + 1), band, variant)
        _band(by_time, np.mean([train_seconds(rows[:n]) for rows in rows_list], 0) / 60, band, variant)
        color = by_step.get_lines()[-1].get_color()
        for rows in rows_list:
            val = [(r["step"] + 1, held_out_greedy_rate(r)) for r in rows if held_out_greedy_rate(r) is not None]
            if val:
                by_step.plot(*zip(*val), "^", color=color, ms=5, alpha=0.7)
    for ax in (by_step, by_time):
        ax.axhline(target, color="grey", lw=0.8, ls="--")
        ax.set(ylim=(-0.02, 1.02), ylabel=f"training success ({smooth}-step mean)")
    by_step.set(xlabel="step", title="success vs step (band: 95% t over seeds; ▲ greedy validation)")
    by_time.set(xlabel="training wall-clock (min, validation excluded)", title="success vs wall-clock")
    by_step.legend(fontsize=8)
    return save_figure(fig, out / "fig3_success.png", dpi=100)


def fig_update_cost(runs, summary, out: Path) -> Path:
    """Fig. 4: cumulative actor-update time over steps (95% t-band over seeds); activation memory of the update."""
    fig, (cum, mem) = plt.subplots(1, 2, figsize=(12, 4.2))
    for variant, seeds in runs.items():
        rows_list = list(seeds.values())
        n = min(len(rows) for rows in rows_list)
        _band(cum, np.arange(1, n + 1),
              t_band([np.cumsum([r["update_time_s"] for r in rows[:n]]) for rows in rows_list]), variant)
    cum.set(xlabel="step", ylabel="cumulative actor-update time (s)", title="actor-update time")
    cum.legend(fontsize=8)
    names = list(summary)
    act = [summary[v]["aggregate"]["activation_mib"]["mean"] for v in names]
    mem.bar(names, act, color="tab:purple")
    for i, value in enumerate(act):
        mem.text(i, value, f"{value:.1f}", ha="center", va="bottom", fontsize=8)
    mem.set(ylabel="MiB (mean per update)", title="activation memory saved for backward")
    mem.tick_params(axis="x", rotation=15)
    return save_figure(fig, out / "fig4_update_cost.png", dpi=100)


def fig_budget_ablation(summary, out: Path) -> Path:
    """Fig. 5: success and update time against the budget B; the B = 12 ablations."""
    fig, (sweep, ablate) = plt.subplots(1, 2, figsize=(12, 4.2))
    sweep_names = [v for v in ("pcm_b8", "pcm", "pcm_b16", "full") if v in summary]
    labels = {"pcm_b8": "B=8", "pcm": "B=12", "pcm_b16": "B=16", "full": "all"}
    _dot_bars(sweep, summary, sweep_names, [labels[v] for v in sweep_names], "final_success")
    twin = sweep.twinx()
    twin.plot(range(len(sweep_names)), [summary[v]["aggregate"]["update_s_per_step"]["mean"] for v in sweep_names],
              "o-", color="tab:red")
    twin.set_ylabel("update s/step", color="tab:red")
    sweep.set(title="budget sweep (PCM)", ylabel="final training success")
    abl_names = [v for v in ("full", "pcm", "random", "top_phase") if v in summary]
    _dot_bars(ablate, summary, abl_names, abl_names, "final_success")
    ablate.set(title="selection rule at B = 12", ylabel="final training success")
    if "frozen" in summary:  # the no-learning control on the same prompts
        for ax in (sweep, ablate):
            ax.axhline(summary["frozen"]["aggregate"]["final_success"]["mean"], color="grey", ls="--",
                       label="frozen SFT policy")
        ablate.legend(fontsize=8)
    return save_figure(fig, out / "fig5_budget_ablation.png", dpi=100)


def _dot_bars(ax, summary, names, labels, key) -> None:
    means = [summary[v]["aggregate"][key]["mean"] for v in names]
    ax.bar(range(len(names)), means, color="tab:blue", alpha=0.6)
    for i, v in enumerate(names):
        values = [s[key] for s in summary[v]["seeds"].values()]
        ax.plot([i] * len(values), values, "k.", ms=6)
    ax.set_xticks(range(len(names)), labels)
    ax.set_ylim(0, 1.02)


def fig_allocation(runs, out: Path) -> Path:
    """Fig. 6: kept chunks per trajectory by phase over training (mean over seeds), per variant with a budget."""
    masking = [v for v, seeds in runs.items()  # variants that drop chunks (not full or the frozen control)
               if any(r["pcm/kept_fraction"] < 1.0 for rows in seeds.values() for r in rows)]
    names = masking or list(runs)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False, sharey=True)
    for ax, variant in zip(axes[0], names):
        rows_list = list(runs[variant].values())
        n = min(len(rows) for rows in rows_list)
        stacks = [np.mean([[r.get(f"pcm/kept_per_traj/{p}") or 0.0 for r in rows[:n]] for rows in rows_list], 0)
                  for p in PHASE_NAMES]
        ax.stackplot(np.arange(1, n + 1), stacks, labels=PHASE_NAMES)
        ax.set(xlabel="step", title=variant)
    axes[0][0].set_ylabel("kept chunks per trajectory")
    axes[0][0].legend(fontsize=7, loc="upper left")
    return save_figure(fig, out / "fig6_allocation.png", dpi=100)


def fig_time_split(summary, out: Path) -> Path:
    """Seconds per step: rollout, actor update, validation, the rest."""
    names = list(summary)
    parts = {"rollout": "rollout_s_per_step", "actor update": "update_s_per_step", "validation": "val_s_per_step"}
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(names), 4))
    bottom = np.zeros(len(names))
    for label, key in parts.items():
        values = np.array([summary[v]["aggregate"][key]["mean"] for v in names])
        ax.bar(names, values, bottom=bottom, label=label)
        bottom += values
    rest = np.array([summary[v]["aggregate"]["step_s"]["mean"] for v in names]) - bottom
    ax.bar(names, np.maximum(rest, 0.0), bottom=bottom, label="selection, logging, checkpoint")
    ax.set(ylabel="seconds per step", title="where a step's time goes")
    ax.tick_params(axis="x", rotation=15)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "time_split.png", dpi=100)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def page(summary: dict, facts: dict, target: float, smooth: int, horizon: int, figures: list[Path], *,
         stats: dict, claim_list: list[dict], margin: float, confirmatory: list[str] | None = None) -> str:
    """The generated page; ``confirmatory`` (a pre-registered study's section) replaces the interval-rule
    claims."""
    machine, versions = facts["machine"], facts["versions"]
    per_run = ["| variant | seed | steps run | steps to target | train min | final success | final val |",
               "|" + "---|" * 7]
    for variant, data in summary.items():
        for seed, s in data["seeds"].items():
            per_run.append(f"| {variant} | {seed} | {s['steps_run']} | {s['steps_to_target'] or 'not reached'} "
                           f"| {s['train_minutes']:.1f} | {s['final_success']:.2f} "
                           f"| {'—' if s['final_val_success'] is None else format(s['final_val_success'], '.2f')} |")
    return "\n".join([
        "# Strategy study (generated by `python -m pcm_train.study`)", "",
        f"Target: training success, mean of the last {smooth} steps, ≥ {target:.0%}. "
        "Training time excludes validation. ± is the standard deviation over seeds. "
        f"Tables use the first {horizon} steps of every run (the shortest run's length; "
        "the figures show every step). Runs still in progress are left out until complete.", "",
        "## Table 1 analogue", "", table_one(summary, target), "",
        "## Paired differences", "",
        "Training success of the variant minus the reference, per seed averaged over the steps, then a 95% "
        f"Student-t interval over seeds (the seed is the unit: both runs of a seed see the same prompts). "
        f"Whole horizon: steps 1–{horizon}; 2nd half: steps {horizon // 2 + 1}–{horizon}.", "",
        paired_table(stats), "",
        "## Success at fixed steps", "",
        f"Training success, mean of the last {smooth} steps, with a 95% t-interval over seeds.", "",
        success_table(stats), "",
        *(confirmatory or [
            "## Claims", "",
            f"On the paired differences over the 2nd half (steps {horizon // 2 + 1}–{horizon}). (a) holds if the "
            "interval is above 0, does not hold if below. (b) holds if the interval lies within "
            f"±{margin:g}, does not hold if below −{margin:g}. (c), (d) hold if the interval is below 0, do not "
            "hold if above. Anything else, or fewer than 2 seeds, is inconclusive; (b)–(d) need (a).", "",
            *claims_section(claim_list), ""]),
        "## How far the policy moved", "",
        "Per rollout batch, mean over steps (± over seeds): the share of trajectories whose advantage is not 0 "
        "(a group whose rollouts all succeed or all fail carries none), the PPO mini-batch steps taken, the "
        "approximate KL between the rollout policy and the updated one, the share of tokens the PPO clip "
        "stopped, and the gradient norm. A variant whose KL stays near 0 has not moved off its start.", "",
        movement_table(summary), "",
        "## Cost of a step", "", cost_table(summary), "",
        "## Figures", "", *[f"![{p.stem}]({p.name})" for p in figures], "",
        "## Runs", "", *per_run, "",
        "## Setup", "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['system']}, Python {machine['python']}; "
        "no GPU.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Study options: `{json.dumps(facts['study'])}`",
        "- Settings shared by every run: " + " ".join(f"`{s}`" for s in facts["settings"]),
        "- Variants: " + "; ".join(f"{k}: " + " ".join(f"`{o}`" for o in v) for k, v in facts["variants"].items()),
        "- Settings not listed are the trainer's defaults (PCM.md §7: clip (0.2, 0.4), temperature 1.6, "
        "grad-clip 2.0, T_rc = 5, p_min = 0.1). Each run's full config is its `config.json`.",
        ""])


def write_study(runs, out: Path, *, target: float, smooth: int, facts: dict, margin: float = 0.05,
                protocol: Protocol | None = None) -> list[Path]:
    """Writes ``out/study.md``, ``out/study.json`` and the figures; returns their paths. ``margin``: how far
    PCM may fall below full and still match it (claim (b)). With a pre-registered ``protocol`` the claims
    are its tests (``confirm_report``; validation outcomes read from ``out/runs``), under "confirmatory"."""
    if not runs:
        raise ValueError("no study runs with metrics yet; nothing to report")
    out.mkdir(parents=True, exist_ok=True)
    horizon = common_horizon(runs)
    summary, stats = summarize(runs, target, smooth), variant_stats(runs, horizon, target, smooth)
    claim_list = claims(runs, horizon, horizon // 2, margin)
    figures = [fig_success(runs, out, target, smooth), fig_update_cost(runs, summary, out),
               fig_budget_ablation(summary, out), fig_allocation(runs, out), fig_time_split(summary, out)]
    confirmatory, numbers = None, {}
    if protocol is not None:
        validation = collect_validation(out / "runs", runs)
        confirmatory, numbers, more = confirm_section(runs, validation, protocol, out)
        figures += more
        claim_list = []  # the interval-rule claims do not apply: the protocol's tests decide
    (out / "study.md").write_text(page(summary, facts, target, smooth, horizon, figures, stats=stats,
                                       claim_list=claim_list, margin=margin, confirmatory=confirmatory))
    (out / "study.json").write_text(json.dumps(_json_safe(
        {"summary": summary, "horizon": horizon, "stats": stats, "claims": claim_list,
         **({"confirmatory": numbers} if protocol is not None else {}),
         "stats_options": {"level": 0.95, "margin": margin, "success_window": smooth}, "setup": facts}),
        indent=1, allow_nan=False))
    return [out / "study.md", out / "study.json", *figures]
