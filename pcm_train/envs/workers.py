"""Parallel chunked LIBERO rollouts on Ray actors.

``EnvWorkerPool`` holds ``num_workers`` Ray actors, each running
``envs_per_worker`` LiberoEnvs in its own process (one after another; the
parallelism is across workers). A batch of episodes is started with ``reset``
and advanced one action chunk at a time with ``step_chunk``; an episode stops
inside a chunk at success or at ``max_steps``, and ``refill`` starts the next
ones at the positions of ended episodes while the others keep running.
``step_chunk`` is ``start_chunk`` (send) then ``finish_chunk`` (collect); a
pipelined rollout keeps one chunk in flight per group of workers
(``position_workers``) and collects whichever ``wait_any`` finds done first.

Lost workers: every way Ray can lose a worker takes one recovery path. The
errors are listed in ``WORKER_LOST_ERRORS``:

- ``RayActorError``: the actor process died (crash, SIGKILL, ``ray.kill``; as
  ``ActorDiedError``) or is unreachable (``ActorUnavailableError``);
- ``OutOfMemoryError``: Ray's memory monitor killed the worker;
- ``NodeDiedError``: the node holding the worker died or is unreachable;
- ``WorkerCrashedError``: the worker process died while running the call;
- ``ObjectLostError`` (with ``OwnerDiedError``, ``ObjectReconstructionFailedError``):
  the call's result was lost;
- ``TaskCancelledError``: the call was cancelled;
- ``GetTimeoutError``, or no answer within the call's timeout (``step_timeout_s``,
  ``reset_timeout_s``): the worker hangs.

The worker is killed and replaced by a fresh actor, and every unfinished
episode it held is rebuilt by resetting to the same task and initial state and
replaying the actions already executed. The simulator is deterministic
(bitwise), so the episode continues exactly where it was and the interrupted
call is then re-issued; the caller sees no difference except ``restarts`` going
up and a logged warning per replacement. A worker lost ``max_restarts + 1``
times in a row within one call raises RuntimeError naming the worker, its
episodes and each reason.

Not lost workers, so never retried: an exception raised by the environment code
inside a worker (Ray's ``RayTaskError``, which is also an instance of the
original exception class) or by a worker's constructor is re-raised with its
original message and a note naming the worker, the call and the episodes; a
failure of Ray itself (``LocalRayletDiedError``, ``RaySystemError``) raises
RuntimeError. Any error out of ``reset`` or ``step_chunk`` ends the batch (some
envs may have stepped, others not); ``reset`` starts a new one.

Ray processes: a pool that starts the local Ray instance owns it (dashboard off
unless ``dashboard=True``) and shuts it down on ``close()``, which also runs from
``with``, on interpreter exit (``atexit``) and when the constructor fails. With
``owner_dir``, the pool records the Ray processes it started in
``owner_dir/ray_processes.json`` (removed by ``close()``); a process killed with
SIGKILL cannot clean up, so the next pool given the same ``owner_dir`` finds the
file, terminates the recorded Ray processes that outlived their driver and
logs a warning naming them (``reclaim_ray_processes``).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import ray
from ray.exceptions import (GetTimeoutError, LocalRayletDiedError, NodeDiedError, ObjectLostError, OutOfMemoryError,
                            RayActorError, RayError, RaySystemError, RayTaskError, TaskCancelledError,
                            WorkerCrashedError)

from .families import check_init_state, list_tasks, make_env
from .libero import ACTION_DIM

logger = logging.getLogger(__name__)

# Every way Ray reports a lost worker. Each takes the same path: kill the worker, start a fresh one, replay its
# unfinished episodes, re-issue the call. No answer within the call's timeout takes it too.
WORKER_LOST_ERRORS: tuple[type[RayError], ...] = (
    RayActorError,  # ActorDiedError (crash, SIGKILL, ray.kill, OOM kill of the process), ActorUnavailableError
    OutOfMemoryError,  # Ray's memory monitor killed the worker to free memory
    NodeDiedError,  # the worker's node died or is unreachable
    WorkerCrashedError,  # the worker process died while running the call
    ObjectLostError,  # the call's result was lost (also OwnerDiedError, ObjectReconstructionFailedError)
    TaskCancelledError,  # the call was cancelled (ray.cancel, `ray stop`)
    GetTimeoutError,  # the result did not arrive in time
)
# Ray itself failed in this process (the local raylet died, a system error): a new worker cannot help.
RAY_FAILED_ERRORS: tuple[type[RayError], ...] = (LocalRayletDiedError, RaySystemError)

OWNER_FILE = "ray_processes.json"  # in owner_dir: the driver and the Ray processes it started
_RAY_DIR = os.path.dirname(os.path.abspath(ray.__file__)) + os.sep  # Ray's binaries and helper scripts live here


@dataclass
class ChunkResult:
    """Outcome of one ``EnvWorkerPool.step_chunk`` call for E episodes."""

    obs: list[dict]  # E observations after the chunk (unchanged for episodes not stepped)
    reward: np.ndarray  # float32 [E]: 1.0 where the task succeeded during this chunk
    terminated: np.ndarray  # bool [E]: the task has succeeded (in this or an earlier chunk)
    truncated: np.ndarray  # bool [E]: max_steps reached without success
    steps: np.ndarray  # int64 [E]: env steps executed in this chunk (fewer than L after an early stop)
    # per episode bool [steps[e]]: fingers closed after each executed step, where the env reports them
    # (info["gripper_closed"], MetaWorld); None for an env that does not
    gripper_closed: list[np.ndarray | None] | None = None

    @property
    def done(self) -> np.ndarray:
        """bool [E]: the episode is over."""
        return self.terminated | self.truncated


@dataclass
class PendingChunk:
    """A chunk step in flight (``EnvWorkerPool.start_chunk``): the workers' calls, not yet collected."""

    running: list[int]  # batch positions stepped
    actions: dict[int, np.ndarray]  # position -> float64 [L, 7] actions sent
    jobs: dict[int, dict[int, tuple]]  # worker -> {position: job}
    refs: dict[int, ray.ObjectRef]  # worker -> its call


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


