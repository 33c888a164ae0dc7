"""GRPO advantages and the packed PPO-clip loss, checked against verl on the same inputs."""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos

from pcm_train.config import LOSS_AGG_MODES
from pcm_train.algorithm.grpo import chunk_seqlens, grpo_advantages, policy_loss, token_mask

CLIP_LOW, CLIP_HIGH = 0.2, 0.4


def verl_loss(log_prob, old_log_prob, advantages, mask, loss_agg_mode, clip_ratio_c=3.0):
    """verl's vanilla PPO-clip loss on dense [N, T] inputs."""
    config = OmegaConf.create(
        {
            "clip_ratio": CLIP_LOW,
            "clip_ratio_low": CLIP_LOW,
            "clip_ratio_high": CLIP_HIGH,
            "clip_ratio_c": clip_ratio_c,
            "global_batch_info": {},
        }
    )
    loss, _ = core_algos.compute_policy_loss_vanilla(
        old_log_prob, log_prob, advantages, mask.float(), loss_agg_mode=loss_agg_mode, config=config
    )
    return loss


def dense_batch(num_traj=6, num_tokens=40, seed=0):
    """Random log-probs, advantages and a keep mask with one fully masked trajectory (row 2)."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(num_traj, num_tokens, generator=generator) * 3
    new = (old + 0.3 * torch.randn(num_traj, num_tokens, generator=generator)).requires_grad_()
    advantages = torch.randn(num_traj, 1, generator=generator).expand(num_traj, num_tokens).contiguous()
    keep = torch.rand(num_traj, num_tokens, generator=generator) < 0.5
    keep[2] = False
    keep[0, :3] = True
    return new, old, advantages, keep


def pack(keep):
    """traj_id [T] of the kept tokens of a dense [N, T] mask, in row-major order."""
    rows = torch.arange(keep.shape[0]).unsqueeze(-1).expand_as(keep)
    return rows[keep]


# ---- layout ----------------------------------------------------------------


def test_token_mask_and_chunk_seqlens_follow_layout():
    finish_step = torch.tensor([0, 1, 8, 9, 100, 512])
    mask = token_mask(finish_step)
    seqlens = chunk_seqlens(finish_step)
    assert mask.shape == (6, 64 * 56) and mask.dtype == torch.bool
    assert seqlens.shape == (6, 64) and seqlens.dtype == torch.int64
    assert mask.sum(-1).tolist() == [0, 7, 56, 63, 700, 3584]
    assert torch.equal(seqlens, mask.view(6, 64, 56).sum(-1))
    assert seqlens[3, :3].tolist() == [56, 7, 0]
    assert seqlens[4, 12].item() == 700 - 12 * 56  # partly valid last chunk (steps 96..99)
    assert mask[1].nonzero().flatten().tolist() == list(range(7))


def test_layout_other_sizes():
    finish_step = torch.tensor([5])
    assert chunk_seqlens(finish_step, num_chunks=3, steps_per_chunk=2, action_dim=3).tolist() == [[6, 6, 3]]
    assert token_mask(finish_step, num_chunks=3, steps_per_chunk=2, action_dim=3).sum().item() == 15


@pytest.mark.parametrize(
    "finish_step",
    [torch.tensor([513]), torch.tensor([3, -1]), torch.tensor([1.0]), torch.tensor([[1, 2]])],
)
def test_layout_rejects_bad_finish_step(finish_step):
    with pytest.raises(ValueError, match="finish_step"):
        chunk_seqlens(finish_step)
    with pytest.raises(ValueError, match="finish_step"):
        token_mask(finish_step)


# ---- advantages ------------------------------------------------------------


def test_grpo_advantages_equal_formula_and_verl():
    complete = torch.tensor([1, 0, 1, 1, 0] + [1] * 5 + [0] * 5, dtype=torch.bool)
    uid = np.array(["a"] * 5 + ["b"] * 5 + ["c"] * 5, dtype=object)
    finish_step = torch.randint(1, 513, (15,), generator=torch.Generator().manual_seed(1))
    mask = token_mask(finish_step)

    advantages = grpo_advantages(complete, uid, mask)

    rewards = complete.float()
    group_a = rewards[:5]
    expected_a = (group_a - group_a.mean()) / (group_a.std() + 1e-6)  # unbiased std
    expected = torch.cat([expected_a, torch.zeros(10)]).unsqueeze(-1) * mask
    assert advantages.dtype == torch.float32
    torch.testing.assert_close(advantages, expected)
    assert torch.all(advantages[5:] == 0)  # all-success and all-failure groups: exactly zero

    outcome_on_first_token = torch.zeros(mask.shape)
    outcome_on_first_token[:, 0] = rewards
    verl_advantages, _ = core_algos.compute_grpo_outcome_advantage(outcome_on_first_token, mask.float(), uid)
    torch.testing.assert_close(advantages, verl_advantages)


def test_single_member_groups_get_zero_advantage_unlike_verl():
    complete = torch.tensor([True, False, True, True])
    uid = np.array([7, 8, 9, 9])
    mask = token_mask(torch.tensor([10, 10, 10, 10]))

    advantages = grpo_advantages(complete, uid, mask)

    assert torch.all(advantages == 0)
    outcome = torch.zeros(mask.shape)
    outcome[:, 0] = complete.float()
    verl_advantages, _ = core_algos.compute_grpo_outcome_advantage(outcome, mask.float(), uid)
    assert verl_advantages[0, 0].item() == pytest.approx(1.0, abs=1e-5)  # verl: mean 0, std 1 for a lone rollout


def test_grpo_advantages_trajectory_without_valid_tokens_still_counts_in_group():
    complete = torch.tensor([True, False, False])
    mask = token_mask(torch.tensor([0, 4, 4]))
    advantages = grpo_advantages(complete, np.array([0, 0, 0]), mask)
    assert torch.all(advantages[0] == 0)
    assert torch.all(advantages[1, :28] < 0)  # a success exists in the group


def test_grpo_advantages_reject_bad_input():
    mask = token_mask(torch.tensor([8, 8]))
    with pytest.raises(ValueError, match="complete"):
        grpo_advantages(torch.tensor([1, 0]), np.array([0, 0]), mask)
    with pytest.raises(ValueError, match="uid"):
        grpo_advantages(torch.tensor([True, False]), [0, 0], mask)
    with pytest.raises(ValueError, match="uid"):
        grpo_advantages(torch.tensor([True, False]), np.array([0, 0, 0]), mask)
    with pytest.raises(ValueError, match="token_mask"):
        grpo_advantages(torch.tensor([True, False]), np.array([0, 0]), mask[:1])


# ---- policy loss -----------------------------------------------------------


def test_hand_computed_value():
    # ratio 1 everywhere, so each token's loss is -A; trajectory 0 has 2 tokens, trajectory 1 has 1.
    advantages = torch.tensor([1.0, 3.0, -2.0])
    log_prob = torch.zeros(3)
    loss, metrics = policy_loss(log_prob, log_prob, advantages, torch.tensor([0, 0, 1]), 2, CLIP_LOW, CLIP_HIGH)
    assert loss.item() == pytest.approx(0.5 * (-(1.0 + 3.0) / 2 + 2.0))
    assert metrics["actor/pg_loss"] == pytest.approx(loss.item())
    assert metrics["actor/pg_clipfrac"] == 0.0 and metrics["actor/ppo_kl"] == 0.0


def test_one_trajectory_equals_verl_token_mean():
    new, old, advantages, _ = dense_batch(num_tokens=300)
    expected = verl_loss(new[:1], old[:1], advantages[:1], torch.ones(1, 300), "token-mean")
    (expected_grad,) = torch.autograd.grad(expected, new)

    traj_id = torch.zeros(300, dtype=torch.int64)
    loss, metrics = policy_loss(new[0], old[0], advantages[0], traj_id, 1, CLIP_LOW, CLIP_HIGH, clip_ratio_c=3.0)
    (grad,) = torch.autograd.grad(loss, new)

    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert 0.0 < metrics["actor/pg_clipfrac"] < 1.0


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_packed_equals_dense_masked(loss_agg_mode):
    new, old, advantages, keep = dense_batch()
    expected = verl_loss(new, old, advantages, keep, loss_agg_mode)
    (expected_grad,) = torch.autograd.grad(expected, new)

    loss, _ = policy_loss(
        new[keep], old[keep], advantages[keep], pack(keep), keep.shape[0], CLIP_LOW, CLIP_HIGH,
        clip_ratio_c=3.0, loss_agg_mode=loss_agg_mode, horizon=keep.shape[1],
    )
    (grad,) = torch.autograd.grad(loss, new)

    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("loss_agg_mode", LOSS_AGG_MODES)
def test_explicit_global_batch_info_equals_verl_agg_loss(loss_agg_mode):
    """The trainer's denominators (SimpleVLA-RL's mean over every trajectory with valid tokens, here 6
    although row 2 keeps nothing) passed to verl's agg_loss as its global batch info."""
    new, old, advantages, keep = dense_batch(seed=8)
    config = OmegaConf.create({"clip_ratio": CLIP_LOW, "clip_ratio_low": CLIP_LOW, "clip_ratio_high": CLIP_HIGH,
                               "clip_ratio_c": 3.0, "global_batch_info": {"global_batch_size": 6,
                                                                          "batch_num_tokens": 77,
                                                                          "loss_scale_factor": 64}})
    expected, _ = core_algos.compute_policy_loss_vanilla(old, new, advantages, keep.float(),
                                                         loss_agg_mode=loss_agg_mode, config=config)
    loss, _ = policy_loss(new[keep], old[keep], advantages[keep], pack(keep), 6, CLIP_LOW, CLIP_HIGH,
                          clip_ratio_c=3.0, loss_agg_mode=loss_agg_mode, num_sequences=6, num_tokens=77, horizon=64)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("loss_agg_mode", ["seq-mean-token-mean", "token-mean"])
