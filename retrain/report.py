"""report.html: one self-contained page per run (or evaluation) that a person would rather read.

Everything is inline: charts are SVG drawn by retrain.charts (no matplotlib, no JavaScript,
no CDN), thumbnails are small JPEG data URIs (retrain.galleries: at most GALLERY_MAX of them,
THUMB_SIDE px), so the file opens offline, can be mailed, and stays small. `retrain report RUN`
rewrites it from RUN/report.json (e.g. after a new version of retrain).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from retrain.charts import esc, svg_bar_chart, svg_histogram, svg_line_chart
from retrain.galleries import gallery_html, label_issues_html

LIST_MAX = 200  # rows of skipped files / duplicate groups shown

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin:0 0 12px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #e2e4e8;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px} .card span{color:#666;font-size:12px}
.warn{background:#fff8e1;border:1px solid #f0d48a;border-radius:6px;padding:6px 12px;margin:4px 0}
table{border-collapse:collapse;background:#fff} td,th{border:1px solid #e2e4e8;padding:3px 8px;text-align:right}
th{background:#f0f1f4} td.l,th.l{text-align:left}
table.cm td{min-width:44px;text-align:center;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start;margin-bottom:10px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;background:#fff;border:1px solid #e2e4e8;border-radius:6px;padding:6px;width:172px}
figure img{display:block;max-width:160px;max-height:160px;margin:0 auto}
figcaption{font-size:12px;margin-top:4px;word-break:break-all} .bad{color:#c62828} .ok{color:#2e7d32}
.missing{width:160px;height:100px;display:flex;align-items:center;justify-content:center;color:#999;background:#eee}
svg text{font:11px system-ui,sans-serif;fill:#444} .mono{font-family:ui-monospace,monospace;font-size:12px}
details{margin:6px 0} summary{cursor:pointer}
"""


def _pct(v) -> str:
    return "n/a" if v is None else f"{v * 100:.1f}%"


def confusion_html(labels: list[str], conf: list[list[int]]) -> str:
    """Heat map as a table: colour = share of the true class (row) predicted as each column."""
    head = "".join(f'<th title="predicted {esc(c)}">{esc(c)}</th>' for c in labels)
    rows = []
    for c, r in zip(labels, conf):
        total = sum(r) or 1
        cells = []
        for j, v in enumerate(r):
            share = v / total
            diag = labels[j] == c
            rgb = "46,125,50" if diag else "198,40,40"
            alpha = share if diag else share ** 0.5  # mistakes are rare: make a few of them visible
            fg = "#fff" if alpha > 0.55 else "#222"
            cells.append(f'<td style="background:rgba({rgb},{alpha:.3f});color:{fg}" '
                         f'title="true {esc(c)}, predicted {esc(labels[j])}: {v} ({share:.0%})">{v}</td>')
        rows.append(f'<tr><th class="l">{esc(c)}</th>{"".join(cells)}</tr>')
    return (f'<table class="cm" id="confusion-matrix"><tr><th class="l">true \\ predicted</th>{head}</tr>'
            + "".join(rows) + "</table>")


def per_class_html(m: dict) -> str:
    rows = "".join(
        f'<tr><td class="l">{esc(c)}</td><td>{r["precision"]:.3f}</td><td>{r["recall"]:.3f}</td>'
        f'<td>{r["f1"]:.3f}</td><td>{r["support"]}</td></tr>'
        for c, r in m["per_class"].items())
    return ('<table id="per-class-table"><tr><th class="l">class</th><th>precision</th><th>recall</th>'
            f'<th>F1</th><th>support</th></tr>{rows}</table>')



