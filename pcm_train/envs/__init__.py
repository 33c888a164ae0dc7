"""Simulation environments: LIBERO and MetaWorld tasks behind one gymnasium-style interface.

The Ray worker pool for parallel chunked rollouts is in ``pcm_train.envs.workers``
(kept out of this namespace so that importing the environments does not import Ray).
"""
from .libero import (ACTION_DIM, MAX_OBJECTS_OF_INTEREST, MAX_STEPS, NOOP_ACTION, NUM_STEPS_WAIT,
                     PRIVILEGED_STATE_DIM, PROPRIO_DIM, RENDERERS, SUITES, LiberoEnv, TaskInfo, choose_renderer,
                     initial_state, list_tasks, num_init_states, process_image)
from .metaworld import SUITES as METAWORLD_SUITES
from .metaworld import MetaWorldEnv

__all__ = [
    "ACTION_DIM", "MAX_OBJECTS_OF_INTEREST", "MAX_STEPS", "NOOP_ACTION", "NUM_STEPS_WAIT", "PRIVILEGED_STATE_DIM",
    "PROPRIO_DIM", "RENDERERS", "SUITES", "LiberoEnv", "TaskInfo", "choose_renderer", "initial_state",
    "list_tasks", "num_init_states", "process_image", "METAWORLD_SUITES", "MetaWorldEnv",
]
