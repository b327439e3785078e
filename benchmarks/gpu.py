"""Optimizer-step cost on a GPU, against the model's own forward and backward pass.

A GPT-2-small-shaped decoder (12 layers, width 768, 12 heads, vocabulary 50257, sequence 1024,
124M parameters) under bfloat16 autocast with float32 parameters. Measured per optimizer, in one
process: the median ``optimizer.step()`` (an ordinary step), the mean step including refreshes
(the timed window holds ``--steps`` steps at the reference frequency 10, so several refreshes),
the peak memory allocated during steps above what parameters and gradients hold, the optimizer
state bytes, and the ratio of the median step to the median forward+backward. Every optimizer
steps on gradients from a fresh forward+backward on the same token sequence; only the step is
timed, with CUDA events.

Optimizers: torch's AdamW (foreach), our SOAP, eigenvalue-corrected Shampoo, Shampoo (Adam
grafting) and Muon, and heavyball's and pytorch-optimizer's SOAP when installed (the ``bench``
extra). Tokens are random: step time does not depend on the data.

Usage: python benchmarks/gpu.py [--steps 40] [--batch 8] [--optimizers ...] [--heavyball-compile] [--json FILE]
       python benchmarks/gpu.py --tiny --device cpu      # a seconds-long smoke run of the script
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

import conditioner

WARMUP = 11
SOAP_SETTINGS = dict(lr=3e-3, betas=(0.95, 0.95), eps=1e-8, weight_decay=0.01, precondition_frequency=10)
GPT2_SMALL = dict(vocab=50257, context=1024, width=768, layers=12, heads=12)
TINY = dict(vocab=96, context=32, width=64, layers=2, heads=4)


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, -1))
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.token, self.position = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def optimizers(names: list[str] | None, heavyball_compile: bool = False) -> dict[str, Callable]:
    """Constructors by name; peers only when their package is installed. heavyball compiles its
    step with torch.compile by default; without ``heavyball_compile`` it runs eager, as ours do."""
    ours: dict[str, Callable] = {
        "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.01, foreach=True),
        "soap": lambda p: conditioner.SOAP(p, **SOAP_SETTINGS),
        "ecshampoo": lambda p: conditioner.EigenvalueCorrectedShampoo(p, lr=3e-3, precondition_frequency=10),
        "shampoo": lambda p: conditioner.Shampoo(p, lr=3e-3, precondition_frequency=10),
        "muon": lambda p: conditioner.Muon(p, lr=0.02),
    }
    if importlib.util.find_spec("heavyball") is not None:
        import heavyball

        if not heavyball_compile:
            heavyball.utils.compile_mode = None
        ours["heavyball-soap"] = lambda p: heavyball.SOAP(p, **SOAP_SETTINGS)
    if importlib.util.find_spec("pytorch_optimizer") is not None:
        import pytorch_optimizer

        ours["pto-soap"] = lambda p: pytorch_optimizer.SOAP(p, **SOAP_SETTINGS)
    return {name: ours[name] for name in (names or ours) if name in ours}


class Timer:
    """Wall time of a region on the device: CUDA events, or perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, work: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        started = time.perf_counter()
        work()
        return time.perf_counter() - started


def run(name: str, make: Callable, config: dict, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = GPT(**config).to(device)
    tokens = torch.randint(0, config["vocab"], (args.batch, config["context"] + 1), device=device,
                           generator=torch.Generator(device=device).manual_seed(0))
    timer = Timer(device)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()

    optimizer = make(model.parameters())
    step_times, pass_times, peaks = [], [], []
    for step in range(WARMUP + args.steps):
        pass_times.append(timer(forward_backward))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        seconds = timer(optimizer.step)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) - before)
        if step >= WARMUP:
            step_times.append(seconds)
    median_pass = statistics.median(pass_times[WARMUP:])
    result = {
        "optimizer": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_backward_median_s": median_pass,
        "step_median_s": statistics.median(step_times),
        "step_mean_s": statistics.fmean(step_times),
        "step_over_forward_backward": statistics.median(step_times) / median_pass,
        "state_bytes": conditioner.state_bytes(optimizer),
        "step_peak_extra_bytes": max(peaks) if peaks else None,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps after 11 warm-up steps (default: 40)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default: 8)")
    parser.add_argument("--optimizers", nargs="+", help="subset to run (default: all available)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--heavyball-compile", action="store_true", help="let heavyball torch.compile its step")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model: checks the script, not the GPU")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = TINY if args.tiny else GPT2_SMALL
    print(f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} torch {torch.__version__}, "
          f"batch {args.batch} x {config['context']}, bf16 autocast")
    print(f"{'optimizer':16s} {'median ms':>10s} {'mean ms':>9s} {'/ fwd+bwd':>10s} {'fwd+bwd ms':>11s} "
          f"{'state MiB':>10s} {'peak extra MiB':>15s}", flush=True)
    results = []
    for name, make in optimizers(args.optimizers, args.heavyball_compile).items():
        try:
            r = run(name, make, config, args, device)
        except Exception as error:  # a peer's failure must not lose the others' results
            print(f"{name:16s} failed: {type(error).__name__}: {error}", flush=True)
            continue
        results.append(r)
        peak = "-" if r["step_peak_extra_bytes"] is None else f"{r['step_peak_extra_bytes'] / 2**20:.0f}"
        print(f"{name:16s} {1e3 * r['step_median_s']:10.2f} {1e3 * r['step_mean_s']:9.2f} "
              f"{r['step_over_forward_backward']:10.3f} {1e3 * r['forward_backward_median_s']:11.1f} "
              f"{r['state_bytes'] / 2**20:10.0f} {peak:>15s}", flush=True)
        if args.json:  # rewritten after every optimizer, so an interrupted run keeps what it measured
            with open(args.json, "w") as file:
                json.dump({"device": str(device), "torch": torch.__version__, "results": results}, file, indent=1)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous optimizer's state is garbage now

if __name__ == "__main__":
    main()
