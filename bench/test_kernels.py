"""pcm_kernels against the code a user would otherwise write, at the paper's shapes.

N = 80 trajectories, C = 64 chunks, L = 8 steps, D = 7, B = 12. Gather/scatter:
S = 300 tokens per chunk; the CPU groups use hidden 256 fp32 on every machine (a CUDA machine
runs them too), the GPU groups hidden 4096 bf16 with their inputs created on the device.
"""
import os

import pytest
import torch

import pcm_kernels as pk
from pcm_kernels.phases import naive as label_naive

from conftest import CUDA, DEVICE, needs_cuda, synced

N, C, L, B = 80, 64, 8, 12
S = 300
CPU_HIDDEN, GPU_HIDDEN = 256, 4096  # per device group, not per machine: CPU groups keep CPU sizes


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """The CPU groups run on one torch thread, baselines and candidates alike: at 80 x 64 an op is a few
    microseconds, too short for a second thread to pay, and a second thread stalls whenever the other core
    is busy (the trainer's env workers); PCM_BENCH_THREADS=N to time another count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PCM_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


def _gen(device):
    """A seeded generator on ``device``: inputs are drawn where they are used (no host randn + copy)."""
    return torch.Generator(device=device).manual_seed(0)


def _gripper(device=DEVICE):
    device = torch.device(device)
    gen = _gen(device)
    phase = torch.rand(N, 1, generator=gen, device=device) * C * L
    t = torch.arange(C * L, device=device).view(1, -1)
    closed = (t > phase) & (t < phase + 120)
    flips = torch.rand(N, C * L, generator=gen, device=device) < 0.03
    g = torch.where(closed ^ flips, 1.0, -1.0).view(N, C, L)
    steps = torch.randint(C * L // 2, C * L + 1, (N,), generator=gen, device=device)
    return g, steps


def _labels_per_trajectory(gripper, steps):
    """A user's labeler: vectorized per trajectory, rules in a Python loop over chunks."""
    out = []
    for n in range(gripper.shape[0]):
        row = gripper[n:n + 1]
        gf, valid = pk.phases.vectorized.grip_fraction(row, steps[n:n + 1], 0.0)
        fractions = [float(g) if v else None for g, v in zip(gf[0].tolist(), valid[0].tolist())]
        out.append(label_naive.label_row(fractions, 0.75, 0.5, 0.1, 3))
    return torch.tensor(out, dtype=torch.int8)


@pytest.mark.benchmark(group="label_phases 80x64 (CPU)")
def test_label_loop_baseline(benchmark):
    g, s = _gripper("cpu")
    benchmark.extra_info["role"] = "baseline"
    benchmark(_labels_per_trajectory, g, s)


@pytest.mark.benchmark(group="label_phases 80x64 (CPU)")
def test_label_torch(benchmark, monkeypatch):
    monkeypatch.setenv("PCM_KERNELS_BACKEND", "torch")
    g, s = _gripper("cpu")
    labels = benchmark(pk.label_phases, g, s)
    assert torch.equal(labels, _labels_per_trajectory(g, s))


def _multinomial_per_trajectory(weights, budget, gen):
    out = torch.full((weights.shape[0], budget), -1, dtype=torch.int64, device=weights.device)
    for n in range(weights.shape[0]):
        k = min(budget, int((weights[n] > 0).sum()))
        out[n, :k] = torch.multinomial(weights[n], k, replacement=False, generator=gen).sort().values
    return out


def _exponential_race(weights, budget, gen):
    keys = torch.empty_like(weights).exponential_(generator=gen) / weights
    return keys.topk(budget, dim=1, largest=False).indices.sort(dim=1).values


def _weights(device):
    device = torch.device(device)
    return torch.rand(N, C, generator=torch.Generator(device=device).manual_seed(1), device=device) + 0.01


@pytest.mark.benchmark(group="sample_chunks 80x64 B=12 (CPU)")
def test_sample_multinomial_loop_baseline(benchmark):
    benchmark.extra_info["role"] = "baseline"
    benchmark(_multinomial_per_trajectory, _weights("cpu"), B, torch.Generator().manual_seed(0))


@pytest.mark.benchmark(group="sample_chunks 80x64 B=12 (CPU)")
def test_sample_exponential_race_batched(benchmark):
    """The simplest batched torch code for the same law (no checks, no -1 padding, no 1/q): a baseline too."""
    benchmark.extra_info["role"] = "baseline"
    benchmark(_exponential_race, _weights("cpu"), B, torch.Generator().manual_seed(0))