def test_kl_term_is_verl_kl_penalty_aggregated(loss_agg_mode):
    new, old, advantages, keep = dense_batch(seed=9)
    ref = old - 0.2 * torch.rand(old.shape, generator=torch.Generator().manual_seed(1))
    plain, _ = policy_loss(new[keep], old[keep], advantages[keep], pack(keep), 6, CLIP_LOW, CLIP_HIGH,
                           loss_agg_mode=loss_agg_mode)
    with_kl, metrics = policy_loss(new[keep], old[keep], advantages[keep], pack(keep), 6, CLIP_LOW, CLIP_HIGH,
                                   loss_agg_mode=loss_agg_mode, ref_log_prob=ref[keep], kl_coef=0.5)
    kl = core_algos.agg_loss(core_algos.kl_penalty(new, ref, "low_var_kl"), keep.float(), loss_agg_mode)
    torch.testing.assert_close(with_kl, plain + 0.5 * kl)
    assert metrics["actor/kl_loss"] == pytest.approx(float(kl.detach()), rel=1e-5)


def test_seq_mean_divides_by_trajectories_with_kept_tokens():
    new, old, advantages, keep = dense_batch()
    loss, _ = policy_loss(new[keep], old[keep], advantages[keep], pack(keep), 6, CLIP_LOW, CLIP_HIGH)
    per_traj = []
    for row in range(6):
        kept = keep[row]
        if kept.any():
            only_row = torch.zeros(int(kept.sum()), dtype=torch.int64)
            per_traj.append(policy_loss(new[row][kept], old[row][kept], advantages[row][kept], only_row, 1,
                                        CLIP_LOW, CLIP_HIGH)[0])
    assert len(per_traj) == 5  # row 2 keeps nothing and is not counted
    torch.testing.assert_close(loss, torch.stack(per_traj).mean())


