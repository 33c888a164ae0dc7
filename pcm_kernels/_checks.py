"""Argument checks shared by the public ops: clear errors naming the argument."""
from typing import Optional, Sequence

import torch


def check_tensor(name: str, value, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 floating: bool = False, integer: bool = False, boolean: bool = False) -> torch.Tensor:
    """Type, rank and dtype-kind check; returns ``value`` unchanged."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if boolean and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {value.dtype}")
    return value


def check_shape(name: str, value: torch.Tensor, expected: Sequence[int], described: str) -> None:
    """Exact shape check; ``described`` says what the dimensions are, e.g. ``"[N, C]"``."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {described} = {tuple(expected)}, got {tuple(value.shape)}")


def check_same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors on one device; returns it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device, got {where}")
    return next(iter(devices))


def check_int(name: str, value, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_fraction(name: str, value) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value
