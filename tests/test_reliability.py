"""Nothing lost, nothing silent: run directories that cannot be clobbered, corrupt resume directories
refused with a message naming the file, trainer states loaded without unpickling code, resumed logs that
agree with the checkpoint, staging leftovers cleaned. Runs use the fake env pool (tests/fake_env.py) through the real trainer and CLI."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from pcm_train import run
from pcm_train.training.checkpoint import CheckpointError, latest_checkpoint, load_trainer_state
from pcm_train.config import load_config
from pcm_train.training.metrics_log import read_metrics
from pcm_train.training.run_dir import RunDirError
from pcm_train.training.trainer import Trainer

from fake_env import fake_pool_factory
from test_trainer import TINY


def _train(path, *extra, steps=2):
    trainer = Trainer(load_config(TINY + [f"trainer.output_dir={path}", f"trainer.total_steps={steps}"] + list(extra)),
                      fake_pool_factory(close_steps=6))
    assert trainer.run()
    trainer.close()
    return trainer


def _snapshot(path):
    """{relative path: bytes} of every file under ``path``."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def cli(monkeypatch, capsys):
    """``cli(*argv)`` runs ``python -m pcm_train.run`` on the fake pool; returns (exit code, stderr)."""
    import pcm_train.training.trainer

    monkeypatch.setattr(pcm_train.training.trainer, "make_env_pool", fake_pool_factory(close_steps=6))
    monkeypatch.setattr("pcm_train.tools.report.write_report", lambda runs: [])

    def call(*argv):
        code = run.main(list(argv))
        return code, capsys.readouterr().err
    return call


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-step run (checkpoints at steps 0 and 1) to copy and damage."""
    return _train(tmp_path_factory.mktemp("reliability") / "run").run_dir


def _copy(finished_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


# ---- a run directory is never overwritten by accident ----------------------------------------------


def test_fresh_run_into_a_used_directory_refuses_and_touches_nothing(finished_run, tmp_path, cli):
    path = _copy(finished_run, tmp_path)
    before = _snapshot(path)
    code, err = cli(*TINY, f"trainer.output_dir={path}")
    assert code == 2 and "is not empty" in err and f"resume={path}" in err and "trainer.overwrite=true" in err
    assert _snapshot(path) == before


def test_overwrite_replaces_the_directory(finished_run, tmp_path):
    path = _copy(finished_run, tmp_path)
    (path / "stray.txt").write_text("old")
    _train(path, "trainer.overwrite=true", steps=1)
    assert not (path / "stray.txt").exists()
    assert [r["step"] for r in read_metrics(path / "metrics.jsonl")] == [0]
    assert latest_checkpoint(path).name == "step_000000" and not (path / "checkpoints" / "step_000001").exists()


def test_a_run_failing_its_own_validation_writes_nothing(tmp_path, cli):
    for bad in ("env.task_ids=[99]", f"policy.path={tmp_path / 'no_policy'}"):
        code, err = cli(*TINY, f"trainer.output_dir={tmp_path / 'new'}", bad)
        assert code == 2 and bad.split("=")[0] in err
        assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging left next to the run directory either


def test_a_failing_override_on_resume_is_not_saved(finished_run, tmp_path, cli):
    path = _copy(finished_run, tmp_path)
    before = _snapshot(path)
    code, err = cli(f"resume={path}", "env.task_ids=[99]")
    assert code == 2 and "env.task_ids" in err
    assert _snapshot(path) == before
    code, err = cli(f"resume={path}", "trainer.total_steps=3")  # the plain resume still works
    assert code == 0, err
    assert [r["step"] for r in read_metrics(path / "metrics.jsonl")] == [0, 1, 2]
    assert json.loads((path / "config.json").read_text())["trainer"]["total_steps"] == 3


def test_device_without_cuda_is_refused_before_setup(tmp_path, cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = cli(*TINY, f"trainer.output_dir={tmp_path / 'new'}", "trainer.device=cuda")
    assert code == 2 and "trainer.device=cuda" in err and not (tmp_path / "new").exists()


# ---- resume: log, TensorBoard and checkpoint agree --------------------------------------------------


def test_missing_metrics_log_is_an_error_with_a_fix(finished_run, tmp_path, cli):
    path = _copy(finished_run, tmp_path)
    (path / "metrics.jsonl").unlink()
    code, err = cli(f"resume={path}", "trainer.total_steps=3")
    assert code == 2 and "metrics.jsonl is missing" in err and "trainer.allow_partial_log=true" in err
    code, err = cli(f"resume={path}", "trainer.total_steps=3", "trainer.allow_partial_log=true")
    assert code == 0, err
    assert [r["step"] for r in read_metrics(path / "metrics.jsonl")] == [2]


def test_log_missing_steps_is_an_error(finished_run, tmp_path, cli):
    path = _copy(finished_run, tmp_path)
    rows = read_metrics(path / "metrics.jsonl")
    (path / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")
    code, err = cli(f"resume={path}", "trainer.total_steps=3")
    assert code == 2 and "lacks steps 0" in err


def test_redone_steps_replace_their_log_rows_and_tensorboard_points(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = tmp_path / "run"
    _train(path, "trainer.save_every=0", steps=2)  # checkpoint only at the end (step 1)
    state_dir = path / "checkpoints"
    shutil.copytree(state_dir / "step_000001", state_dir / "step_000000")
    (state_dir / "latest").write_text("step_000000")  # as if the run had died after logging step 1
    state = torch.load(state_dir / "step_000000" / "trainer_state.pt", weights_only=True)  # plain data
    state["step"] = 0
    torch.save(state, state_dir / "step_000000" / "trainer_state.pt")
    cfg = load_config(TINY + [f"resume={path}", "trainer.total_steps=2", "trainer.save_every=0"])
    resumed = Trainer(cfg, fake_pool_factory(close_steps=6))
    assert resumed.step == 1
    assert resumed.run()
    resumed.close()
    assert [r["step"] for r in read_metrics(path / "metrics.jsonl")] == [0, 1]
    events = EventAccumulator(str(path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("success_rate")] == [0, 1]


def test_staging_left_by_a_killed_checkpoint_write_is_cleaned(finished_run, tmp_path, cli):
    path = _copy(finished_run, tmp_path)
    leftovers = [path / "checkpoints" / ".step_000002.abc", path / "checkpoints" / ".latest.xyz"]
    leftovers[0].mkdir()
    (leftovers[0] / "trainer_state.pt").write_bytes(b"partial")
    leftovers[1].write_text("step_0")
    code, err = cli(f"resume={path}", "trainer.total_steps=3")
    assert code == 0, err
    assert not any(p.exists() for p in leftovers)
    assert "interrupted checkpoint write" in err


# ---- corrupt resume directories --------------------------------------------------------------------


@pytest.mark.parametrize("damage,message", [
    ("empty_state", "trainer_state.pt"),
    ("garbage_state", "trainer_state.pt"),
    ("not_a_state", "holds no trainer state"),
    ("truncated_adapters", "cannot load the policy of checkpoint"),
    ("truncated_config", "config.json is not valid JSON"),
    ("dangling_latest", "incomplete"),
])
def test_corrupt_resume_directories_give_an_error_naming_the_file(finished_run, tmp_path, cli, damage, message):
    path = _copy(finished_run, tmp_path)
    step = path / "checkpoints" / "step_000001"
    if damage == "empty_state":
        (step / "trainer_state.pt").write_bytes(b"")
    elif damage == "garbage_state":
        (step / "trainer_state.pt").write_bytes(b"\x00garbage" * 100)
    elif damage == "not_a_state":
        torch.save([1, 2, 3], step / "trainer_state.pt")
    elif damage == "truncated_adapters":
        weights = step / "policy" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "truncated_config":
        (path / "config.json").write_text((path / "config.json").read_text()[:50])
    else:
        (path / "checkpoints" / "latest").write_text("step_000009")
    before = _snapshot(path)
    code, err = cli(f"resume={path}", "trainer.total_steps=3")
    assert code == 2, err
    assert "\nerror: " in "\n" + err and message in err and "Traceback" not in err
    assert _snapshot(path) == before


# ---- trainer states are read without unpickling code --------------------------------------------------


class _Payload:
    """Pickles as a call of ``os.mkdir(path)``: what a crafted checkpoint would run when unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_a_crafted_pickle_in_a_checkpoint_does_not_run(finished_run, tmp_path, cli):
    path = _copy(finished_run, tmp_path)
    state_path = path / "checkpoints" / "step_000001" / "trainer_state.pt"
    marker = tmp_path / "payload_ran"
    state = torch.load(state_path, weights_only=True)
    torch.save({**state, "controller": {**state["controller"], "extra": _Payload(marker)}}, state_path)
    before = _snapshot(path)
    code, err = cli(f"resume={path}", "trainer.total_steps=3")
    assert code == 2 and "trainer_state.pt holds pickled objects other than tensors" in err, err
    assert "it is not loaded" in err and "Traceback" not in err
    assert not marker.exists() and _snapshot(path) == before
    torch.load(state_path, weights_only=False)  # the payload is live: an unpickling load runs it
    assert marker.exists()