# Simulators step on one core: numeric libraries in an env worker get one thread each, so workers sharing a
# machine with the trainer never oversubscribe its cores.
SINGLE_THREAD_ENV = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def _single_threaded() -> None:
    """Limit this process's numeric libraries to one thread (torch too, when an env imported it)."""
    os.environ.update(SINGLE_THREAD_ENV)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


class _EnvWorker:
    """Ray actor body: a few LiberoEnvs in one process, addressed by local slot."""

    def __init__(self, suite: str, num_envs: int, env_options: dict):
        _single_threaded()
        self._envs = [make_env(suite, **env_options) for _ in range(num_envs)]
        self._tasks: list[int | None] = [None] * num_envs  # task each env was last reset to

    def pid(self) -> int:
        """The worker's process id (diagnostics, fault-injection tests)."""
        return os.getpid()

    def restore(self, jobs: list[tuple[int, int, int, np.ndarray]]) -> list[tuple[dict, float]]:
        """Per job (slot, task_id, init_state_id, actions [N, 7]): reset, replay the actions; (the obs,
        seconds this env took)."""
        observations = []
        for slot, task_id, init_state_id, actions in jobs:
            started = time.perf_counter()
            env = self._envs[slot]
            obs, _ = env.reset(task_id=task_id, init_state_id=init_state_id)
            self._tasks[slot] = task_id
            if len(actions):
                obs, _, terminated, truncated, info = env.step_chunk(actions)
                if terminated or truncated or info["chunk_steps"] != len(actions):
                    raise RuntimeError(f"replaying {len(actions)} actions of task {task_id}, initial state "
                                       f"{init_state_id} ended the episode early: the simulator is not deterministic")
            observations.append((obs, time.perf_counter() - started))
        return observations

    def run_open_loop(self, jobs: list[tuple[int, int, np.ndarray]], chunk: int) -> tuple[int, float]:
        """Per job (task_id, init_state_id, actions [N, 7]): reset an env (one already on the task when there
        is one) and execute the actions ``chunk`` at a time until the episode ends: no policy, no driver in
        the loop. Returns (env steps executed, seconds)."""
        started, steps = time.perf_counter(), 0
        for task_id, init_state_id, actions in jobs:
            slot = self._tasks.index(task_id) if task_id in self._tasks else 0
            env = self._envs[slot]
            env.reset(task_id=task_id, init_state_id=init_state_id)
            self._tasks[slot] = task_id
            for start in range(0, len(actions), chunk):
                _, _, terminated, truncated, info = env.step_chunk(actions[start:start + chunk])
                steps += info["chunk_steps"]
                if terminated or truncated:
                    break
        return steps, time.perf_counter() - started

    def step_chunk(self, jobs: list[tuple[int, np.ndarray]]) -> list[tuple]:
        """Per job (slot, actions [L, 7]): (obs, reward, terminated, truncated, steps executed, fingers closed
        bool [steps] or None where the env does not report them, seconds the env took)."""
        results = []
        for slot, actions in jobs:
            started = time.perf_counter()
            obs, reward, terminated, truncated, info = self._envs[slot].step_chunk(actions)
            results.append((obs, reward, terminated, truncated, info["chunk_steps"], info.get("gripper_closed"),
                            time.perf_counter() - started))
        return results


