"""Experiment: 4-bit runs with one part of the 4-bit scheme changed, to find what costs quality.

``--ablate rectified``: every decoded 4-bit matrix is Björck-rectified (two steps), testing
whether the non-orthogonality of dequantised bases (an ordinary step projects with them as they
are) matters. ``--ablate exact-bases``: the 4-bit layout and schedule are kept (factors as
eigenpairs, tracked by one QR step per statistics update, a second basis adopted at refreshes)
but every basis (and Shampoo's roots) is stored exactly in float32, testing the eigenpair
scheme apart from the 4-bit rounding. The change holds for this process only; the other
arguments are those of ``benchmarks/bench_variants.py``.

Usage: PYTHONPATH=$PWD/src python benchmarks/fourbit_ablation.py --ablate rectified 'soap-4bit:0.001' --preset fashion-mlp --seeds 0 --threads 1
"""

import argparse
import pathlib
import runpy
import sys

from conditioner.linalg.orthogonal import bjorck_rectify
from conditioner.optim import precision
from conditioner.optim.eigen_adam import EigenAdam
from conditioner.optim.shampoo import Shampoo


def rectify_decoded_bases() -> None:
    dequantize = precision.dequantize
    precision.dequantize = lambda quantized: bjorck_rectify(dequantize(quantized), 2)


def store_bases_exactly() -> None:
    for cls in (EigenAdam, Shampoo):
        cls.state_roles = {
            key: ("exact" if role in ("basis", "root") else role) for key, role in cls.state_roles.items()
        }


ABLATIONS = {"rectified": rectify_decoded_bases, "exact-bases": store_bases_exactly}

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--ablate", required=True, choices=sorted(ABLATIONS))
args, rest = parser.parse_known_args()
ABLATIONS[args.ablate]()
sys.argv = ["bench_variants.py", *rest]
runpy.run_path(str(pathlib.Path(__file__).with_name("bench_variants.py")), run_name="__main__")
