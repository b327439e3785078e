"""``conditioner bench`` end to end on the digits, and its parts: fairness (same initialisation and
data order for every optimizer), steps to the reference's loss, aggregates, divergence, argument
errors, Ctrl-C, missing peers and data, the learning-rate sweep."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from conditioner.app import cli
from conditioner.app.bench import optimizers as registry
from conditioner.app.bench import runner as runner_module
from conditioner.app.bench.optimizers import OptimizerSpec, build_optimizer
from conditioner.app.bench.presets import PRESETS, lr_factor
from conditioner.app.bench.report import format_table
from conditioner.app.bench.run import BatchOrder, Curve, RunResult, train_run
from conditioner.app.bench.runner import BenchResults, initial_model, prepare_data
from conditioner.app.bench.summary import describe, steps_to_target, summarize
from conditioner.app.cli import add_run_options, run_command
from conditioner.app.data import DataUnavailableError, load_dataset
from conditioner.optim.memory import state_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    preset = PRESETS["default"]
    return preset, prepare_data(load_dataset("digits", 0), preset)


def bench(tmp_path, *args: str) -> int:
    """Run the command; argparse's own errors exit through SystemExit, ours return."""
    try:
        return cli.main(["bench", "--no-progress", "--out", str(tmp_path / "out"), *args])
    except SystemExit as exit:
        return exit.code


# --- end to end ----------------------------------------------------------------------------------


