"""The demonstration record both scripted experts (LIBERO-Object, MetaWorld) produce, and its recorder."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from pcm_train.envs.libero import ACTION_DIM


@dataclass
class Episode:
    """One expert episode; T executed steps (the episode stops at success, max_steps or the script's end)."""

    task_id: int
    init_state_id: int
    language: str
    states: np.ndarray  # float32 [T, state_dim]: observation state before each action
    images: np.ndarray | None  # uint8 [T, H, W, 3] before each action, or None
    actions: np.ndarray  # float32 [T, 7]: executed (noisy) env-space actions
    clean_actions: np.ndarray  # float32 [T, 7]: the expert's noise-free actions
    phases: np.ndarray  # uint8 [T]: index into the expert's PHASES of the phase that produced each action
    success: bool
    seconds: float  # wall time including the reset


class EpisodeRecorder:
    """Steps an env with an expert's actions and records each step's input; create it before ``env.reset``."""

    def __init__(self, env, record_images: bool = False):
        if record_images and not env.camera:
            raise ValueError(f"record_images=True needs a {type(env).__name__} built with camera=True")
        self.env = env
        self.record_images = record_images
        self.success = False
        self._start = time.perf_counter()
        self._states, self._images, self._actions, self._clean_actions, self._phases = [], [], [], [], []

    def step(self, obs: dict, action: np.ndarray, clean_action: np.ndarray, phase: int) -> tuple[dict, bool]:
        """Record (obs, action float32 [7], clean_action [7], phase), execute action; (next obs, episode over)."""
        self._states.append(obs["state"])
        if self.record_images:
            self._images.append(obs["image"])
        self._actions.append(action)
        self._clean_actions.append(np.asarray(clean_action, dtype=np.float32))
        self._phases.append(phase)
        obs, _, terminated, truncated, _ = self.env.step(action)
        self.success = bool(terminated)
        return obs, bool(terminated or truncated)

    def finish(self, task_id: int, init_state_id: int, language: str) -> Episode:
        """The recorded episode."""
        return Episode(task_id=task_id, init_state_id=init_state_id, language=language,
                       states=np.array(self._states, dtype=np.float32).reshape(len(self._states), self.env.state_dim),
                       images=np.array(self._images, dtype=np.uint8) if self.record_images else None,
                       actions=np.array(self._actions, dtype=np.float32).reshape(-1, ACTION_DIM),
                       clean_actions=np.array(self._clean_actions, dtype=np.float32).reshape(-1, ACTION_DIM),
                       phases=np.array(self._phases, dtype=np.uint8), success=self.success,
                       seconds=time.perf_counter() - self._start)
