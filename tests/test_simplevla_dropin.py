"""``pcm_shrink_batch`` inside SimpleVLA-RL's own actor update, against ``pcm_train``'s trainer.

SimpleVLA-RL's ``RobDataParallelPPOActor`` (``verl/workers/actor/dp_rob.py``, commit 7c51662) and the
files it imports are copied under ``tests/third_party/simplevla_rl/`` (import lines rewired from their
vendored ``verl`` to ``simplevla_rl``; README.md there lists every change). ``dp_rob_pcm.py`` is the
same class with docs/simplevla_rl.md §3 applied. Their actor runs here unmodified on CPU: a tiny
``SmallVLA`` behind an adapter with their OpenVLA-OFT ``actor_module`` interface, their
``ppo_trainer.yaml`` actor config, a one-rank gloo process group for their ``barrier``; the test
makes ``TensorDict.cuda()`` and ``torch.cuda.synchronize()`` no-ops (everything stays on the CPU).

Gradients are compared where each optimizer step sees them (after gradient clipping; a recording
SGD), step by step, with ``pcm_train.algorithm.actor.update_actor`` (``actor.shuffle=false``, one epoch,
mini-batches of their ``ppo_mini_batch_size`` trajectories, their clip ratios and ``grad_clip``).
"""
import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict
from tensordict import TensorDict
from verl import DataProto

from pcm_train.algorithm.actor import update_actor
from pcm_train.config import load_config
from pcm_train.algorithm.controller import PCMController
from pcm_train.policies import SmallVLA, SmallVLAConfig
from pcm_train.policies.small_vla import PAD_ID
from pcm_train.integrations.simplevla import OPENVLA_ACTION_TOKEN_START, pcm_shrink_batch
from pcm_train.tools.synthetic import synthetic_rollout_batch

THIRD_PARTY = Path(__file__).resolve().parent / "third_party"
sys.path.insert(0, str(THIRD_PARTY))

from simplevla_rl import dp_rob, dp_rob_pcm  # noqa: E402
from simplevla_rl import torch_functional as their_F  # noqa: E402

C = 8  # chunks per trajectory
N = 6  # trajectories: 2 prompts x 3 rollouts
TEMPERATURE = 1.6
LR = 10.0
GRAD_CLIP = 0.25  # below the tiny policy's gradient norms, so the clip acts


class OFTLogits(torch.nn.Module):
    """SimpleVLA-RL's ``actor_module`` interface for ``vla=openvla-oft`` over a ``SmallVLA``.

    ``forward(input_ids, attention_mask, pixel_values, proprio)`` (R chunk rows, unpadded by their
    ``process_tensor``) -> logits [R, 56, 32064]: OpenVLA's padded vocabulary, the policy's 256 action
    logits at ids 31744..31999 (what their ``logits[..., -256-64:-64]`` takes), zeros elsewhere.
    ``vocab_size`` = 32000, as their code asserts.
    """

    vocab_size = 32000

    def __init__(self, policy: SmallVLA):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, attention_mask, pixel_values, proprio=None):
        assert proprio is None
        logits = self.policy(input_ids, attention_mask, pixel_values)  # [R, 56, 256]
        return F.pad(logits, (OPENVLA_ACTION_TOKEN_START, 64))


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it steps with (after the caller's clipping)."""

    def __init__(self, params, lr):
        super().__init__(list(params), lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                          for group in self.param_groups for p in group["params"]])
        return super().step(closure)


@pytest.fixture(scope="module", autouse=True)
def one_rank_process_group(tmp_path_factory):
    """Their update ends with ``torch.distributed.barrier()``; the doc's controller seeds with the rank."""
    if torch.distributed.is_initialized():
        yield
        return
    store = tmp_path_factory.mktemp("gloo") / "store"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    """Their ``data.cuda()`` / ``mb.cuda()`` keep the rows where the policy is (the CPU); their
    ``torch.cuda.synchronize()`` is a no-op; their ``logprobs_from_logits`` takes its own non-flash-attn
    branch (CPU tensors)."""
    monkeypatch.setattr(TensorDict, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)
    monkeypatch.setattr(their_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return SmallVLA(SmallVLAConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   image_size=16, vision_width=32, vision_layers=1, vision_heads=2))