def _as_legacy(state_path):
    """Rewrites a trainer state as checkpoints held it before plain-data states: numpy's global RNG
    state as ``np.random.get_state()``'s tuple with a uint32 array."""
    state = torch.load(state_path, weights_only=True)
    numpy_state = state["rng"]["numpy"]
    state["rng"]["numpy"] = ("MT19937", np.array(numpy_state["state"]["key"], dtype=np.uint32),
                             numpy_state["state"]["pos"], numpy_state["has_gauss"], numpy_state["gauss"])
    torch.save(state, state_path)


def test_a_checkpoint_from_before_plain_states_resumes_as_the_same_one(finished_run, tmp_path, cli):
    plain, legacy = _copy(finished_run, tmp_path / "plain"), _copy(finished_run, tmp_path / "legacy")
    _as_legacy(legacy / "checkpoints" / "step_000001" / "trainer_state.pt")
    with pytest.raises(pickle.UnpicklingError):  # it needs numpy's array globals
        torch.load(legacy / "checkpoints" / "step_000001" / "trainer_state.pt", weights_only=True)
    assert load_trainer_state(legacy / "checkpoints" / "step_000001")["rng"]["numpy"][0] == "MT19937"
    for path in (plain, legacy):
        np.random.seed(len(str(path)))  # a different global state before each resume
        code, err = cli(f"resume={path}", "trainer.total_steps=3")
        assert code == 0, err
    rows = [read_metrics(p / "metrics.jsonl")[2] for p in (plain, legacy)]
    for key in ("success_rate", "chunks_kept", "pcm/keep_prob/active_grip", "episode_steps_mean", "actor/pg_loss"):
        assert rows[0][key] == rows[1][key], key
    states = [torch.load(latest_checkpoint(p) / "trainer_state.pt", weights_only=True) for p in (plain, legacy)]
    assert states[0]["rng"]["numpy"] == states[1]["rng"]["numpy"]  # the legacy state was restored
    assert states[0]["episode_rng"] == states[1]["episode_rng"]


def test_checkpoint_errors_are_value_errors():
    assert issubclass(CheckpointError, ValueError) and issubclass(RunDirError, ValueError)
