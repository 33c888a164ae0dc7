"""Knee analysis of the chunk-level phase scores (PCM.md §6, the paper's Appendix D).

    python -m pcm_train.knee RUN_DIR_OR_BATCH [--out DIR] [--chunks 64] [--action-token-start ID]

Every valid chunk carries the score ``C_c`` of its phase. Ranking all valid chunks
by that score (descending), the capture curve is the fraction of the total
chunk-level score mass held by the top ``k`` chunks against ``k / N`` (``N`` valid
chunks). Its knee suggests a budget ``B``; the paper reads 50% / 59% / 64% of the
mass at B = 8 / 12 / 16 of 64 chunks and a knee near 20% of the chunks.

Knee: the point of the curve farthest above the chord from (0, 0) to (1, 1), i.e.
the largest ``y - x`` (Kneedle's difference curve, Satopää et al. 2011). Ranked
capture curves are concave, so this is also the largest perpendicular distance to
the chord and the last point where the curve is steeper than the chord: the knee
falls right after the last chunk whose score is above the mean chunk score.

Accepted inputs:

- a run directory of ``pcm_train.run`` (its ``metrics.jsonl``): per phase, the mean
  of ``pcm/score/<phase>`` over the steps where it is defined (0 if never defined)
  and the mean of ``pcm/chunks_per_traj/<phase>`` over the steps; each phase's
  score is repeated as many times as that phase has chunks in ``TRAJECTORIES``
  average trajectories (only the proportions matter for the curve);
- a rollout batch file written by ``save_batch`` (tensors and plain data only:
  ``responses`` int [N, C, L*D] action token ids, ``finish_step`` int [N],
  ``complete`` bool [N] and ``uid``, a list of N group ids), read with
  ``torch.load(weights_only=True)``, so a file from someone else cannot run code
  (a pickled object in it is refused). Chunks are labeled with
  ``pcm_kernels.label_phases`` (the paper's thresholds) and scored with
  ``pcm_kernels.phase_scores``; phases with no mixed group score 0.

``knee.png`` (the curve, the diagonal, the knee and B = 8/12/16) goes to ``--out``
(default: ``RUN_DIR/report/``, or the batch file's directory) and one summary line
to stdout. A missing or unreadable input, or one whose chunk scores are all 0 (no
group mixed successes and failures: no knee to find), exits with code 2.
"""
from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import matplotlib
import numpy as np
import torch
from verl import DataProto

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import pcm_kernels as pk  # noqa: E402
from pcm_train.cli import argument_parser, run_command
from pcm_train.algorithm.batch import executed_actions, group_ids  # noqa: E402
from pcm_train.algorithm.controller import PHASE_NAMES  # noqa: E402
from pcm_train.training.metrics_log import read_metrics  # noqa: E402
from pcm_train.integrations.simplevla import OPENVLA_ACTION_TOKEN_START  # noqa: E402

PAPER_BUDGETS = (8, 12, 16)
TRAJECTORIES = 100  # average trajectories a run directory's chunk-level vector stands for


class KneeInputError(ValueError):
    """An input path that is missing, unreadable, or holds nothing to analyse."""


def capture_curve(chunk_scores) -> tuple[np.ndarray, np.ndarray]:
    """The capture curve of chunk-level scores.

    Args:
        chunk_scores: Tensor (or array-like) [N], N >= 1, finite and >= 0, one score per valid chunk.

    Returns:
        ``(x, y)``, float64 numpy arrays [N + 1]: ``x[k] = k / N`` and ``y[k]`` the share of the
        total score held by the ``k`` highest-scoring chunks; ``(x[0], y[0]) = (0, 0)`` and
        ``(x[N], y[N]) = (1, 1)``. Ties do not change the curve. If every score is 0, no chunk
        holds more than another and ``y = x`` (the diagonal).
    """
    scores = torch.as_tensor(chunk_scores).detach().cpu().to(torch.float64)
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"chunk_scores must be a non-empty 1-D vector, got shape {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()) or bool((scores < 0).any()):
        raise ValueError("chunk_scores must be finite and >= 0")
    N = scores.numel()
    x = np.arange(N + 1, dtype=np.float64) / N
    mass = torch.cumsum(torch.sort(scores, descending=True).values, 0).numpy()
    if mass[-1] == 0:
        return x, x.copy()
    return x, np.concatenate([[0.0], mass / mass[-1]])


