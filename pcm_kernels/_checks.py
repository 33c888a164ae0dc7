"""Argument checks shared by the public ops: clear errors naming the argument.

Every check runs before any kernel launch and is backend-independent, so a bad call
fails the same way on the torch and the Triton path. Type, rank, dtype and device
checks read only metadata; checks of tensor values (NaN scans, ranges) go through
``raise_failed`` so that all of one call's value checks share a single device->host
copy (one host synchronization on CUDA, none extra on the CPU).
"""
import math
import numbers
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

# (True where the check FAILS: a 0-dim bool tensor, or a bool when it was read for free on the CPU;
# builder of the error message)
ValueCheck = Tuple[Union[torch.Tensor, bool], Callable[[], str]]


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
    """All given tensors on one device; returns it (``None`` entries are skipped)."""
    present = {k: v for k, v in tensors.items() if v is not None}
    for k, v in present.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{k} must be a torch.Tensor, got {type(v).__name__}")
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device, got {where}")
    return next(iter(devices))


def check_int(name: str, value, *, minimum: Optional[int] = None, maximum: Optional[int] = None,
              why_maximum: str = "") -> int:
    """A Python or NumPy integer (not a bool, not a tensor) in ``[minimum, maximum]``; returns it as int.

    ``why_maximum`` is appended to the error for a value above ``maximum`` (what the cap protects)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}{why_maximum}")
    return value


def check_real(name: str, value) -> float:
    """A finite Python or NumPy real number (not a bool, not a tensor); returns it as float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite real number (int or float), got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def check_fraction(name: str, value) -> float:
    """A finite real number in [0, 1]; returns it as float."""
    value = check_real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_generator(generator, device: torch.device) -> None:
    """``None`` or a ``torch.Generator`` on the tensors' device type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"generator must be on the tensors' device type ({device.type}), "
                         f"got a {generator.device.type} generator")


def raise_failed(checks: List[ValueCheck]) -> None:
    """Raise ``ValueError`` for the first failing value check.

    All flags are copied to the host together: one synchronization on CUDA for every check of a
    call. The message builders run only on failure (they may read more values)."""
    if not checks:
        return
    pending = [bad.reshape(()) for bad, _ in checks if isinstance(bad, torch.Tensor)]
    read = iter(torch.stack(pending).tolist() if len(pending) > 1 else [bool(b) for b in pending])
    flags = [next(read) if isinstance(bad, torch.Tensor) else bad for bad, _ in checks]
    for failed, (_, message) in zip(flags, checks):
        if failed:
            raise ValueError(message())


def first_position(mask: torch.Tensor) -> Tuple[int, ...]:
    """Index of the first True element of ``mask`` (for error messages)."""
    return tuple(int(i) for i in torch.nonzero(mask)[0].tolist())


def range_check(name: str, value: torch.Tensor, low: int, high: int, described: str) -> ValueCheck:
    """Value check: every element of the integer tensor ``value`` in ``[low, high]``."""
    bad = ((value < low) | (value > high)).any()
    return bad, lambda: (f"{name} must be in [{low}, {high}] ({described}), got range "
                         f"[{int(value.min())}, {int(value.max())}]")


def nan_check(name: str, value: torch.Tensor, note: str = "") -> ValueCheck:
    """Value check: no NaN in the floating tensor ``value``."""
    def message() -> str:
        nan = torch.isnan(value)
        return (f"{name} must not contain NaN, found {int(nan.sum())} NaN value(s), the first at "
                f"{list(first_position(nan))}{note}")
    if value.numel() == 0:
        return False, message
    return value.amax().isnan(), message  # NaN propagates through the max: one reduction, no mask
