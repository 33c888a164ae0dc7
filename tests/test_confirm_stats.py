"""Confirmatory statistics on synthetic per-seed data with known answers (``pcm_train.tools.confirm_stats``)."""
import itertools
import json

import numpy as np
import pytest
from scipy import stats

from pcm_train.tools import confirm_stats as cs
from pcm_train.tools import confirm_report
from pcm_train.tools.confirm_report import Protocol, confirm_section
from pcm_train.tools.study_stats import t_interval


def test_one_sided_t_matches_scipy_and_detects_a_known_effect():
    rng = np.random.default_rng(0)
    effect = rng.normal(0.06, 0.03, 10)  # a real effect, 6 standard errors
    assert cs.one_sided_t(effect, "greater") == pytest.approx(stats.ttest_1samp(effect, 0, alternative="greater").pvalue)
    assert cs.one_sided_t(effect, "less") == pytest.approx(stats.ttest_1samp(effect, 0, alternative="less").pvalue)
    assert cs.one_sided_t(effect, "greater") < 1e-3 and cs.one_sided_t(effect, "less") > 0.999
    assert cs.one_sided_t(-effect, "less") < 1e-3
    assert cs.one_sided_t([0.1] * 10, "greater") == 0.0 and cs.one_sided_t([0.0] * 10, "greater") == 1.0


def test_t_test_error_rates_under_the_null_and_under_an_effect():
    rng = np.random.default_rng(1)
    null = np.array([cs.one_sided_t(rng.normal(0, 0.05, 10), "greater") for _ in range(4000)])
    assert abs(np.mean(null < 0.05) - 0.05) < 0.012  # size α: a null effect is detected 5% of the time
    # an effect of one seed-sd: power of the one-sided t with 9 df is ~0.90 (noncentral t)
    power = np.mean([cs.one_sided_t(rng.normal(0.05, 0.05, 10), "greater") < 0.05 for _ in range(2000)])
    expected = stats.nct.sf(stats.t.ppf(0.95, 9), 9, np.sqrt(10))
    assert abs(power - expected) < 0.03


def test_tost_is_the_larger_one_sided_p_and_agrees_with_the_90_percent_interval():
    rng = np.random.default_rng(2)
    for mean in (0.0, 0.02, 0.04, 0.06, -0.03, -0.07):
        values = rng.normal(mean, 0.03, 10)
        p = cs.tost(values, 0.05)
        assert p == pytest.approx(max(stats.ttest_1samp(values, -0.05, alternative="greater").pvalue,
                                      stats.ttest_1samp(values, 0.05, alternative="less").pvalue))
        _, low, high, _ = t_interval(values, 0.90)
        assert (p < 0.05) == (-0.05 < low and high < 0.05)  # TOST at 5% <=> the 90% interval inside the margin
    assert cs.tost(np.full(10, 0.0) + np.linspace(-0.01, 0.01, 10), 0.05) < 1e-6  # matched: equivalence shown
    assert cs.tost(np.linspace(0.05, 0.09, 10), 0.05) > 0.5  # beyond the margin: not shown
    with pytest.raises(ValueError, match="margin"):
        cs.tost([0.1, 0.2], 0.0)


def _brute_force_flip(values, alternative, null=0.0):
    values = np.asarray(values) - null
    sign = 1 if alternative == "greater" else -1
    observed = sign * values.sum()
    count = sum(sign * np.dot(flips, values) >= observed - 1e-12
                for flips in itertools.product((1, -1), repeat=len(values)))
    return count / 2 ** len(values)


@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_sign_flip_p_matches_a_brute_force_count(alternative):
    rng = np.random.default_rng(3)
    for _ in range(5):
        values = rng.normal(0.02, 0.05, 10)
        assert cs.sign_flip_p(values, alternative) == pytest.approx(_brute_force_flip(values, alternative))
    assert cs.sign_flip_p(np.arange(1, 11) / 100, "greater") == 1 / 1024  # only the observed pattern is as large
    assert cs.sign_flip_p(np.arange(1, 11) / 100, "less") == 1.0
    values = rng.normal(0.0, 0.02, 10)
    assert cs.sign_flip_p(values, "equivalent", 0.05) == pytest.approx(
        max(_brute_force_flip(values, "greater", -0.05), _brute_force_flip(values, "less", 0.05)))


