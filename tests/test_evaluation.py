"""Decoders x prompt sets: parsing, episode plans, intervals, the trainer's validation and the evaluate tool."""
import json

import numpy as np
import pytest

from pcm_train.config import ConfigError, load_config
from pcm_train.tools import evaluate, report
from pcm_train.training import evaluation as ev
from pcm_train.training.metrics_log import read_metrics
from pcm_train.training.trainer import Trainer

from fake_env import fake_pool_factory

TINY = ["preset=quick_image", "rollout.max_chunks=6", "rollout.prompts_per_step=2", "rollout.group_size=3",
        "pcm.budget=2", "trainer.total_steps=2", "trainer.val_every=1", "trainer.val_episodes=3",
        "trainer.save_every=0", "policy.hidden_size=16", "policy.num_layers=1", "policy.image_size=16",
        "env.task_ids=[0,1]"]


# ----- decoders, sets, plans -----

def test_decoders_parse_to_canonical_names_and_bad_ones_name_the_key():
    assert ev.parse_decoder("greedy") == ev.Decoder("greedy", None) and ev.parse_decoder("greedy").greedy
    assert ev.parse_decoder("sample@1") == ev.Decoder("sample@1.0", 1.0)
    assert ev.parse_decoder(" sample@0.75 ").name == "sample@0.75" and not ev.parse_decoder("sample@1.6").greedy
    for text, message in (("beam", "unknown decoder 'beam'"), ("sample", "unknown decoder"),
                          ("sample@hot", "needs a number"), ("sample@0", "temperature > 0"),
                          ("sample@-1", "temperature > 0"), ("sample@nan", "temperature > 0")):
        with pytest.raises(ValueError, match=rf"trainer.val_decoders\[2\]: .*{message}"):
            ev.parse_decoders(["greedy", "sample@1.0", text], "trainer.val_decoders")
    with pytest.raises(ValueError, match="at least one decoder"):
        ev.parse_decoders([])
    with pytest.raises(ValueError, match="twice"):
        ev.parse_decoders(["sample@1", "sample@1.0"])


def test_sets_resolve_per_suite_and_bad_ones_name_the_key():
    assert ev.resolve_set("train", "metaworld", [0, 1], 10).placements == tuple(range(40))
    assert ev.resolve_set("held_out", "metaworld", [0, 1], 10).placements == tuple(range(50, 100))
    assert ev.resolve_set("held_out", "libero_object", [0, 1], 10).placements == tuple(range(40, 50))
    assert ev.resolve_set("train", "libero_object", [0], 5).placements == tuple(range(45))
    assert ev.resolve_set("3,7,10-12", "metaworld", [0], 10).placements == (3, 7, 10, 11, 12)
    with pytest.raises(ValueError, match=r"trainer.val_sets\[1\]: set '50-99' is not in libero_object"):
        ev.resolve_set("50-99", "libero_object", [0], 10, "trainer.val_sets[1]")
    with pytest.raises(ValueError, match="set '90-120' is not in metaworld"):
        ev.resolve_set("90-120", "metaworld", [0], 10)
    with pytest.raises(ValueError, match=r"sets: set '9-3' has an empty range"):
        ev.resolve_set("9-3", "metaworld", [0], 10)
    with pytest.raises(ValueError, match="names a placement twice"):
        ev.resolve_set("1-3,2", "metaworld", [0], 10)
    with pytest.raises(ValueError, match="unknown prompt set 'tail'"):
        ev.resolve_set("tail", "metaworld", [0], 10)


def test_plans_take_tasks_in_turn_seed_each_sampled_episode_and_refuse_repeating_greedy_ones():
    greedy, hot = ev.parse_decoder("greedy"), ev.parse_decoder("sample@1.6")
    small = ev.PromptSet("40-41", (40, 41))
    plan = ev.plan_episodes([greedy, hot], [small], [0, 2], 0, seed=5)
    assert [(p.decoder.name, p.task, p.placement) for p in plan] == \
        [("greedy", 0, 40), ("greedy", 2, 40), ("greedy", 0, 41), ("greedy", 2, 41),
         ("sample@1.6", 0, 40), ("sample@1.6", 2, 40), ("sample@1.6", 0, 41), ("sample@1.6", 2, 41)]
    assert all(p.seed is None for p in plan[:4]) and len({p.seed for p in plan[4:]}) == 4
    more = ev.plan_episodes([hot], [small], [0, 2], 6, seed=5)  # past the 4 prompts: repeats with fresh seeds
    assert [(p.task, p.placement) for p in more] == [(0, 40), (2, 40), (0, 41), (2, 41), (0, 40), (2, 40)]
    assert more[:4] == plan[4:] and more[4].seed != more[0].seed and len({p.seed for p in more}) == 6
    assert ev.plan_episodes([hot], [small], [0, 2], 4, seed=6)[0].seed != plan[4].seed  # another seed
    with pytest.raises(ValueError, match=r"trainer.val_episodes \(5\) is more than the 4 distinct prompts"):
        ev.plan_episodes([greedy], [small], [0, 2], 5, seed=0, key="trainer.val_episodes")


