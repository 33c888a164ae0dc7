"""Run directories that are never lost by accident: checks before anything is written, then setup.

A fresh run refuses a non-empty directory unless ``trainer.overwrite=true``; a resumed run needs
a loadable checkpoint and a metrics log covering every step up to it. Leftovers of an
interrupted checkpoint write (staging directories, temporary ``latest`` files) are removed when
a run starts. Everything here raises ``RunDirError`` (a ValueError) naming the directory or file
and what to do.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from pcm_train.training.metrics_log import read_metrics


class RunDirError(ValueError):
    """A run directory that cannot be used as asked."""


def check_fresh(run_dir: Path, overwrite: bool, ignore: tuple[str, ...] = ()) -> None:
    """A fresh run may only start in a missing or empty directory (but for ``ignore``d entries), or
    replace one on request."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"trainer.output_dir={run_dir} is a file, not a directory")
    entries = sorted(p.name for p in run_dir.iterdir() if p.name not in ignore) if run_dir.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunDirError(f"trainer.output_dir={run_dir} is not empty ({shown}); continue that run with "
                          f"resume={run_dir}, choose another trainer.output_dir, or replace it with "
                          "trainer.overwrite=true")


def check_metrics_log(run_dir: Path, checkpoint_step: int, allow_partial: bool) -> list[int]:
    """The metrics log of a run resumed at ``checkpoint_step`` must hold rows 0..checkpoint_step.

    Returns the missing steps (empty when complete). Raises RunDirError when some are missing and
    ``allow_partial`` is False.
    """
    path = Path(run_dir) / "metrics.jsonl"
    present = {int(row["step"]) for row in read_metrics(path) if isinstance(row.get("step"), int)} \
        if path.is_file() else set()
    missing = [step for step in range(checkpoint_step + 1) if step not in present]
    if missing and not allow_partial:
        what = "is missing" if not path.is_file() else f"lacks steps {_ranges(missing)}"
        raise RunDirError(f"resume={run_dir}: {path} {what}, but the checkpoint is at step {checkpoint_step}; "
                          "restore the file, or resume with trainer.allow_partial_log=true to continue "
                          "without those rows")
    return missing


def clean_staging(run_dir: Path) -> list[Path]:
    """Removes what an interrupted checkpoint write left (``checkpoints/.step_*``, ``.latest.*``,
    ``.config.json.*``); returns the removed paths."""
    run_dir = Path(run_dir)
    patterns = [("checkpoints", ".step_*"), ("checkpoints", ".latest.*"), (".", ".config.json.*")]
    removed = []
    for folder, pattern in patterns:
        for path in sorted((run_dir / folder).glob(pattern)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def replace_contents(run_dir: Path, keep: tuple[str, ...] = ()) -> None:
    """Empties ``run_dir`` (``trainer.overwrite=true``) but for the entries named in ``keep``, creating it
    if needed."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.name in keep:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def _ranges(steps: list[int]) -> str:
    """'0-3, 7' for [0, 1, 2, 3, 7]."""
    parts, start = [], steps[0]
    for previous, step in zip(steps, steps[1:] + [None]):
        if step != previous + 1:
            parts.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = step
    return ", ".join(parts)