def test_holm_orders_the_p_values_and_stops_at_the_first_failure():
    out = cs.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}, alpha=0.05)
    assert [out[k]["rank"] for k in "dacb"] == [0, 1, 2, 3]
    assert [out[k]["threshold"] for k in "dacb"] == pytest.approx([0.0125, 0.05 / 3, 0.025, 0.05])
    # d and a pass; c (0.03 > 0.025) fails and stops it: b is kept although 0.04 <= 0.05
    assert {k: out[k]["reject"] for k in "abcd"} == {"a": True, "b": False, "c": False, "d": True}
    assert [out[k]["adjusted_p"] for k in "dacb"] == pytest.approx([0.02, 0.03, 0.06, 0.06])
    assert all(v["reject"] for v in cs.holm({"a": 0.001, "b": 0.002, "c": 0.01, "d": 0.05}).values())
    assert not any(v["reject"] for v in cs.holm({"a": 0.02, "b": 0.001 + 0.02, "c": 0.9, "d": 0.3}).values())
    with pytest.raises(ValueError, match="alpha"):
        cs.holm({"a": 0.1}, alpha=1.5)


def test_leave_one_out_recomputes_each_interval():
    per_seed = {s: v for s, v in enumerate([0.1, 0.05, 0.07, 0.02, 0.09])}
    loo = cs.leave_one_out(per_seed)
    for seed in per_seed:
        mean, low, high, _ = t_interval([v for s, v in per_seed.items() if s != seed])
        assert loo["per_seed"][seed] == pytest.approx({"mean": mean, "low": low, "high": high})
    # the lowest estimate leaves out the largest value (0.1), the highest the smallest (0.02)
    assert loo["mean_range"] == pytest.approx([np.mean([0.05, 0.07, 0.02, 0.09]), np.mean([0.1, 0.05, 0.07, 0.09])])
    assert loo["low_range"][0] == pytest.approx(min(e["low"] for e in loo["per_seed"].values()))
    assert loo["high_range"][1] == pytest.approx(max(e["high"] for e in loo["per_seed"].values()))


def _runs(effects: dict[str, float], seeds=range(10), steps=80, noise=0.02, seed=0):
    """Synthetic training-success rows: frozen ~0.6; each variant = frozen + its effect from step 41 on."""
    rng = np.random.default_rng(seed)
    runs = {}
    for s in seeds:
        base = 0.6 + rng.normal(0, 0.05, steps)
        for variant, effect in effects.items():
            shift = np.where(np.arange(steps) >= 40, effect, 0.0) + rng.normal(0, noise, steps)
            runs.setdefault(variant, {})[s] = [{"step": i, "success_rate": float(v)}
                                               for i, v in enumerate(base + shift)]
    return runs


def test_confirm_claims_decides_known_answers():
    runs = _runs({"frozen": 0.0, "full": 0.10, "pcm": 0.10, "random": 0.02, "top_phase": -0.1})
    claims = {c["id"]: c for c in cs.confirm_claims(runs, (40, 80), list(range(10)))}
    assert {k: c["decision"] for k, c in claims.items()} == {"a": "holds", "b": "holds", "c": "holds", "d": "holds"}
    assert claims["a"]["mean"] == pytest.approx(0.10, abs=0.01) and claims["a"]["seeds"] == 10
    assert claims["b"]["alternative"] == "equivalent" and claims["b"]["low90"] > -0.05
    per_seed = {s: np.mean([a["success_rate"] - b["success_rate"]
                            for a, b in zip(runs["full"][s][40:], runs["frozen"][s][40:])]) for s in range(10)}
    assert claims["a"]["per_seed"] == pytest.approx(per_seed)
    assert claims["a"]["p"] == pytest.approx(stats.ttest_1samp(list(per_seed.values()), 0, alternative="greater").pvalue)

    # no learning, PCM off by the margin, random equal to full: each of those is "not shown"
    runs = _runs({"frozen": 0.0, "full": 0.0, "pcm": -0.06, "random": 0.0, "top_phase": -0.1})
    decisions = {c["id"]: c["decision"] for c in cs.confirm_claims(runs, (40, 80), list(range(10)))}
    assert decisions == {"a": "not shown", "b": "not shown", "c": "not shown", "d": "holds"}


