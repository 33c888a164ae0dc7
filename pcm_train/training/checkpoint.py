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

``trainer_state.pt`` holds tensors and plain data only (dicts, lists, tuples, strings, numbers,
None; the RNG states included) and is read with ``torch.load(weights_only=True)``: loading a
checkpoint never runs pickled code. Checkpoints written before that hold numpy's global RNG state
as a numpy array; they load through the same safe path with numpy's array globals allowed.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from pcm_train.runtime.files import write_atomically

LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be read (truncated, corrupt, from another kind of run)."""


# What a trainer state written before it held plain data needs besides tensors and plain data:
# numpy's MT19937 key array (np.random.get_state()'s legacy tuple): numpy's _reconstruct (pickled
# under different module names by numpy 1 and 2), the array and uint32 dtype classes it builds.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_LEGACY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                   (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
                   (_RECONSTRUCT, "numpy._core.multiarray._reconstruct")]
_LEGACY_NAMES = {"numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct",
                 "numpy._core.multiarray._reconstruct"}


def rng_states() -> dict:
    """The global RNGs' states as tensors and plain data: ``torch`` (uint8 tensor), ``numpy`` (numpy's
    dict form, the MT19937 key as a list of ints), ``python`` (``random.getstate()``), ``cuda`` (list of
    uint8 tensors, with CUDA)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Restores ``rng_states()`` (``numpy`` may also be an older checkpoint's legacy tuple)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """The trainer state of a checkpoint, read with ``torch.load(weights_only=True)`` (nothing pickled
    runs); CheckpointError naming the file when it cannot be read or would need other objects."""
    path = Path(checkpoint) / "trainer_state.pt"
    try:
        foreign = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - _LEGACY_NAMES
    except Exception as error:  # a file that is not a torch.save zip archive
        raise _unreadable(path, error) from error
    if foreign:
        raise CheckpointError(f"resume: {path} holds pickled objects other than tensors and plain data "
                              f"({', '.join(sorted(foreign))}); it is not loaded, as loading could run code: "
                              "a trainer state written by pcm_train holds none")
    try:
        with torch.serialization.safe_globals(_LEGACY_GLOBALS):
            state = torch.load(path, weights_only=True)
    except Exception as error:  # torch.load raises many types for a corrupt file
        raise _unreadable(path, error) from error
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"resume: {path} holds no trainer state (expected a dict with 'step')")
    return state


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(f"resume: cannot read {path} ({type(error).__name__}: {error}); the file is "
                           "truncated or corrupt: point checkpoints/latest at an earlier step_* directory")
