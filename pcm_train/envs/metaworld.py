"""MetaWorld v3 grasping tasks behind LiberoEnv's interface (a second env family).

Uses the ``metaworld`` package (Gymnasium API, MuJoCo; ``docs/metaworld.md``
has the version pins and why). ``MetaWorldEnv`` takes the same constructor
keywords, ``reset(task_id=, init_state_id=)`` and ``step_chunk(actions)`` as
``LiberoEnv``, so the Ray worker pool and the rollout code can drive either.

Prompts. A prompt is (task, initial placement). The placements of a task are
MetaWorld's own: the 50 training tasks of ``metaworld.MT1(name, seed=placement_seed)``,
each a frozen random vector (object position and goal position). ``init_state_id``
k picks the k-th one, so (task, k) always starts from the same state, in any
process: MT1 draws the vectors with NumPy's legacy seeded generator and the
reset is deterministic. There are ``NUM_INIT_STATES`` = 50 per task, as for
LIBERO. The goal position is part of the observation (MT1 is goal-observable).
Beyond them, ids 50-99 (``held_out_init_states``) are a held-out pool: the 50
training tasks of ``MT1(name, seed=placement_seed + HELD_OUT_SEED_OFFSET)``,
other random placements that training (which draws ids below 50) never sees;
validation can score many distinct held-out episodes per task from them.

Actions. Policies emit the 7-dim LIBERO action (xyz, rotation, gripper), in env
space: dims 0-2 are MetaWorld's xyz deltas (in [-1, 1], 1 cm per unit, per step;
clipped by MetaWorld), dims 3-5 (rotation) are ignored (MetaWorld's hand keeps a
fixed orientation), dim 6 is the gripper with LIBERO's convention: ``> 0`` closes,
``<= 0`` opens. MetaWorld's gripper command is a finger position target whose
right "closed" and "open" levels differ by task (the scripted policies use
{0, 1} for pick-place, {0, 0.1} for pick-out-of-hole, {-1, 0.6} for basketball,
{0, 0.6} for assembly; 0 is a weak "open", and a hard close of 1 makes three of
the four tasks fail). So the env applies the task's level: ``close_level`` when
``a[6] > 0``, else ``open_level`` (``TaskSpec``). ``pcm_kernels.label_phases``
(close_above=0) then sees "close" exactly where the env closed. A [L, 4] action
(MetaWorld's own: xyz, raw gripper level) is accepted too and passed through.

Gripper signal from the fingers. ``info["gripper_closed"]`` (bool [chunk_steps])
says per executed step whether the fingers are closed, from MetaWorld's
finger-opening observation ``obs[3]`` (1.0 wide open, 0.43-0.63 holding an
object, lower closed on nothing): closed when ``obs[3] < FINGERS_CLOSED_BELOW``.
It lags the command by 6-29 steps, does not depend on the command levels, and
ignores a close command too short to close the hand, so it is the better phase
label signal for MetaWorld (``docs/metaworld.md``); ``info["finger_opening"]``
(float32 [chunk_steps]) is the raw value.

Observations (dict, as LiberoEnv's):

- ``state``: float32 [39] MetaWorld's observation (hand xyz, finger opening,
  object pos + quat x2 (zero-padded), the same 18 of the previous step, goal xyz)
  with ``privileged_state=True``; float32 [4] (hand xyz, finger opening) without;
- ``language``: str, the task's instruction (``TaskSpec.language``);
- ``image``: uint8 [image_size, image_size, 3] (only with ``camera=True``): the
  ``camera_name`` view rendered at ``render_size``², turned upright (the corner
  cameras render upside down) and resized. Rendered once per ``step_chunk``.

Episodes end at success (reward 1.0, ``terminated``) or after ``max_steps``
policy steps (``truncated``). Each ``MetaWorldEnv`` builds the simulator of a
task the first time it is reset to it and keeps it (about 15 MB each): switching
tasks never rebuilds, and resetting a kept simulator to (task, k) gives the same
episode as a fresh one.
"""
from __future__ import annotations

import atexit
import functools
import os
import sys
import warnings
from typing import NamedTuple

import numpy as np

from .libero import TaskInfo, choose_renderer, process_image
from .base import ChunkEnv

