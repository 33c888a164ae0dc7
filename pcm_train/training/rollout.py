"""Chunked, batched rollouts into a SimpleVLA-RL-layout ``DataProto``.

The policy acts once per chunk for the episodes in flight; the env pool executes
the chunk's L steps in each env (stopping at success) and returns the new
observations; a position whose episode ended takes a waiting episode at once
(continuous refill, no wave barrier). Pipelined (``pipeline_groups`` > 1, on a
pool with ``start_chunk``/``wait_any``/``finish_chunk``): the positions are split by
env worker into groups, and while one group's envs step the policy acts for
another, so neither the policy nor the envs wait for the slowest of all. Chunks
never reached are filled as SimpleVLA-RL does: the
episode's prompt, a blank observation (zeros), a neutral action token, log-prob 0;
they are invalid (``finish_step``) and never trained on. Observations become model inputs
through ``policy.observations_to_inputs`` (images, or states for a state-mode policy).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm
from verl import DataProto

from pcm_train.config import GRIPPER_SIGNALS


class EnvPool(Protocol):
    """What a rollout needs from a set of parallel environments (see ``pcm_train.envs.workers``)."""

    num_slots: int  # episodes the pool holds at once (optional: without it, all of a batch)

    def reset(self, episodes: Sequence[tuple[int, int]]) -> list[dict]:
        """Start a batch of (task_id, init_state_id) episodes at positions 0, 1, ...; their observations."""

    def refill(self, positions: Sequence[int], episodes: Sequence[tuple[int, int]]) -> tuple[list[int], list[dict]]:
        """Start ``episodes`` (at most len(positions)) at positions whose episodes are over; returns the
        position each took and its first observation (needed only when a batch has more episodes than slots)."""

    def language(self, task_id: int) -> str:
        """The task's instruction."""

    def step_chunk(self, actions: np.ndarray, active: np.ndarray):
        """Returns a ``ChunkResult`` (obs, reward, terminated, truncated, steps per episode; the fingers
        ``gripper_closed`` where the env reports them)."""

    # optional, for pipelined rollouts (``EnvWorkerPool``): step_chunk split in send / wait / collect, and the
    # worker of each position (chunks in flight at once go to disjoint workers)
    # def position_workers(self) -> list[int]
    # def start_chunk(self, actions, active) -> pending
    # def wait_any(self, pending: list) -> int
    # def finish_chunk(self, pending) -> ChunkResult


class _OneChunkAtATime:
    """The send / wait / collect calls of a pool that has only ``step_chunk``: one chunk in flight."""

    def __init__(self, pool: EnvPool):
        self.pool = pool

    def start_chunk(self, actions: np.ndarray, active: np.ndarray):
        return actions.copy(), active.copy()

    def wait_any(self, pending: list) -> int:
        return 0

    def finish_chunk(self, pending):
        return self.pool.step_chunk(*pending)


