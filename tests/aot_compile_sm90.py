"""Compile every pcm_kernels Triton kernel for the H100/H200 (sm_90) as the runtime specializes it; no GPU.

The kernels are not given hand-written argument types: the public ops (and the trainer's call sites:
``shrink_batch``'s gathers, the actor's prompt packing and log-prob scatter, the controller's labels
and fused selection) run on CPU tensors with the dtypes, strides and alignment the runtime passes,
the backend switch forced to ``triton``, and each kernel's ``run`` replaced by a recorder. The
recorder binds the launch's real arguments with Triton's own binder for the CUDA backend
(``create_function_from_signature`` -> ``native_specialize_impl``: pointer dtypes, 16-byte
divisibility of pointers and ints, ints equal to 1 as constexprs, i32/i64 by value) and compiles
that specialization for sm_90 instead of launching. So CI compiles what a GPU runs (e.g. the bf16
gather's 16-byte vector loads, which scalar ``*bf16`` signatures without divisibility never get).

Every distinct specialization is compiled once; its PTX goes through ptxas ``-v`` with Triton's
flags for registers and spills (the cubin's resource usage from cuobjdump when available). Exit
status 1 on a compile failure or on any spill. Run in a process without TRITON_INTERPRET (the
interpreter replaces the kernels at decoration time). One line per compiled kernel:
``ok <kernel> regs=R spill_stores=S spill_loads=L stack=K ... cases=[...]``.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("aot_compile_sm90: unset TRITON_INTERPRET (the interpreter replaces the kernels)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

import pcm_kernels as pk  # noqa: E402
import pcm_kernels.packing as packing  # noqa: E402
import pcm_kernels.phases as phases  # noqa: E402
import pcm_kernels.sampling as sampling  # noqa: E402
from pcm_kernels.packing.kernels import copy_chunks_kernel  # noqa: E402
from pcm_kernels.phases.kernels import label_phases_kernel  # noqa: E402
from pcm_kernels.sampling.kernels import sample_chunks_kernel, select_chunks_kernel  # noqa: E402
from pcm_train.policies import action_tokens  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
KERNELS = (label_phases_kernel, sample_chunks_kernel, select_chunks_kernel, copy_chunks_kernel)
# the trainer's shapes: N trajectories x C chunks of L steps x D dims, B kept, S = 300 tokens x 4096 features
N, C, L, D, B, P = 80, 64, 8, 7, 12, 24
IMAGE = (6, 224, 224)  # OpenVLA-OFT pixel_values per chunk (DINOv2 + SigLIP channels)


def _binder(kernel, backend):
    """Triton's own argument binder + specializer for ``kernel`` on ``backend`` (what ``JITFunction.run`` uses)."""
    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as err:  # pragma: no cover - another Triton layout
        raise SystemExit(f"triton {triton.__version__}: no runtime.jit.create_function_from_signature ({err}); "
                         "this script follows JITFunction.run of triton 3.3+") from err
    return create_function_from_signature(kernel.signature, kernel.params, backend)


def _pack(kernel, backend, kwargs, bound_args, specialization, options):
    """(options, signature, constexprs, attrs) exactly as ``JITFunction.run`` derives them before compiling."""
    if hasattr(kernel, "_pack_args"):
        return kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    from triton._utils import find_paths_if, get_iterable_path  # older layout of the same steps

    options = backend.parse_options(kwargs)
    sigkeys = [p.name for p in kernel.params]
    sigvals = [s[0] for s in specialization]
    signature = dict(zip(sigkeys, sigvals))
    constexprs = find_paths_if(sigvals, lambda _, val: val == "constexpr")
    constexprs = {path: get_iterable_path(list(bound_args.values()), path) for path in constexprs}
    attrvals = ["" if s[0] == "constexpr" else s[1] for s in specialization]
    attrs = find_paths_if(attrvals, lambda _, x: isinstance(x, str))
    attrs = {k: backend.parse_attr(get_iterable_path(attrvals, k)) for k in attrs}
    return options, signature, constexprs, attrs


def _ptxas_path() -> str:
    with contextlib.suppress(Exception):
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(TARGET.arch).path
    from triton import knobs

    return knobs.nvidia.ptxas.path


