"""A scripted pick-and-place expert for the LIBERO-Object tasks, from privileged simulator state.

After the reset's no-op steps (objects settle, the basket drops) the expert
plans once from the simulator: the target object's collision boxes give the
grasp height and the closing width along each candidate yaw; the neighbours'
boxes give the hand's clearance along its vertical descent, so the grasp yaw
(and a shift of up to 2 cm along the finger pads) is chosen collision-free.
It then runs closed-loop phases (``PHASES``): approach at a safe height,
capped descent, close, lift, carry over the basket's contain region, lower
until the object stalls on the basket, release, retreat.

Actions are env-space float [7] (OSC_POSE deltas in [-1, 1]; 1.0 = 5 cm or
0.5 rad, world-frame axis-angle; gripper -1 open / +1 close), as
``pcm_train.envs.LiberoEnv.step`` takes them. Optional noise: i.i.d.
Gaussian ``action_noise`` on dims 0-5 (clipped to [-1, 1]; the gripper stays
clean) and Gaussian ``grasp_noise`` (metres, x and y) on the planned grasp point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pcm_train.envs.libero import ACTION_DIM, LiberoEnv

from .episode import Episode, EpisodeRecorder

PHASES = ("approach", "descend", "close", "lift", "carry", "lower", "release", "retreat", "done")

POSITION_SCALE = 0.05  # metres per unit of action dims 0-2
ROTATION_SCALE = 0.5  # radians per unit of action dims 3-5
SAFE_Z = 0.22  # eef height at which the hand clears every object (tallest ≈ 0.15 m)
FINGERTIP_BELOW_EEF = 0.012  # fingertips sit this far below the eef site
HAND_BOTTOM_ABOVE_EEF = 0.046  # the palm (20 cm wide along the closing axis) starts this far above the eef
MIN_GRASP_Z = 0.011  # lowest eef height for a grasp (flat boxes), the table being at z = 0
GRASP_DEPTH = 0.045  # fingertips reach this far below the object's top
MAX_GRASP_WIDTH = 0.07  # widest object extent the open fingers (≈ 7.7 cm) close around
FINGER_HALF_SIZE = (0.05, 0.015)  # open fingers' footprint half sizes (along, across the closing axis)
PALM_HALF_SIZE = (0.105, 0.035)  # palm footprint half sizes (along, across the closing axis)
YAW_CANDIDATES = np.deg2rad(np.arange(-90.0, 90.0, 7.5))
SHIFT_CANDIDATES = (0.0, -0.01, 0.01, -0.02, 0.02)  # grasp shift along the finger pads (metres)
SHIFT_MARGIN = 0.02  # a shifted grasp keeps this much of the object beyond its centre line
ENOUGH_CLEARANCE = 0.03  # more clearance than this scores no better
BASKET_CLEARANCE = 0.03  # carried object's bottom clears the basket rim by this much
PLACE_BOTTOM_Z = 0.02  # lowering aims the object's bottom at this height (basket floor ≈ 0.01)
POSITION_GAIN = 2.5  # action per POSITION_SCALE of position error
DESCENT_CAP = 0.4  # max |z action| in the last NEAR_GOAL_Z of a descent (full speed drifts sideways)
NEAR_GOAL_Z = 0.06
POSITION_TOLERANCE = 0.008
ROTATION_TOLERANCE = 0.05  # radians
GRIPPER_STEPS = 8  # steps to close or open the fingers fully
STALL_WINDOW = 3  # steps over which a descent of less than STALL_DISTANCE counts as stalled
STALL_DISTANCE = 0.002
PHASE_TIMEOUT = 80  # steps after which a phase gives up and the next one starts


@dataclass(frozen=True)
class GraspPlan:
    """Where and how to grasp the target and where to put it (world frame, metres / radians)."""

    grasp_pos: np.ndarray  # float64 [3]: eef position when closing the fingers
    yaw: float  # hand yaw; fingers close along Rz(yaw) · y
    clearance: float  # hand's clearance from the neighbours along the descent (negative: overlap)
    carry_z: float  # eef height while lifting, carrying and retreating
    place_center: np.ndarray  # float64 [2]: xy of the basket's contain region
    eef_above_bottom: float  # eef height above the target's bottom at the grasp


class ObjectExpert:
    """Scripted expert for one LiberoEnv episode at a time; ``reset(obs)`` after ``env.reset``, then ``act(obs)``."""

    def __init__(self, env: LiberoEnv, *, action_noise: float = 0.0, grasp_noise: float = 0.0,
                 rng: np.random.Generator | None = None):
        if env.suite != "libero_object":
            raise ValueError(f"the object expert only knows libero_object tasks, got suite {env.suite!r}")
        if not action_noise >= 0.0 or not grasp_noise >= 0.0:
            raise ValueError(f"noise must be >= 0, got action_noise={action_noise!r}, grasp_noise={grasp_noise!r}")
        self.env = env
        self.action_noise = float(action_noise)
        self.grasp_noise = float(grasp_noise)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.plan: GraspPlan | None = None
        self.phase = "done"
        self.last_clean_action = np.zeros(ACTION_DIM)

    @property
    def done(self) -> bool:
        """The script has run to its end (retreated after releasing)."""
        return self.phase == "done"

    def reset(self, obs: dict) -> GraspPlan:
        """Plan the episode from the simulator right after ``env.reset`` (obs: its first observation)."""
        scene = _Scene(self.env)
        self.plan = _plan_grasp(scene)
        if self.grasp_noise > 0.0:
            grasp_pos = self.plan.grasp_pos.copy()
            grasp_pos[:2] += self.rng.normal(0.0, self.grasp_noise, 2)
            self.plan = replace(self.plan, grasp_pos=grasp_pos)
        self._scene = scene
        self._start_phase("approach", obs)
        return self.plan

    def act(self, obs: dict) -> np.ndarray:
        """float64 [7]: the executed action for observation ``obs``; ``last_clean_action`` holds its noise-free form."""
        if self.plan is None:
            raise RuntimeError("call reset(obs) after env.reset before act(obs)")
        clean = self._clean_action(obs)
        self.last_clean_action = clean
        self._phase_steps += 1
        if self.action_noise == 0.0:
            return clean.copy()
        noisy = clean.copy()
        noisy[:6] = np.clip(clean[:6] + self.rng.normal(0.0, self.action_noise, 6), -1.0, 1.0)
        return noisy

    # ----- phases -----

    def _start_phase(self, phase: str, obs: dict) -> None:
        self.phase = phase
        self._phase_steps = 0
        self._heights: list[float] = []
        eef = obs["state"][:3].astype(np.float64)
        if phase == "carry":  # aim the object (not the hand) at the contain region's centre
            offset = self._scene.target_position()[:2] - eef[:2]
            self._place_xy = self.plan.place_center - offset
        self._start_eef = eef  # float64 [3]: where the phase began

    def _clean_action(self, obs: dict) -> np.ndarray:
        """Advance the phase machine as far as ``obs`` allows and return that phase's action."""
        while True:
            action, finished = self._phase_action(obs)
            if self.done or not finished and self._phase_steps < PHASE_TIMEOUT:
                return action
            self._start_phase(PHASES[PHASES.index(self.phase) + 1], obs)

    def _phase_action(self, obs: dict) -> tuple[np.ndarray, bool]:
        """(action float64 [7], whether the phase is finished) for the current phase."""
        plan, state = self.plan, obs["state"].astype(np.float64)
        eef, rotation = state[:3], _rotation_from_axis_angle(state[3:6])
        phase, start = self.phase, self._start_eef
        if phase == "approach":
            goal = np.array([*plan.grasp_pos[:2], max(SAFE_Z, plan.grasp_pos[2])])
            action, error = self._servo(eef, rotation, goal, gripper=-1.0)
            return action, np.linalg.norm(error[:2]) < POSITION_TOLERANCE and self._rotation_error < ROTATION_TOLERANCE
        if phase == "descend":
            action, error = self._servo(eef, rotation, plan.grasp_pos, gripper=-1.0, z_cap=DESCENT_CAP)
            return action, abs(error[2]) < POSITION_TOLERANCE / 2 or self._stalled(eef[2])
        if phase == "close":
            action, _ = self._servo(eef, rotation, start, gripper=1.0)
            return action, self._phase_steps >= GRIPPER_STEPS
        if phase == "lift":
            action, error = self._servo(eef, rotation, np.array([*start[:2], plan.carry_z]), gripper=1.0)
            return action, abs(error[2]) < 2 * POSITION_TOLERANCE
        if phase == "carry":
            action, error = self._servo(eef, rotation, np.array([*self._place_xy, plan.carry_z]), gripper=1.0)
            return action, np.linalg.norm(error) < POSITION_TOLERANCE
        if phase == "lower":
            goal = np.array([*self._place_xy, PLACE_BOTTOM_Z + plan.eef_above_bottom])
            action, error = self._servo(eef, rotation, goal, gripper=1.0, z_cap=DESCENT_CAP)
            return action, abs(error[2]) < POSITION_TOLERANCE / 2 or self._stalled(eef[2])
        if phase == "release":
            action, _ = self._servo(eef, rotation, start, gripper=-1.0)
            return action, self._phase_steps >= GRIPPER_STEPS
        if phase == "retreat":
            action, error = self._servo(eef, rotation, np.array([*start[:2], plan.carry_z]), gripper=-1.0)
            return action, abs(error[2]) < 2 * POSITION_TOLERANCE
        return np.array([0, 0, 0, 0, 0, 0, -1.0]), False  # done: stay still, fingers open

    def _servo(self, eef: np.ndarray, rotation: np.ndarray, goal: np.ndarray, *, gripper: float,
               z_cap: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Proportional step toward ``goal`` [3] at the planned hand orientation; (action [7], position error [3])."""
        error = goal - eef
        translation = POSITION_GAIN * error / POSITION_SCALE
        if abs(error[2]) < NEAR_GOAL_Z:
            translation[2] = np.clip(translation[2], -z_cap, z_cap)
        largest = np.abs(translation).max()
        if largest > 1.0:  # keep the direction when saturating
            translation /= largest
        rotation_error = _axis_angle_from_rotation(_hand_rotation(self.plan.yaw) @ rotation.T)
        self._rotation_error = float(np.linalg.norm(rotation_error))
        turn = np.clip(rotation_error / ROTATION_SCALE, -1.0, 1.0)
        return np.concatenate([translation, turn, [gripper]]), error

    def _stalled(self, height: float) -> bool:
        """Whether the eef dropped less than STALL_DISTANCE over the last STALL_WINDOW steps."""
        self._heights.append(height)
        return len(self._heights) > STALL_WINDOW and self._heights[-STALL_WINDOW - 1] - height < STALL_DISTANCE


# ----- planning -----

class _Scene:
    """The task's objects as world-frame point samples of their collision boxes, read from the simulator."""

    def __init__(self, env: LiberoEnv):
        control_env = env._env  # LiberoEnv exposes no simulator handle; the expert needs privileged geometry
        self._robosuite = control_env.env
        self._sim = self._robosuite.sim
        self.target = control_env.obj_of_interest[0]
        self.neighbours = [name for name in self._robosuite.objects_dict if name != self.target]
        self.basket = next(name for name in control_env.obj_of_interest[1:] if name.startswith("basket"))
        self.contain_center = np.array(self._sim.data.get_site_xpos(f"{self.basket}_contain_region"), dtype=float)

    def points(self, name: str) -> np.ndarray:
        """float64 [N, 3]: a 3×3×3 lattice over each collision geom's bounding box of object ``name``."""
        model, data = self._sim.model, self._sim.data
        root = model.body_name2id(self._robosuite.objects_dict[name].root_body)
        geoms = [g for g in range(model.ngeom)
                 if model.body_rootid[model.geom_bodyid[g]] == root and model.geom_contype[g] != 0]
        lattice = np.stack(np.meshgrid(*[[-1.0, 0.0, 1.0]] * 3, indexing="ij"), -1).reshape(-1, 3)
        clouds = []
        for g in geoms:
            center, half = model.geom_aabb[g, :3], model.geom_aabb[g, 3:]
            local = center + lattice * half
            clouds.append(local @ data.geom_xmat[g].reshape(3, 3).T + data.geom_xpos[g])
        return np.concatenate(clouds)

    def target_position(self) -> np.ndarray:
        """float64 [3]: the target body's world position now."""
        body = self._sim.model.body_name2id(self._robosuite.objects_dict[self.target].root_body)
        return np.array(self._sim.data.body_xpos[body], dtype=float)


def _plan_grasp(scene: _Scene) -> GraspPlan:
    """Choose the grasp (yaw, point, height) with the most clearance, and the carry height."""
    target = scene.points(scene.target)
    bottom, top = target[:, 2].min(), target[:, 2].max()
    fingertip_z = max(bottom, top - GRASP_DEPTH)
    grasp_z = max(MIN_GRASP_Z, fingertip_z + FINGERTIP_BELOW_EEF)
    obstacles = np.concatenate([scene.points(name) for name in scene.neighbours])
    obstacles = obstacles[obstacles[:, 2] > grasp_z - FINGERTIP_BELOW_EEF]  # lower points are never reached
    best = None
    for yaw in YAW_CANDIDATES:
        closing = np.array([-math.sin(yaw), math.cos(yaw)])
        across = np.array([closing[1], -closing[0]])
        along_closing, along_pads = target[:, :2] @ closing, target[:, :2] @ across
        width = np.ptp(along_closing)
        max_shift = max(0.0, np.ptp(along_pads) / 2 - SHIFT_MARGIN)
        for shift in SHIFT_CANDIDATES:
            if abs(shift) > max_shift + 1e-9:
                continue
            center = (closing * (along_closing.max() + along_closing.min()) / 2
                      + across * ((along_pads.max() + along_pads.min()) / 2 + shift))
            clearance = _hand_clearance(obstacles, center, closing, across, grasp_z)
            feasible = width <= MAX_GRASP_WIDTH
            score = (feasible, min(clearance, ENOUGH_CLEARANCE) - 2.0 * width - 0.5 * abs(shift))
            if best is None or score > best[0]:
                best = (score, yaw, center, clearance)
    _, yaw, center, clearance = best
    eef_above_bottom = grasp_z - bottom
    basket_top = scene.points(scene.basket)[:, 2].max()
    carry_z = max(SAFE_Z, basket_top + BASKET_CLEARANCE + eef_above_bottom)
    return GraspPlan(grasp_pos=np.array([*center, grasp_z]), yaw=float(yaw), clearance=float(clearance),
                     carry_z=float(carry_z), place_center=scene.contain_center[:2].copy(),
                     eef_above_bottom=float(eef_above_bottom))


def _hand_clearance(obstacles: np.ndarray, center: np.ndarray, closing: np.ndarray, across: np.ndarray,
                    grasp_z: float) -> float:
    """Smallest distance (negative: overlap) from obstacle points [N, 3] to the hand's footprint over its descent."""
    if len(obstacles) == 0:
        return math.inf
    offsets = obstacles[:, :2] - center
    along, side = np.abs(offsets @ closing), np.abs(offsets @ across)
    at_palm = obstacles[:, 2] > grasp_z + HAND_BOTTOM_ABOVE_EEF
    half_along = np.where(at_palm, PALM_HALF_SIZE[0], FINGER_HALF_SIZE[0])
    half_side = np.where(at_palm, PALM_HALF_SIZE[1], FINGER_HALF_SIZE[1])
    return float(np.max([along - half_along, side - half_side], axis=0).min())


# ----- episodes -----

def run_episode(env: LiberoEnv, task_id: int, init_state_id: int, expert_kwargs: dict | None = None,
                max_steps: int = 512, record_images: bool = False) -> Episode:
    """Reset ``env`` to (task, initial state) and let an ObjectExpert act until success, max_steps or its end."""
    recorder = EpisodeRecorder(env, record_images)
    expert = ObjectExpert(env, **(expert_kwargs or {}))
    obs, _ = env.reset(task_id=task_id, init_state_id=init_state_id)
    expert.reset(obs)
    for _ in range(max_steps):
        action = expert.act(obs).astype(np.float32)  # executed as stored, so stored actions replay exactly
        if expert.done:
            break
        obs, over = recorder.step(obs, action, expert.last_clean_action, PHASES.index(expert.phase))
        if over:
            break
    return recorder.finish(task_id, init_state_id, obs["language"])


# ----- rotations -----

def _hand_rotation(yaw: float) -> np.ndarray:
    """float64 [3, 3]: gripper pointing down, fingers closing along Rz(yaw) · y: Rz(yaw) · diag(1, -1, -1)."""
    cos, sin = math.cos(yaw), math.sin(yaw)
    return np.array([[cos, sin, 0.0], [sin, -cos, 0.0], [0.0, 0.0, -1.0]])


def _rotation_from_axis_angle(vector: np.ndarray) -> np.ndarray:
    """Rodrigues: rotation vector [3] (axis × angle) -> rotation matrix [3, 3]."""
    angle = float(np.linalg.norm(vector))
    if angle < 1e-12:
        return np.eye(3)
    x, y, z = vector / angle
    skew = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle) * skew + (1.0 - math.cos(angle)) * skew @ skew


def _axis_angle_from_rotation(matrix: np.ndarray) -> np.ndarray:
    """Rotation matrix [3, 3] (angle below π) -> rotation vector [3]."""
    skew_part = np.array([matrix[2, 1] - matrix[1, 2], matrix[0, 2] - matrix[2, 0], matrix[1, 0] - matrix[0, 1]]) / 2
    sine = float(np.linalg.norm(skew_part))
    angle = math.atan2(sine, (np.trace(matrix) - 1.0) / 2)
    return skew_part * (angle / sine) if sine > 1e-12 else np.zeros(3)

