"""The old import path of ``pcm_train.runtime.memory`` (memory measurements on the CPU and on CUDA), kept
for code that imports it from here."""
from pcm_train.runtime.memory import SavedActivations, peak_memory_bytes, reset_peak_memory

__all__ = ["SavedActivations", "peak_memory_bytes", "reset_peak_memory"]
