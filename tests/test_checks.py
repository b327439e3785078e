"""``conditioner.checks``: every refusal names the argument, says what is allowed and what was given."""

from __future__ import annotations

import math

import pytest
import torch

from conditioner.checks import (
    check_betas,
    check_choice,
    check_count,
    check_dtype,
    check_flag,
    check_positive,
    check_range,
    check_real_tensor,
    check_scalar,
    in_range,
    optional,
)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: check_range("lr", -1.0, 0.0), r"lr: must be a number in \[0.0, inf\], got -1.0"),
        (lambda: check_range("beta", 1.0, 0.0, 1.0, high_open=True), r"beta: must be a number in \[0.0, 1.0\), got 1.0"),
        (lambda: check_range("eps", math.nan, 0.0), "eps: must be a number"),
        (lambda: check_range("eps", True, 0.0), "eps: must be a number"),
        (lambda: check_positive("damping", 0.0), "damping: must be a positive finite number, got 0.0"),
        (lambda: check_positive("damping", math.inf), "damping: must be a positive finite number"),
        (lambda: check_count("steps", 0, 1), "steps: must be an integer >= 1, got 0"),
        (lambda: check_count("steps", 2.0, 1), "steps: must be an integer >= 1, got 2.0"),
        (lambda: check_count("steps", True, 0), "steps: must be an integer >= 0, got True"),
        (lambda: check_choice("method", "x", ("a", "b")), r"method: must be one of \('a', 'b'\), got 'x'"),
        (lambda: check_flag("nesterov", 1), "nesterov: must be True or False, got 1"),
        (lambda: check_betas("betas", (0.9,)), "betas: must be a pair"),
        (lambda: check_betas("betas", (1.0, 0.9)), r"betas\[0\]: must be a number in \[0.0, 1.0\)"),
        (lambda: check_dtype("state_dtype", torch.int32), "state_dtype: must be None or a floating-point"),
        (
            lambda: check_dtype("state_dtype", torch.float16, (torch.float32, torch.float64)),
            "state_dtype: must be None, torch.float32 or torch.float64, got torch.float16",
        ),
        (
            lambda: check_scalar("lr", torch.ones(2), in_range(0.0)),
            r"lr: Tensor lr must be 1-element, got a tensor of shape \(2,\)",
        ),
        (lambda: check_scalar("lr", torch.tensor(-1.0), in_range(0.0)), r"lr: must be a number in \[0.0, inf\]"),
        (
            lambda: check_real_tensor("params[2]", torch.zeros(2, 3, dtype=torch.complex64)),
            r"params\[2\]: must be a real floating-point tensor .*, got a torch.complex64 tensor of shape \(2, 3\)",
        ),
        (lambda: check_real_tensor("params[0]", torch.zeros(4, dtype=torch.bool)), r"params\[0\]: must be a real"),
    ],
)
def test_refusals_name_the_argument_and_what_is_allowed(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_accepted_values_come_back():
    assert check_range("lr", 1, 0.0) == 1.0 and isinstance(check_range("lr", 1, 0.0), float)
    assert check_positive("damping", 2) == 2.0
    assert check_count("steps", 3, 1) == 3
    assert check_choice("method", "a", ("a",)) == "a"
    optional(lambda name, value: check_count(name, value, 1))("k", None)
    check_betas("betas", (0.0, 1.0))
    check_dtype("state_dtype", None)
    check_dtype("state_dtype", torch.float64, (torch.float32, torch.float64))
    check_scalar("lr", torch.tensor([[0.5]]), in_range(0.0))
    check_scalar("lr", 0.5, in_range(0.0))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        check_real_tensor("params[0]", torch.zeros(2, dtype=dtype))