SUITES = ("metaworld",)
MAX_STEPS = 500  # MetaWorld's own episode cap (max_path_length)
NUM_INIT_STATES = 50  # placements per task: MT1's training tasks
NUM_HELD_OUT = 50  # extra held-out placements per task, ids NUM_INIT_STATES .. + NUM_HELD_OUT - 1
HELD_OUT_SEED_OFFSET = 1  # the held-out pool is MT1(name, seed=placement_seed + this)
ACTION_DIM = 7  # the policies' action: xyz (used), rotation (ignored), gripper (> 0 closes)
NATIVE_ACTION_DIM = 4  # MetaWorld's action: xyz, raw gripper level
STATE_DIM = 39  # MetaWorld's observation (privileged_state=True)
PROPRIO_DIM = 4  # hand xyz, finger opening (privileged_state=False)
FINGER_OBS = 3  # index of the finger opening in MetaWorld's observation
FINGERS_CLOSED_BELOW = 0.8  # finger opening under which info["gripper_closed"] is True
CAMERA = "corner"
_NO_PATH_LIMIT = 10**9  # MetaWorld raises past its max_path_length; the step cap is ours (max_steps)


class TaskSpec(NamedTuple):
    """One supported MetaWorld task."""

    name: str  # MetaWorld environment name (v3)
    language: str  # instruction given to the policy
    open_level: float  # MetaWorld gripper command applied when a[6] <= 0 (the scripted policy's "open")
    close_level: float  # applied when a[6] > 0 (the scripted policy's "closed")


# Grasp tasks whose scripted policy (metaworld.policies) closes the gripper once and holds it to the end.
# The levels are the two values each scripted policy commands.
TASKS: dict[str, tuple[TaskSpec, ...]] = {
    "metaworld": (
        TaskSpec("pick-place-v3", "pick up the puck and place it at the goal", 0.0, 1.0),
        TaskSpec("pick-out-of-hole-v3", "pick the peg out of the hole and lift it to the goal", 0.0, 0.1),
        TaskSpec("basketball-v3", "pick up the basketball and dunk it into the hoop", -1.0, 0.6),
        TaskSpec("assembly-v3", "pick up the ring and put it over the peg", 0.0, 0.6),
    ),
}


# ----- suites, tasks and placements -----

def _check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")


def task_specs(suite: str) -> tuple[TaskSpec, ...]:
    """The suite's tasks in task-id order."""
    _check_suite(suite)
    return TASKS[suite]


def list_tasks(suite: str) -> list[TaskInfo]:
    """The suite's tasks in task-id order, as ``libero.list_tasks`` gives them (name = MetaWorld env name)."""
    return [TaskInfo(task_id, spec.name, spec.language) for task_id, spec in enumerate(task_specs(suite))]


def _check_task(suite: str, task_id: int) -> TaskSpec:
    specs = task_specs(suite)
    if not isinstance(task_id, (int, np.integer)) or not 0 <= task_id < len(specs):
        raise ValueError(f"task_id must be an integer in [0, {len(specs)}) for {suite}, got {task_id!r}")
    return specs[task_id]


def num_init_states(suite: str, task_id: int) -> int:
    """Number of placements of a task (50 for every task)."""
    _check_task(suite, task_id)
    return NUM_INIT_STATES


def held_out_init_states(suite: str, task_id: int) -> range:
    """Ids of the task's held-out placements (never drawn for training): 50-99."""
    _check_task(suite, task_id)
    return range(NUM_INIT_STATES, NUM_INIT_STATES + NUM_HELD_OUT)


def check_init_state(suite: str, task_id: int, init_state_id: int) -> None:
    """ValueError unless (task_id, init_state_id) names a prompt of the suite (a placement or a held-out
    one); builds nothing."""
    _check_task(suite, task_id)
    top = NUM_INIT_STATES + NUM_HELD_OUT
    if not isinstance(init_state_id, (int, np.integer)) or not 0 <= init_state_id < top:
        raise ValueError(f"init_state_id must be an integer in [0, {top}) for {suite} task {task_id} "
                         f"(0-{NUM_INIT_STATES - 1}: placements, {NUM_INIT_STATES}-{top - 1}: held-out ones), "
                         f"got {init_state_id!r}")


