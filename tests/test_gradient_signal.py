"""The gradient signal estimator: known signal on made-up gradients, and the tool end to end on a synthetic batch."""
import json

import pytest
import torch

from pcm_train.tools import gradient_signal


def _gradients(n, signal_norm, noise_sd, dim=4000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=gen, dtype=torch.float64)
    mean *= signal_norm / mean.norm()
    return mean + noise_sd * torch.randn(n, dim, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("signal_norm", [0.0, 1.0, 3.0])
def test_signal_fraction_recovers_the_mean_share_of_the_second_moment(signal_norm):
    noise_sd = 0.05  # tr Var = 4000 * 0.05^2 = 10
    stats = gradient_signal.signal_statistics(_gradients(40, signal_norm, noise_sd))
    expected = signal_norm ** 2 / (signal_norm ** 2 + 10.0)
    assert stats["signal_fraction"] == pytest.approx(expected, abs=4 * stats["signal_fraction_se"] + 1e-3)
    assert stats["signal_fraction_se"] > 0
    if signal_norm > 0:
        assert stats["groups_for_snr1"] == pytest.approx(10.0 / signal_norm ** 2, rel=0.5)


def test_jackknife_error_matches_the_spread_over_repeated_draws():
    fractions, errors = [], []
    for seed in range(30):
        stats = gradient_signal.signal_statistics(_gradients(20, 1.0, 0.05, dim=500, seed=seed))
        fractions.append(stats["signal_fraction"])
        errors.append(stats["signal_fraction_se"])
    spread = torch.tensor(fractions).std().item()
    assert 0.5 * spread < sum(errors) / len(errors) < 2.0 * spread


def test_same_and_other_prompt_cosines_split_by_prompt():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 300, generator=gen, dtype=torch.float64)
    grads = torch.stack([a, a, b, b]) + 0.01 * torch.randn(4, 300, generator=gen, dtype=torch.float64)
    stats = gradient_signal.signal_statistics(grads, prompts=[0, 0, 1, 1])
    assert stats["same_prompt_pairs"] == 2
    assert stats["same_prompt_cosine"] > 0.99
    assert abs(stats["other_prompt_cosine"]) < 0.3


@pytest.mark.parametrize("bad", [torch.zeros(2, 5), torch.zeros(5)])
def test_too_few_groups_are_refused(bad):
    with pytest.raises(ValueError, match="groups >= 3"):
        gradient_signal.signal_statistics(bad)


def test_prompts_must_match_the_groups():
    with pytest.raises(ValueError, match="one id per group"):
        gradient_signal.signal_statistics(_gradients(4, 1.0, 0.1, dim=10), prompts=[0, 1])


def test_tool_on_a_synthetic_batch_reports_every_dims_row(capsys):
    assert gradient_signal.main(["--source", "synthetic", "--prompts", "4", "--group-size", "4", "--json",
                                 "--dims", "all", "--dims", "0,1,2,6", "--dims", "6"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["dims"] for r in rows] == ["all", "0,1,2,6", "6"]
    for r in rows:
        assert r["groups"] == 4 and r["second_moment"] > 0
    assert rows[0]["second_moment"] > rows[2]["second_moment"]  # fewer dims, fewer terms


def test_dims_keep_only_their_advantages():
    from pcm_train.config import load_config
    from pcm_train.policies import SmallVLA, SmallVLAConfig
    from pcm_train.tools.synthetic import synthetic_rollout_batch

    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    batch = synthetic_rollout_batch(policy, num_prompts=3, group_size=4, num_chunks=6, seed=2)
    cfg = load_config([])
    every, _ = gradient_signal.group_gradients(policy, cfg, batch, 4)
    parts = [gradient_signal.group_gradients(policy, cfg, batch, 4, dims)[0] for dims in ([0, 1, 2], [3, 4, 5, 6])]
    # the loss is linear in A (ratio 1); float32 gradients: compare at the gradient's own scale
    torch.testing.assert_close(parts[0] + parts[1], every, rtol=0, atol=1e-5 * float(every.abs().max()))
    assert float((parts[0] - every).abs().max()) > 1e-2 * float(every.abs().max())
    with pytest.raises(ValueError, match="action dims in 0..6"):
        gradient_signal.group_gradients(policy, cfg, batch, 4, [7])


@pytest.mark.parametrize("argv, message", [(["--prompts", "2"], "--prompts"), (["--temperature", "0"], "--temperature"),
                                           (["--dims", "x"], "--dims"), (["stray"], "unrecognized")])
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        gradient_signal.main(argv)
    assert message in capsys.readouterr().err
