"""MetaWorld v3 as a second env family (``pcm_train.envs.metaworld``).

About 6-15 s on 2 busy CPU cores (most of it building MT1's placements, ~1 s per task, once per process).
"""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

# Not importorskip: that would import mujoco before the env decides MUJOCO_GL.
if importlib.util.find_spec("metaworld") is None:
    pytest.skip("MetaWorld is installed by the project's setup (train extra)", allow_module_level=True)

import pcm_kernels as pk  # noqa: E402
from pcm_train.envs.metaworld import (ACTION_DIM, MAX_STEPS, NUM_INIT_STATES, PROPRIO_DIM,  # noqa: E402
                                      STATE_DIM, MetaWorldEnv, ScriptedExpert, check_init_state,
                                      from_native_actions, initial_state, list_tasks, num_init_states,
                                      run_scripted_episode, task_specs, to_native_actions)

SUITE = "metaworld"
TASK_NAMES = ["pick-place-v3", "pick-out-of-hole-v3", "basketball-v3", "assembly-v3"]
CHUNK = 8  # the policies' action chunk


@pytest.fixture(scope="module")
def env():
    env = MetaWorldEnv(SUITE)
    yield env
    env.close()


def wiggle(steps, seed=0):
    """float64 [steps, 7]: random arm motion with the gripper closing half-way (a fixed action sequence)."""
    rng = np.random.default_rng(seed)
    actions = rng.uniform(-1, 1, (steps, ACTION_DIM))
    actions[:, 6] = np.where(np.arange(steps) < steps // 2, -1.0, 1.0)
    return actions


def run_actions(env, task_id, init_state_id, actions):
    """(initial obs, final obs, infos) of an episode driven by ``actions`` in chunks of CHUNK."""
    first, _ = env.reset(task_id=task_id, init_state_id=init_state_id)
    infos, obs = [], first
    for start in range(0, len(actions), CHUNK):
        obs, reward, terminated, truncated, info = env.step_chunk(actions[start:start + CHUNK])
        infos.append((reward, terminated, truncated, info["chunk_steps"], info["gripper_closed"].tolist(),
                      info["finger_opening"].tolist()))
        if terminated or truncated:
            break
    return first, obs, infos


def chunk_labels(gripper_signal):
    """int8 [C] phase labels of one episode's per-step gripper signal (+1 closed, -1 open), L = CHUNK."""
    steps = len(gripper_signal)
    chunks = -(-steps // CHUNK)
    gripper = torch.full((1, chunks * CHUNK), -1.0)
    gripper[0, :steps] = torch.as_tensor(np.asarray(gripper_signal, dtype=np.float32))
    return pk.label_phases(gripper.view(1, chunks, CHUNK), torch.tensor([steps]), close_above=0.0)[0].tolist()


def count_grip_runs(labels):
    """Number of unbroken runs of active-grip chunks."""
    grip = [label == pk.Phase.ACTIVE_GRIP for label in labels]
    return sum(1 for i, g in enumerate(grip) if g and (i == 0 or not grip[i - 1]))


def assert_one_grasp(labels, what):
    """approach / pre-grasp chunks, then one unbroken run of active-grip chunks, then release / tail (if any)."""
    grip = [label == pk.Phase.ACTIVE_GRIP for label in labels]
    runs = count_grip_runs(labels)
    assert runs == 1, f"{what}: {runs} grasp intervals in {labels}"
    first, last = grip.index(True), len(grip) - 1 - grip[::-1].index(True)
    assert all(label in (pk.Phase.APPROACH, pk.Phase.PRE_GRASP) for label in labels[:first]), (what, labels)
    assert all(label in (pk.Phase.RELEASE_RAMP, pk.Phase.TAIL) for label in labels[last + 1:]), (what, labels)
    assert labels[0] == pk.Phase.APPROACH, (what, labels)


# ----- tasks and prompts -----

def test_tasks_and_placements():
    assert [task.name for task in list_tasks(SUITE)] == TASK_NAMES
    assert [task.task_id for task in list_tasks(SUITE)] == [0, 1, 2, 3]
    assert all(task.language and task.language == task.language.strip() for task in list_tasks(SUITE))
    assert num_init_states(SUITE, 3) == NUM_INIT_STATES == 50
    for bad in [(4, 0), (-1, 0), (0, 100), (0, -1), (0, 1.0)]:
        with pytest.raises(ValueError):
            check_init_state(SUITE, *bad)
    with pytest.raises(ValueError, match="suite"):
        list_tasks("libero_object")
    vectors = np.stack([initial_state(SUITE, 0, k) for k in range(NUM_INIT_STATES)])
    assert len(np.unique(vectors, axis=0)) == NUM_INIT_STATES  # 50 distinct placements
    np.testing.assert_array_equal(initial_state(SUITE, 0, 7), vectors[7])


def test_held_out_placements_are_never_training_placements(env):
    from pcm_train.envs.families import held_out_init_states

    assert held_out_init_states(SUITE, 2) == range(50, 100) and held_out_init_states("libero_object", 2) == range(0)
    check_init_state(SUITE, 3, 99)
    for task in range(4):
        training = np.stack([initial_state(SUITE, task, k) for k in range(NUM_INIT_STATES)])
        held_out = np.stack([initial_state(SUITE, task, k) for k in held_out_init_states(SUITE, task)])
        assert len(np.unique(held_out, axis=0)) == 50  # 50 distinct held-out placements
        # none is a training one: every pair differs somewhere by far more than float noise (random draws;
        # a task with few randomized coordinates can come within ~1 mm)
        assert np.abs(training[:, None] - held_out[None]).max(-1).min() > 1e-5
    obs, _ = env.reset(task_id=1, init_state_id=63)
    again, _ = env.reset(task_id=1, init_state_id=63)
    np.testing.assert_array_equal(obs["state"], again["state"])
    np.testing.assert_allclose(obs["state"][-3:], initial_state(SUITE, 1, 63)[-3:], atol=1e-6)  # the placement's goal


def test_gripper_mapping_uses_each_tasks_levels():
    for spec in task_specs(SUITE):
        policy = np.zeros((3, ACTION_DIM))
        policy[:, :3] = 0.25
        policy[:, 6] = [-1.0, 0.0, 1.0]  # open, open (not > 0), close
        native = to_native_actions(policy, spec)
        np.testing.assert_array_equal(native[:, 3], [spec.open_level, spec.open_level, spec.close_level])
        np.testing.assert_array_equal(native[:, :3], policy[:, :3])
        back = from_native_actions(native, spec)
        np.testing.assert_array_equal(back[:, 6], [-1.0, -1.0, 1.0])
        np.testing.assert_array_equal(back[:, 3:6], 0.0)
    levels = {spec.name: (spec.open_level, spec.close_level) for spec in task_specs(SUITE)}
    assert levels == {"pick-place-v3": (0.0, 1.0), "pick-out-of-hole-v3": (0.0, 0.1),
                      "basketball-v3": (-1.0, 0.6), "assembly-v3": (0.0, 0.6)}


# ----- reset and step -----

def test_reset_observation_and_chunk_steps(env):
    obs, info = env.reset(task_id=0, init_state_id=3)
    assert set(obs) == {"state", "language"}
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (STATE_DIM,) == (env.state_dim,)
    assert obs["language"] == list_tasks(SUITE)[0].language
    assert obs["state"][3] == 1.0  # fingers wide open after reset
    np.testing.assert_allclose(obs["state"][-3:], initial_state(SUITE, 0, 3)[-3:], atol=1e-6)  # the goal is observed
    assert info["chunk_steps"] == 0 and info["elapsed_steps"] == 0
    assert (info["task_id"], info["init_state_id"]) == (0, 3)
    obs, reward, terminated, truncated, info = env.step_chunk(np.zeros((CHUNK, ACTION_DIM)))
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["chunk_steps"] == CHUNK and info["elapsed_steps"] == CHUNK
    assert info["gripper_closed"].shape == (CHUNK,) and info["gripper_closed"].dtype == bool
    assert not info["gripper_closed"].any()
    obs, *_ = env.step(np.zeros(ACTION_DIM))
    assert env.elapsed_steps == CHUNK + 1
    for bad in (np.zeros((0, ACTION_DIM)), np.zeros((2, 6)), np.full((2, ACTION_DIM), np.nan)):
        with pytest.raises(ValueError):
            env.step_chunk(bad)


@pytest.mark.parametrize("option, value, message", [
    ("image_size", 0, "image_size must be a positive integer"),
    ("render_size", 2.5, "render_size must be a positive integer"),
    ("max_steps", -1, "max_steps must be a positive integer"),
    ("num_steps_wait", -1, "num_steps_wait must be a non-negative integer"),
    ("center_crop", 0.0, "center_crop must be in"),
])
@pytest.mark.parametrize("suite", [SUITE, "libero_object"])
def test_both_families_refuse_bad_options(suite, option, value, message):
    from pcm_train.envs.families import make_env

    with pytest.raises(ValueError, match=message):
        make_env(suite, **{option: value})


def test_proprio_state_without_privileged_state():
    env = MetaWorldEnv(SUITE, privileged_state=False)
    try:
        obs, _ = env.reset(task_id=1, init_state_id=0)
        assert obs["state"].shape == (PROPRIO_DIM,) == (env.state_dim,)
        np.testing.assert_array_equal(obs["state"], env.raw_observation[:PROPRIO_DIM].astype(np.float32))
    finally:
        env.close()


def test_success_ends_the_episode_with_reward_one(env):
    expert = ScriptedExpert(SUITE, 0)
    env.reset(task_id=0, init_state_id=0)
    for _ in range(MAX_STEPS):
        obs, reward, terminated, truncated, info = env.step(expert.act(env.raw_observation))
        if terminated or truncated:
            break
    assert terminated and reward == 1.0 and not truncated and info["success"]
    assert 40 < env.elapsed_steps < 80
    with pytest.raises(RuntimeError, match="reset"):
        env.step_chunk(np.zeros((1, ACTION_DIM)))


def test_success_inside_a_chunk_stops_it_early(env):
    episode = run_scripted_episode(env, 0, 1)
    assert episode.success
    padded = np.concatenate([episode.actions, np.zeros((CHUNK, ACTION_DIM))])  # more actions than needed
    env.reset(task_id=0, init_state_id=1)
    steps = 0
    for start in range(0, len(padded), CHUNK):
        obs, reward, terminated, truncated, info = env.step_chunk(padded[start:start + CHUNK])
        steps += info["chunk_steps"]
        if terminated or truncated:
            break
    assert terminated and reward == 1.0 and steps == len(episode.actions) == env.elapsed_steps


def test_max_steps_truncates_within_a_chunk():
    env = MetaWorldEnv(SUITE, max_steps=5)
    try:
        env.reset(task_id=2, init_state_id=0)
        obs, reward, terminated, truncated, info = env.step_chunk(np.zeros((CHUNK, ACTION_DIM)))
        assert (reward, terminated, truncated, info["chunk_steps"]) == (0.0, False, True, 5)
    finally:
        env.close()


# ----- scripted expert and phase labels -----

@pytest.mark.parametrize("task_id", range(len(TASK_NAMES)))
def test_scripted_episodes_succeed_with_one_grasp_interval(env, task_id):
    """Clean scripted episodes: success, and label_phases sees one grasp from the commands and from the fingers."""
    for init_state_id in (0, 1):
        episode = run_scripted_episode(env, task_id, init_state_id)
        what = f"{TASK_NAMES[task_id]} placement {init_state_id}"
        assert episode.success, what
        assert len(episode.actions) < 200, what
        assert set(np.unique(episode.actions[:, 6])) == {-1.0, 1.0}, what
        assert_one_grasp(chunk_labels(episode.actions[:, 6]), what + " (commands)")
        assert_one_grasp(chunk_labels(np.where(episode.gripper_closed, 1.0, -1.0)), what + " (fingers)")


def test_fingers_ignore_an_aborted_close(env):
    """Basketball placement 40: the script closes for 5 steps, reopens to re-aim, then grasps. The hand never
    closed the first time, so the finger signal has one grasp; the commands' labels show two grip runs."""
    episode = run_scripted_episode(env, 2, 40)
    assert episode.success
    closes = np.flatnonzero(np.diff((episode.actions[:, 6] > 0).astype(int)) == 1)
    assert len(closes) == 2  # close, open again, close
    assert count_grip_runs(chunk_labels(episode.actions[:, 6])) == 2
    assert_one_grasp(chunk_labels(np.where(episode.gripper_closed, 1.0, -1.0)), "basketball placement 40 (fingers)")


def test_fingers_report_closing_after_the_command(env):
    episode = run_scripted_episode(env, 3, 0)
    closes = int(np.argmax(episode.actions[:, 6] > 0))
    closed = int(np.argmax(episode.gripper_closed))
    assert 0 < closes < closed < closes + 15  # the fingers follow the command after a few steps
    assert episode.gripper_closed[closed:].all()


# ----- determinism and reuse -----

def test_same_prompt_gives_the_same_episode(env):
    actions = wiggle(40, seed=1)
    first = run_actions(env, 1, 4, actions)
    second = run_actions(env, 1, 4, actions)
    np.testing.assert_array_equal(first[0]["state"], second[0]["state"])
    np.testing.assert_array_equal(first[1]["state"], second[1]["state"])
    assert first[2] == second[2]
    other, _ = env.reset(task_id=1, init_state_id=5)
    assert not np.array_equal(other["state"], first[0]["state"])  # another placement starts elsewhere


def test_reused_env_equals_a_fresh_env(env):
    actions = wiggle(48, seed=2)
    run_actions(env, 2, 9, wiggle(30, seed=3))  # leave the env in other tasks' and placements' states
    run_actions(env, 0, 2, wiggle(30, seed=4))
    reused = run_actions(env, 2, 6, actions)
    fresh_env = MetaWorldEnv(SUITE)
    try:
        fresh = run_actions(fresh_env, 2, 6, actions)
    finally:
        fresh_env.close()
    np.testing.assert_array_equal(reused[0]["state"], fresh[0]["state"])
    np.testing.assert_array_equal(reused[1]["state"], fresh[1]["state"])
    assert reused[2] == fresh[2]


_FRESH_PROCESS = """
import json, sys
import numpy as np
from pcm_train.envs.metaworld import MetaWorldEnv
rng = np.random.default_rng(1)
actions = rng.uniform(-1, 1, (16, 7))
env = MetaWorldEnv("metaworld")
first, _ = env.reset(task_id=3, init_state_id=11)
last = env.step_chunk(actions)[0]
print(json.dumps([first["state"].tolist(), last["state"].tolist()]))
"""


def test_prompt_is_reproducible_in_a_fresh_process(env):
    """What a replacement Ray worker relies on: the same (task, placement, actions) in a new interpreter."""
    out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], capture_output=True, text=True, timeout=300,
                         check=True)
    first, last = json.loads(out.stdout.strip().splitlines()[-1])
    actions = np.random.default_rng(1).uniform(-1, 1, (16, 7))
    here, _ = env.reset(task_id=3, init_state_id=11)
    np.testing.assert_array_equal(here["state"], np.array(first, dtype=np.float32))
    np.testing.assert_array_equal(env.step_chunk(actions)[0]["state"], np.array(last, dtype=np.float32))


