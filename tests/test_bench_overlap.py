"""``python -m bench.overlap``: one training run without and with ``trainer.overlap``, the ratio of their mean
step times (fake envs and a tiny MetaWorld run; the figures themselves are measured on an idle machine)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pcm_train.training.metrics_log import read_metrics

from fake_env import fake_pool_factory
from test_trainer import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_compare_trains_without_then_with_overlap(tmp_path):
    from bench.overlap import compare, format_table

    result = compare(TINY, steps=4, skip=1, workdir=tmp_path, pool_factory=fake_pool_factory(close_steps=6))
    plain = read_metrics(tmp_path / "overlap_false" / "metrics.jsonl")
    overlapped = read_metrics(tmp_path / "overlap_true" / "metrics.jsonl")
    assert [r["rollout/policy_lag"] for r in plain] == [0, 0, 0, 0]
    assert [r["rollout/policy_lag"] for r in overlapped] == [0, 1, 1, 1]
    assert not any(k.startswith("val/") for r in plain + overlapped for k in r)
    step_without = sum(r["step_time_s"] for r in plain[1:3]) / 2  # steps 1 and 2: not the first, not the last
    assert result["no_overlap"]["step_s"] == pytest.approx(step_without)
    assert result["speedup"] == pytest.approx(step_without / result["overlap"]["step_s"])
    rollout = result["no_overlap"]["rollout_s"]
    assert result["bound"] == pytest.approx(step_without / max(rollout, step_without - rollout))
    assert 1 <= result["bound"] <= 2
    assert "speedup = " in format_table(result)
    with pytest.raises(ValueError, match="--steps must be at least --skip"):
        compare(TINY, steps=2, skip=1, workdir=tmp_path / "again", pool_factory=fake_pool_factory())


@pytest.mark.skipif(importlib.util.find_spec("metaworld") is None, reason="MetaWorld is installed by the train extra")
def test_bench_overlap_runs_metaworld_both_ways():
    run = subprocess.run([sys.executable, "-m", "bench.overlap", "--steps", "3", "--skip", "1", "--json",
                          "env.num_workers=1", "rollout.prompts_per_step=1", "rollout.group_size=2",
                          "rollout.max_chunks=4"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["suite"] == "metaworld" and result["steps"] == 3
    assert result["speedup"] == pytest.approx(result["no_overlap"]["step_s"] / result["overlap"]["step_s"])
    assert result["overlap"]["hidden_s"] > 0
