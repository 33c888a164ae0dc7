"""How much of a prompt group's GRPO gradient is signal: the share that independent groups agree on.

    python -m pcm_train.gradient_signal [--preset study_metaworld] [--init DIR] [--prompts 32]
        [--group-size 8] [--repeats 1] [--temperature 1.0] [--dims all] [--dims 0,1,2,6] [--seed 100]
        [--source env|synthetic] [--json] [key=value ...]

Rolls out ``--prompts`` groups of ``--group-size`` trajectories with the policy (``--init``, the
preset's ``policy.path`` by default) on training prompts drawn as the trainer draws them
(``--repeats`` groups share each prompt), computes each mixed group's full-chunk GRPO gradient
``g_i`` (the trainer's loss at ratio 1, all valid chunks), and reports

- ``signal``: the mean of ``<g_i, g_j>`` over pairs i != j, an unbiased estimate of ``||E g||²``;
- ``second_moment``: the mean of ``||g_i||²``; ``signal_fraction`` = signal / second_moment, with a
  leave-one-group-out jackknife standard error;
- ``groups_for_snr1``: (second_moment − signal) / signal, the mixed groups one gradient needs before
  its expected part is as large as its noise (``tr Var g_i / ||E g||²``); null when signal <= 0;
- the mean cosine between groups of the same prompt and of different prompts.

``--dims`` (repeatable) keeps the advantages of those action dims only (``all``, or indices such as
``0,1,2,6``), one row each, on the same rollouts: which dims carry the signal and which the noise.
Exploratory by nature: one batch, one start; docs/results/metaworld_learning/ reports its use.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm
from verl import DataProto

from pcm_train.algorithm.batch import all_valid_chunks, shrink_batch
from pcm_train.algorithm.diagnostics import flat_gradient
from pcm_train.cli import argument_parser, run_command
from pcm_train.config import load_config
from pcm_train.tools.rollout_batch import METAWORLD_FEWDEMO_START, rollout_batch


def signal_statistics(grads: torch.Tensor, prompts: Optional[Sequence[int]] = None) -> dict:
    """The signal estimates (module docstring) of ``grads`` float [n, P], one row per group (n >= 3);
    ``prompts`` [n]: the prompt of each row, for the same- / other-prompt cosines."""
    if grads.dim() != 2 or grads.shape[0] < 3:
        raise ValueError(f"grads must be [groups >= 3, params], got shape {tuple(grads.shape)}")
    n = grads.shape[0]
    gram = (grads.double() @ grads.double().T)
    off = ~torch.eye(n, dtype=torch.bool)

    def moments(rows):
        """(signal, second moment) over the groups ``rows``."""
        sub = gram[rows][:, rows]
        m = len(rows)
        return float((sub.sum() - sub.diag().sum()) / (m * (m - 1))), float(sub.diag().mean())

    signal, second = moments(list(range(n)))
    if second == 0:
        raise ValueError("every group gradient is zero: no signal to measure")
    loo = np.array([a / b for a, b in (moments([j for j in range(n) if j != k]) for k in range(n))])
    norms = gram.diag().sqrt()
    cos = gram / (norms.unsqueeze(0) * norms.unsqueeze(1)).clamp_min(1e-300)
    out = {"groups": n, "signal": signal, "second_moment": second, "signal_fraction": signal / second,
           "signal_fraction_se": float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum())),
           "groups_for_snr1": (second - signal) / signal if signal > 0 else None,
           "cosine_mean": float(cos[off].mean())}
    if prompts is not None:
        owner = torch.as_tensor(list(prompts))
        if owner.shape != (n,):
            raise ValueError(f"prompts must hold one id per group ({n}), got {owner.shape[0]}")
        same = (owner.unsqueeze(0) == owner.unsqueeze(1)) & off
        out["same_prompt_pairs"] = int(same.sum()) // 2
        out["same_prompt_cosine"] = float(cos[same].mean()) if same.any() else None
        out["other_prompt_cosine"] = float(cos[~same & off].mean()) if (~same & off).any() else None
    return out


def group_gradients(policy, cfg, batch: DataProto, group_size: int, dims: Optional[Sequence[int]] = None,
                    progress: bool = False) -> tuple[torch.Tensor, list[int]]:
    """(float64 [groups, P], group index of each row): the full-chunk gradient of every group with mixed
    outcomes (rows ``k*group_size`` .. in ``batch``, which carries ``advantages``); ``dims`` keeps the
    advantages of those action dims only (None: all)."""
    L, D = cfg.rollout.action_chunk, cfg.rollout.action_dim
    N = batch.batch["finish_step"].shape[0]
    if N % group_size:
        raise ValueError(f"the batch's {N} trajectories are not whole groups of {group_size}")
    advantages = batch.batch["advantages"]
    if dims is not None:
        bad = [d for d in dims if not 0 <= d < D]
        if bad or not dims:
            raise ValueError(f"dims must be a non-empty list of action dims in 0..{D - 1}, got {list(dims)}")
        keep = torch.zeros(D, dtype=advantages.dtype, device=advantages.device)
        keep[list(dims)] = 1
        advantages = (advantages.view(N, -1, L, D) * keep).view(N, -1)
    complete = batch.batch["complete"].view(-1, group_size).bool()
    C = batch.batch["responses"].shape[1]
    grads, kept = [], []
    for k in tqdm(range(N // group_size), desc="group gradients", disable=not progress, file=sys.stderr):
        if complete[k].all() or not complete[k].any():
            continue
        rows = batch[k * group_size:(k + 1) * group_size]
        rows.batch["advantages"] = advantages[k * group_size:(k + 1) * group_size]
        every = all_valid_chunks(rows.batch["finish_step"], C, L)
        grads.append(flat_gradient(policy, shrink_batch(rows, every, action_chunk=L, action_dim=D), cfg.actor))
        kept.append(k)
    if len(grads) < 3:
        raise ValueError(f"only {len(grads)} groups had mixed outcomes; at least 3 are needed (more --prompts)")
    return torch.stack(grads), kept


def env_batch(args, overrides: list[str]):
    """(policy, cfg, batch with advantages, prompt of each group): rollouts on the preset's suite."""
    return rollout_batch(args.preset, args.init or None, prompts=args.prompts, group_size=args.group_size,
                         seed=args.seed, temperature=args.temperature, repeats=args.repeats,
                         overrides=[f"actor.micro_batch_trajectories={args.group_size}", *overrides])


