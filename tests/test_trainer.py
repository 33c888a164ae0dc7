"""The training loop on a fake env pool: metrics, checkpoints, resume, Ctrl-C, reports, errors."""
import json
import time

import numpy as np
import pytest
import torch

from pcm_train.tools import report
from pcm_train.training.checkpoint import latest_checkpoint, load_trainer_state
from pcm_train.config import load_config
from pcm_train.training.metrics_log import read_metrics
from pcm_train.training.rollout import Episode, collect_rollouts
from pcm_train.run import resolve_overrides
from pcm_train.training.trainer import Trainer

from fake_env import FakePool, fake_pool_factory

TINY = ["preset=quick_image", "rollout.max_chunks=6", "rollout.prompts_per_step=2", "rollout.group_size=3",
        "pcm.budget=2", "trainer.total_steps=2", "trainer.val_every=2", "trainer.val_episodes=2",
        "trainer.save_every=1", "policy.hidden_size=16", "policy.num_layers=1", "policy.image_size=16",
        "env.task_ids=[0,1]"]


def _trainer(tmp_path, *extra, name="run"):
    cfg = load_config(TINY + [f"trainer.output_dir={tmp_path / name}"] + list(extra))
    return Trainer(cfg, fake_pool_factory(close_steps=6))


def test_rollout_batch_layout():
    from pcm_train.policies import SmallVLA, SmallVLAConfig

    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    pool = FakePool(image_size=16, close_steps=10, max_steps=40)
    episodes = [Episode(0, 1, "a"), Episode(0, 1, "a"), Episode(1, 2, "b")]
    batch = collect_rollouts(policy, pool, episodes, max_chunks=5, temperature=1.6,
                             generator=torch.Generator().manual_seed(0))
    b = batch.batch
    assert b["responses"].shape == (3, 5, 56) and b["old_log_probs"].shape == (3, 280)
    assert b["input_ids"].shape[:2] == (3, 5) and b["pixel_values"].shape == (3, 5, 3, 16, 16)
    assert b["gripper"].shape == (3, 5, 8)
    finish = b["finish_step"]
    assert ((finish > 0) & (finish <= 40)).all()
    for e in range(3):
        valid_chunks = (int(finish[e]) + 7) // 8
        assert (b["old_log_probs"][e, valid_chunks * 56:] == 0).all()
        assert (b["old_log_probs"][e, : valid_chunks * 56] < 0).all()
        closes = int((b["gripper"][e] > 0).sum())
        assert bool(b["complete"][e]) == (closes >= 10)
    assert list(batch.non_tensor_batch["uid"]) == ["a", "a", "b"]


class FingersPool(FakePool):
    """Reports fingers that close on the episode's 5th step, whatever the commands."""

    def step_chunk(self, actions, active):
        before = [episode[2] for episode in self.episodes]
        result = super().step_chunk(actions, active)
        result.gripper_closed = [np.arange(before[e], before[e] + result.steps[e]) >= 4 for e in range(len(before))]
        return result


def test_rollout_labels_phases_from_the_fingers_when_asked():
    """gripper_signal="fingers": the batch's gripper is +1 where the env reported the fingers closed, -1 where
    open (never the commands); an env that does not report them is refused naming the option."""
    from pcm_train.policies import SmallVLA, SmallVLAConfig

    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    episodes = [Episode(0, 1, "a"), Episode(1, 2, "b"), Episode(1, 2, "b")]
    batches = {signal: collect_rollouts(policy, FingersPool(image_size=16, close_steps=10, max_steps=40, num_slots=2),
                                        episodes, max_chunks=5, temperature=1.6, gripper_signal=signal,
                                        generator=torch.Generator().manual_seed(0))
               for signal in ("command", "fingers")}
    command, fingers = batches["command"].batch, batches["fingers"].batch
    torch.testing.assert_close(fingers["responses"], command["responses"], rtol=0, atol=0)
    for e in range(len(episodes)):
        executed = int(fingers["finish_step"][e])
        signal = fingers["gripper"][e].flatten()
        expected = torch.where(torch.arange(executed) >= 4, 1.0, -1.0)
        torch.testing.assert_close(signal[:executed], expected, rtol=0, atol=0)
        assert (signal[executed:] == -1).all()
    assert not torch.equal(command["gripper"], fingers["gripper"])  # the commands are the policy's, not the fingers
    with pytest.raises(ValueError, match="gripper_signal='fingers' needs an env that reports its fingers"):
        collect_rollouts(policy, FakePool(image_size=16), episodes[:1], max_chunks=2, temperature=1.6,
                         gripper_signal="fingers")
    with pytest.raises(ValueError, match="gripper_signal must be one of"):
        collect_rollouts(policy, FakePool(image_size=16), episodes[:1], max_chunks=2, temperature=1.6,
                         gripper_signal="sensor")