@pytest.mark.benchmark(group="sample_chunks 80x64 B=12 (CPU)")
def test_sample_torch(benchmark, monkeypatch):
    monkeypatch.setenv("PCM_KERNELS_BACKEND", "torch")
    benchmark(pk.sample_chunks, _weights("cpu"), B, generator=torch.Generator().manual_seed(0))


@pytest.mark.benchmark(group="sample_chunks 80x64 B=12 (CPU)")
def test_sample_torch_with_weights(benchmark, monkeypatch):
    monkeypatch.setenv("PCM_KERNELS_BACKEND", "torch")
    benchmark(pk.sample_chunks, _weights("cpu"), B, generator=torch.Generator().manual_seed(0), return_weights=True)


def _unpad_input(x, index, seqlens):
    """flash-attn-style: a token mask over the selected chunks, nonzero, then index."""
    Nn, Cc, Ss = x.shape[:3]
    chosen = torch.zeros(Nn, Cc, dtype=torch.bool, device=x.device)
    chosen.scatter_(1, index.clamp(min=0), index >= 0)
    mask = chosen.unsqueeze(-1) & (torch.arange(Ss, device=x.device) < seqlens.unsqueeze(-1))
    flat = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    return x.reshape(Nn * Cc * Ss, -1)[flat], flat


def _pad_input(values, flat, shape):
    out = torch.zeros(shape[0] * shape[1] * shape[2], values.shape[-1], dtype=values.dtype, device=values.device)
    out.index_put_((flat,), values)
    return out.view(shape)


