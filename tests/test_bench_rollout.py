"""``python -m bench.rollout``: the engine against the raw throughput of the same env workers (MetaWorld,
tiny sizes; the figures themselves are measured on an idle machine, not here)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pcm_train.training.rollout import Episode, collect_rollouts

from fake_env import FakePool

ROOT = Path(__file__).resolve().parents[1]


def test_recording_pool_keeps_each_episodes_executed_actions_across_refills():
    from bench.rollout import RecordingPool
    from pcm_train.policies import SmallVLA, SmallVLAConfig

    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    episodes = [Episode(task, state, str(task)) for task, state in [(0, 1), (1, 2), (2, 3), (0, 4), (1, 5)]]
    pool = RecordingPool(FakePool(image_size=16, close_steps=6, max_steps=40, num_slots=2))
    batch = collect_rollouts(policy, pool, episodes, max_chunks=5, temperature=1.6)
    assert pool.resets == 1 and pool.refills >= 2 and len(pool.actions) == 5  # attributes pass through
    lengths = [sum(len(chunk) for chunk in chunks) for chunks in pool.actions]
    assert lengths == batch.batch["finish_step"].tolist()
    # the recorded gripper commands are the ones that closed the fake env's gripper: successes close 6 times
    for chunks, done in zip(pool.actions, batch.batch["complete"].tolist()):
        closes = int((np.concatenate(chunks)[:, -1] > 0).sum())
        assert closes == 6 if done else closes < 6


@pytest.mark.skipif(importlib.util.find_spec("metaworld") is None, reason="MetaWorld is installed by the train extra")
def test_bench_rollout_replays_the_engines_episodes_open_loop():
    run = subprocess.run([sys.executable, "-m", "bench.rollout", "--suite", "metaworld", "--episodes", "8",
                          "--repeats", "1", "--workers", "2", "--slots", "4", "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout)
    assert result["episodes"] == 8 and result["workers"] == 2 and result["slots"] == 4 and result["env_steps"] > 0
    assert result["pipeline_groups"] == 2 and result["policy_threads"] >= 1
    for way in ("engine", "lockstep"):
        assert result[f"{way}_efficiency"] == pytest.approx(result[f"{way}_env_steps_per_s"]
                                                            / result["raw_env_steps_per_s"])
        assert 0 < result[f"{way}_efficiency"] < 5
        split = result[f"{way}_split_s"]
        assert split["policy"] > 0 and split["waiting_on_envs"] > 0 and 0 < result[f"{way}_env_busy_fraction"] <= 1
        cpu = result[f"{way}_cpu_s"]
        assert cpu["driver"] > 0 and cpu["env_workers"] > 0
        assert result[f"{way}_cpu_limit"] == pytest.approx(
            result["raw_wall_s"] / ((cpu["driver"] + cpu["env_workers"]) / result["cpu_count"]))
        assert 0 < result[f"{way}_core_utilization"] <= 1.05  # CPU clocks tick in 10 ms steps
    assert result["raw_cpu_s"]["env_workers"] > 0
