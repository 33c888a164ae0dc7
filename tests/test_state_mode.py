"""State mode: the small VLA on privileged-state observations (docs/state_mode.md)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcm_train.config import PolicySection, load_config
from pcm_train.training.metrics_log import read_metrics
from pcm_train.policies import SmallVLA, SmallVLAConfig
from pcm_train.policies.factory import build_policy
from pcm_train.training.rollout import Episode, collect_rollouts
from pcm_train.training.trainer import Trainer, make_env_pool

from fake_env import FakePool, fake_pool_factory

STATE_DIM = 36
TASKS = ["pick up the black bowl", "Open the top drawer of the cabinet and put the bowl inside", "stop"]
TINY_STATE = ["preset=quick_image", "rollout.max_chunks=6", "rollout.prompts_per_step=2", "rollout.group_size=3",
              "pcm.budget=2", "trainer.total_steps=1", "trainer.val_every=1", "trainer.val_episodes=2",
              "policy.hidden_size=16", "policy.num_layers=1", "policy.observation=state", "env.camera=false",
              "env.task_ids=[0,1]"]


def tiny_state_policy(seed=0):
    torch.manual_seed(seed)
    return SmallVLA(SmallVLAConfig(observation="state", state_dim=STATE_DIM, hidden_size=16, num_hidden_layers=1,
                                   num_attention_heads=1, intermediate_size=32)).eval()


def test_state_mode_packed_equals_padded_and_single_chunks():
    model = tiny_state_policy()
    model.state_encoder.set_normalization(torch.full((STATE_DIM,), 0.5), torch.full((STATE_DIM,), 2.0))
    input_ids, attention_mask = model.encode_prompts(TASKS)
    states = torch.randn(len(TASKS), STATE_DIM, generator=torch.Generator().manual_seed(1))
    padded = model.action_logits(input_ids, attention_mask, states)
    assert padded.shape == (3, 56, 256) and model.config.num_patches == 4
    lengths = attention_mask.sum(1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).int()
    packed = model.action_logits_packed(input_ids[attention_mask.bool()], cu_seqlens, states)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    for row in range(len(TASKS)):
        n = int(lengths[row])
        alone = model.action_logits(input_ids[row:row + 1, :n], attention_mask[row:row + 1, :n], states[row:row + 1])
        torch.testing.assert_close(alone, padded[row:row + 1], atol=1e-5, rtol=0)
    other = states.clone()
    other[1, 0] += 1.0
    changed = model.action_logits(input_ids, attention_mask, other)
    assert not torch.allclose(changed[1], padded[1]) and torch.equal(changed[0], padded[0])


def test_state_policy_has_no_patch_encoder_and_saves_its_normalization(tmp_path):
    model = tiny_state_policy()
    assert not hasattr(model, "patch_encoder")
    model.state_encoder.set_normalization(torch.arange(STATE_DIM).float(), torch.full((STATE_DIM,), 3.0))
    model.save_pretrained(tmp_path / "p")
    again = SmallVLA.from_pretrained(str(tmp_path / "p"))
    assert again.config.observation == "state"
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="std > 0"):
        model.state_encoder.set_normalization(torch.zeros(STATE_DIM), torch.zeros(STATE_DIM))


def test_observations_to_inputs_in_both_modes():
    state_policy = tiny_state_policy()
    observations = [{"image": np.zeros((32, 32, 3), np.uint8), "state": np.full(STATE_DIM, i, np.float32)}
                    for i in range(2)]
    states = state_policy.observations_to_inputs(observations)
    assert states.dtype == torch.float32 and states.shape == (2, STATE_DIM) and states[1, 0] == 1
    image_policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                           intermediate_size=32))
    pixels = image_policy.observations_to_inputs(observations)
    assert pixels.shape == (2, 3, 32, 32) and float(pixels.min()) == -1.0
    with pytest.raises(ValueError, match="privileged_state=True"):
        state_policy.observations_to_inputs([{"state": np.zeros(8, np.float32)}])
    with pytest.raises(ValueError, match=r"states \[N, state_dim\]"):
        state_policy.action_logits(*state_policy.encode_prompts(["a"]), torch.zeros(1, 3, 32, 32))


def test_config_and_factory_choose_the_observation_mode(tmp_path):
    cfg = load_config(["policy.observation=state", "policy.hidden_size=16", "policy.num_layers=1",
                       "policy.lora_r=0"]).policy
    policy = build_policy(cfg, device=torch.device("cpu"))
    assert policy.config.observation == "state" and policy.config.state_dim == STATE_DIM
    policy.save_pretrained(tmp_path / "state")
    cfg.path, cfg.observation = str(tmp_path / "state"), "image"
    with pytest.raises(ValueError, match="set policy.observation=state"):
        build_policy(cfg, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="policy.observation"):
        load_config(["policy.observation=depth"])
    with pytest.raises(ValueError, match="openvla_oft sees images only.*set policy.observation=image env.camera=true"):
        load_config(["policy.name=openvla_oft", "policy.observation=state"])
    with pytest.raises(ValueError, match="openvla_oft sees images only.*set policy.observation=image env.camera=true"):
        build_policy(PolicySection(name="openvla_oft", observation="state"), device=torch.device("cpu"))


@pytest.mark.parametrize("overrides, message", [
    (["policy.observation=state"], "needs env.camera=false"),
    (["env.camera=false"], "needs env.camera=true"),
])
def test_env_pool_rejects_a_camera_that_does_not_fit_the_mode(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_env_pool(load_config(overrides), image_size=32)


def test_one_trainer_step_in_state_mode_on_the_fake_pool(tmp_path):
    cfg = load_config(TINY_STATE + [f"trainer.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, fake_pool_factory(close_steps=33, state_dim=STATE_DIM))  # mixed groups at this seed
    assert trainer.run()
    trainer.close()
    rows = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0] and rows[0]["chunks_kept"] > 0 and "val/held_out/greedy/success_rate" in rows[0]
    assert rows[0]["advantage/nonzero_fraction"] > 0 and rows[0]["actor/grad_norm"] > 0
    assert trainer.policy.config.observation == "state"


def test_state_rollout_batch_holds_states():
    policy = tiny_state_policy()
    pool = FakePool(close_steps=10, max_steps=24, state_dim=STATE_DIM)
    batch = collect_rollouts(policy, pool, [Episode(0, 1, "a"), Episode(1, 2, "b")], max_chunks=3,
                             temperature=1.6, generator=torch.Generator().manual_seed(0))
    assert batch.batch["pixel_values"].shape == (2, 3, STATE_DIM)
    first = policy.observations_to_inputs(FakePool(state_dim=STATE_DIM).reset([(0, 1)]))
    torch.testing.assert_close(batch.batch["pixel_values"][0, 0], first[0])


@pytest.mark.slow
def test_real_libero_state_rollout_without_camera():
    pytest.importorskip("libero.libero", reason="LIBERO is not installed")
    from pcm_train.envs.workers import EnvWorkerPool

    policy = tiny_state_policy()
    with EnvWorkerPool(2, "libero_object", camera=False, privileged_state=True, cpus_per_worker=0.5) as pool:
        batch = collect_rollouts(policy, pool, [Episode(0, 0, "a"), Episode(1, 3, "b")], max_chunks=2,
                                 temperature=1.6, generator=torch.Generator().manual_seed(0))
    states = batch.batch["pixel_values"]
    assert states.shape == (2, 2, STATE_DIM)
    assert batch.batch["finish_step"].tolist() == [16, 16] and not batch.batch["complete"].any()
    assert not torch.equal(states[:, 0], states[:, 1])  # the robot moved between the chunks
    assert (states[:, :, 8:15].abs().sum(-1) > 0).all()  # the target object's pose is there