# ----- images -----

def test_camera_observation():
    env = MetaWorldEnv(SUITE, camera=True, image_size=32, render_size=64)
    try:
        obs, _ = env.reset(task_id=0, init_state_id=0)
        assert obs["image"].shape == (32, 32, 3) and obs["image"].dtype == np.uint8
        assert obs["image"].std() > 5  # a real frame, not a blank one
        moved, *_ = env.step_chunk(np.tile([0, 0, 1.0, 0, 0, 0, -1], (CHUNK, 1)))
        assert not np.array_equal(moved["image"], obs["image"])  # the hand moved up
    finally:
        env.close()


_UNCLOSED_CAMERA_ENV = """
from pcm_train.envs.metaworld import MetaWorldEnv
env = MetaWorldEnv("metaworld", camera=True, image_size=16, render_size=32)
for task_id in (0, 1):  # two simulators, two GL contexts
    env.reset(task_id=task_id, init_state_id=0)
print("rendered")
"""


def test_camera_env_left_open_exits_cleanly():
    """An image-mode env never closed frees its GL contexts at exit before EGL is torn down: no exit errors."""
    out = subprocess.run([sys.executable, "-c", _UNCLOSED_CAMERA_ENV], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "rendered", out.stderr[-2000:]
    assert "Exception ignored" not in out.stderr and "EGLError" not in out.stderr, out.stderr[-2000:]


def test_trainer_runs_on_metaworld_through_the_worker_pool(tmp_path):
    """env.suite=metaworld behind the same Ray pool, trainer and state-mode policy (39-number state), phases
    labelled from the fingers."""
    from pcm_train.config import load_config
    from pcm_train.training.metrics_log import read_metrics
    from pcm_train.training.trainer import Trainer, make_env_pool

    cfg = load_config(["preset=metaworld", "rollout.prompts_per_step=1", "rollout.group_size=2",
                       "rollout.max_chunks=3", "pcm.budget=2", "trainer.total_steps=1", "trainer.val_every=0",
                       "env.num_workers=1", "policy.hidden_size=16", "policy.num_layers=1",
                       "pcm.gripper_signal=fingers", f"trainer.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, make_env_pool)
    try:
        assert trainer.policy.config.state_dim == 39
        assert trainer.run()
    finally:
        trainer.close()
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert 0 < row["episode_steps_mean"] <= 24 and row["actor/optimizer_steps"] == 1


def test_refilled_slots_roll_out_each_episode_as_a_fresh_env_does():
    """Continuous refill through the Ray pool: 6 seeded episodes on 2 slots (each slot takes the next episode
    when its own ends, on one worker) record the same tensors as the 6 run at once, each on its own fresh env."""
    from pcm_train.config import load_config
    from pcm_train.policies import SmallVLA, SmallVLAConfig
    from pcm_train.training.rollout import Episode, RolloutStats, collect_rollouts, episode_seed
    from pcm_train.training.trainer import make_env_pool

    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, observation="state", state_dim=STATE_DIM))
    prompts = [(0, 3), (1, 4), (0, 3), (2, 5), (3, 6), (1, 7)]
    episodes = [Episode(t, s, str(i), seed=episode_seed(0, 0, i)) for i, (t, s) in enumerate(prompts)]
    batches = {}
    for slots in (2, 6):
        cfg = load_config(["preset=metaworld", "env.num_workers=1", f"env.max_slots={slots}",
                           f"trainer.val_episodes={slots}", "rollout.prompts_per_step=1",
                           "rollout.group_size=2", "rollout.max_chunks=6"])
        pool = make_env_pool(cfg, image_size=32)
        try:
            stats = RolloutStats()
            batches[slots] = collect_rollouts(policy, pool, episodes, max_chunks=6, temperature=1.6, stats=stats)
            assert pool.num_slots == slots and stats.env_steps == int(batches[slots].batch["finish_step"].sum())
        finally:
            pool.close()
    for key in ("responses", "old_log_probs", "pixel_values", "finish_step", "complete", "gripper"):
        torch.testing.assert_close(batches[2].batch[key], batches[6].batch[key], rtol=0, atol=1e-6, msg=key)
    assert list(batches[2].non_tensor_batch["uid"]) == [str(i) for i in range(6)]


def _pipeline_policy():
    from pcm_train.policies import SmallVLA, SmallVLAConfig

    torch.manual_seed(0)
    return SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                   intermediate_size=32, observation="state", state_dim=STATE_DIM))


