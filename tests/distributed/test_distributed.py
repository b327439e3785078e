"""The optimizers on torch.distributed, on CPU with gloo: DDP and FSDP2 against one process, the
split of the refresh work, a rank with nothing to refresh, and checkpoints that resume exactly;
the same for sharded state (``shard_state``), with checkpoints resumed on 2 → 3 and 3 → 1 ranks,
a rank that owns no block, and an exchange that times out.

Two spawns of fresh processes serve all multi-process tests (starting processes that import
torch is most of their time): 2 ranks train every case and save a checkpoint half-way, then in a
new process group resume from those checkpoints with new models and optimizers; 3 ranks train
SOAP, eigenvalue-corrected Shampoo and Shampoo under both modes and the one-block model, and resume
the 2-rank checkpoints. The sharded runs (every optimizer, Muon included, under both modes) ride
on the same spawns: the fixtures return the unsharded jobs, and ``_sharded_jobs`` names the others.

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
from distributed_cases import OPTIMIZERS, SHARDED, STALL_TIMEOUT_S, STEPS, make_model, reference, spawn, train

from conditioner import SOAP, Shampoo
from conditioner.distributed import (
    ShardedState,
    SpreadRefresh,
    assign_lpt,
    block_cost,
    decomposition_cost,
    shard_state,
    spread_refresh,
)
from conditioner.optim.base import NonFiniteGradientError

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ("ddp", "fsdp")
COUNTED = ("SOAP", "ECS", "Shampoo")  # every factor refreshed at each refresh: counts add up exactly
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
SHARDED_MODES = tuple(f"{mode}-sharded" for mode in MODES)


def _train_jobs(root, world):
    return [
        ("train", mode, name, False, str(root / f"w{world}-{mode}-{name}")) for mode in MODES for name in OPTIMIZERS
    ]


def _sharded_jobs(root, world):
    """Sharded state: every optimizer under both modes, saving checkpoints half-way; on 3 ranks also
    the one-block model (two ranks own nothing), the 2-rank sharded checkpoints resumed (2 → 3) and
    unsharded 2-rank checkpoints resumed sharded."""
    trained = [
        ("train", mode, name, False, str(root / f"w{world}-{mode}-{name}"))
        for mode in SHARDED_MODES
        for name in SHARDED
    ]
    if world == 2:
        return trained
    tiny = [("train", mode, "Shampoo", True, None) for mode in SHARDED_MODES]
    resumed = [("resume", job[1], job[2], job[4]) for job in _sharded_jobs(root, 2)]
    unsharded = [("resume", "ddp-sharded", name, str(root / f"w2-ddp-{name}")) for name in COUNTED]
    return trained + tiny + resumed + unsharded


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, checkpoints):
    """2 ranks train every case, saving checkpoints half-way; then, in a new process group, new
    models and optimizers resume from those checkpoints."""
    trained = _train_jobs(checkpoints, 2)
    resumed = [("resume", job[1], job[2], job[4]) for job in trained]
    sharded = _sharded_jobs(checkpoints, 2)
    resumed_sharded = [("resume", job[1], job[2], job[4]) for job in sharded]
    phases = [trained + sharded, resumed + resumed_sharded, [("stall", "ddp-sharded", "SOAP")]]
    return trained, resumed, spawn(2, tmp_path_factory.mktemp("two"), phases)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, checkpoints, two_ranks):
    jobs = [("train", mode, name, False, None) for mode in MODES for name in COUNTED]
    jobs += [("train", mode, "Shampoo", True, None) for mode in MODES]
    jobs += [("resume", job[1], job[2], job[4]) for job in two_ranks[0] if job[2] in COUNTED]
    return jobs, spawn(3, tmp_path_factory.mktemp("three"), [jobs + _sharded_jobs(checkpoints, 3)])


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


def _results(world, two_ranks, three_ranks):
    return two_ranks[2] if world == 2 else three_ranks[1]


def _blocks_and_state(name, tiny=False):
    """Blocks and state bytes of the single-process run, with its steps that update parameters."""
    model = make_model(tiny)
    optimizer = SHARDED[name](model.parameters())
    train(model, optimizer, range(STEPS))
    blocks = sum(len(s.blocks) for s in optimizer.layout(0))
    return blocks, optimizer.state_bytes()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_state_matches_one_process(world, two_ranks, three_ranks, checkpoints, references):
    results = _results(world, two_ranks, three_ranks)
    trained = [job for job in _sharded_jobs(checkpoints, world) if job[0] == "train" and not job[3]]
    assert {(job[1], job[2]) for job in trained} == {(m, n) for m in SHARDED_MODES for n in SHARDED}
    for job in trained:
        for rank_results in results:
            _assert_params(rank_results[job]["params"], references(job[2]), **TOLERANCE)


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_keeps_and_computes_only_its_blocks(world, two_ranks, three_ranks, checkpoints):
    """The blocks split without overlap, state bytes add up to the single-process state, each rank
    computed the updates of its blocks only (SOAP's first step has none), one exchange per step."""
    results = _results(world, two_ranks, three_ranks)
    for job in [j for j in _sharded_jobs(checkpoints, world) if j[0] == "train"]:
        blocks, state_bytes = _blocks_and_state(job[2], job[3])
        owned = [r[job]["blocks"] for r in results]
        assert sum(owned) == blocks and max(owned) < blocks or blocks == 1, (job, owned)
        assert sum(r[job]["state_bytes"] for r in results) == state_bytes, job
        updating_steps = STEPS - 1 if job[2] == "SOAP" else STEPS
        computed = [r[job]["computed"] for r in results]
        assert computed == [n * updating_steps for n in owned], (job, computed)
        assert all(r[job]["exchanges"] == STEPS for r in results), job


def _gradient_bytes(name, world, tiny=False):
    """Per rank, the gradient bytes it receives in STEPS steps when only the owners of a
    parameter's blocks fetch its full gradient (ownership: LPT on ``block_cost``, as
    ``shard_state`` assigns it), and the least a rank receives all-gathering every gradient."""
    model = make_model(tiny)
    optimizer = SHARDED[name](model.parameters())
    stacks = optimizer.full_layout(0)
    owners = assign_lpt([block_cost(s.shape, s.preconditioned) for s in stacks for _ in s.blocks], [0.0] * world)
    readers = [set() for _ in optimizer.param_groups[0]["params"]]
    for block, rank in zip([b for s in stacks for b in s.blocks], owners):
        readers[block.param_index].add(rank)
    params = optimizer.param_groups[0]["params"]
    owned = [sum(4 * p.numel() for p, ranks in zip(params, readers) if r in ranks) * STEPS for r in range(world)]
    return owned, sum(4 * p.numel() for p in params) * STEPS


@pytest.mark.parametrize("world", [2, 3])
def test_under_fsdp_each_rank_receives_only_the_gradients_of_its_blocks(world, two_ranks, three_ranks, checkpoints):
    """Sharded FSDP2: a rank receives the full gradient of exactly the parameters it owns a block
    of (the shards of all ranks, its own included), less than all-gathering every gradient; under
    DDP the gradients are already whole and nothing is exchanged for them."""
    results = _results(world, two_ranks, three_ranks)
    for job in [j for j in _sharded_jobs(checkpoints, world) if j[0] == "train"]:
        received = [r[job]["gradient_bytes"] for r in results]
        if job[1] == "ddp-sharded":
            assert received == [0] * world, job
            continue
        owned, gathered = _gradient_bytes(job[2], world, job[3])
        assert received == owned, (job, received, owned)
        assert max(received) < gathered or job[3], (job, received, gathered)  # one block: its owner needs all


def test_a_rank_that_owns_no_block_works(three_ranks, checkpoints, references):
    """One block on three ranks: it is more than a fair share, its owner does all the work, the
    two others own nothing, and all end with the single-process parameters."""
    results = three_ranks[1]
    for job in [j for j in _sharded_jobs(checkpoints, 3) if j[0] == "train" and j[3]]:
        assert [r[job]["blocks"] for r in results] == [1, 0, 0], job
        assert [r[job]["state_bytes"] == 0 for r in results] == [False, True, True], job
        for rank_results in results:
            _assert_params(rank_results[job]["params"], references("Shampoo", tiny=True), **TOLERANCE)


def test_sharded_checkpoints_resume_on_two_and_three_ranks(two_ranks, three_ranks, checkpoints, references):
    """Saved sharded on 2 ranks: resumed on 2 (a fresh process group) and on 3; saved unsharded on
    2 ranks: resumed sharded on 3. Every run ends with the single-process parameters."""
    resumed = [("resume", job[1], job[2], job[4]) for job in _sharded_jobs(checkpoints, 2)]
    three = [job for job in _sharded_jobs(checkpoints, 3) if job[0] == "resume"]
    assert len(three) == len(resumed) + len(COUNTED)
    for job, results in [(job, two_ranks[2]) for job in resumed] + [(job, three_ranks[1]) for job in three]:
        for rank_results in results:
            assert rank_results[job]["saved_world"] == 2
            _assert_params(rank_results[job]["params"], references(job[2]), **TOLERANCE)


def test_an_exchange_a_rank_never_joins_fails_within_the_timeout(two_ranks):
    stalled = two_ranks[2][0][("stall", "ddp-sharded", "SOAP")]
    assert stalled["error"] is not None
    assert "update exchange of step 2 failed on rank 0 of 2" in stalled["error"]
    assert STALL_TIMEOUT_S * 0.5 <= stalled["waited_s"] < STALL_TIMEOUT_S * 3


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


@pytest.mark.parametrize("name", list(SHARDED))
def test_sharded_state_on_one_rank_matches_one_process(name, world_of_one):
    model = make_model()
    optimizer = SHARDED[name](model.parameters())
    sharding = shard_state(optimizer)
    train(model, optimizer, range(STEPS))
    assert sharding.exchanges == STEPS and sharding.updated > 0
    _assert_params([p.detach() for p in model.parameters()], reference(name), **TOLERANCE)


@pytest.mark.parametrize("name", list(SHARDED))
def test_sharded_checkpoint_from_three_ranks_resumes_on_one(name, world_of_one, three_ranks, checkpoints, references):
    """The 3-rank sharded checkpoints, resumed on one rank sharded and in one process unsharded."""
    from conditioner.distributed import checkpoint

    for sharded in (True, False):
        for mode in SHARDED_MODES:
            model = make_model()
            optimizer = SHARDED[name](model.parameters())
            if sharded:
                shard_state(optimizer)
            assert checkpoint.load(checkpoints / f"w3-{mode}-{name}", optimizer, model) == 3
            train(model, optimizer, range(STEPS // 2, STEPS))
            _assert_params([p.detach() for p in model.parameters()], references(name), **TOLERANCE)


def test_a_sharded_checkpoint_holds_whole_stacks(tmp_path, world_of_one):
    """A stack is one whole entry in the checkpoint, its step counts one int64 entry, sharded or
    not (with several ranks each writes its rows of them: the spawned checkpoint tests)."""
    import torch.distributed.checkpoint as dcp

    from conditioner.distributed import checkpoint

    entries = {}
    for sharded in (True, False):
        model = make_model()
        optimizer = OPTIMIZERS["SOAP"](model.parameters())
        if sharded:
            shard_state(optimizer)
        train(model, optimizer, range(3))
        checkpoint.save(tmp_path / str(sharded), optimizer)
        metadata = dcp.FileSystemReader(tmp_path / str(sharded)).read_metadata().state_dict_metadata
        entries[sharded] = {k: (tuple(v.size), v.properties.dtype) for k, v in metadata.items() if k != checkpoint.META}
    assert entries[True] == entries[False]
    assert entries[True]["optimizer/state/group0/8x8:PP/step"] == ((6,), torch.int64)


def test_rows_describe_their_chunks_and_refuse_to_compute():
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from conditioner.distributed.checkpoint import Rows

    local = torch.arange(12.0).view(4, 3)
    rows = Rows(local, [0, 2, 3, 7], 9)
    assert rows.shape == (9, 3) and rows.dtype == local.dtype
    assert [(tuple(o), c.data_ptr()) for o, c in rows.chunks] == [
        ((0, 0), local[0:1].data_ptr()),
        ((2, 0), local[1:3].data_ptr()),
        ((7, 0), local[3:4].data_ptr()),
    ]
    with pytest.raises(RuntimeError, match="only describes"):
        rows + 1
    index = MetadataIndex("x", torch.Size([2, 0]))
    assert rows.__get_tensor_shard__(index).data_ptr() == local[1].data_ptr()  # read into local
    written = Rows(local, [0, 2, 3, 7], 9, writing=True).__get_tensor_shard__(index)
    assert torch.equal(written, local[1:3])
    # DCP writes with torch.save, which stores a tensor's whole storage: a chunk has its own
    assert written.untyped_storage().nbytes() == written.numel() * written.element_size()


def test_blocks_go_to_ranks_by_cost_over_all_stacks(world_of_one):
    """Ownership is LPT on block_cost over the blocks of every stack; with one rank it owns all."""
    model = make_model()
    optimizer = OPTIMIZERS["SOAP"](model.parameters())
    sharding = shard_state(optimizer)
    owners = sharding.owners()
    assert owners.keys() == {optimizer.stack_key(0, s) for s in optimizer.full_layout(0)}
    assert all(set(ranks) == {0} for ranks in owners.values())
    assert block_cost((8, 8), (True, True)) == 2 * 8**3 + 64 and block_cost((16,), (False,)) == 16
    assert optimizer.stack_rows("group0/8x8:PP") == (6, list(range(6)))
    with pytest.raises(ValueError, match="no block stack"):
        optimizer.stack_rows("group0/3x3:PP")


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nonfinite_gradient_under_sharding_changes_nothing(policy, world_of_one):
    model = make_model()
    optimizer = SOAP(model.parameters(), precondition_frequency=2, max_precond_dim=8, nonfinite=policy)
    shard_state(optimizer)
    train(model, optimizer, range(3))
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.d.weight.grad[0, 0] = float("nan")
    if policy == "raise":
        with pytest.raises(NonFiniteGradientError, match="a gradient"):
            optimizer.step()
    else:
        optimizer.step()
    _assert_params([p.detach() for p in model.parameters()], params, rtol=0, atol=0)
    _assert_same_state(optimizer.state_dict(), state)


def test_shard_state_checks_its_arguments(world_of_one):

    with pytest.raises(TypeError, match="optimizer: must be a conditioner optimizer"):
        shard_state(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    model = make_model()
    spread = SOAP(model.parameters())
    spread_refresh(spread)
    with pytest.raises(ValueError, match="spread_refresh"):
        shard_state(spread)
    sharded = SOAP(model.parameters())
    shard_state(sharded)
    with pytest.raises(ValueError, match="shard_state"):
        spread_refresh(sharded)
    stepped = SOAP(model.parameters())
    train(model, stepped, range(1))
    with pytest.raises(ValueError, match="before its first step"):
        shard_state(stepped)
    with pytest.raises(ValueError, match="timeout: must be None or a positive"):
        shard_state(SOAP(model.parameters()), timeout=5)


def test_shard_state_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedState(SOAP(make_model().parameters()))


def test_a_group_added_after_steps_keeps_the_blocks_of_the_earlier_groups(world_of_one):
    """Ownership is assigned group after group with the loads carried over: a new group adds its
    blocks to the least loaded ranks and moves nothing the earlier groups' state is kept for.
    (The assignment on 3 ranks, computed by the one process; no exchange runs.)"""
    model = make_model()
    optimizer = OPTIMIZERS["SOAP"](list(model.e.parameters()) + list(model.c.parameters()))
    sharding = shard_state(optimizer)
    sharding.world_size = 3
    before = dict(sharding.owners())
    assert sorted({r for ranks in before.values() for r in ranks}) == [0, 1, 2]
    optimizer.add_param_group({"params": list(model.d.parameters())})  # blocks costlier than any before
    after = sharding.owners()
    assert {k: v for k, v in after.items() if k.startswith("group0/")} == before
    assert any(k.startswith("group1/") for k in after)


def test_dtensor_gradients_of_two_dtypes_and_a_replicated_one_on_one_rank(world_of_one):
    """Sharded state over DTensor parameters: a float32 gradient sharded in dim 0 and a float64
    one sharded in dim 1 travel in one all-to-all per dtype, a replicated one is taken whole; the
    parameters end as with plain tensors (to round-off), and the counter holds the two sharded
    gradients of every step."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    shapes = [
        ((10, 8), torch.float32, Shard(0)),
        ((6, 12), torch.float64, Shard(1)),
        ((6, 6), torch.float32, Replicate()),
    ]
    values = [torch.randn(shape, dtype=dtype) for shape, dtype, _ in shapes]
    plain = [torch.nn.Parameter(v.clone()) for v in values]
    spread = [
        torch.nn.Parameter(distribute_tensor(v.clone(), mesh, [placement]))
        for v, (_, _, placement) in zip(values, shapes)
    ]
    optimizers = [SHARDED["SOAP"](plain), SHARDED["SOAP"](spread)]
    sharding = shard_state(optimizers[1])
    for step in range(4):
        grads = [torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(step)) for v in values]
        for p, q, g, (_, _, placement) in zip(plain, spread, grads, shapes):
            p.grad, q.grad = g.clone(), distribute_tensor(g.clone(), mesh, [placement])
        for optimizer in optimizers:
            optimizer.step()
    _assert_params([q.full_tensor() for q in spread], [p.detach() for p in plain], **TOLERANCE)
    assert sharding.gradient_bytes == 4 * (10 * 8 * 4 + 6 * 12 * 8)