def _l2_grid_html(grid: list[dict], chosen) -> str:
    """L-BFGS tries several L2 strengths; this is how each did (the chosen one in bold)."""
    rows = []
    for g in grid:
        b = (lambda x: f"<b>{x}</b>") if g.get("l2") == chosen else (lambda x: x)
        l2 = f"{g['l2']:g}" if isinstance(g.get("l2"), (int, float)) else esc(g.get("l2"))
        ce = g.get("validation_cross_entropy")
        ce = f"{ce:.4f}" if isinstance(ce, (int, float)) else "n/a"
        rows.append(f'<tr><td>{b(l2)}</td><td>{g.get("iterations", "")}</td>'
                    f'<td>{b(_pct(g.get("train_accuracy")))}</td><td>{b(_pct(g.get("validation_accuracy")))}</td>'
                    f'<td>{ce}</td></tr>')
    return ('<p class="sub">L2 strengths tried (strongest first, each warm-started from the previous); '
            'the one with the lowest validation cross entropy is kept; the curves above follow this path.</p><table id="l2-table"><tr><th>L2</th>'
            '<th>iterations</th><th>train accuracy</th><th>validation accuracy</th>'
            f'<th>validation cross entropy</th></tr>{"".join(rows)}</table>')


def _kv_table(d: dict, css_id: str) -> str:
    rows = "".join(f'<tr><td class="l">{esc(k)}</td><td class="l mono">{esc(v)}</td></tr>'
                   for k, v in d.items())
    return f'<table id="{css_id}">{rows}</table>'


def _path_list(rows: list[str], css_id: str) -> str:
    shown = "".join(f"<li class=\"mono\">{esc(r)}</li>" for r in rows[:LIST_MAX])
    more = f"<li>... and {len(rows) - LIST_MAX} more</li>" if len(rows) > LIST_MAX else ""
    return f'<ul id="{css_id}">{shown}{more}</ul>'


GENERATOR = '<meta name="generator" content="retrain">'  # how retrain knows a page is its own


