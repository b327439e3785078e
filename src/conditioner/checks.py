"""Argument checks, one place for the whole library.

Every check raises an error whose message starts with the argument's name and says what is
allowed and what was given: ``"NAME: must be ..., got VALUE"``. The optimizers validate their
hyperparameters through tables of :data:`Check` callables built here; functions check their
arguments by calling the ``check_*`` functions directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Check = Callable[[str, Any], None]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def check_range(
    name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False
) -> float:
    """``value`` as a float, or a ValueError unless it is a number in the stated interval."""
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    outside = not _is_number(value) or (value <= low if low_open else value < low)
    outside = outside or (value >= high if high_open else value > high)
    if outside:
        raise ValueError(f"{name}: must be a number in {left}{low}, {high}{right}, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a float, or a ValueError unless it is positive and finite."""
    if not _is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"{name}: must be a positive finite number, got {value!r}")
    return float(value)


def check_count(name: str, value: Any, minimum: int) -> int:
    """``value``, or a ValueError unless it is an integer (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> Any:
    """``value``, or a ValueError unless it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {allowed}, got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be True or False, got {value!r}")
    return value


def check_betas(name: str, betas: Any) -> None:
    """A pair ``(β1, β2)`` with ``β1`` in [0, 1) and ``β2`` in [0, 1]."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{name}: must be a pair (beta1, beta2), got {betas!r}")
    check_range(f"{name}[0]", betas[0], 0.0, 1.0, high_open=True)
    check_range(f"{name}[1]", betas[1], 0.0, 1.0)


def check_dtype(name: str, value: Any, allowed: tuple[torch.dtype, ...] | None = None, hint: str = "") -> None:
    """None or a floating-point ``torch.dtype``; with ``allowed``, None or one of those (``hint``,
    when given, says in the message what to use instead)."""
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise ValueError(f"{name}: must be None or a floating-point torch.dtype, got {value!r}")
    if allowed is not None and value is not None and value not in allowed:
        names = ", ".join(str(d) for d in allowed[:-1]) + f" or {allowed[-1]}"
        raise ValueError(f"{name}: must be None, {names}{hint}, got {value!r}")


def check_scalar(name: str, value: Any, check: Check) -> None:
    """``check`` on a number, or on the value of a 1-element tensor (torch.optim accepts a tensor
    ``lr``, which schedulers then update in place)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: Tensor {name} must be 1-element, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    check(name, value)


def check_real_tensor(name: str, value: Any) -> None:
    """A tensor of a real floating-point dtype: complex, integer and bool tensors are refused
    (other values are left to the caller)."""
    if isinstance(value, torch.Tensor) and not value.is_floating_point():
        raise ValueError(
            f"{name}: must be a real floating-point tensor (float16, bfloat16, float32 or float64), "
            f"got a {value.dtype} tensor of shape {tuple(value.shape)}"
        )


def in_range(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Check:
    return lambda name, value: check_range(name, value, low, high, low_open, high_open)


def count(minimum: int) -> Check:
    """An integer >= ``minimum``."""
    return lambda name, value: check_count(name, value, minimum)


def choice(*allowed: Any) -> Check:
    return lambda name, value: check_choice(name, value, allowed)


def dtypes(*allowed: torch.dtype, hint: str = "") -> Check:
    """None or one of the floating-point dtypes ``allowed``."""
    return lambda name, value: check_dtype(name, value, allowed, hint)


def scalar(check: Check) -> Check:
    """``check`` on a number or on a 1-element tensor's value."""
    return lambda name, value: check_scalar(name, value, check)


def optional(check: Check) -> Check:
    """``check``, or None."""
    return lambda name, value: None if value is None else check(name, value)


flag: Check = check_flag
