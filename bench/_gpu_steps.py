"""The steps of ``python -m bench.gpu_check``: each validates one GPU-only path and returns its figures.

A step is ``fn(ctx) -> dict`` with ``summary`` (one line for the report's table), ``details`` (lines),
``figures`` (numbers) and ``targets`` (``{"name": {"value", "target", "met"}}``); it raises ``Skip``
with the reason when it cannot run and fails by raising (an ``AssertionError`` names the mismatch).
The kernel steps import only ``pcm_kernels`` (torch + triton); the attention step needs transformers;
the update comparison needs the trainer (verl, peft, ...), the update probe only the policy modules.

On a GPU the Triton kernels run on CUDA tensors against the torch path on the same CUDA tensors. In
the dry run (``ctx.dry``) everything runs on CPU tensors in tiny sizes, the kernels under
``TRITON_INTERPRET=1`` (set by gpu_check before anything imports pcm_kernels): the same code end to end,
figures without meaning.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch


class Skip(Exception):
    """The step cannot run here; the message is the reason."""


class Failure(AssertionError):
    """A failed check that still reports what it found (``result``: the step's figures and details)."""

    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.result = partial


@dataclass
class Ctx:
    dry: bool
    device: torch.device
    N: int
    C: int
    L: int
    B: int
    S: int
    F: int

    @classmethod
    def create(cls, dry: bool) -> "Ctx":
        if dry:
            return cls(True, torch.device("cpu"), N=6, C=16, L=8, B=4, S=5, F=8)
        return cls(False, torch.device("cuda"), N=80, C=64, L=8, B=12, S=300, F=4096)

    def require_device(self) -> None:
        if not self.dry and not torch.cuda.is_available():
            raise Skip("no CUDA device (run on a GPU machine, or --dry-run on the CPU)")

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def result(summary: str, details=(), figures=None, targets=None) -> dict:
    return {"summary": summary, "details": list(details), "figures": dict(figures or {}),
            "targets": dict(targets or {})}


def target(value: float, goal: str, met: bool) -> dict:
    return {"value": value, "target": goal, "met": bool(met)}


@contextlib.contextmanager
def backend(name: str):
    """PCM_KERNELS_BACKEND for the calls inside (read at every call)."""
    old = os.environ.get("PCM_KERNELS_BACKEND")
    os.environ["PCM_KERNELS_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PCM_KERNELS_BACKEND", None)
        else:
            os.environ["PCM_KERNELS_BACKEND"] = old


def _available(name: str) -> bool:
    """Whether ``name`` is importable as far as its spec tells (no import; gpu_check can hide packages)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    return spec is not None and "PCM_GPU_CHECK_BLOCK_IMPORTS" not in str(spec.origin)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------------------------------
# environment

TRAINER_MODULES = ("pcm_train.algorithm.grpo", "pcm_train.algorithm.batch", "pcm_train.algorithm.actor",
                   "pcm_train.tools.synthetic", "pcm_train.integrations.simplevla")
OPTIONAL = ("transformers", "peft", "verl", "ray", "tensordict", "omegaconf", "flash_attn", "safetensors",
            "tokenizers", "PIL", "scipy")


def trainer_import_errors() -> dict:
    """{module: error} for the trainer modules the update comparison imports (verl, omegaconf, ...)."""
    errors = {}
    for name in TRAINER_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any import failure is the reason
            errors[name] = f"{type(err).__name__}: {err}"
    return errors


def step_environment(ctx: Ctx) -> dict:
    import triton

    figures = {"python": platform.python_version(), "torch": torch.__version__,
               "torch_cuda": torch.version.cuda, "triton": triton.__version__,
               "triton_interpret": os.environ.get("TRITON_INTERPRET", "")}
    for name in OPTIONAL:
        dist = {"PIL": "pillow", "flash_attn": "flash-attn"}.get(name, name)
        figures[name] = (_version(dist) or "installed") if _available(name) else None
    details = []
    if torch.cuda.is_available() and not ctx.dry:
        props = torch.cuda.get_device_properties(0)
        figures.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       capability=f"sm_{props.major}{props.minor}", gpu_count=torch.cuda.device_count())
        with contextlib.suppress(Exception):
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            figures["driver"] = out[0] if out else None
    figures["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    errors = trainer_import_errors()
    figures["trainer_importable"] = not errors
    if errors:
        details.append("the trainer's update path does not import here, so the update comparison skips and the "
                       "verl-free update probe runs instead:")
        details += [f"  {name}: {err}" for name, err in errors.items()]
    else:
        details.append("the trainer's update path imports (verl, omegaconf, peft present)")
    details.append("kernel steps import only pcm_kernels (torch + triton); the attention step needs transformers")
    gpu = f"{figures.get('gpu')} ({figures.get('gpu_memory_gib')} GiB)" if not ctx.dry else "CPU dry run"
    missing = [n for n in ("verl", "peft", "flash_attn") if not figures.get(n)]
    found = result(f"{gpu}; torch {torch.__version__}, triton {triton.__version__}; "
                   f"missing: {', '.join(missing) or 'none'}", details, figures)
    if not ctx.dry and not torch.cuda.is_available():
        raise Failure(f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
                      f"{torch.version.cuda}); the GPU steps will skip", found)
    return found


# ----------------------------------------------------------------------------------------------------
# labels

def _gripper(ctx: Ctx, gen: torch.Generator, N: int, dtype: torch.dtype) -> torch.Tensor:
    """float [N, C, L]: grasp cycles with flips, a few rows of values next to the thresholds."""
    C, L, dev = ctx.C, ctx.L, ctx.device
    start = torch.rand(N, 1, generator=gen, device=dev) * C * L
    length = 20 + torch.rand(N, 1, generator=gen, device=dev) * 200
    t = torch.arange(C * L, device=dev).view(1, -1)
    closed = (t > start) & (t < start + length)
    flips = torch.rand(N, C * L, generator=gen, device=dev) < 0.03
    g = torch.where(closed ^ flips, 1.0, -1.0)
    near = torch.tensor([0.3, 0.30078125, 0.29882812, -0.1, 0.0, 1.0, -1.0], device=dev)
    rows = max(1, N // 8)
    g[-rows:] = near[torch.randint(0, len(near), (rows, C * L), generator=gen, device=dev)]
    return g.view(N, C, L).to(dtype)


def step_labels(ctx: Ctx) -> dict:
    ctx.require_device()
    import pcm_kernels as pk

    gen = ctx.generator(0)
    N, C, L = ctx.N, ctx.C, ctx.L
    keep = torch.tensor([0.3, 0.8, 1.0, 0.5, 0.1], device=ctx.device)
    checked = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gripper = _gripper(ctx, gen, N, dtype)
        steps = torch.randint(0, C * L + 1, (N,), generator=gen, device=ctx.device)
        steps[0], steps[1] = C * L, 0
        # the controller's layout: the last action dim of [N, C, L, D] actions (a strided view)
        strided = torch.zeros(N, C, L, 7, dtype=dtype, device=ctx.device)
        strided[..., -1] = gripper
        for name, g in (("contiguous", gripper), ("strided", strided[..., -1])):
            for close_above in (0.0, 0.3):
                with backend("triton"):
                    got = pk.label_phases(g, steps, close_above=close_above)
                with backend("torch"):
                    ref = pk.label_phases(g, steps, close_above=close_above)
                bad = int((got != ref).sum())
                assert bad == 0, f"{dtype} {name} close_above={close_above}: {bad} of {ref.numel()} labels differ"
                checked += ref.numel()
        with backend("triton"):
            fused, _ = pk.select_chunks(gripper, steps, keep, ctx.B, generator=ctx.generator(1))
        with backend("torch"):
            ref = pk.label_phases(gripper, steps)
        assert torch.equal(fused, ref), f"{dtype}: select_chunks' fused labels differ from label_phases"
    return result(f"exact: fp32, bf16, fp16 ({N}x{C}x{L}, contiguous + strided, 2 thresholds); fused labels "
                  "equal", [f"{checked:,} labels compared, 0 differ"], {"labels_compared": checked})


# ----------------------------------------------------------------------------------------------------
# sampling

def _compare_draws(got: torch.Tensor, expected: torch.Tensor, keys: torch.Tensor, budget: int):
    """(rows equal, ties): the sets may differ only by swaps of keys equal to 1e-5 relative at the cut."""
    N, C = keys.shape
    def mask(index):
        m = torch.zeros(N, C + 1, dtype=torch.bool, device=index.device)
        m.scatter_(1, index + 1, True)
        return m[:, 1:]
    a, b = mask(got), mask(expected)
    assert torch.equal(a.sum(1), b.sum(1)), "draws keep different numbers of chunks"
    differ = a ^ b
    rows_equal = int((~differ.any(1)).sum())
    if differ.any():
        cut = torch.sort(keys, dim=1).values[:, min(budget, C) - 1:min(budget, C)]
        near = (keys - cut).abs() <= 1e-5 * cut.abs()
        assert bool(near[differ].all()), "draws differ beyond a float tie"
    return rows_equal, int(differ.sum()) // 2


def _compare_weighted_draws(index, ht, ref_index, ref_ht, keys, budget) -> tuple[int, int, float]:
    """``_compare_draws`` plus the largest relative 1/q difference over the rows drawn identically."""
    equal, swapped = _compare_draws(index, ref_index, keys, budget)
    kept = (index >= 0) & (index == ref_index).all(1)[:, None]
    if not bool(kept.any()):
        return equal, swapped, 0.0
    rel = ((ht - ref_ht).abs() / ref_ht.abs().clamp(min=1e-30))[kept].max().item()
    return equal, swapped, rel


def step_sampling(ctx: Ctx) -> dict:
    ctx.require_device()
    from pcm_kernels._philox import philox_uniform
    from pcm_kernels.phases import vectorized as phase_vectorized
    from pcm_kernels.sampling import vectorized
    from pcm_kernels.sampling.kernels import launch_sample_chunks, launch_select_chunks

    gen = ctx.generator(2)
    N, C, dev = ctx.N, ctx.C, ctx.device
    rows_total = rows_equal = ties = 0
    ht_rel = 0.0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for budget in sorted({1, ctx.B, C // 2 + 3}):
            weights = (torch.rand(N, C, generator=gen, device=dev)
                       * (torch.rand(N, C, generator=gen, device=dev) > 0.25)).to(dtype)
            weights[0] = 0.0
            num_chunks = torch.randint(1, C + 1, (N,), generator=gen, device=dev)
            num_chunks[1] = 1
            seed = torch.randint(0, 2**62, (1,), generator=gen, device=dev, dtype=torch.int64)
            uniforms = philox_uniform(seed, torch.arange(N * C, device=dev).view(N, C))
            eligible = (torch.arange(C, device=dev) < num_chunks[:, None]) & (weights > 0)
            keys = vectorized.race_keys(weights, eligible, uniforms)
            ref_index, ref_ht = vectorized.sample_with_weights(weights, eligible, budget, uniforms)
            index = torch.full((N, budget), 77, dtype=torch.int64, device=dev)
            ht = torch.full((N, budget), -7.0, device=dev)
            plain = torch.full((N, budget), 77, dtype=torch.int64, device=dev)
            with backend("triton"):
                launch_sample_chunks(weights, num_chunks, seed, index, ht)
                launch_sample_chunks(weights, num_chunks, seed, plain)
            assert not bool((index == 77).any()) and not bool((ht == -7.0).any()), "outputs not fully written"
            assert torch.equal(index, plain), "the draw depends on WITH_WEIGHTS"
            equal, swapped, rel = _compare_weighted_draws(index, ht, ref_index, ref_ht, keys, budget)
            rows_total += N
            rows_equal += equal
            ties += swapped
            ht_rel = max(ht_rel, rel)
            assert bool((ht[index < 0] == 0).all()) and bool((ht[index >= 0] >= 1).all()), "1/q out of range"
    assert ht_rel <= 1e-4, f"1/q weights differ from the torch path by {ht_rel:.2e} relative (> 1e-4)"
    # the fused selection: labels + keep weights + draw + 1/q in one launch
    keep = torch.tensor([0.3, 0.9, 1.0, 0.6, 0.1], device=dev)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gripper = _gripper(ctx, gen, N, dtype)
        steps = torch.randint(0, C * ctx.L + 1, (N,), generator=gen, device=dev)
        seed = torch.randint(0, 2**62, (1,), generator=gen, device=dev, dtype=torch.int64)
        labels = torch.full((N, C), 55, dtype=torch.int8, device=dev)
        index = torch.full((N, ctx.B), 55, dtype=torch.int64, device=dev)
        ht = torch.full((N, ctx.B), -7.0, device=dev)
        with backend("triton"):
            launch_select_chunks(gripper, steps, keep, seed, labels, index, 0.0, 0.75, 0.5, 0.1, 3, ht)
        ref_labels = phase_vectorized.label_phases(gripper, steps, 0.0, 0.75, 0.5, 0.1, 3)
        assert torch.equal(labels, ref_labels), f"{dtype}: fused labels differ"
        weights = torch.where(ref_labels >= 0, keep[ref_labels.long().clamp(min=0)], 0.0)
        eligible = (ref_labels >= 0) & (weights > 0)
        uniforms = philox_uniform(seed, torch.arange(N * C, device=dev).view(N, C))
        keys = vectorized.race_keys(weights, eligible, uniforms)
        ref_index, ref_ht = vectorized.sample_with_weights(weights, eligible, ctx.B, uniforms)
        equal, swapped, rel = _compare_weighted_draws(index, ht, ref_index, ref_ht, keys, ctx.B)
        rows_total += N
        rows_equal += equal
        ties += swapped
        ht_rel = max(ht_rel, rel)
    assert ht_rel <= 1e-4, f"fused 1/q weights differ from the torch path by {ht_rel:.2e} relative (> 1e-4)"
    return result(f"draws equal to the torch path fed Philox uniforms: {rows_equal}/{rows_total} rows "
                  f"identical, {ties} float-tie swaps; 1/q max rel. diff {ht_rel:.1e}",
                  ["sample_chunks (fp32/bf16/fp16 weights, budgets 1, B, C/2+3, with and without 1/q) and "
                   "select_chunks (fused labels + weights + draw + 1/q) against pcm_kernels' torch path",
                   "a differing pick must be a swap of keys within 1e-5 relative of the cut (tl.log vs torch.log)"],
                  {"rows": rows_total, "rows_identical": rows_equal, "tie_swaps": ties, "ht_max_rel_diff": ht_rel})


def _chi_square_p(counts: list[float], expected: list[float]) -> tuple[float, float]:
    stat = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    df = len(counts) - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                      torch.tensor(stat / 2, dtype=torch.float64)))
    return stat, p


def step_plackett_luce(ctx: Ctx) -> dict:
    ctx.require_device()
    import itertools

    import pcm_kernels as pk
    from pcm_kernels.sampling import naive

    weights = [0.2, 1.0, 0.5, 3.0] if ctx.dry else [0.2, 1.0, 0.5, 3.0, 0.7, 0.05]
    budget = 2
    trials = 500 if ctx.dry else 200_000
    subsets = list(itertools.combinations(range(len(weights)), budget))
    probs = [naive.plackett_luce_probability(s, weights) for s in subsets]
    rows = torch.tensor(weights, device=ctx.device).expand(trials, len(weights))  # stride 0 along N
    with backend("triton"):  # the public call: seed drawn on the device from a device generator
        index = pk.sample_chunks(rows, budget, generator=ctx.generator(3), validate=False)
    codes = (index[:, 0] * len(weights) + index[:, 1]).cpu()
    counts = torch.bincount(codes, minlength=len(weights) ** 2).tolist()
    observed = [counts[a * len(weights) + b] for a, b in subsets]
    assert sum(observed) == trials, "a draw is not an ascending pair of distinct chunks"
    stat, p = _chi_square_p(observed, [q * trials for q in probs])
    assert p > 1e-4, f"Triton draws do not follow Plackett-Luce (chi2 = {stat:.1f}, p = {p:.2e})"
    return result(f"frequencies match Plackett-Luce (chi2 p = {p:.3f}, {trials:,} draws)",
                  [f"sample_chunks: {trials:,} draws of {budget} of {len(weights)} chunks (weights {weights}), "
                   f"chi2 = {stat:.1f} on {len(subsets) - 1} df, p = {p:.3f}"],
                  {"p_value": p, "chi2": stat, "draws": trials})


# ----------------------------------------------------------------------------------------------------
# packing

def _equal_chunked(a: torch.Tensor, b: torch.Tensor, rows: int = 4) -> bool:
    """torch.equal over slices of dim 0 (no 6 GB boolean temporaries)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return all(torch.equal(a[i:i + rows], b[i:i + rows]) for i in range(0, a.shape[0], rows))


def _index_seqlens(ctx: Ctx, gen, N, C, S, B):
    import pcm_kernels as pk

    weights = torch.rand(N, C, generator=gen, device=ctx.device) + 0.01
    with backend("torch"):
        index = pk.sample_chunks(weights, B, generator=gen)
    seqlens = torch.randint(S // 2, S + 1, (N, C), generator=gen, device=ctx.device)
    return index, seqlens


def step_packing(ctx: Ctx) -> dict:
    ctx.require_device()
    import pcm_kernels as pk
    from pcm_kernels.packing import vectorized

    N, C, S, F, B = ctx.N, ctx.C, ctx.S, ctx.F, ctx.B
    dtype = torch.bfloat16
    gen = ctx.generator(4)
    index, seqlens = _index_seqlens(ctx, gen, N, C, S, B)
    details = []
    for layout in ("contiguous", "permuted [S, N, C, F] storage"):
        if layout == "contiguous":
            x = torch.randn(N, C, S, F, generator=gen, device=ctx.device, dtype=dtype)
        else:
            x = torch.randn(S, N, C, F, generator=gen, device=ctx.device, dtype=dtype).permute(1, 2, 0, 3)
        x.requires_grad_(True)
        with backend("triton"):
            packed = pk.gather_chunks(x, index, seqlens)
        with backend("torch"):
            reference = vectorized.gather(x.detach(), packed.token_chunk_ids, packed.position_ids)
        assert torch.equal(packed.values, reference), f"gather ({layout}) differs from the torch path"
        T = packed.values.shape[0]
        grad = torch.randn(T, F, generator=gen, device=ctx.device, dtype=dtype)
        if layout != "contiguous":  # a transposed gradient: the feature stride is T
            grad = torch.randn(F, T, generator=gen, device=ctx.device, dtype=dtype).t()
        with backend("triton"):
            packed.values.backward(grad)
        dense_grad = x.grad
        x.grad = None
        del x, reference
        with backend("torch"):
            expected = vectorized.scatter(grad.contiguous(), packed.token_chunk_ids, packed.position_ids,
                                          (N, C, S, F))
        assert _equal_chunked(dense_grad.contiguous(), expected), f"gather's gradient ({layout}) differs"
        del dense_grad, expected
        # scatter forward (packed -> dense) and its gradient (dense -> packed)
        values = grad.detach().requires_grad_(True)
        with backend("triton"):
            dense = pk.scatter_chunks(values, packed)
        with backend("torch"):
            expected = vectorized.scatter(values.detach().contiguous(), packed.token_chunk_ids,
                                          packed.position_ids, (N, C, S, F))
        assert _equal_chunked(dense, expected), f"scatter ({layout} values) differs from the torch path"
        del expected
        upstream = dense.detach()  # any dense gradient: reuse the buffer
        with backend("triton"):
            dense.backward(upstream)
        assert torch.equal(values.grad, grad), f"scatter's gradient ({layout}) differs"
        del dense, upstream, values, grad
        how = "scatter" if layout == "contiguous" else "scatter of a transposed [T, F] gradient"
        details.append(f"{layout}: gather, its gradient ({how}), scatter and its gradient (gather) equal the "
                       f"torch path; T = {T:,} tokens")
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    # no chunk kept (M = 0): cu_seqlens = [0]; nothing read past it, dense all zeros
    none = torch.full((N, B), -1, dtype=torch.int64, device=ctx.device)
    small = torch.randn(N, C, 3, 4, generator=gen, device=ctx.device)
    with backend("triton"):
        packed = pk.gather_chunks(small, none)
        dense = pk.scatter_chunks(torch.zeros(0, 4, device=ctx.device), packed)
    assert packed.cu_seqlens.tolist() == [0] and packed.values.shape == (0, 4)
    assert dense.shape == (N, C, 3, 4) and bool((dense == 0).all()), "M = 0: scatter must write zeros"
    details.append("M = 0 (no chunk kept): empty values, all-zero dense")
    elements = N * C * S * F
    return result(f"values and gradients equal at {N}x{C}x{S}x{F} bf16 ({elements:,} elements), "
                  "contiguous + permuted; M = 0", details, {"elements": elements})


def step_overflow(ctx: Ctx) -> dict:
    """Address arithmetic past 2**31 elements: position x stride and feature x stride (as
    tests/test_packing_offsets.py, on the device), plus the > 2**31-element tensors of ``packing``."""
    ctx.require_device()
    import pcm_kernels as pk
    from pcm_kernels.packing.kernels import launch_gather, launch_scatter

    big = 2**31 + 2**22
    try:
        storage = torch.empty(big, dtype=torch.uint8, device=ctx.device)
    except (RuntimeError, MemoryError) as err:
        raise Skip(f"cannot allocate {big / 2**30:.1f} GiB: {err}") from err
    S, stride_s = 129, 2**24  # position 128 x stride = 2**31
    x = storage.as_strided((1, 1, S, 1), (0, 0, stride_s, 1))
    positions = torch.arange(S, device=ctx.device) * stride_s
    storage[positions] = (torch.arange(S, device=ctx.device) % 251).to(torch.uint8)
    index, seqlens = torch.tensor([[0]], device=ctx.device), torch.tensor([[S]], device=ctx.device)
    layout = pk.plan_chunks(index, 1, S, seqlens)
    out = torch.full((S, 1), 255, dtype=torch.uint8, device=ctx.device)
    with backend("triton"):
        launch_gather(x, out, layout.chunk_ids, layout.cu_seqlens, layout.max_seqlen)
    assert torch.equal(out.view(-1), (torch.arange(S, device=ctx.device) % 251).to(torch.uint8)), \
        "gather: position x stride past 2**31 read the wrong elements"
    T, F, stride_f = 8, 4096, 2**19 + 1  # feature 4095 x stride > 2**31 (a transposed [T, F] gradient)
    values = storage.as_strided((T, F), (1, stride_f))
    expected = (torch.arange(T * F, device=ctx.device) % 249).to(torch.uint8).view(T, F)
    feature_offsets = torch.arange(F, device=ctx.device) * stride_f
    for t in range(T):
        storage[t + feature_offsets] = expected[t]
    layout = pk.plan_chunks(torch.tensor([[1]], device=ctx.device), 2, T,
                            torch.tensor([[0, T]], device=ctx.device))
    dense = torch.full((1, 2, T, F), 7, dtype=torch.uint8, device=ctx.device)
    with backend("triton"):
        launch_scatter(values, dense, layout.slot, layout.cu_seqlens)
    assert torch.equal(dense[0, 1], expected) and bool((dense[0, 0] == 0).all()), \
        "scatter: feature x stride past 2**31 wrote the wrong elements"
    return result("position x stride = 2**31 (gather) and feature x stride > 2**31 (scatter) correct",
                  ["uint8 views of a 2 GiB buffer on the device; the packing step's 80x64x300x4096 tensors "
                   "(6.3e9 elements) cover > 2**31-element tensors"])


# ----------------------------------------------------------------------------------------------------
# performance

def _time(ctx: Ctx, fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        fn()
    ctx.sync()
    samples = []
    for _ in range(repeats):
        if ctx.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def step_bandwidth(ctx: Ctx) -> dict:
    ctx.require_device()
    import pcm_kernels as pk

    N, C, S, F, B = ctx.N, ctx.C, ctx.S, ctx.F, ctx.B
    gen = ctx.generator(5)
    index, seqlens = _index_seqlens(ctx, gen, N, C, S, B)
    x = torch.randn(N, C, S, F, generator=gen, device=ctx.device, dtype=torch.bfloat16)
    repeats = 3 if ctx.dry else 10
    with backend("triton"):
        layout = pk.plan_chunks(index, C, S, seqlens)
        values = layout.gather(x)
        src = values.clone()
        dst = torch.empty_like(src)
        gather_s = _time(ctx, lambda: layout.gather(x), repeats)
        copy_s = _time(ctx, lambda: dst.copy_(src), repeats)
        scatter_s = _time(ctx, lambda: pk.scatter_chunks(values, layout), repeats)
        dense = torch.empty_like(x)
        dense_copy_s = _time(ctx, lambda: dense.copy_(x), repeats)
    moved = 2 * values.numel() * values.element_size()  # read + write of the kept tokens
    dense_moved = x.numel() * x.element_size() + values.numel() * values.element_size()  # write all, read kept
    gb = 1e9
    gather_bw, copy_bw = moved / gather_s / gb, moved / copy_s / gb
    scatter_bw, dense_copy_bw = dense_moved / scatter_s / gb, 2 * x.numel() * x.element_size() / dense_copy_s / gb
    figures = {"gather_s": gather_s, "gather_GBps": gather_bw, "copy_GBps": copy_bw, "scatter_s": scatter_s,
               "scatter_GBps": scatter_bw, "dense_copy_GBps": dense_copy_bw, "tokens": values.shape[0]}
    g_ratio, s_ratio = gather_bw / copy_bw, scatter_bw / dense_copy_bw
    targets = {} if ctx.dry else {
        "gather / copy bandwidth": target(g_ratio, ">= 0.80", g_ratio >= 0.8),
        "scatter / copy bandwidth": target(s_ratio, ">= 0.80", s_ratio >= 0.8)}
    return result(f"gather {gather_bw:,.0f} GB/s = {g_ratio:.0%} of a copy of the same bytes ({copy_bw:,.0f} GB/s); "
                  f"scatter {scatter_bw:,.0f} GB/s = {s_ratio:.0%} of a dense copy ({dense_copy_bw:,.0f} GB/s)",
                  [f"{N}x{C}x{S}x{F} bf16, B = {B}: {values.shape[0]:,} kept tokens; gather {gather_s * 1e3:.3f} ms, "
                   f"copy {copy_s * 1e3:.3f} ms, scatter {scatter_s * 1e3:.3f} ms, dense copy "
                   f"{dense_copy_s * 1e3:.3f} ms (median of {repeats}; bytes = read + write)"],
                  figures, targets)


def step_select_latency(ctx: Ctx) -> dict:
    ctx.require_device()
    import pcm_kernels as pk

    N, C, L, B = ctx.N, ctx.C, ctx.L, ctx.B
    gen = ctx.generator(6)
    gripper = _gripper(ctx, gen, N, torch.float32)
    steps = torch.randint(C * L // 2, C * L + 1, (N,), generator=gen, device=ctx.device)
    keep = torch.tensor([0.3, 0.8, 1.0, 0.5, 0.1], device=ctx.device)  # on the device: no copy per call
    draw = ctx.generator(7)
    calls = 5 if ctx.dry else 200

    def fused():
        return pk.select_chunks(gripper, steps, keep, B, generator=draw, validate=False)  # sync-free

    def two_steps():
        labels = pk.label_phases(gripper, steps, validate=False)
        weights = torch.where(labels >= 0, keep[labels.long().clamp(min=0)], 0.0)
        return pk.sample_chunks(weights, B, generator=draw, validate=False)

    with backend("triton"):
        fused_s = _time(ctx, lambda: [fused() for _ in range(calls)], 5 if not ctx.dry else 1) / calls
        baseline_s = _time(ctx, lambda: [two_steps() for _ in range(calls)], 5 if not ctx.dry else 1) / calls
        ctx.sync()
        t0 = time.perf_counter()
        fused()
        ctx.sync()
        wall_s = time.perf_counter() - t0
        kernels = []
        if ctx.device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fused()
                ctx.sync()
            kernels = sorted({e.name for e in prof.events() if str(e.device_type).endswith("CUDA")})
    us = fused_s * 1e6
    details = [f"{N}x{C}x{L}, B = {B}: select_chunks {us:.1f} us per call on the device stream ({calls} calls "
               f"back to back), label_phases + sample_chunks {baseline_s * 1e6:.1f} us; one synchronized call "
               f"{wall_s * 1e6:.0f} us wall"]
    if kernels:
        details.append(f"device work per select_chunks call: {', '.join(kernels)} (the selection is one Triton "
                       "launch; draw_seed's torch.randint draws its seed on the device)")
    selection_launches = sum("select_chunks_kernel" in k for k in kernels)
    targets = {} if ctx.dry else {"label + sample (select_chunks) us": target(us, "<= 30", us <= 30),
                                  "select_chunks Triton launches": target(selection_launches, "== 1",
                                                                          selection_launches == 1)}
    return result(f"select_chunks {us:.1f} us per call (label + sample in two calls: {baseline_s * 1e6:.1f} us)",
                  details, {"select_us": us, "two_step_us": baseline_s * 1e6, "wall_us": wall_s * 1e6,
                            "kernels": kernels}, targets)


# ----------------------------------------------------------------------------------------------------
# attention

def step_attention(ctx: Ctx) -> dict:
    ctx.require_device()
    import torch.nn.functional as F

    from pcm_train.policies.varlen_attention import packed_attention_path, varlen_bidirectional_attention

    dtype = torch.float32 if ctx.dry else torch.bfloat16
    heads, d = (2, 8) if ctx.dry else (32, 128)
    lengths = [5, 3, 7] if ctx.dry else [337, 200, 337, 64]
    total = sum(lengths)
    gen = ctx.generator(8)
    q, k, v = (torch.randn(total, heads, d, generator=gen, device=ctx.device, dtype=dtype) for _ in range(3))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=ctx.device)
    path, reason = packed_attention_path(q)
    out = varlen_bidirectional_attention(q, k, v, cu, max(lengths))
    worst = 0.0
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1).float() for t in (q, k, v)))
        worst = max(worst, (out[a:b].float() - ref.transpose(0, 1)).abs().max().item())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert worst <= tolerance, f"packed attention differs from per-chunk SDPA by {worst:.2e} (> {tolerance})"
    return result(f"packed attention path: {path} ({reason}); max |diff| vs per-chunk SDPA {worst:.1e}",
                  [f"{len(lengths)} chunks of {lengths} tokens, {heads} heads x {d}, {dtype}"],
                  {"path": path, "reason": reason, "max_abs_diff": worst})


