"""Rollout/update overlap (``trainer.overlap=true``) on the fake env pool: which weights roll out which batch,
the episode stream, exact resume, Ctrl-C, errors."""
import pytest
import torch

from pcm_train.config import load_config
from pcm_train.run import resolve_overrides
from pcm_train.runtime.distributed import DistInfo
from pcm_train.training import trainer as trainer_module
from pcm_train.training.checkpoint import latest_checkpoint, load_trainer_state
from pcm_train.training.metrics_log import read_metrics
from pcm_train.training.trainer import Trainer

from fake_env import fake_pool_factory
from test_trainer import TINY, _assert_same_runs, _outcome, _stop_in_validation

OVERLAP = "trainer.overlap=true"
CLOSE_STEPS = 36  # the fake envs' successes vary within groups from step 1 on: the updates change the weights


def _trainer(tmp_path, *extra, name="run"):
    cfg = load_config(TINY + [f"trainer.output_dir={tmp_path / name}", "actor.lr=1e-2"] + list(extra))
    return Trainer(cfg, fake_pool_factory(close_steps=CLOSE_STEPS))


def _trainable(policy) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in policy.parameters() if p.requires_grad]).clone()


def _resume(run_dir) -> Trainer:
    return Trainer(load_config(resolve_overrides([f"resume={run_dir}"])), fake_pool_factory(close_steps=CLOSE_STEPS))


def test_the_next_batch_is_rolled_out_with_the_weights_before_the_update(tmp_path, monkeypatch):
    """Batch k+1 is rolled out (by the rollout copy) with the weights after update k-1 while update k runs:
    one step off-policy, recorded as rollout/policy_lag; the first batch is on-policy."""
    rolled_with = {}  # step -> trainable weights of the policy that rolled out its batch
    collect = trainer_module.collect_rollouts

    def spy(policy, pool, episodes, **kwargs):  # the trainer's training rollouts (validation has its own module)
        if not kwargs.get("greedy"):
            rolled_with[int(episodes[0].uid.split("-")[0][4:])] = _trainable(policy)
        return collect(policy, pool, episodes, **kwargs)

    monkeypatch.setattr(trainer_module, "collect_rollouts", spy)
    trainer = _trainer(tmp_path, OVERLAP, "trainer.total_steps=4")
    assert trainer.rollout_copy.policy is not trainer.policy
    before_update = []
    learn = trainer.learn
    trainer.learn = lambda payload: before_update.append(_trainable(trainer.policy)) or learn(payload)
    assert trainer.run()
    trainer.close()
    assert sorted(rolled_with) == [0, 1, 2, 3]
    assert torch.equal(rolled_with[0], before_update[0])
    for step in (1, 2, 3):
        assert torch.equal(rolled_with[step], before_update[step - 1]), step
    assert any(not torch.equal(rolled_with[step], before_update[step]) for step in (1, 2, 3))  # weights changed
    rows = read_metrics(trainer.run_dir / "metrics.jsonl")
    assert [r["rollout/policy_lag"] for r in rows] == [0, 1, 1, 1]
    for row in rows:
        assert row["overlap/hidden_s"] <= row["overlap/rollout_time_s"]
        assert row["rollout_share"] == pytest.approx(row["overlap/wait_s"] / row["step_time_s"])
    assert rows[-1]["overlap/rollout_time_s"] == 0.0  # the last step rolls nothing out ahead
    assert rows[1]["overlap/rollout_time_s"] == pytest.approx(rows[2]["rollout_time_s"], rel=0.5)


def test_frozen_weights_give_the_same_run_with_and_without_overlap(tmp_path):
    """actor.lr=0: the weights never change, so overlap changes nothing but the timings and the lag: the same
    episodes in the same order, the same selections (the PCM controller's draws stay in step order)."""
    runs = []
    for name, extra in (("plain", []), ("overlap", [OVERLAP])):
        trainer = _trainer(tmp_path, "trainer.total_steps=3", "actor.lr=0", *extra, name=name)
        assert trainer.run()
        trainer.close()
        rows = _outcome(read_metrics(trainer.run_dir / "metrics.jsonl"))
        runs.append([{k: v for k, v in row.items() if k != "rollout/policy_lag"} for row in rows])
        assert [r["rollout/policy_lag"] for r in rows] == ([0, 0, 0] if name == "plain" else [0, 1, 1])
    assert runs[0] == runs[1]


