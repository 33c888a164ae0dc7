"""Per-step metrics: one JSON object per line in ``metrics.jsonl``, plus TensorBoard and/or wandb; each
validation episode's outcome in ``validation.jsonl``.

Every backend gets the same metric names (the row's keys) against the training step. On a
resumed run the steps to redo are dropped from ``metrics.jsonl`` and TensorBoard (``purge_step``);
wandb resumes the same run (its id is kept in ``RUN/wandb_run_id``) and plots against the ``step``
metric, so a redone step appears there twice, the later point being the one ``metrics.jsonl`` has.
"""
from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

from pcm_train.config import LOGGERS


VALIDATION_FILE = "validation.jsonl"  # per validation episode: step, task, placement, success, episode_steps


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the rows of steps <= ``step`` of a JSON-lines log, if it exists (atomically: a crash leaves the
    old or the new log)."""
    from pcm_train.runtime.files import write_atomically

    if Path(path).exists():
        rows = [r for r in read_metrics(path) if r["step"] <= step]
        write_atomically(Path(path), "".join(json.dumps(r) + "\n" for r in rows))


class MetricsLog:
    """Append-only metrics of a run; ``truncate_after(step)`` drops steps a resumed run will redo."""

    def __init__(self, run_dir: Path, *, loggers: tuple[str, ...] | list[str] = ("tensorboard",),
                 purge_step: int | None = None, config: dict | None = None, wandb_project: str = "pcm",
                 wandb_mode: str | None = None):
        """``purge_step``: the first step this process will write; TensorBoard drops its points at and
        after it (a resumed run redoes those steps), as ``truncate_after(purge_step - 1)`` does here.
        ``loggers``: any of ``LOGGERS``; ``config`` is recorded with the wandb run; ``wandb_mode``
        ``online``/``offline``/``disabled`` (None: wandb's own default, e.g. ``WANDB_MODE``)."""
        unknown = sorted(set(loggers) - set(LOGGERS))
        if unknown:
            raise ValueError(f"loggers must be among {LOGGERS}, got {unknown}")
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None
        self._wandb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge_step)
        if "wandb" in loggers:
            self._wandb = _start_wandb(run_dir, config, wandb_project, wandb_mode)

    def truncate_after(self, step: int) -> None:
        """Keep the rows of steps <= ``step`` in ``metrics.jsonl`` and ``validation.jsonl``."""
        truncate_jsonl(self.path, step)
        truncate_jsonl(self.path.parent / VALIDATION_FILE, step)

    def write_validation(self, rows: list[dict]) -> None:
        """Appends one row per validation episode to ``validation.jsonl`` (each must hold ``step``)."""
        with (self.path.parent / VALIDATION_FILE).open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        """``row`` must hold ``step``; non-finite floats are stored as null."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        scalars = {k: v for k, v in clean.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, global_step=row["step"])
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log({"step": row["step"], **scalars})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(run_dir: Path, config: dict | None, project: str, mode: str | None):
    """A wandb run in ``run_dir/wandb``, resumed when ``run_dir/wandb_run_id`` names one."""
    try:
        import wandb
    except ImportError:
        raise ValueError("trainer.loggers includes wandb but wandb is not installed (pip install wandb)") from None
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                     config=config, mode=mode)
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    id_file.write_text(run_id)
    return run


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a torn last line from an interruption is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
