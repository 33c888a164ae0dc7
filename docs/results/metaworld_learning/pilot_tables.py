"""The pilot tables of this page, from the runs' metrics.jsonl and validation.jsonl.

    python docs/results/metaworld_learning/pilot_tables.py RUNS_DIR [--json OUT.json]

RUNS_DIR holds ``<variant>/seed<k>/`` run directories (``python -m pcm_train.study ... runs=RUNS_DIR``).
Prints, as markdown: held-out success per decoder at every validation point of every run, the
diagnostics of every run that recorded them (``trainer.diagnostics_every``) averaged over windows of
20 steps, and the controller's phases (keep probabilities, score stability) per selecting run.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

WINDOW = 20
DIAG = ("diag/grad_cosine", "diag/grad_norm_ratio", "diag/grad_projection", "diag/adv_mass_kept")
PHASES = ("approach", "pre_grasp", "active_grip", "release_ramp", "tail")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def runs(root: Path) -> list[tuple[str, str, Path]]:
    return [(d.parent.name, d.name, d) for d in sorted(root.glob("*/seed*")) if (d / "metrics.jsonl").exists()]


def validation_table(root: Path) -> tuple[str, dict]:
    """Held-out success per (run, decoder, trained steps)."""
    rates: dict = {}
    for variant, seed, path in runs(root):
        if not (path / "validation.jsonl").exists():
            continue
        cells = defaultdict(list)
        for r in read_jsonl(path / "validation.jsonl"):
            cells[(r["set"], r["decoder"], r["trained_steps"])].append(bool(r["success"]))
        rates[f"{variant}/{seed}"] = {f"{s}/{d}/{t}": float(np.mean(v)) for (s, d, t), v in sorted(cells.items())}
    steps = sorted({int(k.rsplit("/", 1)[1]) for cell in rates.values() for k in cell})
    decoders = sorted({k.split("/")[1] for cell in rates.values() for k in cell})
    lines = ["| run | decoder | " + " | ".join(f"step {t}" for t in steps) + " |",
             "|---|---|" + "---|" * len(steps)]
    for run, cell in rates.items():
        for d in decoders:
            values = [cell.get(f"held_out/{d}/{t}") for t in steps]
            lines.append(f"| {run} | {d} | " + " | ".join("—" if v is None else f"{v:.3f}" for v in values) + " |")
    return "\n".join(lines), rates


def diagnostics_table(root: Path) -> tuple[str, dict]:
    """Window means of the diagnostics, training success and kept chunks per phase."""
    out: dict = {}
    keys = ("success_rate",) + DIAG + tuple(f"diag/adv_mass_kept/{p}" for p in PHASES[:3]) \
        + tuple(f"pcm/kept_per_traj/{p}" for p in PHASES[:3])
    for variant, seed, path in runs(root):
        rows = read_jsonl(path / "metrics.jsonl")
        if not any("diag/grad_cosine" in r for r in rows):
            continue
        for first in range(0, max(r["step"] for r in rows) + 1, WINDOW):
            window = [r for r in rows if first <= r["step"] < first + WINDOW]
            means = {}
            for key in keys:
                values = [r[key] for r in window if r.get(key) is not None]
                means[key] = float(np.mean(values)) if values else None
            out[f"{variant}/{seed}/steps {first}-{first + WINDOW - 1}"] = means
    short = [k.replace("diag/", "").replace("pcm/kept_per_traj/", "kept ") for k in keys]
    lines = ["| run, steps | " + " | ".join(short) + " |", "|---|" + "---|" * len(keys)]
    for name, means in out.items():
        lines.append(f"| {name} | " + " | ".join("—" if means[k] is None else f"{means[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines), out


def controller_table(root: Path) -> tuple[str, dict]:
    """Per pcm-like run: each phase's mean keep probability and score (with its coefficient of variation
    over steps), how often the highest-scoring phase changes, and the steps with no mixed group."""
    out: dict = {}
    for variant, seed, path in runs(root):
        rows = read_jsonl(path / "metrics.jsonl")
        if not any(r.get("pcm/score/active_grip") is not None for r in rows) or variant in ("full", "frozen"):
            continue
        entry: dict = {}
        for p in PHASES[:3]:
            scores = np.array([r[f"pcm/score/{p}"] for r in rows if r.get(f"pcm/score/{p}") is not None])
            keeps = np.array([r[f"pcm/keep_prob/{p}"] for r in rows if r.get(f"pcm/keep_prob/{p}") is not None])
            entry[p] = {"keep_prob": float(keeps.mean()), "score": float(scores.mean()),
                        "score_cv": float(scores.std() / scores.mean()) if scores.mean() else None}
        tops = [max(PHASES[:3], key=lambda p: r.get(f"pcm/score/{p}") or -1.0) for r in rows
                if r.get("pcm/score/active_grip") is not None]
        entry["top_phase_changes"] = sum(a != b for a, b in zip(tops, tops[1:]))
        entry["steps_without_signal"] = sum(1 for r in rows if not r.get("advantage/nonzero_fraction"))
        entry["steps"] = len(rows)
        out[f"{variant}/{seed}"] = entry
    lines = ["| run | " + " | ".join(f"{p}: keep p, score (CV)" for p in PHASES[:3])
             + " | top-phase changes | steps without a mixed group |", "|---|" + "---|" * 5]
    for name, e in out.items():
        cells = [f"{e[p]['keep_prob']:.2f}, {e[p]['score']:.2f} ({e[p]['score_cv']:.2f})" for p in PHASES[:3]]
        lines.append(f"| {name} | " + " | ".join(cells)
                     + f" | {e['top_phase_changes']} / {e['steps'] - 1} | {e['steps_without_signal']} |")
    return "\n".join(lines), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    validation, rates = validation_table(args.runs)
    diagnostics, windows = diagnostics_table(args.runs)
    controller, phases = controller_table(args.runs)
    print("Held-out success per decoder\n\n" + validation + "\n\nDiagnostics (window means)\n\n" + diagnostics
          + "\n\nController\n\n" + controller)
    if args.json:
        args.json.write_text(json.dumps({"held_out": rates, "diagnostics": windows, "controller": phases}, indent=1))


if __name__ == "__main__":
    main()
