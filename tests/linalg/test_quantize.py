"""4-bit block quantisation: error bounds from the code book, byte counts, Björck rectification, and
that a dequantised eigenbasis still (nearly) diagonalises its matrix."""

from __future__ import annotations

import pytest
import torch

from conditioner.linalg import dense_staleness, staleness
from conditioner.linalg.quantize import (
    BLOCK,
    CODE_BOOK,
    MAX_RELATIVE_ERROR,
    dequantize,
    dequantize_basis,
    quantize,
    quantized_bytes,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _orthogonal(batch: int, d: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(batch, d, d, generator=generator, dtype=torch.float64)).Q.float()


def test_code_book_is_signed_linear_square_with_sixteen_levels():
    assert CODE_BOOK.shape == (16,)
    assert torch.all(CODE_BOOK[1:] > CODE_BOOK[:-1])
    assert torch.allclose(CODE_BOOK, -CODE_BOOK.flip(0))
    assert CODE_BOOK[0] == -1 and CODE_BOOK[-1] == 1
    # the widest gap is the outermost, 1 − (13/15)²; nearest rounding is off by half of it
    assert MAX_RELATIVE_ERROR == pytest.approx((1 - (13 / 15) ** 2) / 2, rel=1e-6)


def test_round_trip_error_is_within_half_the_widest_code_gap_times_the_block_maximum():
    # d = 64: each row is exactly one block of 64 values, so the block maximum is the row maximum.
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 2, 64)[:, None]
    error = (dequantize(quantize(x)) - x).abs()
    bound = MAX_RELATIVE_ERROR * x.abs().amax(-1, keepdim=True)
    assert torch.all(error <= bound * (1 + 1e-6))
    # not vacuous: the worst error is a sizeable fraction of the bound
    assert (error / bound).max() > 0.5


@pytest.mark.parametrize("d", [1, 7, 65, 100])
def test_round_trip_keeps_shape_and_bound_for_any_size(d):
    x = torch.randn(2, d, d, generator=torch.Generator().manual_seed(d))
    y = dequantize(quantize(x))
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.all((y - x).abs() <= MAX_RELATIVE_ERROR * x.abs().amax((-2, -1), keepdim=True) * (1 + 1e-6))


def test_code_book_levels_times_the_scale_round_trip_exactly():
    levels = CODE_BOOK[torch.arange(BLOCK) % 16]
    x = (levels * 0.5).reshape(1, 8, 8)
    assert torch.equal(dequantize(quantize(x)), x)


def test_zero_matrix_round_trips_to_zero():
    assert torch.equal(dequantize(quantize(torch.zeros(2, 70, 70))), torch.zeros(2, 70, 70))


@pytest.mark.parametrize("d", [64, 65, 100])
def test_packed_size_is_half_a_byte_per_value_plus_a_float32_scale_per_block(d):
    q = quantize(torch.randn(3, d, d))
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == torch.float32
    assert q.codes.numel() + 4 * q.scales.numel() == quantized_bytes(3, d)
    assert quantized_bytes(1, 64) == 64 * 64 // 2 + 4 * 64


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="square"):
        quantize(torch.randn(3, 4))


def test_bjorck_rectification_restores_orthogonality():
    q = _orthogonal(4, 128)
    raw = dequantize(quantize(q))
    eye = torch.eye(128)

    def defect(v):
        return torch.linalg.matrix_norm(v.mT @ v - eye, ord=2).max()

    # 4-bit rounding leaves a dense basis far from orthogonal (‖VᵀV − I‖₂ ≈ 0.3); each Björck step
    # squares the defect (≈ 0.07, then ≈ 4e-3, then ≈ 1e-5 at float32 round-off)
    assert defect(raw) > 0.2
    assert defect(dequantize_basis(quantize(q), steps=1)) < 0.1
    assert defect(dequantize_basis(quantize(q))) < 1e-2
    assert defect(dequantize_basis(quantize(q), steps=3)) < 1e-4


def test_a_4bit_eigenbasis_still_diagonalises_its_matrix():
    # A dense eigenbasis is the worst case for block quantisation (no structure, entries spread
    # evenly); the rotated matrix VᵀFV keeps about 10% off-diagonal mass against ≈ 90% for a basis
    # unrelated to F, and the relative error of V (≈ 7.6% in Frobenius norm) bounds it.
    q = _orthogonal(4, 128, seed=3)
    spectrum = 0.9 ** torch.arange(128, dtype=torch.float32)
    factor = (q * spectrum) @ q.mT
    v = dequantize_basis(quantize(q))
    rho = staleness(factor, v).rho
    assert torch.all(rho < 0.15)
    # the cheap ρ takes ‖VᵀFV‖ = ‖F‖, true up to the basis' orthogonality defect (≈ 4e-3)
    assert torch.allclose(rho, dense_staleness(factor, v), atol=1e-2)
    unrelated = staleness(factor, _orthogonal(4, 128, seed=4)).rho
    assert torch.all(unrelated > 0.8)
    # the eigenvalues read off the 4-bit basis are those of F to a few per cent of the largest
    estimated = torch.diagonal(v.mT @ factor @ v, dim1=-2, dim2=-1)
    assert (estimated - spectrum).abs().max() < 0.05