# ----------------------------------------------------------------------------------------------------
# the update at the 7B shapes

PAPER_SPEEDUP, PAPER_ACTIVATION_CUT = 4.8, 0.60


def step_update_comparison(ctx: Ctx) -> dict:
    ctx.require_device()
    errors = trainer_import_errors()
    if errors:
        missing = sorted({err.split("'")[1] for err in errors.values() if "No module named" in err} or
                         set(errors.values()))
        raise Skip("the trainer's update (pcm_train.algorithm.actor/batch, tools.synthetic -> verl.DataProto, "
                   "algorithm.grpo -> verl core_algos + omegaconf) does not import: missing "
                   f"{', '.join(missing)}; install `.[train]` to run it (verl 0.9.1 pulls ray and tensordict, "
                   "platform wheels far above a vendored few MiB); the verl-free update probe measures the 7B "
                   "forward/backward instead")
    import io

    from pcm_train.tools import compare_update as cu

    if ctx.dry:
        argv = ["--policy", "small_vla", "--hidden", "32", "--layers", "1", "--chunks", "8", "--budget", "3",
                "--num-prompts", "1", "--group-size", "2", "--repeats", "1", "--device", "cpu", "--json"]
    else:
        argv = ["--policy", "openvla_oft", "--real-size", "--device", "cuda", "--num-prompts", "1",
                "--group-size", "4", "--repeats", "1", "--json"]
    argv += os.environ.get("PCM_GPU_CHECK_UPDATE_ARGS", "").split()
    args = cu.parse_args(argv)
    plan = cu.memory_plan(args)
    details = [f"python -m pcm_train.compare_update {' '.join(argv)}", *cu.describe_plan(plan).splitlines()]
    if not plan["fits"]:
        raise AssertionError("compare_update refused the configuration:\n" + "\n".join(details))
    with contextlib.redirect_stderr(io.StringIO()):
        report = cu.run(args, plan)
    details += cu.format_table(report).splitlines()
    speed, cut = report["update_time_ratio_vs_simplevla_rl"], report["activation_memory_reduction_vs_simplevla_rl"]
    est = plan["estimate"]
    measured_peak = report["modes"]["simplevla_rl"]["peak_memory_bytes"]
    if not ctx.dry:  # CUDA's max allocated (the CPU's peak RSS counts the whole process)
        details.append(f"memory estimate {est.total() / 2**30:.2f} GiB vs measured peak "
                       f"{measured_peak / 2**30:.2f} GiB")
    targets = {} if ctx.dry else {
        "SimpleVLA-RL / pcm update time": target(speed, f">= {PAPER_SPEEDUP}", speed >= PAPER_SPEEDUP),
        "activation memory vs SimpleVLA-RL": target(-cut, f"<= -{PAPER_ACTIVATION_CUT:.0%}",
                                                    cut >= PAPER_ACTIVATION_CUT)}
    return result(f"SimpleVLA-RL / pcm {speed:.2f}x, full / pcm {report['update_time_ratio']:.2f}x; activation "
                  f"-{cut:.0%} (vs SimpleVLA-RL); {plan['settings']}", details,
                  {"report": report, "estimate_total_bytes": est.total()}, targets)