def _placement(name: str, init_state_id: int, placement_seed: int):
    """MT1's task object of placement ``init_state_id`` (held-out ids from the offset seed's MT1)."""
    if init_state_id >= NUM_INIT_STATES:
        return _benchmark(name, placement_seed + HELD_OUT_SEED_OFFSET).train_tasks[init_state_id - NUM_INIT_STATES]
    return _benchmark(name, placement_seed).train_tasks[init_state_id]


def _import_metaworld(renders: bool = False):
    """The metaworld module, imported after the renderer is decided (it imports mujoco).

    If mujoco was imported before any backend was chosen, only code that
    renders (``renders``) needs one, and ``choose_renderer`` says what to do.
    """
    if renders or "mujoco" not in sys.modules or os.environ.get("MUJOCO_GL"):
        if choose_renderer() == "egl" and os.environ.get("CUDA_VISIBLE_DEVICES") == "":
            os.environ.setdefault("MUJOCO_EGL_DEVICE_ID", "0")  # as LiberoEnv: Ray's empty GPU mask breaks EGL
    import metaworld
    return metaworld


@functools.lru_cache(maxsize=None)
def _benchmark(name: str, placement_seed: int):
    """metaworld.MT1(name, seed): the env class and the 50 seeded placements (~1 s to build, once per process)."""
    metaworld = _import_metaworld()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metaworld.MT1(name, seed=placement_seed)


def initial_state(suite: str, task_id: int, init_state_id: int, placement_seed: int = 0) -> np.ndarray:
    """float64 [6 or more]: the placement vector of a prompt (object position, then goal position)."""
    import pickle

    check_init_state(suite, task_id, init_state_id)
    task = _placement(task_specs(suite)[task_id].name, int(init_state_id), placement_seed)
    return np.array(pickle.loads(task.data)["rand_vec"], dtype=np.float64)


def to_native_actions(actions: np.ndarray, spec: TaskSpec) -> np.ndarray:
    """float [..., 7] policy actions -> float64 [..., 4] MetaWorld actions (xyz, the task's gripper level)."""
    actions = np.asarray(actions, dtype=np.float64)
    gripper = np.where(actions[..., 6] > 0, spec.close_level, spec.open_level)
    return np.concatenate([actions[..., :3], gripper[..., None]], axis=-1)


def from_native_actions(actions: np.ndarray, spec: TaskSpec) -> np.ndarray:
    """float [..., 4] MetaWorld actions -> float64 [..., 7] policy actions (gripper +1 at or above the middle
    of the task's open and close levels, else -1; rotation 0). Inverse of ``to_native_actions`` on the levels."""
    actions = np.asarray(actions, dtype=np.float64)
    out = np.zeros(actions.shape[:-1] + (ACTION_DIM,))
    out[..., :3] = actions[..., :3]
    middle = 0.5 * (spec.open_level + spec.close_level)
    out[..., 6] = np.where(actions[..., 3] >= middle, 1.0, -1.0)
    return out


# ----- environment -----

