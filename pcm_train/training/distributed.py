"""The old import path of ``pcm_train.runtime.distributed`` (data-parallel actor updates across torchrun
processes), kept for code that imports it from here."""
from pcm_train.runtime.distributed import (DistInfo, all_reduce_gradients, any_rank, broadcast_batch,
                                           broadcast_object, gather_batch, gather_object, init_distributed,
                                           rank_share, tensors_to)

__all__ = ["DistInfo", "all_reduce_gradients", "any_rank", "broadcast_batch", "broadcast_object", "gather_batch",
           "gather_object", "init_distributed", "rank_share", "tensors_to"]
