"""What the env families (``LiberoEnv``, ``MetaWorldEnv``) share: options, action checks, the chunk loop.

A family builds and resets its simulator and executes one action (``_execute_one``); ``ChunkEnv``
checks the constructor options and the actions, counts policy steps, stops a chunk at success or
``max_steps`` and returns gymnasium's (obs, reward, terminated, truncated, info).
"""
from __future__ import annotations

import contextlib

import numpy as np


def check_env_options(*, image_size: int, render_size: int, max_steps: int, num_steps_wait: int,
                      center_crop: float) -> None:
    """ValueError naming the option when a size or step count is not a positive (``num_steps_wait``: a
    non-negative) integer, or ``center_crop`` is outside (0, 1]."""
    for name, value in (("image_size", image_size), ("render_size", render_size), ("max_steps", max_steps)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(num_steps_wait, (int, np.integer)) or num_steps_wait < 0:
        raise ValueError(f"num_steps_wait must be a non-negative integer, got {num_steps_wait!r}")
    if not 0.0 < center_crop <= 1.0:
        raise ValueError(f"center_crop must be in (0, 1], got {center_crop}")


class ChunkEnv:
    """One episode at a time of a suite's tasks, stepped by single actions or whole chunks.

    Subclasses set ``ACTION_DIMS`` (the accepted action widths) and implement ``reset``,
    ``_execute_one(action) -> success``, ``_observe() -> obs`` and ``close``; ``_stepping()``
    may wrap a chunk's steps (e.g. to switch rendering off).
    """

    ACTION_DIMS: tuple[int, ...] = (7,)

    def __init__(self, suite: str, *, camera: bool, image_size: int, render_size: int, center_crop: float,
                 privileged_state: bool, max_steps: int, num_steps_wait: int):
        check_env_options(image_size=image_size, render_size=render_size, max_steps=max_steps,
                          num_steps_wait=num_steps_wait, center_crop=center_crop)
        self.suite = suite
        self.camera = camera
        self.image_size = image_size
        self.render_size = render_size
        self.center_crop = center_crop
        self.privileged_state = privileged_state
        self.max_steps = max_steps
        self.num_steps_wait = num_steps_wait
        self.task_id: int | None = None  # task of the last reset
        self.init_state_id: int | None = None
        self.elapsed_steps = 0  # policy steps since the last reset
        self._episode_over = True

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        """One policy step with action float [D] (D in ACTION_DIMS); (obs, reward, terminated, truncated, info)."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape not in {(dim,) for dim in self.ACTION_DIMS}:
            shapes = " or ".join(f"({dim},)" for dim in self.ACTION_DIMS)
            raise ValueError(f"action must have shape {shapes}, got {action.shape}")
        return self.step_chunk(action[None])

    def step_chunk(self, actions: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        """Execute actions float [L, D] in order, stopping early at success or max_steps.

        Observes only once, after the last executed step. Returns (obs, reward,
        terminated, truncated, info) as ``step`` would for that last step;
        ``info["chunk_steps"]`` is the number of steps executed (<= L).
        """
        if self._episode_over:
            raise RuntimeError("the episode is over (or never started); call reset() first")
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim != 2 or actions.shape[1] not in self.ACTION_DIMS or len(actions) == 0:
            shapes = " or ".join(f"(L >= 1, {dim})" for dim in self.ACTION_DIMS)
            raise ValueError(f"actions must have shape {shapes}, got {actions.shape}")
        if not np.isfinite(actions).all():
            raise ValueError("actions must be finite")
        success, executed = False, 0
        with self._stepping():
            for action in actions:
                success = self._execute_one(action)
                executed += 1
                self.elapsed_steps += 1
                if success or self.elapsed_steps >= self.max_steps:
                    break
        truncated = not success and self.elapsed_steps >= self.max_steps
        self._episode_over = success or truncated
        return self._observe(), float(success), success, truncated, self._info(success, executed)

    def _start_episode(self, init_state_id: int) -> None:
        """Bookkeeping at the end of a subclass's ``reset``."""
        self.init_state_id = int(init_state_id)
        self.elapsed_steps = 0
        self._episode_over = False

    def _stepping(self):
        """Context around a chunk's steps; nothing by default."""
        return contextlib.nullcontext()

    def _execute_one(self, action: np.ndarray) -> bool:
        """Run one float64 [D] action in the simulator; whether the task succeeded."""
        raise NotImplementedError

    def _observe(self) -> dict:
        raise NotImplementedError

    def _info(self, success: bool, chunk_steps: int) -> dict:
        return {"success": bool(success), "task_id": self.task_id, "init_state_id": self.init_state_id,
                "elapsed_steps": self.elapsed_steps, "chunk_steps": chunk_steps}
