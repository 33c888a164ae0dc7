"""Gradient diagnostics of a chunk selection: against a dense masked reference, and inside the trainer."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from pcm_train.algorithm.controller import PHASE_NAMES, PCMController
from pcm_train.algorithm.diagnostics import advantage_mass_kept, selection_diagnostics
from pcm_train.config import ConfigError, load_config
from pcm_train.integrations.simplevla import pcm_shrink_batch
from pcm_train.runtime.distributed import DistInfo
from pcm_train.tools.synthetic import synthetic_rollout_batch
from pcm_train.training.checkpoint import latest_checkpoint
from pcm_train.training.metrics_log import read_metrics
from pcm_train.training.trainer import Trainer

from fake_env import fake_pool_factory
from test_actor import C, kept_chunk_mask, masked_dense_grads, policy  # noqa: F401 (policy: the fixture)
from test_trainer import TINY

L, D = 8, 7


@pytest.fixture(scope="module")
def batch(policy):
    return synthetic_rollout_batch(policy, num_prompts=2, group_size=3, num_chunks=C, seed=4)


def _select(policy, batch, strategy):
    cfg = load_config([f"pcm.strategy={strategy}", "pcm.budget=3"])
    kept, selection = pcm_shrink_batch(batch, PCMController(cfg.pcm, seed=1),
                                       action_token_start=policy.config.action_token_start)
    return cfg, kept, selection


def _dense_gradient(policy, batch, chunk_kept, cfg):
    """float64 [P]: ``masked_dense_grads`` of the trainable parameters, flattened; gradients cleared after."""
    grads = masked_dense_grads(policy, batch, chunk_kept, cfg)
    flat = torch.cat([g.reshape(-1) for p, g in zip(policy.parameters(), grads) if p.requires_grad]).double()
    policy.zero_grad(set_to_none=True)
    return flat


@pytest.mark.parametrize("strategy", ["pcm", "random"])
def test_diagnostics_match_a_dense_masked_reference(policy, batch, strategy):
    cfg, kept, selection = _select(policy, batch, strategy)
    before = copy.deepcopy(policy.state_dict())
    out = selection_diagnostics(policy, batch, kept, selection, cfg.actor, action_chunk=L, action_dim=D)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert all(p.grad is None for p in policy.parameters())
    full = _dense_gradient(policy, batch, selection.labels >= 0, cfg)
    masked = _dense_gradient(policy, batch, kept_chunk_mask(selection.index, C), cfg)
    assert out["diag/full_grad_norm"] == pytest.approx(float(full.norm()), rel=1e-4)
    assert out["diag/grad_cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(masked, full, dim=0)),
                                                    abs=1e-4)
    assert out["diag/grad_norm_ratio"] == pytest.approx(float(masked.norm() / full.norm()), rel=1e-4)
    assert out["diag/grad_projection"] == pytest.approx(float(masked @ full / full.norm() ** 2), rel=1e-4, abs=1e-6)
    assert out["diag/grad_cosine"] < 0.9999  # 3 of up to 8 chunks kept: not the full gradient


def test_full_strategy_keeps_the_whole_gradient(policy, batch):
    cfg, kept, selection = _select(policy, batch, "full")
    out = selection_diagnostics(policy, batch, kept, selection, cfg.actor, action_chunk=L, action_dim=D)
    for key in ("diag/grad_cosine", "diag/grad_norm_ratio", "diag/grad_projection", "diag/adv_mass_kept"):
        assert out[key] == pytest.approx(1.0, abs=1e-6), key


def test_advantage_mass_kept_counts_each_kept_valid_token(policy, batch):
    _, _, selection = _select(policy, batch, "pcm")
    out = advantage_mass_kept(batch, selection, action_chunk=L, action_dim=D)
    N = selection.labels.shape[0]
    finish = batch.batch["finish_step"].tolist()
    adv = batch.batch["advantages"].abs().view(N, C, L, D)
    kept = kept_chunk_mask(selection.index, C)
    for name, phase in [("", None)] + [(f"/{n}", p) for p, n in enumerate(PHASE_NAMES)]:
        total = part = 0.0
        for i in range(N):
            for c in range(C):
                label = int(selection.labels[i, c])
                if label < 0 or (phase is not None and label != phase):
                    continue
                steps = min(L, finish[i] - c * L)  # executed steps of the chunk; all D dims of each are valid
                mass = float(adv[i, c, :steps].sum())
                total += mass
                part += mass if kept[i, c] else 0.0
        key = f"diag/adv_mass_kept{name}"
        if total > 0:
            assert out[key] == pytest.approx(part / total, rel=1e-6), key
        else:
            assert key not in out
    assert 0 < out["diag/adv_mass_kept"] < 1


def test_trainer_records_diagnostics_without_changing_the_run(tmp_path):
    def run(name, *extra):
        cfg = load_config(TINY + [f"trainer.output_dir={tmp_path / name}", "pcm.strategy=pcm"] + list(extra))
        trainer = Trainer(cfg, fake_pool_factory(close_steps=34))  # mixed groups at both steps
        assert trainer.run()
        trainer.close()
        return trainer.run_dir

    plain, diagnosed = run("plain"), run("diagnosed", "trainer.diagnostics_every=1")
    rows, diag_rows = read_metrics(plain / "metrics.jsonl"), read_metrics(diagnosed / "metrics.jsonl")
    for a, b in zip(rows, diag_rows):
        assert a["actor/pg_loss"] == b["actor/pg_loss"] and a["success_rate"] == b["success_rate"]
        assert not any(k.startswith("diag/") for k in a)
        assert "diag/full_grad_norm" in b and "diag/time_s" in b
    mixed = [b for b in diag_rows if 0 < b["success_rate"] < 1]
    assert mixed, "the fake env gave no step with mixed outcomes"
    for b in mixed:
        assert 0 < b["diag/adv_mass_kept"] < 1 and -1 <= b["diag/grad_cosine"] <= 1 and b["diag/full_grad_norm"] > 0
    final = [load_file(str(next((latest_checkpoint(d) / "policy").glob("*.safetensors")))) for d in (plain, diagnosed)]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_diagnostics_setting_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="trainer.diagnostics_every"):
        load_config(TINY + ["trainer.diagnostics_every=-1"])
    with pytest.raises(ValueError, match="trainer.diagnostics_every runs in a single process, got 2 ranks"):
        Trainer(load_config(TINY + ["trainer.diagnostics_every=2", f"trainer.output_dir={tmp_path / 'run'}"]),
                fake_pool_factory(), DistInfo(0, 2, 0))