def their_actor_config(*, ppo_mini_batch_size: int, traj_mini_batch_size: int, grad_clip: float = 1.0,
                       pcm: dict | None = None):
    """``actor_rollout_ref.actor`` of their ``ppo_trainer.yaml`` with command-line style overrides, the
    doc's ``pcm:`` block added with Hydra's ``+``, struct-locked as ``fsdp_workers.py:389`` does."""
    config = OmegaConf.load(THIRD_PARTY / "simplevla_rl" / "ppo_trainer.yaml")
    OmegaConf.set_struct(config, True)
    config.actor_rollout_ref.actor.ppo_mini_batch_size = ppo_mini_batch_size
    config.actor_rollout_ref.actor.ppo_micro_batch_size = 1
    config.actor_rollout_ref.actor.traj_mini_batch_size = traj_mini_batch_size
    config.actor_rollout_ref.actor.grad_clip = grad_clip
    config.actor_rollout_ref.rollout.temperature = TEMPERATURE
    if pcm is not None:
        with open_dict(config):
            config.actor_rollout_ref.actor.pcm = pcm
    actor = config.actor_rollout_ref.actor
    OmegaConf.set_struct(actor, True)
    return actor


def openvla_batch(ours: DataProto) -> DataProto:
    """The same rollouts as SimpleVLA-RL holds them: action tokens as OpenVLA ids (31744 + bin)."""
    shift = OPENVLA_ACTION_TOKEN_START - 259  # SmallVLA's action ids start at 259
    tensors = {key: value.clone() for key, value in ours.batch.items()}
    tensors["responses"] = tensors["responses"] + shift
    return DataProto.from_dict(tensors=tensors, non_tensors={"uid": ours.non_tensor_batch["uid"].copy()},
                               meta_info={"temperature": TEMPERATURE})


@pytest.fixture(scope="module")
def batches(policy):
    """(our batch, their batch) with ``old_log_probs`` from THEIR ``compute_log_prob`` (the recompute
    their worker runs after the rollout), so both trainers see identical inputs."""
    ours = synthetic_rollout_batch(policy, num_prompts=2, group_size=3, num_chunks=C, seed=1,
                                   temperature=TEMPERATURE)
    theirs = openvla_batch(ours)
    ref = dp_rob.RobDataParallelPPOActor(their_actor_config(ppo_mini_batch_size=N, traj_mini_batch_size=C),
                                         OFTLogits(policy))  # optimizer None: their reference-policy mode
    theirs.meta_info.update(micro_batch_size=1, use_dynamic_bsz=False, pad_token_id=PAD_ID)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(their_F, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)
        old = ref.compute_log_prob(theirs)
    torch.testing.assert_close(old, ours.batch["old_log_probs"], rtol=1e-5, atol=1e-5)
    ours.batch["old_log_probs"] = old.clone()
    theirs.batch["old_log_probs"] = old.clone()
    return ours, theirs


def run_theirs(actor_cls, policy, theirs: DataProto, config):
    """Their worker's sequence on a fresh copy of the policy: recompute old log-probs (sets
    ``pad_token_id``), then ``update_policy``. Returns (optimizer, metrics, policy after)."""
    model = copy.deepcopy(policy)
    optimizer = RecordingSGD(model.parameters(), LR)
    actor = actor_cls(config=config, actor_module=OFTLogits(model), actor_optimizer=optimizer)
    data = copy.deepcopy(theirs)
    data.meta_info.update(micro_batch_size=1, use_dynamic_bsz=False, pad_token_id=PAD_ID)
    torch.testing.assert_close(actor.compute_log_prob(data), theirs.batch["old_log_probs"], rtol=0, atol=0)
    metrics = actor.update_policy(data)
    if hasattr(actor, "pcm_controller"):
        assert actor.pcm_controller.steps_done == 1
    return optimizer, metrics, model


def run_ours(policy, ours: DataProto, *, strategy: str, budget: int, ppo_mini_batch_size: int,
             grad_clip: float = 1.0, estimator: str = "biased"):
    """``pcm_shrink_batch`` + ``update_actor`` on a fresh copy. Returns (optimizer, metrics, selection, kept, policy)."""
    cfg = load_config([f"pcm.strategy={strategy}", f"pcm.budget={budget}", f"pcm.estimator={estimator}",
                       "actor.shuffle=false", "actor.ppo_epochs=1", "actor.clip_ratio_low=0.2",
                       "actor.clip_ratio_high=0.28", f"actor.grad_clip={grad_clip}", f"actor.lr={LR}",
                       f"actor.temperature={TEMPERATURE}", "actor.micro_batch_trajectories=1"])
    kept, selection = pcm_shrink_batch(ours, PCMController(cfg.pcm, seed=dp_rob_pcm.BASE_SEED),
                                       action_token_start=policy.config.action_token_start)
    model = copy.deepcopy(policy)
    optimizer = RecordingSGD([p for p in model.parameters() if p.requires_grad], cfg.actor.lr)
    _, metrics, _ = update_actor(model, optimizer, kept, cfg.actor, mini_batch_trajectories=ppo_mini_batch_size)
    return optimizer, metrics, selection, kept, model


