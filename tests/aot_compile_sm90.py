"""Compile every pcm_kernels Triton kernel ahead of time for the H100 (sm_90), no GPU needed.

Run in a process without TRITON_INTERPRET (the interpreter replaces the kernels
at decoration time). Shapes are the trainer's: N = 80, C = 64, L = 8, B = 12,
gather of S = 300 tokens x 4096 features and of 56 action tokens per chunk.
Prints one line per compiled kernel and exits non-zero on the first failure.
"""
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pcm_kernels.packing.kernels import copy_chunks_kernel, tile_sizes
from pcm_kernels.phases.kernels import block_sizes, label_phases_kernel
from pcm_kernels.sampling.kernels import _block_b, sample_chunks_kernel, select_chunks_kernel

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
           torch.uint8: "*u8", torch.int8: "*i8"}
LABEL_SCALARS = {"close_above": "fp32", "sustain": "fp32", "grip": "fp32", "low": "fp32", "window": "i32"}


def compile_kernel(kernel, signature, constexprs):
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=TARGET)
    assert compiled.asm["cubin"], kernel.__name__
    print(f"ok {kernel.__name__} {constexprs} {signature}")


def main():
    C, L, B = 64, 8, 12
    block_c, block_l = block_sizes(C, L)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        compile_kernel(label_phases_kernel, {
            "grip_ptr": POINTER[dtype], "num_steps_ptr": "*i64", "labels_ptr": "*i8", "C": "i32", "L": "i32",
            "stride_n": "i32", "stride_c": "i32", "stride_l": "i32", **LABEL_SCALARS,
        }, {"BLOCK_C": block_c, "BLOCK_L": block_l})
        for with_weights in (False, True):
            # without weights the launchers pass ht_ptr=None, which Triton specializes as a constexpr
            ht = {"ht_ptr": "*fp32"} if with_weights else {}
            ht_none = {} if with_weights else {"ht_ptr": None}
            compile_kernel(sample_chunks_kernel, {
                "weights_ptr": POINTER[dtype], "num_chunks_ptr": "*i64", "seed_ptr": "*i64", "index_ptr": "*i64",
                **ht, "C": "i32", "budget": "i32", "stride_n": "i32", "stride_c": "i32",
            }, {**ht_none, "BLOCK_C": block_c, "BLOCK_B": _block_b(B), "WITH_WEIGHTS": with_weights})
            compile_kernel(select_chunks_kernel, {
                "grip_ptr": POINTER[dtype], "num_steps_ptr": "*i64", "keep_ptr": "*fp32", "seed_ptr": "*i64",
                "labels_ptr": "*i8", "index_ptr": "*i64", **ht, "C": "i32", "L": "i32", "budget": "i32",
                "stride_n": "i32", "stride_c": "i32", "stride_l": "i32", **LABEL_SCALARS,
            }, {**ht_none, "BLOCK_C": block_c, "BLOCK_L": block_l, "BLOCK_B": _block_b(B),
                "WITH_WEIGHTS": with_weights})
    for dtype, seq_len, features in ((torch.bfloat16, 300, 4096), (torch.float32, 300, 4096),
                                     (torch.int64, 56, 1), (torch.float32, 56, 1), (torch.uint8, 300, 1)):
        block_s, block_f = tile_sizes(seq_len, features)
        for scatter in (False, True):
            compile_kernel(copy_chunks_kernel, {
                "src_ptr": POINTER[dtype], "dst_ptr": POINTER[dtype], "chunk_ids_ptr": "*i64", "slot_ptr": "*i64",
                "cu_ptr": "*i32", "C": "i32", "S": "i32", "F": "i32",
                "stride_n": "i64", "stride_c": "i64", "stride_s": "i64", "stride_f": "i64",
            }, {"SCATTER": scatter, "BLOCK_S": block_s, "BLOCK_F": block_f})
    return 0


if __name__ == "__main__":
    sys.exit(main())
