"""Chunked, batched rollouts into a SimpleVLA-RL-layout ``DataProto``.

The policy acts once per chunk for every active episode at once; the env pool
executes the chunk's L steps in each env (stopping at success) and returns the
new observations. Chunks never reached are filled as SimpleVLA-RL does: the
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

    def reset(self, episodes: Sequence[tuple[int, int]]) -> list[dict]: ...

    def language(self, task_id: int) -> str:
        """The task's instruction (needed only when a batch has more episodes than slots)."""

    def step_chunk(self, actions: np.ndarray, active: np.ndarray):
        """Returns a ``ChunkResult`` (obs, reward, terminated, truncated, steps per episode; the fingers
        ``gripper_closed`` where the env reports them)."""


@dataclass
class RolloutStats:
    """Where a rollout's wall-clock went (seconds, accumulated over its waves by ``collect_rollouts``)."""

    wall_s: float = 0.0  # the whole rollout
    policy_s: float = 0.0  # the policy: encoding prompts and observations, acting
    wait_s: float = 0.0  # the driver blocked on the env pool (resets and chunk steps): the policy idles
    env_s: float | None = None  # the env workers' own busy time, summed over workers (pools that report it)
    env_steps: int = 0  # env steps executed
    num_workers: int | None = None  # env workers (pools that report it)

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
                     stats: RolloutStats | None = None) -> DataProto:
    """Run every episode to success or ``max_chunks`` chunks; returns the batch (LAYOUT.md keys plus
    ``gripper`` float [E, C, L], the phase labeler's per-step gripper signal, +1 closed / -1 open:
    the executed env-space gripper commands for ``gripper_signal="command"``, the fingers the env
    reports (``ChunkResult.gripper_closed``) for ``"fingers"``). ``pixel_values`` is float
    [E, C, *row] with row = the policy's input per chunk ([C, H, W] images or [state_dim] states).

    Env reuse: a pool with fewer env slots (``pool.num_slots``) than episodes runs them in waves of
    at most that many, in order; each slot is reset to its next episode, so memory is bounded by the
    slots, not the batch.

    ``should_stop()`` is polled between chunks; when it returns True the rollout raises
    ``StopRequested`` (a half-recorded batch is never returned).

    Random streams: when every episode has a ``seed``, each samples its actions from its own CPU generator
    seeded with it (``sample_bins``), so its tokens, actions and log-probs do not depend on the batch it
    runs in, its position, the waves or the device; otherwise (no seeds) all rows draw from
    ``generator``. Greedy rollouts draw nothing.

    ``stats`` (optional) accumulates where the time went (``RolloutStats``): the policy, the wait on the
    envs, the envs' own busy time where the pool reports it (``pool.env_busy_s``), env steps."""
    if not episodes:
        raise ValueError("episodes must not be empty")
    if gripper_signal not in GRIPPER_SIGNALS:
        raise ValueError(f"gripper_signal must be one of {GRIPPER_SIGNALS}, got {gripper_signal!r}")
    seeded = [e.seed is not None for e in episodes]
    if any(seeded) and not all(seeded):
        raise ValueError("episodes must all have a seed (own random streams) or none (the shared generator)")
    stats = RolloutStats() if stats is None else stats
    started, busy_before = time.perf_counter(), getattr(pool, "env_busy_s", None)
    options = dict(max_chunks=max_chunks, temperature=temperature, greedy=greedy, generator=generator,
                   should_stop=should_stop, gripper_signal=gripper_signal, stats=stats)
    slots = getattr(pool, "num_slots", len(episodes))
    if len(episodes) <= slots:
        batch = _collect_wave(policy, pool, episodes, None, desc=desc, **options)
    else:
        # One prompt encoding for the whole batch: every wave acts on the padding its rows are stored with.
        with _Clock(stats, "policy_s"):
            prompts = policy.encode_prompts([pool.language(e.task_id) for e in episodes])
        starts = range(0, len(episodes), slots)
        batch = DataProto.concat([
            _collect_wave(policy, pool, episodes[start:start + slots], [p[start:start + slots] for p in prompts],
                          desc=f"{desc} {wave + 1}/{len(starts)}", **options)
            for wave, start in enumerate(starts)])
    stats.wall_s += time.perf_counter() - started
    stats.env_steps += int(batch.batch["finish_step"].sum())
    if busy_before is not None:
        stats.env_s = (stats.env_s or 0.0) + pool.env_busy_s - busy_before
        stats.num_workers = len(getattr(pool, "workers", [])) or None
    return batch


def _collect_wave(policy, pool: EnvPool, episodes: Sequence[Episode], prompts, *, max_chunks: int,
                  temperature: float, greedy: bool, generator: torch.Generator | None, desc: str,
                  should_stop, gripper_signal: str, stats: RolloutStats) -> DataProto:
    """``collect_rollouts`` for at most ``pool.num_slots`` episodes, all in flight at once; ``prompts``:
    their (input_ids, attention_mask), or None to encode the languages the envs return."""
    cfg = policy.config
    L, D = cfg.action_chunk, cfg.action_dim
    A, C, E = L * D, max_chunks, len(episodes)
    device = policy.device
    with _Clock(stats, "wait_s"):
        observations = pool.reset([(e.task_id, e.init_state_id) for e in episodes])
    languages = [o["language"] for o in observations]
    if prompts is None:
        with _Clock(stats, "policy_s"):
            prompts = policy.encode_prompts(languages)
    elif languages != [pool.language(e.task_id) for e in episodes]:
        raise RuntimeError(f"the envs returned prompts {languages} but pool.language gave others")
    input_ids, attention_mask = prompts
    P = input_ids.shape[1]
    with _Clock(stats, "policy_s"):
        current = policy.observations_to_inputs(observations)
    responses = torch.full((E, C, A), cfg.action_token_start, dtype=torch.int64)
    old_log_probs = torch.zeros(E, C, A)
    streams = [torch.Generator().manual_seed(e.seed) for e in episodes] if episodes[0].seed is not None else None
    pixel_values = torch.zeros((E, C) + tuple(current.shape[1:]))
    gripper = torch.full((E, C, L), -1.0)
    finish_step = torch.zeros(E, dtype=torch.int64)
    complete = torch.zeros(E, dtype=torch.bool)
    active = np.ones(E, dtype=bool)
    policy.eval()
    for k in tqdm(range(C), desc=desc, leave=False, unit="chunk"):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        if should_stop():
            raise StopRequested
        with _Clock(stats, "policy_s"):
            out = policy.act(input_ids[rows], attention_mask[rows], current[rows].to(device),
                             temperature=temperature, greedy=greedy,
                             generator=generator if streams is None else [streams[e] for e in rows])
            responses[rows, k] = out["responses"].cpu()
            old_log_probs[rows, k] = out["log_probs"].cpu()
        pixel_values[rows, k] = current[rows].cpu()
        env_actions = np.zeros((E, L, D), dtype=np.float64)
        env_actions[rows] = out["env_actions"].cpu().double().numpy()
        with _Clock(stats, "wait_s"):
            result = pool.step_chunk(env_actions, active)
        for e in rows:
            executed = int(result.steps[e])
            gripper[e, k, :executed] = _gripper_signal(gripper_signal, env_actions[e, :executed, -1], result, e)
            finish_step[e] += executed
            complete[e] = bool(result.terminated[e])
            if result.terminated[e] or result.truncated[e] or k == C - 1:
                active[e] = False
        continuing = np.flatnonzero(active)
        if continuing.size:
            with _Clock(stats, "policy_s"):
                current[continuing] = policy.observations_to_inputs([result.obs[e] for e in continuing])
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