def resource_usage(compiled, fp_fusion: bool) -> dict:
    """Registers and spills of one compiled kernel: ptxas -v on its PTX with Triton's flags, and the
    cubin's REG/STACK/LOCAL from cuobjdump when it is available."""
    usage = {}
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        cmd = [_ptxas_path(), "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
        if not regs or not spills:
            raise RuntimeError(f"cannot parse ptxas -v output:\n{log}")
        usage.update(regs=int(regs.group(1)), stack=int(spills.group(1)), spill_stores=int(spills.group(2)),
                     spill_loads=int(spills.group(3)))
        cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(_ptxas_path()), "cuobjdump")
        if os.path.exists(cuobjdump):
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            out = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
            found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
            if found:
                usage.update(cubin_regs=int(found.group(1)), cubin_local=int(found.group(4)),
                             shared=int(found.group(3)))
    return usage


class Recorder:
    """Replaces each kernel's ``run``: binds and specializes the launch's arguments for sm_90, compiles
    each new specialization once, and launches nothing."""

    def __init__(self):
        self.backend = make_backend(TARGET)
        self.compiled: dict[tuple, dict] = {}
        self.case = "?"
        self.failures: list[str] = []

    def install(self, kernel) -> None:
        binder = _binder(kernel, self.backend)

        def run(*args, grid, warmup, **kwargs):
            from triton import knobs

            kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
            for name, knob in (("instrumentation_mode", "instrumentation_mode"),
                               ("fpsan_homomorphic_casts", "fpsan_homomorphic_casts")):
                if hasattr(knobs.compilation, knob):
                    kwargs[name] = getattr(knobs.compilation, knob)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = _pack(kernel, self.backend, kwargs, bound, specialization,
                                                          options)
            key = (kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())),
                   tuple(sorted((k, repr(v)) for k, v in attrs.items())))
            entry = self.compiled.get(key)
            if entry is None:
                names = {p[0]: kernel.params[p[0]].name for p in list(constexprs) + list(attrs)}
                entry = self.compiled[key] = {"kernel": kernel.__name__, "cases": [], "signature": signature,
                                              "constexprs": {names[p[0]]: v for p, v in constexprs.items()},
                                              "divisible_by_16": [names[p[0]] for p, v in attrs.items()
                                                                  if "tt.divisibility" in repr(v)]}
                try:
                    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                                              options=options.__dict__)
                    assert compiled.asm["cubin"], kernel.__name__
                    entry["ptx"] = compiled.asm["ptx"]
                    entry.update(resource_usage(compiled, options.enable_fp_fusion))
                except Exception as err:  # noqa: BLE001 - report every failing specialization
                    entry["error"] = f"{type(err).__name__}: {err}"
                    self.failures.append(f"{kernel.__name__} ({self.case}): {entry['error'][:2000]}")
            entry["cases"].append(self.case)
            return None

        kernel.run = run  # the instance attribute shadows JITFunction.run; kernel[grid](...) calls it


