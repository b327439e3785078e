"""Time of one refresh step on 1 and 2 processes, and optimizer-state bytes per rank.

The model has many blocks: ``--layers`` linear layers ``width × width`` split into blocks of
``--block`` (default 8 layers of 512 split at 256: 32 blocks, 64 factors of 256 × 256). Every
rank gets the same fixed gradients (as after DDP's all-reduce), so only ``optimizer.step()`` is
measured: eigenvalue-corrected Shampoo with an ``eigh`` refresh at every second step. A step is
timed between two barriers; the median over ``--repeats`` refresh steps (and ordinary steps) is
reported, with the CPU time each rank spent in the step (``time.process_time``, which other
processes on a busy machine do not inflate). Each process uses ``--threads`` intra-op threads
(1: the ranks do not compete for cores).

With ``--shard`` the optimizer runs under ``shard_state`` on 2 or more ranks instead of
``spread_refresh``: each rank keeps and computes only its blocks and the updates are all-gathered
once per step (1 rank runs the plain optimizer either way, the baseline).

State bytes: measured on every rank; "projected" is what each rank would keep if it held only
the state of the blocks the LPT assignment of the decomposition cost gives it (what
``--shard`` measures for real, with its own cost, :func:`conditioner.distributed.block_cost`).

``--extrapolate`` runs nothing: for a GPT-2-small-shaped and a 1B-parameter GPT-shaped model,
split into blocks of at most 1024, it assigns the blocks as ``shard_state`` would on 8 and 64
ranks and prints the state per rank (eigenvalue-corrected Shampoo / SOAP, float32: factor and
basis per preconditioned dimension, two moments) and the bytes each rank sends and receives in
the update exchange of one step (the buffer layout of ``ShardedState.exchange``).

Usage: python benchmarks/distributed_refresh.py [--ranks 1 2] [--layers 8] [--width 512]
                                                [--block 256] [--repeats 5] [--shard] [--json FILE]
       python benchmarks/distributed_refresh.py --extrapolate
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

from conditioner import EigenvalueCorrectedShampoo
from conditioner.blocks import BlockPolicy, build_stacks
from conditioner.distributed import assign_lpt, block_cost, decomposition_cost, shard_state, spread_refresh


def _model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers)])


def _sharded_bytes(optimizer: EigenvalueCorrectedShampoo, world: int) -> list[int]:
    """Per-rank state bytes if each rank kept only the blocks LPT gives it (cost: Σ d³ per block)."""
    items, sizes = [], []
    for g, _ in enumerate(optimizer.param_groups):
        for stack in optimizer.layout(g):
            state = optimizer.state[optimizer.stack_key(g, stack)]
            per_block = sum(v[0].numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
            cost = sum(decomposition_cost(stack.shape[d]) for d in stack.preconditioned_dims) or 1.0
            items += [cost] * len(stack.blocks)
            sizes += [per_block] * len(stack.blocks)
    owners = assign_lpt(items, [0.0] * world)
    return [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(world)]


def _worker(rank: int, world: int, store: str, out: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = _model(args)
    optimizer = EigenvalueCorrectedShampoo(model.parameters(), precondition_frequency=2, max_precond_dim=args.block)
    executor = None
    if world > 1:
        executor = shard_state(optimizer) if args.shard else spread_refresh(optimizer)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) for p in model.parameters()] for _ in range(4)]
    times: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for step in range(2 + 2 * args.repeats):
        for p, grad in zip(model.parameters(), grads[step % 4]):
            p.grad = grad
        refresh = (step + 1) % 2 == 0  # t = step + 1; the basis is refreshed when t % 2 == 0
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.step()
        busy = time.process_time() - start_cpu
        dist.barrier()
        if step >= 2:
            times[refresh].append(time.perf_counter() - start)
            cpu[refresh].append(busy)
    cpu_per_rank: list[dict] = [{}] * world
    dist.all_gather_object(cpu_per_rank, {k: statistics.median(v) for k, v in cpu.items()})
    state_per_rank: list[int] = [0] * world
    dist.all_gather_object(state_per_rank, optimizer.state_bytes())
    sharded = args.shard and world > 1
    result = {
        "ranks": world,
        "threads": args.threads,
        "refresh_step_s": statistics.median(times[True]),
        "ordinary_step_s": statistics.median(times[False]),
        "refresh_step_cpu_s_per_rank": [c[True] for c in cpu_per_rank],
        "ordinary_step_cpu_s_per_rank": [c[False] for c in cpu_per_rank],
        "mode": "shard_state" if sharded else "spread_refresh" if executor else "one process",
        "blocks": sum(len(s.blocks) for s in optimizer.full_layout(0)),
        "blocks_here": sum(len(s.blocks) for s in optimizer.layout(0)),
        "factor_refreshes": optimizer.total_refreshes(),
        "computed_here": executor.computed if executor and not sharded else optimizer.total_refreshes(),
        "exchanges": executor.exchanges if executor else 0,
        "received_bytes_per_step": executor.received_bytes / executor.exchanges if sharded else 0,
        "state_bytes_per_rank": state_per_rank,
        "projected_sharded_state_bytes_per_rank": None if sharded else _sharded_bytes(optimizer, world),
    }
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def _gpt_shapes(width: int, layers: int, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model (tied embedding, biases, layer norms)."""
    shapes: list[tuple[int, ...]] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (3 * width, width), (3 * width,), (width, width), (width,)]
        shapes += [(width,), (width,), (4 * width, width), (4 * width,), (width, 4 * width), (width,)]
    return shapes + [(width,), (width,)]


