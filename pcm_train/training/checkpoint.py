"""Resumable checkpoints, written atomically (temp directory + rename).

Layout of a run directory::

    RUN/config.json            the resolved configuration
    RUN/metrics.jsonl          one JSON object per step
    RUN/validation.jsonl       one JSON object per validation episode (step, task, placement, success)
    RUN/base_policy/           the starting weights when they were freshly initialized
    RUN/checkpoints/step_000010/{policy/, trainer_state.pt}
    RUN/checkpoints/latest     name of the newest complete checkpoint

A checkpoint directory becomes visible under its final name only when it is
complete, and ``latest`` is replaced atomically, so an interruption at any
moment leaves the previous checkpoint usable.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be read (truncated, corrupt, from another kind of run)."""


def rng_states() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, prefix=f".{path.name}.") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)


def save_policy(policy, directory: Path) -> None:
    """Adapters only when the policy has LoRA, else the full weights (in the policy's own layout)."""
    if getattr(policy, "has_lora", False):
        policy.save_lora(str(directory))
    elif hasattr(policy, "save_merged"):
        policy.save_merged(str(directory))
    else:
        policy.save_pretrained(str(directory))


def save_checkpoint(run_dir: Path, step: int, policy, trainer_state: dict) -> Path:
    """Write ``checkpoints/step_{step}`` (policy + trainer_state.pt) and point ``latest`` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:06d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        save_policy(policy, staging / "policy")
        torch.save(trainer_state, staging / "trainer_state.pt")
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_atomically(root / LATEST, name)
    return final


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run; FileNotFoundError with the reason if there is none."""
    root = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"resume: run directory {run_dir} does not exist")
    if not (root / LATEST).is_file():
        raise FileNotFoundError(f"resume: {run_dir} has no checkpoint yet ({root / LATEST} is missing)")
    path = root / (root / LATEST).read_text().strip()
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"resume: checkpoint {path} is incomplete")
    return path


def load_trainer_state(checkpoint: Path) -> dict:
    """The trainer state of a checkpoint; CheckpointError naming the file when it cannot be read."""
    path = Path(checkpoint) / "trainer_state.pt"
    try:
        state = torch.load(path, weights_only=False)
    except Exception as error:  # torch.load raises many types for a corrupt file
        raise CheckpointError(f"resume: cannot read {path} ({type(error).__name__}: {error}); the file is "
                              "truncated or corrupt: point checkpoints/latest at an earlier step_* directory")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"resume: {path} holds no trainer state (expected a dict with 'step')")
    return state
