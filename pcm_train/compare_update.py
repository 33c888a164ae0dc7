"""What will PCM save on my model? Full vs PCM actor updates on the same policy and batch.

    python -m pcm_train.compare_update [--budget 12] [--num-prompts 2] [--group-size 4]
        [--hidden 64] [--layers 2] [--device cpu|cuda] [--repeats 3] [--json]
        [--policy openvla_oft --checkpoint DIR | --policy openvla_oft --real-size]

Builds a rollout-shaped batch (realistic gripper phases, mixed success in every
group), then times three updates from identical starting weights: SimpleVLA-RL's
(every chunk, padding included), ``full`` (every valid chunk) and ``pcm`` (B per
trajectory), each ``--ppo-mini-batch`` prompts per optimizer step, and PCM's
selection itself (labels, scores, sampling, shrink). Prints a table of medians
and ratios, or one JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time

import torch
from tqdm import tqdm

from pcm_train.actor import make_optimizer, update_actor
from pcm_train.batch import shrink_batch
from pcm_train.config import load_config
from pcm_train.controller import PCMController
from pcm_train.policies import SmallVLA, SmallVLAConfig
from pcm_train.simplevla import pcm_shrink_batch
from pcm_train.synthetic import synthetic_rollout_batch

MODES = ("simplevla_rl", "full", "pcm")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pcm_train.compare_update", description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=int, default=12, help="B, chunks kept per trajectory (default 12)")
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=64, help="C, chunks per trajectory (default 64)")
    ap.add_argument("--hidden", type=int, default=64, help="small VLA width (default 64)")
    ap.add_argument("--layers", type=int, default=2, help="small VLA decoder layers (default 2)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--policy", choices=("small_vla", "openvla_oft"), default="small_vla")
    ap.add_argument("--checkpoint", default=None, help="OpenVLA-OFT checkpoint folder (with --policy openvla_oft)")
    ap.add_argument("--real-size", action="store_true",
                    help="with --policy openvla_oft: the 7B model's shapes with random weights (a GPU job)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="policy dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    ap.add_argument("--lora-r", type=int, default=8, help="LoRA rank, 0 = train every weight (default 8)")
    ap.add_argument("--micro-batch", type=int, default=1, help="trajectories per forward/backward (default 1)")
    ap.add_argument("--ppo-mini-batch", type=int, default=None,
                    help="prompts per optimizer step (default: all of them, one step per update)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder activations in backward")
    ap.add_argument("--repeats", type=int, default=3, help="timed updates per mode, after one warm-up")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    args.ppo_mini_batch = args.ppo_mini_batch or args.num_prompts
    for name in ("budget", "num_prompts", "group_size", "chunks", "hidden", "layers", "repeats", "micro_batch",
                 "ppo_mini_batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_prompts % args.ppo_mini_batch:
        ap.error(f"--ppo-mini-batch ({args.ppo_mini_batch}) must divide --num-prompts ({args.num_prompts})")
    if args.group_size < 2:
        ap.error("--group-size must be >= 2 (GRPO needs a group)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device on this machine")
    if args.policy == "openvla_oft" and (args.checkpoint is None) == (not args.real_size):
        ap.error("--policy openvla_oft needs exactly one of --checkpoint DIR or --real-size")
    if args.policy == "small_vla" and (args.checkpoint or args.real_size):
        ap.error("--checkpoint / --real-size go with --policy openvla_oft")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def _policy(args):
    if args.policy == "openvla_oft":
        from pcm_train.policies.openvla_oft import OpenVLAOFT, real_size_config

        dtype = getattr(torch, args.dtype)
        policy = (OpenVLAOFT.random_init(real_size_config(), dtype=dtype, device=args.device, seed=args.seed)
                  if args.real_size else OpenVLAOFT.from_checkpoint(args.checkpoint, dtype=dtype, device=args.device))
    else:
        policy = _small_policy(args)
    if args.lora_r:
        policy.add_lora(args.lora_r, args.lora_r)
    if args.gradient_checkpointing:
        policy.enable_gradient_checkpointing()
    return policy


def _small_policy(args) -> SmallVLA:
    heads = max(1, args.hidden // 16)
    config = SmallVLAConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                            intermediate_size=args.hidden * 2, image_size=args.image_size)
    torch.manual_seed(args.seed)
    return SmallVLA(config).to(device=args.device, dtype=getattr(torch, args.dtype))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _kept_batches(policy, batch, args):
    """The three shrunk batches (every chunk, every valid chunk, PCM's selection) and the median time
    of PCM's selection (labels + scores + sampling + shrink) over ``args.repeats`` calls after a warm-up."""
    overrides = [f"pcm.budget={args.budget}", f"actor.micro_batch_trajectories={args.micro_batch}",
                 f"rollout.prompts_per_step={args.num_prompts}", f"actor.ppo_mini_batch={args.ppo_mini_batch}"]
    cfg = load_config(overrides)
    L, D = policy.config.action_chunk, policy.config.action_dim
    start = policy.config.action_token_start
    times = []
    for _ in range(args.repeats + 1):
        controller = PCMController(cfg.pcm, seed=args.seed)
        _sync(args.device)
        started = time.perf_counter()
        pcm_kept, selection = pcm_shrink_batch(batch, controller, action_token_start=start, action_chunk=L,
                                               action_dim=D)
        _sync(args.device)
        times.append(time.perf_counter() - started)
    full_cfg = load_config(overrides + ["pcm.strategy=full"])
    full_kept, _ = pcm_shrink_batch(batch, PCMController(full_cfg.pcm), action_token_start=start,
                                    action_chunk=L, action_dim=D)
    N, C = batch.batch["finish_step"].shape[0], args.chunks
    every = torch.arange(C, device=batch.batch["responses"].device).expand(N, C)
    padded_kept = shrink_batch(batch, every, action_chunk=L, action_dim=D)
    kept = {"simplevla_rl": padded_kept, "full": full_kept, "pcm": pcm_kept}
    return cfg, kept, selection, statistics.median(times[1:])


def run(args) -> dict:
    policy = _policy(args)
    batch = synthetic_rollout_batch(policy, num_prompts=args.num_prompts, group_size=args.group_size,
                                    num_chunks=args.chunks, seed=args.seed)
    cfg, kept, selection, select_time = _kept_batches(policy, batch, args)
    initial = copy.deepcopy({k: v for k, v in policy.state_dict().items()})
    results = {}
    progress = tqdm(total=len(MODES) * (args.repeats + 1), desc="updates", disable=args.json, file=sys.stderr)
    for mode in MODES:
        runs = []
        for _ in range(args.repeats + 1):
            policy.load_state_dict(initial)
            optimizer = make_optimizer(policy, cfg.actor)
            stats, _, _ = update_actor(policy, optimizer, kept[mode], cfg.actor,
                                       mini_batch_trajectories=args.ppo_mini_batch * args.group_size,
                                       generator=torch.Generator().manual_seed(args.seed))
            runs.append(stats)
            progress.update()
        timed = runs[1:]
        results[mode] = {
            "update_time_s": statistics.median(s.update_time_s for s in timed),
            "forward_time_s": statistics.median(s.forward_time_s for s in timed),
            "backward_time_s": statistics.median(s.backward_time_s for s in timed),
            "activation_bytes": max(s.activation_bytes for s in timed),
            "peak_memory_bytes": max(s.peak_memory_bytes for s in timed),
            "chunks": timed[0].chunks, "tokens": timed[0].tokens, "optimizer_steps": timed[0].optimizer_steps,
        }
    progress.close()
    full, pcm, padded = results["full"], results["pcm"], results["simplevla_rl"]
    return {
        "device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "budget": args.budget, "trajectories": args.num_prompts * args.group_size, "chunks_per_trajectory": args.chunks,
        "valid_chunks_per_trajectory": selection.metrics["pcm/valid_chunks_per_traj"],
        "policy": {"name": args.policy, "checkpoint": args.checkpoint, "real_size": args.real_size,
                   "dtype": args.dtype, "lora_r": args.lora_r, "gradient_checkpointing": args.gradient_checkpointing,
                   **({"hidden": args.hidden, "layers": args.layers, "image_size": args.image_size}
                      if args.policy == "small_vla" else {})},
        "micro_batch_trajectories": args.micro_batch, "ppo_mini_batch": args.ppo_mini_batch, "repeats": args.repeats,
        "modes": results,
        "select_time_s": select_time,
        "select_share_of_pcm_update": select_time / pcm["update_time_s"],
        "update_time_ratio": full["update_time_s"] / pcm["update_time_s"],
        "activation_memory_reduction": 1 - pcm["activation_bytes"] / full["activation_bytes"],
        "peak_memory_reduction": 1 - pcm["peak_memory_bytes"] / full["peak_memory_bytes"],
        "update_time_ratio_vs_simplevla_rl": padded["update_time_s"] / pcm["update_time_s"],
        "activation_memory_reduction_vs_simplevla_rl": 1 - pcm["activation_bytes"] / padded["activation_bytes"],
    }


def format_table(report: dict) -> str:
    mib = 1 / 2**20
    lines = [f"device: {report['device']}; {report['trajectories']} trajectories x "
             f"{report['chunks_per_trajectory']} chunks ({report['valid_chunks_per_trajectory']:.1f} valid on "
             f"average), B = {report['budget']}",
             f"{'mode':<14}{'update s':>10}{'fwd s':>9}{'bwd s':>9}{'act MiB':>10}{'peak MiB':>10}"
             f"{'chunks':>8}{'tokens':>9}"]
    for mode, r in report["modes"].items():
        lines.append(f"{mode:<14}{r['update_time_s']:>10.3f}{r['forward_time_s']:>9.3f}{r['backward_time_s']:>9.3f}"
                     f"{r['activation_bytes'] * mib:>10.1f}{r['peak_memory_bytes'] * mib:>10.1f}"
                     f"{r['chunks']:>8}{r['tokens']:>9}")
    lines.append(f"full / pcm update time: {report['update_time_ratio']:.2f}x; activation memory "
                 f"-{report['activation_memory_reduction']:.0%}; peak memory -{report['peak_memory_reduction']:.0%}")
    lines.append(f"SimpleVLA-RL (all chunks) / pcm update time: {report['update_time_ratio_vs_simplevla_rl']:.2f}x; "
                 f"activation memory -{report['activation_memory_reduction_vs_simplevla_rl']:.0%}")
    lines.append(f"pcm selection (labels + scores + sampling + shrink): {report['select_time_s'] * 1e3:.2f} ms, "
                 f"{report['select_share_of_pcm_update']:.2%} of the pcm update")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(json.dumps(report) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