def test_confirm_claims_never_runs_on_fewer_seeds_than_fixed():
    runs = _runs({"frozen": 0.0, "full": 0.1, "pcm": 0.1, "random": 0.0, "top_phase": -0.1}, seeds=range(9))
    with pytest.raises(ValueError, match=r"seeds \[9\]"):
        cs.confirm_claims(runs, (40, 80), list(range(10)))
    short = _runs({"frozen": 0.0, "full": 0.1, "pcm": 0.1, "random": 0.0, "top_phase": -0.1}, steps=60)
    with pytest.raises(ValueError, match="80 steps"):
        cs.confirm_claims(short, (40, 80), list(range(10)))


def _validation(successes: dict[str, dict[int, list[bool]]], trained_steps=80):
    return {v: {s: [{"step": trained_steps - 1, "trained_steps": trained_steps, "task": i % 4, "placement": 50 + i // 4,
                     "success": bool(x)} for i, x in enumerate(outcomes)] for s, outcomes in seeds.items()}
            for v, seeds in successes.items()}


def test_validation_difference_pairs_episodes_within_a_seed():
    rng = np.random.default_rng(4)
    outcomes = {v: {s: list(rng.random(200) < p) for s in range(10)} for v, p in (("full", 0.8), ("frozen", 0.6))}
    validation = _validation(outcomes)
    d = cs.validation_difference(validation, "full", "frozen", 80, "greater")
    expected = {s: np.mean(np.array(outcomes["full"][s], float) - np.array(outcomes["frozen"][s], float))
                for s in range(10)}
    assert d["per_seed"] == pytest.approx(expected) and d["episodes"] == {s: 200 for s in range(10)}
    assert d["p"] < 1e-3 and d["seeds"] == 10
    assert cs.validation_difference(validation, "full", "frozen", 40, "greater") is None  # no validation there
    # the same number of episodes but one other placement: not paired, refused
    validation["frozen"][5] = [dict(r, placement=100) if i == 0 else r for i, r in enumerate(validation["frozen"][5])]
    with pytest.raises(ValueError, match="seed 5: full and frozen were validated on different episodes"):
        cs.validation_difference(validation, "full", "frozen", 80, "greater")
    validation["frozen"][5] = validation["frozen"][5] + validation["frozen"][5][:1]
    with pytest.raises(ValueError, match="twice"):
        cs.validation_difference(validation, "full", "frozen", 80, "greater")
    success = cs.validation_success(_validation(outcomes), "full", 80)
    assert success["mean"] == pytest.approx(np.mean([np.mean(o) for o in outcomes["full"].values()]))


def test_confirm_section_waits_for_every_run_then_reports_the_protocol(tmp_path):
    protocol = Protocol(primary=("full", "frozen", "pcm", "random", "top_phase"), seeds=tuple(range(10)),
                        window=(40, 80), validation_steps=(40, 80), exploratory_windows=((0, 80),))
    effects = {"frozen": 0.0, "full": 0.1, "pcm": 0.1, "random": 0.0, "top_phase": -0.1, "pcm_unbiased": 0.1}
    runs = _runs(effects)
    rng = np.random.default_rng(5)
    outcomes = {v: {s: list(rng.random(200) < 0.7) for s in range(10)} for v in effects}
    validation = {v: {s: _validation({v: {s: o}}, 40)[v][s] + _validation({v: {s: o}}, 80)[v][s]
                      for s, o in seeds.items()} for v, seeds in outcomes.items()}
    partial = {v: dict(seeds) for v, seeds in runs.items()}
    del partial["random"][7]
    lines, numbers, _ = confirm_section(partial, validation, protocol, tmp_path)
    assert "**In progress**" in "\n".join(lines) and "claims" not in numbers
    assert numbers["missing_runs"] == ["random seed7"]
    lines, numbers, figures = confirm_section(runs, validation, protocol, tmp_path)
    text = "\n".join(lines)
    assert [c["decision"] for c in numbers["claims"]] == ["holds", "holds", "holds", "holds"]
    assert "| (a) GRPO learns" in text and "pcm_unbiased − full" in text and figures[0].is_file()
    assert numbers["validation"]["secondary"][0]["seeds"] == 10
    json.dumps(numbers, default=list)  # every number is serializable for study.json


