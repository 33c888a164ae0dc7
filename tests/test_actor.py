import copy
import json

import pytest
import torch
from verl import DataProto

import pcm_kernels as pk

from pcm_train.tools import compare_update
from verl.trainer.ppo import core_algos

from pcm_train.algorithm.actor import accumulate_gradients, chunk_log_probs, make_optimizer, mini_batches, update_actor
from pcm_train.algorithm.batch import shrink_batch
from pcm_train.config import load_config
from pcm_train.algorithm.controller import PCMController
from pcm_train.algorithm.grpo import policy_loss, token_mask
from pcm_train.policies import SmallVLA, SmallVLAConfig
from pcm_train.integrations.simplevla import pcm_shrink_batch
from pcm_train.tools.synthetic import synthetic_rollout_batch

C = 8


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return SmallVLA(SmallVLAConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   image_size=16, vision_width=32, vision_layers=1, vision_heads=2))


@pytest.fixture(scope="module")
def batch(policy):
    return synthetic_rollout_batch(policy, num_prompts=2, group_size=3, num_chunks=C, seed=1)


def _shrink(policy, batch, *overrides):
    cfg = load_config(list(overrides))
    kept, sel = pcm_shrink_batch(batch, PCMController(cfg.pcm, seed=0),
                                 action_token_start=policy.config.action_token_start)
    return cfg, kept, sel


def _grads(policy):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in policy.parameters()]


def kept_chunk_mask(index, num_chunks):
    """bool [N, num_chunks]: the chunks named by ``index`` int64 [N, B] (-1 = none)."""
    kept = torch.zeros(index.shape[0], num_chunks, dtype=torch.bool)
    traj, slot = (index >= 0).nonzero(as_tuple=True)
    kept[traj, index[traj, slot]] = True
    return kept


def masked_dense_grads(policy, batch, chunk_kept, cfg):
    """Gradient of the full-batch loss (padded per-chunk forward of every chunk) over the valid tokens of
    the chunks ``chunk_kept`` bool [N, C] marks: one tensor per parameter."""
    N = batch.batch["responses"].shape[0]
    logits = policy.action_logits(batch.batch["input_ids"].flatten(0, 1), batch.batch["attention_mask"].flatten(0, 1),
                                  batch.batch["pixel_values"].flatten(0, 1))
    logp = policy.log_probs(logits, batch.batch["responses"].flatten(0, 1), cfg.actor.temperature).view(N, -1)
    mask = token_mask(batch.batch["finish_step"], C) & chunk_kept.repeat_interleave(56, dim=1)
    traj = torch.arange(N).unsqueeze(-1).expand_as(mask)
    loss, _ = policy_loss(logp[mask], batch.batch["old_log_probs"][mask], batch.batch["advantages"][mask],
                          traj[mask], N, cfg.actor.clip_ratio_low, cfg.actor.clip_ratio_high)
    policy.zero_grad()
    loss.backward()
    return _grads(policy)


