"""GRPO must raise success on a synthetic task: a test that fails when learning breaks.

Env: ``learning_env.LiftPool`` (pure numpy): success once a block is lifted to a target height; the
block rises only while the gripper is closed (``a[6] > 0``), by the arm's dim-0 action; opening drops
it. What the arm does in the closed (ACTIVE_GRIP) steps decides success.

Path: the real trainer, ``pcm_train.training.trainer.Trainer.run`` (``collect_rollouts``, ``grpo_advantages``,
``PCMController``, ``pcm_shrink_batch``, ``update_actor``) with a fresh, tiny state-mode small VLA
(full fine-tuning), 4 prompts x 8 rollouts of <= 4 chunks per step, several optimizer steps per
batch (PPO mini-batches), so the PPO ratio leaves 1 and ``actor/pg_clipfrac`` must be > 0 at some step.

Measurement: success of the policy on the same 128 fixed held-out episodes (every task x initial
states 40..49, which training never draws) before and after training, with actions sampled at the
training temperature from a generator seeded the same way both times. Sampling (not greedy): it is
the policy GRPO trains, and a fresh policy's greedy actions are one arbitrary deterministic choice
per observation (its success says nothing about the policy's distribution).

Settings: small VLA with hidden size 32 and 2 decoder layers (with 1 layer its 55 action-placeholder
positions get identical logits, see ``learning_env``), all weights trained (no LoRA), AdamW lr 1e-2,
the default temperature 1.6, 20 steps per learning run (5 for the control), one torch thread (with
two, a 2-core machine that other jobs were also using ran the same training ~7x slower). Wall time
of the module on 2 cores at load average 4-5 (other jobs running): 22-32 s over five runs (calls:
full 5-8 s, pcm 4.5-7 s, control 2-4.5 s; the rest is imports).

Measured (seed 0, start -> end success on the 128 episodes; PPO mini-batches of 1 prompt, i.e. 4
optimizer steps per rollout batch):

| run | start | end | max actor/pg_clipfrac |
| --- | --- | --- | --- |
| ``pcm.strategy=full`` | 0.227 | 1.000 | 0.026 |
| ``pcm.strategy=pcm pcm.budget=2`` (kept 0.53 of the valid chunks at step 0, 0.69 on average) | 0.227 | 1.000 | 0.034 |
| ``pcm.strategy=pcm pcm.budget=2 trainer.overlap=true`` (every batch after the first rolled out one update behind) | 0.227 | 0.734 | 0.224 |
| ``actor.lr=0`` (no-learning control, a test below) | 0.227 | 0.227 | 0 |

Seeds 1-4 (not run here): full +0.72 to +0.75, pcm +0.55 to +0.73; MARGIN is 0.4.

Mutations checked by hand (monkeypatched from a scratch script, seed 0; start 0.227 each):

1. GRPO advantage sign flipped (``grpo_advantages`` returning ``-advantages``): full -> 0.000,
   pcm -> 0.016. Fails the margin.
2. PPO ratio pinned at 1 (``policy_loss`` given ``old_log_prob = log_prob.detach()``): full -> 1.000,
   pcm -> 1.000 (on-policy ratio-1 policy gradient still learns this task), but ``actor/pg_clipfrac``
   is 0 at every step. Fails the clip-fraction check.
3. ``shrink_batch`` training the wrong responses for the kept rows: chunk c+1's (wrapping to 0):
   full -> 0.312, pcm -> 0.266; trajectory i+1's (same chunk): full -> 0.273, pcm -> 0.289. Fail
   the margin.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pcm_train.config import load_config
from pcm_train.training.metrics_log import read_metrics
from pcm_train.training.rollout import Episode, collect_rollouts
from pcm_train.training.trainer import Trainer

from learning_env import LiftPool, lift_pool_factory

STEPS = 20
EVAL_EPISODES = 128
EVAL_SEED = 1234
MARGIN = 0.4  # trained success - starting success, on the same episodes and random stream

# Several optimizer steps per rollout batch: PPO mini-batches of 1 prompt (of 4).
SEVERAL_OPTIMIZER_STEPS = ["actor.ppo_mini_batch=1"]

BASE = [
    "policy.observation=state", "env.camera=false", "policy.hidden_size=32", "policy.num_layers=2",
    "policy.lora_r=0", "actor.lr=1e-2", "actor.micro_batch_trajectories=32",
    "rollout.max_chunks=4", "rollout.prompts_per_step=4", "rollout.group_size=8",
    "env.task_ids=[0,1,2,3,4,5,6,7,8,9]", f"trainer.total_steps={STEPS}", "trainer.val_every=0",
    "trainer.save_every=0", "trainer.seed=0", *SEVERAL_OPTIMIZER_STEPS,
]
ENV = dict(height=2.5)


@dataclasses.dataclass
class Outcome:
    start: float  # success before training on the fixed evaluation episodes
    end: float  # the same after training
    rows: list[dict]  # metrics.jsonl

    @property
    def gain(self) -> float:
        return self.end - self.start

    def series(self, key: str) -> list[float]:
        return [row.get(key, float("nan")) for row in self.rows]


def evaluate(trainer: Trainer) -> float:
    """Success rate of ``trainer.policy`` on the fixed held-out episodes, sampled at the training
    temperature from a freshly seeded generator (the same draws before and after training)."""
    episodes = [Episode(i % 10, 40 + (i // 10) % 10, f"eval{i}") for i in range(EVAL_EPISODES)]
    batch = collect_rollouts(trainer.policy, trainer.pool, episodes, max_chunks=trainer.cfg.rollout.max_chunks,
                             temperature=trainer.cfg.actor.temperature,
                             generator=torch.Generator().manual_seed(EVAL_SEED))
    return float(batch.batch["complete"].float().mean())


def train_and_evaluate(output_dir: Path, *overrides: str, env: dict | None = None) -> Outcome:
    """Evaluate a fresh policy, train it ``STEPS`` steps through ``Trainer.run``, evaluate again."""
    cfg = load_config(BASE + [f"trainer.output_dir={output_dir}", *overrides])
    trainer = Trainer(cfg, lift_pool_factory(**{**ENV, **(env or {})}))
    try:
        start = evaluate(trainer)
        assert trainer.run()
        end = evaluate(trainer)
    finally:
        trainer.close()
    return Outcome(start, end, read_metrics(trainer.run_dir / "metrics.jsonl"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matmuls: one intra-op thread is as fast alone and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _summary(outcome: Outcome) -> str:
    return (f"start {outcome.start:.3f} end {outcome.end:.3f}; training success "
            f"{[round(s, 2) for s in outcome.series('success_rate')]}; "
            f"clipfrac {[round(c, 3) for c in outcome.series('actor/pg_clipfrac')]}")


def _check_learned(outcome: Outcome) -> None:
    assert 0.1 <= outcome.start <= 0.5, f"the starting policy should succeed sometimes: {_summary(outcome)}"
    assert outcome.gain >= MARGIN, f"GRPO did not raise success by {MARGIN}: {_summary(outcome)}"
    assert max(outcome.series("actor/pg_clipfrac")) > 0, \
        f"the PPO ratio never left the clip range (several optimizer steps per batch): {_summary(outcome)}"


def test_env_rewards_lifting_while_closed():
    """The env alone: lifting with the gripper closed succeeds, the other moves never do, chance sometimes."""
    E = 200
    pool = LiftPool(max_steps=32, **ENV)
    episodes = [(i % 10, i % 50) for i in range(E)]

    def run(policy) -> np.ndarray:
        pool.reset(episodes)
        done = np.zeros(E, bool)
        for _ in range(4):
            result = pool.step_chunk(policy(), ~done)
            assert (result.steps[done] == 0).all()
            done |= result.terminated | result.truncated
        assert done.all()
        return result.terminated

    def constant(a0: float, gripper: float):
        action = np.zeros((E, 8, 7))
        action[..., 0], action[..., 6] = a0, gripper
        return lambda: action

    assert run(constant(-1.0, 1.0)).all()  # closed and lifting: the target (<= 2.75) in 3 steps
    assert not run(constant(1.0, 1.0)).any()  # closed, pushing down
    assert not run(constant(-1.0, -1.0)).any()  # lifting with the gripper open
    rng = np.random.default_rng(0)

    def fresh_policy():  # what a fresh policy does: uniform arm, gripper closed on 3 of 4 steps
        action = rng.uniform(-1, 1, (E, 8, 7))
        action[..., 6] = np.where(rng.random((E, 8)) < 0.75, 1.0, -1.0)
        return action

    assert 0.1 <= run(fresh_policy).mean() <= 0.4
    pool.close()
    assert pool.closed


def test_full_grpo_learns(tmp_path):
    _check_learned(train_and_evaluate(tmp_path / "full", "pcm.strategy=full"))


@pytest.mark.parametrize("overlap", [False, True], ids=["on_policy", "overlap"])
def test_pcm_learns_with_a_budget_below_the_valid_chunks(tmp_path, overlap):
    """Also with ``trainer.overlap=true``: every batch but the first rolled out one update behind."""
    outcome = train_and_evaluate(tmp_path / "pcm", "pcm.strategy=pcm", "pcm.budget=2",
                                 f"trainer.overlap={str(overlap).lower()}")
    kept = outcome.series("pcm/kept_fraction")
    assert kept[0] < 0.7 and sum(kept) / len(kept) < 0.85, f"PCM kept (almost) every valid chunk: {kept}"
    assert outcome.series("rollout/policy_lag") == [0] + [int(overlap)] * (STEPS - 1)
    _check_learned(outcome)


def test_no_learning_control_stays_put(tmp_path):
    """``actor.lr=0``: the same rollouts and updates, the weights never change, so the evaluation repeats
    exactly and the margin cannot appear. 5 steps: the outcome does not depend on the number of steps
    (20 steps measured: 0.227 -> 0.227, training success 0.06-0.41 per step)."""
    outcome = train_and_evaluate(tmp_path / "frozen", "pcm.strategy=full", "actor.lr=0", "trainer.total_steps=5")
    assert outcome.end == outcome.start, _summary(outcome)
    assert outcome.gain < MARGIN
