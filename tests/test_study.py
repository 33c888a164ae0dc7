"""The strategy study: option parsing, target arithmetic, and a tiny 2-step study on the fake env pool."""
import json

import numpy as np
import pytest

from pcm_train.tools import study
from pcm_train.tools import study_report
from pcm_train.config import ConfigError, config_to_dict, load_config
from pcm_train.training.metrics_log import read_metrics

from fake_env import fake_pool_factory

TINY = ["rollout.max_chunks=6", "rollout.prompts_per_step=2", "actor.ppo_mini_batch=2", "rollout.group_size=3",
        "trainer.total_steps=2",
        "trainer.val_every=2", "trainer.val_episodes=2", "policy.hidden_size=16", "policy.num_layers=1",
        "env.task_ids=[0,1]"]


def _study(tmp_path, *args):
    options, extra = study.parse_args(["init=null", f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'results'}", *args, *TINY])
    return options, extra


def test_parse_args_splits_study_options_from_trainer_overrides(tmp_path):
    options, extra = _study(tmp_path, "seeds=[3,4]", "variants=[full,pcm_b8]", "target=0.5")
    assert options.seeds == [3, 4] and options.variants == ["full", "pcm_b8"] and options.target == 0.5
    assert extra == TINY
    overrides = study.run_overrides(options, "pcm_b8", 4, extra)
    assert "pcm.budget=8" in overrides and "trainer.seed=4" in overrides
    assert f"trainer.output_dir={tmp_path / 'runs' / 'pcm_b8' / 'seed4'}" in overrides
    start = overrides.index(TINY[0])  # the user's settings, after the preset's, before the variant's
    assert overrides[start:start + len(TINY)] == TINY and 0 < start < overrides.index("pcm.budget=8")
    # the variant's own settings win over the user's: a study-wide lr leaves the no-learning control at 0
    frozen = load_config(study.run_overrides(options, "frozen", 0, extra + ["actor.lr=1e-3", "pcm.budget=3"]))
    assert frozen.actor.lr == 0 and frozen.trainer.seed == 0
    assert load_config(study.run_overrides(options, "pcm_b8", 0, extra + ["pcm.budget=3"])).pcm.budget == 8


@pytest.mark.parametrize("arg, message", [("variants=[full,pcm_b32]", "variants"), ("seeds=[]", "seeds"),
                                          ("target=1.5", "target"), ("smooth=0", "smooth"),
                                          ("init=/nonexistent", "init="), ("budget=3", "unknown config key")])
def test_bad_options_name_the_key(tmp_path, arg, message):
    with pytest.raises(ConfigError, match=message):
        _study(tmp_path, arg)


def test_summarize_run_finds_the_first_step_at_target():
    success = [0.2, 0.4, 0.6, 1.0, 1.0, 0.0]
    rows = [{"step": i, "success_rate": s, "step_time_s": 10.0 + (5.0 if i == 3 else 0.0),
             "val_time_s": 5.0 if i == 3 else None, "update_time_s": 2.0, "rollout_time_s": 7.0,
             "activation_bytes": 2 ** 20, "peak_memory_bytes": 2 ** 21, "pcm/kept_fraction": 0.5,
             "pcm/valid_chunks_per_traj": 10.0} for i, s in enumerate(success)]
    np.testing.assert_allclose(study_report.smoothed(success, 2), [0.2, 0.3, 0.5, 0.8, 1.0, 0.5])
    s = study_report.summarize_run(rows, target=0.8, smooth=2)
    assert s["steps_to_target"] == 4  # smoothed 0.8 after the 4th step
    assert s["minutes_to_target"] == pytest.approx(40.0 / 60)  # validation time left out
    assert s["update_s_to_target"] == pytest.approx(8.0)
    assert s["initial_success"] == pytest.approx(0.3)  # the first 2 steps
    assert s["final_success"] == pytest.approx(0.5) and s["best_success"] == pytest.approx(1.0)
    assert s["chunks_kept_per_traj"] == pytest.approx(5.0) and s["activation_mib"] == pytest.approx(1.0)
    assert study_report.summarize_run(rows, target=1.0, smooth=3)["steps_to_target"] is None
    assert s["ppo_kl"] is None and s["grad_norm"] is None  # runs logged without them


def test_movement_table_reports_how_far_each_update_moved_the_policy():
    def rows(kl, clip):
        return [{"step": i, "success_rate": 0.5, "step_time_s": 1.0, "update_time_s": 0.5, "rollout_time_s": 0.5,
                 "activation_bytes": 1, "peak_memory_bytes": 1, "pcm/kept_fraction": 1.0,
                 "pcm/valid_chunks_per_traj": 4.0, "advantage/nonzero_fraction": 0.75 if i else 0.25,
                 "actor/optimizer_steps": 4.0, "actor/ppo_kl": kl * (i + 1), "actor/pg_clipfrac": clip,
                 "actor/grad_norm": 0.5} for i in range(2)]
    summary = study_report.summarize({"full": {0: rows(1e-4, 0.01), 1: rows(3e-4, 0.03)},
                                      "frozen": {0: [{k: v for k, v in r.items() if not k.startswith("actor/")}
                                                     for r in rows(0, 0)]}}, target=0.9, smooth=1)
    full = summary["full"]["aggregate"]
    assert full["ppo_kl"]["mean"] == pytest.approx(3e-4) and full["clip_fraction"]["mean"] == pytest.approx(0.02)
    assert full["advantage_nonzero"]["mean"] == pytest.approx(0.5) and full["optimizer_steps"]["mean"] == 4
    lines = study_report.movement_table(summary).splitlines()
    assert lines[2] == "| full | 50% ± 0% | 4 ± 0 | 3.0e-04 ± 2.1e-04 | 2.00% ± 1.41% | 0.50 ± 0.00 |"
    assert lines[3] == "| frozen | 50% | — | — | — | — |"


def test_tiny_study_trains_resumes_accumulates_and_writes_the_page(tmp_path):
    pool = fake_pool_factory(close_steps=6, state_dim=36)
    options, extra = _study(tmp_path, "variants=[full,pcm]", "target=0.3", "smooth=1")
    # an interrupted run: one of its two steps done
    study.train_one(study.run_overrides(options, "full", 0, extra + ["trainer.total_steps=1"]), pool)
    assert len(read_metrics(tmp_path / "runs/full/seed0/metrics.jsonl")) == 1
    paths = study.run_study(options, extra, pool)
    for variant in ("full", "pcm"):
        rows = read_metrics(tmp_path / f"runs/{variant}/seed0/metrics.jsonl")
        assert [r["step"] for r in rows] == [0, 1]
    config = json.loads((tmp_path / "runs/pcm/seed0/config.json").read_text())
    assert config["pcm"]["budget"] == 12 and config["policy"]["observation"] == "state"
    assert config["env"]["camera"] is False and config["trainer"]["total_steps"] == 2

    # a second invocation adds a seed and leaves finished runs alone
    before = (tmp_path / "runs/pcm/seed0/metrics.jsonl").read_text()
    options, extra = _study(tmp_path, "variants=[full,pcm]", "seeds=[0,1]", "target=0.3", "smooth=1")
    paths = study.run_study(options, extra, pool)
    assert (tmp_path / "runs/pcm/seed0/metrics.jsonl").read_text() == before
    assert len(read_metrics(tmp_path / "runs/pcm/seed1/metrics.jsonl")) == 2

    # raising total_steps extends finished runs; a shorter setting leaves them as they are
    options, extra = _study(tmp_path, "variants=[pcm]", "target=0.3", "smooth=1")
    study.run_study(options, extra + ["trainer.total_steps=3"], pool)
    assert [r["step"] for r in read_metrics(tmp_path / "runs/pcm/seed0/metrics.jsonl")] == [0, 1, 2]
    assert study.is_finished(tmp_path / "runs/pcm/seed0", 2) and not study.is_finished(tmp_path / "runs/pcm/seed0", 4)
    paths = study.run_study(options, extra, pool)
    assert len(read_metrics(tmp_path / "runs/pcm/seed0/metrics.jsonl")) == 3

    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    names = {p.name for p in paths}
    assert {"study.md", "study.json", "fig3_success.png", "fig4_update_cost.png", "fig5_budget_ablation.png",
            "fig6_allocation.png", "time_split.png"} <= names
    text = (tmp_path / "results/study.md").read_text()
    assert "| full | 2 |" in text and "| pcm | 2 |" in text and "1.00×" in text
    assert "Machine:" in text and "trainer.seed" not in text.split("## Setup")[0]
    summary = json.loads((tmp_path / "results/study.json").read_text())["summary"]
    for name in ("metrics.jsonl", "validation.jsonl"):
        assert (tmp_path / "results/runs/pcm/seed0" / name).read_text() == (tmp_path / "runs/pcm/seed0" / name).read_text()

    # the archived metrics alone carry the study to a fresh machine: finished runs are not retrained
    options, extra = _study(tmp_path, "variants=[full,pcm]", "seeds=[0,1]", "runs=" + str(tmp_path / "fresh"))
    study.run_study(options, extra, pool)
    assert not (tmp_path / "fresh").exists()

    # a run in progress stays out of the page until it is complete
    partial = tmp_path / "runs/random/seed0"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text((tmp_path / "runs/pcm/seed0/config.json").read_text())
    (partial / "metrics.jsonl").write_text((tmp_path / "runs/pcm/seed1/metrics.jsonl").read_text().splitlines()[0])
    assert "random" not in study_report.collect_runs(tmp_path / "runs", list(study.VARIANTS))

    # the tables compare every run over the shortest run's steps
    assert set(summary["pcm"]["seeds"]) == {"0", "1"} and summary["pcm"]["aggregate"]["steps"]["mean"] == 2
    assert summary["pcm"]["seeds"]["0"]["steps_run"] == 3
    assert "first 2 steps of every run" in text


@pytest.mark.parametrize("suite", list(study.SUITE_DEFAULTS))
def test_default_init_is_the_committed_sft_policy(monkeypatch, suite):
    from pathlib import Path
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    options, _ = study.parse_args([f"suite={suite}"])
    defaults = study.SUITE_DEFAULTS[suite]
    assert options.init == defaults["init"] and options.variants == list(study.SUITE_VARIANTS[suite])
    assert (options.preset, options.out, options.runs) == (defaults["preset"], defaults["out"], defaults["runs"])
    overrides = study.run_overrides(options, "pcm", 0, [])
    assert "policy.path=" + str(Path(defaults["init"]).resolve()) in overrides
    cfg = load_config(overrides)
    assert suite.startswith(cfg.env.suite) and cfg.pcm.budget == 12


def test_confirm_suite_is_the_metaworld_study_with_the_protocols_horizon_and_validation(monkeypatch):
    from pathlib import Path
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    options, extra = study.parse_args(["suite=metaworld_confirm"])
    assert options.seeds == list(range(10)) and options.out == "docs/results/metaworld_confirm"
    assert options.variants == ["full", "frozen", "pcm", "random", "top_phase", "pcm_unbiased"]
    confirm = load_config(study.run_overrides(options, "pcm", 3, extra))
    before, _ = study.parse_args(["suite=metaworld"])
    original = load_config(study.run_overrides(before, "pcm", 3, []))
    a, b = config_to_dict(confirm), config_to_dict(original)
    changed = {(section, key) for section in a if isinstance(a[section], dict)
               for key in a[section] if a[section][key] != b[section][key]}
    assert changed == {("trainer", "total_steps"), ("trainer", "val_every"), ("trainer", "val_episodes"),
                       ("trainer", "output_dir")}
    assert (confirm.trainer.total_steps, confirm.trainer.val_every, confirm.trainer.val_episodes) == (80, 40, 200)
    assert confirm.trainer.val_sets == ["held_out"]
    unbiased = load_config(study.run_overrides(options, "pcm_unbiased", 3, extra))
    assert (unbiased.pcm.strategy, unbiased.pcm.budget, unbiased.pcm.estimator) == ("pcm", 12, "unbiased")
    order = study.run_order(options)
    assert order[:5] == [(0, "full"), (0, "frozen"), (0, "pcm"), (0, "random"), (0, "top_phase")]
    assert order[49] == (9, "top_phase") and order[50:] == [(s, "pcm_unbiased") for s in range(10)]


def test_deploy_suite_is_the_fewdemo_metaworld_study_with_the_pilots_batch_and_held_out_validation(monkeypatch):
    from pathlib import Path
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    options, extra = study.parse_args(["suite=metaworld_deploy"])
    protocol = study.PROTOCOLS["metaworld_deploy"]
    assert options.seeds_from_protocol and options.seeds == list(range(200, 210)) == list(protocol.seeds[:10])
    assert min(protocol.seeds) >= 100  # never the replication seeds 20-99
    assert options.init == "docs/results/metaworld_fewdemo/init_policy" and options.variants == ["full", "pcm", "random"]
    deploy = load_config(study.run_overrides(options, "pcm", 200, extra))
    pilot, _ = study.parse_args(["suite=metaworld", "init=docs/results/metaworld_fewdemo/init_policy"])
    original = load_config(study.run_overrides(pilot, "pcm", 200, []))
    a, b = config_to_dict(deploy), config_to_dict(original)
    changed = {(section, key): a[section][key] for section in a if isinstance(a[section], dict)
               for key in a[section] if a[section][key] != b[section][key] and key != "output_dir"}
    assert changed == {("rollout", "prompts_per_step"): 8, ("actor", "ppo_mini_batch"): 2,
                       ("actor", "temperature"): 1.0, ("trainer", "total_steps"): 80, ("trainer", "val_every"): 10,
                       ("trainer", "val_episodes"): 200}
    assert deploy.trainer.val_decoders == ["greedy", "sample@1.0"] and deploy.trainer.val_sets == ["held_out"]
    assert protocol.endpoint == "held_out" and set(protocol.points) <= set(range(41, 81))  # the second half
    assert study.run_order(options)[:3] == [(options.seeds[0], v) for v in ("full", "pcm", "random")]


def test_internal_pilot_study_runs_the_first_seeds_then_the_count_they_set(tmp_path, monkeypatch):
    from pcm_train.tools.confirm_report import Protocol
    protocol = Protocol(primary=("full", "pcm"), seeds=(0, 1, 2, 3), first_seeds=2, window=(0, 2), validation_steps=(0, 2),
                        endpoint="held_out", claims=("a", "b"), points=(2,))
    monkeypatch.setitem(study.PROTOCOLS, "metaworld", protocol)
    counts = []

    def count(options):  # the rule itself is tested in test_confirm_stats; here: what the study does with it
        counts.append(sorted(options.seeds))
        return 3

    monkeypatch.setattr(study, "protocol_seed_count", count)
    options, extra = _study(tmp_path, "suite=metaworld", "variants=[full,pcm]")
    assert options.seeds == [0, 1] and options.seeds_from_protocol
    study.run_study(options, extra, fake_pool_factory(close_steps=6, state_dim=39))
    assert counts == [[0, 1]]
    for variant in ("full", "pcm"):
        assert sorted(p.name for p in (tmp_path / "runs" / variant).iterdir()) == ["seed0", "seed1", "seed2"]
    page = json.loads((tmp_path / "results/study.json").read_text())["confirmatory"]
    assert page["seed_rule"]["rule"] == "internal pilot" and page["seed_rule"]["seeds"] is not None
    given, extra = _study(tmp_path, "suite=metaworld", "variants=[full]", "seeds=[3]")
    assert given.seeds == [3] and not given.seeds_from_protocol  # seeds named on the command line are kept


def test_report_only_needs_runs(tmp_path):
    options, extra = _study(tmp_path, "report_only=true")
    with pytest.raises(ValueError, match="no study runs"):
        study.run_study(options, extra, fake_pool_factory())
