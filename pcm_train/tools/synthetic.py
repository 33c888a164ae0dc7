"""A rollout-shaped batch without an environment: for the update comparison and tests.

Each trajectory approaches, grasps for a while, carries and releases; the gripper
token follows that plan (with a little noise), other action dims are sampled from
the policy's own distribution region. Every group mixes successes and failures;
successes finish early, failures run to the step cap (as on LIBERO), and successful
trajectories grip a little differently so the phase scores are informative.
"""
from __future__ import annotations

import numpy as np
import torch
from verl import DataProto

from pcm_train.policies import action_tokens
from pcm_train.algorithm.grpo import grpo_advantages, token_mask

TASKS = ("pick up the alphabet soup and place it in the basket",
         "pick up the cream cheese and place it in the basket",
         "pick up the ketchup and place it in the basket",
         "pick up the tomato sauce and place it in the basket")


def _gripper_plan(num_chunks: int, chunk: int, finish: int, gen: torch.Generator) -> torch.Tensor:
    """float [num_chunks * chunk] env gripper commands: open, closed for a stretch, open again."""
    steps = num_chunks * chunk
    close_at = int(torch.randint(finish // 5, max(finish // 2, finish // 5 + 1), (1,), generator=gen))
    hold = int(torch.randint(8 * chunk, 20 * chunk, (1,), generator=gen))
    t = torch.arange(steps)
    plan = torch.where((t >= close_at) & (t < close_at + hold), 1.0, -1.0)
    flips = torch.rand(steps, generator=gen) < 0.02
    return torch.where(flips, -plan, plan)


@torch.no_grad()
def synthetic_rollout_batch(policy, *, num_prompts: int = 2, group_size: int = 4, num_chunks: int = 64,
                            seed: int = 0, temperature: float = 1.6) -> DataProto:
    """A DataProto in the LAYOUT.md layout for ``policy`` (its prompts, image size and action tokens).

    ``old_log_probs`` are the policy's own log-probs of the responses, so PPO ratios start at 1.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = policy.config
    L, D = cfg.action_chunk, cfg.action_dim
    A = L * D
    N = num_prompts * group_size
    device = policy.device
    tasks = [TASKS[i % len(TASKS)] for i in range(num_prompts) for _ in range(group_size)]
    try:
        ids, attn = policy.encode_prompts(tasks)
    except FileNotFoundError:  # a checkpoint without tokenizer files: made-up prompt ids of a typical length
        ids, attn = policy.placeholder_prompts(len(tasks), generator=gen)
    P = ids.shape[1]
    success = torch.zeros(N, dtype=torch.bool)
    for g in range(num_prompts):
        success[g * group_size:(g + 1) * group_size] = torch.randperm(group_size, generator=gen) < (group_size + 1) // 2
    cap = num_chunks * L
    finish = torch.where(success, torch.randint(cap // 4, cap * 3 // 4 + 1, (N,), generator=gen),
                         torch.full((N,), cap))
    normalized = torch.rand(N, num_chunks, L, D, generator=gen) * 2 - 1
    for n in range(N):
        plan = _gripper_plan(num_chunks, L, int(finish[n]), gen).view(num_chunks, L)
        normalized[n, :, :, -1] = torch.where(plan > 0, 0.0, 1.0)  # model space: 1 open, 0 close
        if success[n]:
            normalized[n, :, :, :3] *= 0.5  # successes move more carefully
    responses = action_tokens.normalized_to_tokens(normalized.view(N, num_chunks, A), cfg.action_token_start)
    pixels = torch.rand(N, num_chunks, cfg.image_channels, cfg.image_size, cfg.image_size, generator=gen)
    input_ids = ids.cpu().unsqueeze(1).expand(N, num_chunks, P).contiguous()
    attention_mask = attn.cpu().unsqueeze(1).expand(N, num_chunks, P).contiguous()
    old = torch.empty(N, num_chunks, A)
    policy.eval()
    for n in range(N):
        logits = policy.action_logits(input_ids[n].to(device), attention_mask[n].to(device), pixels[n].to(device))
        old[n] = policy.log_probs(logits, responses[n].to(device), temperature).cpu()
    uid = np.array([f"prompt-{n // group_size}" for n in range(N)], dtype=object)
    mask = token_mask(finish, num_chunks, L, D)
    tensors = {"responses": responses, "input_ids": input_ids, "attention_mask": attention_mask,
               "pixel_values": pixels, "finish_step": finish, "complete": success,
               "old_log_probs": old.view(N, -1) * mask, "advantages": grpo_advantages(success, uid, mask)}
    batch = DataProto.from_dict(tensors={k: v.to(device) for k, v in tensors.items()},
                                non_tensors={"uid": uid})
    return batch