def test_wilson_interval():
    low, high = ev.wilson_interval(8, 20)  # Wilson's 95% interval for 8 / 20: 0.219-0.613
    assert abs(low - 0.2188) < 1e-3 and abs(high - 0.6134) < 1e-3
    assert ev.wilson_interval(0, 10)[0] == 0.0 and ev.wilson_interval(10, 10)[1] == 1.0


def test_paired_interval_brackets_the_difference_and_matches_wald_on_many_pairs():
    rng = np.random.default_rng(0)
    before = rng.random(4000) < 0.6
    after = np.where(rng.random(4000) < 0.8, before, rng.random(4000) < 0.75)  # correlated pairs
    diff, low, high = ev.paired_interval(before.tolist(), after.tolist())
    d = after.astype(float) - before.astype(float)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert diff == pytest.approx(d.mean()) and low < diff < high
    assert low == pytest.approx(diff - half, abs=3e-3) and high == pytest.approx(diff + half, abs=3e-3)
    unpaired = 1.96 * np.sqrt(after.var() / len(d) + before.var() / len(d))
    assert high - low < 2 * unpaired  # pairing narrows the interval
    swapped = ev.paired_interval(after.tolist(), before.tolist())
    assert swapped == pytest.approx((-diff, -high, -low))
    same = ev.paired_interval([True, False] * 10, [True, False] * 10)  # every pair agrees
    assert same[0] == 0 and -0.2 < same[1] < 0 < same[2] < 0.2 and same[2] == pytest.approx(-same[1])
    assert ev.paired_interval([False] * 5, [True] * 5)[1:] == pytest.approx((0.2, 1.0), abs=0.25)
    with pytest.raises(ValueError, match="equally long"):
        ev.paired_interval([True], [True, False])


def test_paired_differences_pair_by_episode_and_refuse_different_episodes():
    def records(outcomes, decoder="greedy"):
        return [{"decoder": decoder, "set": "held_out", "task": i % 2, "placement": 50 + i // 2, "seed": None,
                 "success": bool(o), "episode_steps": 3} for i, o in enumerate(outcomes)]

    cells = ev.paired_differences(records([1, 0, 0, 1]), records([1, 1, 0, 1]))
    assert cells[("held_out", "greedy")]["difference"] == pytest.approx(0.25)
    assert cells[("held_out", "greedy")]["episodes"] == 4
    with pytest.raises(ValueError, match="different episodes"):
        ev.paired_differences(records([1, 0, 0, 1]), records([1, 0, 0]))
    with pytest.raises(ValueError, match="appears twice"):
        ev.paired_differences(records([1, 0]) * 2, records([1, 0]))


# ----- the trainer's validation -----

