"""The device mechanism of conftest.py: every ``device`` test runs on the CPU and, where CUDA is
present, on CUDA; without CUDA its CUDA case is reported as skipped, with a reason, not as passed;
on CUDA, float32 runs without TF32 and the previous settings come back afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import EXACT_CUDA_FLAGS, full_float32_precision

CONFTEST = Path(__file__).with_name("conftest.py")


def test_a_device_test_has_a_cpu_case_and_a_visibly_skipped_or_run_cuda_case(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        test_probe="""
        def test_probe(device):
            assert device.type in ("cpu", "cuda")
        """
    )
    result = pytester.runpytest_inprocess("-v", "-rs", "-p", "no:cacheprovider")
    cuda = torch.cuda.is_available()
    result.assert_outcomes(passed=2 if cuda else 1, skipped=0 if cuda else 1)
    result.stdout.fnmatch_lines(["*test_probe[[]cpu[]] PASSED*"])
    result.stdout.fnmatch_lines(
        ["*test_probe[[]cuda[]] PASSED*" if cuda else "*test_probe[[]cuda[]] SKIPPED (no CUDA device)*"]
    )


def test_full_float32_precision_turns_tf32_off_and_restores_the_previous_flags() -> None:
    """The flags are plain settings, so this runs without a GPU too."""
    before = [getattr(owner, name) for owner, name, _ in EXACT_CUDA_FLAGS]
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with full_float32_precision():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        for (owner, name, _), value in zip(EXACT_CUDA_FLAGS, before, strict=True):
            setattr(owner, name, value)
