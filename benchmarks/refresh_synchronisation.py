"""What a refresh without host synchronisation costs on this machine (issue 14).

The two refreshes that read nothing on the host under ``nonfinite="skip_on_device"``, each timed
against the synchronising form the other policies keep, in the same process on the same stacks:

- Newton inverse roots (``newton_root``): ``synchronise=True`` stops when every matrix has
  converged and takes eigh only for those that did not; ``synchronise=False`` runs all
  ``max_iterations`` (masked) and an eigh of the whole stack.
- The adaptive eigh refresh (``corrected_refresh`` with a tolerance): the masked form
  (``synchronise=False``, the on-device policy) decomposes every block; the synchronising form
  (``"raise"``/``"skip"``) reads the stale mask (``nonzero``) and decomposes only those blocks
  (reproduced here with ``safe_eigh`` on the selected rows).

Stacks of ``--blocks`` SPD factors ``G Gᵀ / n`` of size ``--dim``; for the adaptive refresh the
bases are exact eigenbases of the factors except for ``--stale`` of the blocks, whose factor
was perturbed. Medians of ``--repeats`` runs. On a GPU the synchronising forms also wait for
the device once per Newton iteration (or once per refresh); on a CPU that wait costs nothing,
so these numbers show only the extra arithmetic.

Usage: python benchmarks/refresh_synchronisation.py [--dim 256] [--blocks 8] [--stale 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from conditioner.linalg import newton_root, safe_eigh
from conditioner.optim.ecshampoo import corrected_refresh


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def selected_eigh_refresh(factor: torch.Tensor, basis: torch.Tensor, stale: torch.Tensor) -> torch.Tensor:
    """The replaced form: read the stale blocks on the host and decompose only them."""
    index = stale.nonzero().flatten()
    if index.numel() == 0:
        return basis
    eig = safe_eigh(factor.index_select(0, index), previous=basis.index_select(0, index))
    return basis.index_copy(0, index, eig.eigenvectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--stale", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.blocks, args.dim, 4 * args.dim, generator=g)
    factor = x @ x.mT / x.shape[-1]

    rows = {
        "newton_root synchronise=True": median_ms(lambda: newton_root(factor, 4, 1e-6), args.repeats),
        "newton_root synchronise=False": median_ms(
            lambda: newton_root(factor, 4, 1e-6, synchronise=False), args.repeats
        ),
    }
    basis = safe_eigh(factor).eigenvectors
    moved = factor.clone()
    noise = torch.randn(args.stale, args.dim, args.dim, generator=g)
    moved[: args.stale] += 0.5 * (noise + noise.mT)
    stale = torch.arange(args.blocks) < args.stale
    rows["adaptive eigh refresh, stale blocks selected (host read)"] = median_ms(
        lambda: selected_eigh_refresh(moved, basis, stale), args.repeats
    )
    rows["adaptive eigh refresh, every block decomposed (masked)"] = median_ms(
        lambda: corrected_refresh({0: moved}, {0: basis}, "eigh", 0.05, 1, synchronise=False), args.repeats
    )
    print(f"{args.blocks} blocks of {args.dim}, {args.stale} stale, {torch.get_num_threads()} threads")
    for name, ms in rows.items():
        print(f"{name:60s} {ms:10.1f} ms")


if __name__ == "__main__":
    main()