class EnvWorkerPool:
    """LiberoEnvs in ``num_workers`` Ray actors, stepped a chunk at a time for a batch of episodes.

    Starts a local Ray instance (one CPU per core, quiet logs, no dashboard
    unless ``dashboard=True``) unless Ray is already initialized in this
    process or ``ray_address`` ("auto" or "host:port") names a cluster to join;
    ``close`` shuts down only a Ray instance the pool started, and makes sure
    every process of it has exited. ``owner_dir`` (e.g. the run directory):
    record the Ray processes the pool started in ``owner_dir/ray_processes.json``
    and, first, reclaim those an earlier, SIGKILLed process recorded there (see
    the module docstring). ``env_options`` are further LiberoEnv keyword
    arguments (render_size, center_crop, privileged_state, max_steps,
    num_steps_wait). Each worker reserves ``cpus_per_worker`` Ray CPUs.
    """

    def __init__(self, num_workers: int, suite: str, *, camera: bool = True, image_size: int = 224,
                 envs_per_worker: int = 1, ray_address: str | None = None, cpus_per_worker: float = 1.0,
                 reset_timeout_s: float = 300.0, step_timeout_s: float = 60.0, max_restarts: int = 3,
                 dashboard: bool = False, owner_dir: str | os.PathLike | None = None, **env_options):
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
        make_env(suite, **self._env_options)  # reject bad options here rather than inside every actor
        self.suite = suite
        self.envs_per_worker = envs_per_worker
        self.reset_timeout_s = reset_timeout_s
        self.step_timeout_s = step_timeout_s
        self.max_restarts = max_restarts
        self.restarts = 0  # workers replaced so far
        self.env_busy_s = 0.0  # seconds the envs spent resetting, replaying and stepping, summed over workers
        self._workers: list = []
        self._episodes: list[_Episode] = []
        self._closed = False
        self._owner_file: Path | None = None  # where this pool records its Ray processes
        self._ray_processes: dict[int, dict] = {}  # pid -> record entry, for the Ray processes this pool started
        if owner_dir is not None:
            owner_dir = Path(owner_dir)
            owner_dir.mkdir(parents=True, exist_ok=True)
            reclaim_ray_processes(owner_dir)
        self._owns_ray = _connect(ray_address, dashboard)
        atexit.register(self.close)
        try:
            if self._owns_ray and owner_dir is not None:
                self._claim(owner_dir / OWNER_FILE)
            self._record_ray_processes()
            cpus = ray.available_resources().get("CPU", 0.0)
            if num_workers * cpus_per_worker > cpus:
                raise ValueError(f"num_workers={num_workers} x cpus_per_worker={cpus_per_worker} exceeds the "
                                 f"{cpus:g} free CPUs of the Ray cluster; lower cpus_per_worker (e.g. 0.5) to "
                                 "share cores")
            self._actor_class = ray.remote(num_cpus=cpus_per_worker, max_restarts=0,
                                           runtime_env={"env_vars": SINGLE_THREAD_ENV})(_EnvWorker)
            self._workers = [self._new_worker() for _ in range(num_workers)]
            self._slot_task: list[int | None] = [None] * self.num_slots  # task each env was last reset to
        except BaseException:
            self.close()
            raise

    @property
    def num_slots(self) -> int:
        """Most episodes a batch can hold: num_workers * envs_per_worker."""
        return len(self._workers) * self.envs_per_worker

    def language(self, task_id: int) -> str:
        """The instruction of the suite's task ``task_id`` (what its envs return as ``obs["language"]``)."""
        return list_tasks(self.suite)[task_id].language

    @property
    def closed(self) -> bool:
        """``close()`` has run."""
        return self._closed

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
        self._check_open()
        episodes = [(int(task_id), int(init_state_id)) for task_id, init_state_id in episodes]
        if not 1 <= len(episodes) <= self.num_slots:
            raise ValueError(f"episodes must hold 1 to {self.num_slots} (task_id, init_state_id) pairs, "
                             f"got {len(episodes)}")
        for task_id, init_state_id in episodes:
            check_init_state(self.suite, task_id, init_state_id)  # ValueError for an unknown task or state
        self._episodes = []
        slots = self._assign_slots([task_id for task_id, _ in episodes])
        jobs = self._by_worker({index: (slot, *episode, np.zeros((0, ACTION_DIM)))
                                for index, (slot, episode) in enumerate(zip(slots, episodes))})
        restored = self._call("restore", jobs, self.reset_timeout_s, episodes)
        for index, ((task_id, init_state_id), slot) in enumerate(zip(episodes, slots)):
            self._slot_task[slot] = task_id
            obs, seconds = restored[index]
            self.env_busy_s += seconds
            self._episodes.append(_Episode(task_id, init_state_id, slot, obs))
        self._record_ray_processes()  # the worker processes exist by now
        return [episode.obs for episode in self._episodes]

    def refill(self, positions: list[int], episodes: list[tuple[int, int]]) -> tuple[list[int], list[dict]]:
        """Start new (task_id, init_state_id) episodes at batch positions the caller is done with (their
        episodes ended), at most one per position, preferring a position whose env is already on the
        episode's task (a task switch rebuilds the simulator). The other positions keep running. Returns
        the position each episode took and its first observation."""
        self._check_open()
        if not self._episodes:
            raise RuntimeError("no batch is running; call reset() first")
        positions = [int(p) for p in positions]
        episodes = [(int(task_id), int(init_state_id)) for task_id, init_state_id in episodes]
        if len(set(positions)) != len(positions) or not all(0 <= p < len(self._episodes) for p in positions):
            raise ValueError(f"positions must be distinct batch positions in [0, {len(self._episodes)}), "
                             f"got {positions}")
        if not 1 <= len(episodes) <= len(positions):
            raise ValueError(f"episodes must hold 1 to {len(positions)} (task_id, init_state_id) pairs (one per "
                             f"free position), got {len(episodes)}")
        for task_id, init_state_id in episodes:
            check_init_state(self.suite, task_id, init_state_id)
        free, placed = list(positions), []
        for task_id, _ in episodes:
            position = next((p for p in free if self._slot_task[self._episodes[p].slot] == task_id), free[0])
            free.remove(position)
            placed.append(position)
        jobs = self._by_worker({p: (self._episodes[p].slot, *episode, np.zeros((0, ACTION_DIM)))
                                for p, episode in zip(placed, episodes)})
        restored = self._call("restore", jobs, self.reset_timeout_s,
                              [(episode.task_id, episode.init_state_id) for episode in self._episodes])
        for p, (task_id, init_state_id) in zip(placed, episodes):
            slot = self._episodes[p].slot
            obs, seconds = restored[p]
            self.env_busy_s += seconds
            self._slot_task[slot] = task_id
            self._episodes[p] = _Episode(task_id, init_state_id, slot, obs)
        return placed, [self._episodes[p].obs for p in placed]

    def step_chunk(self, actions: np.ndarray, active: np.ndarray | None = None) -> ChunkResult:
        """Execute action chunks float [E, L, 7] (env space) on the E episodes of the batch.

        ``active`` bool [E] (default: all) selects the episodes to step;
        episodes that are already over are never stepped. An episode stops
        within the chunk at success or max_steps.
        """
        return self.finish_chunk(self.start_chunk(actions, active))

    def position_workers(self) -> list[int]:
        """The worker holding each batch position's env (positions of one worker step one after another)."""
        return [episode.slot // self.envs_per_worker for episode in self._episodes]

    def start_chunk(self, actions: np.ndarray, active: np.ndarray | None = None) -> PendingChunk:
        """``step_chunk`` without waiting: sends the chunk to the workers of the ``active`` positions and returns.

        Collect it with ``finish_chunk`` (``wait_any`` says which of several is done first). Chunks in flight
        at once must hold disjoint workers' positions (a worker runs its calls one after another)."""
        self._check_open()
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
        sent = {index: actions[index].copy() for index in running}  # the caller may reuse its buffer
        jobs = self._by_worker({index: (self._episodes[index].slot, sent[index]) for index in running})
        refs = {worker: self._workers[worker].step_chunk.remote(list(batch.values())) for worker, batch in jobs.items()}
        return PendingChunk(running, sent, jobs, refs)

    def wait_any(self, pending: list[PendingChunk]) -> int:
        """Index of a chunk of ``pending`` whose every call has answered (or, after ``step_timeout_s`` without
        one, the first: ``finish_chunk`` then handles the silent worker)."""
        if not pending:
            raise ValueError("pending must not be empty")
        deadline = time.monotonic() + self.step_timeout_s
        while True:
            for index, chunk in enumerate(pending):
                refs = list(chunk.refs.values())
                if not refs or len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs):
                    return index
            left = deadline - time.monotonic()
            waiting = [ref for chunk in pending for ref in chunk.refs.values()]
            if left <= 0 or not ray.wait(waiting, num_returns=1, timeout=left)[0]:
                return 0
            # a call answered: look again for a chunk whose calls all did

    def finish_chunk(self, pending: PendingChunk) -> ChunkResult:
        """Collect a chunk sent with ``start_chunk``: its ``ChunkResult`` (steps 0 and unchanged obs at the
        positions it did not step). Lost workers are replaced and their episodes replayed, as in ``step_chunk``."""
        self._check_open()
        num_episodes = len(self._episodes)
        if num_episodes == 0:
            raise RuntimeError("no episodes are running; call reset() first")
        results = self._call("step_chunk", pending.jobs, self.step_timeout_s,
                             [(episode.task_id, episode.init_state_id) for episode in self._episodes],
                             launched=pending.refs)
        reward = np.zeros(num_episodes, dtype=np.float32)
        steps = np.zeros(num_episodes, dtype=np.int64)
        closed: list[np.ndarray | None] = [np.zeros(0, dtype=bool)] * num_episodes
        for index in pending.running:
            episode = self._episodes[index]
            episode.obs, reward[index], episode.terminated, episode.truncated, steps[index], closed[index], seconds = \
                results[index]
            self.env_busy_s += seconds
            episode.actions.append(pending.actions[index][:steps[index]])
        return ChunkResult(
            obs=[episode.obs for episode in self._episodes], reward=reward,
            terminated=np.array([episode.terminated for episode in self._episodes]),
            truncated=np.array([episode.truncated for episode in self._episodes]), steps=steps,
            gripper_closed=closed)

    def run_open_loop(self, episodes: list[tuple[int, int]], actions: list[np.ndarray], chunk: int,
                      timeout_s: float = 3600.0) -> dict:
        """The envs' own throughput: each worker executes its share of the episodes' fixed ``actions`` (float
        [N_e, 7] each) in its own loop, no policy and no per-chunk round trip; episodes go to workers
        longest first onto the least loaded one (by actions). Ends any running batch. Returns {"steps",
        "wall_s", "worker_s" (each worker's own seconds)}. No worker replacement: a lost worker raises."""
        self._check_open()
        if len(episodes) != len(actions) or not episodes:
            raise ValueError(f"episodes and actions must be non-empty and of equal length, got {len(episodes)} "
                             f"and {len(actions)}")
        self._episodes = []
        jobs: list[list] = [[] for _ in self._workers]
        load = [0] * len(self._workers)
        for index in sorted(range(len(episodes)), key=lambda i: -len(actions[i])):
            worker = load.index(min(load))
            jobs[worker].append((*map(int, episodes[index]), np.asarray(actions[index], dtype=np.float64)))
            load[worker] += len(actions[index])
        started = time.perf_counter()
        refs = [worker.run_open_loop.remote(batch, chunk) for worker, batch in zip(self._workers, jobs) if batch]
        results = ray.get(refs, timeout=timeout_s)
        wall = time.perf_counter() - started
        self._slot_task = [None] * self.num_slots  # the envs were reset outside the slot bookkeeping
        return {"steps": sum(steps for steps, _ in results), "wall_s": wall,
                "worker_s": [seconds for _, seconds in results]}

    def close(self) -> None:
        """Stop the workers and, if the pool started it, the Ray instance with every process it ran.

        Idempotent; safe after a lost worker or a failed call. Also runs when
        the interpreter exits (``atexit``) and when the constructor fails.
        Removes the pool's ``owner_dir`` record.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        workers, self._workers, self._episodes = self._workers, [], []
        if ray.is_initialized():
            for index, worker in enumerate(workers):
                try:
                    ray.kill(worker, no_restart=True)
                except RayError as error:  # the worker is gone already; nothing is left to stop
                    logger.warning("closing the env pool: could not kill env worker %d (%s)", index,
                                   _describe_error(error))
        if self._owns_ray:
            self._owns_ray = False
            ray.shutdown()
            self._stop_leftover_processes()
        if self._owner_file is not None:
            self._owner_file.unlink(missing_ok=True)
            self._owner_file = None

    def __enter__(self) -> EnvWorkerPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----- internals -----

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the env pool is closed; create a new EnvWorkerPool")

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

    def _call(self, method: str, jobs: dict[int, dict[int, tuple]], timeout_s: float,
              episodes: list[tuple[int, int]], launched: dict[int, ray.ObjectRef] | None = None) -> dict[int, object]:
        """Run ``method`` on each worker's jobs in parallel, replacing lost workers; per-episode results.

        ``episodes``: (task_id, init_state_id) of every episode of the batch, for messages. ``launched``: the
        first attempt's calls, already sent (``start_chunk``). Any error ends the batch (``reset`` starts a
        new one).
        """
        try:
            return self._call_with_restarts(method, jobs, timeout_s, episodes, launched)
        except BaseException:
            self._episodes = []  # some envs may have stepped, others not: the batch cannot continue
            raise

    def _call_with_restarts(self, method: str, jobs: dict[int, dict[int, tuple]], timeout_s: float,
                            episodes: list[tuple[int, int]],
                            launched: dict[int, ray.ObjectRef] | None = None) -> dict[int, object]:
        results: dict[int, object] = {}
        failures: dict[int, str] = {}
        pending = dict(jobs)
        for attempt in range(self.max_restarts + 1):
            if attempt:
                for worker, reason in failures.items():
                    logger.warning("env worker %d %s during %s of %s; replacing it and replaying its episodes "
                                   "(replacement %d of at most %d in a row)", worker, reason, method,
                                   _episode_list(pending[worker], episodes), attempt, self.max_restarts)
                    self._replace(worker)
            refs = launched if launched is not None and not attempt else \
                {worker: getattr(self._workers[worker], method).remote(list(batch.values()))
                 for worker, batch in pending.items()}
            values, failures = _gather(refs, timeout_s, method,
                                       {worker: _episode_list(pending[worker], episodes) for worker in pending})
            for worker, value in values.items():
                results.update(zip(pending[worker], value))
            pending = {worker: pending[worker] for worker in failures}
            if not pending:
                return results
        raise RuntimeError(
            f"{method} failed {self.max_restarts + 1} times in a row on env worker(s) " +
            "; ".join(f"{worker} ({_episode_list(pending[worker], episodes)}): {reason}"
                      for worker, reason in failures.items()) +
            f". Each time the worker was replaced and its episodes replayed (max_restarts={self.max_restarts}). "
            "If Ray killed it for memory (OutOfMemoryError), run fewer env workers or envs per worker; if it is "
            "just slow, raise the timeout (step_timeout_s / reset_timeout_s); Ray's logs are in "
            "/tmp/ray/session_latest/logs.")

    def _replace(self, worker: int) -> None:
        """Kill a worker, start a fresh one and rebuild its unfinished episodes (a failure here shows up as a
        failure of the re-issued call, which replaces the worker again)."""
        try:
            ray.kill(self._workers[worker], no_restart=True)
        except RayError as error:  # already gone
            logger.warning("could not kill lost env worker %d (%s); starting a new one anyway", worker,
                           _describe_error(error))
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
        episodes = [(episode.task_id, episode.init_state_id) for episode in self._episodes]
        values, failures = _gather({worker: self._workers[worker].restore.remote(list(jobs.values()))},
                                   self.reset_timeout_s, "restore", {worker: _episode_list(jobs, episodes)})
        if worker in failures:
            logger.warning("the replacement of env worker %d %s while replaying %s; the re-issued call will "
                           "replace it again", worker, failures[worker], _episode_list(jobs, episodes))
        for index, (obs, seconds) in zip(jobs, values.get(worker, [])):
            self.env_busy_s += seconds
            self._episodes[index].obs = obs
            self._slot_task[self._episodes[index].slot] = self._episodes[index].task_id
        self._record_ray_processes()

    # ----- Ray processes -----

    def _claim(self, path: Path) -> None:
        """Record this pool's Ray processes at ``path``, unless another live process records its own there."""
        record = _read_record(path)
        driver = _running(record["driver"]) if record else None
        if driver is not None and driver.pid != os.getpid():
            logger.warning("%s records the Ray processes of process %d, which is still running; this pool does not "
                           "record its own there (give each run its own owner_dir)", path, driver.pid)
            return
        self._owner_file = path

    def _record_ray_processes(self) -> None:
        """Note the Ray processes this pool started (its process's Ray descendants) and write the owner record."""
        if not self._owns_ray:
            return
        driver = psutil.Process()
        for process in _ray_descendants(driver):
            entry = _entry(process)
            if entry is not None:
                self._ray_processes[process.pid] = entry
        self._ray_processes = {pid: entry for pid, entry in self._ray_processes.items()
                               if _running(entry, ray_only=True) is not None}
        if self._owner_file is None:
            return
        record = {"driver": _entry(driver), "processes": list(self._ray_processes.values())}
        temporary = self._owner_file.with_name(self._owner_file.name + ".tmp")
        temporary.write_text(json.dumps(record, indent=1))
        os.replace(temporary, self._owner_file)  # a kill mid-write never leaves a torn record

    def _stop_leftover_processes(self) -> None:
        """After ray.shutdown(): wait for the pool's Ray processes to exit; terminate any that do not."""
        processes = [process for entry in self._ray_processes.values()
                     if (process := _running(entry, ray_only=True)) is not None]
        self._ray_processes = {}
        _, alive = psutil.wait_procs(processes, timeout=10.0)
        alive = [process for process in alive if _is_running(process)]
        if alive:
            names = _terminate(alive)
            logger.warning("Ray processes still running 10 s after ray.shutdown() were terminated: %s",
                           ", ".join(names))