def test_validation_records_every_decoder_and_set_per_episode_with_rates_and_plot(tmp_path, monkeypatch):
    """Two steps on the fake env with two decoders x two sets: validation before training and after each
    step, every episode recorded with its decoder and set, the per-cell rates in metrics.jsonl equal to the
    records' means, a checkpoint at each validation point, and one plotted line per cell."""
    cfg = load_config(TINY + ["trainer.val_decoders=[greedy,sample@1.6]", "trainer.val_sets=[train,held_out]",
                              f"trainer.output_dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg, fake_pool_factory(close_steps=6))
    assert trainer.run()
    trainer.close()
    rows = read_metrics(tmp_path / "run" / "validation.jsonl")
    assert len(rows) == 3 * 2 * 2 * 3  # 3 validations x 2 decoders x 2 sets x 3 episodes
    assert [r["trained_steps"] for r in rows] == [0] * 12 + [1] * 12 + [2] * 12
    first = rows[:12]
    assert [(r["decoder"], r["set"], r["task"], r["placement"]) for r in first[:6]] == [
        ("greedy", "train", 0, 0), ("greedy", "train", 1, 0), ("greedy", "train", 0, 1),
        ("greedy", "held_out", 0, 40), ("greedy", "held_out", 1, 40), ("greedy", "held_out", 0, 41)]
    assert all(r["seed"] is None for r in first[:6]) and all(isinstance(r["seed"], int) for r in first[6:])
    assert all(isinstance(r["success"], bool) and r["episode_steps"] > 0 for r in rows)
    later = [r for r in rows if r["trained_steps"] == 2]
    assert [ev.episode_key(r) for r in later] == [ev.episode_key(r) for r in first]  # same episodes every time
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for row in metrics:
        for set_name in ("train", "held_out"):
            for decoder in ("greedy", "sample@1.6"):
                outcomes = [r["success"] for r in rows if r["trained_steps"] == row["step"] + 1
                            and r["set"] == set_name and r["decoder"] == decoder]
                assert len(outcomes) == 3
                assert row[f"val/{set_name}/{decoder}/success_rate"] == pytest.approx(np.mean(outcomes))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_000000",
                                                                                       "step_000001"]
    legends = []
    real_save = report.save_figure

    def recording_save(fig, path, **kwargs):
        legends.extend(text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts())
        return real_save(fig, path, **kwargs)

    monkeypatch.setattr(report, "save_figure", recording_save)
    report.write_report([tmp_path / "run"])
    for cell in ("train greedy", "train sample@1.6", "held_out greedy", "held_out sample@1.6"):
        assert any(label.endswith(cell) for label in legends), cell
    assert any("training" in label for label in legends)
    summary = (tmp_path / "run" / "report" / "summary.md").read_text()
    assert "held_out greedy:" in summary and "train sample@1.6:" in summary


@pytest.mark.parametrize("override, message", [
    ("trainer.val_decoders=[greedy,beam]", r"trainer.val_decoders\[1\]: unknown decoder 'beam'"),
    ("trainer.val_decoders=[sample@0]", r"trainer.val_decoders\[0\]: .*temperature > 0"),
    ("trainer.val_sets=[held_out,50-99]", r"trainer.val_sets\[1\]: set '50-99' is not in libero_object"),
    ("trainer.val_sets=[tail]", r"trainer.val_sets\[0\]: unknown prompt set 'tail'"),
    ("trainer.val_episodes=21", r"trainer.val_episodes \(21\) is more than the 20 distinct prompts"),
])
def test_a_validation_that_cannot_be_built_fails_before_the_run_directory_is_written(tmp_path, override, message):
    cfg = load_config(TINY + [override, f"trainer.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match=message):
        Trainer(cfg, fake_pool_factory())
    assert not (tmp_path / "run").exists()


def test_empty_decoder_or_set_lists_are_config_errors():
    for key in ("val_decoders", "val_sets"):
        with pytest.raises(ConfigError, match=rf"trainer.{key} must name at least one entry"):
            load_config([f"trainer.{key}=[]"])


# ----- the evaluate tool -----

def _tiny_state_policy(path):
    import torch

    from pcm_train.envs.metaworld import STATE_DIM
    from pcm_train.policies.small_vla import SmallVLA, SmallVLAConfig

    torch.manual_seed(0)
    SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32,
                            observation="state", state_dim=STATE_DIM)).save_pretrained(str(path))


def test_evaluate_tool_options_are_checked_naming_the_key(tmp_path):
    _tiny_state_policy(tmp_path / "policy")
    policy = f"policy={tmp_path / 'policy'}"
    cases = [([policy, "decoders=[greedy,top_k]"], r"decoders\[1\]: unknown decoder 'top_k'"),
             ([policy, "decoders=[sample@-0.5]"], r"decoders\[0\]: .*temperature > 0"),
             ([policy, "decoders=[]"], "at least one decoder"),
             ([policy, "sets=[]"], "sets must name at least one prompt set"),
             ([policy, "sets=[every]"], r"sets\[0\]: unknown prompt set 'every'"),
             ([policy, "episodes=-1"], "episodes must be >= 0"),
             ([policy, f"runs={tmp_path}"], "name one of policy=DIR"),
             ([f"before={tmp_path / 'policy'}"], "after=DIR must name a saved policy directory"),
             ([f"runs={tmp_path}"], "runs=DIR needs out=DIR"),
             ([policy, "steps=[40]"], "out= and steps= go with runs=DIR"),
             ([f"policy={tmp_path}"], "policy=DIR must name a saved policy directory")]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message):
            evaluate.parse_args(argv)
    cfg = evaluate.parse_args([policy, "suite=libero_object", "sets=[45-52]"])
    with pytest.raises(ValueError, match=r"sets\[0\]: set '45-52' is not in libero_object"):
        evaluate.make_plan(cfg)
    cfg = evaluate.parse_args([policy, "suite=metaworld", "decoders=[greedy]", "episodes=201"])
    with pytest.raises(ValueError, match=r"episodes \(201\) is more than the 200 distinct prompts"):
        evaluate.make_plan(cfg)