@pytest.mark.parametrize("use_weights", [False, True])
def test_micro_batches_sum_to_full_loss_and_gradient(use_weights):
    new, old, advantages, keep = dense_batch(seed=3)
    packed_new = new[keep].detach().requires_grad_()
    packed = (old[keep], advantages[keep], pack(keep))
    weights = torch.rand(packed_new.shape[0], generator=torch.Generator().manual_seed(5)) * 3 if use_weights else None
    full, _ = policy_loss(packed_new, *packed, 6, CLIP_LOW, CLIP_HIGH, weights=weights)
    full.backward()
    full_grad = packed_new.grad.clone()
    packed_new.grad = None

    counts = torch.bincount(packed[2], minlength=6)
    order = torch.randperm(packed_new.shape[0], generator=torch.Generator().manual_seed(4))
    total = torch.zeros(())
    for part in order.tensor_split(5):  # micro-batches cut across trajectories
        part_loss, _ = policy_loss(
            packed_new[part], packed[0][part], packed[1][part], packed[2][part], 6, CLIP_LOW, CLIP_HIGH,
            weights=None if weights is None else weights[part], traj_token_counts=counts,
        )
        part_loss.backward()
        total = total + part_loss.detach()

    torch.testing.assert_close(total, full.detach())
    torch.testing.assert_close(packed_new.grad, full_grad)