def _dense_masked_update(policy, batch, index, chunk_weights, cfg, mini_batch, generator):
    """The reference update: every chunk of every trajectory through a padded per-chunk forward, a 0/1
    mask of kept valid tokens (x 1/q where ``chunk_weights`` [N, B] is given), one optimizer step
    (plain SGD) per mini-batch of a seeded permutation, ratios against the rollout's log-probs."""
    N = batch.batch["responses"].shape[0]
    chunk_kept = kept_chunk_mask(index, C)
    token_weight = torch.zeros(N, C)
    if chunk_weights is not None:
        token_weight.scatter_(1, index.clamp(min=0), torch.where(index >= 0, chunk_weights, 0.0))
    token_weight = token_weight.repeat_interleave(56, dim=1)
    valid = token_mask(batch.batch["finish_step"], C)
    kept_tokens = valid & chunk_kept.repeat_interleave(56, dim=1)
    counts = (valid if chunk_weights is not None else kept_tokens).sum(-1)
    traj = torch.arange(N).unsqueeze(-1).expand_as(valid)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(trainable, lr=cfg.actor.lr)
    for _ in range(cfg.actor.ppo_epochs):
        order = torch.randperm(N, generator=generator).tolist()
        for start in range(0, N, mini_batch):
            members = torch.zeros(N, dtype=torch.bool)
            members[order[start:start + mini_batch]] = True
            mask = kept_tokens & members.unsqueeze(-1)
            logits = policy.action_logits(batch.batch["input_ids"].flatten(0, 1),
                                          batch.batch["attention_mask"].flatten(0, 1),
                                          batch.batch["pixel_values"].flatten(0, 1))
            logp = policy.log_probs(logits, batch.batch["responses"].flatten(0, 1),
                                    cfg.actor.temperature).view(N, -1)
            loss, _ = policy_loss(logp[mask], batch.batch["old_log_probs"][mask], batch.batch["advantages"][mask],
                                  traj[mask], N, cfg.actor.clip_ratio_low, cfg.actor.clip_ratio_high,
                                  weights=token_weight[mask] if chunk_weights is not None else None,
                                  traj_token_counts=counts * members,
                                  num_sequences=float((members & (valid.sum(-1) > 0)).sum()))
            sgd.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.actor.grad_clip)
            sgd.step()


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("mini_batch,epochs,micro", [(3, 1, 1), (2, 2, 2), (6, 2, 4)])
def test_mini_batched_shrunk_update_equals_masked_dense(policy, batch, unbiased, mini_batch, epochs, micro):
    cfg = load_config(["pcm.budget=3", "actor.lr=5", f"actor.ppo_epochs={epochs}",
                       f"actor.micro_batch_trajectories={micro}"])
    N = batch.batch["responses"].shape[0]
    _, _, sel = _shrink(policy, batch, "pcm.budget=3")
    chunk_weights = (1 + torch.rand(sel.index.shape, generator=torch.Generator().manual_seed(3)) * 3) \
        * (sel.index >= 0) if unbiased else None
    kept = shrink_batch(batch, sel.index, action_chunk=8, action_dim=7, chunk_weights=chunk_weights)
    start = copy.deepcopy(policy.state_dict())
    try:
        trainable = [p for p in policy.parameters() if p.requires_grad]
        stats, metrics, _ = update_actor(policy, torch.optim.SGD(trainable, lr=cfg.actor.lr), kept, cfg.actor,
                                         mini_batch_trajectories=mini_batch,
                                         generator=torch.Generator().manual_seed(7))
        shrunk = copy.deepcopy(policy.state_dict())
        policy.load_state_dict(start)
        _dense_masked_update(policy, batch, sel.index, chunk_weights, cfg, mini_batch,
                             torch.Generator().manual_seed(7))
        for name, value in policy.state_dict().items():
            # lr=5 SGD amplifies float32 rounding (~1e-5 of the step after 4 steps); a wrong mask or
            # weight moves parameters by the order of the step itself.
            step = (value - start[name]).abs().max().item()
            gap = (shrunk[name] - value).abs().max().item()
            assert gap <= 1e-4 * step + 1e-7, f"{name}: updates differ by {gap:.3g}, step size {step:.3g}"
        assert any(not torch.equal(shrunk[n], start[n]) for n in start)
        steps = epochs * -(-N // mini_batch)
        assert stats.optimizer_steps == steps and metrics["actor/optimizer_steps"] == steps
        if steps > 1:
            assert metrics["actor/pg_clipfrac"] > 0 and metrics["actor/ppo_kl"] != 0
    finally:
        policy.load_state_dict(start)


def test_micro_batch_size_never_changes_the_update(policy, batch):
    cfg, kept, _ = _shrink(policy, batch, "pcm.budget=3", "actor.lr=0.5", "actor.ppo_epochs=2")
    start = copy.deepcopy(policy.state_dict())
    results = []
    try:
        for micro in (1, 2, 6):
            policy.load_state_dict(start)
            cfg.actor.micro_batch_trajectories = micro
            trainable = [p for p in policy.parameters() if p.requires_grad]
            update_actor(policy, torch.optim.SGD(trainable, lr=cfg.actor.lr), kept, cfg.actor,
                         mini_batch_trajectories=3, generator=torch.Generator().manual_seed(1))
            results.append(copy.deepcopy(policy.state_dict()))
        for other in results[1:]:
            for name, value in results[0].items():
                torch.testing.assert_close(other[name], value, rtol=1e-5, atol=1e-7)
    finally:
        policy.load_state_dict(start)


def test_mini_batches_shuffle_from_the_generator():
    a = mini_batches(10, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    b = mini_batches(10, 4, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert a == b and [len(m) for m in a] == [4, 4, 2]
    assert sorted(t for m in a for t in m) == list(range(10))
    assert mini_batches(5, None, shuffle=False) == [[0, 1, 2, 3, 4]]
    assert mini_batches(5, 2, shuffle=False) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="mini_batch_trajectories"):
        mini_batches(5, 0, shuffle=False)


def test_kl_to_the_base_policy_adds_verl_low_var_kl(batch):
    """The reference is the base (adapters disabled): zero KL while LoRA is the identity, then the loss
    grows by kl_coef x verl's low_var_kl between the adapted and the base log-probs."""
    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=16, vision_width=32, vision_layers=1, vision_heads=2))
    fresh = synthetic_rollout_batch(policy, num_prompts=2, group_size=3, num_chunks=C, seed=1)
    policy.add_lora(4, 4)
    cfg, kept, _ = _shrink(policy, fresh, "pcm.budget=3", "actor.lr=1e-2", "actor.kl_coef=0.1")
    acc, _ = accumulate_gradients(policy, kept, cfg.actor)
    assert acc.kl_loss == 0.0
    update_actor(policy, make_optimizer(policy, cfg.actor), kept, cfg.actor, mini_batch_trajectories=3,
                 generator=torch.Generator().manual_seed(0))
    policy.zero_grad()
    with_kl, _ = accumulate_gradients(policy, kept, cfg.actor)
    cfg.actor.kl_coef = 0.0
    policy.zero_grad()
    without, _ = accumulate_gradients(policy, kept, cfg.actor)
    mask = kept.batch["response_mask"]
    with torch.no_grad():
        adapted = chunk_log_probs(policy, kept.batch, cfg.actor.temperature)
        with policy.adapters_disabled():
            base = chunk_log_probs(policy, kept.batch, cfg.actor.temperature)
    counts = kept.meta_info["traj_token_counts"].float()
    per_token = core_algos.kl_penalty(adapted, base, "low_var_kl")
    traj = kept.batch["traj_index"].unsqueeze(-1).expand_as(mask)
    expected = (per_token[mask] / counts[traj[mask]]).sum() / kept.meta_info["num_traj"]
    assert with_kl.kl_loss > 0
    assert with_kl.kl_loss == pytest.approx(float(expected), rel=1e-4)
    assert with_kl.loss == pytest.approx(without.loss + 0.1 * with_kl.kl_loss, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("micro", [1, 4])
def test_shrinking_equals_masking(policy, batch, micro):
    cfg, kept, sel = _shrink(policy, batch, "pcm.budget=3", f"actor.micro_batch_trajectories={micro}")
    # move the policy off its rollout weights so ratios differ from 1 and clipping can engage
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    policy.zero_grad()
    accumulate_gradients(policy, kept, cfg.actor)
    shrunk = _grads(policy)
    masked = masked_dense_grads(policy, batch, kept_chunk_mask(sel.index, C), cfg)
    for a, b in zip(shrunk, masked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in shrunk)


def test_budget_covering_every_chunk_equals_full(policy, batch):
    _, kept_pcm, sel_pcm = _shrink(policy, batch, f"pcm.budget={C}")
    cfg, kept_full, sel_full = _shrink(policy, batch, "pcm.strategy=full")
    assert torch.equal(sel_pcm.index[:, :C], sel_full.index)
    for key in kept_full.batch.keys():
        assert torch.equal(kept_pcm.batch[key], kept_full.batch[key]), key
    policy.zero_grad()
    accumulate_gradients(policy, kept_pcm, cfg.actor)
    a = _grads(policy)
    policy.zero_grad()
    accumulate_gradients(policy, kept_full, cfg.actor)
    for x, y in zip(a, _grads(policy)):
        assert torch.equal(x, y)


def test_zero_learning_rate_leaves_the_weights_unchanged():
    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=16, vision_width=32, vision_layers=1, vision_heads=2))
    fresh = synthetic_rollout_batch(policy, num_prompts=2, group_size=3, num_chunks=C, seed=1)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    cfg, kept, _ = _shrink(policy, fresh, "pcm.budget=3", "actor.lr=0", "actor.weight_decay=0.1")
    stats, _, _ = update_actor(policy, make_optimizer(policy, cfg.actor), kept, cfg.actor)
    assert stats.grad_norm > 0  # gradients were computed, the step moved nothing
    for n, p in policy.named_parameters():
        assert torch.equal(p, before[n]), n


