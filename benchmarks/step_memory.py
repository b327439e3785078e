"""Memory an optimizer step allocates on top of parameters, gradients and state.

The model is the one issue 14 measured: an MLP of three bias-free 2048×2048 layers (12.6M
parameters, float32). Each optimizer takes warm-up steps past its initialisation and a first
refresh; then, for one ordinary step and one refresh step, the peak above the level just before
the step is measured:

- on the CPU, the process's resident high-water mark (Linux: write ``5`` to
  ``/proc/self/clear_refs`` to reset ``VmHWM``, step, read ``VmHWM`` from ``/proc/self/status``).
  glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, which hides
  allocations; the script therefore re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so
  that every large tensor is its own mapping, returned on free;
- on CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.

The peak is reported next to the state's bytes (``conditioner.state_memory``) and as a ratio of
them. Usage: python benchmarks/step_memory.py [--optimizers ...] [--device cpu|cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable

import torch
from torch import nn

import conditioner

MMAP_THRESHOLD = "65536"
WIDTH = 2048
LAYERS = 3
WARMUP = 12  # past the first refresh of every optimizer at frequency 10


def optimizers() -> dict[str, Callable]:
    settings = {"lr": 1e-3, "precondition_frequency": 10}
    return {
        "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True),
        "soap": lambda p: conditioner.SOAP(p, **settings),
        "ecshampoo": lambda p: conditioner.EigenvalueCorrectedShampoo(p, max_precond_dim=WIDTH, **settings),
        "shampoo": lambda p: conditioner.Shampoo(p, max_preconditioner_dim=WIDTH, **settings),
        "muon": lambda p: conditioner.Muon(p, lr=0.02),
    }


def resident_high_water() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024


def resident_now() -> int:
    with open("/proc/self/status") as status:
        return int(re.search(r"VmRSS:\s+(\d+) kB", status.read()).group(1)) * 1024


def step_peak(optimizer: torch.optim.Optimizer, device: torch.device) -> int:
    """Bytes allocated during one ``optimizer.step()`` above the level before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        optimizer.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = resident_now()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    optimizer.step()
    return resident_high_water() - before


def measure(name: str, make: Callable, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS))).to(device)
    optimizer = make(model.parameters())
    inputs = torch.randn(256, WIDTH, device=device)

    def backward() -> None:
        optimizer.zero_grad(set_to_none=False)
        model(inputs).square().mean().backward()

    peaks = {}
    for step in range(WARMUP + 10):
        backward()
        if step == WARMUP:
            peaks["ordinary"] = step_peak(optimizer, device)
        elif step == WARMUP + 7:  # the 20th step: a refresh at frequency 10
            peaks["refresh"] = step_peak(optimizer, device)
        else:
            optimizer.step()
    state = conditioner.state_memory(optimizer).total
    return {
        "optimizer": name,
        "state_bytes": state,
        "ordinary_peak_bytes": peaks["ordinary"],
        "refresh_peak_bytes": peaks["refresh"],
        "ordinary_ratio": peaks["ordinary"] / state,
        "refresh_ratio": peaks["refresh"] / state,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", choices=list(optimizers()), default=list(optimizers()))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD})
    torch.set_num_threads(1)
    rows = []
    mib = 2.0**20
    print(f"{'optimizer':<10} {'state MiB':>10} {'ordinary MiB':>13} {'× state':>8} {'refresh MiB':>12} {'× state':>8}")
    for name in args.optimizers:
        row = measure(name, optimizers()[name], device)
        rows.append(row)
        print(
            f"{name:<10} {row['state_bytes'] / mib:>10.1f} {row['ordinary_peak_bytes'] / mib:>13.1f} "
            f"{row['ordinary_ratio']:>8.2f} {row['refresh_peak_bytes'] / mib:>12.1f} {row['refresh_ratio']:>8.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
