"""Curvature against curvlinops (K-FAC / EK-FAC) and PyHessian (top eigenvalue, trace), on real Fashion-MNIST.

Part ``kfac``:

Both libraries get the same model (float32, fixed initialisation), the same batches of real
images and the same curvature definition: the exact GGN expectation ("type-2" in curvlinops,
``fisher_type="exact"`` here), "expand" weight sharing, weight and bias in one Kronecker block.
Before anything is timed the two results are checked equal: the dense-free check compares the
operators' products with the same random vectors (relative error of the products; float32 sums
in different order agree to ~1e-5). Then each build (factors, eigendecompositions, and for
EK-FAC the eigenvalue correction) and each product is timed ``--repeats`` times, alternating the
libraries, and the medians are reported with their ratio (ours / theirs).

Part ``pyhessian``: ``pyhessian.hessian(model, criterion, dataloader=data, cuda=False)`` against
our exact :class:`~conditioner.curvature.Hessian` of the same loss. PyHessian's products sum each
batch's Hessian-vector product weighted by batch size / total, i.e. the Hessian of the mean
``nn.CrossEntropyLoss`` over all examples; ours, built with the same ``nn.CrossEntropyLoss()``
(mean), scales by 1 / rows: the same matrix. Checked before timing: one product agrees to float32
rounding; the top eigenvalue of PyHessian's power iteration (``eigenvalues(top_n=1)``, tol 1e-3
on consecutive Rayleigh quotients) and of our ``lanczos(k=1)`` agree within ``--eig-rtol``; the
Hutchinson traces (``trace(maxIter=n, tol=-inf)``: exactly ``n`` Rademacher probes, against our
``hutchinson_trace(probes=n)``, all ``n`` in one pass by default) agree within 4 standard errors
of their difference. Our Lanczos runs to ``--lanczos-tol`` (default 1e-3) relative residual,
which guarantees an eigenvalue within 1e-3 relative: what PyHessian's tol promises; the check
compares it with PyHessian run to tol 1e-6, since PyHessian's default stop can be 2e-3 short. Products used
by each method are counted. Timings: medians of ``--repeats`` runs, alternating the libraries,
after one untimed warm-up run of each.

Usage: python benchmarks/curvature.py [--parts kfac pyhessian] [--threads 1] [--examples 2048]
                                      [--batch-size 256] [--repeats 5] [--models mlp cnn]
                                      [--pyhessian-models mlp] [--probes 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pyhessian
import torch
from curvlinops import EKFACLinearOperator, KFACLinearOperator
from torch import nn

from conditioner.app.models import MLP, SmallCNN
from conditioner.curvature import EKFAC, KFAC, Hessian
from conditioner.curvature.spectra import hutchinson_trace, lanczos
from conditioner.app.data import load_dataset


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def time_alternately(
    ours: Callable[[int], tuple], theirs: Callable[[int], tuple], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Seconds and product counts (each call's last result) of ``ours(seed)`` and ``theirs(seed)``,
    alternating, for seeds 1..repeats."""
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    steps: dict[str, list[int]] = {"ours": [], "theirs": []}
    for seed in range(1, repeats + 1):
        for side, function in (("ours", ours), ("theirs", theirs)):
            seconds, result = timed(partial(function, seed))
            times[side].append(seconds)
            steps[side].append(result[-1])
    return times, steps


def build_ours(kind: str, model: nn.Module, data: list) -> Any:
    operator_type = KFAC if kind == "kfac" else EKFAC
    return operator_type(model, nn.CrossEntropyLoss(), data, fisher_type="exact", weight_sharing="expand")


