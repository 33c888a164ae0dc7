"""Study statistics: t-intervals over seeds, paired differences, claims, and what the study page gets from them."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from pcm_train.algorithm.controller import PHASE_NAMES
from pcm_train.tools import study_report
from pcm_train.tools import study_stats as ss


def _rows(success):
    return [{"step": i, "success_rate": float(s), "step_time_s": 10.0, "update_time_s": 1.0,
             "rollout_time_s": 8.0, "val_time_s": None, "activation_bytes": 2 ** 20, "peak_memory_bytes": 2 ** 21,
             "pcm/kept_fraction": 0.5, "pcm/valid_chunks_per_traj": 10.0,
             **{f"pcm/kept_per_traj/{p}": 1.0 for p in PHASE_NAMES}} for i, s in enumerate(success)]


def _runs(curves):
    """{variant: {seed: success list}} -> runs."""
    return {v: {seed: _rows(c) for seed, c in seeds.items()} for v, seeds in curves.items()}


def test_t_interval_matches_scipy_and_a_hand_computation():
    values = [0.1, 0.4, 0.35, 0.2, 0.05]
    mean, low, high, n = ss.t_interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert n == 5 and mean == pytest.approx(0.22) and (low, high) == pytest.approx(expected)
    # [1, 2, 3]: s = 1, t(0.975, 2) = 4.302653
    assert ss.t_interval([1.0, 2.0, 3.0]) == pytest.approx((2.0, 2 - 4.302653 / 3 ** 0.5, 2 + 4.302653 / 3 ** 0.5, 3))
    assert ss.t_interval([1.0, 2.0, 3.0], level=0.5)[2] == pytest.approx(2 + 0.816497 / 3 ** 0.5)
    one = ss.t_interval([0.7])
    assert one[0] == 0.7 and math.isnan(one[1]) and math.isnan(one[2]) and one[3] == 1
    assert ss.t_interval([0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3, 0.3, 3))
    assert ss.t_interval([])[3] == 0 and math.isnan(ss.t_interval([])[0])


def test_paired_difference_of_an_exact_shift_has_zero_width():
    rng = np.random.default_rng(0)
    base = {seed: rng.uniform(0, 0.8, 12) for seed in range(4)}
    runs = _runs({"full": base, "pcm": {s: c + 0.1 for s, c in base.items()}})
    d = ss.paired_difference(runs, "pcm", "full", 12)
    assert d["seeds"] == 4 and d["steps"] == [0, 12]
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((0.1, 0.1, 0.1), abs=1e-12)
    assert d["per_seed"] == pytest.approx({s: 0.1 for s in range(4)})
    assert ss.paired_difference(runs, "full", "pcm", 12)["mean"] == pytest.approx(-0.1)


def test_paired_difference_windows_and_skips_unpaired_or_short_seeds():
    runs = _runs({"full": {0: [0.0] * 10, 1: [0.0] * 10, 2: [0.0] * 10, 3: [0.0] * 6},
                  "pcm": {0: [0.0] * 5 + [0.4] * 5, 1: [0.2] * 5 + [0.6] * 5, 3: [0.5] * 10, 4: [0.5] * 10}})
    d = ss.paired_difference(runs, "pcm", "full", 10)
    assert d["seeds"] == 2 and set(d["per_seed"]) == {0, 1}  # 2 and 4 unpaired, 3 too short in full
    assert d["per_seed"] == pytest.approx({0: 0.2, 1: 0.4}) and d["mean"] == pytest.approx(0.3)
    late = ss.paired_difference(runs, "pcm", "full", 10, first_step=5)
    assert late["per_seed"] == pytest.approx({0: 0.4, 1: 0.6}) and late["steps"] == [5, 10]
    assert set(ss.paired_difference(runs, "pcm", "full", 6)["per_seed"]) == {0, 1, 3}
    missing = ss.paired_difference(runs, "pcm", "frozen", 10)
    assert missing["seeds"] == 0 and math.isnan(missing["mean"]) and missing["per_seed"] == {}


def test_paired_interval_covers_the_true_difference_at_its_level():
    """Seeds differ in how much the variant helps (a seed-level effect) and steps are noisy: the interval
    over seeds covers the true 0.1 about 95% of the time; one that counted steps as units would not."""
    rng = np.random.default_rng(1)
    covered, trials = 0, 400
    for _ in range(trials):
        base = {seed: rng.uniform(0.2, 0.6, 10) for seed in range(4)}
        shift = {seed: 0.1 + rng.normal(0, 0.05) + rng.normal(0, 0.1, 10) for seed in range(4)}
        runs = _runs({"full": base, "pcm": {s: base[s] + shift[s] for s in base}})
        d = ss.paired_difference(runs, "pcm", "full", 10)
        covered += d["low"] <= 0.1 <= d["high"]
    assert 0.91 <= covered / trials <= 0.985


def test_curve_band_success_at_and_time_to_target():
    runs = _runs({"full": {0: [0.0, 0.2, 0.4, 0.6], 1: [0.2, 0.4, 0.6, 0.8], 2: [0.1, 0.3]}})
    mean, low, high = ss.curve_band(runs, "full", 4)  # seed 2 is too short
    np.testing.assert_allclose(mean, [0.1, 0.3, 0.5, 0.7])
    half = stats.t.ppf(0.975, 1) * np.std([0.0, 0.2], ddof=1) / 2 ** 0.5
    np.testing.assert_allclose(high - mean, [half] * 4)
    np.testing.assert_allclose(mean - low, [half] * 4)
    np.testing.assert_allclose(ss.curve_band(runs, "full", 4, smooth=2)[0], [0.1, 0.2, 0.4, 0.6])
    assert np.isnan(ss.curve_band(runs, "pcm", 3)[1]).all()

    at = ss.success_at(runs, "full", 4, 2)  # steps 3 and 4
    assert at["per_seed"] == pytest.approx({0: 0.5, 1: 0.7}) and at["seeds"] == 2 and at["window"] == 2
    assert ss.success_at(runs, "full", 2, 5)["per_seed"] == pytest.approx({0: 0.1, 1: 0.3, 2: 0.2})

    rows = runs["full"][1]
    assert ss.steps_to_target(rows, 0.5, 2) == 3 and ss.minutes_to_target(rows, 0.5, 2) == pytest.approx(0.5)
    assert ss.steps_to_target(rows, 0.9, 1) is None and ss.minutes_to_target(rows, 0.9, 1) is None
    reached = ss.to_target(runs, "full", 0.5, 1)
    assert reached["of"] == 3 and reached["steps"]["seeds"] == 2 and reached["steps"]["mean"] == pytest.approx(3.5)


def _claim_runs(a, b, c, d):
    """Per-seed differences: full − frozen = a, pcm − full = b, random − full = c, top_phase − full = d."""
    seeds = range(len(a))
    frozen = {s: [0.3] * 6 for s in seeds}
    full = {s: [0.3 + a[s]] * 6 for s in seeds}
    return _runs({"frozen": frozen, "full": full, "pcm": {s: [0.3 + a[s] + b[s]] * 6 for s in seeds},
                  "random": {s: [0.3 + a[s] + c[s]] * 6 for s in seeds},
                  "top_phase": {s: [0.3 + a[s] + d[s]] * 6 for s in seeds}})


UP, DOWN, MIXED, NEAR = [0.2, 0.22, 0.18], [-0.2, -0.22, -0.18], [0.1, -0.1, 0.0], [0.01, -0.01, 0.0]


@pytest.mark.parametrize("a, b, c, d, expected", [
    (UP, NEAR, DOWN, DOWN, ["holds"] * 4),
    (UP, DOWN, UP, UP, ["holds", "does not hold", "does not hold", "does not hold"]),
    (UP, MIXED, MIXED, MIXED, ["holds", "inconclusive", "inconclusive", "inconclusive"]),
    (UP, UP, NEAR, NEAR, ["holds", "inconclusive", "inconclusive", "inconclusive"]),  # pcm far above full
    (DOWN, NEAR, DOWN, DOWN, ["does not hold"] + ["inconclusive (GRPO did not learn)"] * 3),
    (MIXED, NEAR, DOWN, DOWN, ["inconclusive"] + ["inconclusive (GRPO learning not shown)"] * 3),
])
def test_claim_verdicts(a, b, c, d, expected):
    result = ss.claims(_claim_runs(a, b, c, d), 6)
    assert [r["id"] for r in result] == ["a", "b", "c", "d"]
    assert [r["verdict"] for r in result] == expected
    assert result[1]["variant"] == "pcm" and result[1]["reference"] == "full" and result[1]["seeds"] == 3
    assert result[1]["mean"] == pytest.approx(np.mean(b))
    if a is not UP:
        assert result[1]["interval_verdict"] == "holds"  # what the interval alone would say


def test_claims_margin_window_and_too_few_seeds():
    runs = _claim_runs(UP, [0.06, 0.07, 0.05], DOWN, DOWN)
    assert ss.claims(runs, 6)[1]["verdict"] == "inconclusive"
    assert ss.claims(runs, 6, margin=0.15)[1]["verdict"] == "holds"
    late = ss.claims(runs, 6, first_step=3)
    assert all(r["steps"] == [3, 6] for r in late)
    one_seed = {v: {0: seeds[0]} for v, seeds in runs.items()}
    assert [r["verdict"] for r in ss.claims(one_seed, 6)][0] == "inconclusive"
    del runs["top_phase"]
    assert ss.claims(runs, 6)[3]["seeds"] == 0 and ss.claims(runs, 6)[3]["verdict"] == "inconclusive"


def _strict(constant):
    raise ValueError(f"{constant} in study.json")


def test_write_study_puts_intervals_and_claims_in_json_and_page(tmp_path):
    rng = np.random.default_rng(2)
    curves = {v: {s: rng.uniform(0, 1, 8) for s in range(3)} for v in ("full", "pcm", "frozen")}
    curves["random"] = {0: rng.uniform(0, 1, 8)}  # one seed: intervals are undefined
    facts = {"machine": {"cpu": "cpu", "cores": 2, "system": "linux", "python": "3"}, "versions": {},
             "study": {}, "settings": [], "variants": {}}
    study_report.write_study(_runs(curves), tmp_path, target=0.6, smooth=2, facts=facts)
    data = json.loads((tmp_path / "study.json").read_text(), parse_constant=_strict)
    assert {"summary", "horizon", "stats", "claims", "stats_options", "setup"} <= set(data)
    pcm = data["stats"]["pcm"]
    assert set(pcm) == {"vs_full", "vs_frozen", "success_at", "to_target"} and "vs_full" not in data["stats"]["full"]
    assert pcm["vs_full"]["horizon"]["steps"] == [0, 8] and pcm["vs_full"]["second_half"]["steps"] == [4, 8]
    assert pcm["vs_frozen"]["horizon"]["seeds"] == 3 and pcm["vs_frozen"]["horizon"]["low"] is not None
    assert [s["step"] for s in pcm["success_at"]] == [2, 4, 8]
    assert set(pcm["to_target"]) == {"steps", "minutes", "of"} and pcm["to_target"]["of"] == 3
    assert data["stats"]["random"]["vs_full"]["horizon"]["low"] is None  # NaN became null
    assert [c["id"] for c in data["claims"]] == ["a", "b", "c", "d"] and data["claims"][0]["seeds"] == 3
    assert all(c["verdict"].startswith(("holds", "does not hold", "inconclusive")) for c in data["claims"])
    text = (tmp_path / "study.md").read_text()
    assert "## Paired differences" in text and "## Claims" in text and "## Success at fixed steps" in text
    assert "| pcm | " in text.split("## Paired differences")[1] and "(a) GRPO learns" in text
    assert "## Table 1 analogue" in text and "## Cost of a step" in text


def test_format_interval_shows_what_the_seeds_support():
    from pcm_train.tools.study_stats import format_interval

    assert format_interval({"mean": 0.1234, "low": -0.01, "high": 0.25}) == "+0.123 [-0.010, +0.250]"
    assert format_interval({"mean": 0.5, "low90": 0.4, "high90": 0.6, "low": 0.0, "high": 1.0}, ".2f",
                           low="low90", high="high90") == "0.50 [0.40, 0.60]"
    assert format_interval({"mean": 0.2, "low": float("nan"), "high": float("nan")}) == "+0.200"  # one seed
    assert format_interval({"mean": float("nan"), "low": 0.0, "high": 0.0}) == "—"
    assert format_interval(None) == format_interval({"mean": None}) == "—"
