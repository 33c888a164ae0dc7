"""Rollout/update overlap (``trainer.overlap=true``): a second copy of the policy rolls the next step's
batch out in a worker thread while the main thread selects chunks and updates the live policy.

Both sides progress at once: torch releases the GIL inside its ops and the envs step in other processes
(Ray workers). On a GPU the worker thread runs on its own CUDA stream, so the rollout's kernels are not
queued behind the update's.
"""
from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def _own_tensors(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a rollout copy holds for itself, by name: trainable parameters and buffers."""
    tensors = {name: p for name, p in policy.named_parameters() if p.requires_grad}
    tensors.update(policy.named_buffers())
    return tensors


class RolloutCopy:
    """A copy of the live policy that only rolls out, holding the weights of an earlier step.

    Parameters the update never changes (``requires_grad=False``: a LoRA base, frozen towers) are shared
    with the live policy, not copied; so the copy costs the trainable parameters and the buffers: the
    adapters with LoRA, a second set of weights (no gradients, no optimizer state) with full fine-tuning."""

    def __init__(self, policy: torch.nn.Module):
        frozen = {id(p): p for p in policy.parameters() if not p.requires_grad}
        self.policy = copy.deepcopy(policy, memo=frozen)
        self._tensors = _own_tensors(self.policy)

    @torch.no_grad()
    def refresh(self, policy: torch.nn.Module) -> None:
        """Copies ``policy``'s (the live policy's) trainable parameters and buffers into the copy."""
        for name, tensor in _own_tensors(policy).items():
            self._tensors[name].copy_(tensor)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The copy's own tensors (CPU clones), for a checkpoint."""
        return {name: tensor.detach().cpu().clone() for name, tensor in self._tensors.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restores ``state_dict()``; KeyError when its names are not this policy's."""
        if set(state) != set(self._tensors):
            raise KeyError(f"the rollout copy's tensors {sorted(set(state) ^ set(self._tensors))[:5]} do not "
                           "match the policy's")
        for name, tensor in state.items():
            self._tensors[name].copy_(tensor)


class Background:
    """Runs one job at a time in a worker thread (on its own CUDA stream on a GPU); ``abort`` is an event
    the job may poll."""

    def __init__(self, device: torch.device):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        self._device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.abort = threading.Event()

    def submit(self, job) -> Future:
        """Starts ``job()``; the future's result is ``(job's result, its wall-clock seconds)``. On a GPU the
        job's stream first waits for the work queued so far (the copy's refreshed weights)."""
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        return self._executor.submit(self._timed, job)

    def _timed(self, job):
        started = time.perf_counter()
        if self._stream is None:
            return job(), time.perf_counter() - started
        with torch.cuda.stream(self._stream):
            result = job()
        self._stream.synchronize()
        return result, time.perf_counter() - started

    def close(self) -> None:
        self._executor.shutdown(wait=True)
