"""Plots and a markdown summary from one or more run directories.

    python -m pcm_train.report RUN_DIR [RUN_DIR ...] [--out DIR]

One run: its figures go to ``RUN_DIR/report/``. Several runs (e.g. ``full`` vs
``pcm``): one figure per topic with a line per run, in ``--out`` (default: the
first run's ``report/``). Figures: training success and every validation decoder x prompt set
(``validation.jsonl``) vs updates and vs wall-clock, kept chunks
per phase over steps (paper Fig. 6), C_c per phase (Fig. 1 left), the split of
step time between rollout and update (Fig. 1 right); plus ``summary.md``.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pcm_train.cli import argument_parser, run_command
from pcm_train.algorithm.controller import PHASE_NAMES  # noqa: E402
from pcm_train.training.evaluation import validation_curves  # noqa: E402
from pcm_train.training.metrics_log import VALIDATION_FILE, read_metrics  # noqa: E402


def _run_label(run_dir: Path) -> str:
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    strategy = config.get("pcm", {}).get("strategy", "?")
    budget = config.get("pcm", {}).get("budget", "?")
    return f"{run_dir.name} ({strategy}{'' if strategy == 'full' else f', B={budget}'})"


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else float("nan")


def plot_success(runs, validations, out: Path) -> Path:
    """Training success (dotted, the RL temperature on training prompts) and each validation decoder x set
    (solid: held-out prompts, dashed: others; its start included) against the updates the policy had, and
    against wall-clock."""
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rows in runs.items():
        wall = {r["step"] + 1: r["wall_time_s"] / 60 for r in rows}
        wall[0] = 0.0
        steps, values = _series(rows, "success_rate")
        by_step.plot(steps, values, ":", marker="o", ms=3, label=f"{label} training (rollouts)")
        by_time.plot([wall.get(s, 0.0) for s in steps], values, ":", marker="o", ms=3)
        for (set_name, decoder), points in validation_curves(validations.get(label, [])).items():
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            style = "-" if set_name == "held_out" else "--"
            by_step.plot(xs, ys, style, marker="s", ms=4, label=f"{label} {set_name} {decoder}")
            by_time.plot([wall.get(x, float("nan")) for x in xs], ys, style, marker="s", ms=4)
    by_step.set(xlabel="updates", ylabel="success rate", ylim=(-0.02, 1.02), title="success vs updates")
    by_time.set(xlabel="wall-clock (min)", ylim=(-0.02, 1.02), title="success vs wall-clock")
    by_step.legend(fontsize=7)
    return save_figure(fig, out / "success.png")


def plot_allocation(runs, out: Path) -> Path:
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (label, rows) in zip(axes[0], runs.items()):
        steps = [r["step"] for r in rows]
        stacks = [[r.get(f"pcm/kept_per_traj/{p}") or 0.0 for r in rows] for p in PHASE_NAMES]
        ax.stackplot(steps, stacks, labels=PHASE_NAMES)
        ax.set(xlabel="step", ylabel="kept chunks per trajectory", title=label)
    axes[0][0].legend(fontsize=7, loc="upper left")
    return save_figure(fig, out / "allocation.png")


def plot_phase_scores(runs, out: Path) -> Path:
    fig, (lines, bars) = plt.subplots(1, 2, figsize=(11, 4))
    label, rows = next(iter(runs.items()))
    for p in PHASE_NAMES:
        steps, values = _series(rows, f"pcm/score/{p}")
        if steps:
            lines.plot(steps, values, marker="o", ms=3, label=p)
    lines.set(xlabel="step", ylabel="C_c", title=f"phase score per step: {label}")
    if lines.get_legend_handles_labels()[0]:
        lines.legend(fontsize=7)
    width = 0.8 / len(runs)
    for i, (run_label, run_rows) in enumerate(runs.items()):
        means = [_mean(run_rows, f"pcm/score/{p}") for p in PHASE_NAMES]
        bars.bar([k + i * width for k in range(len(PHASE_NAMES))], means, width, label=run_label)
    bars.set_xticks([k + 0.4 - width / 2 for k in range(len(PHASE_NAMES))], PHASE_NAMES, rotation=20, fontsize=8)
    bars.set(ylabel="mean C_c", title="success/failure divergence by phase")
    bars.legend(fontsize=7)
    return save_figure(fig, out / "phase_scores.png")


def plot_time_split(runs, out: Path) -> Path:
    """Seconds per step: the rollout split into the policy, waiting on the envs and the rest (runs that
    recorded ``rollout/policy_s``; older runs show one rollout bar), the actor update, everything else."""
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(runs), 4))
    labels = list(runs)
    rollout = [_mean(rows, "rollout_time_s") for rows in runs.values()]
    policy = [_mean(rows, "rollout/policy_s") for rows in runs.values()]
    wait = [_mean(rows, "rollout/wait_s") for rows in runs.values()]
    parts = {"rollout: policy": [0.0 if math.isnan(p) else p for p in policy],
             "rollout: waiting on envs": [0.0 if math.isnan(w) else w for w in wait]}
    parts["rollout: other" if any(not math.isnan(p) for p in policy) else "rollout"] = [
        max(r - a - b, 0.0) for r, a, b in zip(rollout, *parts.values())]
    parts["actor update"] = [_mean(rows, "update_time_s") for rows in runs.values()]
    parts["other"] = [max(_mean(rows, "step_time_s") - r - u, 0.0)
                      for rows, r, u in zip(runs.values(), rollout, parts["actor update"])]
    bottom = np.zeros(len(labels))
    for name, values in parts.items():
        if any(values):
            ax.bar(labels, values, bottom=bottom, label=name)
        bottom += np.array(values)
    for i, (r, u, total) in enumerate(zip(rollout, parts["actor update"], bottom)):
        ax.text(i, total, f"update {u / total:.0%}\nrollout {r / total:.0%}", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(top=1.3 * max(bottom))
    ax.set(ylabel="seconds per step", title="where a step's time goes")
    ax.tick_params(axis="x", labelsize=7, rotation=15)
    ax.legend(fontsize=7)
    return save_figure(fig, out / "time_split.png")


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lays out, writes and closes a figure; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def summary_markdown(runs, validations) -> str:
    lines = ["| run | steps | final train success | last validation (set decoder: rate) | update s/step "
             "| rollout s/step | rollout: policy / waiting on envs s | env steps/s | update share "
             "| activation MiB | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, rows in runs.items():
        curves = validation_curves(validations.get(label, []))
        last = ", ".join(f"{s} {d}: {points[-1][1]:.2f}" for (s, d), points in curves.items()) or "none"
        update, step = _mean(rows, "update_time_s"), _mean(rows, "step_time_s")
        lines.append(
            f"| {label} | {rows[-1]['step'] + 1} | {rows[-1]['success_rate']:.2f} | {last} | {update:.2f} | "
            f"{_mean(rows, 'rollout_time_s'):.2f} | {_mean(rows, 'rollout/policy_s'):.2f} / "
            f"{_mean(rows, 'rollout/wait_s'):.2f} | {_mean(rows, 'rollout/env_steps_per_s'):.0f} "
            f"| {update / step:.0%} | "
            f"{_mean(rows, 'activation_bytes') / 2**20:.1f} | {_mean(rows, 'peak_memory_bytes') / 2**20:.0f} |")
    if len(runs) > 1:
        base_label, base_rows = next(iter(runs.items()))
        for label, rows in list(runs.items())[1:]:
            ratio = _mean(base_rows, "update_time_s") / _mean(rows, "update_time_s")
            lines.append(f"\nActor update: {label} is {ratio:.2f}x the speed of {base_label}.")
    return "\n".join(lines) + "\n"


def write_report(run_dirs: list[Path], out: Path | None = None) -> list[Path]:
    """Figures and ``summary.md`` for the given runs; returns the written paths."""
    runs, validations = {}, {}
    for run_dir in map(Path, run_dirs):
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (is it a pcm_train run directory?)")
        rows = read_metrics(metrics)
        if not rows:
            raise ValueError(f"{metrics} has no complete step yet")
        label = _run_label(run_dir)
        runs[label] = rows
        validation = run_dir / VALIDATION_FILE
        validations[label] = read_metrics(validation) if validation.is_file() else []
    out = Path(out) if out else Path(run_dirs[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_success(runs, validations, out), plot_allocation(runs, out), plot_phase_scores(runs, out),
               plot_time_split(runs, out)]
    summary = out / "summary.md"
    summary.write_text("# Run summary\n\n" + summary_markdown(runs, validations) + "\nFigures: "
                       + ", ".join(p.name for p in written) + "\n")
    return written + [summary]


def main(argv=None) -> int:
    return run_command(__doc__, _main, argv, own_help=False)


def _main(argv: list[str]) -> int:
    ap = argument_parser("pcm_train.report", __doc__)
    ap.add_argument("run_dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    paths = write_report(args.run_dirs, args.out)
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