def test_bench_end_to_end(tmp_path, capsys):
    code = bench(
        tmp_path,
        *("--optimizers", "adamw", "sgd", "ecshampoo-adaptive"),
        *("--steps", "30", "--eval-every", "10", "--seeds", "0", "1", "--save-model"),
    )
    assert code == 0
    out = tmp_path / "out"
    for name in ("results.json", "report.md", "val_loss_vs_steps.png", "val_loss_vs_time.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] and not results["interrupted"]
    assert results["seeds"] == [0, 1] and results["reference"] == "adamw"
    assert results["command"].startswith("conditioner bench") and results["versions"]["torch"] == torch.__version__
    assert results["preset"]["name"] == "default" and results["preset"]["steps"] == 30
    for name in ("adamw", "sgd", "ecshampoo-adaptive"):
        summary = results["results"][name]["summary"]
        for key in (
            "lr",
            "final_train_loss",
            "final_val_loss",
            "final_val_accuracy",
            "steps_to_target",
            "time_to_target",
            "median_step_time",
            "state_bytes",
            "wall_time",
        ):
            assert key in summary, key
        assert summary["ok"] == 2 and summary["final_val_loss"]["n"] == 2
        assert {"mean", "std", "min", "max", "n"} <= set(summary["final_val_loss"])
        runs = results["results"][name]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        for run in runs:
            assert run["curve"]["step"] == [0, 10, 20, 30]
            assert len(run["curve"]["val_loss"]) == 4 and run["curve"]["val_loss"][-1] < run["curve"]["val_loss"][0]
            assert run["state_bytes"] > 0 and run["median_step_time"] > 0
    assert results["results"]["ecshampoo-adaptive"]["summary"]["refreshes"]["mean"] > 0
    assert results["results"]["adamw"]["summary"]["refreshes"] is None
    # AdamW reaches its own final loss at its last evaluation at the latest.
    assert all(r["steps_to_target"] is not None for r in results["results"]["adamw"]["runs"])
    report = (out / "report.md").read_text()
    assert "![" in report and "val_loss_vs_steps.png" in report and "val_loss_vs_time.png" in report
    printed = capsys.readouterr().out
    for column in ("val loss", "steps to ref", "step ms", "state", "refreshes"):
        assert column in printed
    saved = torch.load(out / "models" / "sgd-seed1.pt")
    assert saved["preset"] == "default" and saved["model"] == "mlp" and saved["seed"] == 1
    assert set(saved["state_dict"]) == set(initial_model(PRESETS["default"], load_dataset("digits"), 0).state_dict())

    # Fairness: per seed, one initialisation and one data order for every optimizer.
    for seed in (0, 1):
        runs = [next(r for r in results["results"][n]["runs"] if r["seed"] == seed) for n in results["optimizers"]]
        assert len({r["init_fingerprint"] for r in runs}) == 1
        assert len({r["data_fingerprint"] for r in runs}) == 1
    first = [results["results"]["adamw"]["runs"][s] for s in (0, 1)]
    assert first[0]["init_fingerprint"] != first[1]["init_fingerprint"]
    assert first[0]["data_fingerprint"] != first[1]["data_fingerprint"]


def test_every_optimizer_gets_the_same_initial_weights_and_batches(monkeypatch, digits):
    """Hook into the runner: the model each run receives, and the batches it draws."""
    preset, data = digits
    preset = preset.replace(steps=3, eval_every=3)
    seen = []
    original = runner_module.train_run

    def spy(model, data, optimizer, *args, **kwargs):
        seen.append((optimizer, kwargs["seed"], [t.clone() for t in model.state_dict().values()]))
        return original(model, data, optimizer, *args, **kwargs)

    monkeypatch.setattr(runner_module, "train_run", spy)
    runner_module.Runner(preset, data, ["adamw", "soap", "sgd"], [4, 5], progress=False).run()
    assert [(o, s) for o, s, _ in seen] == [(o, s) for s in (4, 5) for o in ("adamw", "soap", "sgd")]
    for seed in (4, 5):
        states = [w for _, s, w in seen if s == seed]
        for other in states[1:]:
            assert all(torch.equal(a, b) for a, b in zip(states[0], other))
    a = BatchOrder(100, 32, seed=4)
    b = BatchOrder(100, 32, seed=4)
    batches = [a.next() for _ in range(7)]  # crosses two epochs
    assert all(torch.equal(x, b.next()) for x in batches)
    assert sorted(torch.cat(batches[:3]).tolist()) == sorted(set(torch.cat(batches[:3]).tolist()))


# --- pieces ----------------------------------------------------------------------------------------


def test_steps_to_target_on_synthetic_curves():
    steps, times = [0, 10, 20, 30], [0.0, 1.0, 2.0, 3.0]
    assert steps_to_target(steps, times, [2.0, 1.0, 0.5, 0.4], 0.5) == (20, 2.0)
    assert steps_to_target(steps, times, [2.0, 1.0, 0.5, 0.4], 0.45) == (30, 3.0)
    assert steps_to_target(steps, times, [2.0, 1.0, 0.5, 0.4], 0.1) == (None, None)
    assert steps_to_target(steps, times, [2.0, math.nan, 0.3, 0.2], 0.5) == (20, 2.0)
    assert steps_to_target(steps, times, [2.0, 0.3, math.inf, 0.2], 0.5) == (10, 1.0)
    assert steps_to_target(steps, times, [2.0, 1.0], None) == (None, None)
    assert steps_to_target(steps, times, [2.0, 1.0], math.nan) == (None, None)


def test_describe_reports_mean_and_spread():
    stat = describe([1.0, 2.0, 3.0, None, math.nan])
    assert stat == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert describe([5])["std"] == 0.0
    assert describe([None, math.inf]) is None


def test_learning_rate_schedule():
    factors = [lr_factor(s, 100, 0.05, 0.1) for s in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[5:], factors[6:]))
    assert lr_factor(0, 1, 0.05, 0.1) == pytest.approx(1.0)


