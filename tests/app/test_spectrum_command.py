"""``conditioner spectrum`` end to end: the built-in model (numbers checked against a dense
eigendecomposition), a checkpoint saved as the bench saves it, and argument errors."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from torch import nn

from conditioner.app import cli
from conditioner.app.bench.presets import PRESETS
from conditioner.app.bench.run import RunResult
from conditioner.app.bench.runner import prepare_data, save_model
from conditioner.app.commands import spectrum as command
from conditioner.app.commands.spectrum import builtin_model, curvature_batches
from conditioner.app.data import load_dataset
from conditioner.app.models import build_model
from conditioner.curvature.exact import GGN, Hessian

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

SMALL = ("--examples", "48", "--batch-size", "32", "--probes", "4", "--lanczos-steps", "30", "--top-k", "3")


def spectrum(tmp_path, *args: str) -> int:
    """Run the command; argparse's own errors exit through SystemExit, ours return."""
    try:
        return cli.main(["spectrum", "--no-progress", "--out", str(tmp_path / "out"), *args])
    except SystemExit as exit:
        return exit.code


def test_builtin_model_spectrum_matches_dense_eigenvalues(tmp_path, capsys, monkeypatch):
    # The built-in model, trained once here and handed to the command (training is deterministic:
    # the command would train the very same one), so that its curvature can be checked densely.
    dataset = load_dataset("digits", seed=0)
    trained, last_loss = builtin_model(dataset, 0)
    monkeypatch.setattr(command, "builtin_model", lambda *args: (copy.deepcopy(trained), last_loss))
    assert spectrum(tmp_path, *SMALL) == 0
    out = tmp_path / "out"
    assert (out / "spectrum.png").stat().st_size > 0
    result = json.loads((out / "spectrum.json").read_text())
    assert result["parameters"] == 64 * 32 + 32 + 32 * 10 + 10 and result["examples"] == 48
    assert result["command"].startswith("conditioner spectrum")
    printed = capsys.readouterr().out
    assert "λ1" in printed and "trace" in printed

    # The same model and examples, their curvature as dense float64 matrices.
    model = copy.deepcopy(trained).double().eval()
    data = [(x.double(), y) for x, y in curvature_batches(dataset, 48, 32, 0)]
    for name, kind in (("hessian", Hessian), ("ggn", GGN)):
        numbers = result["operators"][name]
        top = numbers["top_eigenvalues"]
        assert top == sorted(top, reverse=True) and len(top) == 3
        dense = kind(model, nn.CrossEntropyLoss(), data).to_dense()
        expected = torch.linalg.eigvalsh(dense).flip(0)[:3]
        # A Ritz value lies within its residual of an eigenvalue; float32 products add ~1e-6 relative
        # error, so 1e-4 of λ1 on top of the residual is ample and still far below the gaps (> 1e-2·λ1).
        for value, residual, reference in zip(top, numbers["residuals"], expected.tolist()):
            assert abs(value - reference) <= residual + 1e-4 * expected[0], (name, value, reference)
        trace = numbers["trace"]
        assert trace["probes"] == 4 and trace["standard_error"] > 0
        # 4 probes: the estimate is only checked to be within 5 of its standard errors.
        assert abs(trace["estimate"] - float(dense.trace())) <= 5 * trace["standard_error"]
        nodes, weights = numbers["slq"]["nodes"], numbers["slq"]["weights"]
        assert len(nodes) == len(weights) == 4 and all(len(row) == 30 for row in nodes)
        assert all(math.isclose(sum(row), 1.0, rel_tol=1e-6) for row in weights)


def test_checkpoint_saved_by_the_bench_loads(tmp_path):
    preset = PRESETS["default"]
    dataset = prepare_data(load_dataset(preset.dataset, seed=0), preset)
    torch.manual_seed(3)
    model = build_model(preset.model, dataset, **preset.model_kwargs)
    path = tmp_path / "models" / "adamw-seed3.pt"
    save_model(path, model, preset, RunResult("adamw", 3, 0.03, {}))
    args = ("--checkpoint", str(path), "--examples", "16", "--probes", "2", "--lanczos-steps", "8", "--top-k", "2")
    assert spectrum(tmp_path, *args) == 0
    result = json.loads((tmp_path / "out" / "spectrum.json").read_text())
    assert result["model"]["preset"] == "default" and result["model"]["checkpoint"] == str(path)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    top = result["operators"]["ggn"]["top_eigenvalues"]
    assert len(top) == 2 and top[0] >= top[1] >= 0  # the GGN of cross-entropy is positive semi-definite


@pytest.mark.parametrize(
    "args,message",
    [
        (("--top-k", "0"), "argument --top-k: must be a finite integer > 0"),
        (("--top-k", "9", "--lanczos-steps", "5"), r"--top-k \(9\) must be at most --lanczos-steps \(5\)"),
        (("--probes", "x"), "argument --probes: expected an integer"),
        (("--checkpoint", "missing.pt"), "cannot read checkpoint"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(tmp_path, capsys, args, message):
    assert spectrum(tmp_path, *args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and error.startswith("conditioner spectrum: error:")
    assert re.search(message, error), error


def test_files_that_are_not_bench_checkpoints_are_refused(tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    assert spectrum(tmp_path, "--checkpoint", str(other)) == 2
    assert "is not a model saved by 'conditioner bench --save-model'" in capsys.readouterr().err
    unknown = tmp_path / "unknown.pt"
    torch.save({"state_dict": {}, "preset": "nope", "model": "mlp", "model_kwargs": {}}, unknown)
    assert spectrum(tmp_path, "--checkpoint", str(unknown)) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli.main(["spectrum", "--no-progress", "--out", str(blocker / "out")]) == 2
    assert "cannot write to output folder" in capsys.readouterr().err