def test_pipelined_rollout_records_what_the_lockstep_one_does():
    """Two env workers, 8 seeded episodes on 4 slots (refills): with the workers' chunks in flight at once
    (env.pipeline_groups=2, the policy acting for one worker's episodes while the other's step) the tokens,
    observations, steps and outcomes equal the lockstep rollout's bit for bit and the log-probs to float
    rounding, greedy and sampled; a stop mid-rollout leaves the pool
    usable (the abandoned chunks finish on the workers, the next rollout is unchanged)."""
    from pcm_train.config import load_config
    from pcm_train.training.rollout import Episode, RolloutStats, StopRequested, collect_rollouts, episode_seed
    from pcm_train.training.trainer import make_env_pool

    policy = _pipeline_policy()
    prompts = [(0, 3), (1, 4), (0, 3), (2, 5), (3, 6), (1, 7), (2, 8), (3, 9)]
    episodes = [Episode(t, s, str(i), seed=episode_seed(0, 0, i)) for i, (t, s) in enumerate(prompts)]
    cfg = load_config(["preset=metaworld", "env.num_workers=2", "env.max_slots=4", "trainer.val_episodes=4",
                       "rollout.prompts_per_step=1", "rollout.group_size=2"])
    pool = make_env_pool(cfg, image_size=32)
    try:
        def rollout(pipeline, greedy=False, **kwargs):
            return collect_rollouts(policy, pool, episodes, max_chunks=6, temperature=1.6, greedy=greedy,
                                    pipeline=pipeline, **kwargs)

        for greedy in (False, True):
            lockstep, stats = rollout(1, greedy), RolloutStats()
            pipelined = rollout(2, greedy, stats=stats, policy_threads=1)
            for key in ("responses", "pixel_values", "finish_step", "complete", "gripper"):
                assert torch.equal(pipelined.batch[key], lockstep.batch[key]), key
            # the policy acts on each worker's rows apart: the log-probs of a row are summed in another blocking
            torch.testing.assert_close(pipelined.batch["old_log_probs"], lockstep.batch["old_log_probs"], rtol=0,
                                       atol=1e-5)
            assert stats.env_steps == int(lockstep.batch["finish_step"].sum()) > 0
        calls = iter(range(10**6))
        with pytest.raises(StopRequested):
            rollout(2, should_stop=lambda: next(calls) == 5)
        torch.testing.assert_close(rollout(2).batch["responses"], rollout(1).batch["responses"], rtol=0, atol=0)
    finally:
        pool.close()