def test_weights_scale_token_terms_not_normalization():
    new, old, advantages, keep = dense_batch(seed=6)
    args = (new[keep], old[keep], advantages[keep], pack(keep), 6, CLIP_LOW, CLIP_HIGH)
    plain, _ = policy_loss(*args)
    ones, _ = policy_loss(*args, weights=torch.ones(int(keep.sum())))
    doubled, _ = policy_loss(*args, weights=torch.full((int(keep.sum()),), 2.0))
    torch.testing.assert_close(ones, plain)
    torch.testing.assert_close(doubled, 2 * plain)


def test_zero_advantages_give_zero_loss_and_gradient():
    new, old, _, keep = dense_batch(seed=7)
    packed_new = new[keep]
    loss, _ = policy_loss(packed_new, old[keep], torch.zeros(int(keep.sum())), pack(keep), 6, CLIP_LOW, CLIP_HIGH)
    (grad,) = torch.autograd.grad(loss, new)
    assert loss.item() == 0.0
    assert torch.all(grad == 0)


def test_clipping_and_dual_clip():
    log_prob = torch.log(torch.tensor([5.0, 5.0, 0.5]))  # ratios 5, 5, 0.5 against old log-prob 0
    old = torch.zeros(3)
    traj_id = torch.tensor([0, 1, 2])
    advantages = torch.tensor([1.0, -1.0, 1.0])

    def per_token(clip_ratio_c):
        return [
            policy_loss(log_prob[i : i + 1], old[:1], advantages[i : i + 1], traj_id[:1], 1, CLIP_LOW, CLIP_HIGH,
                        clip_ratio_c=clip_ratio_c)[0].item()
            for i in range(3)
        ]

    # A > 0, ratio 5 -> clipped at 1.4; A < 0, ratio 5 -> unclipped 5 (no dual clip) or 3 (dual clip 3);
    # A > 0, ratio 0.5 -> min picks the unclipped 0.5.
    assert per_token(None) == pytest.approx([-1.4, 5.0, -0.5], rel=1e-5)
    assert per_token(3.0) == pytest.approx([-1.4, 3.0, -0.5], rel=1e-5)
    _, metrics = policy_loss(log_prob, old, advantages, traj_id, 3, CLIP_LOW, CLIP_HIGH)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(1 / 3)
    assert all(isinstance(value, float) for value in metrics.values())


def test_policy_loss_rejects_bad_input():
    x = torch.zeros(4)
    traj_id = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="old_log_prob"):
        policy_loss(x, torch.zeros(3), x, traj_id, 2, CLIP_LOW, CLIP_HIGH)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(x, x, torch.zeros(4, 1), traj_id, 2, CLIP_LOW, CLIP_HIGH)
    with pytest.raises(ValueError, match="weights"):
        policy_loss(x, x, x, traj_id, 2, CLIP_LOW, CLIP_HIGH, weights=torch.ones(5))
    with pytest.raises(ValueError, match="log_prob"):
        policy_loss(torch.zeros(0), torch.zeros(0), torch.zeros(0), traj_id[:0], 2, CLIP_LOW, CLIP_HIGH)
    with pytest.raises(ValueError, match="traj_id"):
        policy_loss(x, x, x, traj_id.int(), 2, CLIP_LOW, CLIP_HIGH)
    with pytest.raises(ValueError, match="traj_id"):
        policy_loss(x, x, x, traj_id, 1, CLIP_LOW, CLIP_HIGH)
    with pytest.raises(ValueError, match="traj_token_counts"):
        policy_loss(x, x, x, traj_id, 2, CLIP_LOW, CLIP_HIGH, traj_token_counts=torch.tensor([2, 1]))
    with pytest.raises(ValueError, match="traj_token_counts"):
        policy_loss(x, x, x, traj_id, 2, CLIP_LOW, CLIP_HIGH, traj_token_counts=torch.tensor([2, 2, 0]))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        policy_loss(x, x, x, traj_id, 2, CLIP_LOW, CLIP_HIGH, loss_agg_mode="seq-sum")
    with pytest.raises(ValueError, match="horizon"):
        policy_loss(x, x, x, traj_id, 2, CLIP_LOW, CLIP_HIGH, loss_agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="ref_log_prob"):
        policy_loss(x, x, x, traj_id, 2, CLIP_LOW, CLIP_HIGH, ref_log_prob=torch.zeros(3), kl_coef=0.1)
