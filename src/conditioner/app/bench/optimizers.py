"""The optimizers a benchmark can compare, by name, and what is measured about them.

Ours: ``adamw`` and ``sgd`` (torch), ``shampoo`` (Adam grafting), ``soap``, ``ecshampoo``
(eigenvalue-corrected Shampoo, fixed refresh every ``precondition_frequency`` steps) and
``ecshampoo-adaptive`` (the same with the adaptive, per-factor refresh); ``soap-bf16``,
``soap-4bit``, ``ecshampoo-bf16``, ``ecshampoo-4bit``, ``shampoo-bf16``, ``shampoo-4bit`` (the
same settings with ``state_precision`` bfloat16, or 4-bit on the 4-bit Shampoo paper's schedule) and ``muon`` (conditioner.Muon). Peers, from the optional
``bench`` extra, imported only when asked for: ``heavyball-soap``, ``heavyball-psgdkron``,
``heavyball-muon``, ``pto-soap``, ``pto-shampoo``.

Peer notes (heavyball 3.2.1, pytorch-optimizer 4.1.0):

- heavyball wraps every building block in ``torch.compile``. On 2 CPU cores the first steps then
  take tens of seconds to minutes (PSGDKron: 90 s for the first step of a 26k-parameter MLP, and
  650 ms per later step against 16 ms eagerly), so the bench turns compilation off by setting
  ``heavyball.utils.compile_mode = None``, the module switch its compiled wrappers check,
  unless ``heavyball_compile`` is asked for.
- ``heavyball.Muon`` orthogonalises only parameters with two or more dimensions; 1-D ones
  (biases, LayerNorm gains) get plain Nesterov momentum at Muon's learning rate.
  ``heavyball-muon`` is therefore ``heavyball.MuonAdamW``, heavyball's own routing of 2-D+
  parameters to Muon and 1-D ones to AdamW, as Muon is meant to be used.
- heavyball warns once when the learning rate of a group changes between steps (the schedule
  does that); it reads ``group["lr"]`` at every step, so the warning is silenced.
- ``pytorch_optimizer.Shampoo`` is the original Shampoo: sums of ``G Gᵀ`` (no EMA), no grafting,
  coupled weight decay; by default it recomputes its inverse roots by SVD at every step, the
  bench sets ``preconditioning_compute_steps`` like the others' refresh frequency.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

import conditioner

INSTALL_BENCH = 'pip install -c constraints.txt -e ".[bench]"'


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer: ``build(params, lr, **hyperparameters)``."""

    name: str
    description: str
    build: Callable[..., torch.optim.Optimizer]
    lr: float
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    package: str | None = None  # the import a peer needs; None for ours and torch's
    #: a low-precision variant's full-precision sibling, whose preset settings (rate) it takes
    sibling: str | None = None


