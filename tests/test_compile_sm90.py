"""Every Triton kernel must compile for the H100/H200 (sm_90) as the runtime specializes it, without spills."""
import os
import re
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PCM_KERNELS_BACKEND")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = Path(__file__).with_name("aot_compile_sm90.py")
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    # exit status 1 on a compile failure or a register spill (stderr names the kernel and the call site)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    compiled = [line for line in result.stdout.splitlines() if line.startswith("ok ")]
    kernels = {line.split()[1] for line in compiled}
    assert kernels == {"label_phases_kernel", "sample_chunks_kernel", "select_chunks_kernel", "copy_chunks_kernel"}
    assert all(" spill_stores=0 spill_loads=0 " in line for line in compiled), result.stdout
    assert all(re.search(r" regs=\d+ ", line) for line in compiled), result.stdout
    # the runtime's 16-byte alignment/divisibility specialization: the bf16 activation gather and its
    # gradient scatter load 16-byte vectors (a hand-typed *bf16 signature compiled scalar 2-byte loads)
    wide = [line for line in compiled if "'src_ptr': '*bf16'" in line and "'BLOCK_F': 512" in line]
    assert len(wide) == 2 and all("v4x32" in line for line in wide), "\n".join(wide) or result.stdout
    # every call site (both sampling variants per dtype, shrink_batch, actor, activations) compiled
    assert len(compiled) >= 3 * (1 + 2) + 4 * 2 + 5, result.stdout
    # the race weights are computed in float64: float64 sample weights and the float64 keep probabilities
    assert sum("'weights_ptr': '*fp64'" in line for line in compiled) == 2, result.stdout
    assert all("'keep_ptr': '*fp64'" in line for line in compiled if line.startswith("ok select_chunks_kernel"))
