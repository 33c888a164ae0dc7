"""The SimpleVLA-RL / verl drop-in under its documented import path (``pcm_train.integrations.simplevla``)."""
from pcm_train.integrations.simplevla import OPENVLA_ACTION_TOKEN_START, pcm_shrink_batch

__all__ = ["OPENVLA_ACTION_TOKEN_START", "pcm_shrink_batch"]
