"""Curvature read from a trained optimizer's own state: no pass over the data after training.

SOAP and eigenvalue-corrected Shampoo keep, for every block of a parameter, the eigenbases
``Q_i`` of Shampoo's Kronecker factors (``F_i = EMA(G_(i) G_(i)ᵀ)``) and the second moment of the
gradient in those bases, ``D = EMA((G ×_i Q_iᵀ)²)`` — the eigenvalue-corrected Kronecker
approximation EK-FAC builds with a pass over the data, here of the mini-batch gradients of
training. :class:`OptimizerCurvature` turns that state into the operator ``Q diag(D̂) Qᵀ`` per block
(``D̂`` bias-corrected; blocks without factors are diagonal), so that influence can use it as it
uses EK-FAC (docs/algorithms.md §8). Its scale is that of squared mini-batch-mean gradients, not of
the GGN of the training loss: a damping is best stated relative to its own :attr:`mean_eigenvalue`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from conditioner.optim.eigen_adam import EigenAdam
from conditioner.optim.kronecker import project, project_back


class OptimizerCurvature:
    """``Q diag(D̂) Qᵀ`` of a SOAP or EigenvalueCorrectedShampoo state over ``params`` (flat, in their order).

    ``params`` must all have been stepped by ``optimizer`` (full-precision state, not sharded);
    vectors are ``(P, K)`` with ``P`` the total size of ``params`` in that order.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> None:
        if not isinstance(optimizer, EigenAdam):
            raise TypeError(
                f"optimizer: must be SOAP or EigenvalueCorrectedShampoo (they keep D in a Kronecker eigenbasis), "
                f"got {type(optimizer).__name__}"
            )
        if getattr(optimizer, "sharding", None) is not None:
            raise ValueError("optimizer: its state is sharded over ranks; gather it with checkpoint.save/load first")
        self.params = list(params)
        # per parameter, in order: (its blocks: (view region, bases by dim, bias-corrected D))
        self.blocks: list[list[tuple[tuple[int, ...], tuple[slice, ...], dict[int, torch.Tensor], torch.Tensor]]] = []
        found = {id(p): [] for p in self.params}
        for group_index, group in enumerate(optimizer.param_groups):
            if group.get("state_precision", "full") != "full":
                raise ValueError(f"optimizer: param group {group_index} stores its state in "
                                 f"{group['state_precision']!r}; build it with state_precision='full'")
            beta2 = group["betas"][1]
            for stack in optimizer.layout(group_index):
                state = optimizer.state.get(optimizer.stack_key(group_index, stack))
                if not state or "exp_avg_sq" not in state:
                    continue
                for row, block in enumerate(stack.blocks):
                    p = group["params"][block.param_index]
                    if id(p) not in found:
                        continue
                    if block.dim_order is not None:
                        raise ValueError("optimizer: blocks read in another dimension order (data_format) are not supported")
                    # SOAP's first step only initialises: D has one update fewer than steps taken
                    updates = state["step"][row] - (0 if group.get("update_first_step", True) else 1)
                    correction = 1.0 - beta2**updates if group.get("correct_bias", True) and updates > 0 else 1.0
                    bases = {d: state[f"basis{d}"][row] for d in stack.preconditioned_dims}
                    corrected = state["exp_avg_sq"][row] / correction
                    found[id(p)].append((block.view_shape, block.index, bases, corrected))
        missing = [i for i, p in enumerate(self.params) if not found[id(p)]]
        if missing:
            raise ValueError(f"params: entries {missing} have no state in optimizer (never stepped, or not its parameters)")
        self.blocks = [found[id(p)] for p in self.params]
        self.dim = sum(p.numel() for p in self.params)
        total = sum(float(d.sum()) for blocks in self.blocks for *_, d in blocks)
        self.mean_eigenvalue = total / self.dim

    def inverse_matmat(self, vectors: torch.Tensor, damping: float) -> torch.Tensor:
        """``(Q diag(D̂) Qᵀ + damping·I)⁻¹ vectors`` for ``vectors`` of shape ``(P, K)``, in their dtype."""
        if vectors.ndim != 2 or vectors.shape[0] != self.dim:
            raise ValueError(f"vectors: expected shape ({self.dim}, K), got {tuple(vectors.shape)}")
        result = torch.empty_like(vectors)
        start = 0
        for p, blocks in zip(self.params, self.blocks):
            size = p.numel()
            columns = vectors[start : start + size].T.reshape(vectors.shape[1], *p.shape)
            out = torch.empty_like(columns)
            for view_shape, index, bases, corrected in blocks:
                shaped = columns.reshape(vectors.shape[1], *view_shape)[(slice(None), *index)]
                # the K columns stand where a stack's blocks do, all in this block's bases
                q = {d: basis.to(vectors.dtype).unsqueeze(0) for d, basis in bases.items()}
                inverse = project_back(project(shaped, q) / (corrected.to(vectors.dtype) + damping), q)
                out.reshape(vectors.shape[1], *view_shape)[(slice(None), *index)] = inverse
            result[start : start + size] = out.reshape(vectors.shape[1], size).T
            start += size
        return result