def synthetic_batch(args, overrides: list[str]):
    from pcm_train.policies import SmallVLA, SmallVLAConfig
    from pcm_train.tools.synthetic import synthetic_rollout_batch

    torch.manual_seed(args.seed)
    policy = SmallVLA(SmallVLAConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                                     intermediate_size=32, image_size=16))
    batch = synthetic_rollout_batch(policy, num_prompts=args.prompts, group_size=args.group_size, num_chunks=8,
                                    seed=args.seed, temperature=args.temperature)
    cfg = load_config([f"actor.temperature={args.temperature}", *overrides])
    return policy, cfg, batch, list(range(args.prompts))


def parse_dims(text: str) -> Optional[list[int]]:
    if text == "all":
        return None
    try:
        return [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated action dims, got {text!r}") from None


def parse_args(argv) -> tuple[argparse.Namespace, list[str]]:
    ap = argument_parser("pcm_train.gradient_signal", __doc__)
    ap.add_argument("--source", choices=("env", "synthetic"), default="env")
    ap.add_argument("--preset", default="study_metaworld", help="trainer preset of the rollouts (default study_metaworld)")
    ap.add_argument("--init", default=METAWORLD_FEWDEMO_START,
                    help="policy checkpoint (default: the MetaWorld few-demo start); '' = the preset's")
    ap.add_argument("--prompts", type=int, default=32, help="groups rolled out (default 32)")
    ap.add_argument("--group-size", type=int, default=8, help="rollouts per group (default 8)")
    ap.add_argument("--repeats", type=int, default=1, help="groups per distinct prompt (default 1)")
    ap.add_argument("--temperature", type=float, default=1.0, help="rollout and loss temperature (default 1.0)")
    ap.add_argument("--dims", type=parse_dims, action="append", help="action dims whose advantages count "
                    "(repeatable; default all)")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--json", action="store_true", help="print one JSON object per --dims instead of the table")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.prompts < 3 or args.group_size < 2 or args.repeats < 1 or args.prompts % args.repeats:
        ap.error(f"--prompts (>= 3) must be a multiple of --repeats (>= 1) and --group-size >= 2, got "
                 f"{args.prompts} / {args.repeats} / {args.group_size}")
    if not args.temperature > 0:
        ap.error(f"--temperature must be > 0, got {args.temperature}")
    args.dims = args.dims or [None]
    return args, overrides


def format_table(rows: list[dict]) -> str:
    lines = ["| dims | mixed groups | success | signal fraction (SE) | groups for SNR 1 | cos same prompt | "
             "cos other prompts | second moment |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def num(key, fmt):
            return "n/a" if r.get(key) is None else format(r[key], fmt)
        lines.append(f"| {r['dims']} | {r['groups']} | {r['success_rate']:.3f} | {r['signal_fraction']:.4f} "
                     f"({r['signal_fraction_se']:.4f}) | {num('groups_for_snr1', '.0f')} | "
                     f"{num('same_prompt_cosine', '.4f')} | {num('other_prompt_cosine', '.4f')} | "
                     f"{r['second_moment']:.4g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_command(__doc__, _main, argv, own_help=False)


def _main(argv: list[str]) -> int:
    args, overrides = parse_args(argv)
    policy, cfg, batch, prompts = (env_batch if args.source == "env" else synthetic_batch)(args, overrides)
    common = {"source": args.source, "temperature": args.temperature, "seed": args.seed,
              "success_rate": float(batch.batch["complete"].float().mean()),
              "device": f"cpu ({platform.processor() or platform.machine()})"}
    rows = []
    for dims in args.dims:
        grads, groups = group_gradients(policy, cfg, batch, args.group_size, dims, progress=not args.json)
        rows.append({"dims": "all" if dims is None else ",".join(map(str, dims)), **common,
                     **signal_statistics(grads, [prompts[g] for g in groups])})
    print("\n".join(json.dumps(r) for r in rows) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