def test_worker_pool_reports_the_fingers(env):
    """ChunkResult.gripper_closed through the Ray pool is the env's info["gripper_closed"], step for step (the
    signal pcm.gripper_signal=fingers labels phases from)."""
    from pcm_train.config import load_config
    from pcm_train.training.trainer import make_env_pool

    cfg = load_config(["preset=metaworld", "env.num_workers=1", "env.max_slots=1", "pcm.gripper_signal=fingers"])
    actions = wiggle(4 * CHUNK, seed=3)
    pool = make_env_pool(cfg, image_size=32)
    try:
        pool.reset([(0, 7)])
        reported = []
        for start in range(0, len(actions), CHUNK):
            busy = pool.env_busy_s
            result = pool.step_chunk(actions[None, start:start + CHUNK], np.ones(1, dtype=bool))
            assert pool.env_busy_s > busy  # the worker reports the time its env took
            assert len(result.gripper_closed[0]) == result.steps[0]
            reported.extend(result.gripper_closed[0].tolist())
            if result.done[0]:
                break
    finally:
        pool.close()
    _, _, infos = run_actions(env, 0, 7, actions)
    expected = [closed for info in infos for closed in info[4]]
    assert reported == expected and any(expected) and not all(expected)


# ----- demonstrations -----

def test_demos_of_the_scripted_policies_replay_and_label_their_grasp(tmp_path, env):
    """pcm_train.demos suite=metaworld: the stored noisy actions replay the stored episode; clean and executed
    actions differ on xyz only; the phases are the expert's gripper command (open, then closed)."""
    from pcm_train.expert import metaworld_expert
    from pcm_train.tools import demos

    config = demos.parse_args(["suite=metaworld", "per_task=1", "noise=0.2", "tasks=[0,2]", "seed=5",
                               "max_steps=500", f"out={tmp_path}"])
    entries = demos.generate(config)
    assert [entry["task_id"] for entry in entries] == [0, 2] and all(entry["success"] for entry in entries)
    for task_id in (0, 2):
        stored = demos.read_episode(tmp_path / demos.episode_file(task_id, 0))
        with np.load(tmp_path / demos.episode_file(task_id, 0)) as data:
            assert list(data["phase_names"]) == list(metaworld_expert.PHASES)
        assert stored.states.shape == (len(stored.actions), STATE_DIM) and stored.init_state_id == 0
        np.testing.assert_array_equal(stored.actions[:, 3:], stored.clean_actions[:, 3:])
        assert np.abs(stored.actions[:, :3] - np.clip(stored.clean_actions[:, :3], -1, 1)).max() > 0.1
        np.testing.assert_array_equal(stored.phases, (stored.clean_actions[:, 6] > 0).astype(np.uint8))
        assert stored.phases[0] == 0 and stored.phases[-1] == 1
        first, last, infos = run_actions(env, task_id, 0, stored.actions.astype(np.float64))
        np.testing.assert_array_equal(first["state"], stored.states[0])
        assert infos[-1][1]  # the replay succeeds on the same step
        assert sum(info[3] for info in infos) == len(stored.actions)


