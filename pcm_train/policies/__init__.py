"""Policies trained by pcm_train."""
from pcm_train.policies.small_vla import SmallVLA, SmallVLAConfig

__all__ = ["SmallVLA", "SmallVLAConfig"]
