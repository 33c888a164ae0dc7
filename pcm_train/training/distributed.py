"""The old import path of ``pcm_train.runtime.distributed`` (data-parallel actor updates across torchrun
processes), kept for code that imports it from here."""
from pcm_train.runtime.distributed import (DistInfo, all_reduce_gradients, broadcast_batch, broadcast_object,
                                           init_distributed, tensors_to)

__all__ = ["DistInfo", "all_reduce_gradients", "broadcast_batch", "broadcast_object", "init_distributed",
           "tensors_to"]
