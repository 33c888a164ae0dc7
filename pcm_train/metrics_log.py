"""Per-step metrics: one JSON object per line in ``metrics.jsonl`` and TensorBoard scalars."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Append-only metrics of a run; ``truncate_after(step)`` drops steps a resumed run will redo."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, purge_step: int | None = None):
        """``purge_step``: the first step this process will write; TensorBoard drops its points at and
        after it (a resumed run redoes those steps), as ``truncate_after(purge_step - 1)`` does here."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def truncate_after(self, step: int) -> None:
        """Keep the rows of steps <= ``step`` (atomically: a crash leaves the old or the new log)."""
        from pcm_train.checkpoint import write_atomically

        rows = [r for r in read_metrics(self.path) if r["step"] <= step] if self.path.exists() else []
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def write(self, row: dict) -> None:
        """``row`` must hold ``step``; non-finite floats are stored as null."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self._writer is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, global_step=row["step"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (a torn last line from an interruption is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