def _check_curve(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 2:
        raise ValueError(f"x and y must be 1-D of the same length >= 2, got {x.shape} and {y.shape}")
    return x, y


def knee_point(x, y) -> int:
    """Index of the knee of a curve from (0, 0) to (1, 1) such as ``capture_curve``'s.

    The knee is the point farthest above the chord ``y = x``: ``argmax(y - x)``, the first
    such index on ties. A diagonal curve (all scores 0) has no knee and gives 0.
    """
    x, y = _check_curve(x, y)
    return int(np.argmax(y - x))


def captured_at(x, y, fraction: float) -> float:
    """The curve's ``y`` at ``x = fraction`` (in [0, 1]), linearly interpolated between points."""
    x, y = _check_curve(x, y)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return float(np.interp(fraction, x, y))


def recommend_budget(x, y, chunks_per_trajectory: int) -> int:
    """Budget at the knee: ``B = round(x[knee] * chunks_per_trajectory)`` (half up), at least 1."""
    if not isinstance(chunks_per_trajectory, int) or chunks_per_trajectory < 1:
        raise ValueError(f"chunks_per_trajectory must be an int >= 1, got {chunks_per_trajectory!r}")
    knee_fraction = float(np.asarray(x, dtype=np.float64)[knee_point(x, y)])
    return max(1, math.floor(knee_fraction * chunks_per_trajectory + 0.5))


def budget_capture(x, y, chunks_per_trajectory: int = 64, budgets=PAPER_BUDGETS) -> dict[int, float]:
    """Captured mass at each budget: ``{B: captured_at(x, y, min(B / chunks_per_trajectory, 1))}``.

    A budget of at least ``chunks_per_trajectory`` keeps every chunk and captures everything.
    """
    return {b: captured_at(x, y, min(b / chunks_per_trajectory, 1.0)) for b in budgets}


def chunk_scores_from_metrics(rows: list[dict], trajectories: int = TRAJECTORIES) -> torch.Tensor:
    """Chunk-level scores float64 [N] of a run from its ``metrics.jsonl`` rows (see the module doc).

    Phase ``c`` contributes ``round(mean chunks_per_traj_c * trajectories)`` copies of its mean score.
    """
    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    counts = [mean(f"pcm/chunks_per_traj/{p}") for p in PHASE_NAMES]
    if all(c is None for c in counts):
        raise KneeInputError("metrics.jsonl has no pcm/chunks_per_traj/<phase> values")
    scores = [mean(f"pcm/score/{p}") or 0.0 for p in PHASE_NAMES]
    repeats = [round((c or 0.0) * trajectories) for c in counts]
    if sum(repeats) == 0:
        raise KneeInputError("metrics.jsonl counts no valid chunks")
    return torch.tensor(scores, dtype=torch.float64).repeat_interleave(torch.tensor(repeats))


def chunk_scores_from_batch(batch: DataProto | dict, *, action_token_start: int = OPENVLA_ACTION_TOKEN_START,
                            action_chunk: int = 8, action_dim: int = 7) -> torch.Tensor:
    """Chunk-level scores float32 [N_valid] of a rollout batch: the phase score of every valid chunk.

    ``batch``: a DataProto or dict with ``responses`` int [N, C, L*D], ``finish_step`` int [N],
    ``complete`` bool [N] and ``uid`` [N] (see the module doc).
    """
    if isinstance(batch, DataProto):
        fields = {k: batch.batch[k] for k in ("responses", "finish_step", "complete") if k in batch.batch.keys()}
        if "uid" in batch.non_tensor_batch:
            fields["uid"] = batch.non_tensor_batch["uid"]
    elif isinstance(batch, dict):
        fields = batch
    else:
        raise KneeInputError(f"expected a DataProto or a dict, got {type(batch).__name__}")
    missing = [k for k in ("responses", "finish_step", "complete", "uid") if k not in fields]
    if missing:
        raise KneeInputError(f"batch is missing {missing}")
    responses = torch.as_tensor(fields["responses"]).cpu()
    if responses.dim() != 3 or responses.shape[2] != action_chunk * action_dim:
        raise KneeInputError(f"responses must be [N, C, {action_chunk * action_dim}], got {tuple(responses.shape)}")
    N = responses.shape[0]
    finish = torch.as_tensor(fields["finish_step"]).cpu()
    success = torch.as_tensor(fields["complete"]).cpu().bool()
    if finish.shape != (N,) or success.shape != (N,) or len(fields["uid"]) != N:
        raise KneeInputError(f"finish_step, complete and uid must each hold N = {N} entries")
    try:
        actions, gripper = executed_actions(responses, action_token_start=action_token_start,
                                            action_chunk=action_chunk, action_dim=action_dim)
    except ValueError as err:
        raise KneeInputError(f"{err}: is action_token_start = {action_token_start} the policy's first action "
                             "token id?") from err
    labels = pk.label_phases(gripper, finish)
    scores, _ = pk.phase_scores(actions, labels, success, group_ids(fields["uid"]))
    return scores[labels[labels >= 0].long()]


BATCH_KEYS = ("responses", "finish_step", "complete", "uid")


def save_batch(batch: DataProto | dict, path: Path) -> Path:
    """Writes the rollout batch's ``BATCH_KEYS`` as tensors and a list of str group ids (what
    ``load_chunk_scores`` reads back without unpickling anything)."""
    if isinstance(batch, DataProto):
        fields = {k: batch.batch[k] for k in BATCH_KEYS[:3] if k in batch.batch.keys()}
        fields["uid"] = batch.non_tensor_batch.get("uid")
    else:
        fields = dict(batch)
    missing = [k for k in BATCH_KEYS if fields.get(k) is None]
    if missing:
        raise KneeInputError(f"batch is missing {missing}")
    plain = {k: torch.as_tensor(fields[k]).cpu() for k in BATCH_KEYS[:3]}
    plain["uid"] = [str(u) for u in fields["uid"]]
    torch.save(plain, path)
    return Path(path)


def load_chunk_scores(path: Path, *, action_token_start: int = OPENVLA_ACTION_TOKEN_START) -> torch.Tensor:
    """Chunk-level scores from a run directory or a saved batch file; ``KneeInputError`` if unusable."""
    path = Path(path)
    if path.is_dir():
        metrics = path / "metrics.jsonl"
        if not metrics.is_file():
            raise KneeInputError(f"{path} has no metrics.jsonl (is it a pcm_train run directory?)")
        return chunk_scores_from_metrics(read_metrics(metrics))
    if not path.is_file():
        raise KneeInputError(f"{path} does not exist")
    try:
        batch = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refuses anything but tensors and plain data
        raise KneeInputError(f"{path} holds more than tensors and plain data (a pickled object, refused: it "
                             "could run code); write batch files with pcm_train.tools.knee.save_batch") from err
    except Exception as err:  # a file that is not a torch.save archive
        raise KneeInputError(f"cannot read {path} as a torch.save file ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise KneeInputError(f"{path} must hold a dict of {list(BATCH_KEYS)} (pcm_train.tools.knee.save_batch), "
                             f"got {type(batch).__name__}")
    return chunk_scores_from_batch(batch, action_token_start=action_token_start)


def plot_knee(x, y, path: Path, *, chunks_per_trajectory: int = 64, budgets=PAPER_BUDGETS) -> Path:
    """Save the capture curve with the diagonal, the knee and the budgets marked; returns ``path``."""
    x, y = _check_curve(x, y)
    k = knee_point(x, y)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(100 * x, 100 * y, label="ranked chunks")
    ax.plot([0, 100], [0, 100], ":", color="gray", label="uniform (diagonal)")
    ax.plot(100 * x[k], 100 * y[k], "o", color="red", label=f"knee: {x[k]:.1%} -> {y[k]:.1%}")
    for b, captured in budget_capture(x, y, chunks_per_trajectory, budgets).items():
        frac = min(b / chunks_per_trajectory, 1.0)
        ax.axvline(100 * frac, ls="--", lw=0.8, color="tab:green")
        ax.plot(100 * frac, 100 * captured, ".", color="tab:green")
        ax.annotate(f"B={b}: {captured:.0%}", (100 * frac, 100 * captured), xytext=(4, -12),
                    textcoords="offset points", fontsize=7, color="tab:green")
    ax.set(xlabel="% of chunks (ranked by phase score)", ylabel="% of score mass captured", xlim=(0, 100),
           ylim=(0, 102), title=f"knee analysis (B of {chunks_per_trajectory} chunks)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_line(x, y, chunks_per_trajectory: int = 64, budgets=PAPER_BUDGETS) -> str:
    """``knee at X% of chunks captures Y% of score mass; recommended B = Z (of C chunks); captured at B=...``"""
    k = knee_point(x, y)
    captured = budget_capture(x, y, chunks_per_trajectory, budgets)
    return (f"knee at {x[k]:.1%} of chunks captures {y[k]:.1%} of score mass; "
            f"recommended B = {recommend_budget(x, y, chunks_per_trajectory)} (of {chunks_per_trajectory} chunks); "
            f"captured at B={'/'.join(map(str, captured))}: {'/'.join(f'{c:.1%}' for c in captured.values())}")


def main(argv=None) -> int:
    return run_command(__doc__, _main, argv, own_help=False)


def _main(argv: list[str]) -> int:
    ap = argument_parser("pcm_train.knee", __doc__)
    ap.add_argument("input", type=Path, help="a run directory (metrics.jsonl) or a rollout batch file (save_batch)")
    ap.add_argument("--out", type=Path, default=None, help="folder for knee.png")
    ap.add_argument("--chunks", type=int, default=64, help="chunks per trajectory the budget is a share of")
    ap.add_argument("--action-token-start", type=int, default=OPENVLA_ACTION_TOKEN_START,
                    help="first action token id of a batch file's vocabulary (OpenVLA: 31744)")
    args = ap.parse_args(argv)
    if args.chunks < 1:
        raise KneeInputError(f"--chunks must be >= 1, got {args.chunks}")
    scores = load_chunk_scores(args.input, action_token_start=args.action_token_start)
    if not bool((scores > 0).any()):
        raise KneeInputError(f"every chunk score in {args.input} is 0 (no group mixed successes and "
                             "failures): no knee to find")
    x, y = capture_curve(scores)
    out = args.out or (args.input / "report" if args.input.is_dir() else args.input.parent)
    out.mkdir(parents=True, exist_ok=True)
    plot_knee(x, y, out / "knee.png", chunks_per_trajectory=args.chunks)
    print(summary_line(x, y, args.chunks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
