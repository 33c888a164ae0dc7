"""Rollout engine efficiency: the trainer's engine against the raw throughput of the same env workers.

    python -m bench.rollout [--suite metaworld|libero_object] [--episodes 32] [--slots N] [--workers N]
                            [--repeats 2] [--seed 0] [--json]

One run, one machine, the same episodes both ways (state mode, the suite's shipped SFT policy):

1. warm-up: the engine rolls the batch out once (``collect_rollouts``, sampled actions at the RL temperature,
   seeded), building every simulator, and records each episode's executed actions;
2. engine: the same rollout again with the same seed, so the same episodes, timed (``RolloutStats``: policy,
   waiting on the envs, the envs' own busy time);
3. raw: the same worker processes execute those recorded actions with no policy and no per-chunk round trip
   (``EnvWorkerPool.run_open_loop``): the physical limit of the envs on these cores.

``engine_efficiency`` = engine env steps/s ÷ raw env steps/s (medians over ``--repeats``). Prints a table
(or ``--json``). Timings taken on a loaded machine are not worth recording: run it on an idle one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITES = {  # trainer preset (the studies' settings) and the shipped SFT policy of each suite
    "metaworld": ("study_metaworld", ROOT / "docs/results/metaworld/init_policy"),
    "libero_object": ("study_libero", ROOT / "pcm_train/assets/libero_object_state_sft"),
}


class RecordingPool:
    """Passes every call to ``pool`` and keeps each episode's executed actions (float64 [steps, 7]), in the
    order the rollout starts its episodes (``reset``, then each ``refill``)."""

    def __init__(self, pool):
        self.pool = pool
        self.actions: list[list[np.ndarray]] = []
        self._at: list[int] = []  # the recorded episode at each batch position

    def __getattr__(self, name):
        return getattr(self.pool, name)

    def _start(self, count: int) -> list[int]:
        self.actions.extend([] for _ in range(count))
        return list(range(len(self.actions) - count, len(self.actions)))

    def reset(self, episodes):
        self._at = self._start(len(episodes))
        return self.pool.reset(episodes)

    def refill(self, positions, episodes):
        placed, observations = self.pool.refill(positions, episodes)
        for position, index in zip(placed, self._start(len(episodes))):
            self._at[position] = index
        return placed, observations

    def step_chunk(self, actions, active):
        result = self.pool.step_chunk(actions, active)
        for p in np.flatnonzero(result.steps):
            self.actions[self._at[p]].append(np.array(actions[p, :result.steps[p]], dtype=np.float64))
        return result


def episodes_for(suite_cfg, count: int, seed: int):
    """``count`` training episodes drawn as the trainer draws a step's prompts (G rollouts per prompt)."""
    from pcm_train.envs.families import list_tasks
    from pcm_train.training.rollout import Episode
    from pcm_train.training.trainer import draw_prompts

    group = suite_cfg.rollout.group_size
    if count % group:
        raise ValueError(f"--episodes must be a multiple of the group size {group}, got {count}")
    tasks = [t.task_id for t in list_tasks(suite_cfg.env.suite)]
    prompts = draw_prompts(np.random.default_rng(seed), tasks, count // group, suite_cfg.env.val_init_states)
    return [Episode(task, state, f"prompt{i}") for i, (task, state) in enumerate(prompts) for _ in range(group)]


def measure(suite: str, episodes: int, slots: int | None, workers: int | None, repeats: int, seed: int) -> dict:
    from pcm_train.config import load_config
    from pcm_train.policies.factory import build_policy
    from pcm_train.envs.families import state_dim
    from pcm_train.training.rollout import RolloutStats, collect_rollouts
    from pcm_train.training.trainer import make_env_pool

    preset, policy_path = SUITES[suite]
    overrides = [f"preset={preset}", f"policy.path={policy_path}"]
    overrides += [f"env.max_slots={slots}"] if slots else []
    overrides += [f"env.num_workers={workers}"] if workers else []
    cfg = load_config(overrides)
    batch = episodes_for(cfg, episodes, seed)
    policy = build_policy(cfg.policy, device=torch.device("cpu"), state_dim=state_dim(cfg.env.suite))
    pool = make_env_pool(cfg, image_size=policy.config.image_size)
    try:
        def engine(stats=None, recorder=None):
            generator = torch.Generator().manual_seed(seed)
            return collect_rollouts(policy, recorder or pool, batch, max_chunks=cfg.rollout.max_chunks,
                                    temperature=cfg.actor.temperature, generator=generator, desc="rollout",
                                    stats=stats)

        recorder = RecordingPool(pool)
        first = engine(recorder=recorder)
        actions = [np.concatenate(chunks) for chunks in recorder.actions]
        if [len(a) for a in actions] != first.batch["finish_step"].tolist():
            raise RuntimeError("the recorded actions do not cover the episodes' steps")
        runs, raws = [], []
        for _ in range(repeats):
            stats = RolloutStats()
            again = engine(stats=stats)
            if not torch.equal(again.batch["finish_step"], first.batch["finish_step"]):
                raise RuntimeError("the timed rollout differs from the warm-up one: the engine is not "
                                   "deterministic for a fixed seed")
            runs.append(stats)
            raws.append(pool.run_open_loop([(e.task_id, e.init_state_id) for e in batch], actions,
                                           cfg.rollout.action_chunk))
        steps = int(first.batch["finish_step"].sum())
        engine_rate = statistics.median(s.env_steps / s.wall_s for s in runs)
        raw_rate = statistics.median(r["steps"] / r["wall_s"] for r in raws)
        if any(r["steps"] != steps for r in raws):
            raise RuntimeError("the open-loop replay executed a different number of env steps")
        mid = sorted(runs, key=lambda s: s.wall_s)[len(runs) // 2]
        return {
            "suite": suite, "episodes": len(batch), "env_steps": steps, "workers": len(pool.workers),
            "slots": pool.num_slots, "repeats": repeats, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "raw_env_steps_per_s": raw_rate, "engine_env_steps_per_s": engine_rate,
            "engine_efficiency": engine_rate / raw_rate,
            "engine_wall_s": mid.wall_s, "raw_wall_s": statistics.median(r["wall_s"] for r in raws),
            "engine_split_s": {"policy": mid.policy_s, "waiting_on_envs": mid.wait_s,
                               "other": mid.wall_s - mid.policy_s - mid.wait_s},
            "engine_env_busy_s": mid.env_s, "engine_env_busy_fraction": mid.metrics().get("rollout/env_busy_fraction"),
            "success_rate": float(first.batch["complete"].float().mean()),
        }
    finally:
        pool.close()


def format_table(result: dict) -> str:
    split = result["engine_split_s"]
    return "\n".join([
        f"rollout engine, {result['suite']} (state mode, shipped SFT policy): {result['episodes']} episodes, "
        f"{result['env_steps']} env steps, {result['workers']} env workers, {result['slots']} env slots, "
        f"{result['cpu_count']} cores, median of {result['repeats']}",
        "| way | env steps/s | wall s |", "|---|---|---|",
        f"| raw envs (no policy, no coordination) | {result['raw_env_steps_per_s']:.0f} | {result['raw_wall_s']:.2f} |",
        f"| trainer's engine | {result['engine_env_steps_per_s']:.0f} | {result['engine_wall_s']:.2f} |",
        f"engine_efficiency = {result['engine_efficiency']:.2f}; engine time: policy {split['policy']:.2f} s, "
        f"waiting on envs {split['waiting_on_envs']:.2f} s, other {split['other']:.2f} s; envs busy "
        f"{result['engine_env_busy_fraction'] or float('nan'):.0%} of workers × wall"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="metaworld")
    parser.add_argument("--episodes", type=int, default=32, help="episodes per rollout (multiple of the group size)")
    parser.add_argument("--slots", type=int, default=None, help="env.max_slots (default: the preset's)")
    parser.add_argument("--workers", type=int, default=None, help="env.num_workers (default: one per core)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of each way (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.episodes < 1:
        parser.error("--repeats and --episodes must be >= 1")
    started = time.perf_counter()
    result = measure(args.suite, args.episodes, args.slots, args.workers, args.repeats, args.seed)
    result["bench_s"] = time.perf_counter() - started
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
