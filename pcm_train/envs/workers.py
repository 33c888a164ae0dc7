"""Parallel chunked LIBERO rollouts on Ray actors.

``EnvWorkerPool`` holds ``num_workers`` Ray actors, each running
``envs_per_worker`` LiberoEnvs in its own process (one after another; the
parallelism is across workers). A batch of episodes is started with ``reset``
and advanced one action chunk at a time with ``step_chunk``; an episode stops
inside a chunk at success or at ``max_steps``.

Fault handling: a worker that dies (crash, OOM kill, ``ray.kill``) or gives no
answer within the call's timeout is killed and replaced by a fresh actor, and
every unfinished episode it held is rebuilt by resetting to the same task and
initial state and replaying the actions already executed. The simulator is
deterministic (bitwise), so the episode continues exactly where it was and the
interrupted call is then re-issued; the caller sees no difference except
``restarts`` going up. A worker failing ``max_restarts`` times in a row within
one call raises RuntimeError.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import RayActorError

from .libero import ACTION_DIM, LiberoEnv, initial_state


@dataclass
class ChunkResult:
    """Outcome of one ``EnvWorkerPool.step_chunk`` call for E episodes."""

    obs: list[dict]  # E observations after the chunk (unchanged for episodes not stepped)
    reward: np.ndarray  # float32 [E]: 1.0 where the task succeeded during this chunk
    terminated: np.ndarray  # bool [E]: the task has succeeded (in this or an earlier chunk)
    truncated: np.ndarray  # bool [E]: max_steps reached without success
    steps: np.ndarray  # int64 [E]: env steps executed in this chunk (fewer than L after an early stop)

    @property
    def done(self) -> np.ndarray:
        """bool [E]: the episode is over."""
        return self.terminated | self.truncated


@dataclass
class _Episode:
    task_id: int
    init_state_id: int
    slot: int  # global env slot: worker = slot // envs_per_worker
    obs: dict
    actions: list[np.ndarray] = field(default_factory=list)  # executed chunks, float64 [steps, 7] each
    terminated: bool = False
    truncated: bool = False

    def history(self) -> np.ndarray:
        """float64 [steps so far, 7]: every action executed since reset."""
        return np.concatenate(self.actions) if self.actions else np.zeros((0, ACTION_DIM))


class _EnvWorker:
    """Ray actor body: a few LiberoEnvs in one process, addressed by local slot."""

    def __init__(self, suite: str, num_envs: int, env_options: dict):
        self._envs = [LiberoEnv(suite, **env_options) for _ in range(num_envs)]

    def restore(self, jobs: list[tuple[int, int, int, np.ndarray]]) -> list[dict]:
        """Per job (slot, task_id, init_state_id, actions [N, 7]): reset, replay the actions; the obs."""
        observations = []
        for slot, task_id, init_state_id, actions in jobs:
            env = self._envs[slot]
            obs, _ = env.reset(task_id=task_id, init_state_id=init_state_id)
            if len(actions):
                obs, _, terminated, truncated, info = env.step_chunk(actions)
                if terminated or truncated or info["chunk_steps"] != len(actions):
                    raise RuntimeError(f"replaying {len(actions)} actions of task {task_id}, initial state "
                                       f"{init_state_id} ended the episode early: the simulator is not deterministic")
            observations.append(obs)
        return observations

    def step_chunk(self, jobs: list[tuple[int, np.ndarray]]) -> list[tuple[dict, float, bool, bool, int]]:
        """Per job (slot, actions [L, 7]): (obs, reward, terminated, truncated, steps executed)."""
        results = []
        for slot, actions in jobs:
            obs, reward, terminated, truncated, info = self._envs[slot].step_chunk(actions)
            results.append((obs, reward, terminated, truncated, info["chunk_steps"]))
        return results


class EnvWorkerPool:
    """LiberoEnvs in ``num_workers`` Ray actors, stepped a chunk at a time for a batch of episodes.

    Starts a local Ray instance (one CPU per core, no dashboard, quiet logs)
    unless Ray is already initialized in this process or ``ray_address``
    ("auto" or "host:port") names a cluster to join; ``close`` shuts down only
    a Ray instance the pool started. ``env_options`` are further LiberoEnv
    keyword arguments (render_size, center_crop, privileged_state, max_steps,
    num_steps_wait). Each worker reserves ``cpus_per_worker`` Ray CPUs.
    """

    def __init__(self, num_workers: int, suite: str, *, camera: bool = True, image_size: int = 224,
                 envs_per_worker: int = 1, ray_address: str | None = None, cpus_per_worker: float = 1.0,
                 reset_timeout_s: float = 300.0, step_timeout_s: float = 60.0, max_restarts: int = 3,
                 **env_options):
        for name, value in (("num_workers", num_workers), ("envs_per_worker", envs_per_worker)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("cpus_per_worker", cpus_per_worker), ("reset_timeout_s", reset_timeout_s),
                            ("step_timeout_s", step_timeout_s)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        self._env_options = {"camera": camera, "image_size": image_size, **env_options}
        LiberoEnv(suite, **self._env_options)  # reject bad options here rather than inside every actor
        self.suite = suite
        self.envs_per_worker = envs_per_worker
        self.reset_timeout_s = reset_timeout_s
        self.step_timeout_s = step_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0  # workers replaced so far
        self._owns_ray = _connect(ray_address)
        cpus = ray.available_resources().get("CPU", 0.0)
        if num_workers * cpus_per_worker > cpus:
            if self._owns_ray:
                ray.shutdown()
            raise ValueError(f"num_workers={num_workers} x cpus_per_worker={cpus_per_worker} exceeds the {cpus:g} "
                             "free CPUs of the Ray cluster; lower cpus_per_worker (e.g. 0.5) to share cores")
        self._actor_class = ray.remote(num_cpus=cpus_per_worker, max_restarts=0)(_EnvWorker)
        self._workers = [self._new_worker() for _ in range(num_workers)]
        self._slot_task: list[int | None] = [None] * self.num_slots  # task each env was last reset to
        self._episodes: list[_Episode] = []

    @property
    def num_slots(self) -> int:
        """Most episodes a batch can hold: num_workers * envs_per_worker."""
        return len(self._workers) * self.envs_per_worker

    @property
    def workers(self) -> list:
        """The Ray actor handles, worker i holding slots [i * envs_per_worker, (i + 1) * envs_per_worker)."""
        return list(self._workers)

    def reset(self, episodes: list[tuple[int, int]]) -> list[dict]:
        """Start a batch of episodes, given as (task_id, init_state_id) pairs; their first observations.

        Ends the previous batch. Each episode gets an env slot, preferring an env
        already on its task (a task switch rebuilds the simulator) while
        spreading the batch evenly over the workers.
        """
        episodes = [(int(task_id), int(init_state_id)) for task_id, init_state_id in episodes]
        if not 1 <= len(episodes) <= self.num_slots:
            raise ValueError(f"episodes must hold 1 to {self.num_slots} (task_id, init_state_id) pairs, "
                             f"got {len(episodes)}")
        for task_id, init_state_id in episodes:
            initial_state(self.suite, task_id, init_state_id)  # ValueError for an unknown task or state
        self._episodes = []
        slots = self._assign_slots([task_id for task_id, _ in episodes])
        jobs = self._by_worker({index: (slot, *episode, np.zeros((0, ACTION_DIM)))
                                for index, (slot, episode) in enumerate(zip(slots, episodes))})
        observations = self._call("restore", jobs, self.reset_timeout_s)
        for index, ((task_id, init_state_id), slot) in enumerate(zip(episodes, slots)):
            self._slot_task[slot] = task_id
            self._episodes.append(_Episode(task_id, init_state_id, slot, observations[index]))
        return [episode.obs for episode in self._episodes]

    def step_chunk(self, actions: np.ndarray, active: np.ndarray | None = None) -> ChunkResult:
        """Execute action chunks float [E, L, 7] (env space) on the E episodes of the batch.

        ``active`` bool [E] (default: all) selects the episodes to step;
        episodes that are already over are never stepped. An episode stops
        within the chunk at success or max_steps.
        """
        num_episodes = len(self._episodes)
        if num_episodes == 0:
            raise RuntimeError("no episodes are running; call reset() first")
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 3 or actions.shape[0] != num_episodes or actions.shape[2] != ACTION_DIM \
                or actions.shape[1] == 0:
            raise ValueError(f"actions must have shape ({num_episodes}, L >= 1, {ACTION_DIM}), got {actions.shape}")
        if active is None:
            active = np.ones(num_episodes, dtype=bool)
        active = np.asarray(active, dtype=bool)
        if active.shape != (num_episodes,):
            raise ValueError(f"active must have shape ({num_episodes},), got {active.shape}")
        running = [index for index, episode in enumerate(self._episodes)
                   if active[index] and not (episode.terminated or episode.truncated)]
        jobs = self._by_worker({index: (self._episodes[index].slot, actions[index]) for index in running})
        results = self._call("step_chunk", jobs, self.step_timeout_s)
        reward = np.zeros(num_episodes, dtype=np.float32)
        steps = np.zeros(num_episodes, dtype=np.int64)
        for index in running:
            episode = self._episodes[index]
            episode.obs, reward[index], episode.terminated, episode.truncated, steps[index] = results[index]
            episode.actions.append(actions[index, :steps[index]].copy())  # the caller may reuse its buffer
        return ChunkResult(
            obs=[episode.obs for episode in self._episodes], reward=reward,
            terminated=np.array([episode.terminated for episode in self._episodes]),
            truncated=np.array([episode.truncated for episode in self._episodes]), steps=steps)

    def close(self) -> None:
        """Stop the workers (and the Ray instance, if the pool started it). Idempotent."""
        for worker in self._workers:
            ray.kill(worker, no_restart=True)
        self._workers = []
        self._episodes = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> EnvWorkerPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----- internals -----

    def _new_worker(self):
        return self._actor_class.remote(self.suite, self.envs_per_worker, self._env_options)

    def _assign_slots(self, tasks: list[int]) -> list[int]:
        """A free slot per episode, no worker holding more than its even share: first envs already on the
        episode's task, then empty envs, then envs on another task; the least loaded worker first."""
        cap = -(-len(tasks) // len(self._workers))  # ceil: episodes per worker
        load = [0] * len(self._workers)
        free = set(range(self.num_slots))
        slots: list[int | None] = [None] * len(tasks)
        for same_task_only in (True, False):
            for index, task_id in enumerate(tasks):
                if slots[index] is not None:
                    continue
                candidates = [slot for slot in free if load[slot // self.envs_per_worker] < cap
                              and (self._slot_task[slot] == task_id or not same_task_only)]
                if not candidates:
                    continue
                slot = min(candidates, key=lambda slot: (self._slot_task[slot] is not None,
                                                          load[slot // self.envs_per_worker], slot))
                free.remove(slot)
                load[slot // self.envs_per_worker] += 1
                slots[index] = slot
        return slots

    def _by_worker(self, jobs: dict[int, tuple]) -> dict[int, dict[int, tuple]]:
        """Episode-indexed jobs whose first item is a global slot -> {worker: {episode: job with local slot}}."""
        grouped: dict[int, dict[int, tuple]] = {}
        for index, (slot, *rest) in jobs.items():
            worker, local_slot = divmod(slot, self.envs_per_worker)
            grouped.setdefault(worker, {})[index] = (local_slot, *rest)
        return grouped

    def _call(self, method: str, jobs: dict[int, dict[int, tuple]], timeout_s: float) -> dict[int, object]:
        """Run ``method`` on each worker's jobs in parallel, replacing workers that die or hang; per-episode results."""
        results: dict[int, object] = {}
        failures: dict[int, str] = {}
        pending = dict(jobs)
        for attempt in range(self.max_restarts + 1):
            if attempt:
                for worker in pending:
                    self._replace(worker)
            refs = {worker: getattr(self._workers[worker], method).remote(list(batch.values()))
                    for worker, batch in pending.items()}
            values, failures = _gather(refs, timeout_s)
            for worker, value in values.items():
                results.update(zip(pending[worker], value))
            pending = {worker: pending[worker] for worker in failures}
            if not pending:
                return results
        raise RuntimeError(f"{method} failed {self.max_restarts + 1} times in a row on worker(s): " +
                           "; ".join(f"{worker}: {reason}" for worker, reason in failures.items()))

    def _replace(self, worker: int) -> None:
        """Kill a worker, start a fresh one and rebuild its unfinished episodes (best effort: a failure here
        shows up as a failure of the re-issued call)."""
        ray.kill(self._workers[worker], no_restart=True)
        self._workers[worker] = self._new_worker()
        self.restarts += 1
        first = worker * self.envs_per_worker
        for slot in range(first, first + self.envs_per_worker):
            self._slot_task[slot] = None
        jobs = {index: (episode.slot - first, episode.task_id, episode.init_state_id, episode.history())
                for index, episode in enumerate(self._episodes)
                if episode.slot // self.envs_per_worker == worker and not (episode.terminated or episode.truncated)}
        if not jobs:
            return
        values, _ = _gather({worker: self._workers[worker].restore.remote(list(jobs.values()))},
                            self.reset_timeout_s)
        for index, obs in zip(jobs, values.get(worker, [])):
            self._episodes[index].obs = obs
            self._slot_task[self._episodes[index].slot] = self._episodes[index].task_id


def _connect(ray_address: str | None) -> bool:
    """Make sure Ray is initialized; True if this call started it."""
    if ray.is_initialized():
        return False
    if ray_address is None:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=logging.ERROR)
    else:
        ray.init(address=ray_address, logging_level=logging.ERROR)
    return True


def _gather(refs: dict[int, ray.ObjectRef], timeout_s: float) -> tuple[dict[int, object], dict[int, str]]:
    """Wait for worker calls: ({worker: result}, {worker: reason}) for the ones that answered / died or hung.

    Errors raised by the environment code itself (RayTaskError) propagate.
    """
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    ready = set(ready)
    values, failures = {}, {}
    for worker, ref in refs.items():
        if ref not in ready:
            failures[worker] = f"no answer within {timeout_s:g} s"
            continue
        try:
            values[worker] = ray.get(ref)
        except RayActorError as error:
            failures[worker] = f"worker died ({type(error).__name__})"
    return values, failures
