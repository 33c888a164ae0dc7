"""Rollout/update overlap: the mean step time of one training run without and with ``trainer.overlap``.

    python -m bench.overlap [--suite metaworld|libero_object] [--steps 6] [--skip 1] [--seed 0] [--json]
                            [key=value ...]

Two runs of the suite's study preset from its shipped SFT policy (as ``bench.rollout``), same seed, one after
the other on this machine: ``trainer.overlap=false``, then ``true``; no validation, no checkpoint but the
last; ``key=value`` overrides (``env.num_workers=2``, ``trainer.device=cuda``, ...) apply to both.

Reported: each run's mean ``step_time_s`` over the steady steps: all but the first ``--skip`` (the first step
of either run builds the simulators, and an overlapped run's first rollout has no update to hide behind)
and the last (an overlapped run's last step has no next batch to roll out);
``speedup`` = mean step time without overlap ÷ with; ``bound`` = the speed-up the run without overlap allows
at most, by arithmetic on its own split: step ÷ max(rollout, step − rollout) (all of the shorter side
hidden). Timings taken on a loaded machine are not worth recording: run it on an idle one.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.rollout import SUITES


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(row[key] for row in rows)


def train(overrides: list[str], output_dir: Path, pool_factory) -> list[dict]:
    """One training run through ``Trainer.run``; its metrics rows."""
    from pcm_train.config import load_config
    from pcm_train.training.metrics_log import read_metrics
    from pcm_train.training.trainer import Trainer

    trainer = Trainer(load_config(overrides + [f"trainer.output_dir={output_dir}"]), pool_factory)
    try:
        if not trainer.run():
            raise RuntimeError("the run was stopped before its last step")
    finally:
        trainer.close()
    return read_metrics(output_dir / "metrics.jsonl")


def compare(overrides: list[str], steps: int, skip: int, workdir: Path, pool_factory=None) -> dict:
    """Trains ``steps`` steps without, then with overlap (``overrides`` for both; ``pool_factory`` defaults to
    the Ray env workers) into ``workdir``; the mean step times over steps ``skip .. steps - 2``, and ratios."""
    if not 0 <= skip < steps - 1:
        raise ValueError(f"--steps must be at least --skip + 2 (the last step is left out too), got --steps "
                         f"{steps} with --skip {skip}")
    if pool_factory is None:
        from pcm_train.training.trainer import make_env_pool as pool_factory
    common = overrides + [f"trainer.total_steps={steps}", "trainer.val_every=0", "trainer.save_every=0"]
    runs = {}
    for overlap in (False, True):
        rows = train(common + [f"trainer.overlap={str(overlap).lower()}"], workdir / f"overlap_{overlap}".lower(),
                     pool_factory)
        runs[overlap] = [row for row in rows if skip <= row["step"] < steps - 1]
    plain, overlapped = runs[False], runs[True]
    step, rollout = _mean(plain, "step_time_s"), _mean(plain, "rollout_time_s")
    return {
        "steps": steps, "skip": skip, "overrides": overrides,
        "no_overlap": {"step_s": step, "rollout_s": rollout, "update_s": _mean(plain, "update_time_s"),
                       "rollout_share": _mean(plain, "rollout_share"), "update_share": _mean(plain, "update_share")},
        "overlap": {"step_s": _mean(overlapped, "step_time_s"), "rollout_s": _mean(overlapped, "rollout_time_s"),
                    "update_s": _mean(overlapped, "update_time_s"),
                    "hidden_s": _mean(overlapped, "overlap/hidden_s"), "wait_s": _mean(overlapped, "overlap/wait_s")},
        "speedup": step / _mean(overlapped, "step_time_s"),
        "bound": step / max(rollout, step - rollout),
    }


def format_table(result: dict) -> str:
    plain, overlapped = result["no_overlap"], result["overlap"]
    return "\n".join([
        f"rollout/update overlap: mean over steps {result['skip']}..{result['steps'] - 2}; "
        f"overrides {' '.join(result['overrides'])}",
        "| run | step s | rollout s | update s | rollout hidden s | waited for rollouts s |", "|---|---|---|---|---|---|",
        f"| trainer.overlap=false | {plain['step_s']:.2f} | {plain['rollout_s']:.2f} | {plain['update_s']:.2f} "
        f"| 0 | {plain['rollout_s']:.2f} |",
        f"| trainer.overlap=true | {overlapped['step_s']:.2f} | {overlapped['rollout_s']:.2f} | "
        f"{overlapped['update_s']:.2f} | {overlapped['hidden_s']:.2f} | {overlapped['wait_s']:.2f} |",
        f"speedup = {result['speedup']:.2f}x (step time without ÷ with); bound from the split without overlap "
        f"(update {plain['update_share']:.0%}, rollout {plain['rollout_share']:.0%} of a step): {result['bound']:.2f}x"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overlap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="metaworld")
    parser.add_argument("--steps", type=int, default=6, help="training steps of each run")
    parser.add_argument("--skip", type=int, default=1,
                        help="first steps left out of the means (warm-up); the last step is left out too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the two run directories here (default: temporary)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    args = parser.parse_args(argv)
    preset, policy_path = SUITES[args.suite]
    overrides = [f"preset={preset}", f"policy.path={policy_path}", f"trainer.seed={args.seed}", *args.overrides]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_overlap.") as scratch:
        try:
            result = compare(overrides, args.steps, args.skip, args.out or Path(scratch))
        except ValueError as error:
            parser.error(str(error))
    result["suite"], result["bench_s"] = args.suite, time.perf_counter() - started
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