def test_update_trains_lora_only_and_scatters_log_probs(batch):
    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     image_size=16, vision_width=32, vision_layers=1, vision_heads=2))
    fresh = synthetic_rollout_batch(policy, num_prompts=2, group_size=3, num_chunks=C, seed=1)
    policy.add_lora(4, 4)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    cfg, kept, sel = _shrink(policy, fresh, "pcm.budget=3", "actor.lr=1e-2")
    stats, metrics, new_log_probs = update_actor(policy, make_optimizer(policy, cfg.actor), kept, cfg.actor)
    assert stats.chunks == int((sel.index >= 0).sum()) and stats.tokens == int(kept.batch["response_mask"].sum())
    assert stats.activation_bytes > 0 and stats.peak_memory_bytes > 0 and stats.update_time_s > 0
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_loss"} <= set(metrics)
    for n, p in policy.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trainable[n]) for n, p in policy.named_parameters() if n in trainable)
    # LoRA starts as the identity: log-probs at the start equal the rollout's, in SimpleVLA-RL's layout
    N = fresh.batch["finish_step"].shape[0]
    chunk_kept = kept_chunk_mask(sel.index, C)
    mask = token_mask(fresh.batch["finish_step"], C) & chunk_kept.repeat_interleave(56, dim=1)
    assert new_log_probs.shape == (N, C * 56)
    torch.testing.assert_close(new_log_probs[mask], fresh.batch["old_log_probs"][mask], rtol=1e-4, atol=1e-5)
    assert (new_log_probs[~chunk_kept.repeat_interleave(56, dim=1)] == 0).all()


