"""The env families behind one interface: a suite name picks LIBERO or MetaWorld.

Everything the worker pool, the trainer and the policy factory ask of a suite: its env class, its
tasks, whether an initial state exists, and the privileged state's size (state-mode policies).
"""
from __future__ import annotations

from . import libero, metaworld

SUITES = libero.SUITES + metaworld.SUITES


def _family(suite: str):
    if suite in libero.SUITES:
        return libero
    if suite in metaworld.SUITES:
        return metaworld
    raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")


def make_env(suite: str, **options):
    """A ``LiberoEnv`` or ``MetaWorldEnv`` of ``suite`` (the same constructor options and methods)."""
    return (metaworld.MetaWorldEnv if _family(suite) is metaworld else libero.LiberoEnv)(suite, **options)


def list_tasks(suite: str) -> list:
    """The suite's tasks in task-id order (``task_id``, ``name``, ``language``)."""
    return _family(suite).list_tasks(suite)


def num_init_states(suite: str, task_id: int) -> int:
    """How many initial states (LIBERO) or placements (MetaWorld) the task has."""
    return _family(suite).num_init_states(suite, task_id)


def held_out_init_states(suite: str, task_id: int) -> range:
    """Ids of the task's extra held-out prompts, never drawn for training (MetaWorld: 50-99; LIBERO: none,
    its held-out states are the last ``val_init_states`` of its 50)."""
    if _family(suite) is metaworld:
        return metaworld.held_out_init_states(suite, task_id)
    libero._check_task(suite, task_id)  # ValueError for an unknown task
    return range(0)


def check_init_state(suite: str, task_id: int, init_state_id: int) -> None:
    """ValueError naming the task or initial state when the suite has no such prompt."""
    if _family(suite) is metaworld:
        metaworld.check_init_state(suite, task_id, init_state_id)
    else:
        libero.initial_state(suite, task_id, init_state_id)


def state_dim(suite: str) -> int:
    """Size of the privileged state vector a state-mode policy reads."""
    return metaworld.STATE_DIM if _family(suite) is metaworld else libero.PRIVILEGED_STATE_DIM