def extrapolate(ranks: tuple[int, ...] = (8, 64), block: int = 1024) -> list[dict]:
    """State bytes per rank and exchange bytes per step under shard_state, from the shapes alone."""
    models = {"GPT-2 small": _gpt_shapes(768, 12), "GPT 1B (width 2048, 18 layers)": _gpt_shapes(2048, 18, context=2048)}
    rows = []
    for name, shapes in models.items():
        stacks = build_stacks(shapes, BlockPolicy(max_preconditioner_dim=block, split_large_dims=True))
        blocks = [(s.shape, s.preconditioned) for s in stacks for _ in s.blocks]
        state = [
            4 * (2 * sum(d * d for d, p in zip(shape, pre) if p) + 2 * math.prod(shape)) for shape, pre in blocks
        ]
        elements = [math.prod(shape) for shape, _ in blocks]
        for world in ranks:
            owners = assign_lpt([block_cost(shape, pre) for shape, pre in blocks], [0.0] * world)
            per_rank = [sum(b for b, o in zip(state, owners) if o == r) for r in range(world)]
            sent = [4 * (1 + sum(2 + e for e, o in zip(elements, owners) if o == r)) for r in range(world)]
            rows.append(
                {
                    "model": name,
                    "parameters": sum(math.prod(s) for s in shapes),
                    "blocks": len(blocks),
                    "ranks": world,
                    "state_bytes_unsharded": sum(state),
                    "state_bytes_per_rank_max": max(per_rank),
                    "state_bytes_per_rank_mean": sum(state) / world,
                    "sent_bytes_per_step": max(sent),
                    "received_bytes_per_step": max(sent) * world,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shard", action="store_true", help="run 2 or more ranks under shard_state")
    parser.add_argument("--extrapolate", action="store_true", help="print the 8- and 64-rank projection only")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    if args.extrapolate:
        rows = extrapolate()
        for r in rows:
            print(
                f"{r['model']}: {r['parameters'] / 1e6:.0f}M parameters, {r['blocks']} blocks, {r['ranks']} ranks: "
                f"state {r['state_bytes_unsharded'] / 1e9:.2f} GB unsharded, per rank {r['state_bytes_per_rank_max'] / 1e6:.0f} MB "
                f"(mean {r['state_bytes_per_rank_mean'] / 1e6:.0f} MB); exchange per step: sends "
                f"{r['sent_bytes_per_step'] / 1e6:.0f} MB, receives {r['received_bytes_per_step'] / 1e9:.2f} GB"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return
    import torch.multiprocessing as mp

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.ranks:
            out = os.path.join(tmp, f"{world}.json")
            store = os.path.join(tmp, f"store{world}")
            mp.start_processes(_worker, args=(world, store, out, args), nprocs=world, start_method="spawn")
            with open(out) as f:
                results.append(json.load(f))
            r = results[-1]
            print(
                f"{world} rank(s) × {args.threads} thread(s): refresh step {r['refresh_step_s'] * 1e3:.0f} ms "
                f"(CPU per rank {', '.join(f'{c * 1e3:.0f}' for c in r['refresh_step_cpu_s_per_rank'])} ms), "
                f"ordinary step {r['ordinary_step_s'] * 1e3:.0f} ms "
                f"(CPU {', '.join(f'{c * 1e3:.0f}' for c in r['ordinary_step_cpu_s_per_rank'])} ms); "
                f"{r['mode']}: {r['blocks']} blocks, {r['blocks_here']} on rank 0; factors decomposed "
                f"on rank 0: {r['computed_here']} of {r['factor_refreshes']}; all-gathers: {r['exchanges']} "
                f"({r['received_bytes_per_step']:,.0f} bytes received per step); state bytes per rank "
                f"{', '.join(f'{b:,}' for b in r['state_bytes_per_rank'])}"
                + (
                    f" (projected sharded: {', '.join(f'{b:,}' for b in r['projected_sharded_state_bytes_per_rank'])})"
                    if r["projected_sharded_state_bytes_per_rank"]
                    else ""
                )
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