def page(title: str, subtitle: str, body: list[str]) -> str:
    """A whole self-contained HTML page (no external assets) with retrain's style."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + GENERATOR +
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><main><h1>{esc(title)}</h1><p class=\"sub\">{esc(subtitle)}</p>"
            + "\n".join(body) + "</main></body></html>\n")


def _results_sections(m: dict, root: str | None, what: str) -> list[str]:
    """Confusion matrix, per-class table and the gallery of mistakes for one set of metrics."""
    body = [f'<h2 id="confusion">Confusion matrix ({esc(what)}, n={m["n"]})</h2>',
            '<p class="sub">Rows: true class; columns: predicted class; colour: share of the row.</p>',
            f'<div class="row">{confusion_html(m["labels"], m["confusion"])}</div>',
            f'<h2 id="per-class">Precision and recall per class ({esc(what)})</h2>', per_class_html(m),
            f'<h2 id="misclassified">Misclassified {esc(what)} images ({len(m["misclassified"])})</h2>',
            '<p class="sub">Most confident mistakes first. Mislabelled photos often show up here.</p>',
            gallery_html(m["misclassified"], root)]
    return body


def _skipped_section(skipped: list[dict], root) -> list[str]:
    rows = [f"{os.path.relpath(s['path'], root) if root else s['path']}: {s['reason']}" for s in skipped]
    body = [f'<h2 id="skipped">Skipped files ({len(skipped)})</h2>']
    body.append(_path_list(rows, "skipped-list") if rows else '<p class="sub">None: every image was read.</p>')
    return body



def novelty_html(nov: dict | None, *, evaluation: bool = False) -> list[str]:
    """The "unknown" section: the novelty threshold and what it rejects, inside and outside
    photos (a run's report["novelty"], or an evaluation's m["open_set"])."""
    if not nov:
        return []
    body = ['<h2 id="novelty">Unknown: photos of none of the classes</h2>']
    if nov.get("off"):
        return body + [f'<p class="sub">Off ({esc(nov["off"])}): the model has no novelty output.</p>']
    if evaluation:
        ins, out = nov.get("inside") or {}, nov.get("outside")
        cards = [("answered unknown (these photos)", _pct(ins.get("rejected"))),
                 ("open-set accuracy (these photos)", _pct(ins.get("open_set_accuracy")))]
        if out:
            cards += [("answered unknown (outside photos)", _pct(out.get("rejected"))),
                      ("AUROC", "n/a" if nov.get("auroc") is None else f"{nov['auroc']:.3f}"),
                      ("outside photos", out.get("n", 0))]
        body.append(f'<p class="sub">Score: {esc(nov.get("score"))}; novelty threshold '
                    f'{esc(nov.get("novelty_threshold"))}.</p>')
    else:
        t = nov.get("test") or {}
        h = nov.get("held_out_classes") or {}
        thr = nov.get("threshold")
        cards = [("novelty threshold", "none" if thr is None else f"{thr:.4f}"),
                 ("coverage asked", _pct(nov.get("coverage"))),
                 ("test photos answered unknown", _pct(t.get("rejected"))),
                 ("held-out class: AUROC (mean)", "n/a" if h.get("mean_auroc") is None else f"{h['mean_auroc']:.3f}"),
                 ("held-out class: rejected (mean)", _pct(h.get("mean_rejected")))]
        body.append(f'<p class="sub">{esc(nov.get("description", ""))}. The threshold keeps '
                    f'{_pct(nov.get("coverage"))} of in-distribution photos ({esc(nov.get("threshold_fitted_on", ""))})'
                    + (f'; {esc(nov["why_no_threshold"])}' if nov.get("why_no_threshold") else "") + '.</p>')
    body.append('<div class="cards" id="novelty-cards">' + "".join(
        f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in cards) + "</div>")
    if nov.get("histogram"):
        body.append('<div class="row">' + svg_histogram(nov["histogram"], title="novelty: inside and outside photos",
                                                        css_id="chart-novelty") + "</div>")
    rows = (nov.get("held_out_classes") or {}).get("classes") or []
    if rows and not evaluation:
        body.append('<p class="sub">Open-set protocol: each class in turn is left out of the references and the '
                    'threshold, as if the model had never seen it; its photos are then the outside photos, the '
                    'other classes\' test photos the inside ones.</p>')
        cells = "".join(
            f'<tr><td class="l">{esc(r["class"])}</td><td>{r["n_outside"]}</td>'
            f'<td>{"n/a" if r["auroc"] is None else format(r["auroc"], ".3f")}</td><td>{_pct(r["rejected"])}</td>'
            f'<td>{_pct(r["inside_rejected"])}</td></tr>' for r in rows)
        body.append('<table id="novelty-held-out"><tr><th class="l">class left out</th><th>its photos</th>'
                    '<th>AUROC</th><th>rejected</th><th>inside rejected</th></tr>' + cells + '</table>')
    ex = nov.get("examples")
    if ex and not evaluation:
        body.append(f'<p class="sub" id="novelty-examples">--unknown-examples: {ex.get("n", 0)} photos of no class '
                    f'({esc(ex.get("folder", ""))}) moved the threshold from {esc(ex.get("threshold_before"))} to '
                    f'{esc(ex.get("threshold"))}: they are rejected {_pct(ex.get("examples_rejected_before"))} -> '
                    f'{_pct(ex.get("examples_rejected"))} (they chose it: not a test); train + validation kept '
                    f'{_pct(ex.get("inside_kept"))}.</p>')
    return body


def _run_summary(report: dict) -> list[str]:
    """The cards at the top of a run's page and its data warnings."""
    metrics = report.get("metrics", {})
    te, va, tr = metrics.get("test", {}), metrics.get("validation", {}), metrics.get("train", {})
    timings = report.get("timings", {})
    n_images = sum(report.get("class_counts", {}).values())
    train = report.get("train", {})
    cards = [("test accuracy", _pct(te.get("accuracy"))), ("validation accuracy", _pct(va.get("accuracy"))),
             ("train accuracy", _pct(tr.get("accuracy"))), ("images", n_images),
             ("classes", len(report.get("labels", []))), ("total time", f"{timings.get('total_s', 0):.1f} s"),
             ("architecture", report.get("architecture", "?")), ("optimizer", train.get("optimizer", "?")),
             ("bottleneck precision", report.get("bottleneck_precision", "fp32"))]
    body = ['<div class="cards" id="summary">' + "".join(
        f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in cards) + "</div>"]
    warns = report.get("data_warnings") or []
    if warns:
        body.append(f'<h2 id="warnings">Data warnings ({len(warns)})</h2>')
        body += [f'<div class="warn">{esc(w)}</div>' for w in warns[:LIST_MAX]]
    return body


