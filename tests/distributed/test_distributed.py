"""The optimizers on torch.distributed, on CPU with gloo: DDP and FSDP2 against one process, the
split of the refresh work, a rank with nothing to refresh, and checkpoints that resume exactly.

Two spawns of fresh processes serve all multi-process tests (starting processes that import
torch is most of their time): 2 ranks train every case and save a checkpoint half-way, then in a
new process group resume from those checkpoints with new models and optimizers; 3 ranks train
SOAP, eigenvalue-corrected Shampoo and Shampoo under both modes and the one-block model, and resume
the 2-rank checkpoints.

Tolerance against one process: the ranks' gradients are averaged by an all-reduce, summed in
another order than one process sums its batch, so they differ in the last bits of float32; after
8 steps with eigendecompositions the parameters (of size ~0.3) agree to ~2e-6 (SOAP) and ~1e-7
(the others). ``atol = rtol = 1e-5`` is float32 round-off grown over the run, far below a real
difference (a missed or doubled update moves parameters by ~lr = 1e-2).

What is bit for bit and what is not: a checkpoint restores parameters and optimizer state exactly
(asserted with ``torch.equal``). The steps after it, and the spread refresh on one rank, repeat
the same arithmetic on copies of the same tensors in other memory, and the BLAS / LAPACK kernels
torch calls (MKL on x86) do not promise bitwise-equal results for differently aligned operands:
on some machines the parameters then differ in the last bit or two (~3e-8 seen). Those
trajectories are compared with the same round-off tolerance.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
from cases import shared_input_model, train_shared_input
from distributed_cases import OPTIMIZERS, STEPS, make_model, reference, spawn, train

from conditioner import SOAP, Shampoo
from conditioner.distributed import SpreadRefresh, assign_lpt, decomposition_cost, spread_refresh

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("ddp", "fsdp")
COUNTED = ("SOAP", "ECS", "Shampoo")  # every factor refreshed at each refresh: counts add up exactly
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _train_jobs(root, world):
    return [
        ("train", mode, name, False, str(root / f"w{world}-{mode}-{name}")) for mode in MODES for name in OPTIMIZERS
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, checkpoints):
    """2 ranks train every case, saving checkpoints half-way; then, in a new process group, new
    models and optimizers resume from those checkpoints."""
    trained = _train_jobs(checkpoints, 2)
    resumed = [("resume", job[1], job[2], job[4]) for job in trained]
    return trained, resumed, spawn(2, tmp_path_factory.mktemp("two"), [trained, resumed])


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, two_ranks):
    jobs = [("train", mode, name, False, None) for mode in MODES for name in COUNTED]
    jobs += [("train", mode, "Shampoo", True, None) for mode in MODES]
    jobs += [("resume", job[1], job[2], job[4]) for job in two_ranks[0] if job[2] in COUNTED]
    return jobs, spawn(3, tmp_path_factory.mktemp("three"), [jobs])


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(name, tiny=False):
        if (name, tiny) not in cache:
            cache[name, tiny] = reference(name, tiny)
        return cache[name, tiny]

    return get


def _assert_params(actual, expected, **tolerance):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, **tolerance)


def _assert_same_state(actual, expected):
    """Bit-identical optimizer state dicts: same keys, same step counts, tensors ``torch.equal``."""
    assert actual["state"].keys() == expected["state"].keys()
    for key, entries in expected["state"].items():
        assert actual["state"][key].keys() == entries.keys(), key
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(actual["state"][key][name], value), (key, name)
            else:
                assert actual["state"][key][name] == value, (key, name)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_and_fsdp_match_one_process(world, two_ranks, three_ranks, references):
    jobs, results = (two_ranks[0], two_ranks[2]) if world == 2 else three_ranks
    trained = [job for job in jobs if job[0] == "train" and not job[3]]
    names = OPTIMIZERS if world == 2 else COUNTED  # the adaptive QR refresh on 2 ranks only
    assert {(job[1], job[2]) for job in trained} == {(m, n) for m in MODES for n in names}
    for job in trained:
        for rank_results in results:  # every rank holds the same full parameters
            _assert_params(rank_results[job]["params"], references(job[2]), **TOLERANCE)


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_computes_only_its_share_of_the_refresh(world, two_ranks, three_ranks):
    jobs, results = (two_ranks[0], two_ranks[2]) if world == 2 else three_ranks
    for job in jobs:
        if job[0] != "train" or job[2] not in COUNTED or job[3]:
            continue
        computed = [r[job]["computed"] for r in results]
        total = results[0][job]["refreshes"]  # factor refreshes of all blocks, as one process counts them
        assert total > 0 and sum(computed) == total, (job, computed, total)
        assert all(0 < c < total for c in computed), (job, computed)
        # LPT on d³ with loads reset each step: no rank does much more than an equal share
        assert max(computed) <= math.ceil(total / world) * 1.5, (job, computed)
        # one all-gather per stack refreshed, the same on every rank
        assert len({r[job]["exchanges"] for r in results}) == 1


def test_a_rank_without_blocks_works(three_ranks, references):
    jobs, results = three_ranks
    for job in [j for j in jobs if j[0] == "train" and j[3]]:
        computed = [r[job]["computed"] for r in results]
        assert computed[2] == 0 and computed[0] > 0 and computed[1] > 0, computed  # two factors, three ranks
        for rank_results in results:
            _assert_params(rank_results[job]["params"], references("Shampoo", tiny=True), **TOLERANCE)


def test_checkpoint_resumes_in_a_fresh_process_group(two_ranks):
    trained, resumed, results = two_ranks
    for original, job in zip(trained, resumed):
        for rank in range(2):
            assert results[rank][job]["saved_world"] == 2
            _assert_params(results[rank][job]["params"], results[rank][original]["params"], **TOLERANCE)


def test_checkpoint_from_two_ranks_resumes_on_three(three_ranks, references):
    jobs, results = three_ranks
    resumed = [job for job in jobs if job[0] == "resume"]
    assert len(resumed) == len(MODES) * len(COUNTED)
    for job in resumed:
        for rank_results in results:
            assert rank_results[job]["saved_world"] == 2
            _assert_params(rank_results[job]["params"], references(job[2]), **TOLERANCE)


# --- in this process -------------------------------------------------------------------------


def test_lpt_assignment_balances_and_is_deterministic():
    costs = [decomposition_cost(d) for d in (8, 8, 8, 4, 6, 4, 2)]
    loads = [0.0, 0.0, 0.0]
    owners = assign_lpt(costs, loads)
    assert owners == assign_lpt(costs, [0.0, 0.0, 0.0])
    assert owners[:3] == [0, 1, 2]  # the three largest go to the three empty ranks
    assert loads == [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
    assert loads == [512.0 + 216.0, 512.0 + 64.0 + 8.0, 512.0 + 64.0]  # 728: the best possible here
    carried = [1000.0, 0.0]
    assert assign_lpt([1.0], carried) == [1] and carried == [1000.0, 1.0]  # loads carry over
    with pytest.raises(ValueError, match="loads"):
        assign_lpt([1.0], [])


def test_spread_refresh_needs_a_process_group_and_a_conditioner_optimizer():
    with pytest.raises(RuntimeError, match="init_process_group"):
        SpreadRefresh()
    with pytest.raises(TypeError, match="optimizer"):
        spread_refresh(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_spread_refresh_on_one_rank_matches_one_process(name, world_of_one):
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters())
    executor = spread_refresh(optimizer)
    train(model, optimizer, range(STEPS))
    assert executor.computed > 0 and executor.exchanges > 0
    _assert_params([p.detach() for p in model.parameters()], reference(name), **TOLERANCE)


def test_spread_newton_roots_fall_back_as_in_one_process(world_of_one):
    """Shampoo's Newton roots with the eigh fallback through SpreadRefresh: the fallback masks
    travel with the roots, so the counts and the parameters are those of one process."""
    counts, params = [], []
    for spread in (False, True):
        model = shared_input_model()
        optimizer = Shampoo(model.parameters(), root_method="newton")
        if spread:
            executor = spread_refresh(optimizer)
        train_shared_input(model, optimizer, 40)
        counts.append(optimizer.fallback_counts())
        params.append([p.detach() for p in model.parameters()])
    assert executor.computed > 0
    assert counts[0].keys() == counts[1].keys() and sum(int(c.sum()) for c in counts[0].values()) > 0
    assert all(torch.equal(counts[0][k], counts[1][k]) for k in counts[0])
    _assert_params(params[1], params[0], **TOLERANCE)


def test_checkpoint_round_trip_in_one_process(tmp_path):
    import torch.distributed.checkpoint as dcp

    from conditioner.distributed import checkpoint

    model = make_model()
    optimizer = OPTIMIZERS["SOAP"](model.parameters())
    train(model, optimizer, range(STEPS // 2))
    checkpoint.save(tmp_path / "ckpt", optimizer, model)
    saved_params = [p.detach().clone() for p in model.parameters()]
    saved_state = copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, range(STEPS // 2, STEPS))
    fresh = make_model()
    fresh_optimizer = OPTIMIZERS["SOAP"](fresh.parameters())
    assert checkpoint.load(tmp_path / "ckpt", fresh_optimizer, fresh) == 1
    _assert_params([p.detach() for p in fresh.parameters()], saved_params, rtol=0, atol=0)
    _assert_same_state(fresh_optimizer.state_dict(), saved_state)
    train(fresh, fresh_optimizer, range(STEPS // 2, STEPS))
    _assert_params(list(fresh.parameters()), list(model.parameters()), **TOLERANCE)
    other = SOAP(torch.nn.Linear(3, 3).parameters())
    with pytest.raises(ValueError, match="model entries|block stack|param"):
        checkpoint.load(tmp_path / "ckpt", other, torch.nn.Linear(3, 3))
    dcp.save({"weights": torch.zeros(3)}, checkpoint_id=tmp_path / "not-ours")
    with pytest.raises(ValueError, match="checkpoint_id .* no optimizer state"):
        checkpoint.load(tmp_path / "not-ours", optimizer)