def pipeline_groups(pool: EnvPool, groups: int) -> list[int] | None:
    """Group of each batch position when ``pool`` can pipeline (up to ``groups`` groups of whole workers,
    as even as the workers allow), else None. Call after ``pool.reset``."""
    if groups < 2 or not all(hasattr(pool, name) for name in ("position_workers", "start_chunk", "wait_any",
                                                                 "finish_chunk")):
        return None
    workers = pool.position_workers()
    distinct = sorted(set(workers))
    if len(distinct) < 2:
        return None
    count = min(groups, len(distinct))
    rank = {worker: index * count // len(distinct) for index, worker in enumerate(distinct)}
    return [rank[worker] for worker in workers]


@dataclass
class RolloutStats:
    """Where a rollout's wall-clock went (seconds, accumulated by ``collect_rollouts``)."""

    wall_s: float = 0.0  # the whole rollout
    policy_s: float = 0.0  # the policy: encoding prompts and observations, acting
    wait_s: float = 0.0  # the driver blocked on the env pool (resets and chunk steps): the policy idles
    env_s: float | None = None  # the env workers' own busy time, summed over workers (pools that report it)
    env_steps: int = 0  # env steps executed
    num_workers: int | None = None  # env workers (pools that report it)

    @classmethod
    def combine(cls, parts: list[RolloutStats]) -> RolloutStats:
        """The rollout of several ranks run side by side: the longest wall-clock, the policy and wait time of
        that slowest rank, env busy time, env steps and workers summed."""
        slowest = max(parts, key=lambda part: part.wall_s)
        busy = [part.env_s for part in parts if part.env_s is not None]
        workers = [part.num_workers for part in parts if part.num_workers]
        return cls(wall_s=slowest.wall_s, policy_s=slowest.policy_s, wait_s=slowest.wait_s,
                   env_s=sum(busy) if busy else None, env_steps=sum(part.env_steps for part in parts),
                   num_workers=sum(workers) or None)

    def metrics(self) -> dict:
        """``rollout/...`` keys for a metrics row; ``env_busy_fraction``: env_s over workers × wall_s."""
        row = {"rollout/policy_s": self.policy_s, "rollout/wait_s": self.wait_s,
               "rollout/env_steps": self.env_steps,
               "rollout/env_steps_per_s": self.env_steps / self.wall_s if self.wall_s > 0 else 0.0}
        if self.env_s is not None:
            row["rollout/env_s"] = self.env_s
            if self.num_workers and self.wall_s > 0:
                row["rollout/env_busy_fraction"] = self.env_s / (self.num_workers * self.wall_s)
        return row


class _Clock:
    """Adds the seconds spent in a ``with`` block to one field of a ``RolloutStats``."""

    def __init__(self, stats: RolloutStats, name: str):
        self.stats, self.name = stats, name

    def __enter__(self):
        self.started = time.perf_counter()

    def __exit__(self, *exc_info):
        setattr(self.stats, self.name, getattr(self.stats, self.name) + time.perf_counter() - self.started)


class StopRequested(Exception):
    """Ctrl-C arrived; the trainer saves and exits at the next safe point."""


@dataclass
class Episode:
    """One rollout: which task and initial state, its GRPO group, and (optionally) the seed of its own
    random stream of action draws (``episode_seed``)."""

    task_id: int
    init_state_id: int
    uid: str
    seed: int | None = None


def episode_seed(run_seed: int, step: int, index: int) -> int:
    """The seed of episode ``index`` of step ``step``'s batch in a run seeded ``run_seed``: a uint64 from
    NumPy's SeedSequence of the three, so streams of different episodes, steps and runs do not overlap."""
    return int(np.random.SeedSequence([run_seed, step, index]).generate_state(1, dtype=np.uint64)[0])


@torch.no_grad()
def collect_rollouts(policy, pool: EnvPool, episodes: Sequence[Episode], *, max_chunks: int, temperature: float,
                     greedy: bool = False, generator: torch.Generator | None = None,
                     desc: str = "rollout", should_stop=lambda: False, gripper_signal: str = "command",
                     stats: RolloutStats | None = None, pipeline: int = 1,
                     policy_threads: int | None = None) -> DataProto:
    """Run every episode to success or ``max_chunks`` chunks; returns the batch (LAYOUT.md keys plus
    ``gripper`` float [E, C, L], the phase labeler's per-step gripper signal, +1 closed / -1 open:
    the executed env-space gripper commands for ``gripper_signal="command"``, the fingers the env
    reports (``ChunkResult.gripper_closed``) for ``"fingers"``). ``pixel_values`` is float
    [E, C, *row] with row = the policy's input per chunk ([C, H, W] images or [state_dim] states).

    Env reuse: a pool with fewer env slots (``pool.num_slots``) than episodes holds that many in flight;
    when one ends, its slot takes the batch's next episode (``pool.refill``) without waiting for the
    others, so memory is bounded by the slots, not the batch, and no slot idles behind a straggler. The
    episodes start in order; row e of the batch is always ``episodes[e]``.

    ``should_stop()`` is polled between chunks; when it returns True the rollout raises
    ``StopRequested`` (a half-recorded batch is never returned).

    Random streams: when every episode has a ``seed``, each samples its actions from its own CPU generator
    seeded with it (``sample_bins``), so its tokens, actions and log-probs do not depend on the batch it
    runs in, its position, the slot count or the device; otherwise (no seeds) all rows draw from
    ``generator``. Greedy rollouts draw nothing.

    ``stats`` (optional) accumulates where the time went (``RolloutStats``): the policy, the wait on the
    envs, the envs' own busy time where the pool reports it (``pool.env_busy_s``), env steps.

    ``pipeline``: groups of env workers whose chunks are in flight at once (``pipeline_groups``); the policy
    acts for one group while the others step. Used only where the draws do not depend on the order in which
    groups come back (seeded episodes, or greedy), so a rollout's result never depends on timing; otherwise,
    and on pools without the send / wait / collect calls, one chunk is in flight. ``policy_threads``: torch's
    intra-op threads while the rollout runs (the env workers share the cores; None leaves them as set)."""
    if not episodes:
        raise ValueError("episodes must not be empty")
    if gripper_signal not in GRIPPER_SIGNALS:
        raise ValueError(f"gripper_signal must be one of {GRIPPER_SIGNALS}, got {gripper_signal!r}")
    seeded = [e.seed is not None for e in episodes]
    if any(seeded) and not all(seeded):
        raise ValueError("episodes must all have a seed (own random streams) or none (the shared generator)")
    if not isinstance(pipeline, int) or pipeline < 1:
        raise ValueError(f"pipeline must be an int >= 1, got {pipeline!r}")
    if policy_threads is not None and (not isinstance(policy_threads, int) or policy_threads < 1):
        raise ValueError(f"policy_threads must be None or an int >= 1, got {policy_threads!r}")
    stats = RolloutStats() if stats is None else stats
    started, busy_before = time.perf_counter(), getattr(pool, "env_busy_s", None)
    threads = torch.get_num_threads()
    try:
        if policy_threads is not None:
            torch.set_num_threads(policy_threads)
        batch = _collect(policy, pool, episodes, max_chunks=max_chunks, temperature=temperature, greedy=greedy,
                         generator=generator, desc=desc, should_stop=should_stop, gripper_signal=gripper_signal,
                         stats=stats, pipeline=pipeline, any_order=greedy or all(seeded))
    finally:
        torch.set_num_threads(threads)
    stats.wall_s += time.perf_counter() - started
    stats.env_steps += int(batch.batch["finish_step"].sum())
    if busy_before is not None:
        stats.env_s = (stats.env_s or 0.0) + pool.env_busy_s - busy_before
        stats.num_workers = len(getattr(pool, "workers", [])) or None
    return batch


def _collect(policy, pool: EnvPool, episodes: Sequence[Episode], *, max_chunks: int, temperature: float,
             greedy: bool, generator: torch.Generator | None, desc: str, should_stop, gripper_signal: str,
             stats: RolloutStats, pipeline: int, any_order: bool) -> DataProto:
    """The engine of ``collect_rollouts``: ``min(pool.num_slots, E)`` positions in flight, each refilled
    with a waiting episode as soon as its episode ends; with ``pipeline`` > 1 their worker groups step one
    chunk each, independently, the policy acting for a group as soon as its chunk comes back.

    ``any_order``: the episodes' draws do not depend on the order they run in (own streams, or greedy). Then
    the groups are pipelined, and a freed env takes the first waiting episode of the task it is built for
    (a task switch rebuilds the simulator) before the first waiting one; otherwise episodes start in order,
    one chunk in flight."""
    cfg = policy.config
    L, D = cfg.action_chunk, cfg.action_dim
    A, C, E = L * D, max_chunks, len(episodes)
    S = min(getattr(pool, "num_slots", E), E)
    device = policy.device
    languages = [pool.language(e.task_id) for e in episodes]
    with _Clock(stats, "policy_s"):  # one prompt encoding for the batch: every row keeps the padding it acted on
        input_ids, attention_mask = policy.encode_prompts(languages)
    P = input_ids.shape[1]
    at = np.arange(S)  # episode at each position, -1 when the position is idle
    chunk = np.zeros(S, dtype=np.int64)  # next chunk of the episode at each position
    with _Clock(stats, "wait_s"):
        observations = pool.reset([(e.task_id, e.init_state_id) for e in episodes[:S]])
    _check_languages(observations, languages, at)
    with _Clock(stats, "policy_s"):
        current = policy.observations_to_inputs(observations)
    groups = pipeline_groups(pool, pipeline if any_order else 1)
    chunks = pool if groups is not None else _OneChunkAtATime(pool)
    group_of = np.asarray(groups if groups is not None else [0] * S)
    streams = [torch.Generator().manual_seed(e.seed) for e in episodes] if episodes[0].seed is not None else None
    responses = torch.full((E, C, A), cfg.action_token_start, dtype=torch.int64)
    old_log_probs = torch.zeros(E, C, A)
    pixel_values = torch.zeros((E, C) + tuple(current.shape[1:]))
    gripper = torch.full((E, C, L), -1.0)
    finish_step = torch.zeros(E, dtype=torch.int64)
    complete = torch.zeros(E, dtype=torch.bool)
    env_actions = np.zeros((S, L, D), dtype=np.float64)
    in_flight: dict[int, tuple] = {}  # group -> (pending chunk, its positions)
    waiting = list(range(S, E))  # episodes not started yet, in order
    policy.eval()
    progress = tqdm(total=E, desc=desc, leave=False, unit="episode")

    def act(group: int) -> None:
        """The policy acts for the group's live positions; their chunk is sent to the envs."""
        if should_stop():
            raise StopRequested
        rows = np.flatnonzero((at >= 0) & (group_of == group))
        if not rows.size:
            return
        ids, ks = at[rows], chunk[rows]
        with _Clock(stats, "policy_s"):
            out = policy.act(input_ids[ids], attention_mask[ids], current[rows].to(device),
                             temperature=temperature, greedy=greedy,
                             generator=generator if streams is None else [streams[e] for e in ids])
            responses[ids, ks] = out["responses"].cpu()
            old_log_probs[ids, ks] = out["log_probs"].cpu()
        pixel_values[ids, ks] = current[rows].cpu()
        env_actions[rows] = out["env_actions"].cpu().double().numpy()
        with _Clock(stats, "wait_s"):
            in_flight[group] = (chunks.start_chunk(env_actions, np.isin(np.arange(S), rows)), rows)

    def settle(group: int, result, rows: np.ndarray) -> None:
        """Record the group's chunk, start the batch's next episodes at the positions whose episodes ended."""
        ended, ended_tasks = [], []
        for p in rows:
            e, k = at[p], chunk[p]
            executed = int(result.steps[p])
            gripper[e, k, :executed] = _gripper_signal(gripper_signal, env_actions[p, :executed, -1], result, p)
            finish_step[e] += executed
            complete[e] = bool(result.terminated[p])
            chunk[p] += 1
            if result.terminated[p] or result.truncated[p] or chunk[p] == C:
                ended.append(p)
                ended_tasks.append(episodes[e].task_id)
                at[p] = -1
        progress.update(len(ended))
        continuing = [p for p in rows if at[p] >= 0]
        if continuing:
            with _Clock(stats, "policy_s"):
                current[continuing] = policy.observations_to_inputs([result.obs[p] for p in continuing])
        if ended and waiting:
            starting = _next_episodes(waiting, ended_tasks, episodes, any_order)
            with _Clock(stats, "wait_s"):
                placed, observations = pool.refill(ended, [(episodes[e].task_id, episodes[e].init_state_id)
                                                           for e in starting])
            at[placed], chunk[placed] = starting, 0
            _check_languages(observations, languages, at[placed])
            with _Clock(stats, "policy_s"):
                current[placed] = policy.observations_to_inputs(observations)

    try:
        for group in sorted(set(group_of.tolist())):
            act(group)
        while in_flight:
            order = list(in_flight)
            with _Clock(stats, "wait_s"):
                group = order[chunks.wait_any([in_flight[g][0] for g in order])]
                pending, rows = in_flight.pop(group)
                result = chunks.finish_chunk(pending)
            settle(group, result, rows)
            act(group)
    finally:
        progress.close()
    uid = np.array([e.uid for e in episodes], dtype=object)
    tensors = {
        "responses": responses, "input_ids": input_ids.cpu().unsqueeze(1).expand(E, C, P).contiguous(),
        "attention_mask": attention_mask.cpu().unsqueeze(1).expand(E, C, P).contiguous(),
        "pixel_values": pixel_values, "finish_step": finish_step, "complete": complete,
        "old_log_probs": old_log_probs.view(E, C * A), "gripper": gripper,
    }
    non_tensors = {"uid": uid, "task_id": np.array([e.task_id for e in episodes]),
                   "init_state_id": np.array([e.init_state_id for e in episodes])}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def _next_episodes(waiting: list[int], tasks: list[int], episodes: Sequence[Episode], any_order: bool) -> list[int]:
    """Take (from ``waiting``, in place) the episodes to start at envs freed on ``tasks``: per env the first
    waiting episode of its task if ``any_order`` and there is one, else the first waiting."""
    starting = []
    for task in tasks[:len(waiting)]:
        same = next((e for e in waiting if episodes[e].task_id == task), None) if any_order else None
        starting.append(waiting[0] if same is None else same)
        waiting.remove(starting[-1])
    return starting


def _check_languages(observations: list[dict], languages: list[str], episodes) -> None:
    """RuntimeError unless the envs' prompts are the batch's (``pool.language``) for these episodes."""
    got, expected = [o["language"] for o in observations], [languages[e] for e in episodes]
    if got != expected:
        raise RuntimeError(f"the envs returned prompts {got} but pool.language gave {expected}")


def _gripper_signal(kind: str, commands: np.ndarray, result, episode: int) -> torch.Tensor:
    """float32 [steps]: the executed gripper commands, or +1 / -1 where the env reports the fingers closed / open."""
    if kind == "command":
        return torch.from_numpy(commands).float()
    closed = result.gripper_closed[episode] if result.gripper_closed is not None else None
    if closed is None:
        raise ValueError("gripper_signal='fingers' needs an env that reports its fingers (info['gripper_closed'], "
                         "MetaWorld); this env does not: use gripper_signal='command'")
    closed = np.asarray(closed, dtype=bool)
    if closed.shape != commands.shape:
        raise RuntimeError(f"the env reported the fingers for {closed.shape[0]} steps but executed {commands.shape[0]}")
    return torch.from_numpy(np.where(closed, 1.0, -1.0)).float()