class MetaWorldEnv(ChunkEnv):
    """A MetaWorld suite's tasks, one episode at a time, with LiberoEnv's interface (module docstring).

    Keywords as LiberoEnv: ``camera`` (render images, default False: state only),
    ``image_size``, ``render_size``, ``center_crop`` (1.0: the whole frame),
    ``privileged_state`` (39-dim state, default True; False: 4-dim), ``max_steps``
    (policy steps per episode, default MetaWorld's 500), ``num_steps_wait``
    (no-op steps after reset, open gripper, not counted; default 0: MetaWorld's
    reset already settles the hand). Own: ``placement_seed`` (the MT1 seed of
    the 50 placements per task), ``camera_name`` (a MetaWorld camera).
    """

    ACTION_DIMS = (ACTION_DIM, NATIVE_ACTION_DIM)

    def __init__(self, suite: str = "metaworld", *, camera: bool = False, image_size: int = 224,
                 render_size: int = 256, center_crop: float = 1.0, privileged_state: bool = True,
                 max_steps: int = MAX_STEPS, num_steps_wait: int = 0, placement_seed: int = 0,
                 camera_name: str = CAMERA):
        _check_suite(suite)
        if not isinstance(placement_seed, (int, np.integer)) or placement_seed < 0:
            raise ValueError(f"placement_seed must be a non-negative integer, got {placement_seed!r}")
        super().__init__(suite, camera=camera, image_size=image_size, render_size=render_size,
                         center_crop=center_crop, privileged_state=privileged_state, max_steps=max_steps,
                         num_steps_wait=num_steps_wait)
        self.placement_seed = int(placement_seed)
        self.camera_name = camera_name
        self._sims: dict[int, object] = {}  # task_id -> its MetaWorld env, built on first use
        self._sim = None  # the current task's
        self._spec: TaskSpec | None = None
        self._raw_obs: np.ndarray | None = None  # float64 [39], after the last executed step
        self._fingers: list[float] = []  # finger opening after each step of the current chunk
        self._shaped_reward = 0.0  # MetaWorld's dense reward of the last step
        self._atexit = False

    @property
    def state_dim(self) -> int:
        return STATE_DIM if self.privileged_state else PROPRIO_DIM

    @property
    def raw_observation(self) -> np.ndarray:
        """float64 [39]: MetaWorld's full observation after the last step (what the scripted policies read)."""
        if self._raw_obs is None:
            raise RuntimeError("no observation yet; call reset() first")
        return self._raw_obs.copy()

    @property
    def task_spec(self) -> TaskSpec:
        if self._spec is None:
            raise RuntimeError("no task yet; call reset() first")
        return self._spec

    def reset(self, *, task_id: int, init_state_id: int, seed: int | None = None) -> tuple[dict, dict]:
        """Start an episode of ``task_id`` from placement ``init_state_id``; (obs, info).

        ``seed`` is accepted for LiberoEnv compatibility and ignored: the
        placement fixes the episode, and MetaWorld's steps draw no random numbers.
        """
        check_init_state(self.suite, task_id, init_state_id)
        spec = task_specs(self.suite)[task_id]
        benchmark = _benchmark(spec.name, self.placement_seed)
        sim = self._sims.get(int(task_id))
        if sim is None:
            sim = self._build(benchmark, spec.name)
            self._sims[int(task_id)] = sim
        sim.set_task(_placement(spec.name, int(init_state_id), self.placement_seed))
        raw, _ = sim.reset()
        self._sim, self._spec = sim, spec
        self.task_id = int(task_id)
        noop = np.array([0.0, 0.0, 0.0, spec.open_level])
        for _ in range(self.num_steps_wait):
            raw = sim.step(noop)[0]
        self._raw_obs = np.asarray(raw, dtype=np.float64)
        self._start_episode(init_state_id)
        info = self._info(False, 0)
        info.update(gripper_closed=np.zeros(0, dtype=bool), finger_opening=np.zeros(0, dtype=np.float32))
        return self._observe(), info

    def step_chunk(self, actions: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        """Execute actions float [L, 7] (or MetaWorld's [L, 4]) in order, stopping at success or max_steps.

        Returns (obs, reward, terminated, truncated, info) for the last executed
        step; ``info["chunk_steps"]`` is the number of steps executed (<= L),
        ``info["gripper_closed"]`` bool [chunk_steps] and ``info["finger_opening"]``
        float32 [chunk_steps] the fingers after each of them, ``info["shaped_reward"]``
        MetaWorld's dense reward (0-10) of the last step.
        """
        self._fingers = []
        obs, reward, terminated, truncated, info = super().step_chunk(actions)
        fingers = np.array(self._fingers, dtype=np.float32)
        info.update(gripper_closed=fingers < FINGERS_CLOSED_BELOW, finger_opening=fingers,
                    shaped_reward=float(self._shaped_reward))
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        """Free every simulator (and renderer) this env built; a later reset builds them again."""
        for sim in self._sims.values():
            sim.close()
        if self._atexit:
            atexit.unregister(self.close)
            self._atexit = False
        self._sims = {}
        self._sim = None
        self.task_id = None
        self._episode_over = True

    def _build(self, benchmark, name: str):
        cls = benchmark.train_classes[name]
        kwargs = {}
        if self.camera:
            _import_metaworld(renders=True)
            kwargs = dict(render_mode="rgb_array", camera_name=self.camera_name, width=self.render_size,
                          height=self.render_size)
        sim = cls(**kwargs)
        sim.max_path_length = _NO_PATH_LIMIT
        return sim

    def _execute_one(self, action: np.ndarray) -> bool:
        native = to_native_actions(action, self._spec) if len(action) == ACTION_DIM else action
        raw, self._shaped_reward, _, _, info = self._sim.step(native)
        self._raw_obs = np.asarray(raw, dtype=np.float64)
        self._fingers.append(float(raw[FINGER_OBS]))
        return bool(info["success"])

    def _observe(self) -> dict:
        raw = self._raw_obs
        state = raw if self.privileged_state else raw[:PROPRIO_DIM]
        obs = {"state": state.astype(np.float32), "language": self._spec.language}
        if self.camera:
            obs["image"] = process_image(self._sim.render(), self.image_size, self.center_crop)
            if not self._atexit:
                # Registered after the first render, which registers mujoco's eglTerminate: exit handlers run
                # last-registered first, so the GL contexts are freed while EGL is still up.
                atexit.register(self.close)
                self._atexit = True
        return obs


# ----- scripted expert -----

class ScriptedExpert:
    """MetaWorld's scripted policy of a task (``metaworld.policies``), in the 7-dim action convention.

    ``act(raw_obs)`` takes MetaWorld's 39-dim observation (``MetaWorldEnv.raw_observation``)
    and returns float64 [7]: xyz (plus Gaussian ``action_noise`` if set, clipped
    to [-1, 1]), rotation 0, gripper ±1 (from the policy's level, ``from_native_actions``).
    """

    def __init__(self, suite: str, task_id: int, action_noise: float = 0.0, rng: np.random.Generator | None = None):
        self.spec = _check_task(suite, task_id)
        if action_noise < 0:
            raise ValueError(f"action_noise must be >= 0, got {action_noise}")
        _import_metaworld()
        from metaworld.policies import ENV_POLICY_MAP
        self._policy = ENV_POLICY_MAP[self.spec.name]()
        self.action_noise = action_noise
        self.rng = rng if rng is not None else np.random.default_rng()

    def clean_act(self, raw_obs: np.ndarray) -> np.ndarray:
        """float64 [7]: the scripted policy's noise-free action."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Constant(s) may be too high": MetaWorld clips the action itself
            native = np.asarray(self._policy.get_action(np.asarray(raw_obs, dtype=np.float64)), dtype=np.float64)
        return from_native_actions(native, self.spec)

    def act(self, raw_obs: np.ndarray) -> np.ndarray:
        """float64 [7]: ``clean_act`` plus the xyz noise."""
        return self.add_noise(self.clean_act(raw_obs))

    def add_noise(self, clean: np.ndarray) -> np.ndarray:
        """A copy of the action float [7] with Gaussian ``action_noise`` on xyz, clipped to [-1, 1]."""
        action = np.array(clean, dtype=np.float64)
        if self.action_noise > 0:
            action[:3] = np.clip(action[:3] + self.action_noise * self.rng.standard_normal(3), -1.0, 1.0)
        return action


class ScriptedEpisode(NamedTuple):
    actions: np.ndarray  # float64 [steps, 7] executed policy actions
    gripper_closed: np.ndarray  # bool [steps] fingers closed after each step
    success: bool


def run_scripted_episode(env: MetaWorldEnv, task_id: int, init_state_id: int, *, action_noise: float = 0.0,
                         rng: np.random.Generator | None = None) -> ScriptedEpisode:
    """One episode of the scripted expert (it acts on the observation after every step, so one step per call)."""
    expert = ScriptedExpert(env.suite, task_id, action_noise, rng)
    env.reset(task_id=task_id, init_state_id=init_state_id)
    actions, closed = [], []
    terminated = truncated = False
    while not (terminated or truncated):
        action = expert.act(env.raw_observation)
        _, _, terminated, truncated, info = env.step_chunk(action[None])
        actions.append(action)
        closed.extend(info["gripper_closed"])
    return ScriptedEpisode(np.array(actions), np.array(closed, dtype=bool), bool(terminated))
