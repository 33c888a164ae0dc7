"""The PCM controller: phase scores -> keep probabilities -> which chunks the actor trains on.

Strategies (PCM.md §6) share one interface and live in a registry, like verl's
policy losses: ``full`` (every valid chunk), ``random`` (uniform over valid
chunks), ``top_phase`` (only the highest-scoring phase) and ``pcm`` (keep
probability per phase from the success/failure divergence).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import pcm_kernels as pk
from pcm_train.algorithm.batch import all_valid_chunks
from pcm_train.config import PCMSection

PHASE_NAMES = [p.name.lower() for p in pk.Phase]

# name -> fn(controller) -> float32 [P] weight per phase (0 = never drawn), or None = every valid chunk
STRATEGY_REGISTRY: dict[str, Callable[["PCMController"], Optional[torch.Tensor]]] = {}


def register_strategy(name: str):
    """Decorator adding a phase-weighting strategy to ``STRATEGY_REGISTRY``."""
    def add(fn):
        if name in STRATEGY_REGISTRY:
            raise ValueError(f"strategy {name!r} is already registered")
        STRATEGY_REGISTRY[name] = fn
        return fn
    return add


@register_strategy("full")
def _full(controller):
    return None


@register_strategy("random")
def _random(controller):
    return torch.ones_like(controller.keep_probs)


@register_strategy("top_phase")
def _top_phase(controller):
    """Weight 1 for the phase(s) with the highest keep probability, 0 elsewhere. Before any phase
    score exists (all keep probabilities 1) every phase ties, so the draw is uniform over valid
    chunks, as ``random``; ``pcm/scores_ready`` = 0 in the metrics marks those steps."""
    probs = controller.keep_probs
    return (probs == probs.max()).to(torch.float32)


@register_strategy("pcm")
def _pcm(controller):
    return controller.keep_probs


@dataclass
class Selection:
    """What the controller chose for one step.

    labels: int8 [N, C] phase per chunk (-1 past the trajectory end).
    index: int64 [N, B'] kept chunk ids per trajectory, ascending, -1 padded
        (B' = budget, or C for ``full``).
    weights: float32 [N, B'] the unbiased estimator's 1/q per kept chunk (0 at padding;
        1 for ``full``) when ``pcm.estimator=unbiased``, else None.
    scores: float32 [P] this step's C_c; defined: bool [P].
    keep_probs: float32 [P] keep probabilities used for this step.
    metrics: flat dict of floats for logging.
    """

    labels: torch.Tensor
    index: torch.Tensor
    weights: Optional[torch.Tensor]
    scores: torch.Tensor
    defined: torch.Tensor
    keep_probs: torch.Tensor
    metrics: dict = field(default_factory=dict)


def keep_probabilities(mean_scores: torch.Tensor, p_min: float) -> torch.Tensor:
    """PCM.md §4: share-normalize, max-normalize, floor at p_min; uniform 1 if every score is 0."""
    total = mean_scores.sum()
    if not bool(total > 0):
        return torch.ones_like(mean_scores)
    share = mean_scores / total
    return torch.clamp(share / share.max(), min=p_min)


class PCMController:
    """Holds the phase-score buffers and keep probabilities; selects the chunks each step.

    Call ``step`` once per training step with the rollout batch. The first step and
    every ``cfg.refresh_every`` steps after it collapse the buffers into new keep
    probabilities before selecting. State round-trips through ``state_dict``.
    """

    def __init__(self, cfg: PCMSection, *, seed: int = 0):
        if cfg.strategy not in STRATEGY_REGISTRY:
            raise ValueError(f"pcm.strategy must be one of {sorted(STRATEGY_REGISTRY)}, got {cfg.strategy!r}")
        self.cfg = cfg
        self.num_phases = len(pk.Phase)
        self.buffers: list[list[float]] = [[] for _ in range(self.num_phases)]
        self.keep_probs = torch.ones(self.num_phases, dtype=torch.float32)
        self.mean_scores = torch.zeros(self.num_phases, dtype=torch.float32)
        self.steps_done = 0
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def label_kwargs(self) -> dict:
        c = self.cfg
        return dict(close_above=c.close_above, sustain=c.sustain, grip=c.grip, low=c.low, window=c.window)

    def _refresh(self) -> None:
        self.mean_scores = torch.tensor([sum(b) / len(b) if b else 0.0 for b in self.buffers], dtype=torch.float32)
        self.keep_probs = keep_probabilities(self.mean_scores, self.cfg.p_min)
        self.buffers = [[] for _ in range(self.num_phases)]

    def step(self, gripper: torch.Tensor, num_steps: torch.Tensor, actions: torch.Tensor,
             success: torch.Tensor, group: torch.Tensor) -> Selection:
        """Score this step's rollouts, refresh keep probabilities when due, and select chunks.

        Args:
            gripper: float [N, C, L] executed env-space gripper commands (+1 close).
            num_steps: int [N] env steps executed (finish_step).
            actions: float [N, C, F] executed normalized action vector per chunk (F = L * D).
            success: bool [N]; group: int [N] group id per trajectory.
        """
        labels = pk.label_phases(gripper, num_steps, **self.label_kwargs)
        scores, defined = pk.phase_scores(actions, labels, success, group)
        for p in torch.nonzero(defined.cpu()).flatten().tolist():
            self.buffers[p].append(float(scores[p]))
        refreshed = self.steps_done % self.cfg.refresh_every == 0
        if refreshed:
            self._refresh()
        phase_weights = STRATEGY_REGISTRY[self.cfg.strategy](self)
        unbiased = self.cfg.estimator == "unbiased"
        weights = None
        if phase_weights is None:
            index = all_valid_chunks(num_steps, labels.shape[1], gripper.shape[2])
            if unbiased:
                weights = (index >= 0).to(torch.float32)
        else:
            drawn = pk.select_chunks(gripper, num_steps, phase_weights, self.cfg.budget,
                                     generator=self._device_generator(gripper.device), return_weights=unbiased,
                                     **self.label_kwargs)
            index = drawn[1]
            weights = drawn[2] if unbiased else None
        self.steps_done += 1
        selection = Selection(labels, index, weights, scores.cpu(), defined.cpu(), self.keep_probs.clone())
        selection.metrics = self._metrics(selection, refreshed)
        return selection

    def _device_generator(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.generator
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return torch.Generator(device=device).manual_seed(seed)

    def _metrics(self, sel: Selection, refreshed: bool) -> dict:
        labels = sel.labels.long()
        N = labels.shape[0]
        kept = sel.index >= 0
        kept_labels = labels.gather(1, sel.index.clamp(min=0))[kept]
        valid = int((labels >= 0).sum())
        out = {"pcm/kept_fraction": float(kept.sum()) / max(valid, 1), "pcm/refreshed": float(refreshed),
               "pcm/scores_ready": float(bool(self.mean_scores.sum() > 0)),
               "pcm/valid_chunks_per_traj": valid / max(N, 1)}
        if sel.weights is not None:
            kept_weights = sel.weights[kept]
            out["pcm/estimator_weight_mean"] = float(kept_weights.mean()) if kept_weights.numel() else 0.0
            out["pcm/estimator_weight_max"] = float(kept_weights.max()) if kept_weights.numel() else 0.0
        kept_counts = torch.bincount(kept_labels.cpu(), minlength=self.num_phases)
        phase_counts = torch.bincount(labels[labels >= 0].cpu(), minlength=self.num_phases)
        for p, name in enumerate(PHASE_NAMES):
            out[f"pcm/score/{name}"] = float(sel.scores[p]) if bool(sel.defined[p]) else float("nan")
            out[f"pcm/keep_prob/{name}"] = float(sel.keep_probs[p])
            out[f"pcm/kept_per_traj/{name}"] = float(kept_counts[p]) / max(N, 1)
            out[f"pcm/chunks_per_traj/{name}"] = float(phase_counts[p]) / max(N, 1)
        return out

    def state_dict(self) -> dict:
        return {"strategy": self.cfg.strategy, "budget": self.cfg.budget, "buffers": [list(b) for b in self.buffers],
                "keep_probs": self.keep_probs.clone(), "mean_scores": self.mean_scores.clone(),
                "steps_done": self.steps_done, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["strategy"] != self.cfg.strategy:
            raise ValueError(f"checkpoint controller used strategy {state['strategy']!r}, "
                             f"this run uses {self.cfg.strategy!r}")
        self.buffers = [list(b) for b in state["buffers"]]
        self.keep_probs = state["keep_probs"].clone()
        self.mean_scores = state["mean_scores"].clone()
        self.steps_done = int(state["steps_done"])
        self.generator.set_state(state["generator"])
