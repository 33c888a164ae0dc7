"""Behaviour cloning (`python -m pcm_train.sft`) on tiny synthetic demonstrations in the demos format."""
import json

import numpy as np
import pytest
import torch

from pcm_train.tools import sft
from pcm_train.policies.action_tokens import gripper_to_env, tokens_to_normalized
from pcm_train.config import ConfigError, load_config
from pcm_train.tools.demos import FORMAT, INDEX_FILE, episode_file, write_episode
from pcm_train.expert import Episode
from pcm_train.training.metrics_log import read_metrics
from pcm_train.policies import SmallVLAConfig
from pcm_train.policies.factory import build_policy

STATE_DIM = 36
TINY = ["epochs=4", "batch_size=8", "lr=3e-3", "hidden_size=16", "num_layers=1", "val_fraction=0.25"]


def synthetic_episode(task_id, index, steps, success=True, image_size=None):
    """Actions that are a fixed function of the state (learnable), gripper closing halfway through."""
    rng = np.random.default_rng([task_id, index])
    states = rng.normal(size=(steps, STATE_DIM)).astype(np.float32)
    actions = np.tanh(states[:, :7] + 0.5 * task_id).astype(np.float32)
    actions[:, 6] = np.where(np.arange(steps) < steps // 2, -1.0, 1.0)
    images = rng.integers(0, 256, (steps, image_size, image_size, 3), dtype=np.uint8) if image_size else None
    return Episode(task_id=task_id, init_state_id=index, language=f"put object {task_id} in the basket",
                   states=states, images=images, actions=actions, clean_actions=actions,
                   phases=np.zeros(steps, np.uint8), success=success, seconds=0.0)


def write_demos(directory, episodes):
    """Episode files plus index.json, as ``python -m pcm_train.demos`` lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for episode in episodes:
        name = episode_file(episode.task_id, episode.init_state_id)
        write_episode(directory / name, episode)
        entries.append({"file": name, "task_id": episode.task_id, "init_state_id": episode.init_state_id,
                        "success": episode.success, "steps": len(episode.actions), "language": episode.language})
    (directory / INDEX_FILE).write_text(json.dumps({"format": FORMAT, "settings": {}, "episodes": entries}))
    return directory


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    episodes = [synthetic_episode(task, index, steps=20 + 4 * index) for task in range(2) for index in range(4)]
    episodes.append(synthetic_episode(0, 9, steps=30, success=False))
    return write_demos(tmp_path_factory.mktemp("demos"), episodes)


def test_gripper_and_arm_actions_round_trip_through_tokens():
    config = SmallVLAConfig()
    commands = torch.tensor([-1.0, 1.0])
    torch.testing.assert_close(gripper_to_env(sft.gripper_from_env(commands)), commands)
    torch.testing.assert_close(sft.gripper_from_env(commands), torch.tensor([1.0, 0.0]))  # model: 1 open, 0 close
    actions = torch.tensor([[0.3, -0.7, 1.0, -1.0, 0.0, 0.01, -1.0], [0.9, 0.2, -0.4, 0.5, -0.5, 0.05, 1.0]])
    decoded = tokens_to_normalized(sft.actions_to_tokens(actions, config), config.action_token_start)
    torch.testing.assert_close(decoded[:, :6], actions[:, :6], atol=1 / 127.5, rtol=0)  # one bin
    torch.testing.assert_close(gripper_to_env(decoded[:, 6]), actions[:, 6])


def test_chunks_take_the_first_step_and_mask_a_short_last_chunk():
    config = SmallVLAConfig(observation="state", state_dim=STATE_DIM)
    episode = synthetic_episode(1, 0, steps=19)
    data = sft.chunk_demonstrations([episode], config)
    assert len(data) == 3 and data.tokens.shape == (3, 56) and data.prompts == [episode.language] * 3
    np.testing.assert_array_equal(data.observations, episode.states[[0, 8, 16]])
    assert data.mask[:2].all() and data.mask[2].sum() == 3 * 7 and data.mask[2, :21].all()
    torch.testing.assert_close(data.tokens[1].view(8, 7), sft.actions_to_tokens(torch.from_numpy(episode.actions[8:16]),
                                                                                 config))


def test_sft_lowers_the_loss_and_saves_a_policy_the_trainer_loads(demos, tmp_path):
    out = tmp_path / "policy"
    assert sft.main([f"demos={demos}", f"out={out}"] + TINY) == 0
    rows = read_metrics(out / "sft_metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[-1]["val_loss"] < rows[0]["val_loss"]
    cfg = load_config([f"policy.path={out}", "policy.observation=state", "policy.lora_r=0"]).policy
    policy = build_policy(cfg, device=torch.device("cpu"))
    assert policy.config.observation == "state" and policy.config.hidden_size == 16
    assert float(policy.state_encoder.std.min()) >= sft.STATE_STD_FLOOR and policy.state_encoder.mean.abs().sum() > 0
    data = sft.chunk_demonstrations(sft.load_successful_demonstrations(str(demos)), policy.config)
    with torch.no_grad():
        loss, _, _ = sft.batch_loss(policy, data, np.arange(len(data)))
    assert float(loss) < rows[0]["train_loss"]  # the saved weights are the trained ones


def test_failed_demonstrations_are_left_out(demos):
    episodes = sft.load_successful_demonstrations(str(demos))
    assert len(episodes) == 8 and all(e.success for e in episodes)


def test_image_mode_trains_on_recorded_images(tmp_path):
    demos = write_demos(tmp_path / "demos", [synthetic_episode(0, i, steps=12, image_size=16) for i in range(3)])
    out = tmp_path / "policy"
    assert sft.main([f"demos={demos}", f"out={out}", "observation=image", "epochs=1"] + TINY[1:]) == 0
    cfg = load_config([f"policy.path={out}", "policy.lora_r=0"]).policy
    assert build_policy(cfg, device=torch.device("cpu")).config.image_size == 16


@pytest.mark.parametrize("args, message", [
    (["out=o"], "demos=DIR is required"),
    (["demos=d"], "out=DIR is required"),
    (["demos=d", "out=o", "epoch=3"], "did you mean 'epochs'"),
    (["demos=d", "out=o", "observation=depth"], "observation must be one of"),
    (["demos=d", "out=o", "lr=-1"], "lr must be > 0"),
    (["demos=d", "out=o", "val_fraction=1"], "val_fraction"),
    (["demos=d", "out=o", "hidden_size=20"], "multiple of 16"),
    (["demos=/nonexistent/demos", "out=o"], "no index.json"),
])
def test_bad_arguments_are_one_clear_error(args, message, capsys):
    assert sft.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error:")


def test_image_mode_needs_recorded_images(demos, tmp_path, capsys):
    assert sft.main([f"demos={demos}", f"out={tmp_path / 'o'}", "observation=image"]) == 2
    assert "recorded with images" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        sft.parse_args(["demos=d", "out=o", "device=gpu"])


@pytest.mark.slow
def test_real_expert_demos_to_a_state_policy_rollout(tmp_path):
    pytest.importorskip("libero.libero", reason="LIBERO is not installed")
    from pcm_train.tools import demos as demo_writer
    from pcm_train.envs.workers import EnvWorkerPool
    from pcm_train.training.rollout import Episode as RolloutEpisode, collect_rollouts

    assert demo_writer.main([f"out={tmp_path / 'demos'}", "per_task=2", "tasks=[0]", "noise=0.1"]) == 0
    assert sft.main([f"demos={tmp_path / 'demos'}", f"out={tmp_path / 'policy'}", "epochs=2", "hidden_size=16",
                     "num_layers=1", "val_fraction=0"]) == 0
    policy = build_policy(load_config([f"policy.path={tmp_path / 'policy'}", "policy.observation=state",
                                       "policy.lora_r=0"]).policy, device=torch.device("cpu"))
    with EnvWorkerPool(1, "libero_object", camera=False, privileged_state=True, cpus_per_worker=0.5) as pool:
        batch = collect_rollouts(policy, pool, [RolloutEpisode(0, 45, "v")], max_chunks=2, temperature=1.6)
    assert batch.batch["pixel_values"].shape == (1, 2, STATE_DIM) and int(batch.batch["finish_step"][0]) == 16
