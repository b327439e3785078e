"""``nonfinite="skip_on_device"``: a step whose gradients or updates are not finite is committed
as a no-op on the device (``torch.where``), with no host synchronisation (counted in
test_synchronisation.py). Parameters and every state tensor stay bit for bit, the bias corrections
follow the device count of steps taken, the refresh schedule the host count of steps attempted;
refresh failures wait for :meth:`report_failures`."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from cases import (
    FACTORIES,
    REFRESH_AFTER,
    assert_params_equal,
    make_model,
    mse,
    params_of,
    shared_input_model,
    train,
    train_shared_input,
)

import conditioner.linalg.eigh as eigh_module
from conditioner import SOAP, EigenvalueCorrectedShampoo, Muon, Shampoo
from conditioner.distributed import shard_state
from conditioner.optim import base

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "skip_on_device"
ALL = {**FACTORIES, "Muon": lambda params, **kw: Muon(params, **{"lr": 1e-2, **kw})}
#: steps after which the next one is a refresh (Muon has none: an ordinary later step)
BEFORE_REFRESH = {**REFRESH_AFTER, "Muon": 3}


def _poisoned_step(model, i, value):
    model.zero_grad()
    mse(model, i).backward()
    model.a.weight.grad[1, 2] = value  # one element of one parameter


def _tensors(opt) -> dict[tuple[str, str], torch.Tensor]:
    """Every state tensor of the state dict, by (stack, entry), cloned."""
    return {(k, n): v.clone() for k, s in opt.state_dict()["state"].items() for n, v in s.items() if torch.is_tensor(v)}


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key


def _steps(opt) -> dict[str, list[int]]:
    return {k: list(s["step"]) for k, s in opt.state_dict()["state"].items()}


@pytest.mark.parametrize("when", ["later", "refresh"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", list(ALL))
def test_a_skipped_step_changes_no_parameter_and_no_state_tensor(name, value, when):
    """Weight decay on, so that the decay is masked too. The host count of steps attempted
    advances (it drives the refresh schedule); the device count of steps taken does not."""
    done = {"later": 2, "refresh": BEFORE_REFRESH[name]}[when]
    model = make_model()
    opt = ALL[name](model.parameters(), nonfinite=DEVICE, weight_decay=0.1)
    train(model, opt, done)
    params, tensors, steps = params_of(model), _tensors(opt), _steps(opt)
    _poisoned_step(model, done, value)
    assert opt.step() is None
    assert_params_equal(params_of(model), params)
    _assert_same_tensors(_tensors(opt), tensors)
    assert _steps(opt) == {k: [s + 1 for s in v] for k, v in steps.items()}
    assert int(opt.skipped_steps()) == 1
    train(model, opt, 2, start=done)
    assert int(opt.skipped_steps()) == 1 and all(bool(p.isfinite().all()) for p in model.parameters())


@pytest.mark.parametrize(
    "precision",
    [
        ("SOAP", "bfloat16"),
        ("SOAP", "4bit"),
        ("ECS", "bfloat16"),
        ("ECS", "4bit"),
        ("Shampoo", "bfloat16"),
        ("Shampoo", "4bit"),
        ("Muon", "bfloat16"),
    ],
    ids=lambda p: "-".join(p),
)
def test_a_skipped_refresh_step_leaves_bfloat16_and_4bit_state_as_it_was(precision):
    """Hidden width 64: the 64 × 64 factors are large enough to be stored in bfloat16 or kept as
    4-bit eigenpairs, and the 4-bit bases are re-encoded only when the step is applied."""
    name, state_precision = precision
    model = make_model(hidden=64)
    opt = ALL[name](model.parameters(), nonfinite=DEVICE, state_precision=state_precision)
    train(model, opt, BEFORE_REFRESH[name])
    params, tensors = params_of(model), _tensors(opt)
    assert any(v.dtype in (torch.bfloat16, torch.uint8) for v in tensors.values())
    _poisoned_step(model, BEFORE_REFRESH[name], float("nan"))
    opt.step()
    assert_params_equal(params_of(model), params)
    _assert_same_tensors(_tensors(opt), tensors)
    assert int(opt.skipped_steps()) == 1


@pytest.mark.parametrize("when", ["later", "refresh"])
@pytest.mark.parametrize("name", list(ALL))
def test_a_skipped_step_in_chunks_of_one_block_changes_nothing(name, when, monkeypatch):
    """One block per chunk: each chunk writes its rows of the stack in place, masked by the
    device bool; a skipped step still leaves every parameter and state tensor bit for bit, and
    the finite steps around it train as the step in one piece does (same arithmetic per block,
    batched differently: float32 round-off, below 1e-5 over these few steps of lr 1e-2)."""
    done = {"later": 2, "refresh": BEFORE_REFRESH[name]}[when]
    runs = []
    for chunk in (2**22, 1):
        monkeypatch.setattr(base, "CHUNK_ELEMENTS", chunk)
        model = make_model()
        opt = ALL[name](model.parameters(), nonfinite=DEVICE, weight_decay=0.1)
        train(model, opt, done)
        params, tensors = params_of(model), _tensors(opt)
        _poisoned_step(model, done, float("nan"))
        opt.step()
        assert_params_equal(params_of(model), params)
        _assert_same_tensors(_tensors(opt), tensors)
        train(model, opt, 2, start=done)
        runs.append(params_of(model))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_update_holding_nan_is_withheld_and_counted_for_report_failures(monkeypatch):
    """From finite gradients a kernel's update can still hold NaN: under the on-device policy it
    is withheld as under "raise" (the parameters never see it, the state took the step), the
    step is not counted as skipped, and no later step raises: report_failures() tells."""
    model = make_model()
    opt = ALL["SOAP"](model.parameters(), nonfinite=DEVICE)
    train(model, opt, 2)
    kernel = SOAP.stack_step

    def poisoned(self, group, stack, *args):
        result = kernel(self, group, stack, *args)
        if result.update is not None and stack.preconditioned_dims:
            result.update = torch.full_like(result.update, float("nan"))
        return result

    monkeypatch.setattr(SOAP, "stack_step", poisoned)
    train(model, opt, 1, start=2)
    monkeypatch.undo()
    assert all(bool(p.isfinite().all()) for p in model.parameters())
    train(model, opt, 1, start=3)
    assert int(opt.skipped_steps()) == 0
    reported = opt.report_failures()
    # one update per stack of preconditioned blocks (each stack is one chunk here)
    matrices = sum(1 for g in range(len(opt.param_groups)) for stack in opt.layout(g) if stack.preconditioned_dims)
    assert reported == {
        f"{matrices} block update(s) of SOAP held NaN or Inf (from finite gradients) and were not "
        "applied; the state of those blocks took the step": matrices
    }


@pytest.mark.parametrize("name", list(ALL))
def test_the_run_that_skipped_a_step_equals_the_run_that_never_saw_it(name):
    """With a refresh at every step (frequency 1, Shampoo preconditioning from its first step) the
    refresh schedule cannot tell the two runs apart; the bias corrections follow the steps taken,
    so every parameter and state tensor agrees bit for bit, and only the host counts of steps
    attempted differ by the one skipped."""
    options = {"nonfinite": DEVICE, "weight_decay": 0.1}
    if name != "Muon":
        options["precondition_frequency"] = 1
    if name == "Shampoo":
        options["start_preconditioning_step"] = 1
    model = make_model()
    clean = copy.deepcopy(model)
    opt, clean_opt = ALL[name](model.parameters(), **options), ALL[name](clean.parameters(), **options)
    train(model, opt, 3)
    train(clean, clean_opt, 3)
    _poisoned_step(model, 3, float("nan"))
    opt.step()
    train(model, opt, 5, start=3)
    train(clean, clean_opt, 5, start=3)
    assert_params_equal(params_of(model), params_of(clean))
    _assert_same_tensors(_tensors(opt), _tensors(clean_opt))
    assert _steps(opt) == {k: [s + 1 for s in v] for k, v in _steps(clean_opt).items()}
    assert int(opt.skipped_steps()) == 1 and int(clean_opt.skipped_steps()) == 0


@pytest.mark.parametrize("name", list(ALL))
def test_on_finite_steps_the_policy_trains_as_raise_does(name):
    """The same run under "raise" and "skip_on_device". The bias corrections differ in rounding
    only: float32 powers ``β^t`` on the device against double ones on the host, a few float32
    ulps. Measured over 8 steps: at most 7e-7 apart (SOAP, ECS, Muon) and 1.1e-5 for Shampoo,
    whose inverse roots of nearly singular 6 × 6 factors (ε = 1e-12) amplify the rounding of the
    factors' correction; a step counted wrong changes a correction ``1 − β^t`` by percents
    early on and moves the weights by ~1e-3 (steps of lr = 1e-2)."""
    runs = []
    for policy in ("raise", DEVICE):
        model = make_model()
        opt = ALL[name](model.parameters(), nonfinite=policy, weight_decay=0.1)
        train(model, opt, 8)
        runs.append(params_of(model))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(ALL))
def test_a_skipped_first_step_leaves_the_parameters_and_initialises_from_a_zero_gradient(name):
    """Without a synchronisation the host cannot leave a stack without state: a skipped first
    step stores the state a zero gradient would give (zero statistics and moments; bases the
    identity) with no step taken, and training goes on from there."""
    model = make_model()
    opt = ALL[name](model.parameters(), nonfinite=DEVICE)
    params = params_of(model)
    _poisoned_step(model, 0, float("nan"))
    opt.step()
    assert_params_equal(params_of(model), params)
    assert int(opt.skipped_steps()) == 1
    for stack in opt.state.values():
        assert int(stack["taken"].abs().sum()) == 0
        for key, value in stack.items():
            if key.startswith(("factor", "exp_avg", "momentum", "graft_sq")):
                assert not value.any(), key
            if key.startswith("basis"):
                assert torch.equal(value, torch.eye(value.shape[-1]).expand_as(value)), key
    train(model, opt, 6, start=1)
    assert all(bool(p.isfinite().all()) for p in model.parameters()) and params_of(model)[0].ne(params[0]).any()


def test_skipped_steps_counts_every_skip_and_is_zero_under_the_host_policies():
    model = make_model()
    opt = ALL["ECS"](model.parameters(), nonfinite=DEVICE)
    for i in range(5):
        if i in (1, 3):
            _poisoned_step(model, i, float("inf"))
            opt.step()
        else:
            train(model, opt, 1, start=i)
    counter = opt.skipped_steps()
    assert counter.dtype == torch.int64 and counter.ndim == 0 and int(counter) == 2
    for policy in ("raise", "skip"):
        host = ALL["ECS"](make_model().parameters(), nonfinite=policy)
        assert int(host.skipped_steps()) == 0


def _always_failing_eigh(*args, **kwargs):
    raise torch.linalg.LinAlgError("simulated syevd failure")


@pytest.mark.parametrize("policy", ["raise", DEVICE])
def test_eigh_failures_of_a_refresh_are_logged_at_the_check_or_on_request(policy, monkeypatch, caplog):
    """ECS refreshes by eigh; with eigh failing on every matrix (each keeps its basis), the
    warning comes under "raise" with the next step (read by its one check, which comes before
    the refresh) and only from report_failures() under the on-device policy, once; equal
    warnings of several stacks are merged into one count (the message names no stack size)."""
    model = make_model()
    opt = ALL["ECS"](model.parameters(), nonfinite=policy)
    train(model, opt, REFRESH_AFTER["ECS"])
    bases = {k: s["basis0"].clone() for k, s in opt.state.items() if "basis0" in s}
    monkeypatch.setattr(eigh_module.torch.linalg, "eigh", _always_failing_eigh)
    with caplog.at_level(logging.WARNING, logger="conditioner.linalg.eigh"):
        train(model, opt, 1, start=REFRESH_AFTER["ECS"])
        monkeypatch.undo()
        assert all(torch.equal(opt.state[k]["basis0"], b) for k, b in bases.items())  # kept
        assert "eigendecomposition failed" not in caplog.text
        train(model, opt, 1, start=REFRESH_AFTER["ECS"] + 1)
        logged_at_next_step = [r.getMessage() for r in caplog.records]
        reported = opt.report_failures()
    # every factor of every matrix block failed: one count per (block, preconditioned dim)
    failures = sum(c.numel() for c in opt.refresh_counts().values())
    if policy == "raise":
        assert reported == {}
        assert sum(int(m.split("failed for ")[1].split()[0]) for m in logged_at_next_step) == failures
    else:
        assert logged_at_next_step == [] or all("failed" not in m for m in logged_at_next_step)
        assert sum(reported.values()) == failures
        assert all("eigendecomposition failed" in m for m in reported)
        assert "eigendecomposition failed" in caplog.text
        assert opt.report_failures() == {}


def test_failures_of_a_skipped_step_are_not_reported(monkeypatch):
    model = make_model()
    opt = ALL["ECS"](model.parameters(), nonfinite=DEVICE)
    train(model, opt, REFRESH_AFTER["ECS"])
    monkeypatch.setattr(eigh_module.torch.linalg, "eigh", _always_failing_eigh)
    _poisoned_step(model, REFRESH_AFTER["ECS"], float("nan"))
    opt.step()
    monkeypatch.undo()
    assert opt.report_failures() == {} and int(opt.skipped_steps()) == 1


def test_newton_fallbacks_wait_for_report_failures(caplog):
    """tests/optim/test_shampoo_roots.py's rank-deficient case, under the on-device policy: the
    fallbacks are counted in the state as before; the warning waits for report_failures()."""
    model = shared_input_model()
    opt = Shampoo(model.parameters(), root_method="newton", nonfinite=DEVICE)
    with caplog.at_level(logging.WARNING):
        train_shared_input(model, opt, 41)  # refreshes at steps 20 and 40
        assert "coupled Newton" not in caplog.text
        reported = opt.report_failures()
    assert opt.total_fallbacks() > 0
    assert sum(reported.values()) == opt.total_fallbacks()
    assert "coupled Newton" in caplog.text


@pytest.mark.parametrize("name", list(ALL))
def test_state_dicts_move_between_the_policies(name):
    """A checkpoint of the on-device policy carries the steps taken ("taken") and the steps
    attempted ("step"); loaded under "raise" the steps taken become "step". A "raise"
    checkpoint loaded under the on-device policy starts "taken" from "step". Either way the
    run goes on as the original."""
    model = make_model()
    opt = ALL[name](model.parameters(), nonfinite=DEVICE)
    train(model, opt, 2)
    _poisoned_step(model, 2, float("nan"))
    opt.step()
    train(model, opt, 2, start=3)
    saved = copy.deepcopy(opt.state_dict())
    assert all(s["taken"].tolist() == [t - 1 for t in s["step"]] for s in saved["state"].values())

    same_model = copy.deepcopy(model)
    same = ALL[name](same_model.parameters(), nonfinite=DEVICE)
    same.load_state_dict(saved)
    host_model = copy.deepcopy(model)
    host = ALL[name](host_model.parameters(), nonfinite="raise")
    host.load_state_dict(saved)
    assert all("taken" not in s for s in host.state_dict()["state"].values())
    assert _steps(host) == {k: s["taken"].tolist() for k, s in saved["state"].items()}

    back = ALL[name](copy.deepcopy(host_model).parameters(), nonfinite=DEVICE)
    back.load_state_dict(host.state_dict())
    assert {k: s["taken"].tolist() for k, s in back.state_dict()["state"].items()} == _steps(host)

    train(model, opt, 3, start=5)
    train(same_model, same, 3, start=5)
    assert_params_equal(params_of(same_model), params_of(model))
    _assert_same_tensors(_tensors(same), _tensors(opt))
    # under "raise" the refresh schedule follows the steps taken: close, not equal, once it refreshes
    train(host_model, host, 3, start=5)
    assert all(bool(p.isfinite().all()) for p in host_model.parameters())


def test_the_policy_is_checked_and_refused_with_sharded_state():
    params = make_model().parameters()
    with pytest.raises(ValueError, match="nonfinite"):
        SOAP(params, nonfinite="skip_on_gpu")
    opt = EigenvalueCorrectedShampoo(make_model().parameters(), nonfinite=DEVICE)
    with pytest.raises(ValueError, match="skip_on_device"):
        shard_state(opt)
