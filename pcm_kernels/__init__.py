"""pcm_kernels: fused kernels for Probabilistic Chunk Masking.

Phase labels from the gripper signal, success/failure phase scores, budgeted
chunk sampling without replacement, and varlen gather/scatter of the kept
chunks. CUDA tensors run Triton kernels, CPU tensors a vectorized torch path
(``PCM_KERNELS_BACKEND=torch|triton|auto`` overrides).
"""
from .packing import PackedChunks, gather_chunks, plan_chunks, scatter_chunks
from .phases import PAD, Phase, label_phases, phase_scores
from .sampling import sample_chunks, select_chunks

__all__ = [
    "PAD", "Phase", "label_phases", "phase_scores", "sample_chunks", "select_chunks",
    "PackedChunks", "gather_chunks", "plan_chunks", "scatter_chunks",
]
