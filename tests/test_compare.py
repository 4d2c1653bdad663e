"""Sweeps (`fit --learning_rate 0.01,0.5`) and `retrain compare`: the real CLI, tiny real images."""

from __future__ import annotations

import json

import pytest

from conftest import make_dataset, run_cli
from test_report import browser, open_offline  # noqa: F401  (the Chromium fixture)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    data = make_dataset(root / "images", per_class=8, seed=3)
    out = root / "lr"
    p = run_cli("fit", data, "-o", out, "-q", "--learning_rate", "0.01,0.5", "--how_many_training_steps", "40")
    return out, p


def test_sweep_makes_one_run_per_value_and_reuses_bottlenecks(sweep):
    out, p = sweep
    runs = sorted(d.name for d in out.iterdir() if d.is_dir())
    assert runs == ["learning_rate=0.01", "learning_rate=0.5"]
    assert p.stdout.count("retrain fit: 24 images") == 2
    first, second = (json.loads((out / r / "report.json").read_text()) for r in runs)
    assert first["train"]["learning_rate"] == 0.01 and second["train"]["learning_rate"] == 0.5
    assert first["config"]["how_many_training_steps"] == second["config"]["how_many_training_steps"] == 40
    detail = second["timings"]["bottleneck_detail"]
    assert detail["computed"] == 0 and detail["cached"] == 24  # the second run computes nothing
    assert (out / runs[0] / "model.onnx").is_file() and (out / runs[1] / "report.html").is_file()


def test_compare_table_and_text_plot(sweep):
    out, _ = sweep
    p = run_cli("compare", out)
    lines = p.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["run", "test", "acc"] and "architecture" in lines[0] and "device" in lines[0]
    for name in ("learning_rate=0.01", "learning_rate=0.5"):
        r = json.loads((out / name / "report.json").read_text())
        row = next(line for line in lines if line.startswith(name))
        cols = row.split()
        assert cols[1] == f"{r['metrics']['test']['accuracy']:.1%}"
        assert cols[2] == f"{r['metrics']['validation']['accuracy']:.1%}"
        assert cols[4] == "40" and "efficientnet_lite0" in row and "sgd" in row
    plot = p.stdout[p.stdout.index("validation accuracy against step"):]
    assert "* learning_rate=0.01" in plot and "o learning_rate=0.5" in plot
    body = [line.split("|", 1)[1] for line in plot.splitlines() if "|" in line]
    assert any("*" in b for b in body) and any("o" in b for b in body)  # both lines are drawn


def test_compare_json_rows(sweep):
    out, _ = sweep
    rows = json.loads(run_cli("compare", out / "learning_rate=0.5", out / "learning_rate=0.01", "--json").stdout)
    assert [r["learning_rate"] for r in rows] == [0.5, 0.01]  # in the order given
    for r in rows:
        assert [s for s, _ in r["curve"]] == [10, 20, 30, 40]
        assert r["steps"] == 40 and r["architecture"] == "efficientnet_lite0+efficientnet_lite1"
        assert r["device"].startswith(("CPU", "GPU"))
    best = json.loads(run_cli("compare", out, "--json", "--sort", "test_accuracy").stdout)
    assert best[0]["test_accuracy"] >= best[1]["test_accuracy"]


def test_compare_html_in_a_browser(browser, sweep, tmp_path):  # noqa: F811
    out, _ = sweep
    html = tmp_path / "compare.html"
    run_cli("compare", out, "--html", html, "--no-plot")
    page, refused = open_offline(browser, html)
    assert refused == []
    rows = page.locator("#runs-table tr")
    assert rows.count() == 3
    assert page.locator("#runs-table").inner_text().count("efficientnet_lite0") == 2
    lines = page.locator("#chart-validation polyline.series")
    assert lines.count() == 2
    assert sorted(lines.nth(i).get_attribute("data-name") for i in range(2)) == [
        "learning_rate=0.01", "learning_rate=0.5"]
    assert page.locator("#chart-validation").is_visible()
    link = page.locator("#runs-table a").first.get_attribute("href")
    assert link.startswith("file://") and link.endswith("/report.html")
    page.close()


def test_compare_errors_are_one_line(tmp_path):
    p = run_cli("compare", tmp_path / "nope", check=False)
    assert p.returncode == 2 and "run folder not found" in p.stderr and p.stderr.count("\n") == 1
    (tmp_path / "empty").mkdir()
    p = run_cli("compare", tmp_path / "empty", check=False)
    assert p.returncode == 2 and "no report.json" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("fit", tmp_path, "--learning_rate", "0.1,fast", check=False)
    assert p.returncode == 2 and "--learning_rate" in p.stderr and p.stderr.count("\n") == 1


def test_a_bad_value_anywhere_in_a_sweep_fails_before_any_training(tmp_path):
    data = make_dataset(tmp_path / "images", per_class=4)
    out = tmp_path / "runs"
    p = run_cli("fit", data, "-o", out, "--architecture", "efficientnet_lite0,efficientnet_lit2", check=False)
    assert p.returncode == 2 and "Did you mean 'efficientnet_lite2'?" in p.stderr
    p = run_cli("fit", data, "-o", out, "--optimizer", "lbfgs,sdg", check=False)
    assert p.returncode == 2 and "Did you mean 'sgd'?" in p.stderr
    assert not out.exists()  # nothing trained, nothing half-written


@pytest.mark.slow
def test_architecture_sweep(tmp_path):
    """MobileNet-or-Inception, today: two backbones in one command, side by side."""
    data = make_dataset(tmp_path / "images", per_class=6, seed=5)
    out = tmp_path / "arch"
    run_cli("fit", data, "-o", out, "-q", "--architecture", "efficientnet_lite0,efficientnet_lite2")
    rows = json.loads(run_cli("compare", out, "--json").stdout)
    assert [r["architecture"] for r in rows] == ["efficientnet_lite0", "efficientnet_lite2"]
    assert all(r["test_accuracy"] is not None for r in rows)
