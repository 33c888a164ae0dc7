"""The estimator comparison tool on a synthetic batch."""
import json

import torch

from pcm_train.tools import estimator_variance
from pcm_train.config import load_config
from pcm_train.policies import SmallVLA, SmallVLAConfig
from pcm_train.tools.synthetic import synthetic_rollout_batch


def _setup(num_chunks):
    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    batch = synthetic_rollout_batch(policy, num_prompts=1, group_size=4, num_chunks=num_chunks, seed=3)
    return policy, batch


def test_a_budget_covering_every_chunk_is_the_full_gradient_for_both_estimators():
    policy, batch = _setup(6)
    stats = estimator_variance.gradient_statistics(policy, load_config(["pcm.budget=6"]), batch, budget=6, draws=2)
    assert stats["full_grad_norm"] > 0
    for rule in estimator_variance.RULES:
        for estimator in estimator_variance.ESTIMATORS:
            row = stats["rows"][rule][estimator]
            assert row["bias"] < 1e-5 and row["variance"] < 1e-10 and row["cosine"] > 1 - 1e-6, (rule, estimator)


def test_a_small_budget_gives_noisy_gradients():
    policy, batch = _setup(12)
    stats = estimator_variance.gradient_statistics(policy, load_config(["pcm.budget=2"]), batch, budget=2, draws=3)
    for rule in estimator_variance.RULES:
        for estimator in estimator_variance.ESTIMATORS:
            row = stats["rows"][rule][estimator]
            assert row["variance"] > 0 and row["mse"] >= row["variance"] - 1e-9 and row["cosine"] < 1


def test_cli_json_on_the_synthetic_source(capsys):
    assert estimator_variance.main(["--source", "synthetic", "--draws", "1", "--budget", "4", "--prompts", "1",
                                    "--group-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["rows"]) == {"pcm", "random"} and report["draws"] == 1