def reclaim_ray_processes(owner_dir: str | os.PathLike) -> list[str]:
    """Terminate the Ray processes an ended process left behind, as recorded in ``owner_dir/ray_processes.json``.

    A pool that started Ray records its driver and Ray processes there; a
    driver killed with SIGKILL leaves the record, and some Ray helpers (the
    raylet's dashboard and runtime-env agents) outlive it. If the recorded
    driver is gone, every recorded process still running is terminated,
    together with the Ray processes it started since. A process counts only if
    its pid, start time and command line (a Ray binary, script or ``ray::``
    worker) all match, so an unrelated process that reused a pid is never
    touched. Logs a warning naming what was terminated, removes the record, and
    returns the names ("pid 123 ray::DashboardAgent"). A record whose driver
    still runs is left alone.
    """
    path = Path(owner_dir) / OWNER_FILE
    record = _read_record(path)
    if record is None or _running(record["driver"]) is not None:
        return []
    leftovers: dict[int, psutil.Process] = {}
    for entry in record["processes"]:
        process = _running(entry, ray_only=True)
        if process is not None:
            leftovers[process.pid] = process
    for process in list(leftovers.values()):
        for child in _ray_descendants(process):
            leftovers.setdefault(child.pid, child)
    names = _terminate(list(leftovers.values()))
    path.unlink(missing_ok=True)
    if names:
        logger.warning("Reclaimed %d Ray process(es) left running by an earlier run in %s, whose process (pid %d) "
                       "ended without shutting Ray down (e.g. killed with SIGKILL): %s", len(names), owner_dir,
                       record["driver"]["pid"], ", ".join(names))
    return names