def runtime_cases():
    """(name, thunk) pairs: the runtime's calls of every kernel on CPU tensors shaped as on the GPU."""
    gen = torch.Generator().manual_seed(0)
    cases = []

    def responses():
        return torch.randint(31744, 32000, (N, C, L * D), generator=gen)

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")

        def controller(dtype=dtype):
            # the controller's inputs: executed_actions' gripper from the responses (pcm_train.algorithm.batch)
            normalized = action_tokens.tokens_to_normalized(responses(), 31744)
            gripper = action_tokens.gripper_to_env(normalized.view(N, C, L, D)[..., -1]).to(dtype)
            steps = torch.randint(C * L // 2, C * L + 1, (N,), generator=gen)
            pk.label_phases(gripper, steps)
            keep = torch.tensor([0.3, 0.8, 1.0, 0.5, 0.1])
            for unbiased in (False, True):
                pk.select_chunks(gripper, steps, keep, B, generator=gen, return_weights=unbiased)
        cases.append((f"label_phases + select_chunks, gripper {name} [N, C, L]", controller))

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        name = str(dtype).replace("torch.", "")

        def sample(dtype=dtype):
            weights = torch.rand(N, C, generator=gen).to(dtype)
            for unbiased in (False, True):
                pk.sample_chunks(weights, B, torch.full((N,), C), generator=gen, return_weights=unbiased)
        cases.append((f"sample_chunks, weights {name} [N, C]", sample))

    def shrink_batch():
        # pcm_train.algorithm.batch.shrink_batch: rows = plan_chunks(index, C, 1); rows.gather(key.unsqueeze(2))
        n = 2  # N only sets the grid: strides and sizes per trajectory are the runtime's
        index = torch.sort(torch.randperm(C, generator=gen)[:B]).values.expand(n, B).contiguous()
        rows = pk.plan_chunks(index, C, 1)
        for key, tensor in (("responses", torch.empty(n, C, L * D, dtype=torch.int64)),
                            ("input_ids", torch.empty(n, C, P, dtype=torch.int64)),
                            ("pixel_values", torch.empty(n, C, *IMAGE, dtype=torch.float32)),
                            ("response_mask", torch.empty(n, C, L * D, dtype=torch.bool))):
            rows.gather(tensor.unsqueeze(2))
        rows.gather(torch.empty(n, C * L * D).view(n, C, 1, L * D))  # old_log_probs / advantages
        # the actor's log-probs back to the dense layout: scatter_chunks(new_log_probs [M, A], rows)
        pk.scatter_chunks(torch.empty(rows.chunk_ids.numel(), L * D), rows)
    cases.append(("shrink_batch gathers + the actor's log-prob scatter (S = 1)", shrink_batch))

    def actor_prompts():
        # pcm_train.algorithm.actor.chunk_log_probs: each kept row's prompt packed for the varlen forward
        count = N * B
        ids = torch.randint(3, 29871, (count, P), generator=gen)
        lengths = torch.full((count,), P)
        pk.gather_chunks(ids.view(count, 1, -1), torch.zeros(count, 1, dtype=torch.int64), lengths.view(count, 1))
    cases.append(("actor prompt packing (int64 [M, 1, P])", actor_prompts))

    def activations():
        # gather/scatter of [N, C, S, 4096] bf16 activations and their gradients (the bench shapes)
        n, S, F = 1, 300, 4096
        index = torch.sort(torch.randperm(C, generator=gen)[:B]).values.view(1, B)
        seqlens = torch.randint(S // 2, S + 1, (n, C), generator=gen)
        for layout in ("contiguous", "permuted [S, N, C, F]"):
            x = torch.empty(n, C, S, F, dtype=torch.bfloat16) if layout == "contiguous" else \
                torch.empty(S, n, C, F, dtype=torch.bfloat16).permute(1, 2, 0, 3)
            x.requires_grad_(True)
            packed = pk.gather_chunks(x, index, seqlens)
            packed.values.backward(torch.empty_like(packed.values))  # scatter of the gradient
            dense = pk.scatter_chunks(packed.values.detach().requires_grad_(True), packed)
            dense.backward(torch.empty_like(dense))  # gather of the gradient
    cases.append(("gather/scatter bf16 [N, C, 300, 4096] + backward", activations))
    return cases


def main() -> int:
    recorder = Recorder()
    for kernel in KERNELS:
        recorder.install(kernel)
    for module in (packing, phases, sampling):
        module.resolve_backend = lambda device: "triton"  # CPU tensors take the CUDA launch path
    for name, thunk in runtime_cases():
        recorder.case = name
        thunk()
    spills = []
    for entry in recorder.compiled.values():
        if "error" in entry:
            print(f"FAIL {entry['kernel']} cases={entry['cases']} {entry['error'][:500]}")
            continue
        usage = {k: entry[k] for k in ("regs", "spill_stores", "spill_loads", "stack", "cubin_regs", "cubin_local",
                                       "shared") if k in entry}
        vector = sorted(set(re.findall(r"ld\.global(?:\.\w+)*\.v(\d)\.b(\d+)", entry["ptx"])))
        print(f"ok {entry['kernel']} " + " ".join(f"{k}={v}" for k, v in usage.items())
              + f" vector_loads={['v%sx%s' % v for v in vector]} constexprs={entry['constexprs']} "
              f"div16={entry['divisible_by_16']} signature={entry['signature']} cases={sorted(set(entry['cases']))}")
        if entry["spill_stores"] or entry["spill_loads"]:
            spills.append(f"{entry['kernel']} ({sorted(set(entry['cases']))}): {entry['spill_stores']} bytes spill "
                          f"stores, {entry['spill_loads']} bytes spill loads")
    print(f"compiled {len(recorder.compiled)} specializations for sm_90 (triton {triton.__version__})")
    for failure in recorder.failures:
        print(f"compile failure: {failure}", file=sys.stderr)
    for spill in spills:
        print(f"register spill: {spill}", file=sys.stderr)
    return 1 if recorder.failures or spills else 0


if __name__ == "__main__":
    sys.exit(main())