def test_diverged_run_is_reported_not_raised(digits):
    preset, data = digits
    model = initial_model(preset, data, 0)
    run = train_run(model, data, "sgd", 1e4, {"momentum": 0.9}, seed=0, steps=30, batch_size=64, eval_every=10, progress=False)
    assert run.status == "diverged" and run.error
    assert math.isnan(run.final_val_loss)
    ok = RunResult("adamw", 0, 1e-3, {}, curve=Curve([0, 10], [0.0, 0.1], [None, 1.0], [2.0, 1.0], [0.1, 0.5]))
    results = BenchResults(preset, ["adamw", "sgd"], [0], runs={"adamw": [ok], "sgd": [run]}, lrs={"adamw": 1e-3, "sgd": 1e4})
    summary = summarize(results)
    assert summary["optimizers"]["sgd"]["diverged"] == 1 and summary["optimizers"]["sgd"]["final_val_loss"] is None
    table = format_table(summary, results)
    assert "diverged" in table.splitlines()[4]


def test_peer_optimizers_build_and_step(digits):
    """Each installed peer: constructed as the registry says, a few steps, state counted."""
    preset, data = digits
    for name in registry.PEERS:
        if registry.unavailable_reason(name):
            continue
        model = initial_model(preset, data, 0)
        lr, hyperparameters = preset.setting(name)
        run = train_run(model, data, name, lr, hyperparameters, seed=0, steps=4, batch_size=64, eval_every=4, progress=False)
        assert run.status == "ok", (name, run.error)
        assert run.state_bytes > 0 and run.refreshes is None


def test_state_bytes_counts_each_storage_once():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = build_optimizer("adamw", [p], 1e-3)
    p.grad = torch.ones(10)
    opt.step()
    assert state_bytes(opt) == 2 * 10 * 4 + opt.state[p]["step"].untyped_storage().nbytes()


