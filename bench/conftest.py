"""Benchmark helpers: each group has one or more baselines; the summary prints every baseline / candidate ratio."""
import pytest
import torch

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="Triton paths are timed on a GPU only (the CPU interpreter is not a speed reference)")
DEVICE = torch.device("cuda" if CUDA else "cpu")


def synced(fn):
    """Wrap ``fn`` so a CUDA timing includes the kernels it queued."""
    if not CUDA:
        return fn

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return out
    return run


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if not session or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group, []).append(bench)
    lines = []
    for group, benches in sorted(groups.items(), key=lambda kv: str(kv[0])):
        for base in [b for b in benches if b.extra_info.get("role") == "baseline"]:
            for b in benches:
                if b is base:
                    continue
                ratio = base.stats.median / b.stats.median
                line = (f"{group}: {b.name} median {b.stats.median * 1e6:,.1f} us, "
                        f"speed-up {ratio:.2f}x over {base.name} ({base.stats.median * 1e6:,.1f} us)")
                base_act, act = base.extra_info.get("activation_bytes"), b.extra_info.get("activation_bytes")
                if base_act and act:
                    line += f"; activation memory {act / 2**20:.1f} vs {base_act / 2**20:.1f} MiB ({(act - base_act) / base_act:+.0%})"
                if base.extra_info.get("chunks") and b.extra_info.get("chunks"):  # every chunk forwards the same tokens
                    line += f"; token ratio {base.extra_info['chunks'] / b.extra_info['chunks']:.2f}x (the ideal)"
                lines.append(line)
    if lines:
        terminalreporter.section(f"pcm ratios (device: {torch.cuda.get_device_name() if CUDA else 'CPU'})")
        for line in lines:
            terminalreporter.write_line(line)
