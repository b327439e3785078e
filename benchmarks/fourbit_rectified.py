"""Experiment: 4-bit runs with every decoded 4-bit matrix Björck-rectified (two steps).

Tests whether the non-orthogonality of dequantised bases (an ordinary 4-bit step projects with
them as they are) explains 4-bit's gap to float32. The decoder of ``conditioner.optim.precision``
is replaced for this process only; the arguments are those of ``benchmarks/bench_variants.py``.

Usage: PYTHONPATH=$PWD/src python benchmarks/fourbit_rectified.py 'soap-4bit:0.001' --preset fashion-mlp --seeds 0 --threads 1
"""

import pathlib
import runpy
import sys

import conditioner.optim.precision as precision
from conditioner.linalg.orthogonal import bjorck_rectify

dequantize = precision.dequantize
precision.dequantize = lambda quantized: bjorck_rectify(dequantize(quantized), 2)
sys.argv = ["bench_variants.py", *sys.argv[1:]]
runpy.run_path(str(pathlib.Path(__file__).with_name("bench_variants.py")), run_name="__main__")
