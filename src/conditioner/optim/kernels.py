"""The per-stack math of an ordinary step, as pure tensor functions.

Each kernel takes tensors and returns new tensors (it modifies none of its inputs), so that it can
run eagerly or be compiled whole by ``torch.compile`` (:mod:`conditioner.optim.compiled`). Two
kinds of hyperparameters reach it: keyword options that fix the computation (the stack's
preconditioned dims, flags; a compiled kernel is specialised on them), and ``scalars``, numbers
that may change from step to step (step sizes of moving averages under a scheduler, bias
corrections, ε): as they are when run eagerly, packed in one tensor when compiled, so that a new
value is new data for the same graph. A scalar is a number or, for the bias corrections under the
on-device non-finite policy, a per-block tensor ``(B, 1, ...)``; every operation on the scalars
broadcasts. The callers derive the scalars on the host (``1 − β`` included), which keeps the eager
and compiled arithmetic the same; run eagerly, a kernel does the arithmetic of the optimizers'
former inline code operation for operation, so ``compile_kernels=False`` changes no result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from conditioner.linalg import newton_schulz
from conditioner.optim.kronecker import apply_along, block_norms, project, project_back

#: one scalar per entry: numbers or per-block tensors (eager), or one packed tensor (compiled)
Scalars = Sequence[Any]


def adam_in_basis(
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor | None,
    bases: Sequence[torch.Tensor],
    scalars: Scalars,
    *,
    dims: tuple[int, ...],
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adam's moments and direction in the Kronecker eigenbasis ``bases`` (one per dim of ``dims``;
    none: plain Adam): the ordinary step of SOAP and eigenvalue-corrected Shampoo.

    ``scalars = (1 − β1, β2, 1 − β2, ε)``: ``m ← lerp(m, Ĝ, 1 − β1)``, ``v ← β2·v + (1 − β2)·Ĝ²``
    for ``Ĝ = G ×_i Q_iᵀ``, direction ``(m / (sqrt(v) + ε)) ×_i Q_i``; ``normalize`` scales each
    block's direction to unit RMS (the SOAP reference's ``normalize_grads``). Moments None: a first
    step from zero moments. Returns ``(m, v, direction)``.
    """
    weight1, keep2, weight2, eps = scalars
    basis_of = dict(zip(dims, bases))
    projected = project(grad, basis_of)
    exp_avg = projected * weight1 if exp_avg is None else torch.lerp(exp_avg, projected, weight1)
    scaled = projected * weight2
    exp_avg_sq = scaled * projected if exp_avg_sq is None else torch.addcmul(exp_avg_sq * keep2, scaled, projected)
    direction = project_back(exp_avg / (exp_avg_sq.sqrt() + eps), basis_of)
    if normalize:
        rms = direction.square().mean(dim=tuple(range(1, direction.ndim)), keepdim=True).sqrt()
        direction = direction / (rms + 1e-30)
    return exp_avg, exp_avg_sq, direction


def shampoo_direction(
    grad: torch.Tensor,
    exp_avg: torch.Tensor | None,
    graft_sq: torch.Tensor | None,
    roots: Sequence[torch.Tensor],
    scalars: Scalars,
    *,
    dims: tuple[int, ...],
    nesterov: bool,
    grafting: str,
    precondition: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Shampoo's momentum, grafted direction and preconditioned direction for one stack.

    ``scalars = (1 − β1, c1, κ, ω, c2, ε_graft)``: momentum ``m ← lerp(m, G, 1 − β1)`` (``exp_avg``
    None: no momentum, the gradient is used), divided by its bias correction ``c1`` (Nesterov: the
    look-ahead ``lerp(m, G, 1 − β1)``); the grafted method's second moment
    ``s ← κ·s + ω·G²`` (AdaGrad: ``s ← s + G²``; ``graft_sq`` None: SGD, unit scaling) and its direction
    ``M / (sqrt(s / c2) + ε_graft)``. With ``precondition``, the direction is ``M ×_i P_i`` for the
    inverse ``roots`` along ``dims``, scaled per block to the
    grafted direction's norm unless ``grafting`` is ``"none"``; otherwise it is the grafted
    direction. Returns ``(m, s, direction)``.
    """
    weight1, correction1, keep, weight, correction2, graft_eps = scalars
    momentum = grad
    if exp_avg is not None:
        exp_avg = torch.lerp(exp_avg, grad, weight1)
        momentum = (torch.lerp(exp_avg, grad, weight1) if nesterov else exp_avg) / correction1
    graft = momentum
    if graft_sq is not None:
        if grafting == "adagrad":  # a running sum: G² rounded, then added (addcmul would fuse them)
            graft_sq = graft_sq + grad * grad
        else:
            graft_sq = torch.addcmul(graft_sq * keep, grad * weight, grad)
        graft = momentum / ((graft_sq / correction2).sqrt() + graft_eps)
    if not precondition:
        return exp_avg, graft_sq, graft
    direction = momentum
    for d, root in zip(dims, roots):
        direction = apply_along(direction, root, d)
    if grafting != "none":
        norm = block_norms(direction)
        direction = direction * torch.where(norm > 0, block_norms(graft) / norm.clamp_min(1e-30), 0.0)
    return exp_avg, graft_sq, direction


def muon_direction(
    grad: torch.Tensor,
    momentum: torch.Tensor | None,
    scalars: Scalars,
    *,
    nesterov: bool,
    ns_steps: int,
    ns_coefficients: tuple[float, float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Muon's momentum and orthogonalised direction for a stack of matrices.

    ``scalars = (1 − β, β)``: ``m ← lerp(m, G, 1 − β)``; the direction is the Newton–Schulz polar
    factor of ``m``, or with ``nesterov`` of ``lerp(G, m, β)``; ``momentum`` None: from zero.
    Returns ``(m, direction)``.
    """
    weight, beta = scalars
    momentum = grad * weight if momentum is None else torch.lerp(momentum, grad, weight)
    direction = torch.lerp(grad, momentum, beta) if nesterov else momentum
    return momentum, newton_schulz(direction, ns_steps, ns_coefficients)


__all__ = ["Scalars", "adam_in_basis", "muon_direction", "shampoo_direction"]
