"""Actor update: full GRPO vs PCM (B = 12 of 64 chunks) on the same policy and batch.

The small VLA on the CPU (8 trajectories x 64 chunks, LoRA r = 8); on a GPU the
same policy, larger (hidden 512, 4 layers) so the GPU has work to do. Each
benchmark restores the starting weights, so every round is the same update.
Activation memory (bytes saved for backward, largest micro-batch) is recorded
in ``extra_info`` and the ratios are printed at the end of the run, with the token
ratio (chunks forwarded by the baseline / by the candidate), their ideal. Every mode
runs one trajectory per micro-batch here; ``python -m pcm_train.compare_update``
times each mode at its own fastest micro-batch.
"""
import copy

import pytest

from pcm_train.algorithm.actor import make_optimizer, update_actor
from pcm_train.tools.compare_update import _kept_batches, _policy, parse_args
from pcm_train.tools.synthetic import synthetic_rollout_batch

from conftest import CUDA

ARGS = ["--budget", "12"] + (["--hidden", "512", "--layers", "4", "--device", "cuda"] if CUDA else [])
GROUP = f"actor update 8x64 chunks, B=12, 1 trajectory per micro-batch ({'GPU' if CUDA else 'CPU'})"
ACTIVATIONS = {}


@pytest.fixture(scope="module")
def setup():
    args = parse_args(ARGS)
    policy = _policy(args)
    batch = synthetic_rollout_batch(policy, num_prompts=args.num_prompts, group_size=args.group_size,
                                    num_chunks=args.chunks, seed=args.seed)
    cfg, kept, _, _ = _kept_batches(policy, batch, args)
    return policy, cfg, kept, copy.deepcopy(policy.state_dict())


def _bench(benchmark, setup, mode):
    policy, cfg, kept, initial = setup
    stats_seen = []

    def one_update():
        policy.load_state_dict(initial)
        stats, _, _ = update_actor(policy, make_optimizer(policy, cfg.actor), kept[mode], cfg.actor)
        stats_seen.append(stats)

    benchmark.pedantic(one_update, rounds=3, warmup_rounds=1)
    ACTIVATIONS[mode] = max(s.activation_bytes for s in stats_seen)
    benchmark.extra_info.update(chunks=stats_seen[-1].chunks, tokens=stats_seen[-1].tokens,
                                activation_bytes=ACTIVATIONS[mode],
                                peak_memory_bytes=max(s.peak_memory_bytes for s in stats_seen))
    if mode == "full":
        benchmark.extra_info["role"] = "baseline"


@pytest.mark.benchmark(group=GROUP)
def test_update_full(benchmark, setup):
    _bench(benchmark, setup, "full")


@pytest.mark.benchmark(group=GROUP)
def test_update_simplevla_rl_all_chunks(benchmark, setup):
    _bench(benchmark, setup, "simplevla_rl")


@pytest.mark.benchmark(group=GROUP)
def test_update_pcm(benchmark, setup):
    _bench(benchmark, setup, "pcm")
    if "full" in ACTIVATIONS:
        benchmark.extra_info["activation_memory_reduction_vs_full"] = 1 - ACTIVATIONS["pcm"] / ACTIVATIONS["full"]