def _tiny_openvla_config() -> dict:
    from pcm_train.policies.openvla_oft import real_size_config

    raw = real_size_config()
    raw["text_config"] = dict(raw["text_config"], hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              num_hidden_layers=2, num_key_value_heads=4)
    raw["vit_overrides"] = [{"depth": 2, "embed_dim": 32, "num_heads": 2},
                            {"depth": 2, "embed_dim": 48, "num_heads": 2}]
    return raw


def step_update_probe(ctx: Ctx) -> dict:
    """verl-free: forward + backward of the 7B OpenVLA-OFT (random weights, bf16, LoRA r = 8 or, without
    peft, the decoder's norm weights, gradient checkpointing) on one micro-batch per mode, as the actor
    runs it (packed prompts, action_logits_packed, log-probs): SimpleVLA-RL's 64 chunks, full's ~51
    valid chunks per trajectory, PCM's 12. Time, bytes saved for backward and peak memory per mode, and
    the memory estimator's figure against the measured peak."""
    ctx.require_device()
    import pcm_kernels as pk
    from pcm_train.runtime.memory import SavedActivations
    from pcm_train.policies.openvla_oft import OpenVLAOFT, real_size_config

    dtype = torch.float32 if ctx.dry else torch.bfloat16
    raw = _tiny_openvla_config() if ctx.dry else real_size_config()
    torch.manual_seed(0)
    policy = OpenVLAOFT.random_init(raw, dtype=dtype, device=ctx.device, seed=0)
    details = []
    try:
        policy.add_lora(8, 8)
        trained = "LoRA r = 8 (peft)"
    except ImportError as err:
        policy.requires_grad_(False)
        for layer in policy.language_model.model.layers:
            layer.input_layernorm.weight.requires_grad_(True)
            layer.post_attention_layernorm.weight.requires_grad_(True)
        trained = f"the decoder's RMSNorm weights (LoRA needs peft: {err})"
    policy.enable_gradient_checkpointing()
    policy.train()
    # compare_update's estimator on this device: its per-token profile (1- and 2-layer slices)
    from pcm_train.tools.compare_update import estimate_update_memory, logits_bytes_per_token, measure_activation_profile

    tokens_per_chunk = 24 + policy.config.num_patches + policy.config.num_action_tokens + 1  # placeholder prompts
    profile = measure_activation_profile(policy.config.llama, dtype=dtype, device=ctx.device,
                                         lora_r=8 if trained.startswith("LoRA") else 0,
                                         tokens_per_chunk=tokens_per_chunk)
    element = torch.empty(0, dtype=dtype).element_size()
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    cfg = policy.config
    modes = {"simplevla_rl": 64, "full": 51, "pcm": 12} if not ctx.dry else {"simplevla_rl": 4, "full": 3, "pcm": 1}
    gen = torch.Generator().manual_seed(0)
    repeats = 1 if ctx.dry else 2
    figures = {}
    device = ctx.device
    base_allocated = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    for mode, chunks in modes.items():
        ids, attn = policy.placeholder_prompts(chunks, generator=gen)
        lengths = attn.sum(-1)
        prompts = pk.gather_chunks(ids.view(chunks, 1, -1), torch.zeros(chunks, 1, dtype=torch.int64, device=device),
                                   lengths.view(chunks, 1))
        pixels = torch.rand(chunks, cfg.image_channels, cfg.image_size, cfg.image_size, generator=gen).to(device)
        responses = torch.randint(cfg.action_token_start, cfg.vocab_size, (chunks, cfg.num_action_tokens),
                                  generator=gen).to(device)
        times, saved = [], 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(repeats + 1):
            optimizer.zero_grad(set_to_none=True)
            ctx.sync()
            t0 = time.perf_counter()
            with SavedActivations(policy) as probe:
                logits = policy.action_logits_packed(prompts.values, prompts.cu_seqlens, pixels)
                loss = -policy.log_probs(logits, responses, 1.6).mean()
            loss.backward()
            optimizer.step()
            ctx.sync()
            times.append(time.perf_counter() - t0)
            saved = probe.bytes
            del logits, loss
        peak = (torch.cuda.max_memory_allocated(device) - base_allocated) if device.type == "cuda" else 0
        tokens = int(prompts.values.numel() + chunks * (cfg.num_patches + cfg.num_action_tokens + 1))
        head = logits_bytes_per_token(cfg.num_action_tokens, cfg.llama.hidden_size, element, tokens // chunks)
        est = estimate_update_memory(weight_bytes=0, trainable_params=0, trainable_bytes_per_param=0, batch_bytes=0,
                                     profile=profile, tokens_per_micro_batch=tokens,
                                     layers=cfg.llama.num_hidden_layers, gradient_checkpointing=True,
                                     logits_bytes_per_token=head)
        figures[mode] = {"chunks": chunks, "tokens": tokens, "fwd_bwd_s": statistics.median(times[1:]),
                         "saved_bytes": saved, "peak_above_weights_bytes": peak,
                         "estimated_saved_bytes": est.saved_in_forward(),
                         "estimated_activation_bytes": est.activations()}
        details.append(f"{mode}: {chunks} chunks ({tokens:,} tokens) forward + backward + step "
                       f"{figures[mode]['fwd_bwd_s'] * 1e3:.1f} ms, saved for backward {saved / 2**20:.1f} MiB "
                       f"(estimated {est.saved_in_forward() / 2**20:.1f}), peak above the weights "
                       f"{peak / 2**30:.2f} GiB (estimated activations {est.activations() / 2**30:.2f} GiB)")
    optimizer.zero_grad(set_to_none=True)
    per_traj = {m: figures[m]["fwd_bwd_s"] for m in modes}
    speed_vs_padded = per_traj["simplevla_rl"] / per_traj["pcm"]
    speed_vs_full = per_traj["full"] / per_traj["pcm"]
    act_cut = 1 - figures["pcm"]["saved_bytes"] / figures["simplevla_rl"]["saved_bytes"]
    details.insert(0, f"one trajectory's micro-batch per mode, {dtype}, trained: {trained}, gradient checkpointing "
                      "on; no verl: the loss is the mean log-prob (same forward/backward as the PPO loss); "
                      f"estimates from compare_update's profile: {profile.per_layer / 1024:.1f} KiB per token per "
                      f"layer, {profile.per_layer_checkpointed / 1024:.1f} KiB kept with checkpointing")
    targets = {} if ctx.dry else {
        "SimpleVLA-RL / pcm forward+backward": target(speed_vs_padded, f">= {PAPER_SPEEDUP}",
                                                      speed_vs_padded >= PAPER_SPEEDUP),
        "saved activations vs SimpleVLA-RL": target(-act_cut, f"<= -{PAPER_ACTIVATION_CUT:.0%}",
                                                    act_cut >= PAPER_ACTIVATION_CUT)}
    return result(f"per trajectory: SimpleVLA-RL / pcm {speed_vs_padded:.2f}x, full / pcm {speed_vs_full:.2f}x; "
                  f"saved activations -{act_cut:.0%}; trained {trained.split(' (')[0]}", details,
                  {**figures, "speedup_vs_simplevla_rl": speed_vs_padded, "speedup_vs_full": speed_vs_full,
                   "activation_cut": act_cut, "trained": trained}, targets)


STEPS = {
    # name: (function, GPU timeout s, dry-run timeout s, what it checks)
    "environment": (step_environment, 90, 60, "machine, versions, what imports"),
    "labels": (step_labels, 90, 60, "label_phases / select_chunks labels exact vs torch (fp32, bf16, fp16)"),
    "sampling": (step_sampling, 120, 90, "draws and 1/q weights vs the torch path"),
    "plackett_luce": (step_plackett_luce, 60, 60, "draw frequencies vs the Plackett-Luce law"),
    "packing": (step_packing, 120, 60, "gather/scatter values + gradients, 80x64x300x4096 bf16, M = 0"),
    "overflow": (step_overflow, 60, 60, "addresses past 2**31 elements"),
    "bandwidth": (step_bandwidth, 90, 60, "gather/scatter vs device-to-device copy"),
    "select_latency": (step_select_latency, 60, 60, "label + sample us at 80x64, launches"),
    "attention": (step_attention, 90, 60, "which packed attention path runs, vs SDPA"),
    "update_comparison": (step_update_comparison, 300, 120, "compare_update --real-size (needs verl)"),
    "update_probe": (step_update_probe, 240, 120, "verl-free 7B forward/backward per mode"),
}


def run_step(name: str, dry: bool) -> dict:
    ctx = Ctx.create(dry)
    fn = STEPS[name][0]
    return fn(ctx)

