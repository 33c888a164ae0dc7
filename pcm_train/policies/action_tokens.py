"""Action token ids <-> continuous actions, as OpenVLA / OpenVLA-OFT decode them.

The action vocabulary is 256 consecutive token ids starting at ``action_token_start``
(31744 for OpenVLA's 32000-token Llama-2 vocabulary). Token ``id`` has bin
``r = id - action_token_start``; its normalized value is
``bin_centers()[clip(255 - r, 0, 254)]`` with ``bin_centers()`` the 255 midpoints of
``linspace(-1, 1, 256)``. See /work/shared/spec/LAYOUT.md ("Actions and the gripper").
"""
import torch

NUM_ACTION_BINS = 256


def bin_centers(device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Midpoints of ``linspace(-1, 1, 256)``: float tensor [255], increasing."""
    edges = torch.linspace(-1.0, 1.0, NUM_ACTION_BINS, dtype=torch.float64, device=device)
    return ((edges[:-1] + edges[1:]) / 2).to(dtype)


def _check_action_ids(token_ids: torch.Tensor, action_token_start: int) -> torch.Tensor:
    if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
        raise ValueError(f"token_ids must be an integer tensor, got {getattr(token_ids, 'dtype', type(token_ids))}")
    bins = token_ids.long() - action_token_start
    if bins.numel() and ((bins < 0) | (bins >= NUM_ACTION_BINS)).any():
        raise ValueError(
            f"token_ids must lie in the action vocabulary [{action_token_start}, "
            f"{action_token_start + NUM_ACTION_BINS}), got values in [{int(token_ids.min())}, {int(token_ids.max())}]"
        )
    return bins


def tokens_to_normalized(token_ids: torch.Tensor, action_token_start: int) -> torch.Tensor:
    """Action token ids (int tensor, any shape) -> normalized values in [-1, 1] (float32, same shape)."""
    bins = _check_action_ids(token_ids, action_token_start)
    centers = bin_centers(device=token_ids.device)
    return centers[(NUM_ACTION_BINS - 1 - bins).clamp(0, NUM_ACTION_BINS - 2)]


def normalized_to_tokens(values: torch.Tensor, action_token_start: int) -> torch.Tensor:
    """Normalized values (float tensor, any shape) -> int64 action token ids of the nearest bin center.

    Values outside [-1, 1] map to the extreme bins. Bin ``r = 0`` is never produced: it decodes to
    the same value as ``r = 1``.
    """
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise ValueError(f"values must be a floating-point tensor, got {getattr(values, 'dtype', type(values))}")
    centers = bin_centers(device=values.device, dtype=values.dtype)
    nearest = (values.unsqueeze(-1) - centers).abs().argmin(dim=-1)
    return action_token_start + (NUM_ACTION_BINS - 1 - nearest)


def unnormalize(actions: torch.Tensor, q01: torch.Tensor, q99: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Map normalized actions [..., D] back to dataset units where ``mask`` [D] (bool) is true.

    ``0.5 * (a + 1) * (q99 - q01 + 1e-8) + q01`` on masked dims; other dims pass through.
    ``q01``/``q99`` are float [D]. Returns a float tensor shaped like ``actions``.
    """
    if not isinstance(actions, torch.Tensor) or actions.dim() < 1 or not actions.is_floating_point():
        raise ValueError("actions must be a floating-point tensor [..., D]")
    dims = actions.shape[-1]
    for name, bound in (("q01", q01), ("q99", q99), ("mask", mask)):
        if not isinstance(bound, torch.Tensor) or tuple(bound.shape) != (dims,):
            raise ValueError(f"{name} must be a tensor of shape [D] = ({dims},), got {getattr(bound, 'shape', bound)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
    q01 = q01.to(actions)
    q99 = q99.to(actions)
    scaled = 0.5 * (actions + 1) * (q99 - q01 + 1e-8) + q01
    return torch.where(mask.to(actions.device), scaled, actions)


def gripper_to_env(raw: torch.Tensor) -> torch.Tensor:
    """Raw gripper value (float, any shape; model convention 1 = open, 0 = close) -> env command.

    ``-sign(2 * raw - 1)``: +1 = close, -1 = open (0 only for raw exactly 0.5, as in SimpleVLA-RL).
    Same shape and dtype as ``raw``.
    """
    if not isinstance(raw, torch.Tensor) or not raw.is_floating_point():
        raise ValueError(f"raw must be a floating-point tensor, got {getattr(raw, 'dtype', type(raw))}")
    return -torch.sign(2 * raw - 1)