# --- the command's failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (["--preset", "nope"], "invalid choice"),
        (["--optimizers", "adamw", "nope"], "unknown optimizer"),
        (["--steps", "0"], "--steps"),
        (["--steps", "-5"], "--steps"),
        (["--seeds", "x"], "--seeds"),
        (["--lr-sweep", "0"], "--lr-sweep"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(tmp_path, capsys, args, words):
    assert bench(tmp_path, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and words in err[0]


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = cli.main(["bench", "--no-progress", "--steps", "2", "--out", str(blocker / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot write" in err[0]


def test_missing_data_set(tmp_path, capsys, monkeypatch):
    def missing(name, seed=0):
        raise DataUnavailableError("install it with `pip install something`")

    monkeypatch.setattr("conditioner.app.data.load_dataset", missing)
    assert bench(tmp_path, "--steps", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install something" in err[0]


def test_missing_peer_is_skipped_with_a_notice(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(
        registry.OPTIMIZERS, "ghost", OptimizerSpec("ghost", "absent", torch.optim.SGD, 0.1, package="no_such_package_xyz")
    )
    assert bench(tmp_path, "--optimizers", "adamw", "ghost", "--steps", "2", "--seed", "0") == 0
    err = capsys.readouterr().err
    assert 'pip install -c constraints.txt -e ".[bench]"' in err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["optimizers"] == ["adamw"] and "ghost" in results["skipped"]
    assert bench(tmp_path, "--optimizers", "ghost") == 2


def test_ctrl_c_keeps_finished_runs(tmp_path, capsys, monkeypatch):
    original = runner_module.train_run
    calls = []

    def interrupted_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_module, "train_run", interrupted_second)
    code = bench(tmp_path, "--optimizers", "adamw", "sgd", "--steps", "5", "--seeds", "0", "1")
    assert code == 130
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["interrupted"] and not results["complete"] and results["finished_runs"] == 1
    assert len(results["results"]["adamw"]["runs"]) == 1 and results["results"]["sgd"]["runs"] == []
    assert (out / "report.md").is_file() and "Interrupted" in (out / "report.md").read_text()
    assert "interrupted" in capsys.readouterr().err


def test_lr_sweep_keeps_the_best_and_reuses_its_run(tmp_path, monkeypatch):
    original = runner_module.train_run
    calls = []

    def counting(*args, **kwargs):
        calls.append((args[2], kwargs["seed"], args[3]))
        return original(*args, **kwargs)

    monkeypatch.setattr(runner_module, "train_run", counting)
    monkeypatch.setattr(runner_module, "EDGE_EXTENSIONS", 0)
    code = bench(tmp_path, "--optimizers", "adamw", "--steps", "10", "--seeds", "0", "1", "--lr-sweep", "0.01", "1")
    assert code == 0
    base = PRESETS["default"].setting("adamw")[0]
    assert [(o, s) for o, s, _ in calls] == [("adamw", 0), ("adamw", 0), ("adamw", 1)]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    sweep = results["lr_sweep"]
    assert sweep["factors"] == [0.01, 1.0] and [p["lr"] for p in sweep["points"]["adamw"]] == pytest.approx([base * 0.01, base])
    best = min(sweep["points"]["adamw"], key=lambda p: p["final_val_loss"])
    assert sweep["chosen"]["adamw"] == pytest.approx(best["lr"])
    assert results["results"]["adamw"]["summary"]["lr"] == pytest.approx(best["lr"])
    assert all(r["lr"] == pytest.approx(best["lr"]) for r in results["results"]["adamw"]["runs"])
    assert calls[2][2] == pytest.approx(best["lr"])


def test_lr_sweep_extends_the_grid_past_an_edge_until_the_best_is_bracketed(tmp_path, monkeypatch):
    """A fake loss that falls with the rate up to 9x the preset's: the grid 1/3, 1, 3 grows to
    9 (still the best, on the edge) and 27 (worse), and stops there with 9 chosen."""
    base = PRESETS["default"].setting("adamw")[0]

    def fake_run(model, data, optimizer, lr, hyperparameters, **kwargs):
        run = RunResult(optimizer, kwargs["seed"], lr, hyperparameters)
        run.curve.step.append(0)
        run.curve.wall_time.append(0.0)
        run.curve.train_loss.append(None)
        run.curve.val_loss.append(abs(math.log(lr / (9 * base))) + 1.0)
        run.curve.val_accuracy.append(None)
        return run

    monkeypatch.setattr(runner_module, "train_run", fake_run)
    assert bench(tmp_path, "--optimizers", "adamw", "--seed", "0", "--lr-sweep") == 0
    sweep = json.loads((tmp_path / "out" / "results.json").read_text())["lr_sweep"]
    assert [p["lr"] / base for p in sweep["points"]["adamw"]] == pytest.approx([1 / 3, 1, 3, 9, 27])
    assert sweep["chosen"]["adamw"] == pytest.approx(9 * base)


@pytest.mark.parametrize(
    "losses, expected",
    [
        ({1 / 3: 3.0, 1.0: 2.0, 3.0: 1.0}, 9.0),
        ({1 / 3: 1.0, 1.0: 2.0, 3.0: 3.0}, 1 / 9),
        ({1 / 3: 2.0, 1.0: 1.0, 3.0: 3.0}, None),
        ({1 / 3: 2.0, 1.0: 1.0, 3.0: math.inf}, None),
        ({1 / 3: math.inf, 1.0: math.inf, 3.0: math.inf}, None),
    ],
)
def test_beyond_edge(losses, expected):
    result = runner_module._beyond_edge(losses)
    assert result == (None if expected is None else pytest.approx(expected))


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0 and "conditioner" in capsys.readouterr().out
    assert cli.main([]) == 0 and "bench" in capsys.readouterr().out
    assert cli.main(["bench", "--list"]) == 0 and "chars-gpt" in capsys.readouterr().out


def test_threads_option_is_applied_before_the_command_runs(monkeypatch):
    applied = []
    monkeypatch.setattr(torch, "set_num_threads", applied.append)
    seen = []
    parser = argparse.ArgumentParser()
    add_run_options(parser)
    args = parser.parse_args(["--threads", "3", "--no-progress"])
    assert run_command("test", lambda a: seen.append(list(applied)) or 0, args, "interrupted") == 0
    assert seen == [[3]] and args.no_progress
    applied.clear()
    assert run_command("test", lambda a: 0, parser.parse_args([]), "interrupted") == 0
    assert applied == []
