"""Demonstrations of MetaWorld's scripted policies, in the LIBERO expert's ``Episode`` format.

The scripted policy (``pcm_train.envs.metaworld.ScriptedExpert``) acts on the observation
after every step; optional Gaussian ``action_noise`` on xyz (the gripper stays clean).
The recorded phase of a step is the expert's gripper command: ``PHASES[0]`` "open" or
``PHASES[1]`` "closed".
"""
from __future__ import annotations

import numpy as np

from pcm_train.envs.metaworld import MetaWorldEnv, ScriptedExpert

from .episode import Episode, EpisodeRecorder

PHASES = ("open", "closed")


def run_episode(env: MetaWorldEnv, task_id: int, init_state_id: int, expert_kwargs: dict | None = None,
                max_steps: int = 500, record_images: bool = False) -> Episode:
    """Reset ``env`` to (task, placement) and let the scripted policy act until success or ``max_steps``.

    ``expert_kwargs``: ``action_noise`` (σ on xyz) and ``rng`` (a NumPy Generator)."""
    recorder = EpisodeRecorder(env, record_images)
    expert = ScriptedExpert(env.suite, task_id, **(expert_kwargs or {}))
    obs, _ = env.reset(task_id=task_id, init_state_id=init_state_id)
    for _ in range(max_steps):
        clean = expert.clean_act(env.raw_observation)
        action = expert.add_noise(clean).astype(np.float32)  # executed as stored, so stored actions replay
        obs, over = recorder.step(obs, action, clean, int(clean[6] > 0))
        if over:
            break
    return recorder.finish(task_id, init_state_id, obs["language"])
