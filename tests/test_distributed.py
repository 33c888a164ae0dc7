"""Two gloo processes make the same actor update as one process (mini-batches, epochs, shuffling), and a
two-rank trainer, each rank rolling out half of every step, trains as one process does."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pcm_train.algorithm.actor import update_actor
from pcm_train.config import load_config
from pcm_train.algorithm.controller import PCMController
from pcm_train.runtime.distributed import DistInfo
from pcm_train.policies import SmallVLA, SmallVLAConfig
from pcm_train.integrations.simplevla import pcm_shrink_batch
from pcm_train.tools.synthetic import synthetic_rollout_batch

OVERRIDES = ["pcm.budget=3", "actor.lr=1e-2", "actor.ppo_epochs=2"]


def _setup():
    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    batch = synthetic_rollout_batch(policy, num_prompts=2, group_size=3, num_chunks=8, seed=2)
    policy.add_lora(4, 4)
    cfg = load_config(OVERRIDES)
    kept, _ = pcm_shrink_batch(batch, PCMController(cfg.pcm, seed=0),
                               action_token_start=policy.config.action_token_start)
    return policy, cfg, kept


def _trained(policy, cfg, kept, info):
    """Two epochs of two shuffled mini-batches (3 trajectories each, so a rank may get 1 or 2 of them)
    with plain SGD (lr 1): the parameter change is the clipped gradients themselves, so the comparison
    checks gradients; Adam would amplify rounding on near-zero gradients."""
    torch.manual_seed(1)
    sgd = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    _, metrics, log_probs = update_actor(policy, sgd, kept, cfg.actor, info, mini_batch_trajectories=3,
                                         generator=torch.Generator().manual_seed(5))
    assert metrics["actor/optimizer_steps"] == 4
    return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}, log_probs


def _worker(rank, world_size, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        policy, cfg, kept = _setup()
        params, log_probs = _trained(policy, cfg, kept, DistInfo(rank, world_size, 0))
        torch.save({"params": params, "log_probs": log_probs}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    policy, cfg, kept = _setup()
    single, single_log_probs = _trained(policy, cfg, kept, None)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"out.{rank}")
        assert result["params"].keys() == single.keys()
        for name, value in single.items():
            torch.testing.assert_close(result["params"][name], value, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(result["log_probs"], single_log_probs, rtol=1e-5, atol=1e-6)


def _trainer_worker(rank, world_size, store, overrides):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from fake_env import fake_pool_factory

    from pcm_train.training.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        pools = []

        def factory(cfg, image_size):
            pools.append(fake_pool_factory(close_steps=6)(cfg, image_size))
            started = []
            reset = pools[-1].reset
            pools[-1].reset = lambda episodes: started.append(len(episodes)) or reset(episodes)
            pools[-1].started = started
            return pools[-1]

        trainer = Trainer(load_config(overrides), factory, DistInfo(rank, world_size, 0))
        assert trainer.run()
        trainer.close()
        torch.save({"started": pools[0].started}, f"{store}.pool{rank}")
    finally:
        dist.destroy_process_group()


def test_two_process_trainer_equals_one(tmp_path):
    from safetensors.torch import load_file

    from fake_env import fake_pool_factory
    from pcm_train.training.checkpoint import latest_checkpoint
    from pcm_train.training.metrics_log import read_metrics
    from pcm_train.training.trainer import Trainer
    from test_trainer import TINY

    single = Trainer(load_config(TINY + [f"trainer.output_dir={tmp_path / 'one'}"]), fake_pool_factory(close_steps=6))
    single.run()
    single.close()
    overrides = TINY + [f"trainer.output_dir={tmp_path / 'two'}"]
    mp.spawn(_trainer_worker, args=(2, str(tmp_path / "store"), overrides), nprocs=2, join=True)
    a = load_file(latest_checkpoint(tmp_path / "one") / "policy" / "adapter_model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "two") / "policy" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)
    rows_one, rows_two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    # each rank rolled out its half of every step's 6 episodes (rank 0 also the validations, before training and
    # after the last step: 2 episodes for each of the 2 decoders), and the gathered batch is the single
    # process's: what depends on tokens and episode lengths is bitwise equal
    started = [torch.load(f"{tmp_path / 'store'}.pool{rank}")["started"] for rank in range(2)]
    assert started[0] == [2, 2, 3, 3, 2, 2] and started[1] == [3, 3]
    for key in ("success_rate", "episode_steps_mean", "advantage/mean", "advantage/nonzero_fraction",
                "pcm/kept_fraction", "pcm/valid_chunks_per_traj", "rollout/env_steps"):
        assert [r[key] for r in rows_one] == [r[key] for r in rows_two], key
