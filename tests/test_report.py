"""report.html as a person sees it: rendered in a real headless Chromium, offline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import make_image, run_cli

CHROMIUM = os.environ.get("RETRAIN_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    """Playwright driving the system Chromium (never `playwright install`)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set RETRAIN_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (uses the system Chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def open_offline(browser, path: Path):
    """Open a local file with every network request refused; returns (page, refused URLs)."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    refused = []

    def route(r):
        if r.request.url.startswith(("file:", "data:")):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, refused


def images_loaded(page, selector: str) -> list[int]:
    """naturalWidth of each <img> (0 when the image failed to load)."""
    return page.evaluate(f"Array.from(document.querySelectorAll({json.dumps(selector)}))"
                         ".map(i => i.complete ? i.naturalWidth : 0)")


@pytest.fixture(scope="module")
def confusing_run(tmp_path_factory):
    """A run (real CLI) whose test set has mistakes: two classes of the same-looking pictures."""
    root = tmp_path_factory.mktemp("confusing")
    data = root / "images"
    for k, c in enumerate(("circle", "also_circle", "stripes")):
        for i in range(12):
            make_image(data / c / f"{c}_{i}.jpg", 0 if k < 2 else 1, 100 * k + i)
    out = root / "run"
    run_cli("fit", data, "-o", out, "-q", "--testing_percentage", "40", "--cross-validate-below", "0")  # a fixed split
    return out


def test_fit_writes_a_report_a_browser_shows(browser, confusing_run):
    report = json.loads((confusing_run / "report.json").read_text())
    te = report["metrics"]["test"]
    assert te["misclassified"], "the test set should hold mistakes between the two circle classes"
    page, refused = open_offline(browser, confusing_run / "report.html")
    assert refused == []  # self-contained: nothing fetched from the network
    assert page.title() == "retrain run: run"
    summary = page.locator("#summary").inner_text()
    assert f"{te['accuracy'] * 100:.1f}%" in summary and "test accuracy" in summary

    # confusion matrix: K x K numbers, the same as report.json, visible on screen
    cm = page.locator("#confusion-matrix")
    assert cm.is_visible()
    cells = [int(t) for t in cm.locator("td").all_inner_texts()]
    assert cells == [v for row in te["confusion"] for v in row]
    assert cm.locator("th").all_inner_texts()[1:4] == report["labels"]

    # per-class table: one row per class with the recall from report.json
    rows = page.locator("#per-class-table tr").all_inner_texts()[1:]
    assert len(rows) == 3
    for row in rows:
        name, _p, recall, *_ = row.split("\t")
        assert float(recall) == pytest.approx(te["per_class"][name.strip()]["recall"], abs=1e-3)

    # gallery: a thumbnail per mistake, every image loaded, captions with true/predicted
    figs = page.locator("#gallery figure")
    assert figs.count() == len(te["misclassified"])
    widths = images_loaded(page, "#gallery img")
    assert len(widths) == len(te["misclassified"]) and all(w > 0 for w in widths)
    first = te["misclassified"][0]
    cap = figs.first.inner_text()
    assert f"true {first['true']}" in cap and f"predicted {first['predicted']}" in cap
    box = figs.first.locator("img").bounding_box()
    assert box["width"] > 50 and box["height"] > 50  # actually drawn, not a broken icon

    # training curves, class-count bars, timings, config
    assert page.locator("#chart-accuracy polyline.series").count() == 2
    assert page.locator("#chart-classes rect.bar").count() == 3
    assert page.locator("#chart-classes").text_content().count("12") == 3
    assert "bottlenecks_s" in page.locator("#timings-table").inner_text()
    assert "efficientnet_lite0" in page.locator("#config-table").inner_text()
    assert page.locator("#skipped").is_visible() and page.locator("#duplicates").is_visible()
    page.close()


def test_report_command_rewrites_and_survives_moved_images(browser, confusing_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(confusing_run, run)
    (run / "report.html").unlink()
    report = json.loads((run / "report.json").read_text())
    # the images have moved since training: the report still renders, with a placeholder
    report["metrics"]["test"]["misclassified"][0]["path"] = str(tmp_path / "gone.jpg")
    report["skipped"] = [{"path": "/data/x/broken.jpg", "reason": "image file is truncated"}]
    (run / "report.json").write_text(json.dumps(report))
    p = run_cli("report", run)
    assert p.stdout.strip() == str(run / "report.html")
    page, refused = open_offline(browser, run / "report.html")
    assert refused == []
    assert page.locator("#gallery .missing").count() == 1
    assert page.locator("#gallery img").count() == len(report["metrics"]["test"]["misclassified"]) - 1
    assert "broken.jpg: image file is truncated" in page.locator("#skipped-list").inner_text()
    page.close()


def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    p = run_cli("report", tmp_path, check=False)
    assert p.returncode == 2 and "not a retrain run folder" in p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_evaluate_html_shows_the_mistakes(browser, tiny_run, tmp_path):
    """Mislabelled photos: stripes filed as 'circle' -> all show up in the gallery."""
    data = tmp_path / "eval"
    for i in range(4):
        make_image(data / "circle" / f"c{i}.jpg", 0, 900 + i)
        make_image(data / "stripes" / f"s{i}.jpg", 1, 950 + i)
    for i in range(3):
        make_image(data / "circle" / f"wrong{i}.jpg", 1, 980 + i)  # stripes in the circle folder
    html = tmp_path / "eval.html"
    p = run_cli("evaluate", tiny_run, data, "--json", "--html", html)
    m = json.loads(p.stdout)
    wrong = [r for r in m["misclassified"] if "wrong" in r["path"]]
    assert len(wrong) == 3
    page, refused = open_offline(browser, html)
    assert refused == []
    assert page.title().startswith("retrain evaluation")
    cells = [int(t) for t in page.locator("#confusion-matrix td").all_inner_texts()]
    assert cells == [v for row in m["confusion"] for v in row]
    assert all(w > 0 for w in images_loaded(page, "#gallery img"))
    text = page.locator("#gallery").inner_text()
    for i in range(3):
        assert f"wrong{i}.jpg" in text
    assert f"{m['accuracy'] * 100:.1f}%" in page.locator("#summary").inner_text()
    page.close()


def test_report_html_is_bounded(tmp_path):
    """Hundreds of mistakes: the page shows GALLERY_MAX thumbnails and stays small."""
    from retrain.galleries import GALLERY_MAX
    from retrain.report import write_eval_html

    img = make_image(tmp_path / "a.jpg", 0, 1, size=(1600, 1200))
    labels = ["a", "b"]
    m = {"n": 500, "accuracy": 0.0, "top5_accuracy": 1.0, "cross_entropy": 2.0, "macro_f1": 0.0,
         "labels": labels, "confusion": [[0, 250], [250, 0]],
         "per_class": {c: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 250} for c in labels},
         "misclassified": [{"path": str(img), "true": "a", "predicted": "b", "confidence": 0.9}] * 500,
         "skipped": [{"path": f"/x/{i}.jpg", "reason": "bad"} for i in range(5000)], "image_dir": str(tmp_path)}
    out = write_eval_html(m, tmp_path / "r.html")
    text = out.read_text()
    assert text.count("<figure") == GALLERY_MAX
    assert "452 more not shown" in text and "4800 more" in text
    assert out.stat().st_size < 2_000_000