def _curves_section(report: dict) -> list[str]:
    """Training curves (accuracy, cross entropy, the learning rate) and the L2 grid."""
    hist = report.get("history") or []
    train = report.get("train", {})
    body = ['<h2 id="curves">Training curves</h2>']
    extra = ""
    if train.get("optimizer") == "lbfgs":
        extra = f" L-BFGS iterations, L2 {train.get('l2')} chosen on validation."
    body.append(f'<p class="sub">Evaluated every {esc(report.get("config", {}).get("eval_step_interval", "?"))} '
                f'steps.{esc(extra)}</p>')
    acc = [("train", [(h["step"], h.get("train_accuracy")) for h in hist], False),
           ("validation", [(h["step"], h.get("validation_accuracy")) for h in hist], True)]
    ce = [("train", [(h["step"], h.get("cross_entropy")) for h in hist], False),
          ("validation", [(h["step"], h.get("validation_cross_entropy")) for h in hist], True)]
    body.append('<div class="row">'
                + svg_line_chart(acc, title="accuracy", ylabel="accuracy", ylim=(0, 1), css_id="chart-accuracy")
                + svg_line_chart(ce, title="cross entropy", ylabel="cross entropy", ylim=(0, None),
                                 css_id="chart-cross-entropy")
                + "</div>")
    if train.get("grid"):
        body.append(_l2_grid_html(train["grid"], train.get("l2")))
    if any("learning_rate" in h for h in hist):
        lr = [("learning rate", [(h["step"], h.get("learning_rate")) for h in hist], False)]
        body.append(svg_line_chart(lr, title="learning rate", css_id="chart-learning-rate"))
    return body


def _splits_section(metrics: dict) -> list[str]:
    """The table of accuracy and cross entropy of each split."""
    te, va, tr = metrics.get("test", {}), metrics.get("validation", {}), metrics.get("train", {})
    splits = "".join(
        f'<tr><td class="l">{n}</td><td>{m.get("n", 0)}</td><td>{_pct(m.get("accuracy"))}</td>'
        f'<td>{"n/a" if m.get("cross_entropy") is None else format(m["cross_entropy"], ".4f")}</td></tr>'
        for n, m in (("train", tr), ("validation", va), ("test", te)) if m)
    return ['<h2 id="splits">Accuracy by split</h2><table id="split-table"><tr><th class="l">split</th>'
            f'<th>images</th><th>accuracy</th><th>cross entropy</th></tr>{splits}</table>']


def _data_sections(report: dict, root) -> list[str]:
    """Images per class, the split, skipped files and exact duplicates."""
    body = ['<h2 id="classes">Images per class</h2>',
            svg_bar_chart(report.get("class_counts", {}), title="images per class", css_id="chart-classes")]
    sc = (report.get("split_counts") or {})
    if sc:
        body.append(f'<p class="sub">Split: {sc.get("train", 0)} train, {sc.get("validation", 0)} validation, '
                    f'{sc.get("test", 0)} test.</p>')
    body += _skipped_section(report.get("skipped") or [], root)
    dups = report.get("duplicates") or []
    body.append(f'<h2 id="duplicates">Exact duplicates ({len(dups)} groups)</h2>')
    if dups:
        rows = ["  =  ".join(os.path.relpath(p, root) if root else p for p in g) for g in dups]
        body.append('<p class="sub">Identical files; each group is kept on one side of the split.</p>')
        body.append(_path_list(rows, "duplicates-list"))
    else:
        body.append('<p class="sub">None found.</p>')
    return body


def _timings_and_config(report: dict) -> list[str]:
    timings = report.get("timings", {})
    body = ['<h2 id="timings">Timings</h2>']
    tm = {k: (f"{v:.2f} s" if isinstance(v, (int, float)) else v) for k, v in timings.items()
          if not isinstance(v, dict)}
    detail = timings.get("bottleneck_detail") or {}
    for k, v in detail.items():
        tm[f"bottlenecks: {k}"] = v
    if report.get("images_per_second"):
        tm["images per second (end to end)"] = report["images_per_second"]
    tm["device"] = report.get("device", "?")
    body.append(_kv_table(tm, "timings-table"))
    body.append('<h2 id="config">Config</h2>')
    cfg = dict(report.get("config") or {})
    cfg["retrain_version"] = report.get("retrain_version", "?")
    body.append(_kv_table(cfg, "config-table"))
    return body