@pytest.mark.parametrize("sd,seeds,difference", [(0.05, 10, 0.0), (0.08, 20, 0.0), (0.05, 12, 0.02), (0.03, 5, 0.0)])
def test_tost_power_matches_simulated_tost(sd, seeds, difference):
    rng = np.random.default_rng(7)
    draws = 4000
    passed = sum(cs.tost(rng.normal(difference, sd, seeds), 0.05) < 0.05 for _ in range(draws))
    simulated = passed / draws
    assert cs.tost_power(sd, seeds, 0.05, true_difference=difference) == pytest.approx(
        simulated, abs=3.5 * (simulated * (1 - simulated) / draws) ** 0.5 + 0.005)


def test_seeds_for_tost_power_is_the_first_count_that_reaches_it():
    n = cs.seeds_for_tost_power(0.05, 0.05, power=0.8)
    assert cs.tost_power(0.05, n, 0.05) >= 0.8 > cs.tost_power(0.05, n - 1, 0.05)
    assert cs.seeds_for_tost_power(0.5, 0.05, max_seeds=30) is None
    with pytest.raises(ValueError, match="seeds must be >= 2"):
        cs.tost_power(0.05, 1, 0.05)
    with pytest.raises(ValueError, match="power must lie in"):
        cs.seeds_for_tost_power(0.05, 0.05, power=1.0)


DEPLOY_STEPS = tuple(range(0, 81, 10))
CELLS = (("held_out", "greedy"), ("held_out", "sample@1.0"))


def _held_out_validation(gains: dict[str, float], seeds=range(10), episodes=200, start=0.35, seed=8, run_sd=0.02):
    """Validation rows per variant and seed in both cells: every run's start is the seed's same outcomes
    (one start policy); after training, each episode succeeds with probability start + gain, a per-run
    effect of SD ``run_sd`` added."""
    rng = np.random.default_rng(seed)
    validation = {v: {} for v in gains}
    for s in seeds:
        first = {cell: rng.random(episodes) < start for cell in CELLS}
        for v, gain in gains.items():
            run_effect = rng.normal(0, run_sd)
            rows = []
            for t in DEPLOY_STEPS:
                for set_name, decoder in CELLS:
                    outcomes = first[(set_name, decoder)] if t == 0 else rng.random(episodes) < start + gain + run_effect
                    rows += [{"step": t - 1, "trained_steps": t, "set": set_name, "decoder": decoder, "task": i % 4,
                              "placement": 50 + i // 4, "seed": None if decoder == "greedy" else 1000 + i,
                              "success": bool(x)} for i, x in enumerate(outcomes)]
            validation[v][s] = rows
    return validation


def test_held_out_endpoint_averages_paired_points_and_frozen_is_the_runs_start():
    validation = _held_out_validation({"full": 0.2, "pcm": 0.2})
    points = (50, 60, 70, 80)
    d = cs.held_out_endpoint(validation, "full", "frozen", points)
    for s in (0, 7):
        start = cs.validation_outcomes(validation["full"][s], 0)
        expected = np.mean([np.mean([cs.validation_outcomes(validation["full"][s], t)[k] - start[k] for k in start])
                            for t in points])
        assert d[s] == pytest.approx(expected)
    assert np.mean(list(d.values())) == pytest.approx(0.2, abs=0.03)
    b = cs.held_out_endpoint(validation, "pcm", "full", points, CELLS[1])
    x, y = (cs.validation_outcomes(validation[v][3], 70, CELLS[1]) for v in ("pcm", "full"))
    assert set(x) == set(y) and len(x) == 200  # sampled episodes pair by their own stream too
    assert abs(np.mean(list(b.values()))) < 0.03
    # a seed lacking a point is left out, never averaged over fewer points
    validation["pcm"][4] = [r for r in validation["pcm"][4] if r["trained_steps"] != 60]
    assert 4 not in cs.held_out_endpoint(validation, "pcm", "full", points)
    with pytest.raises(ValueError, match="at least one validation point"):
        cs.held_out_endpoint(validation, "pcm", "full", ())


