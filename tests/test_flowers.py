"""Integration on the real flowers (../shared/data/flower_photos): skipped where it is absent."""

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_default_fit_on_flowers_reaches_91_percent_and_evaluates(shared_flowers, tmp_path):
    run = tmp_path / "flowers"
    r = run_cli("fit", shared_flowers, "-o", run, "--cache-dir", tmp_path / "cache", timeout=900)
    rep = json.loads((run / "report.json").read_text())
    test = rep["metrics"]["test"]
    assert test["n"] >= 250
    assert test["accuracy"] >= 0.91, f"test accuracy {test['accuracy']:.3f}"
    assert rep["duplicates"], "the shared set has exact duplicates; the scan should find them"
    assert f"test accuracy {test['accuracy'] * 100:.1f}%" in r.stdout
    # Warm: every bottleneck cached, another optimizer setting.
    r2 = run_cli("fit", shared_flowers, "-o", tmp_path / "warm", "--cache-dir", tmp_path / "cache",
                 "--learning_rate", "0.1", "--how_many_training_steps", "300")
    assert "Bottlenecks:" not in r2.stderr  # nothing recomputed
    # evaluate the run on one class folder of its own test photos, copied out
    sub = tmp_path / "eval" / "daisy"
    sub.mkdir(parents=True)
    split = json.loads((run / "split.json").read_text())
    for f in [f for f in split["files"]["test"] if f.startswith("daisy/")][:15]:
        (sub / f.split("/")[-1]).write_bytes((shared_flowers / f).read_bytes())
    m = json.loads(run_cli("evaluate", run, tmp_path / "eval", "--json").stdout)
    assert m["n"] == 15 and m["per_class"]["daisy"]["recall"] >= 0.8