def test_demos_reject_grasp_noise_for_metaworld(tmp_path):
    from pcm_train.config import ConfigError
    from pcm_train.tools import demos

    with pytest.raises(ConfigError, match="grasp_noise is a LIBERO expert option"):
        demos.parse_args(["suite=metaworld", "grasp_noise=0.01", f"out={tmp_path}"])


# ----- evaluating a saved policy -----

def test_evaluate_repeats_the_trainers_validation_episode_by_episode(tmp_path):
    """A one-step MetaWorld run validates greedy and sample@1.6 on held-out and training placements before
    and after its step; ``pcm_train.evaluate runs=`` re-evaluates the policies the run kept (its start and
    step 1) on fresh env workers with another slot count and gets every record the trainer wrote, episode by
    episode; ``policy=`` prints the table and ``before=/after=`` pairs the two policies' episodes."""
    from pcm_train.config import load_config
    from pcm_train.tools import evaluate
    from pcm_train.training.metrics_log import read_metrics
    from pcm_train.training.trainer import Trainer, make_env_pool

    run = tmp_path / "runs" / "full" / "seed3"
    cfg = load_config(["preset=metaworld", "rollout.prompts_per_step=1", "rollout.group_size=2",
                       "rollout.max_chunks=3", "pcm.budget=2", "trainer.total_steps=1", "trainer.val_every=1",
                       "trainer.val_episodes=4", "trainer.val_decoders=[greedy,sample@1.6]",
                       "trainer.val_sets=[held_out,train]", "trainer.seed=3", "env.task_ids=[1,3]",
                       "env.num_workers=1", "env.max_slots=4", "policy.hidden_size=16", "policy.num_layers=1",
                       f"trainer.output_dir={run}"])
    trainer = Trainer(cfg, make_env_pool)
    try:
        assert trainer.run()
    finally:
        trainer.close()
    validation = read_metrics(run / "validation.jsonl")
    assert len(validation) == 2 * 2 * 2 * 4
    options = ["decoders=[greedy,sample@1.6]", "sets=[held_out,train]", "episodes=4", "workers=1", "max_slots=3"]
    assert evaluate.main([f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'eval'}", *options]) == 0
    for steps in (0, 1):
        result = json.loads((tmp_path / "eval" / "full" / "seed3" / f"step{steps}.json").read_text())
        trained = [{k: v for k, v in r.items() if k not in ("step", "trained_steps")}
                   for r in validation if r["trained_steps"] == steps]
        assert result["records"] == trained and result["seed"] == 3 and result["tasks"] == [1, 3]
        assert result["summary"]["held_out"]["greedy"]["episodes"] == 4
    assert [r["placement"] for r in trained[:4]] == [50, 50, 51, 51]
    assert [r["placement"] for r in trained[4:8]] == [0, 0, 1, 1]
    before, after = run / "base_policy", run / "checkpoints" / "step_000000" / "policy"
    shared = ["suite=metaworld", "tasks=[1,3]", "max_chunks=3", "seed=3", *options]
    assert evaluate.main([f"policy={after}", *shared, f"json={tmp_path / 'one.json'}"]) == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["records"] == trained and set(one["summary"]) == {"held_out", "train"}
    assert evaluate.main([f"before={before}", f"after={after}", *shared, f"json={tmp_path / 'pair.json'}"]) == 0
    pair = json.loads((tmp_path / "pair.json").read_text())
    assert pair["after"]["records"] == trained and len(pair["paired"]) == 4
    for cell in pair["paired"]:
        assert cell["episodes"] == 4 and cell["interval"][0] <= cell["difference"] <= cell["interval"][1]
        assert cell["difference"] == pytest.approx(cell["after"] - cell["before"])