def test_held_out_claims_decide_known_answers_with_holm_over_three():
    points, seeds = (50, 60, 70, 80), list(range(10))
    claims = cs.confirm_held_out_claims(_held_out_validation({"full": 0.2, "pcm": 0.2, "random": 0.1}), points, seeds)
    assert [(c["id"], c["decision"]) for c in claims] == [("a", "holds"), ("b", "holds"), ("c", "holds")]
    assert {c["holm"]["threshold"] for c in claims} == {0.05 / 3, 0.05 / 2, 0.05}
    assert claims[0]["points"] == list(points) and claims[0]["cell"] == ["held_out", "greedy"]
    # no learning and pcm a margin behind: nothing holds
    claims = cs.confirm_held_out_claims(_held_out_validation({"full": 0.0, "pcm": -0.07, "random": 0.0}), points, seeds)
    assert [c["decision"] for c in claims] == ["not shown"] * 3
    with pytest.raises(ValueError, match=r"seeds \[10\]"):
        cs.confirm_held_out_claims(_held_out_validation({"full": 0.2, "pcm": 0.2, "random": 0.1}), points,
                                   list(range(11)))


def test_held_out_section_waits_for_every_run_then_reports_the_protocol(tmp_path):
    protocol = Protocol(primary=("full", "pcm", "random"), seeds=tuple(range(10)), window=(0, 80),
                        validation_steps=DEPLOY_STEPS, exploratory_windows=((40, 80),), endpoint="held_out",
                        claims=("a", "b", "c"), points=(50, 60, 70, 80), cells=CELLS, target=0.5)
    validation = _held_out_validation({"full": 0.2, "pcm": 0.2, "random": 0.1})
    runs = {v: {s: [{"step": i, "success_rate": 0.5, "update_time_s": 2.0} for i in range(80)] for s in range(10)}
            for v in validation}
    partial = {v: dict(seeds) for v, seeds in validation.items()}
    partial["random"][7] = [r for r in partial["random"][7] if r["trained_steps"] != 80]
    lines, numbers, _ = confirm_section(runs, partial, protocol, tmp_path)
    assert "**In progress**" in "\n".join(lines) and "claims" not in numbers
    assert numbers["missing_runs"] == ["random seed7"]
    short = {v: dict(seeds) for v, seeds in runs.items()}
    short["pcm"][2] = short["pcm"][2][:79]
    assert confirm_section(short, validation, protocol, tmp_path)[1]["missing_runs"] == ["pcm seed2"]
    lines, numbers, figures = confirm_section(runs, validation, protocol, tmp_path)
    text = "\n".join(lines)
    assert [c["decision"] for c in numbers["claims"]] == ["holds", "holds", "holds"]
    assert "| (a) GRPO learns" in text and "(d)" not in text and "sample@1.0 on held-out prompts" in text
    assert [c["id"] for c in numbers["secondary"]["held_out/sample@1.0"]] == ["a", "b", "c"]
    start = numbers["success"]["held_out/greedy"]["frozen"]["80"]["mean"]
    assert start == pytest.approx(np.mean([np.mean(list(cs.validation_outcomes(validation["full"][s], 0).values()))
                                           for s in range(10)]))
    reached = numbers["to_target"]["full"]["reached"]
    assert reached and all(r["steps"] >= 10 and r["update_s"] == 2.0 * r["steps"] for r in reached.values())
    assert figures[0].name == "held_out_curves.png" and figures[0].is_file()
    json.dumps(numbers, default=list)
    with pytest.raises(ValueError, match="points"):
        Protocol(primary=("full",), seeds=(0, 1), window=(0, 80), validation_steps=DEPLOY_STEPS, endpoint="held_out",
                 points=(0,))


