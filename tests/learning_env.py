"""A fast synthetic chunked env pool whose success depends on what the arm does while the gripper is closed.

Pure numpy, no physics: ``LiftPool`` has the env pool interface the rollout uses (``language(task)``,
``reset(episodes)`` -> list of observation dicts, ``step_chunk(actions [E, L, D], active [E])`` -> ``ChunkResult``,
``close()``), for state-mode policies (``obs["state"]`` float32 [36], LIBERO's privileged-state size;
no image).

The task: lift a block to a target height.

- Gripper: the env command ``a[6] > 0`` closes it (the convention ``pcm_kernels.label_phases`` uses),
  ``a[6] <= 0`` opens it, step by step.
- Lift: while the gripper is closed, the block's height changes by ``gain * direction * a[0]`` per step
  (arm dim 0 is the vertical axis; ``direction = -1`` by default: negative dim 0 lifts), never below 0.
  Opening the gripper drops the block: height back to 0.
- Success (terminated, reward 1) once the height reaches the episode's target ``height * (1 + s)``,
  with ``s`` uniform in [-spread, spread] drawn from (task, initial state): fixed per episode.
- Truncated after ``max_steps`` steps.

So what the arm does in the ACTIVE_GRIP chunks (dim 0 lifting, and the gripper kept closed) decides
success; dims 1..5 never matter. The observation shows the state a good policy needs: whether the
gripper is closed, the block's height and the target (both over ``height``), the time used, the last
step's dim-0 action; the rest of the 36 numbers are zeros.

A randomly initialised small VLA samples nearly uniform action tokens: it closes the gripper on 3 of 4
steps (raw gripper value < 0.5) and moves dim 0 uniformly in [-1, 1], a random walk that reaches the
target now and then (with ``height=2.5`` over 32 steps: ~21% for uniform actions, 23% measured for the
tests' fresh policy). Keeping the gripper closed and moving dim 0 the lifting way raises success fast (a
mean dim-0 shift of 0.2 the right way with 85% closing gives ~75%).

Why ``direction = -1``: a token's normalized value falls as its bin rises, and the gripper closes for low
raw values, so with dim 0 lifting when negative the two helpful moves point the same way in token space;
a tiny policy that starts out unable to tell its 55 action-placeholder positions apart (their input
embeddings are all zero, so they differ only through RoPE from the second decoder layer on) learns the
task within ~15 GRPO steps. With ``direction = +1`` it must learn dim 0 and the gripper apart first,
which takes several times longer (0.41 -> 0.69 in 40 steps at lr 1e-2, temperature 1.0).
"""
from __future__ import annotations

import numpy as np

from pcm_train.envs.workers import ChunkResult

STATE_DIM = 36  # pcm_train.envs.libero.PRIVILEGED_STATE_DIM, what a fresh state-mode small VLA reads
LANGUAGE = "lift the block"


class LiftPool:
    """E parallel lift episodes, stepped a chunk at a time (see the module docstring)."""

    def __init__(self, *, max_steps: int = 32, height: float = 2.5, gain: float = 1.0, spread: float = 0.1,
                 direction: float = -1.0, state_dim: int = STATE_DIM):
        if state_dim < 6:
            raise ValueError(f"state_dim must be >= 6, got {state_dim}")
        self.max_steps, self.height, self.gain, self.spread = max_steps, height, gain, spread
        self.direction = direction
        self.state_dim = state_dim
        self.resets = 0
        self.closed = False
        self._reset_arrays(0)

    def _reset_arrays(self, n: int) -> None:
        self.target = np.zeros(n)
        self.z = np.zeros(n)
        self.gripper_closed = np.zeros(n, bool)
        self.last_a0 = np.zeros(n)
        self.steps = np.zeros(n, np.int64)
        self.success = np.zeros(n, bool)

    def _obs(self, e: int) -> dict:
        state = np.zeros(self.state_dim, np.float32)
        state[:5] = (float(self.gripper_closed[e]), self.z[e] / self.height, self.target[e] / self.height,
                     self.steps[e] / self.max_steps, self.last_a0[e])
        return {"language": LANGUAGE, "state": state}

    def language(self, task_id: int) -> str:
        return LANGUAGE

    def reset(self, episodes) -> list[dict]:
        """episodes: (task_id, init_state_id) pairs; each pair fixes its episode's target height."""
        self.resets += 1
        self._reset_arrays(len(episodes))
        for e, (task, init) in enumerate(episodes):
            u = np.random.default_rng([int(task), int(init)]).uniform(-1.0, 1.0)
            self.target[e] = self.height * (1.0 + self.spread * u)
        return [self._obs(e) for e in range(len(episodes))]

    def step_chunk(self, actions: np.ndarray, active: np.ndarray) -> ChunkResult:
        """actions float [E, L, D] env actions (dim 0 lift, dim 6 gripper, +1 close); active bool [E]."""
        actions = np.asarray(actions, dtype=np.float64)
        E, L, _ = actions.shape
        running = np.asarray(active, bool) & ~self.success & (self.steps < self.max_steps)
        executed = np.zeros(E, np.int64)
        for t in range(L):
            a = actions[:, t]
            closed = a[:, 6] > 0
            z = np.where(closed, np.maximum(self.z + self.gain * self.direction * a[:, 0], 0.0), 0.0)
            self.z = np.where(running, z, self.z)
            self.gripper_closed = np.where(running, closed, self.gripper_closed)
            self.last_a0 = np.where(running, a[:, 0], self.last_a0)
            self.steps += running
            executed += running
            self.success |= running & (self.z >= self.target)
            running &= ~self.success & (self.steps < self.max_steps)
        stepped = executed > 0
        terminated = self.success.copy()
        truncated = ~self.success & (self.steps >= self.max_steps)
        reward = (stepped & terminated).astype(np.float32)
        return ChunkResult([self._obs(e) for e in range(E)], reward, terminated, truncated, executed)

    def close(self) -> None:
        self.closed = True


def lift_pool_factory(**kwargs):
    """A ``Trainer`` pool factory: ``LiftPool`` episodes last ``rollout.max_chunks * rollout.action_chunk`` steps."""
    def make(cfg, image_size):
        return LiftPool(max_steps=cfg.rollout.max_chunks * cfg.rollout.action_chunk, **kwargs)
    return make
