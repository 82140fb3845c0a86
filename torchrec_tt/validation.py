"""Argument checks shared across the package; every message names what is wrong.

* :func:`check_same_device`: the one-device rule of the ops' fake (meta) kernels, worded as the
  C++ entry points word it (``SameDeviceCheck`` in ``csrc/checks.h``).
* :func:`check_number`: a finite real number in a range (hyper-parameters, batch sizes, ...).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_number", "check_same_device"]


def check_same_device(op: str, tensors: Sequence[tuple[str, Tensor | None]]) -> None:
    """Raises ``RuntimeError`` unless every given tensor (``None`` skipped) is on the device of
    the first, listing each one that is not with its device."""
    present = [(name, t) for name, t in tensors if t is not None]
    if not present:
        return
    first_name, first = present[0]
    wrong = [f"{name} is on {t.device}" for name, t in present[1:] if t.device != first.device]
    if wrong:
        raise RuntimeError(
            f"{op}: all tensor arguments must be on one device, but {first_name} is on "
            f"{first.device} and {', '.join(wrong)}"
        )


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    where: str = "",
) -> float:
    """``value`` as a float after checking it is a real number (not a bool or a string), finite,
    an integer when ``integer``, and within ``[low, high]`` (``low_open`` / ``high_open`` exclude
    the ends). Raises ``ValueError`` naming ``name`` (prefixed by ``where``) and the value."""
    pre = f"{where}: " if where else ""
    kind = "an int" if integer else "a real number"
    if isinstance(value, Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()  # a one-element tensor (torch optimizers accept a tensor lr)
    if not isinstance(value, numbers.Integral if integer else numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{pre}{name} must be {kind}, got {value!r} ({type(value).__name__})")
    x = float(value)  # type: ignore[arg-type]
    if not math.isfinite(x):
        raise ValueError(f"{pre}{name} must be finite, got {value!r}")
    if low is not None and (x < low or (low_open and x == low)):
        raise ValueError(f"{pre}{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (x > high or (high_open and x == high)):
        raise ValueError(f"{pre}{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return x