def test_sd_for_tost_power_is_the_boundary_of_seeds_for_tost_power():
    for seeds in (6, 11):
        sd = cs.sd_for_tost_power(seeds, 0.05)
        assert cs.tost_power(sd, seeds, 0.05) >= 0.8 > cs.tost_power(sd * 1.01, seeds, 0.05)
        assert cs.seeds_for_tost_power(sd, 0.05) <= seeds < cs.seeds_for_tost_power(sd * 1.01, 0.05) + 1
    assert cs.tost_power(0.0005, 8, 0.05) == pytest.approx(1.0)  # a tiny SD: the integral still finds the peak


def test_internal_pilot_seeds_clamps_the_power_count():
    assert cs.internal_pilot_seeds(0.01, 10, 20, 0.05) == 10  # enough at once: never fewer than the first
    assert cs.internal_pilot_seeds(0.06, 10, 20, 0.05) == cs.seeds_for_tost_power(0.06, 0.05)
    assert cs.internal_pilot_seeds(0.5, 10, 20, 0.05) == 20  # never more than the most
    with pytest.raises(ValueError, match="first <= most"):
        cs.internal_pilot_seeds(0.05, 12, 10, 0.05)


def test_internal_pilot_tost_matches_fixed_tost_when_the_count_cannot_move():
    # first == most: a plain TOST over that many seeds, so the simulation must match tost_power and alpha
    inside = cs.internal_pilot_tost(0.05, 12, 12, 0.05, draws=4000, seed=1)
    assert inside["mean_seeds"] == 12 and inside["seeds_quantiles"] == [12, 12, 12]
    assert inside["pass_rate"] == pytest.approx(cs.tost_power(0.05, 12, 0.05), abs=0.025)
    boundary = cs.internal_pilot_tost(0.05, 12, 12, 0.05, true_difference=0.05, draws=4000, seed=2)
    assert boundary["pass_rate"] == pytest.approx(0.05, abs=0.015)
    # a free count adds seeds when the first ones spread widely, and gains power over the first count alone
    adaptive = cs.internal_pilot_tost(0.06, 8, 20, 0.05, draws=2000, seed=3)
    assert adaptive["mean_seeds"] > 8 and adaptive["pass_rate"] > cs.tost_power(0.06, 8, 0.05) + 0.1


def test_internal_pilot_protocol_sets_its_seed_count_from_the_first_seeds_sd(tmp_path):
    protocol = Protocol(primary=("full", "pcm", "random"), seeds=tuple(range(20)), first_seeds=10, window=(0, 80),
                        validation_steps=DEPLOY_STEPS, endpoint="held_out", claims=("a", "b", "c"),
                        points=(50, 60, 70, 80), cells=CELLS)
    validation = _held_out_validation({"full": 0.2, "pcm": 0.2, "random": 0.1}, seeds=range(20), run_sd=0.04)
    runs = {v: {s: [{"step": i, "success_rate": 0.5} for i in range(80)] for s in range(20)} for v in validation}
    first = {v: {s: r for s, r in seeds.items() if s < 10} for v, seeds in validation.items()}
    first["pcm"].pop(9)
    seeds, rule = confirm_report.protocol_seeds(runs, first, protocol)
    assert seeds is None and rule["seeds"] is None  # the first ten are not all complete yet
    lines, numbers, _ = confirm_section(runs, first, protocol, tmp_path)
    assert numbers["missing_runs"] == ["pcm seed9"] and "of the first seeds" in "\n".join(lines)
    seeds, rule = confirm_report.protocol_seeds(runs, validation, protocol)
    per_seed = cs.held_out_endpoint(validation, "pcm", "full", protocol.points)
    sd = np.std([per_seed[s] for s in range(10)], ddof=1)
    assert rule["sd"] == pytest.approx(sd)
    assert seeds == list(range(cs.internal_pilot_seeds(sd, 10, 20, 0.05))) and 10 < len(seeds) < 20
    # the test runs on exactly those seeds, once all of them are complete
    lines, numbers, _ = confirm_section(runs, validation, protocol, tmp_path)
    assert all(c["seeds"] == len(seeds) for c in numbers["claims"]) and f"N = {len(seeds)}" in "\n".join(lines)
    with pytest.raises(ValueError, match="first_seeds"):
        Protocol(primary=("full",), seeds=(0, 1), window=(0, 80), first_seeds=3, validation_steps=DEPLOY_STEPS,
                 endpoint="held_out", points=(80,))
