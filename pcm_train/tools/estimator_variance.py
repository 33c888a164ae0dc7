"""Bias and variance of the masked gradient: the paper's (biased) PCM estimator vs the unbiased 1/q one.

    python -m pcm_train.estimator_variance [--source libero|metaworld|synthetic] [--draws 100] [--budget 12]
        [--prompts 8] [--group-size 4] [--temperature T] [--seed 0] [--json]

On one rollout batch (``libero``: the committed SFT policy's state-mode rollouts on LIBERO-Object,
as in the study; ``metaworld``: the MetaWorld few-demo start's, ``docs/results/metaworld_fewdemo/``;
``synthetic``: ``pcm_train.tools.synthetic`` on a fresh small policy), computes the
GRPO gradient over every valid chunk, ``g``, then for each selection rule (``pcm``, ``random``)
and estimator (``biased``, ``unbiased``) the masked gradients ``ĝ`` of ``--draws`` independent
selections (same keep probabilities, fresh draws). Per row: relative bias ``||E ĝ − g|| / ||g||``,
relative variance ``E ||ĝ − E ĝ||² / ||g||²``, relative MSE ``E ||ĝ − g||² / ||g||²`` and the
mean cosine between ``ĝ`` and ``g``; the bias estimate carries noise ``sqrt(variance / draws)``
(printed beside it): a bias below that is not resolved by the draws. The policy is the rollout policy, so ratios are 1 and every
gradient is the policy gradient of its objective.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys

import torch
from tqdm import tqdm
from verl import DataProto

import pcm_kernels as pk
from pcm_train.cli import argument_parser, run_command
from pcm_train.algorithm.diagnostics import flat_gradient
from pcm_train.algorithm.batch import all_valid_chunks, executed_actions, group_ids, shrink_batch
from pcm_train.config import load_config
from pcm_train.tools.rollout_batch import METAWORLD_FEWDEMO_START, rollout_batch
from pcm_train.algorithm.controller import STRATEGY_REGISTRY, PCMController

RULES = ("pcm", "random")
ENV_SOURCES = ("libero", "metaworld")  # the LIBERO-Object study's start, the MetaWorld few-demo start
ESTIMATORS = ("biased", "unbiased")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argument_parser("pcm_train.estimator_variance", __doc__)
    ap.add_argument("--source", choices=(*ENV_SOURCES, "synthetic"), default="libero")
    ap.add_argument("--temperature", type=float, default=None,
                    help="rollout and loss temperature of an env source (default: its preset's)")
    ap.add_argument("--draws", type=int, default=100, help="selections per rule and estimator (default 100)")
    ap.add_argument("--budget", type=int, default=12, help="B, chunks kept per trajectory (default 12)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts in the batch (default 8)")
    ap.add_argument("--group-size", type=int, default=4, help="rollouts per prompt (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    for name in ("draws", "budget", "prompts"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.group_size < 2:
        ap.error("--group-size must be >= 2 (GRPO needs a group)")
    if args.temperature is not None and not args.temperature > 0:
        ap.error(f"--temperature must be > 0, got {args.temperature}")
    return args


def env_batch(args):
    """(policy, cfg, batch with advantages): the source's study start rolled out on its state-mode suite."""
    from pcm_train.tools.study import SUITE_DEFAULTS

    libero = SUITE_DEFAULTS["libero_object"]
    preset, init = ((libero["preset"], libero["init"]) if args.source == "libero"
                    else ("study_metaworld", METAWORLD_FEWDEMO_START))
    policy, cfg, batch, _ = rollout_batch(preset, init, prompts=args.prompts, group_size=args.group_size,
                                          seed=args.seed, temperature=args.temperature,
                                          overrides=["actor.ppo_mini_batch=1",
                                                     f"actor.micro_batch_trajectories={args.prompts * args.group_size}"])
    return policy, cfg, batch


def synthetic_batch(args):
    from pcm_train.policies import SmallVLA, SmallVLAConfig
    from pcm_train.tools.synthetic import synthetic_rollout_batch

    torch.manual_seed(args.seed)
    policy = SmallVLA(SmallVLAConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, image_size=16))
    batch = synthetic_rollout_batch(policy, num_prompts=args.prompts, group_size=args.group_size, num_chunks=24,
                                    seed=args.seed)
    return policy, load_config([f"pcm.budget={args.budget}"]), batch