def assert_same_steps(theirs: RecordingSGD, ours: RecordingSGD, scale: list[float] | None = None):
    """Every optimizer step's gradients equal (ours times ``scale[step]`` where given)."""
    assert len(theirs.seen) == len(ours.seen) > 0
    for step, (a, b) in enumerate(zip(theirs.seen, ours.seen)):
        factor = 1.0 if scale is None else scale[step]
        for i, (ga, gb) in enumerate(zip(a, b)):
            torch.testing.assert_close(ga, gb * factor, rtol=1e-4, atol=1e-7, msg=lambda m: f"step {step} param {i}: {m}")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("strategy", ["pcm", "top_phase"])
def test_patched_update_policy_equals_our_trainer(policy, batches, strategy):
    """Their update_policy with the doc's patch (their compute_policy_loss, rescaled) = update_actor:
    budget 3 in slices of traj_mini_batch_size 2 (a short slice), 2 mini-batches of 3 trajectories,
    clipping active in the second. Under top_phase trajectories 3 and 4 keep no chunk: both still
    count in their mini-batch's mean (÷3 on both sides)."""
    ours_batch, theirs_batch = batches
    config = their_actor_config(ppo_mini_batch_size=3, traj_mini_batch_size=2, grad_clip=GRAD_CLIP,
                                pcm={"strategy": strategy, "budget": 3})
    their_opt, their_metrics, their_model = run_theirs(dp_rob_pcm.PCMRobDataParallelPPOActor, policy,
                                                       theirs_batch, config)
    our_opt, our_metrics, selection, kept, our_model = run_ours(policy, ours_batch, strategy=strategy, budget=3,
                                                                ppo_mini_batch_size=3, grad_clip=GRAD_CLIP)
    kept_per_traj = (selection.index >= 0).sum(1)
    if strategy == "top_phase":
        assert kept_per_traj.tolist() == [1, 1, 1, 0, 0, 1]
    else:
        assert int(kept_per_traj.max()) == 3 and kept.batch["traj_index"].shape[0] > 3
    # the controller inside their actor chose what ours chose (same seed, same decoded rollouts)
    for key, value in selection.metrics.items():
        np.testing.assert_equal(their_metrics[key], [value], err_msg=key)
    assert_same_steps(their_opt, our_opt)
    assert_same_weights(their_model, our_model)
    # their per-step pre-clip grad norms and per-trajectory losses against ours (means over steps)
    norms = their_metrics["actor/grad_norm"]
    assert len(norms) == 2
    assert our_metrics["actor/grad_norm"] == pytest.approx(sum(norms) / 2, rel=1e-4)
    assert our_metrics["actor/grad_norm_max"] == pytest.approx(max(norms), rel=1e-4)
    assert max(norms) > GRAD_CLIP  # the clip acted
    assert our_metrics["actor/pg_loss"] == pytest.approx(sum(their_metrics["actor/pg_loss"]) / 3 / 2, rel=1e-4,
                                                         abs=1e-7)
    assert their_metrics["actor/ppo_kl"][5] != 0  # the second step is off-policy
    if strategy == "pcm":
        assert max(their_metrics["actor/pg_clipfrac"]) > 0  # and clips


