"""Write scripted-expert demonstrations of LIBERO-Object or MetaWorld to disk.

    python -m pcm_train.demos suite=libero_object|metaworld per_task=N noise=SIGMA images=true|false out=DIR \\
        [tasks=[0,3]] [seed=S] [grasp_noise=METRES] [image_size=32] [max_steps=512] [val_init_states=10]

The experts: LIBERO-Object's scripted pick-and-place (``pcm_train.expert.object_expert``),
MetaWorld's own scripted policies (``pcm_train.expert.metaworld_expert``; noise on xyz only,
no ``grasp_noise``).

Episode k (0 <= k < per_task) of task t starts from training initial state
``k % (50 - val_init_states)`` (the last ``val_init_states`` are the trainer's
held-out validation states) and draws its noise from
``np.random.default_rng([seed, t, k])``, so any episode can be regenerated
alone. ``noise`` is the expert's Gaussian action noise σ on dims 0-5 (MetaWorld: 0-2),
``grasp_noise`` the σ (metres) of its grasp-point noise. Episodes end at success
(as LiberoEnv and LIBERO evaluation do), at ``max_steps``, or when the script
has retreated after releasing. Resumable: episodes whose file exists are
skipped; every file is written to a temporary name and renamed.

On-disk format (``DIR/``):

- ``task{t:02d}_ep{k:03d}.npz``, one per episode, T = executed steps:

  - ``state`` float32 [T, state_dim]: privileged state before each action (LIBERO,
    36: eef pos 3, eef axis-angle 3, finger qpos 2, then pos + quat xyzw of the
    target object and the basket, zero-padded to 4 objects; the first 8 are the
    proprio state. MetaWorld, 39: its observation, ``pcm_train.envs.metaworld``)
  - ``image`` uint8 [T, image_size, image_size, 3]: agentview before each
    action, as LiberoEnv returns it (only with images=true)
  - ``action`` float32 [T, 7]: executed env-space actions (LIBERO: OSC_POSE deltas in
    [-1, 1]; MetaWorld: xyz deltas, rotation 0; gripper -1 open / +1 close)
  - ``clean_action`` float32 [T, 7]: the expert's noise-free actions
  - ``gripper`` float32 [T]: executed gripper command (= ``action[:, 6]``)
  - ``phase`` uint8 [T]: index into ``phase_names`` (str [P]) of the expert's phase
  - 0-d: ``language`` str, ``success`` bool, ``task_id`` int64,
    ``init_state_id`` int64, ``seconds`` float64 (wall time of the episode)

- ``index.json``: ``{"format": "pcm-demos/1", "settings": {suite, noise,
  grasp_noise, images, image_size, seed, max_steps, val_init_states},
  "episodes": [{file, task_id, init_state_id, success, steps, language}, ...]}``
  listing every episode file in DIR, rewritten at the end of each run.

Read an episode back with ``read_episode(path)``.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from pcm_train.cli import run_command
from pcm_train.config import ConfigError, EnvSection, apply_overrides
from pcm_train.envs.families import SUITES, list_tasks, make_env, num_init_states
from pcm_train.expert import Episode, metaworld_expert, object_expert

FORMAT = "pcm-demos/1"
EXPERTS = {"libero_object": object_expert, "metaworld": metaworld_expert}  # suite -> module with PHASES, run_episode
EXPERT_SUITES = tuple(EXPERTS)
INDEX_FILE = "index.json"


@dataclass
class DemoConfig:
    """Command-line settings of ``python -m pcm_train.demos`` (key=value)."""

    suite: str = "libero_object"
    per_task: int = 10  # episodes per task
    noise: float = 0.0  # action noise σ on dims 0-5
    grasp_noise: float = 0.0  # grasp-point noise σ in metres
    images: bool = False  # also record agentview images (renders every step: ~6x slower)
    image_size: int = 32
    out: Optional[str] = None  # output directory (required)
    tasks: Optional[list[int]] = None  # task ids; None = all tasks of the suite
    seed: int = 0
    max_steps: int = 512
    val_init_states: int = EnvSection.val_init_states  # as the trainer's env.val_init_states

    def settings(self) -> dict:
        """What makes episodes of one directory comparable (per_task and tasks may differ between runs)."""
        return {key: value for key, value in asdict(self).items() if key not in ("per_task", "tasks", "out")}


def parse_args(argv: list[str]) -> DemoConfig:
    """DemoConfig from ``key=value`` strings; ConfigError for unknown keys and unusable values."""
    config = DemoConfig()
    apply_overrides(config, argv)
    if config.suite not in SUITES:
        raise ConfigError(f"suite must be one of {SUITES}, got {config.suite!r}")
    if config.suite not in EXPERT_SUITES:
        raise ConfigError(f"the scripted expert only supports {', '.join(EXPERT_SUITES)}; got suite={config.suite}")
    if config.out is None or not config.out.strip():
        raise ConfigError("out=DIR is required")
    if config.per_task < 1:
        raise ConfigError(f"per_task must be >= 1, got {config.per_task}")
    if config.suite == "metaworld" and config.grasp_noise:
        raise ConfigError(f"grasp_noise is a LIBERO expert option; MetaWorld's scripted policies take only noise, "
                          f"got grasp_noise={config.grasp_noise}")
    if not config.noise >= 0.0 or not config.grasp_noise >= 0.0:
        raise ConfigError(f"noise and grasp_noise must be >= 0, got noise={config.noise}, "
                          f"grasp_noise={config.grasp_noise}")
    if config.image_size < 1 or config.max_steps < 1:
        raise ConfigError(f"image_size and max_steps must be >= 1, got {config.image_size}, {config.max_steps}")
    num_tasks = len(list_tasks(config.suite))
    if config.tasks is not None and (not config.tasks or len(set(config.tasks)) != len(config.tasks)
                                     or not all(0 <= task < num_tasks for task in config.tasks)):
        raise ConfigError(f"tasks must be distinct ids in [0, {num_tasks}), got {config.tasks}")
    if not 0 <= config.val_init_states < num_init_states(config.suite, 0):
        raise ConfigError(f"val_init_states must lie in [0, {num_init_states(config.suite, 0)}), "
                          f"got {config.val_init_states}")
    return config


# ----- episode files -----

def episode_file(task_id: int, episode: int) -> str:
    """File name of episode ``episode`` (0-based, per task) of task ``task_id``."""
    return f"task{task_id:02d}_ep{episode:03d}.npz"


def write_episode(path: Path, episode: Episode, phase_names: tuple[str, ...] = object_expert.PHASES) -> None:
    """Save an expert Episode to ``path`` (.npz) atomically: a temporary file, then a rename."""
    arrays = {"state": episode.states, "action": episode.actions, "clean_action": episode.clean_actions,
              "gripper": episode.actions[:, 6].copy(), "phase": episode.phases,
              "phase_names": np.array(phase_names),
              "language": np.array(episode.language), "success": np.array(episode.success),
              "task_id": np.array(episode.task_id, dtype=np.int64),
              "init_state_id": np.array(episode.init_state_id, dtype=np.int64),
              "seconds": np.array(episode.seconds, dtype=np.float64)}
    if episode.images is not None:
        arrays["image"] = episode.images
    temporary = _temporary_path(path)
    with open(temporary, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    os.replace(temporary, path)


def read_episode(path: str | os.PathLike) -> Episode:
    """The expert Episode stored in an episode file."""
    with np.load(path) as data:
        return Episode(task_id=int(data["task_id"]), init_state_id=int(data["init_state_id"]),
                       language=str(data["language"]), states=data["state"],
                       images=data["image"] if "image" in data else None, actions=data["action"],
                       clean_actions=data["clean_action"], phases=data["phase"], success=bool(data["success"]),
                       seconds=float(data["seconds"]))


def _summary(path: Path) -> dict:
    """The index.json entry of one episode file (reads only its small arrays)."""
    with np.load(path) as data:
        return {"file": path.name, "task_id": int(data["task_id"]), "init_state_id": int(data["init_state_id"]),
                "success": bool(data["success"]), "steps": len(data["gripper"]), "language": str(data["language"])}


def _temporary_path(path: Path) -> Path:
    """A hidden sibling name of ``path``, distinct per process (concurrent runs may share a directory)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_json(path: Path, content: dict) -> None:
    temporary = _temporary_path(path)
    temporary.write_text(json.dumps(content, indent=1))
    os.replace(temporary, path)