def gradient_statistics(policy, cfg, batch: DataProto, *, budget: int, draws: int, seed: int = 0,
                        progress: bool = False) -> dict:
    """{"full_grad_norm", "rows": {rule: {estimator: {bias, variance, mse, cosine}}}} over ``draws`` selections."""
    L, D = cfg.rollout.action_chunk, cfg.rollout.action_dim
    start = policy.config.action_token_start
    kwargs = dict(action_chunk=L, action_dim=D)
    every = all_valid_chunks(batch.batch["finish_step"], batch.batch["responses"].shape[1], L)
    full = flat_gradient(policy, shrink_batch(batch, every, **kwargs), cfg.actor)
    norm2 = float(full.pow(2).sum())
    if norm2 == 0:
        raise ValueError("the full-batch gradient is zero (no group with mixed outcomes): no estimator to compare")
    normalized, gripper = executed_actions(batch.batch["responses"], action_token_start=start, **kwargs)
    groups = group_ids(batch.non_tensor_batch["uid"])
    rows = {}
    bar = tqdm(total=len(RULES) * len(ESTIMATORS) * draws, desc="draws", disable=not progress, file=sys.stderr)
    for rule in RULES:
        controller = PCMController(load_config([f"pcm.strategy={rule}", f"pcm.budget={budget}"]).pcm, seed=seed)
        controller.step(gripper, batch.batch["finish_step"], normalized, batch.batch["complete"].bool(), groups)
        phase_weights = STRATEGY_REGISTRY[rule](controller)
        rows[rule] = {}
        for estimator in ESTIMATORS:
            generator = torch.Generator().manual_seed(seed + 1)
            samples = []
            for _ in range(draws):
                _, index, ht = pk.select_chunks(gripper, batch.batch["finish_step"], phase_weights, budget,
                                                generator=generator, return_weights=True, **controller.label_kwargs)
                kept = shrink_batch(batch, index, chunk_weights=ht if estimator == "unbiased" else None, **kwargs)
                samples.append(flat_gradient(policy, kept, cfg.actor))
                bar.update()
            stacked = torch.stack(samples)
            mean = stacked.mean(0)
            cosine = torch.nn.functional.cosine_similarity(stacked, full.unsqueeze(0), dim=1)
            rows[rule][estimator] = {
                "bias": float((mean - full).norm()) / norm2 ** 0.5,
                "variance": float((stacked - mean).pow(2).sum(1).mean()) / norm2,
                "mse": float((stacked - full).pow(2).sum(1).mean()) / norm2,
                "cosine": float(cosine.mean()),
                # the bias estimate's own noise: sqrt(variance / draws); a bias below it is not resolved
                "bias_noise": (float((stacked - mean).pow(2).sum(1).mean()) / norm2 / draws) ** 0.5,
            }
    bar.close()
    policy.zero_grad(set_to_none=True)
    return {"full_grad_norm": norm2 ** 0.5, "rows": rows}


def format_table(report: dict) -> str:
    lines = [f"{report['source']} batch: {report['trajectories']} trajectories, "
             f"{report['valid_chunks_per_trajectory']:.1f} valid chunks each on average, B = {report['budget']}, "
             f"{report['draws']} draws; success {report['success_rate']:.2f}; device {report['device']}",
             "| rule | estimator | rel. bias (noise) | rel. variance | rel. MSE | cosine to full |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for rule, by_estimator in report["rows"].items():
        for estimator, r in by_estimator.items():
            lines.append(f"| {rule} | {estimator} | {r['bias']:.3f} ({r['bias_noise']:.3f}) | {r['variance']:.3f} | "
                         f"{r['mse']:.3f} | "
                         f"{r['cosine']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_command(__doc__, _main, argv, own_help=False)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    policy, cfg, batch = (synthetic_batch if args.source == "synthetic" else env_batch)(args)
    stats = gradient_statistics(policy, cfg, batch, budget=args.budget, draws=args.draws, seed=args.seed,
                                progress=not args.json)
    L = cfg.rollout.action_chunk
    report = {"source": args.source, "budget": args.budget, "draws": args.draws,
              "trajectories": int(batch.batch["finish_step"].shape[0]),
              "valid_chunks_per_trajectory": float(((batch.batch["finish_step"] + L - 1) // L).float().mean()),
              "success_rate": float(batch.batch["complete"].float().mean()),
              "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              **stats}
    print(json.dumps(report) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