def _tuples(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """JSON gives lists; constructors want tuples (betas)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in hyperparameters.items()}


def _heavyball(cls_name: str) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Iterable[torch.Tensor], lr: float, heavyball_compile: bool = False, **kw: Any) -> Any:
        heavyball = importlib.import_module("heavyball")
        utils = heavyball.utils
        if not hasattr(utils, "_conditioner_compile_mode"):
            utils._conditioner_compile_mode = utils.compile_mode  # the library's own value, kept to restore
        utils.compile_mode = utils._conditioner_compile_mode if heavyball_compile else None
        warnings.filterwarnings("ignore", message="Learning rate changed between steps", module="heavyball")
        return getattr(heavyball, cls_name)(params, lr=lr, **kw)

    return build


def _pto(cls_name: str) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Iterable[torch.Tensor], lr: float, **kw: Any) -> Any:
        return getattr(importlib.import_module("pytorch_optimizer"), cls_name)(params, lr=lr, **kw)

    return build


_SOAP_LIKE = dict(betas=(0.95, 0.95), weight_decay=0.01, precondition_frequency=10)
_SHAMPOO = dict(betas=(0.9, 0.999), weight_decay=0.01, precondition_frequency=10, grafting="adam")


def _precision_variants(
    name: str, description: str, build: Callable[..., torch.optim.Optimizer], hyperparameters: dict[str, Any], lr: float
) -> list[OptimizerSpec]:
    """``NAME-bf16``: the same optimizer and settings with bfloat16 state; ``NAME-4bit``: with
    4-bit state on the 4-bit Shampoo paper's schedule (statistics every 100 steps, bases or
    roots every 500: the optimizer's 4-bit defaults, so ``precondition_frequency`` is dropped)."""
    four_bit = {k: v for k, v in hyperparameters.items() if k != "precondition_frequency"}
    bf16 = dict(hyperparameters, state_precision="bfloat16")
    return [
        OptimizerSpec(f"{name}-bf16", f"{description}, bfloat16 state", build, lr, bf16, sibling=name),
        OptimizerSpec(
            f"{name}-4bit", f"{description}, 4-bit state, paper's schedule", build, lr, dict(four_bit, state_precision="4bit"), sibling=name
        ),
    ]


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in [
        OptimizerSpec("adamw", "torch.optim.AdamW", torch.optim.AdamW, 1e-3, dict(betas=(0.9, 0.999), weight_decay=0.01)),
        OptimizerSpec("sgd", "torch.optim.SGD, Nesterov momentum", torch.optim.SGD, 0.05, dict(momentum=0.9, nesterov=True)),
        OptimizerSpec(
            "shampoo",
            "conditioner.Shampoo, Adam grafting",
            conditioner.Shampoo,
            1e-3,
            dict(_SHAMPOO),
        ),
        OptimizerSpec("soap", "conditioner.SOAP", conditioner.SOAP, 3e-3, dict(_SOAP_LIKE)),
        OptimizerSpec(
            "ecshampoo",
            "conditioner.EigenvalueCorrectedShampoo, refresh every f steps",
            conditioner.EigenvalueCorrectedShampoo,
            3e-3,
            dict(_SOAP_LIKE, refresh="fixed"),
        ),
        OptimizerSpec(
            "ecshampoo-adaptive",
            "conditioner.EigenvalueCorrectedShampoo, adaptive refresh",
            conditioner.EigenvalueCorrectedShampoo,
            3e-3,
            dict(_SOAP_LIKE, refresh="adaptive", tolerance=0.3),
        ),
        *_precision_variants("soap", "conditioner.SOAP", conditioner.SOAP, dict(_SOAP_LIKE), 3e-3),
        *_precision_variants(
            "ecshampoo",
            "conditioner.EigenvalueCorrectedShampoo",
            conditioner.EigenvalueCorrectedShampoo,
            dict(_SOAP_LIKE, refresh="fixed"),
            3e-3,
        ),
        *_precision_variants(
            "shampoo",
            "conditioner.Shampoo, Adam grafting",
            conditioner.Shampoo,
            dict(_SHAMPOO),
            1e-3,
        ),
        OptimizerSpec(
            "muon",
            "conditioner.Muon (Newton-Schulz on matrices, AdamW on 1-D)",
            conditioner.Muon,
            0.02,
            dict(weight_decay=0.01),
        ),
        OptimizerSpec(
            "heavyball-soap",
            "heavyball.SOAP",
            _heavyball("SOAP"),
            3e-3,
            dict(_SOAP_LIKE, shampoo_beta=0.95),
            package="heavyball",
        ),
        OptimizerSpec(
            "heavyball-psgdkron", "heavyball.PSGDKron", _heavyball("PSGDKron"), 1e-3, dict(weight_decay=0.01), "heavyball"
        ),
        OptimizerSpec(
            "heavyball-muon",
            "heavyball.MuonAdamW (Muon on 2-D+, AdamW on 1-D)",
            _heavyball("MuonAdamW"),
            0.02,
            dict(weight_decay=0.01),
            package="heavyball",
        ),
        OptimizerSpec("pto-soap", "pytorch_optimizer.SOAP", _pto("SOAP"), 3e-3, dict(_SOAP_LIKE), "pytorch_optimizer"),
        OptimizerSpec(
            "pto-shampoo",
            "pytorch_optimizer.Shampoo",
            _pto("Shampoo"),
            1e-3,
            dict(preconditioning_compute_steps=10),
            package="pytorch_optimizer",
        ),
    ]
}

OURS = ("adamw", "sgd", "shampoo", "soap", "ecshampoo", "ecshampoo-adaptive")
#: ours too, left out of the presets' defaults: low-precision state and Muon (``conditioner bench
#: --optimizers memory`` runs them beside their full-precision siblings and heavyball's Muon)
MEMORY = ("soap", "soap-bf16", "soap-4bit", "ecshampoo", "ecshampoo-bf16", "ecshampoo-4bit", "muon", "heavyball-muon")
PEERS = tuple(name for name, spec in OPTIMIZERS.items() if spec.package is not None)


def unavailable_reason(name: str) -> str | None:
    """None if optimizer ``name`` can be built here, else a one-line reason with the fix."""
    spec = OPTIMIZERS[name]
    if spec.package is None:
        return None
    try:
        importlib.import_module(spec.package)
    except ImportError:
        return f"{name} needs the package {spec.package}, skipped; install it with: {INSTALL_BENCH}"
    return None


def build_optimizer(
    name: str, params: Iterable[torch.Tensor], lr: float, hyperparameters: dict[str, Any] | None = None, **options: Any
) -> torch.optim.Optimizer:
    """Optimizer ``name`` over ``params`` with learning rate ``lr``; ``hyperparameters`` replace the
    registry's defaults key by key. ``options`` (``heavyball_compile``) reach only heavyball."""
    spec = OPTIMIZERS[name]
    merged = _tuples({**spec.hyperparameters, **(hyperparameters or {})})
    if spec.package == "heavyball":
        merged.update(options)
    return spec.build(list(params), lr=lr, **merged)


def refreshes(optimizer: torch.optim.Optimizer) -> int | None:
    """Eigenbasis (or inverse-root) refreshes so far, or None for optimizers that do not count them."""
    total = getattr(optimizer, "total_refreshes", None)
    return int(total()) if callable(total) else None