def test_tables_show_every_cell_with_its_interval():
    records = [{"decoder": d, "set": s, "task": 0, "placement": p, "seed": None, "success": bool(p % 2),
                "episode_steps": 1} for s in ("train", "held_out") for d in ("greedy", "sample@1.0") for p in range(4)]
    summary = evaluate.summarize(records)
    assert summary["held_out"]["sample@1.0"]["rate"] == 0.5 and summary["train"]["greedy"]["episodes"] == 4
    text = evaluate.table(summary)
    assert text.splitlines()[0] == "| set | greedy | sample@1.0 |"
    assert "| train | 0.500 [0.150, 0.850] (2/4)" in text and text.count("\n") == 3
    paired = evaluate.paired_table(ev.paired_differences(records, records))
    assert "+0.000" in paired and paired.count("\n") == 5


def test_runs_summary_pairs_seeds_against_the_start_and_full(tmp_path):
    """Study-shaped evaluations (variant/seed/step): the start row comes from step 0, every later step gets
    its mean over seeds and, paired per seed, its change from the start and its difference to full."""
    def records(wins, decoder="greedy", total=4):
        return [{"decoder": decoder, "set": "held_out", "task": 0, "placement": 50 + i, "seed": None,
                 "success": i < wins, "episode_steps": 1} for i in range(total)]

    layout = {("full", 0): {0: 2, 40: 3}, ("full", 1): {0: 1, 40: 3}, ("pcm", 0): {40: 1}, ("pcm", 1): {40: 2}}
    for (variant, seed), steps in layout.items():
        for step, wins in steps.items():
            path = tmp_path / variant / f"seed{seed}" / f"step{step}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"records": records(wins) + records(4 - wins, "sample@1.0")}))
    summary = evaluate.runs_summary(evaluate.collect_run_results(tmp_path))
    rows = {(r["decoder"], r["policy"], r["steps"]): r for r in summary["rows"]}
    assert rows[("greedy", "start", 0)]["per_seed"] == {0: 0.5, 1: 0.25}
    assert rows[("greedy", "full", 40)]["mean"] == pytest.approx(0.75)
    assert rows[("greedy", "full", 40)]["minus_start"]["per_seed"] == {0: 0.25, 1: 0.5}
    assert rows[("greedy", "pcm", 40)]["minus_full"]["per_seed"] == {0: -0.5, 1: -0.25}
    assert rows[("sample@1.0", "pcm", 40)]["minus_start"]["per_seed"] == {0: 0.25, 1: -0.25}
    assert "minus_full" not in rows[("greedy", "full", 40)]
    paths = evaluate.write_runs_summary(tmp_path)
    text = paths[1].read_text()
    assert "| held_out | greedy | pcm | 40 | 2 | 0.375 [" in text and text.count("\n") == 2 + 6


def test_runs_still_training_are_skipped(tmp_path, capsys):
    run = tmp_path / "runs" / "full" / "seed0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000001")
    (run / "config.json").write_text(json.dumps({"trainer": {"total_steps": 5}}))
    _tiny_state_policy(tmp_path / "policy")
    cfg = evaluate.parse_args([f"runs={tmp_path / 'runs'}", f"out={tmp_path / 'out'}"])
    assert evaluate.evaluate_runs(cfg) == []
    assert "skipped, not finished (2 of 5 steps)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no run directory"):
        evaluate.evaluate_runs(evaluate.parse_args([f"runs={tmp_path / 'policy'}", f"out={tmp_path / 'out'}"]))
