"""Rollout engine efficiency: the trainer's engine against the raw throughput of the same env workers.

    python -m bench.rollout [--suite metaworld|libero_object] [--episodes 32] [--slots N] [--workers N]
                            [--pipeline G] [--repeats 2] [--seed 0] [--json]

One run, one machine, the same episodes every way (state mode, the suite's shipped SFT policy, the trainer's
per-episode random streams, so every way executes the same actions):

1. warm-up: the engine rolls the batch out once (``collect_rollouts``, sampled actions at the RL temperature),
   building every simulator, and records each episode's executed actions;
2. engine: the same rollout again as the trainer runs it (``env.pipeline_groups`` worker groups in flight,
   ``--pipeline`` to change it; the policy's torch threads as ``rollout_threads`` sets them), timed
   (``RolloutStats``: policy, waiting on the envs, the envs' own busy time); and the lockstep engine (one
   chunk in flight: every env steps, then the policy acts for all) for comparison;
3. raw: the same worker processes execute those recorded actions with no policy and no per-chunk round trip
   (``EnvWorkerPool.run_open_loop``): the physical limit of the envs on these cores.

``engine_efficiency`` = engine env steps/s ÷ raw env steps/s (medians over ``--repeats``; the three ways
interleave in each repeat). Prints a table (or ``--json``). Timings taken on a loaded machine are not worth
recording: run it on an idle one.

CPU accounting: each way also records the CPU seconds (user + system) of this process (the policy, the
driver's Ray calls and bookkeeping, every thread) and of the env worker processes. ``{way}_cpu_limit`` =
raw wall ÷ (that CPU ÷ the cores): the efficiency the way would reach if every core were busy all the time
with the work it did. Where the policy shares the cores with the envs, that work exceeds the raw envs' and
no schedule beats this limit; ``{way}_core_utilization`` = CPU ÷ (cores × wall) says how close it came.
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


class CpuClock:
    """CPU seconds (user + system, every thread) of this process and of the pool's env worker processes."""

    def __init__(self, pool):
        import psutil
        import ray

        self.driver = psutil.Process()
        self.workers = [psutil.Process(pid) for pid in ray.get([w.pid.remote() for w in pool.workers], timeout=60)]

    @staticmethod
    def _cpu(process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    def read(self) -> dict:
        """{"driver": s, "env_workers": s summed over the workers}, cumulative."""
        return {"driver": self._cpu(self.driver), "env_workers": sum(self._cpu(w) for w in self.workers)}

    @staticmethod
    def spent(before: dict, after: dict) -> dict:
        return {name: after[name] - before[name] for name in before}


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
    """``count`` training episodes drawn as the trainer draws a step's prompts (G rollouts per prompt), each
    with its own random stream as in the trainer's step 0."""
    from pcm_train.envs.families import list_tasks
    from pcm_train.training.rollout import Episode, episode_seed
    from pcm_train.training.trainer import draw_prompts

    group = suite_cfg.rollout.group_size
    if count % group:
        raise ValueError(f"--episodes must be a multiple of the group size {group}, got {count}")
    tasks = [t.task_id for t in list_tasks(suite_cfg.env.suite)]
    prompts = draw_prompts(np.random.default_rng(seed), tasks, count // group, suite_cfg.env.val_init_states)
    pairs = [(task, state, f"prompt{i}") for i, (task, state) in enumerate(prompts) for _ in range(group)]
    return [Episode(*pair, seed=episode_seed(seed, 0, index)) for index, pair in enumerate(pairs)]


def measure(suite: str, episodes: int, slots: int | None, workers: int | None, repeats: int, seed: int,
            pipeline: int | None = None) -> dict:
    from pcm_train.config import load_config
    from pcm_train.policies.factory import build_policy
    from pcm_train.envs.families import state_dim
    from pcm_train.training.rollout import RolloutStats, collect_rollouts
    from pcm_train.training.trainer import make_env_pool, rollout_threads

    preset, policy_path = SUITES[suite]
    overrides = [f"preset={preset}", f"policy.path={policy_path}"]
    overrides += [f"env.max_slots={slots}"] if slots else []
    overrides += [f"env.num_workers={workers}"] if workers else []
    overrides += [f"env.pipeline_groups={pipeline}"] if pipeline else []
    cfg = load_config(overrides)
    batch = episodes_for(cfg, episodes, seed)
    policy = build_policy(cfg.policy, device=torch.device("cpu"), state_dim=state_dim(cfg.env.suite))
    pool = make_env_pool(cfg, image_size=policy.config.image_size)
    try:
        threads = rollout_threads(cfg, pool, torch.device("cpu"))

        def engine(groups: int, stats=None, recorder=None):
            return collect_rollouts(policy, recorder or pool, batch, max_chunks=cfg.rollout.max_chunks,
                                    temperature=cfg.actor.temperature, desc="rollout", stats=stats,
                                    pipeline=groups, policy_threads=threads)

        recorder = RecordingPool(pool)
        first = engine(1, recorder=recorder)  # through step_chunk, which the recorder sees
        actions = [np.concatenate(chunks) for chunks in recorder.actions]
        if [len(a) for a in actions] != first.batch["finish_step"].tolist():
            raise RuntimeError("the recorded actions do not cover the episodes' steps")
        ways = {"engine": cfg.env.pipeline_groups, "lockstep": 1}
        runs, raws = {way: [] for way in ways}, []
        clock = CpuClock(pool)
        for _ in range(repeats):
            for way, groups in ways.items():
                stats = RolloutStats()
                before = clock.read()
                again = engine(groups, stats=stats)
                cpu = clock.spent(before, clock.read())
                if not torch.equal(again.batch["responses"], first.batch["responses"]):
                    raise RuntimeError(f"the {way} rollout differs from the warm-up one: the engine is not "
                                       "deterministic for fixed episode seeds")
                runs[way].append((stats, cpu))
            before = clock.read()
            raws.append(pool.run_open_loop([(e.task_id, e.init_state_id) for e in batch], actions,
                                           cfg.rollout.action_chunk))
            raws[-1]["cpu_s"] = clock.spent(before, clock.read())
        steps = int(first.batch["finish_step"].sum())
        if any(r["steps"] != steps for r in raws):
            raise RuntimeError("the open-loop replay executed a different number of env steps")
        raw_rate = statistics.median(r["steps"] / r["wall_s"] for r in raws)
        raw_mid = sorted(raws, key=lambda r: r["wall_s"])[len(raws) // 2]
        cores = os.cpu_count()
        result = {
            "suite": suite, "episodes": len(batch), "env_steps": steps, "workers": len(pool.workers),
            "slots": pool.num_slots, "pipeline_groups": cfg.env.pipeline_groups, "policy_threads": threads,
            "repeats": repeats, "cpu_count": cores, "raw_env_steps_per_s": raw_rate,
            "raw_wall_s": statistics.median(r["wall_s"] for r in raws), "raw_cpu_s": raw_mid["cpu_s"],
            "success_rate": float(first.batch["complete"].float().mean()),
        }
        for way, timed in runs.items():
            rate = statistics.median(s.env_steps / s.wall_s for s, _ in timed)
            mid, mid_cpu = sorted(timed, key=lambda run: run[0].wall_s)[len(timed) // 2]
            prefix = "engine" if way == "engine" else way
            result.update({
                f"{prefix}_env_steps_per_s": rate, f"{prefix}_efficiency": rate / raw_rate,
                f"{prefix}_wall_s": mid.wall_s,
                f"{prefix}_split_s": {"policy": mid.policy_s, "waiting_on_envs": mid.wait_s,
                                      "other": mid.wall_s - mid.policy_s - mid.wait_s},
                f"{prefix}_env_busy_fraction": mid.metrics().get("rollout/env_busy_fraction"),
                f"{prefix}_cpu_s": mid_cpu,
                f"{prefix}_cpu_limit": result["raw_wall_s"] / (sum(mid_cpu.values()) / cores),
                f"{prefix}_core_utilization": sum(mid_cpu.values()) / (cores * mid.wall_s)})
        return result
    finally:
        pool.close()


def format_table(result: dict) -> str:
    lines = [
        f"rollout engine, {result['suite']} (state mode, shipped SFT policy): {result['episodes']} episodes, "
        f"{result['env_steps']} env steps, {result['workers']} env workers, {result['slots']} env slots, "
        f"{result['cpu_count']} cores, policy on {result['policy_threads']} torch thread(s), median of "
        f"{result['repeats']}",
        "| way | env steps/s | wall s | efficiency | policy s | waiting on envs s | envs busy | CPU s: driver + env "
        "workers | CPU limit | cores busy |", "|---|---|---|---|---|---|---|---|---|---|",
        f"| raw envs (no policy, no coordination) | {result['raw_env_steps_per_s']:.0f} | {result['raw_wall_s']:.2f} "
        f"| 1 | | | | {result['raw_cpu_s']['driver']:.2f} + {result['raw_cpu_s']['env_workers']:.2f} | | |"]
    for prefix, name in (("engine", f"trainer's engine ({result['pipeline_groups']} worker groups in flight)"),
                         ("lockstep", "lockstep engine (one chunk in flight)")):
        split = result[f"{prefix}_split_s"]
        busy, cpu = result[f"{prefix}_env_busy_fraction"], result[f"{prefix}_cpu_s"]
        lines.append(f"| {name} | {result[f'{prefix}_env_steps_per_s']:.0f} | {result[f'{prefix}_wall_s']:.2f} | "
                     f"{result[f'{prefix}_efficiency']:.2f} | {split['policy']:.2f} | {split['waiting_on_envs']:.2f} | "
                     f"{busy if busy is None else f'{busy:.0%}'} | {cpu['driver']:.2f} + {cpu['env_workers']:.2f} | "
                     f"{result[f'{prefix}_cpu_limit']:.2f} | {result[f'{prefix}_core_utilization']:.0%} |")
    lines.append(f"engine_efficiency = {result['engine_efficiency']:.2f} (CPU limit {result['engine_cpu_limit']:.2f}: "
                 "the efficiency with every core busy on the work the engine did)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="metaworld")
    parser.add_argument("--episodes", type=int, default=32, help="episodes per rollout (multiple of the group size)")
    parser.add_argument("--slots", type=int, default=None, help="env.max_slots (default: the preset's)")
    parser.add_argument("--workers", type=int, default=None, help="env.num_workers (default: one per core)")
    parser.add_argument("--pipeline", type=int, default=None,
                        help="env.pipeline_groups of the engine (default: the trainer's)")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of each way (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.episodes < 1 or (args.pipeline is not None and args.pipeline < 1):
        parser.error("--repeats, --episodes and --pipeline must be >= 1")
    started = time.perf_counter()
    result = measure(args.suite, args.episodes, args.slots, args.workers, args.repeats, args.seed, args.pipeline)
    result["bench_s"] = time.perf_counter() - started
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
