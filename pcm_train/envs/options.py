"""Constructor checks shared by the env families (``LiberoEnv``, ``MetaWorldEnv``)."""
from __future__ import annotations

import numpy as np


def check_env_options(*, image_size: int, render_size: int, max_steps: int, num_steps_wait: int,
                      center_crop: float) -> None:
    """ValueError naming the option when a size or step count is not a positive (``num_steps_wait``: a
    non-negative) integer, or ``center_crop`` is outside (0, 1]."""
    for name, value in (("image_size", image_size), ("render_size", render_size), ("max_steps", max_steps)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(num_steps_wait, (int, np.integer)) or num_steps_wait < 0:
        raise ValueError(f"num_steps_wait must be a non-negative integer, got {num_steps_wait!r}")
    if not 0.0 < center_crop <= 1.0:
        raise ValueError(f"center_crop must be in (0, 1], got {center_crop}")