def build_theirs(kind: str, model: nn.Module, data: list) -> Any:
    operator_type = KFACLinearOperator if kind == "kfac" else EKFACLinearOperator
    operator = operator_type(
        model,
        nn.CrossEntropyLoss(),
        [p for p in model.parameters() if p.requires_grad],
        data,
        fisher_type="type-2",
        kfac_approx="expand",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    operator.compute_kronecker_factors()
    if kind == "ekfac":
        operator.compute_eigenvalue_correction()
    return operator


def product_ours(operator: Any, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    return operator @ vectors


def product_theirs(operator: Any, vectors: list[torch.Tensor]) -> list[torch.Tensor]:
    return operator @ vectors


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    flat_a = torch.cat([t.flatten() for t in a])
    flat_b = torch.cat([t.flatten() for t in b])
    return float(torch.linalg.norm(flat_a - flat_b) / torch.linalg.norm(flat_b))


def compare(name: str, model: nn.Module, data: list, repeats: int) -> list[dict[str, Any]]:
    rows = []
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(p.shape, generator=generator) for p in params]
    for kind in ("kfac", "ekfac"):
        build_times: dict[str, list[float]] = {"ours": [], "theirs": []}
        product_times: dict[str, list[float]] = {"ours": [], "theirs": []}
        operators: dict[str, Any] = {}
        for _ in range(repeats):
            for side, build in (("ours", build_ours), ("theirs", build_theirs)):
                seconds, operators[side] = timed(lambda build=build, kind=kind: build(kind, model, data))
                build_times[side].append(seconds)
        difference = relative_difference(
            product_ours(operators["ours"], vectors), product_theirs(operators["theirs"], vectors)
        )
        if difference > 1e-4:
            raise AssertionError(
                f"{name} {kind}: products differ by {difference:.2e} relative; not timing unequal results"
            )
        for _ in range(repeats * 4):
            for side, product in (("ours", product_ours), ("theirs", product_theirs)):
                seconds, _ = timed(lambda product=product, operator=operators[side]: product(operator, vectors))
                product_times[side].append(seconds)
        for what, times in (("build", build_times), ("product", product_times)):
            ours, theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
            rows.append(
                {
                    "model": name,
                    "operator": kind,
                    "what": what,
                    "ours_s": ours,
                    "curvlinops_s": theirs,
                    "ratio": ours / theirs,
                    "relative_difference": difference,
                }
            )
            print(
                f"{name:4} {kind:6} {what:8} ours {ours * 1e3:9.2f} ms  curvlinops {theirs * 1e3:9.2f} ms  ratio {ours / theirs:5.2f}  (products agree to {difference:.1e})"
            )
    return rows


class CountingHessian:
    """PyHessian's ``hessian`` with its per-product pass over the data counted."""

    def __init__(self, model: nn.Module, data: list) -> None:
        self.inner = pyhessian.hessian(model, nn.CrossEntropyLoss(), dataloader=data, cuda=False)
        self.products = 0
        product = self.inner.dataloader_hv_product

        def counted(v: list[torch.Tensor]) -> Any:
            self.products += 1
            return product(v)

        self.inner.dataloader_hv_product = counted


def top_eigenvalue_ours(operator: Hessian, seed: int, tol: float | None) -> tuple[float, int]:
    result = lanczos(operator, k=1, tol=tol, generator=torch.Generator().manual_seed(seed))
    return float(result.eigenvalues[0]), result.steps


def top_eigenvalue_theirs(model: nn.Module, data: list, seed: int, tol: float = 1e-3) -> tuple[float, int]:
    torch.manual_seed(seed)  # PyHessian draws its start vector from the global generator
    counting = CountingHessian(model, data)
    eigenvalues, _ = counting.inner.eigenvalues(top_n=1, tol=tol)
    return float(eigenvalues[0]), counting.products


def trace_ours(operator: Hessian, probes: int, seed: int, chunk: int) -> tuple[float, float, int]:
    estimate = hutchinson_trace(operator, probes=probes, generator=torch.Generator().manual_seed(seed), chunk=chunk)
    return estimate.estimate, estimate.standard_error, math.ceil(probes / chunk)


def trace_theirs(model: nn.Module, data: list, probes: int, seed: int) -> tuple[float, float, int]:
    torch.manual_seed(seed)
    counting = CountingHessian(model, data)
    # Its stopping test, |mean - previous| / (previous + 1e-6) < tol, is also true for any tol >= 0
    # once the running mean is negative (a Hessian's trace near zero): only -inf forces every probe.
    samples = torch.tensor(counting.inner.trace(maxIter=probes, tol=-math.inf), dtype=torch.float64)
    return float(samples.mean()), float(samples.std() / math.sqrt(samples.numel())), counting.products


def compare_pyhessian(
    name: str,
    model: nn.Module,
    data: list,
    repeats: int,
    probes: int,
    eig_rtol: float,
    chunk: int,
    lanczos_tol: float | None,
) -> list[dict[str, Any]]:
    model.eval()  # PyHessian puts the model in eval mode; ours calls it as it is
    operator = Hessian(model, nn.CrossEntropyLoss(), data)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    vectors = [torch.randn(p.shape, generator=generator) for p in params]
    # The same matrix: one product each (also the warm-up of torch.func's first call).
    _, theirs_product = CountingHessian(model, data).inner.dataloader_hv_product(vectors)
    product_difference = relative_difference(operator @ vectors, list(theirs_product))
    if product_difference > 1e-4:
        raise AssertionError(f"{name}: Hessian products differ by {product_difference:.2e} relative")

    rows = []
    # Top eigenvalue: the agreement check is the first (untimed) run of each. PyHessian's stopping
    # rule (consecutive Rayleigh quotients within tol = 1e-3) does not bound its error by 1e-3: with
    # top eigenvalues close together it stops early, below the top eigenvalue (a Rayleigh quotient
    # is a lower bound). So the check is against PyHessian run to tol 1e-6 (untimed); the default
    # run's own difference is recorded too.
    ours_value, ours_steps = top_eigenvalue_ours(operator, 0, lanczos_tol)
    default_value, default_steps = top_eigenvalue_ours(operator, 0, None)
    theirs_value, theirs_steps = top_eigenvalue_theirs(model, data, 0)
    tight_value, tight_steps = top_eigenvalue_theirs(model, data, 0, tol=1e-6)
    eig_difference = abs(ours_value - tight_value) / abs(ours_value)
    default_difference = abs(ours_value - theirs_value) / abs(ours_value)
    print(
        f"{name:4} top eigenvalue: ours {ours_value:.6g} ({ours_steps} products; at lanczos's default tol "
        f"{default_value:.6g}, {default_steps} products), "
        f"pyhessian {theirs_value:.6g} ({theirs_steps} products, relative difference {default_difference:.1e}), "
        f"pyhessian at tol 1e-6 {tight_value:.6g} ({tight_steps} products, relative difference {eig_difference:.1e})"
    )
    if eig_difference > eig_rtol:
        raise AssertionError(f"{name}: top eigenvalues differ by {eig_difference:.2e} > {eig_rtol:g}; not timing")
    times, steps = time_alternately(
        lambda seed: top_eigenvalue_ours(operator, seed, lanczos_tol),
        lambda seed: top_eigenvalue_theirs(model, data, seed),
        repeats,
    )
    rows.append(
        pyhessian_row(
            name,
            "top_eigenvalue",
            times,
            steps,
            {
                "ours_value": ours_value,
                "pyhessian_value": theirs_value,
                "pyhessian_tight_value": tight_value,
                "pyhessian_tight_products": tight_steps,
                "lanczos_tol": lanczos_tol,
                "ours_default_tol_value": default_value,
                "ours_default_tol_products": default_steps,
                "relative_difference_default_tol": default_difference,
                "relative_difference": eig_difference,
                "tolerance": eig_rtol,
                "product_relative_difference": product_difference,
            },
        )
    )

    # Trace: agreement of independent estimates within their standard errors, then timing.
    ours_trace, ours_error, ours_passes = trace_ours(operator, probes, 0, chunk)
    theirs_trace, theirs_error, theirs_passes = trace_theirs(model, data, probes, 0)
    combined = math.hypot(ours_error, theirs_error)
    print(
        f"{name:4} trace ({probes} probes): ours {ours_trace:.6g} ± {ours_error:.2g} ({ours_passes} passes of "
        f"{min(chunk, probes)} columns), pyhessian {theirs_trace:.6g} ± {theirs_error:.2g} ({theirs_passes} products); "
        f"difference {abs(ours_trace - theirs_trace) / combined:.2f} standard errors"
    )
    if abs(ours_trace - theirs_trace) > 4 * combined:
        raise AssertionError(f"{name}: traces differ by more than 4 standard errors; not timing")
    times, steps = time_alternately(
        lambda seed: trace_ours(operator, probes, seed, chunk),
        lambda seed: trace_theirs(model, data, probes, seed),
        repeats,
    )
    rows.append(
        pyhessian_row(
            name,
            "trace",
            times,
            steps,
            {
                "probes": probes,
                "chunk": chunk,
                "ours_value": ours_trace,
                "ours_standard_error": ours_error,
                "pyhessian_value": theirs_trace,
                "pyhessian_standard_error": theirs_error,
                "difference_in_standard_errors": abs(ours_trace - theirs_trace) / combined,
                "product_relative_difference": product_difference,
            },
        )
    )
    return rows


def pyhessian_row(name: str, what: str, times: dict, steps: dict, extra: dict) -> dict[str, Any]:
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
    print(
        f"{name:4} {what:15} ours {ours:8.3f} s  pyhessian {theirs:8.3f} s  ratio {ours / theirs:5.2f}  "
        f"(passes over the data: ours {steps['ours']}, pyhessian {steps['theirs']})"
    )
    return {
        "model": name,
        "operator": "hessian",
        "what": what,
        "ours_s": ours,
        "pyhessian_s": theirs,
        "ratio": ours / theirs,
        "ours_times_s": times["ours"],
        "pyhessian_times_s": times["theirs"],
        "ours_passes": steps["ours"],
        "pyhessian_passes": steps["theirs"],
        **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["kfac", "pyhessian"], choices=["kfac", "pyhessian"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--pyhessian-models", nargs="+", default=["mlp"], choices=["mlp", "cnn"])
    parser.add_argument("--pyhessian-examples", type=int, default=None, help="default: --examples")
    parser.add_argument("--probes", type=int, default=100, help="Hutchinson probes, both libraries")
    parser.add_argument(
        "--chunk", type=int, default=None, help="probes per pass of our hutchinson_trace (default: all)"
    )
    parser.add_argument(
        "--lanczos-tol",
        type=float,
        default=1e-3,
        help="our lanczos stops at relative residual <= this, which puts an eigenvalue within this relative "
        "distance (PyHessian's nominal tol); 0 or less: lanczos's default (sqrt(eps))",
    )
    parser.add_argument("--eig-rtol", type=float, default=1e-3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dataset = load_dataset("fashion-mnist", seed=0)
    models = {
        "mlp": lambda: MLP(784, 10, hidden=(256, 256)),
        "cnn": lambda: SmallCNN(dataset.input_shape, 10),
    }

    def batches_of(examples: int) -> list:
        x, y = dataset.x_train[:examples], dataset.y_train[:examples]
        return list(zip(x.split(args.batch_size), y.split(args.batch_size)))

    rows = []
    if "kfac" in args.parts:
        torch.manual_seed(0)
        data = batches_of(args.examples)
        for name in args.models:
            rows.extend(compare(name, models[name](), data, args.repeats))
    if "pyhessian" in args.parts:
        torch.manual_seed(0)
        data = batches_of(args.pyhessian_examples or args.examples)
        for name in args.pyhessian_models:
            rows.extend(
                compare_pyhessian(
                    name,
                    models[name](),
                    data,
                    args.repeats,
                    args.probes,
                    args.eig_rtol,
                    args.chunk or args.probes,
                    args.lanczos_tol if args.lanczos_tol > 0 else None,
                )
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args), "rows": rows},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
