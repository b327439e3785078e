"""``conditioner influence`` end to end on a small setting, and its argument errors."""

from __future__ import annotations

import json

import pytest

from conditioner.app.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_runs_and_writes_results_and_plot(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    arguments = ["influence", "--experiments", "digits", "--methods", "gradient", "ekfac", "--queries", "6",
                 "--subsets", "4", "--repeats", "1", "--out", str(out), "--no-progress"]
    assert main(arguments) == 0
    report = json.loads((out / "results.json").read_text())
    rows = report["experiments"]["digits"]["methods"]
    assert set(rows) == {"gradient", "ekfac"}
    for row in rows.values():
        assert -1.0 <= row["lds"] <= 1.0 and row["seconds"] > 0
    assert report["experiments"]["digits"]["damping"] > 0
    assert (out / "lds.png").stat().st_size > 0
    assert "ekfac" in capsys.readouterr().out
    cached = sorted(p.name for p in (out / "lds-cache").rglob("*") if p.is_file())
    assert main(arguments) == 0  # the second run reuses every retrained model
    assert sorted(p.name for p in (out / "lds-cache").rglob("*") if p.is_file()) == cached


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--methods", "trak"], "invalid choice"),
        (["--fraction", "1.5"], "--fraction"),
        (["--subsets", "0"], "--subsets"),
        (["--experiments", "cifar"], "invalid choice"),
    ],
)
def test_bad_arguments_get_one_line_and_status_2(arguments, message, tmp_path, capsys) -> None:
    try:
        status = main(["influence", "--out", str(tmp_path), *arguments])
    except SystemExit as stop:  # argparse stops at parse time; later checks return the status
        status = stop.code
    assert status == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


@pytest.mark.slow  # the dense 6570 × 6570 GGN and its eigh: about 2.5 minutes on 1 thread
def test_the_curvature_study_runs_reduced_and_chooses_a_damping_per_curvature(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    arguments = ["influence", "--experiments", "bhm", "--curvatures", "ggn", "block_ggn", "ekfac", "kfac", "gradient",
                 "--queries", "6", "--validation-queries", "4", "--subsets", "4", "--repeats", "1", "--out", str(out),
                 "--no-progress"]
    assert main(arguments) == 0
    report = json.loads((out / "results.json").read_text())["experiments"]["bhm"]
    assert report["fractions"] == [0.3, 0.5, 0.7, 0.9] and report["parameters"] == 6570
    assert report["train_examples"] == 1617 and report["evaluation_queries"] == 6
    rows = report["curvatures"]
    assert set(rows) == {"ggn", "block_ggn", "ekfac", "kfac", "gradient"}
    assert rows["gradient"]["damping_ratio"] is None and rows["ekfac"]["damping"] > 0
    for row in rows.values():
        assert -1.0 <= row["lds"]["mean"] <= 1.0 and len(row["lds_per_query"]) == 6
    assert "ggn-block_ggn" in report["paired"] and (out / "bhm.png").stat().st_size > 0
    assert "paired differences" in capsys.readouterr().out