def run_html(report: dict) -> str:
    """The page for a run's report dict (see retrain.fit.fit)."""
    metrics = report.get("metrics", {})
    te, va = metrics.get("test", {}), metrics.get("validation", {})
    root = report.get("image_dir")
    body = _run_summary(report) + _curves_section(report) + _splits_section(metrics)
    shown, what = (te, "test") if te.get("n") else (va, "validation")
    if shown.get("n"):
        body += _results_sections(shown, root, what)
    body += novelty_html(report.get("novelty"))
    body += label_issues_html(report.get("label_issues"), root)
    body += _data_sections(report, root)
    body += _timings_and_config(report)
    title = f"retrain run: {Path(report.get('output') or 'run').name}"
    sub = f"{report.get('output', '')}, trained on {root} ({report.get('architecture', '?')})"
    return page(title, sub, body)


def eval_html(m: dict) -> str:
    """The page for `retrain evaluate` metrics."""
    cards = [("accuracy", _pct(m.get("accuracy"))), ("top-5 accuracy", _pct(m.get("top5_accuracy"))),
             ("macro F1", "n/a" if m.get("macro_f1") is None else f"{m['macro_f1']:.3f}"),
             ("cross entropy", "n/a" if m.get("cross_entropy") is None else f"{m['cross_entropy']:.4f}"),
             ("images", m.get("n", 0)), ("skipped", len(m.get("skipped") or []))]
    body = ['<div class="cards" id="summary">' + "".join(
        f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in cards) + "</div>"]
    root = m.get("image_dir")
    if m.get("n"):
        body += _results_sections(m, root, "evaluation")
        support = {c: r["support"] for c, r in m["per_class"].items()}
        body.append('<h2 id="classes">Images per class</h2>')
        body.append(svg_bar_chart(support, title="images per class", css_id="chart-classes"))
    body += novelty_html(m.get("open_set"), evaluation=True)
    body += _skipped_section(m.get("skipped") or [], root)
    mp = Path(str(m.get("model", "model")))
    title = f"retrain evaluation: {mp.parent.name if mp.name == 'model.onnx' and mp.parent.name else mp.name}"
    sub = f"model {m.get('model', '?')} on {root}" + (" (test-time augmentation)" if m.get("tta") else "")
    return page(title, sub, body)


def is_retrain_page(path) -> bool:
    try:
        with open(path, "rb") as f:
            return GENERATOR.encode() in f.read(4096)
    except OSError:
        return False


def write_html(path, text: str, *, flag: str = "--html") -> Path:
    """Write a page atomically; an existing file is replaced only if it is a retrain page."""
    from retrain.run import write_user_file

    return write_user_file(path, text, flag=flag, looks_ours=is_retrain_page)


def write_run_html(run_folder, report: dict, path=None) -> Path:
    """Write report.html for a run (into the run folder unless `path` is given)."""
    if path is None:  # inside the run folder: retrain's own file
        from retrain.files import write_text_atomic
        from retrain.run import REPORT_HTML

        return write_text_atomic(Path(run_folder) / REPORT_HTML, run_html(report))
    return write_html(path, run_html(report), flag="--output")


def write_eval_html(metrics: dict, path) -> Path:
    return write_html(path, eval_html(metrics))


def load_report(run) -> dict:
    """report.json of a run folder, with one clear error when it is not one."""
    from retrain.errors import ModelError

    from retrain.run import Run

    run = Path(run)
    f = Run(run).report_path if run.is_dir() else run
    if not f.exists():
        raise ModelError(f"{run} is not a retrain run folder (no report.json); give the folder written by "
                         "retrain fit")
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{f}: cannot read it as a retrain report ({e})") from None


def add_arguments(p) -> None:
    p.add_argument("run", help="run folder written by retrain fit")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of RUN/report.html")


def main(args) -> int:
    report = load_report(args.run)
    run = Path(args.run)
    out = write_run_html(run if run.is_dir() else run.parent, report, args.output)
    print(out)
    return 0