def _connect(ray_address: str | None, dashboard: bool = False) -> bool:
    """Make sure Ray is initialized; True if this call started it (or joined ``ray_address``)."""
    if ray.is_initialized():
        return False
    if ray_address is None:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=dashboard, logging_level=logging.ERROR)
    else:
        ray.init(address=ray_address, logging_level=logging.ERROR)
    return True


def _gather(refs: dict[int, ray.ObjectRef], timeout_s: float, method: str,
            episodes: dict[int, str]) -> tuple[dict[int, object], dict[int, str]]:
    """Wait for worker calls: ({worker: result}, {worker: reason}) for the ones that answered / were lost.

    A worker is lost on any of WORKER_LOST_ERRORS or no answer within ``timeout_s``. An error raised by the
    environment code (RayTaskError; or in the worker's constructor) is re-raised with a note naming the worker,
    ``method`` and its ``episodes``; a failure of Ray itself (RAY_FAILED_ERRORS) raises RuntimeError.
    """
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    ready = set(ready)
    values, failures = {}, {}
    for worker, ref in refs.items():
        if ref not in ready:
            failures[worker] = f"gave no answer within {timeout_s:g} s"
            continue
        try:
            values[worker] = ray.get(ref, timeout=timeout_s)
        except RayTaskError as error:  # before the others: it is also an instance of the original exception class
            _add_note(error, f"Raised by the environment code in env worker {worker} during {method} of "
                             f"{episodes[worker]}: a bug in the env code, not a lost worker, so not retried. The batch "
                             "is ended; call reset() to start a new one.")
            raise
        except WORKER_LOST_ERRORS as error:
            if isinstance(error, RayActorError) and error.actor_init_failed:
                raise RuntimeError(f"env worker {worker} could not be created (building its LiberoEnvs raised "
                                   f"inside the worker), so it cannot run {method} of {episodes[worker]}; a bug or "
                                   f"a broken install, not a lost worker, so not retried: {error}") from error
            failures[worker] = f"was lost ({_describe_error(error)})"
        except RAY_FAILED_ERRORS as error:
            raise RuntimeError(f"Ray itself failed while env worker {worker} ran {method} of {episodes[worker]} "
                               f"({_describe_error(error)}); replacing the worker cannot help. Restart the process "
                               "(a training run continues from its last checkpoint with resume=RUN_DIR).") from error
    return values, failures


