import json
import re

import numpy as np
import pytest
import torch

from pcm_train.tools import knee
from pcm_train.algorithm.controller import PHASE_NAMES
from pcm_train.policies import SmallVLA, SmallVLAConfig
from pcm_train.tools.synthetic import synthetic_rollout_batch

LINE = re.compile(r"knee at ([\d.]+)% of chunks captures ([\d.]+)% of score mass; "
                  r"recommended B = (\d+) \(of (\d+) chunks\); captured at B=8/12/16: [\d.]+%/[\d.]+%/[\d.]+%")


def test_step_vector_knee_at_its_nonzero_share(gen):
    x, y = knee.capture_curve(torch.cat([torch.ones(20), torch.zeros(80)])[torch.randperm(100, generator=gen)])
    assert x.dtype == y.dtype == np.float64 and x.shape == y.shape == (101,)
    assert (x[0], y[0], x[-1], y[-1]) == (0.0, 0.0, 1.0, 1.0)
    k = knee.knee_point(x, y)
    assert k == 20 and x[k] == pytest.approx(0.2) and y[k] == 1.0
    assert knee.captured_at(x, y, 0.1) == pytest.approx(0.5)
    assert knee.recommend_budget(x, y, 64) == 13  # 0.2 * 64 = 12.8


def test_two_level_vector():
    # 10 chunks at 3, 30 at 1: mass 60; the top 10 hold 30/60 = 50% at 25% of the chunks
    x, y = knee.capture_curve(torch.tensor([1.0] * 30 + [3.0] * 10))
    k = knee.knee_point(x, y)
    assert (x[k], y[k]) == (pytest.approx(0.25), pytest.approx(0.5))
    assert knee.captured_at(x, y, 0.5) == pytest.approx((30 + 10) / 60)
    assert knee.recommend_budget(x, y, 64) == 16 and knee.recommend_budget(x, y, 10) == 3  # 2.5 rounds up
    assert knee.budget_capture(x, y, 64) == {8: pytest.approx(15 / 60), 12: pytest.approx(22.5 / 60),
                                             16: pytest.approx(0.5)}
    assert knee.budget_capture(x, y, 8, (4, 8, 16))[16] == 1.0  # B >= chunks keeps everything


def test_knee_is_the_share_of_above_mean_chunks(gen):
    scores = torch.rand(500, generator=gen) ** 3
    x, y = knee.capture_curve(scores)
    assert x[knee.knee_point(x, y)] == pytest.approx(float((scores > scores.mean()).float().mean()))


def test_all_zero_is_the_diagonal_without_knee():
    x, y = knee.capture_curve(torch.zeros(7))
    np.testing.assert_array_equal(x, y)
    assert knee.knee_point(x, y) == 0 and knee.recommend_budget(x, y, 64) == 1


@pytest.mark.parametrize("bad", [torch.zeros(0), torch.ones(2, 2), torch.tensor([1.0, -1.0]),
                                 torch.tensor([1.0, float("nan")])])
def test_capture_curve_rejects(bad):
    with pytest.raises(ValueError):
        knee.capture_curve(bad)


def _write_run(run_dir, scores, counts, steps=3):
    rows = []
    for step in range(steps):
        row = {"step": step}
        for p, name in enumerate(PHASE_NAMES):
            row[f"pcm/score/{name}"] = scores[p] if step != 1 else None  # undefined at step 1
            row[f"pcm/chunks_per_traj/{name}"] = counts[p]
        rows.append(row)
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_scores_from_metrics_repeat_each_phase_score():
    rows = [{"pcm/score/approach": 1.0, "pcm/chunks_per_traj/approach": 2.0,
             "pcm/score/active_grip": None, "pcm/chunks_per_traj/active_grip": 1.5},
            {"pcm/score/approach": 3.0, "pcm/chunks_per_traj/approach": 4.0,
             "pcm/score/active_grip": 5.0, "pcm/chunks_per_traj/active_grip": 0.5}]
    scores = knee.chunk_scores_from_metrics(rows, trajectories=2)
    assert sorted(scores.tolist()) == [2.0] * 6 + [5.0] * 2


def test_cli_on_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    # mean chunks per trajectory: 12.8 active grip at score 1, 51.2 elsewhere at score 0 -> knee at 20%
    _write_run(run, [0.0, 0.0, 1.0, 0.0, 0.0], [30.0, 5.2, 12.8, 6.0, 10.0])
    assert knee.main([str(run)]) == 0
    match = LINE.fullmatch(capsys.readouterr().out.strip())
    assert match and match.groups() == ("20.0", "100.0", "13", "64")
    assert (run / "report" / "knee.png").stat().st_size > 0


def test_cli_on_batch_file(tmp_path, capsys):
    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     image_size=16, vision_width=16, vision_layers=1, vision_heads=2))
    batch = synthetic_rollout_batch(policy, num_prompts=2, group_size=2, num_chunks=8, seed=0)
    knee.save_batch(batch, tmp_path / "batch.pt")
    out = tmp_path / "figs"
    start = str(policy.config.action_token_start)
    assert knee.main([str(tmp_path / "batch.pt"), "--out", str(out), "--chunks", "8",
                      "--action-token-start", start]) == 0
    match = LINE.fullmatch(capsys.readouterr().out.strip())
    assert match and match.group(4) == "8" and 1 <= int(match.group(3)) <= 8
    assert (out / "knee.png").stat().st_size > 0
    # the same batch as a plain dict gives the same line
    plain = {k: batch.batch[k] for k in ("responses", "finish_step", "complete")}
    plain["uid"] = list(batch.non_tensor_batch["uid"])
    torch.save(plain, tmp_path / "plain.pt")
    assert knee.main([str(tmp_path / "plain.pt"), "--out", str(out), "--chunks", "8",
                      "--action-token-start", start]) == 0
    assert LINE.fullmatch(capsys.readouterr().out.strip()).groups() == match.groups()


def test_bad_inputs_exit_2(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save({"responses": torch.zeros(2, 3, 56, dtype=torch.int64)}, tmp_path / "partial.pt")
    _write_run(tmp_path / "flat", [0.0] * 5, [10.0] * 5)
    (tmp_path / "empty_run").mkdir()
    for bad in ("missing", "junk.pt", "partial.pt", "flat", "empty_run"):
        assert knee.main([str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err



class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('ran')",))  # what the old loader ran


def test_a_batch_file_holding_a_pickled_object_is_refused_without_running_it(tmp_path, capsys, monkeypatch):
    """A crafted batch file whose unpickling would run code is refused (nothing runs); so is a pickled
    DataProto (save_batch writes the same batch as tensors and plain data)."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     image_size=16, vision_width=16, vision_layers=1, vision_heads=2))
    batch = synthetic_rollout_batch(policy, num_prompts=2, group_size=2, num_chunks=8, seed=0)
    fields = {k: batch.batch[k] for k in ("responses", "finish_step", "complete")}
    torch.save({**fields, "uid": list(batch.non_tensor_batch["uid"]), "extra": _RunsCodeWhenUnpickled()},
               tmp_path / "crafted.pt")
    torch.save(batch, tmp_path / "dataproto.pt")
    for name in ("crafted.pt", "dataproto.pt"):
        assert knee.main([str(tmp_path / name), "--chunks", "8"]) == 2
        err = capsys.readouterr().err
        assert "refused" in err and "save_batch" in err and err.count("\n") == 1, err
    assert not (tmp_path / "PWNED").exists()
    with pytest.raises(knee.KneeInputError, match="missing"):
        knee.save_batch({"responses": fields["responses"]}, tmp_path / "x.pt")