def test_full_strategy_patched_equals_unpatched_and_ours(policy, batches):
    """strategy=full: the patched update (every valid chunk) = their unpatched update_policy (all C
    chunks of every trajectory through the model, the ones past finish_step masked) = update_actor."""
    ours_batch, theirs_batch = batches
    patched_opt, patched_metrics, patched_model = run_theirs(
        dp_rob_pcm.PCMRobDataParallelPPOActor, policy, theirs_batch,
        their_actor_config(ppo_mini_batch_size=3, traj_mini_batch_size=4, pcm={"strategy": "full"}))
    original_opt, original_metrics, original_model = run_theirs(
        dp_rob.RobDataParallelPPOActor, policy, theirs_batch,
        their_actor_config(ppo_mini_batch_size=3, traj_mini_batch_size=4))
    our_opt, _, selection, _, our_model = run_ours(policy, ours_batch, strategy="full", budget=12,
                                                   ppo_mini_batch_size=3)
    valid_chunks = -(-ours_batch.batch["finish_step"] // 8)
    assert (selection.index >= 0).sum(1).tolist() == valid_chunks.tolist() and int(valid_chunks.min()) < C
    assert_same_steps(original_opt, patched_opt)
    assert_same_steps(patched_opt, our_opt)
    assert_same_weights(original_model, our_model)
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm"):
        np.testing.assert_allclose(patched_metrics[key], original_metrics[key], rtol=1e-4, atol=1e-7, err_msg=key)


def test_partial_last_mini_batch_divides_by_ppo_mini_batch_size(policy, batches):
    """6 trajectories in mini-batches of 4: SimpleVLA-RL divides the last mini-batch (2 trajectories) by
    ``gradient_accumulation`` = 4, unpatched and patched alike; update_actor and the doc's second recipe
    (``num_sequences=stop - start``) divide by 2. Same first step; the second step's gradient is ours
    times 2/4 (no clipping here, so the factor shows)."""
    ours_batch, theirs_batch = batches
    no_clip = 1e9
    original_opt, _, _ = run_theirs(
        dp_rob.RobDataParallelPPOActor, policy, theirs_batch,
        their_actor_config(ppo_mini_batch_size=4, traj_mini_batch_size=4, grad_clip=no_clip))
    patched_opt, _, _ = run_theirs(
        dp_rob_pcm.PCMRobDataParallelPPOActor, policy, theirs_batch,
        their_actor_config(ppo_mini_batch_size=4, traj_mini_batch_size=4, grad_clip=no_clip,
                           pcm={"strategy": "full"}))
    recipe2_opt, _, _ = run_theirs(
        dp_rob_pcm.PCMLossRobDataParallelPPOActor, policy, theirs_batch,
        their_actor_config(ppo_mini_batch_size=4, traj_mini_batch_size=4, grad_clip=no_clip,
                           pcm={"strategy": "full"}))
    our_opt, _, _, _, _ = run_ours(policy, ours_batch, strategy="full", budget=12, ppo_mini_batch_size=4,
                                   grad_clip=no_clip)
    assert_same_steps(original_opt, patched_opt)
    assert_same_steps(patched_opt, our_opt, scale=[1.0, 2 / 4])
    assert_same_steps(recipe2_opt, our_opt)
    total = [float(torch.cat([g.flatten() for g in opt.seen[1]]).norm()) for opt in (patched_opt, our_opt)]
    assert total[0] == pytest.approx(total[1] / 2, rel=1e-4) and total[1] > 0


@pytest.mark.parametrize("strategy,estimator", [("pcm", "biased"), ("pcm", "unbiased"), ("top_phase", "biased")])
def test_doc_second_recipe_with_our_loss(policy, batches, strategy, estimator):
    """The doc's "one call to our loss" (pcm_train.algorithm.grpo.policy_loss in place of compute_policy_loss +
    rescale + / gradient_accumulation; ``num_sequences=stop - start``) = update_actor: biased, with the
    unbiased estimator's weights and ``traj_valid_tokens``, and under top_phase, where trajectories 3
    and 4 keep no chunk and still count in the mean. 3 divides 6 trajectories, so it also equals the
    first recipe (checked for the biased ones)."""
    ours_batch, theirs_batch = batches
    config = their_actor_config(ppo_mini_batch_size=3, traj_mini_batch_size=2,
                                pcm={"strategy": strategy, "budget": 3, "estimator": estimator})
    their_opt, their_metrics, _ = run_theirs(dp_rob_pcm.PCMLossRobDataParallelPPOActor, policy, theirs_batch, config)
    our_opt, _, selection, kept, _ = run_ours(policy, ours_batch, strategy=strategy, budget=3, ppo_mini_batch_size=3,
                                              estimator=estimator)
    assert ("chunk_weight" in kept.batch.keys()) == (estimator == "unbiased")
    if estimator == "unbiased":
        assert float(selection.weights.max()) > 1.0
        assert their_metrics["pcm/estimator_weight_mean"] == [selection.metrics["pcm/estimator_weight_mean"]]
    if strategy == "top_phase":
        assert (selection.index >= 0).sum(1).tolist() == [1, 1, 1, 0, 0, 1]
    assert_same_steps(their_opt, our_opt)
    if estimator == "biased":
        first_opt, _, _ = run_theirs(dp_rob_pcm.PCMRobDataParallelPPOActor, policy, theirs_batch, config)
        assert_same_steps(first_opt, their_opt)