def test_trainer_labels_phases_from_the_fingers(tmp_path):
    """pcm.gripper_signal=fingers end to end: the controller is handed the env's finger signal, not the commands."""
    cfg = load_config(TINY + ["env.suite=metaworld", "pcm.gripper_signal=fingers",
                              f"trainer.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, lambda cfg, image_size: FingersPool(image_size=image_size, close_steps=6, max_steps=48))
    seen = []
    step = trainer.controller.step
    trainer.controller.step = lambda gripper, num_steps, *args: seen.append((gripper, num_steps)) or step(
        gripper, num_steps, *args)
    try:
        trainer.collect()
    finally:
        trainer.close()
    (gripper, num_steps), = seen
    for signal, steps in zip(gripper.flatten(1), num_steps.tolist()):
        torch.testing.assert_close(signal[:steps], torch.where(torch.arange(steps) >= 4, 1.0, -1.0), rtol=0, atol=0)


def test_rollout_refilling_slots_equals_one_batch_in_flight():
    """Env reuse: a pool with 3 slots runs 7 episodes, each slot refilled with the next episode as soon as
    its own ends; greedy rollouts equal those of a pool holding all 7 at once, with the prompts padded alike."""
    from pcm_train.policies import SmallVLA, SmallVLAConfig

    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    episodes = [Episode(task, state, f"{task}") for task, state in [(0, 1), (0, 1), (0, 2), (12, 3), (12, 3),
                                                                      (1, 4), (1, 5)]]
    batches, pools = [], []
    for slots in (None, 3):
        pools.append(FakePool(image_size=16, close_steps=10, max_steps=40, num_slots=slots))
        batches.append(collect_rollouts(policy, pools[-1], episodes, max_chunks=5, temperature=1.6, greedy=True))
    assert [pool.resets for pool in pools] == [1, 1] and pools[0].refills == 0 and pools[1].refills >= 2
    whole, waves = batches
    assert whole.batch["input_ids"].shape[-1] != policy.encode_prompts(["put object 0 in the basket"])[0].shape[-1]
    for key in whole.batch.keys():
        torch.testing.assert_close(waves.batch[key], whole.batch[key], rtol=0, atol=1e-6, msg=key)
    assert list(waves.non_tensor_batch["uid"]) == [e.uid for e in episodes]
    assert list(waves.non_tensor_batch["task_id"]) == [e.task_id for e in episodes]


class TimedPool(FakePool):
    """A FakePool whose envs report 5 ms of work per episode per reset or chunk, and take real time doing it."""

    env_busy_s = 0.0
    workers = [None, None]

    def reset(self, episodes):
        self.env_busy_s += 0.005 * len(episodes)
        return super().reset(episodes)

    def refill(self, positions, episodes):
        self.env_busy_s += 0.005 * len(episodes)
        return super().refill(positions, episodes)

    def step_chunk(self, actions, active):
        time.sleep(0.002)
        self.env_busy_s += 0.005 * int(np.sum(active & ~np.array([e[3] >= self.close_steps for e in self.episodes])))
        return super().step_chunk(actions, active)


def test_rollout_stats_split_the_wall_clock():
    from pcm_train.policies import SmallVLA, SmallVLAConfig
    from pcm_train.training.rollout import RolloutStats

    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    episodes = [Episode(task, state, f"{task}") for task, state in [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5)]]
    pool = TimedPool(image_size=16, close_steps=10, max_steps=40, num_slots=2)
    stats = RolloutStats()
    batch = collect_rollouts(policy, pool, episodes, max_chunks=5, temperature=1.6, stats=stats)
    assert stats.env_steps == int(batch.batch["finish_step"].sum()) > 0
    chunks = int(((batch.batch["finish_step"] + 7) // 8).sum())  # chunks each episode was stepped
    assert stats.env_s == pytest.approx(0.005 * (len(episodes) + chunks))  # resets, refills and chunks
    assert stats.wait_s >= 0.002 * 5 and stats.policy_s > 0
    assert stats.policy_s + stats.wait_s <= stats.wall_s
    row = stats.metrics()
    assert row["rollout/env_steps_per_s"] == pytest.approx(stats.env_steps / stats.wall_s)
    assert row["rollout/env_busy_fraction"] == pytest.approx(stats.env_s / (2 * stats.wall_s))
    # a pool that does not report its envs' time: no env_s, no busy fraction
    plain = RolloutStats()
    collect_rollouts(policy, FakePool(image_size=16, close_steps=10, max_steps=40), episodes, max_chunks=5,
                     temperature=1.6, stats=plain)
    assert plain.env_s is None and "rollout/env_s" not in plain.metrics() and plain.env_steps > 0


def test_rollout_waves_check_the_pools_prompts():
    from pcm_train.policies import SmallVLA, SmallVLAConfig

    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    class WrongLanguagePool(FakePool):
        def _obs(self, e):
            return {**super()._obs(e), "language": "another instruction"}

    pool = WrongLanguagePool(image_size=16, num_slots=1)
    with pytest.raises(RuntimeError, match="pool.language"):
        collect_rollouts(policy, pool, [Episode(0, 1, "a"), Episode(1, 1, "b")], max_chunks=2, temperature=1.6)


@pytest.mark.parametrize("strategy", ["full", "random", "top_phase", "pcm"])
def test_two_steps_write_metrics_checkpoint_and_report(tmp_path, strategy):
    trainer = _trainer(tmp_path, f"pcm.strategy={strategy}")
    assert trainer.run()
    trainer.close()
    rows = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    for key in ("success_rate", "update_time_s", "rollout_time_s", "step_time_s", "update_share",
                "rollout/policy_s", "rollout/wait_s", "rollout/env_steps_per_s",
                "activation_bytes", "pcm/keep_prob/active_grip", "pcm/kept_per_traj/active_grip", "actor/pg_loss"):
        assert key in rows[0], key
    for key in ("val/held_out/greedy/success_rate", "val/held_out/sample@1.0/success_rate"):
        assert key in rows[1] and key not in rows[0]
    if strategy != "full":
        assert rows[0]["chunks_kept"] <= 6 * 2
    assert latest_checkpoint(trainer.run_dir).name == "step_000001"
    assert list((trainer.run_dir / "tensorboard").iterdir())
    paths = report.write_report([trainer.run_dir])
    assert all(p.stat().st_size > 0 for p in paths)
    assert "| run |" in (trainer.run_dir / "report" / "summary.md").read_text()


def test_resume_continues_identically(tmp_path):
    straight = _trainer(tmp_path, "trainer.total_steps=3", name="straight")
    straight.run()
    straight.close()
    first = _trainer(tmp_path, "trainer.total_steps=3", name="resumed")
    first.cfg.trainer.total_steps = 2
    first.run()
    first.close()
    cfg = load_config(resolve_overrides([f"resume={tmp_path / 'resumed'}"]))
    assert cfg.trainer.total_steps == 3
    resumed = Trainer(cfg, fake_pool_factory(close_steps=6))
    assert resumed.step == 2
    resumed.run()
    resumed.close()
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2]
    for key in ("success_rate", "chunks_kept", "pcm/keep_prob/active_grip", "episode_steps_mean"):
        assert a[2][key] == b[2][key], key
    sa = load_trainer_state(latest_checkpoint(tmp_path / "straight"))
    sb = load_trainer_state(latest_checkpoint(tmp_path / "resumed"))
    assert sa["controller"]["keep_probs"].tolist() == sb["controller"]["keep_probs"].tolist()
    assert "action_generator" not in sb  # training episodes draw from their own seeded streams
    assert sa["episode_rng"] == sb["episode_rng"] and sa["episode_rng"]["bit_generator"] == "PCG64"


def test_validation_outcomes_are_saved_per_episode_and_redone_on_resume(tmp_path):
    val = ["trainer.total_steps=3", "trainer.val_every=1", "trainer.val_episodes=3"]
    straight = _trainer(tmp_path, *val, name="straight")
    straight.run()
    straight.close()
    rows = read_metrics(tmp_path / "straight" / "validation.jsonl")
    assert [(r["step"], r["trained_steps"], r["decoder"], r["task"], r["placement"]) for r in rows[:3]] == \
        [(-1, 0, "greedy", 0, 40), (-1, 0, "greedy", 1, 40), (-1, 0, "greedy", 0, 41)]  # the start, held out
    assert [r["step"] for r in rows] == [-1] * 6 + [0] * 6 + [1] * 6 + [2] * 6  # greedy and sample@1.0
    metrics = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    for step in range(3):  # the step's success rates are the means of their episodes' outcomes
        for decoder in ("greedy", "sample@1.0"):
            outcomes = [r["success"] for r in rows if r["step"] == step and r["decoder"] == decoder]
            assert metrics[step][f"val/held_out/{decoder}/success_rate"] == pytest.approx(np.mean(outcomes))
    assert all(isinstance(r["success"], bool) and r["episode_steps"] > 0 for r in rows)
    # interrupted after step 1 with step 2's validation written but not checkpointed: the resume redoes it
    first = _trainer(tmp_path, *val, name="resumed")
    first.cfg.trainer.total_steps = 2
    first.run()
    first.close()
    with (tmp_path / "resumed" / "validation.jsonl").open("a") as f:
        f.write(json.dumps({"step": 2, "trained_steps": 3, "task": 0, "placement": 40, "success": False}) + "\n")
    resumed = Trainer(load_config(resolve_overrides([f"resume={tmp_path / 'resumed'}"])),
                      fake_pool_factory(close_steps=6))
    resumed.run()
    resumed.close()
    assert read_metrics(tmp_path / "resumed" / "validation.jsonl") == rows


def test_held_out_validation_takes_distinct_placements_no_training_prompt_uses(tmp_path):
    cfg = load_config(["preset=study_metaworld", "trainer.val_episodes=9", "trainer.val_decoders=[greedy]",
                       f"trainer.output_dir={tmp_path / 'run'}", "policy.hidden_size=16", "policy.num_layers=1"])
    trainer = Trainer(cfg, fake_pool_factory(close_steps=6, state_dim=39))
    try:
        episodes = trainer.val_plan()
        assert [(e.set_name, e.task, e.placement) for e in episodes] == [("held_out", t, s) for t, s in
            [(0, 50), (1, 50), (2, 50), (3, 50), (0, 51), (1, 51), (2, 51), (3, 51), (0, 52)]]
        trained = {(e.task_id, e.init_state_id) for _ in range(20) for e in trainer.train_episodes()}
        assert max(s for _, s in trained) < 40
    finally:
        trainer.close()
    with pytest.raises(ValueError, match=r"trainer.val_episodes \(201\) is more than the 200 distinct prompts"):
        Trainer(load_config(["preset=study_metaworld", "trainer.val_episodes=201",
                             f"trainer.output_dir={tmp_path / 'big'}"]), fake_pool_factory(state_dim=39))
    assert not (tmp_path / "big").exists()


def test_stop_request_saves_last_complete_step(tmp_path):
    trainer = _trainer(tmp_path, "trainer.total_steps=5", "trainer.save_every=0")
    original = trainer.train_step
    calls = []

    def step_then_interrupt():
        calls.append(trainer.step)
        if len(calls) == 2:
            trainer._request_stop(None, None)  # as if Ctrl-C arrived during step 1's rollout
        return original()

    trainer.train_step = step_then_interrupt
    assert trainer.run() is False
    trainer.close()
    assert latest_checkpoint(trainer.run_dir).name == "step_000000"
    assert [r["step"] for r in read_metrics(trainer.run_dir / "metrics.jsonl")] == [0]


def _outcome(rows):
    """Metrics rows without the wall-clock timings (which differ between any two runs)."""
    timing = ("_s", "_share", "/env_steps_per_s", "/env_busy_fraction", "peak_memory_bytes")
    return [{k: v for k, v in row.items() if not k.endswith(timing)} for row in rows]


def _assert_same_runs(straight, resumed):
    """Same metrics rows but the timings, same validation episodes, same final weights."""
    for name in ("metrics.jsonl", "validation.jsonl"):
        a, b = (read_metrics(t.run_dir / name) if (t.run_dir / name).exists() else [] for t in (straight, resumed))
        assert _outcome(b) == _outcome(a), name
    for (name, a), b in zip(straight.policy.state_dict().items(), resumed.policy.state_dict().values()):
        assert torch.equal(a, b), name


def _stop_in_validation(trainer, step: int) -> None:
    """Ctrl-C arrives while ``trainer`` validates step ``step`` (its update is done)."""
    validation_plan = trainer.val_plan

    def stopping():
        if trainer.step == step:
            trainer._request_stop(None, None)
        return validation_plan()

    trainer.val_plan = stopping


def test_stop_during_validation_saves_the_step_it_validates(tmp_path):
    """Ctrl-C during a validation (the step's update is done): the validation runs to its end and the step
    is saved with it; a resume continues exactly like an uninterrupted run."""
    settings = ["trainer.total_steps=3", "trainer.val_every=1", "trainer.save_every=0"]
    straight = _trainer(tmp_path, *settings, name="straight")
    assert straight.run()
    straight.close()
    first = _trainer(tmp_path, *settings, name="resumed")
    _stop_in_validation(first, 1)
    assert first.run() is False
    first.close()
    assert latest_checkpoint(first.run_dir).name == "step_000001"
    resumed = Trainer(load_config(resolve_overrides([f"resume={first.run_dir}"])), fake_pool_factory(close_steps=6))
    assert resumed.run()
    resumed.close()
    _assert_same_runs(straight, resumed)


def test_bad_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="env.task_ids"):
        _trainer(tmp_path, "env.task_ids=[0,57]")
    with pytest.raises(FileNotFoundError, match="resume"):
        Trainer(load_config(TINY + [f"resume={tmp_path / 'nothing'}"]), fake_pool_factory())
    with pytest.raises(FileNotFoundError, match="policy.path"):
        _trainer(tmp_path, f"policy.path={tmp_path}")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="trainer.device=cuda"):
            _trainer(tmp_path, "trainer.device=cuda")
    with pytest.raises(Exception, match="env.suite"):
        load_config(["env.suite=libero_100"])


