"""Where an optimizer's ordinary step spends its time: torch.profiler over ordinary steps.

The model, gradients and optimizers of ``benchmarks/optimizer_step.py``; after its 11 warm-up
steps (the first refresh and, with ``--compile``, the compilation included), 9 ordinary steps are
profiled and the operators printed by their own CPU time.

Usage: python benchmarks/profile_step.py [--model transformer] [--optimizer conditioner.SOAP]
                                         [--compile] [--threads 1] [--rows 20]
"""

from __future__ import annotations

import argparse

import torch
from optimizer_step import MODELS, WARMUP, OptimizerRun, gradients, optimizers
from torch.profiler import profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="transformer", choices=list(MODELS))
    parser.add_argument("--optimizer", default="conditioner.SOAP")
    parser.add_argument("--compile", action="store_true", help="compile_kernels=True")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    factory = optimizers()[args.optimizer]
    options = {"compile_kernels": True} if args.compile else {}
    init, grads = gradients(args.model, WARMUP + 9)  # the refresh at step 20 is left out
    run = OptimizerRun(args.model, lambda p: factory(p, **options), init)
    for step_grads in grads[:WARMUP]:
        run(step_grads)
    with profile() as profiler:
        for step_grads in grads[WARMUP:]:
            run(step_grads)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
