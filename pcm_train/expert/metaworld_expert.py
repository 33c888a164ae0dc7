"""Demonstrations of MetaWorld's scripted policies, in the LIBERO expert's ``Episode`` format.

The scripted policy (``pcm_train.envs.metaworld.ScriptedExpert``) acts on the observation
after every step; optional Gaussian ``action_noise`` on xyz (the gripper stays clean).
The recorded phase of a step is the expert's gripper command: ``PHASES[0]`` "open" or
``PHASES[1]`` "closed".
"""
from __future__ import annotations

import time

import numpy as np

from pcm_train.envs.metaworld import ACTION_DIM, MetaWorldEnv, ScriptedExpert

from .object_expert import Episode

PHASES = ("open", "closed")


def run_episode(env: MetaWorldEnv, task_id: int, init_state_id: int, expert_kwargs: dict | None = None,
                max_steps: int = 500, record_images: bool = False) -> Episode:
    """Reset ``env`` to (task, placement) and let the scripted policy act until success or ``max_steps``.

    ``expert_kwargs``: ``action_noise`` (σ on xyz) and ``rng`` (a NumPy Generator)."""
    if record_images and not env.camera:
        raise ValueError("record_images=True needs a MetaWorldEnv built with camera=True")
    start = time.perf_counter()
    expert = ScriptedExpert(env.suite, task_id, **(expert_kwargs or {}))
    obs, _ = env.reset(task_id=task_id, init_state_id=init_state_id)
    states, images, actions, clean_actions, phases = [], [], [], [], []
    success = False
    for _ in range(max_steps):
        clean = expert.clean_act(env.raw_observation)
        action = expert.add_noise(clean).astype(np.float32)  # executed as stored, so stored actions replay
        states.append(obs["state"])
        if record_images:
            images.append(obs["image"])
        actions.append(action)
        clean_actions.append(clean.astype(np.float32))
        phases.append(int(clean[6] > 0))
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            success = terminated
            break
    return Episode(task_id=task_id, init_state_id=init_state_id, language=obs["language"],
                   states=np.array(states, dtype=np.float32).reshape(len(states), env.state_dim),
                   images=np.array(images, dtype=np.uint8) if record_images else None,
                   actions=np.array(actions, dtype=np.float32).reshape(-1, ACTION_DIM),
                   clean_actions=np.array(clean_actions, dtype=np.float32).reshape(-1, ACTION_DIM),
                   phases=np.array(phases, dtype=np.uint8), success=success,
                   seconds=time.perf_counter() - start)
