"""ChunkEnv, the episode loop both env families share, on a simulator-free counter env."""
import numpy as np
import pytest

from pcm_train.envs.base import ChunkEnv


class CounterEnv(ChunkEnv):
    """Succeeds once the gripper dimension has been positive ``needed`` times."""

    ACTION_DIMS = (7, 4)

    def __init__(self, needed=3, **options):
        defaults = dict(camera=False, image_size=8, render_size=8, center_crop=1.0, privileged_state=False,
                        max_steps=5, num_steps_wait=0)
        super().__init__("counter", **{**defaults, **options})
        self.needed = needed
        self.executed = []

    def reset(self, *, task_id, init_state_id):
        self.task_id = task_id
        self.executed = []
        self._start_episode(init_state_id)
        return self._observe(), self._info(False, 0)

    def _execute_one(self, action):
        self.executed.append(action.copy())
        return sum(a[-1] > 0 for a in self.executed) >= self.needed

    def _observe(self):
        return {"state": np.array([len(self.executed)], dtype=np.float32)}


def close(n, dim=7):
    return np.ones((n, dim))


def test_chunk_stops_at_success_and_reports_the_steps_it_ran():
    env = CounterEnv(needed=3)
    env.reset(task_id=1, init_state_id=2)
    obs, reward, terminated, truncated, info = env.step_chunk(close(8))
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info == {"success": True, "task_id": 1, "init_state_id": 2, "elapsed_steps": 3, "chunk_steps": 3}
    assert len(env.executed) == 3 and obs["state"][0] == 3
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(np.ones(7))


def test_chunks_truncate_at_max_steps_across_calls():
    env = CounterEnv(needed=99, max_steps=5)
    env.reset(task_id=0, init_state_id=0)
    _, reward, terminated, truncated, info = env.step_chunk(close(3))
    assert (reward, terminated, truncated, info["chunk_steps"]) == (0.0, False, False, 3)
    _, reward, terminated, truncated, info = env.step_chunk(close(3))
    assert (reward, terminated, truncated, info["chunk_steps"], info["elapsed_steps"]) == (0.0, False, True, 2, 5)
    env.reset(task_id=0, init_state_id=1)  # a reset starts a fresh count
    assert env.step(np.ones(4))[4]["elapsed_steps"] == 1


@pytest.mark.parametrize("actions, message", [
    (np.ones((2, 5)), r"actions must have shape \(L >= 1, 7\) or \(L >= 1, 4\), got \(2, 5\)"),
    (np.ones((0, 7)), r"actions must have shape"),
    (np.ones(7), r"actions must have shape"),
    (np.array([[0, 0, 0, np.nan]]), "actions must be finite"),
])
def test_bad_chunks_are_refused_before_anything_runs(actions, message):
    env = CounterEnv()
    env.reset(task_id=0, init_state_id=0)
    with pytest.raises(ValueError, match=message):
        env.step_chunk(actions)
    assert env.executed == [] and env.elapsed_steps == 0


def test_bad_single_action_and_options_name_the_argument():
    env = CounterEnv()
    env.reset(task_id=0, init_state_id=0)
    with pytest.raises(ValueError, match=r"action must have shape \(7,\) or \(4,\), got \(2, 7\)"):
        env.step(np.ones((2, 7)))
    with pytest.raises(RuntimeError, match="call reset"):
        CounterEnv().step_chunk(close(1))
    with pytest.raises(ValueError, match="max_steps must be a positive integer"):
        CounterEnv(max_steps=0)
    with pytest.raises(ValueError, match=r"center_crop must be in \(0, 1\]"):
        CounterEnv(center_crop=1.5)
