"""Success rate of a saved policy on held-out prompts: how a GRPO starting point is sized.

    python -m pcm_train.evaluate policy=DIR [suite=libero_object|metaworld] [tasks=[0,1]] [per_task=5]
                                 [temperature=1.6] [greedy=false] [max_chunks=64] [seed=0] [workers=0]
                                 [max_slots=32] [val_init_states=10] [json=FILE]

Episode k of task t starts from held-out initial state ``50 - val_init_states + k % val_init_states``
(the trainer's validation states, which SFT demos never start from). Actions are sampled at
``temperature`` (the RL temperature, 1.6) or taken greedily. Prints a per-task table and the overall
rate with its 95% Wilson interval; ``json=FILE`` also writes them.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from pcm_train.cli import run_command
from pcm_train.config import ConfigError, _above, _at_least, parse_overrides

NUM_INIT_STATES = 50  # LIBERO's initial states and MetaWorld's placements per task


@dataclass
class EvalConfig:
    """Options of ``python -m pcm_train.evaluate`` (``key=value``)."""

    policy: Optional[str] = None  # saved small-VLA directory (required)
    suite: str = "libero_object"
    tasks: Optional[list[int]] = None  # None = every task of the suite
    per_task: int = 5
    temperature: float = 1.6
    greedy: bool = False
    max_chunks: int = 64
    seed: int = 0
    workers: int = 0  # Ray env workers; 0 = one per core
    max_slots: int = 32  # envs in flight at once
    val_init_states: int = 10
    json: Optional[str] = None

    def validate(self) -> None:
        from pcm_train.envs.families import SUITES, list_tasks

        if not self.policy or not (Path(self.policy) / "config.json").is_file():
            raise ConfigError(f"policy=DIR must name a saved policy directory (with config.json), got {self.policy!r}")
        if self.suite not in SUITES:
            raise ConfigError(f"suite must be one of {SUITES}, got {self.suite!r}")
        num_tasks = len(list_tasks(self.suite))
        if self.tasks is not None and (not self.tasks or not all(0 <= t < num_tasks for t in self.tasks)):
            raise ConfigError(f"tasks must be a non-empty list of ids in [0, {num_tasks}), got {self.tasks}")
        _at_least("per_task", self.per_task, 1)
        _above("temperature", self.temperature, 0.0)
        _at_least("max_chunks", self.max_chunks, 1)
        _at_least("workers", self.workers, 0)
        _at_least("max_slots", self.max_slots, 1)
        if not 1 <= self.val_init_states < NUM_INIT_STATES:
            raise ConfigError(f"val_init_states must lie in [1, {NUM_INIT_STATES}), got {self.val_init_states}")


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate."""
    if trials == 0:
        return (0.0, 1.0)
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def evaluate(cfg: EvalConfig) -> dict:
    """Roll the policy out on the held-out prompts; {"tasks": {id: [successes, episodes]}, "success", "interval"}."""
    from pcm_train.envs.families import list_tasks
    from pcm_train.envs.workers import EnvWorkerPool
    from pcm_train.policies.small_vla import SmallVLA
    from pcm_train.training.rollout import Episode, collect_rollouts

    policy = SmallVLA.from_pretrained(cfg.policy)
    state_mode = policy.config.observation == "state"
    tasks = cfg.tasks if cfg.tasks is not None else [task.task_id for task in list_tasks(cfg.suite)]
    first = NUM_INIT_STATES - cfg.val_init_states
    episodes = [Episode(task, first + k % cfg.val_init_states, f"{task}-{k}") for task in tasks
                for k in range(cfg.per_task)]
    slots = min(len(episodes), cfg.max_slots)
    workers = min(cfg.workers or os.cpu_count() or 1, slots)
    generator = torch.Generator().manual_seed(cfg.seed)
    with EnvWorkerPool(workers, cfg.suite, camera=not state_mode, image_size=policy.config.image_size,
                       privileged_state=state_mode, envs_per_worker=math.ceil(slots / workers),
                       max_steps=cfg.max_chunks * policy.config.action_chunk) as pool:
        batch = collect_rollouts(policy, pool, episodes, max_chunks=cfg.max_chunks, temperature=cfg.temperature,
                                 greedy=cfg.greedy, generator=generator, desc="evaluate")
    complete = batch.batch["complete"].numpy()
    task_ids = batch.non_tensor_batch["task_id"]
    per_task = {int(t): [int(complete[task_ids == t].sum()), int((task_ids == t).sum())] for t in tasks}
    wins = int(complete.sum())
    return {"settings": asdict(cfg), "tasks": per_task, "success": wins / len(complete),
            "interval": wilson_interval(wins, len(complete))}


def table(result: dict) -> str:
    lines = ["| task | successes | rate |", "| --- | --- | --- |"]
    for task, (wins, count) in result["tasks"].items():
        lines.append(f"| {task} | {wins}/{count} | {wins / count:.0%} |")
    low, high = result["interval"]
    lines.append(f"| all | {sum(w for w, _ in result['tasks'].values())}/"
                 f"{sum(c for _, c in result['tasks'].values())} | {result['success']:.0%} "
                 f"(95% CI {low:.0%}-{high:.0%}) |")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> EvalConfig:
    """``key=value`` overrides of EvalConfig; ConfigError for unknown keys or bad values."""
    return parse_overrides(EvalConfig, argv)


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, _main, argv)


def _main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    result = evaluate(cfg)
    print(table(result))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