def _check_settings(out: Path, settings: dict) -> None:
    """ConfigError when ``out`` already holds demos made with other settings."""
    index = out / INDEX_FILE
    if not index.is_file():
        return
    previous = json.loads(index.read_text()).get("settings", {})
    different = {key: (previous.get(key), value) for key, value in settings.items() if previous.get(key) != value}
    if different:
        details = ", ".join(f"{key}: {old!r} there vs {new!r} now" for key, (old, new) in different.items())
        raise ConfigError(f"out={out} holds demos made with other settings ({details}); choose another out")


# ----- generation -----

def generate(config: DemoConfig) -> list[dict]:
    """Write the missing episodes of ``config``, rewrite index.json; the index entries of this run's episodes."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = config.settings()
    _check_settings(out, settings)
    _write_json(out / INDEX_FILE, {"format": FORMAT, "settings": settings, "episodes": _index_entries(out)})
    tasks = config.tasks if config.tasks is not None else [task.task_id for task in list_tasks(config.suite)]
    train_states = num_init_states(config.suite, tasks[0]) - config.val_init_states
    plan = [(task, episode) for task in tasks for episode in range(config.per_task)]
    missing = [(task, episode) for task, episode in plan if not (out / episode_file(task, episode)).exists()]
    if config.per_task > train_states and config.noise == 0.0 and config.grasp_noise == 0.0:
        print(f"note: per_task={config.per_task} > {train_states} training states without noise repeats "
              "identical episodes", file=sys.stderr)
    expert = EXPERTS[config.suite]
    env = make_env(config.suite, camera=config.images, image_size=config.image_size, privileged_state=True,
                   max_steps=config.max_steps)
    successes = 0
    try:
        progress = tqdm(missing, total=len(plan), initial=len(plan) - len(missing), desc="demos", unit="episode")
        for done, (task, episode_index) in enumerate(progress, start=1):
            expert_kwargs = {"action_noise": config.noise, "rng": np.random.default_rng([config.seed, task, episode_index])}
            if config.suite != "metaworld":
                expert_kwargs["grasp_noise"] = config.grasp_noise
            episode = expert.run_episode(env, task, episode_index % train_states, expert_kwargs,
                                         max_steps=config.max_steps, record_images=config.images)
            write_episode(out / episode_file(task, episode_index), episode, expert.PHASES)
            successes += episode.success
            progress.set_postfix(task=task, success=f"{successes}/{done}")
    finally:
        env.close()
    entries = _index_entries(out)
    _write_json(out / INDEX_FILE, {"format": FORMAT, "settings": settings, "episodes": entries})
    wanted = {episode_file(task, episode) for task, episode in plan}
    return [entry for entry in entries if entry["file"] in wanted]


def _index_entries(out: Path) -> list[dict]:
    return [_summary(path) for path in sorted(out.glob("task*_ep*.npz"))]


def success_table(entries: list[dict]) -> str:
    """Per-task success counts, rates and mean episode lengths, as a Markdown table."""
    lines = ["| task | episodes | successes | rate | mean steps |", "| --- | --- | --- | --- | --- |"]
    for task in sorted({entry["task_id"] for entry in entries}):
        rows = [entry for entry in entries if entry["task_id"] == task]
        wins = sum(entry["success"] for entry in rows)
        steps = np.mean([entry["steps"] for entry in rows])
        lines.append(f"| {task} | {len(rows)} | {wins} | {wins / len(rows):.0%} | {steps:.0f} |")
    wins = sum(entry["success"] for entry in entries)
    steps = np.mean([entry["steps"] for entry in entries])
    lines.append(f"| all | {len(entries)} | {wins} | {wins / len(entries):.0%} | {steps:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_command(__doc__, _main, argv, interrupted="stopped; run the same command again to resume")


def _main(argv: list[str]) -> int:
    entries = generate(parse_args(argv))
    print(success_table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