def test_report_cli_compares_runs(tmp_path, capsys):
    for strategy in ("full", "pcm"):
        t = _trainer(tmp_path, f"pcm.strategy={strategy}", "trainer.total_steps=1", name=strategy)
        t.run()
        t.close()
    out = tmp_path / "compare"
    assert report.main([str(tmp_path / "full"), str(tmp_path / "pcm"), "--out", str(out)]) == 0
    summary = (out / "summary.md").read_text()
    assert "full" in summary and "pcm" in summary and "the speed of" in summary
    assert report.main([str(tmp_path / "missing")]) == 2
    assert json.loads((tmp_path / "pcm" / "config.json").read_text())["pcm"]["strategy"] == "pcm"


def test_wandb_offline_gets_the_same_metric_names(tmp_path, monkeypatch):
    """wandb offline (no network): every numeric metric of metrics.jsonl is logged under the same name
    against ``step``, written to the run's offline log under RUN/wandb; a resume continues the same run."""
    from pcm_train.training import metrics_log

    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    start_wandb = metrics_log._start_wandb

    def spy(*args, **kwargs):
        run = start_wandb(*args, **kwargs)
        log = run.log
        run.log = lambda data, *a, **k: (logged.append(dict(data)), log(data, *a, **k))
        return run

    monkeypatch.setattr(metrics_log, "_start_wandb", spy)
    overrides = ("trainer.loggers=[tensorboard,wandb]", "trainer.wandb_mode=offline")
    trainer = _trainer(tmp_path, *overrides, "trainer.total_steps=1")
    assert trainer.run()
    trainer.close()
    run_id = (trainer.run_dir / "wandb_run_id").read_text()
    resumed = Trainer(load_config(TINY + [f"resume={trainer.run_dir}", "trainer.total_steps=2", *overrides]),
                      fake_pool_factory(close_steps=6))
    assert resumed.run()
    resumed.close()
    assert (trainer.run_dir / "wandb_run_id").read_text() == run_id
    rows = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert [r["step"] for r in logged] == [r["step"] for r in rows] == [0, 1]
    for row, data in zip(rows, logged):
        numeric = {k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert numeric == set(data)
    offline = sorted((trainer.run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(offline) == 2  # one per process, same run id: `wandb sync` merges them
    # wandb's service writes the offline log asynchronously: give a loaded machine time to flush it
    deadline = time.monotonic() + 60
    while not all(b"actor/pg_clipfrac" in path.read_bytes() for path in offline) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(b"actor/pg_clipfrac" in path.read_bytes() for path in offline), [
        (path.name, path.stat().st_size) for path in offline]
    assert list((trainer.run_dir / "tensorboard").iterdir())


def test_sample_bins_per_row_streams_follow_the_law_and_ignore_the_batch():
    from pcm_train.policies.action_head import sample_bins

    probs = torch.softmax(torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0)), -1)
    # one CPU generator per row: a row's draws depend on its own stream only, not on its neighbours or order
    alone = sample_bins(probs[1:2], [torch.Generator().manual_seed(11)])
    together = sample_bins(probs[[2, 1, 0]], [torch.Generator().manual_seed(s) for s in (5, 11, 7)])
    assert torch.equal(alone[0], together[1]) and together.dtype == torch.int64 and together.shape == (3, 4)
    # the law: 20,000 rows of the same distribution, each its own stream, match the probabilities
    rows = probs[0:1, :1].expand(20000, 1, 6)
    draws = sample_bins(rows, [torch.Generator().manual_seed(s) for s in range(20000)]).flatten()
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    se = (probs[0, 0].double() * (1 - probs[0, 0].double()) / len(draws)).sqrt()
    assert ((freq - probs[0, 0].double()).abs() < 4 * se + 1e-4).all()
    # a zero-probability bin is never drawn
    spiky = torch.tensor([[[0.0, 0.5, 0.0, 0.5]]]).expand(500, 1, 4)
    assert set(sample_bins(spiky, [torch.Generator().manual_seed(s) for s in range(500)]).unique().tolist()) == {1, 3}
    with pytest.raises(ValueError, match="one per row"):
        sample_bins(probs, [torch.Generator()])


def test_seeded_episodes_roll_out_the_same_in_any_batch():
    """Own random streams: each episode's recorded tensors are the same whether it runs with all the
    others at once, in waves of 2 slots, or alone, and in any position."""
    from pcm_train.policies import SmallVLA, SmallVLAConfig
    from pcm_train.training.rollout import episode_seed

    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    episodes = [Episode(task, state, str(i), seed=episode_seed(3, 7, i))
                for i, (task, state) in enumerate([(0, 1), (0, 1), (1, 2), (2, 3), (1, 4)])]

    def roll(eps, slots=None):
        pool = FakePool(image_size=16, close_steps=6, max_steps=40, num_slots=slots)
        return collect_rollouts(policy, pool, eps, max_chunks=5, temperature=1.6,
                                generator=torch.Generator().manual_seed(99))
    whole, waves = roll(episodes), roll(episodes, slots=2)
    backwards = roll(episodes[::-1])
    for key in ("responses", "old_log_probs", "finish_step", "complete", "gripper"):
        torch.testing.assert_close(waves.batch[key], whole.batch[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(backwards.batch[key].flip(0), whole.batch[key], rtol=0, atol=1e-6, msg=key)
    alone = roll(episodes[3:4])
    assert torch.equal(alone.batch["responses"][0], whole.batch["responses"][3])
    # the two rollouts of one prompt differ (own streams), and a different run seed changes the draws
    assert not torch.equal(whole.batch["responses"][0], whole.batch["responses"][1])
    other = roll([Episode(e.task_id, e.init_state_id, e.uid, seed=episode_seed(4, 7, i))
                  for i, e in enumerate(episodes)])
    assert not torch.equal(other.batch["responses"], whole.batch["responses"])
    with pytest.raises(ValueError, match="all have a seed"):
        roll([episodes[0], Episode(0, 1, "x")])


class _WorkerStub:
    def __init__(self, workers):
        self.workers = workers

    def position_workers(self):
        return self.workers

    start_chunk = wait_any = finish_chunk = None


def test_pipeline_groups_split_whole_workers_evenly():
    from pcm_train.training.rollout import pipeline_groups

    assert pipeline_groups(_WorkerStub([0, 0, 1, 1, 2, 2]), 2) == [0, 0, 0, 0, 1, 1]
    assert pipeline_groups(_WorkerStub([1, 0, 1, 0]), 2) == [1, 0, 1, 0]
    assert pipeline_groups(_WorkerStub([0, 1, 2, 3]), 4) == [0, 1, 2, 3]
    assert pipeline_groups(_WorkerStub([0, 1, 2]), 8) == [0, 1, 2]  # at most one group per worker
    assert pipeline_groups(_WorkerStub([0, 1]), 1) is None  # lockstep asked for
    assert pipeline_groups(_WorkerStub([0, 0]), 2) is None  # one worker: nothing to overlap
    assert pipeline_groups(FakePool(image_size=16), 2) is None  # no send / wait / collect calls


def test_rollout_refuses_bad_pipeline_and_thread_counts():
    from pcm_train.training.rollout import Episode, collect_rollouts

    from pcm_train.policies import SmallVLA, SmallVLAConfig

    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    for bad in ({"pipeline": 0}, {"pipeline": 1.5}, {"policy_threads": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            collect_rollouts(policy, FakePool(image_size=16), [Episode(0, 0, "a")], max_chunks=2, temperature=1.0,
                             **bad)


def test_rollout_threads_follow_the_env_workers(monkeypatch):
    from pcm_train.config import load_config
    from pcm_train.training.trainer import rollout_threads

    class Pool:
        workers = [0, 1]

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert rollout_threads(load_config([]), Pool(), cpu) == 6  # the cores the env workers leave free
    assert rollout_threads(load_config([]), Pool(), gpu) is None
    assert rollout_threads(load_config(["env.policy_threads=3"]), Pool(), cpu) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert rollout_threads(load_config([]), Pool(), cpu) == 1  # 2 cores per rank, both taken: at least 1


def test_freed_envs_take_a_waiting_episode_of_their_own_task_first():
    """A freed env takes the first waiting episode of the task it is built for (no simulator rebuild), else the
    first waiting; in order when the draws depend on the order (one shared generator)."""
    from pcm_train.training.rollout import _next_episodes

    episodes = [Episode(task, 0, str(i)) for i, task in enumerate([0, 1, 2, 3, 2, 1, 0, 4])]
    waiting = [3, 4, 5, 6, 7]
    assert _next_episodes(waiting, [1, 9], episodes, any_order=True) == [5, 3]
    assert waiting == [4, 6, 7]
    waiting = [3, 4, 5, 6, 7]
    assert _next_episodes(waiting, [1, 9], episodes, any_order=False) == [3, 4] and waiting == [5, 6, 7]
    waiting = [7]
    assert _next_episodes(waiting, [0, 1], episodes, any_order=True) == [7] and waiting == []  # fewer than envs