def _episode_list(indices, episodes: list[tuple[int, int]]) -> str:
    """'episodes 0 (task 2, init state 0), 3 (task 1, init state 4)' for batch indices."""
    parts = [f"{index} (task {episodes[index][0]}, init state {episodes[index][1]})" if index < len(episodes)
             else str(index) for index in indices]
    return ("episode " if len(parts) == 1 else "episodes ") + ", ".join(parts)


def _describe_error(error: BaseException, limit: int = 600) -> str:
    """'TypeName: message' on one line, at most ``limit`` characters."""
    text = f"{type(error).__name__}: {' '.join(str(error).split())}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _add_note(error: BaseException, note: str) -> None:
    if hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(note)


# ----- processes -----

def _looks_like_ray(cmdline: list[str]) -> bool:
    """A Ray process: a ``ray::`` worker or agent, or a binary or script of the installed Ray package."""
    return bool(cmdline) and (cmdline[0].startswith("ray::") or any(part.startswith(_RAY_DIR) for part in cmdline))


def _short_name(cmdline: list[str]) -> str:
    """'ray::DashboardAgent', 'raylet', 'log_monitor.py': what a process is, for messages."""
    if not cmdline:
        return "?"
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split()[0]
    scripts = [part for part in cmdline[1:] if part.endswith(".py")]
    return os.path.basename(scripts[0] if scripts else cmdline[0])