def test_resume_continues_an_overlapped_run_identically(tmp_path):
    """An overlapped run stopped after step 1 (its last step then) and resumed to 4 steps equals one run of
    4 steps: the checkpoint holds the rollout copy's weights and the episode RNG from before the next
    batch's draw, and the resume rolls that batch out again with them."""
    settings = [OVERLAP, "trainer.total_steps=4", "trainer.save_every=0"]
    straight = _trainer(tmp_path, *settings, name="straight")
    assert straight.run()
    straight.close()
    first = _trainer(tmp_path, *settings, name="resumed")
    first.cfg.trainer.total_steps = 2
    assert first.run()
    first.close()
    state = load_trainer_state(latest_checkpoint(first.run_dir))
    assert state["step"] == 1 and set(state["rollout_policy"]) >= {
        name for name, p in first.policy.named_parameters() if p.requires_grad}
    resumed = _resume(first.run_dir)
    assert resumed.step == 2 and resumed._copy_lag == 1
    assert resumed.run()
    resumed.close()
    _assert_same_runs(straight, resumed)


@pytest.mark.parametrize("when", ["background_rollout", "validation"])
def test_ctrl_c_saves_the_last_update_and_the_resume_equals_a_straight_run(tmp_path, when):
    """Ctrl-C during step 1: while step 2's batch is rolled out in the background (that rollout stops and is
    dropped) or during step 1's validation (it had come back). Either way step 1 is saved; a resume, stopped
    once more during its first (synchronous) rollout and resumed again, equals an uninterrupted run."""
    settings = [OVERLAP, "trainer.total_steps=4", "trainer.save_every=0", "trainer.val_every=1"]
    straight = _trainer(tmp_path, *settings, name="straight")
    assert straight.run()
    straight.close()
    first = _trainer(tmp_path, *settings, name="resumed")
    if when == "background_rollout":
        roll_ahead = first._roll_ahead

        def stop_then_roll_ahead(step):
            if step == 2:
                first._request_stop(None, None)
            roll_ahead(step)

        first._roll_ahead = stop_then_roll_ahead
    else:
        _stop_in_validation(first, 1)
    assert first.run() is False
    first.close()
    assert latest_checkpoint(first.run_dir).name == "step_000001"
    assert [r["step"] for r in read_metrics(first.run_dir / "metrics.jsonl")] == [0, 1]
    again = _resume(first.run_dir)
    again._stop = True  # Ctrl-C before the resume's first rollout came back: step 1 is saved again, unchanged
    assert again.run() is False
    again.close()
    assert latest_checkpoint(first.run_dir).name == "step_000001"
    resumed = _resume(first.run_dir)
    assert resumed.run()
    resumed.close()
    _assert_same_runs(straight, resumed)


def test_an_error_in_the_update_stops_the_background_rollout(tmp_path):
    """The update fails while the next batch is rolled out: run() raises only once the background rollout
    has stopped (the env pool is free, it can be closed)."""
    trainer = _trainer(tmp_path, OVERLAP, "trainer.total_steps=3")

    def failing_update(payload):
        raise RuntimeError("update failed")

    trainer.learn = failing_update
    with pytest.raises(RuntimeError, match="update failed"):
        trainer.run()
    assert trainer._ahead is None and not trainer._stop
    trainer.close()


def test_overlap_needs_a_single_process(tmp_path):
    with pytest.raises(ValueError, match="trainer.overlap=true runs in a single process, got 2 ranks"):
        Trainer(load_config(TINY + [OVERLAP, f"trainer.output_dir={tmp_path / 'run'}"]), fake_pool_factory(),
                DistInfo(0, 2, 0))
    assert not (tmp_path / "run").exists()