def _gather_inputs(device, dtype, hidden):
    """x [N, C, S, hidden] of ``dtype`` drawn on ``device`` (a GPU's 12.6 GB bf16 tensor never
    passes through the host), the kept index and seqlens."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(N, C, S, hidden, generator=gen, dtype=dtype, device=device)
    index = pk.sample_chunks(_weights(device), B, generator=gen)
    seqlens = torch.randint(S // 2, S + 1, (N, C), generator=gen, device=device)
    return x, index, seqlens


@pytest.fixture(scope="module")
def cpu_gather_inputs():
    return _gather_inputs("cpu", torch.float32, CPU_HIDDEN)


@pytest.mark.benchmark(group=f"gather 80x64x{S}x{CPU_HIDDEN} B=12 (CPU)")
def test_gather_unpad_baseline(benchmark, cpu_gather_inputs):
    benchmark.extra_info["role"] = "baseline"
    benchmark(_unpad_input, *cpu_gather_inputs)


@pytest.mark.benchmark(group=f"gather 80x64x{S}x{CPU_HIDDEN} B=12 (CPU)")
def test_gather_torch(benchmark, cpu_gather_inputs, monkeypatch):
    monkeypatch.setenv("PCM_KERNELS_BACKEND", "torch")
    packed = benchmark(pk.gather_chunks, *cpu_gather_inputs)
    assert torch.equal(packed.values, _unpad_input(*cpu_gather_inputs)[0])


@pytest.mark.benchmark(group=f"scatter 80x64x{S}x{CPU_HIDDEN} B=12 (CPU)")
def test_scatter_pad_baseline(benchmark, cpu_gather_inputs):
    values, flat = _unpad_input(*cpu_gather_inputs)
    benchmark.extra_info["role"] = "baseline"
    benchmark(_pad_input, values, flat, cpu_gather_inputs[0].shape)


@pytest.mark.benchmark(group=f"scatter 80x64x{S}x{CPU_HIDDEN} B=12 (CPU)")
def test_scatter_torch(benchmark, cpu_gather_inputs, monkeypatch):
    monkeypatch.setenv("PCM_KERNELS_BACKEND", "torch")
    packed = pk.gather_chunks(*cpu_gather_inputs)
    benchmark(pk.scatter_chunks, packed.values, packed)


# ---- GPU: Triton paths against the same baselines and the card's copy bandwidth ----

@needs_cuda
@pytest.mark.benchmark(group="label+sample 80x64 B=12 (GPU)")
def test_gpu_label_then_sample_baseline(benchmark):
    g, s = _gripper()
    keep = torch.tensor([0.3, 0.8, 1.0, 0.5, 0.1], device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    def two_steps():
        labels = pk.label_phases(g, s)
        weights = torch.where(labels >= 0, keep[labels.long().clamp(min=0)], 0.0)
        return pk.sample_chunks(weights, B, generator=gen, validate=False)
    benchmark.extra_info["role"] = "baseline"
    benchmark(synced(two_steps))


@needs_cuda
@pytest.mark.benchmark(group="label+sample 80x64 B=12 (GPU)")
def test_gpu_select_fused(benchmark):
    g, s = _gripper()
    keep = torch.tensor([0.3, 0.8, 1.0, 0.5, 0.1])
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    benchmark(synced(pk.select_chunks), g, s, keep, B, generator=gen)


@needs_cuda
@pytest.mark.benchmark(group="sample_chunks 80x64 B=12 (GPU)")
def test_gpu_sample_multinomial_loop_baseline(benchmark):
    benchmark.extra_info["role"] = "baseline"
    benchmark(synced(_multinomial_per_trajectory), _weights(DEVICE), B, torch.Generator(device=DEVICE).manual_seed(0))


@needs_cuda
@pytest.mark.benchmark(group="sample_chunks 80x64 B=12 (GPU)")
def test_gpu_sample_exponential_race(benchmark):
    benchmark(synced(_exponential_race), _weights(DEVICE), B, torch.Generator(device=DEVICE).manual_seed(0))


@needs_cuda
@pytest.mark.benchmark(group="sample_chunks 80x64 B=12 (GPU)")
def test_gpu_sample_triton(benchmark):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    benchmark(synced(pk.sample_chunks), _weights(DEVICE), B, generator=gen, validate=False)


@pytest.fixture(scope="module")
def gpu_gather_inputs():
    if not CUDA:
        pytest.skip("GPU inputs")
    return _gather_inputs(DEVICE, torch.bfloat16, GPU_HIDDEN)


@needs_cuda
@pytest.mark.benchmark(group=f"gather 80x64x{S}x{GPU_HIDDEN} bf16 B=12 (GPU)")
def test_gpu_copy_bandwidth_baseline(benchmark, gpu_gather_inputs):
    """Device-to-device copy of the same bytes the gather moves: the bandwidth ceiling."""
    packed = pk.gather_chunks(*gpu_gather_inputs)
    src = packed.values.clone()
    dst = torch.empty_like(src)
    benchmark.extra_info["role"] = "baseline"
    benchmark(synced(dst.copy_), src)


@needs_cuda
@pytest.mark.benchmark(group=f"gather 80x64x{S}x{GPU_HIDDEN} bf16 B=12 (GPU)")
def test_gpu_gather_triton(benchmark, gpu_gather_inputs):
    layout = pk.plan_chunks(gpu_gather_inputs[1], C, S, gpu_gather_inputs[2])
    benchmark(synced(layout.gather), gpu_gather_inputs[0])


@needs_cuda
@pytest.mark.benchmark(group=f"gather 80x64x{S}x{GPU_HIDDEN} bf16 B=12 (GPU)")
def test_gpu_gather_unpad(benchmark, gpu_gather_inputs):
    benchmark(synced(_unpad_input), *gpu_gather_inputs)


@needs_cuda
@pytest.mark.benchmark(group=f"scatter 80x64x{S}x{GPU_HIDDEN} bf16 B=12 (GPU)")
def test_gpu_scatter_copy_bandwidth_baseline(benchmark, gpu_gather_inputs):
    dense = torch.empty_like(gpu_gather_inputs[0])
    benchmark.extra_info["role"] = "baseline"
    benchmark(synced(dense.copy_), gpu_gather_inputs[0])


@needs_cuda
@pytest.mark.benchmark(group=f"scatter 80x64x{S}x{GPU_HIDDEN} bf16 B=12 (GPU)")
def test_gpu_scatter_triton(benchmark, gpu_gather_inputs):
    packed = pk.gather_chunks(*gpu_gather_inputs)
    benchmark(synced(pk.scatter_chunks), packed.values, packed)


@needs_cuda
@pytest.mark.benchmark(group=f"scatter 80x64x{S}x{GPU_HIDDEN} bf16 B=12 (GPU)")
def test_gpu_scatter_pad(benchmark, gpu_gather_inputs):
    values, flat = _unpad_input(*gpu_gather_inputs)
    benchmark(synced(_pad_input), values, flat, gpu_gather_inputs[0].shape)


assert "TRITON_INTERPRET" not in os.environ or not CUDA, "benchmarks must not run the Triton interpreter"
