"""SOAP, EigenvalueCorrectedShampoo and Shampoo under the torch.optim contract: param groups,
schedulers, closures, missing gradients, state dicts, dtypes, the NaN/Inf policy, argument checks,
and training a small classifier. Every check that computes runs on every device (the ``device``
fixture); argument checks, which compute nothing, run on the CPU."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from cases import (
    FACTORIES,
    NAMES,
    REFRESH_AFTER,
    assert_params_equal,
    assert_same_state_dict,
    fixed_grads,
    floating_state,
    make_model,
    mse,
    params_of,
    tanh_mlp,
    teacher_classification,
    through_file,
    train,
)
from torch import nn

from conditioner import SOAP, NonFiniteGradientError

pytestmark = pytest.mark.usefixtures("one_thread")


def classifier(dtype, seed=0, d=8, hidden=32, classes=4, device="cpu"):
    return tanh_mlp((d, hidden, hidden, classes), seed, dtype, device)

# --- the torch.optim contract, for all three ---------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_their_own_lr(name, device):
    model = make_model(device=device)
    frozen = params_of(model.inp)
    opt = FACTORIES[name](
        [
            {"params": model.inp.parameters(), "lr": 0.0},
            {"params": list(model.a.parameters()) + list(model.b.parameters()) + list(model.out.parameters())},
        ],
        weight_decay=0.1,
    )
    before = params_of(model)
    train(model, opt, 6)
    assert_params_equal(params_of(model.inp), frozen)  # lr = 0: no update and no decay
    changed = [not torch.equal(a, b) for a, b in zip(before[2:], params_of(model)[2:])]
    assert all(changed)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 1e-2]


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_scales_the_step(name, device):
    shapes = [(5, 4), (4,)]
    grads = fixed_grads(shapes, 8, device=device)
    deltas = []
    for use_scheduler in (False, True):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, dtype=torch.float64).to(device)) for s in shapes]
        opt = FACTORIES[name](params, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.1) if use_scheduler else None
        run = []
        for gs in grads:
            before = [p.detach().clone() for p in params]
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
            run.append([p.detach() - b for p, b in zip(params, before)])
            if scheduler is not None:
                scheduler.step()
        deltas.append(run)
        if scheduler is not None:
            assert scheduler.get_last_lr() == [pytest.approx(1e-4)]
    plain, scheduled = deltas
    for step, (a, b) in enumerate(zip(plain, scheduled)):
        factor = 1.0 if step < 4 else 0.1
        for x, y in zip(a, b):
            # the gradients do not depend on the parameters, so the state is the same and the
            # update is exactly proportional to lr; differences of ~1 parameters lose ~1e-13 relative
            torch.testing.assert_close(y, factor * x, rtol=1e-9, atol=1e-15)
    assert any(float(x.abs().max()) > 0 for x in plain[-1])


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_then_step_changes_nothing(name, device):
    model = make_model(device=device)
    opt = FACTORIES[name](model.parameters())
    train(model, opt, 4)
    mse(model, 99).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before, state = params_of(model), copy.deepcopy(opt.state_dict())
    opt.step()
    assert_params_equal(params_of(model), before)
    assert_same_state_dict(opt.state_dict(), state)


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_called_and_its_loss_returned(name, device):
    model = make_model(device=device)
    twin = copy.deepcopy(model)
    opt, twin_opt = FACTORIES[name](model.parameters()), FACTORIES[name](twin.parameters())
    for i in range(5):
        calls = []

        def closure():
            calls.append(i)
            opt.zero_grad()
            loss = mse(model, i)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert calls == [i]
        assert isinstance(loss, torch.Tensor) and loss.requires_grad is True
        twin_opt.zero_grad()
        twin_loss = mse(twin, i)
        twin_loss.backward()
        assert twin_opt.step() is None
        assert torch.equal(loss.detach(), twin_loss.detach())
        assert_params_equal(params_of(model), params_of(twin))


@pytest.mark.parametrize("name", NAMES)
def test_missing_gradients_in_a_shared_stack(name, device):
    """``a`` and ``b`` share stacks; ``b`` gets no gradient for a while, later ``a`` none. The
    shared optimizer must move each exactly as optimizers that hold one layer each."""
    model = make_model(dtype=torch.float64, device=device)
    twin = copy.deepcopy(model)
    opt = FACTORIES[name](model.parameters(), lr=3e-2)
    solo = [FACTORIES[name](m.parameters(), lr=3e-2) for m in (twin.inp, twin.a, twin.b, twin.out)]
    assert len(opt.state) == 0
    schedule = ["a"] * 4 + ["ab"] * 6 + ["b"] * 3
    steps_a = steps_b = 0
    for i, who in enumerate(schedule):
        for m in (model, twin):
            m.zero_grad()
            mse(m, i).backward()
            for layer in "ab":
                if layer not in who:
                    for p in getattr(m, layer).parameters():
                        p.grad = None
        before_b, before_a = params_of(model.b), params_of(model.a)
        opt.step()
        for o in solo:
            o.step()
        steps_a += "a" in who
        steps_b += "b" in who
        if "b" not in who:
            assert_params_equal(params_of(model.b), before_b)
        if "a" not in who:
            assert_params_equal(params_of(model.a), before_a)
        assert opt.state["group0/6x6:PP"]["step"] == [steps_a, steps_b]
        assert opt.state["group0/6:I"]["step"] == [i + 1, steps_a, steps_b]  # biases of inp, a, b
        for x, y in zip(model.parameters(), twin.parameters()):
            # float64; batched vs single-block products round differently (~1e-16 per step)
            torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-12)
    assert not torch.equal(model.b.weight, make_model(dtype=torch.float64, device=device).b.weight)


def _save(opt, how):
    if how == "deepcopy":
        return copy.deepcopy(opt.state_dict())
    return through_file(opt.state_dict())


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_is_bit_identical(name, how, device):
    model = make_model(device=device)
    opt = FACTORIES[name](model.parameters())
    train(model, opt, 4)
    saved_params = copy.deepcopy(model.state_dict())
    saved = _save(opt, how)
    train(model, opt, 6, start=4)  # uninterrupted, crosses two more refreshes

    resumed = make_model(seed=123, device=device)
    resumed.load_state_dict(saved_params)
    resumed_opt = FACTORIES[name](resumed.parameters())
    resumed_opt.load_state_dict(saved)
    train(resumed, resumed_opt, 6, start=4)
    assert_params_equal(params_of(resumed), params_of(model))
    assert_same_state_dict(resumed_opt.state_dict(), opt.state_dict())
    assert opt.total_refreshes() > 0


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_with_a_parameter_that_never_gets_a_gradient(name, device):
    """A parameter that never gets a gradient (an unused head, a conditional branch; here a
    Linear(7, 2) whose stacks no other parameter shares) must not make the state dict unloadable."""
    model = make_model(d_in=4, hidden=6, device=device)
    unused = nn.Linear(7, 2).to(device)
    params = list(model.parameters()) + list(unused.parameters())
    opt = FACTORIES[name](params)
    train(model, opt, 4)
    assert all(p.grad is None for p in unused.parameters())
    saved = _save(opt, "torch.save")
    fresh = FACTORIES[name](params)
    fresh.load_state_dict(saved)
    assert_same_state_dict(fresh.state_dict(), opt.state_dict())


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_a_copied_optimizer_continues_like_the_original(name, copier, device):
    """copy.deepcopy / pickle of a whole optimizer (done by checkpointing and averaging tools)
    must keep everything the optimizer needs to step, not only defaults, state and param_groups."""
    model = make_model(device=device)
    opt = FACTORIES[name](model.parameters(), nonfinite="skip")
    train(model, opt, 4)
    if copier == "deepcopy":
        twin_model, twin_opt = copy.deepcopy((model, opt))
    else:
        twin_model, twin_opt = pickle.loads(pickle.dumps((model, opt)))
    train(model, opt, 4, start=4)
    train(twin_model, twin_opt, 4, start=4)
    assert_params_equal(params_of(twin_model), params_of(model))
    assert twin_opt.nonfinite == "skip"


def test_a_copied_soap_keeps_update_first_step():
    param = nn.Parameter(torch.ones(3, 3))
    opt = SOAP([param], update_first_step=True)
    twin_param, twin = copy.deepcopy((param, opt))
    twin_param.grad = torch.ones(3, 3)
    twin.step()
    assert not torch.equal(twin_param, param)  # the first step updated, as configured


@pytest.mark.parametrize("name", NAMES)
def test_loading_a_state_dict_of_another_shape_raises(name):
    model = make_model(hidden=6)
    opt = FACTORIES[name](model.parameters())
    train(model, opt, 2)
    other = make_model(hidden=5)  # same number of parameters, other shapes
    other_opt = FACTORIES[name](other.parameters())
    with pytest.raises(ValueError):
        other_opt.load_state_dict(copy.deepcopy(opt.state_dict()))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_parameters_train_with_float32_state(name, device):
    x, y = teacher_classification(dtype=torch.bfloat16, device=device)
    model = classifier(torch.bfloat16, device=device)
    opt = FACTORIES[name](model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert losses[-1] < 0.7 * losses[0], losses
    state = floating_state(opt)
    assert state and all(v.dtype == torch.float32 for v in state)


@pytest.mark.parametrize("name", NAMES)
def test_float64_parameters_get_float64_state(name, device):
    model = make_model(dtype=torch.float64, device=device)
    opt = FACTORIES[name](model.parameters())
    train(model, opt, 5)
    state = floating_state(opt)
    assert state and all(v.dtype == torch.float64 for v in state)
    assert any(any(k.startswith("basis") or k.startswith("root") for k in s) for s in opt.state.values())


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradients_are_refused(name):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = FACTORIES[name](emb.parameters())
    emb(torch.tensor([1, 2, 3])).sum().backward()
    assert emb.weight.grad.is_sparse
    before = emb.weight.detach().clone()
    with pytest.raises((RuntimeError, ValueError, TypeError), match="sparse"):
        opt.step()
    assert torch.equal(emb.weight.detach(), before)


# --- NaN / Inf -----------------------------------------------------------------------------------


def _poisoned_step(model, i, value):
    model.zero_grad()
    mse(model, i).backward()
    model.a.weight.grad[1, 2] = value  # one element of one parameter


@pytest.mark.parametrize("when", ["first", "later", "refresh"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradient_raises_and_changes_nothing(name, value, when, device):
    model = make_model(device=device)
    opt = FACTORIES[name](model.parameters())
    done = {"first": 0, "later": 2, "refresh": REFRESH_AFTER[name]}[when]
    train(model, opt, done)
    if when == "refresh":  # check that the next step really is a refresh
        probe_model = make_model(device=device)
        probe = FACTORIES[name](probe_model.parameters())
        train(probe_model, probe, done)
        before_count = probe.total_refreshes()
        train(probe_model, probe, 1, start=done)
        assert probe.total_refreshes() > before_count
    params, state = params_of(model), copy.deepcopy(opt.state_dict())
    _poisoned_step(model, done, value)
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert_params_equal(params_of(model), params)
    assert_same_state_dict(opt.state_dict(), state)


@pytest.mark.parametrize("when", ["first", "refresh"])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradient_with_skip_policy_is_a_skipped_step(name, when, device):
    """With nonfinite='skip' a bad step is skipped without a trace: the run that saw it and went
    on is bit-identical to one that never saw it."""
    done = {"first": 0, "refresh": REFRESH_AFTER[name]}[when]
    model = make_model(device=device)
    clean = copy.deepcopy(model)
    opt = FACTORIES[name](model.parameters(), nonfinite="skip")
    clean_opt = FACTORIES[name](clean.parameters(), nonfinite="skip")
    train(model, opt, done)
    train(clean, clean_opt, done)
    params, state = params_of(model), copy.deepcopy(opt.state_dict())
    _poisoned_step(model, done, float("nan"))
    assert opt.step() is None  # no exception
    assert_params_equal(params_of(model), params)
    assert_same_state_dict(opt.state_dict(), state)
    train(model, opt, 6, start=done)
    train(clean, clean_opt, 6, start=done)
    assert_params_equal(params_of(model), params_of(clean))
    assert_same_state_dict(opt.state_dict(), clean_opt.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_saved_after_a_refused_first_step_loads(name, device):
    model = make_model(device=device)
    opt = FACTORIES[name](model.parameters())
    _poisoned_step(model, 0, float("nan"))
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    fresh = FACTORIES[name](model.parameters())
    fresh.load_state_dict(_save(opt, "torch.save"))
    train(model, fresh, 2)


# --- bad arguments -------------------------------------------------------------------------------

COMMON_BAD = [
    (dict(lr=-1e-3), "lr"),
    (dict(betas=(1.0, 0.9)), "betas"),
    (dict(betas=(-0.1, 0.9)), "betas"),
    (dict(betas=(0.9, 1.5)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(betas=(0.9, 0.99, 0.999)), "betas"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(precondition_frequency=0), "precondition_frequency"),
    (dict(precondition_frequency=1.5), "precondition_frequency"),
    (dict(nonfinite="ignore"), "nonfinite"),
]
BAD_ARGUMENTS = (
    [("SOAP", kw, m) for kw, m in COMMON_BAD]
    + [("ECS", kw, m) for kw, m in COMMON_BAD]
    + [("Shampoo", kw, m) for kw, m in COMMON_BAD]
    + [
        ("SOAP", dict(eps=-1e-8), "eps"),
        ("SOAP", dict(max_precond_dim=-1), "max_precond_dim"),
        ("SOAP", dict(max_precond_dim=2.5), "max_precond_dim"),
        ("ECS", dict(eps=-1e-8), "eps"),
        ("ECS", dict(max_precond_dim=-1), "max_precond_dim"),
        ("ECS", dict(max_precond_dim=2.5), "max_precond_dim"),
        ("ECS", dict(refresh="sometimes"), "refresh"),
        ("ECS", dict(refresh_method="svd"), "refresh_method"),
        ("ECS", dict(tolerance=2), "tolerance"),
        ("ECS", dict(tolerance=-0.1), "tolerance"),
        ("ECS", dict(max_qr_iterations=0), "max_qr_iterations"),
        ("Shampoo", dict(epsilon=-1e-12), "epsilon"),
        ("Shampoo", dict(max_preconditioner_dim=-1), "max_preconditioner_dim"),
        ("Shampoo", dict(max_preconditioner_dim=2.5), "max_preconditioner_dim"),
        ("Shampoo", dict(grafting="lion"), "grafting"),
        ("Shampoo", dict(root_method="cholesky"), "root_method"),
        ("Shampoo", dict(exponent_override=0), "exponent_override"),
        ("Shampoo", dict(start_preconditioning_step=0), "start_preconditioning_step"),
        ("Shampoo", dict(grafting_beta2=1.5), "grafting_beta2"),
    ]
)


@pytest.mark.parametrize(
    "name, kwargs, argument",
    BAD_ARGUMENTS,
    ids=[f"{n}-{next(iter(k))}={next(iter(k.values()))!r}" for n, k, _ in BAD_ARGUMENTS],
)
def test_bad_arguments_raise_value_error_naming_the_argument(name, kwargs, argument):
    param = nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=argument):
        FACTORIES[name]([param], **kwargs)


# --- they optimise -------------------------------------------------------------------------------

TRAINING = {
    "SOAP": dict(lr=1e-2, precondition_frequency=10),
    "ECS": dict(lr=1e-2, precondition_frequency=10),
    "Shampoo": dict(lr=1e-2, precondition_frequency=10, start_preconditioning_step=10),
}


@pytest.mark.parametrize("name", NAMES)
def test_a_small_classifier_learns(name, device):
    x, y = teacher_classification(n=512, device=device)
    model = classifier(torch.float32, device=device)
    opt = FACTORIES[name](model.parameters(), **TRAINING[name])
    losses = []
    for step in range(150):
        idx = torch.arange(step * 64, step * 64 + 64, device=device) % x.shape[0]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), y).item()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert final < 0.35 * losses[0], (losses[0], final)
    assert accuracy > 0.85
    assert opt.total_refreshes() > 0  # the Kronecker machinery was in use


@pytest.mark.parametrize(("saved", "loading"), [("Shampoo", "SOAP"), ("SOAP", "Shampoo"), ("Shampoo", "ECS")])
def test_loading_the_state_of_another_optimizer_raises_naming_the_entries_and_loads_nothing(saved, loading):
    """Same parameters and blocks, other state entries: refused before anything is loaded (before,
    the state loaded and the next step failed with a KeyError, or ran on entries it misread)."""
    model = make_model()
    source = FACTORIES[saved](model.parameters())
    train(model, source, 4)
    target_model = copy.deepcopy(model)
    target = FACTORIES[loading](target_model.parameters())
    train(target_model, target, 4)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"state_dict: the state of .* has entries .* does not keep"):
        target.load_state_dict(copy.deepcopy(source.state_dict()))
    after = target.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for key, state in before["state"].items():
        assert all(torch.equal(v, after["state"][key][k]) for k, v in state.items() if torch.is_tensor(v))


def test_a_4bit_shampoo_state_of_the_earlier_layout_is_refused_naming_its_entries():
    """Last version's 4-bit Shampoo stored each large root as ``root_basis`` codes and
    ``root_scales``; this one stores ``root`` (4-bit off-diagonal, float32 diagonal)."""
    model = nn.Sequential(nn.Linear(80, 64), nn.Tanh(), nn.Linear(64, 3))
    options = dict(state_precision="4bit", statistics_interval=1, precondition_frequency=2)
    opt = FACTORIES["Shampoo"](model.parameters(), **options)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 80)).square().mean().backward()
        opt.step()
    state_dict = copy.deepcopy(opt.state_dict())
    for stack in state_dict["state"].values():
        if "root0#codes" in stack:
            stack["root_basis0#codes"] = stack.pop("root0#codes")
            stack["root_basis0#scales"] = stack.pop("root0#scales")
            stack["root_scales0"] = stack.pop("root0#diagonal")
    twin = FACTORIES["Shampoo"](copy.deepcopy(model).parameters(), **options)
    with pytest.raises(ValueError, match=r"\['root_basis0', 'root_scales0'\]"):
        twin.load_state_dict(state_dict)
