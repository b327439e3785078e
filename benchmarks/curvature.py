"""K-FAC / EK-FAC construction and products against curvlinops, on real Fashion-MNIST.

Both libraries get the same model (float32, fixed initialisation), the same batches of real
images and the same curvature definition: the exact GGN expectation ("type-2" in curvlinops,
``fisher_type="exact"`` here), "expand" weight sharing, weight and bias in one Kronecker block.
Before anything is timed the two results are checked equal: the dense-free check compares the
operators' products with the same random vectors (relative error of the products; float32 sums
in different order agree to ~1e-5). Then each build (factors, eigendecompositions, and for
EK-FAC the eigenvalue correction) and each product is timed ``--repeats`` times, alternating the
libraries, and the medians are reported with their ratio (ours / theirs).

Usage: python benchmarks/curvature.py [--examples 2048] [--batch-size 256] [--repeats 5]
                                      [--models mlp cnn] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from curvlinops import EKFACLinearOperator, KFACLinearOperator
from torch import nn

from conditioner.bench.models import MLP, SmallCNN
from conditioner.curvature import EKFAC, KFAC
from conditioner.data import load_dataset


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


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
                seconds, operators[side] = timed(lambda: build(kind, model, data))
                build_times[side].append(seconds)
        difference = relative_difference(product_ours(operators["ours"], vectors), product_theirs(operators["theirs"], vectors))
        if difference > 1e-4:
            raise AssertionError(f"{name} {kind}: products differ by {difference:.2e} relative; not timing unequal results")
        for _ in range(repeats * 4):
            for side, product in (("ours", product_ours), ("theirs", product_theirs)):
                seconds, _ = timed(lambda: product(operators[side], vectors))
                product_times[side].append(seconds)
        for what, times in (("build", build_times), ("product", product_times)):
            ours, theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
            rows.append(
                {"model": name, "operator": kind, "what": what, "ours_s": ours, "curvlinops_s": theirs,
                 "ratio": ours / theirs, "relative_difference": difference}
            )
            print(f"{name:4} {kind:6} {what:8} ours {ours * 1e3:9.2f} ms  curvlinops {theirs * 1e3:9.2f} ms  ratio {ours / theirs:5.2f}  (products agree to {difference:.1e})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dataset = load_dataset("fashion-mnist", seed=0)
    x, y = dataset.x_train[: args.examples], dataset.y_train[: args.examples]
    data = list(zip(x.split(args.batch_size), y.split(args.batch_size)))
    torch.manual_seed(0)
    models = {
        "mlp": lambda: MLP(784, 10, hidden=(256, 256)),
        "cnn": lambda: SmallCNN(dataset.input_shape, 10),
    }
    rows = []
    for name in args.models:
        rows.extend(compare(name, models[name](), data, args.repeats))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