def test_left_padded_prompts_give_the_same_update(policy, batch):
    cfg, kept, _ = _shrink(policy, batch, "pcm.budget=3")
    policy.zero_grad()
    accumulate_gradients(policy, kept, cfg.actor)
    expected = _grads(policy)
    ids, mask = kept.batch["input_ids"], kept.batch["attention_mask"]
    lengths = mask.sum(-1, keepdim=True)
    shift = (torch.arange(ids.shape[1]) - (ids.shape[1] - lengths)) % ids.shape[1]
    kept.batch["input_ids"], kept.batch["attention_mask"] = ids.gather(1, shift), mask.gather(1, shift)
    assert (kept.batch["attention_mask"][:, -1] == 1).all()
    policy.zero_grad()
    accumulate_gradients(policy, kept, cfg.actor)
    for a, b in zip(_grads(policy), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_shrink_batch_rows_and_normalization(policy, batch):
    _, kept, sel = _shrink(policy, batch, "pcm.budget=2")
    N = batch.batch["finish_step"].shape[0]
    rows = [(n, c) for n in range(N) for c in sel.index[n].tolist() if c >= 0]
    assert kept.batch["traj_index"].tolist() == [n for n, _ in rows]
    assert kept.batch["chunk_index"].tolist() == [c for _, c in rows]
    for m, (n, c) in enumerate(rows):
        assert torch.equal(kept.batch["responses"][m], batch.batch["responses"][n, c])
        assert torch.equal(kept.batch["advantages"][m], batch.batch["advantages"][n, c * 56:(c + 1) * 56])
    expected_counts = torch.zeros(N, dtype=torch.int64)
    for m, (n, _) in enumerate(rows):
        expected_counts[n] += int(kept.batch["response_mask"][m].sum())
    assert torch.equal(kept.meta_info["traj_token_counts"], expected_counts)


def test_fingers_signal_labels_from_the_recorded_gripper(policy, batch):
    """pcm.gripper_signal=fingers: the phases come from batch['gripper'] (the env's fingers), not the decoded
    commands; a batch without it, or with the wrong shape, is refused naming the key."""
    _, _, from_commands = _shrink(policy, batch, "pcm.strategy=full")
    N, steps = batch.batch["responses"].shape[0], batch.batch["finish_step"]
    fingers = torch.where(torch.arange(C * 8) >= 12, 1.0, -1.0).expand(N, -1).reshape(N, C, 8).contiguous()
    recorded = DataProto.from_dict(tensors={**batch.batch, "gripper": fingers},
                                   non_tensors={"uid": batch.non_tensor_batch["uid"]})
    controller = PCMController(load_config(["pcm.strategy=full", "pcm.gripper_signal=fingers",
                                            "env.suite=metaworld"]).pcm, seed=0)
    start = policy.config.action_token_start
    _, selection = pcm_shrink_batch(recorded, controller, action_token_start=start)
    torch.testing.assert_close(selection.labels, pk.label_phases(fingers, steps, close_above=0.0), rtol=0, atol=0)
    assert not torch.equal(selection.labels, from_commands.labels)
    with pytest.raises(KeyError, match="batch\\['gripper'\\]"):
        pcm_shrink_batch(batch, controller, action_token_start=start)
    wrong = DataProto.from_dict(tensors={**batch.batch, "gripper": fingers[:, :, :4].contiguous()},
                                non_tensors={"uid": batch.non_tensor_batch["uid"]})
    with pytest.raises(ValueError, match="batch\\['gripper'\\] must be float"):
        pcm_shrink_batch(wrong, controller, action_token_start=start)


def test_bad_batches_are_rejected(policy, batch):
    controller = PCMController(load_config([]).pcm)
    start = policy.config.action_token_start
    missing = DataProto.from_dict(tensors={k: v for k, v in batch.batch.items() if k != "advantages"},
                                  non_tensors={"uid": batch.non_tensor_batch["uid"]})
    with pytest.raises(KeyError, match="advantages"):
        pcm_shrink_batch(missing, controller, action_token_start=start)
    too_long = batch.batch.clone()
    too_long["finish_step"] = too_long["finish_step"] + 8 * C
    with pytest.raises(ValueError, match="finish_step"):
        pcm_shrink_batch(DataProto(batch=too_long, non_tensor_batch=batch.non_tensor_batch), controller,
                         action_token_start=start)
    wrong = batch.batch.clone()
    wrong["old_log_probs"] = wrong["old_log_probs"][:, :10]
    with pytest.raises(ValueError, match="old_log_probs"):
        pcm_shrink_batch(DataProto(batch=wrong, non_tensor_batch=batch.non_tensor_batch), controller,
                         action_token_start=start)
    no_uid = DataProto(batch=batch.batch, non_tensor_batch={})
    with pytest.raises(KeyError, match="uid"):
        pcm_shrink_batch(no_uid, controller, action_token_start=start)
    with pytest.raises(TypeError, match="DataProto"):
        pcm_shrink_batch({"responses": 1}, controller, action_token_start=start)
    with pytest.raises(ValueError, match="index"):
        shrink_batch(batch, torch.full((3, 2), 0), action_chunk=8, action_dim=7)
    with pytest.raises(Exception, match="pcm.budget"):
        load_config(["pcm.budget=0"])


def test_compare_update_json(capsys):
    code = compare_update.main(["--num-prompts", "1", "--group-size", "2", "--chunks", "16", "--hidden", "16",
                                "--layers", "1", "--image-size", "16", "--repeats", "1", "--budget", "4", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert {"update_time_ratio", "activation_memory_reduction", "device", "select_time_s"} <= set(report)
    assert 0 < report["select_share_of_pcm_update"] < 1
    assert report["modes"]["pcm"]["chunks"] <= 2 * 4 < report["modes"]["full"]["chunks"]
    assert 0 < report["activation_memory_reduction"] < 1
    # two trajectories per optimizer step: each mode ran at its fastest of 1 and 2 trajectories per micro-batch
    assert report["micro_batch"].startswith("searched")
    for mode in compare_update.MODES:
        r = report["modes"][mode]
        search = {int(m): t for m, t in r["micro_batch_search_s"].items()}
        assert set(search) == {1, 2} and r["micro_batch_trajectories"] == min(search, key=search.get)
    assert report["token_ratio"] == report["modes"]["full"]["chunks"] / report["modes"]["pcm"]["chunks"] > 1


def test_compare_update_given_micro_batch_is_used_by_every_mode(capsys):
    code = compare_update.main(["--num-prompts", "1", "--group-size", "2", "--chunks", "8", "--hidden", "16",
                                "--layers", "1", "--image-size", "16", "--repeats", "1", "--budget", "2",
                                "--micro-batch", "2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["micro_batch"] == "given: every mode at 2 trajectories per micro-batch"
    assert {r["micro_batch_trajectories"] for r in report["modes"].values()} == {2}
    assert all("micro_batch_search_s" not in r for r in report["modes"].values())


def test_micro_batch_candidates():
    assert compare_update.micro_batch_candidates(1) == [1]
    assert compare_update.micro_batch_candidates(8) == [1, 2, 4, 8]
    assert compare_update.micro_batch_candidates(12) == [1, 2, 4, 8, 12]


def test_gradient_checkpointing_saves_activations_same_gradients(policy, batch):
    cfg, kept, _ = _shrink(policy, batch, "pcm.budget=3")
    policy.zero_grad()
    plain, _ = accumulate_gradients(policy, kept, cfg.actor)
    expected = _grads(policy)
    policy.enable_gradient_checkpointing()
    try:
        policy.zero_grad()
        checkpointed, _ = accumulate_gradients(policy, kept, cfg.actor)
        for a, b in zip(_grads(policy), expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert checkpointed.activation_peak < plain.activation_peak
    finally:
        policy._causal_lm().gradient_checkpointing_disable()


def test_compare_update_rejects_bad_flags():
    with pytest.raises(SystemExit):
        compare_update.parse_args(["--budget", "0"])
    with pytest.raises(SystemExit):
        compare_update.parse_args(["--group-size", "1"])
