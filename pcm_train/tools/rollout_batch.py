"""One GRPO rollout batch from a trainer preset and a policy, for the gradient analysis tools."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from pcm_train.config import load_config

# the MetaWorld start cloned on 20 demos per task (docs/results/metaworld_fewdemo/)
METAWORLD_FEWDEMO_START = "docs/results/metaworld_fewdemo/init_policy"


def rollout_batch(preset: str, init: Optional[str], *, prompts: int, group_size: int, seed: int,
                  temperature: Optional[float] = None, repeats: int = 1, overrides: Sequence[str] = ()):
    """(policy, cfg, batch, prompt of each group): ``prompts`` groups of ``group_size`` rollouts of the
    policy at ``init`` (None: the preset's ``policy.path``) on training prompts drawn as the trainer draws
    them (``repeats`` consecutive groups share a prompt), on the CPU, with GRPO ``advantages``.
    ``temperature`` None: the preset's ``actor.temperature``."""
    from pcm_train.algorithm.grpo import grpo_advantages, token_mask
    from pcm_train.envs.families import list_tasks
    from pcm_train.policies.factory import build_policy
    from pcm_train.training.rollout import Episode, collect_rollouts
    from pcm_train.training.trainer import draw_prompts, make_env_pool

    if prompts % repeats:
        raise ValueError(f"prompts ({prompts}) must be a multiple of repeats ({repeats})")
    cfg = load_config([f"preset={preset}", *([f"policy.path={init}"] if init else []),
                       f"rollout.prompts_per_step={prompts}", f"rollout.group_size={group_size}",
                       *([f"actor.temperature={temperature}"] if temperature is not None else []),
                       f"trainer.seed={seed}", *overrides])
    torch.manual_seed(seed)
    policy = build_policy(cfg.policy, device=torch.device("cpu"))
    tasks = cfg.env.task_ids or [t.task_id for t in list_tasks(cfg.env.suite)]
    distinct = draw_prompts(np.random.default_rng(seed), tasks, prompts // repeats, cfg.env.val_init_states)
    owner = [k for k in range(len(distinct)) for _ in range(repeats)]
    episodes = [Episode(*distinct[p], f"prompt{g}") for g, p in enumerate(owner) for _ in range(group_size)]
    pool = make_env_pool(cfg, image_size=policy.config.image_size)
    try:
        batch = collect_rollouts(policy, pool, episodes, max_chunks=cfg.rollout.max_chunks,
                                 temperature=cfg.actor.temperature, generator=torch.Generator().manual_seed(seed))
    finally:
        pool.close()
    mask = token_mask(batch.batch["finish_step"], cfg.rollout.max_chunks)
    batch.batch["advantages"] = grpo_advantages(batch.batch["complete"], batch.non_tensor_batch["uid"], mask)
    return policy, cfg, batch, owner
