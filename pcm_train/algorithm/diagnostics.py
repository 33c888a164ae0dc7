"""How much of the full GRPO gradient a chunk selection carries, measured on one rollout batch.

``selection_diagnostics`` backpropagates the step's batch twice at the current weights, once over
every valid chunk (the ``full`` strategy's loss) and once over the kept chunks (the strategy's own
loss, its estimator included), and compares the two flattened gradients ``g`` (full) and ``ĝ``
(kept). The trainer calls it every ``trainer.diagnostics_every`` steps, before the update, so the
optimizer state and the weights are untouched (the gradients are zeroed again afterwards).

Metrics (``diag/...``):

- ``grad_cosine``: cos(ĝ, g); 1 for ``full``.
- ``grad_norm_ratio``: ||ĝ|| / ||g||.
- ``grad_projection``: <ĝ, g> / ||g||², the share of the full step taken along its own direction.
- ``adv_mass_kept``: Σ |A| over kept valid tokens / Σ |A| over every valid token; per phase
  ``adv_mass_kept/<phase>`` (phases with no valid token of nonzero advantage are left out).
- ``full_grad_norm``: ||g||; 0 when no group has mixed outcomes (the cosine is then left out).
"""
from __future__ import annotations

import torch
from verl import DataProto

from pcm_train.algorithm.actor import accumulate_gradients
from pcm_train.algorithm.batch import all_valid_chunks, shrink_batch
from pcm_train.algorithm.controller import PHASE_NAMES, Selection
from pcm_train.algorithm.grpo import token_mask
from pcm_train.config import ActorSection


def flat_gradient(policy: torch.nn.Module, kept: DataProto, actor: ActorSection) -> torch.Tensor:
    """float64 [P]: the flattened gradient of the kept rows' loss (the whole batch as one mini-batch)."""
    policy.zero_grad(set_to_none=True)
    accumulate_gradients(policy, kept, actor)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in policy.parameters() if p.requires_grad]
    flat = torch.cat([g.reshape(-1) for g in grads]).double()
    policy.zero_grad(set_to_none=True)
    return flat


def advantage_mass_kept(batch: DataProto, selection: Selection, *, action_chunk: int, action_dim: int) -> dict:
    """{"diag/adv_mass_kept": share, "diag/adv_mass_kept/<phase>": share}: Σ|A| over kept valid tokens
    over Σ|A| over all valid tokens, overall and per phase (``selection.labels`` int8 [N, C])."""
    N, C = selection.labels.shape
    A = action_chunk * action_dim
    valid = token_mask(batch.batch["finish_step"], C, action_chunk, action_dim).view(N, C, A)
    mass = (batch.batch["advantages"].abs().view(N, C, A) * valid).sum(-1).double()  # [N, C]
    kept = torch.zeros(N, C, dtype=torch.bool, device=mass.device)
    index = selection.index.to(mass.device)
    traj, slot = (index >= 0).nonzero(as_tuple=True)
    kept[traj, index[traj, slot]] = True
    labels = selection.labels.to(mass.device)
    out = {}
    for name, where in [("", labels >= 0)] + [(f"/{n}", labels == p) for p, n in enumerate(PHASE_NAMES)]:
        total = float(mass[where].sum())
        if total > 0:
            out[f"diag/adv_mass_kept{name}"] = float(mass[where & kept].sum()) / total
    return out


def selection_diagnostics(policy: torch.nn.Module, batch: DataProto, kept: DataProto, selection: Selection,
                          actor: ActorSection, *, action_chunk: int, action_dim: int) -> dict:
    """The ``diag/...`` metrics of one step (module docstring). ``batch``: the rollout batch with
    ``advantages``; ``kept``, ``selection``: what ``pcm_shrink_batch`` returned for it."""
    every = shrink_batch(batch, all_valid_chunks(batch.batch["finish_step"], selection.labels.shape[1],
                                                 action_chunk),
                         action_chunk=action_chunk, action_dim=action_dim)
    full = flat_gradient(policy, every, actor)
    masked = flat_gradient(policy, kept, actor)
    norm = float(full.norm())
    out = {"diag/full_grad_norm": norm,
           **advantage_mass_kept(batch, selection, action_chunk=action_chunk, action_dim=action_dim)}
    if norm > 0:
        out["diag/grad_norm_ratio"] = float(masked.norm()) / norm
        out["diag/grad_projection"] = float(masked @ full) / norm ** 2
        if float(masked.norm()) > 0:
            out["diag/grad_cosine"] = float(torch.nn.functional.cosine_similarity(masked, full, dim=0))
    return out