def _entry(process: psutil.Process) -> dict | None:
    """{"pid", "create_time", "name"} of a process, or None if it has exited."""
    try:
        with process.oneshot():
            return {"pid": process.pid, "create_time": process.create_time(), "name": _short_name(process.cmdline())}
    except psutil.Error:
        return None


def _is_running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _running(entry: dict, ray_only: bool = False) -> psutil.Process | None:
    """The recorded process if it still runs (not a zombie) as itself: same pid and start time and, with
    ``ray_only``, a Ray command line; None otherwise."""
    try:
        process = psutil.Process(int(entry["pid"]))
        if abs(process.create_time() - float(entry["create_time"])) > 1.0 or not _is_running(process):
            return None
        if ray_only and not _looks_like_ray(process.cmdline()):
            return None
        return process
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def _ray_descendants(process: psutil.Process) -> list[psutil.Process]:
    """The running Ray processes below a process, reached through Ray processes only (the Ray instance of a
    child that is not Ray itself, e.g. another Python program, is not this process's)."""
    try:
        descendants = process.children(recursive=True)
    except psutil.Error:
        return []
    parent_of, ray_like = {}, {}
    for child in descendants:
        try:
            parent_of[child.pid] = child.ppid()
            ray_like[child.pid] = child.status() != psutil.STATUS_ZOMBIE and _looks_like_ray(child.cmdline())
        except psutil.Error:
            ray_like[child.pid] = False

    def reached(pid: int) -> bool:
        while pid != process.pid:
            if not ray_like.get(pid, False):
                return False
            pid = parent_of[pid]
        return True

    return [child for child in descendants if reached(child.pid)]


def _terminate(processes: list[psutil.Process], timeout_s: float = 5.0) -> list[str]:
    """SIGTERM, then SIGKILL after ``timeout_s``, to each process; 'pid N name' of each one signalled."""
    names = []
    for process in processes:
        try:
            names.append(f"pid {process.pid} {_short_name(process.cmdline())}")
            process.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    return names


def _read_record(path: Path) -> dict | None:
    """The owner record at ``path``, or None if there is none (an unreadable one is reported and removed)."""
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("driver"), dict) \
                or not isinstance(record.get("processes"), list):
            raise ValueError("not an owner record")
        return record
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("ignoring and removing the unreadable Ray owner record %s (%s); Ray processes it listed, "
                       "if any, are not reclaimed", path, error)
        path.unlink(missing_ok=True)
        return None
