"""`retrain compare RUN...`: runs side by side, in one table and one plot.

A RUN is a run folder (it holds report.json) or a folder of run folders, such as the output
of a sweep (`retrain fit --learning_rate 0.005,0.1,1.0 -o runs/lr` -> runs/lr/learning_rate=...).
The table: test/validation accuracy, test cross entropy, steps, training and total time,
architecture (the backbone), bottlenecks computed per second, model size, optimizer, learning
rate, device: runs of different backbones side by side. The plot: validation accuracy against step,
one line per run; in the terminal as text, with --html FILE as a page with an SVG chart.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MAX_RUNS = 50  # a table and a plot stay readable up to here
PLOT_W, PLOT_H = 64, 16  # terminal plot, characters
MARKS = "*o+x#@%&=~"


def find_runs(paths) -> list[Path]:
    """Run folders named directly, or found one level below a folder (a sweep)."""
    from retrain.errors import DataError

    from retrain.run import REPORT, Run

    runs = []
    for p in map(Path, paths):
        if Run(p).has_report():
            runs.append(p)
        elif p.is_file() and p.name == REPORT:
            runs.append(p.parent)
        elif p.is_dir():
            inner = sorted(d for d in p.iterdir() if Run(d).has_report())
            if not inner:
                raise DataError(f"{p} is not a run folder and holds none (no report.json); give folders "
                                "written by retrain fit")
            runs += inner
        else:
            raise DataError(f"run folder not found: {p}")
    seen, out = set(), []
    for r in runs:
        k = r.resolve()
        if k not in seen:
            seen.add(k)
            out.append(r)
    if len(out) > MAX_RUNS:
        raise DataError(f"{len(out)} runs given; compare at most {MAX_RUNS} at a time")
    return out


def _names(runs: list[Path]) -> list[str]:
    """Short, unique names: the path below the runs' common folder."""
    if len(runs) == 1:
        return [runs[0].name]
    abs_ = [str(r.resolve()) for r in runs]
    common = os.path.commonpath(abs_)
    names = [os.path.relpath(a, common) for a in abs_]
    return [n if n != "." else r.name for n, r in zip(names, runs)]


def summarize(run: Path, name: str) -> dict:
    from retrain.report import load_report

    r = load_report(run)
    m = r.get("metrics", {})
    te, va = m.get("test", {}), m.get("validation", {})
    train, cfg, t = r.get("train", {}), r.get("config", {}), r.get("timings", {})
    hist = r.get("history") or []
    return {
        "name": name,
        "path": str(run),
        "test_accuracy": te.get("accuracy"),
        "validation_accuracy": va.get("accuracy"),
        "test_cross_entropy": te.get("cross_entropy"),
        "steps": train.get("steps", hist[-1]["step"] if hist else None),
        "train_s": t.get("train_s"),
        "total_s": t.get("total_s"),
        "architecture": r.get("architecture"),
        "bottleneck_images_per_s": _bottleneck_speed(t),
        "model_mb": _model_mb(run),
        "feature_dim": (r.get("backbone") or {}).get("feature_dim"),
        "optimizer": train.get("optimizer", cfg.get("optimizer")),
        "learning_rate": train.get("learning_rate"),
        "l2": train.get("l2"),
        "images": sum((r.get("class_counts") or {}).values()),
        "device": r.get("device"),
        "curve": [(h["step"], h.get("validation_accuracy")) for h in hist],
    }


def _bottleneck_speed(timings: dict):
    """Bottlenecks computed per second in that run (None where every one came from the cache)."""
    d = (timings or {}).get("bottleneck_detail") or {}
    n, s = d.get("computed"), d.get("seconds")
    return round(n / s, 1) if n and s else None


def _model_mb(run: Path):
    from retrain.run import MODEL

    try:
        return round((Path(run) / MODEL).stat().st_size / 1e6, 1)
    except OSError:
        return None


def compare(paths) -> list[dict]:
    runs = find_runs(paths)
    return [summarize(r, n) for r, n in zip(runs, _names(runs))]


COLUMNS = [  # (key, header, format)
    ("name", "run", "{}"), ("test_accuracy", "test acc", "{:.1%}"), ("validation_accuracy", "val acc", "{:.1%}"),
    ("test_cross_entropy", "test CE", "{:.4f}"), ("steps", "steps", "{}"), ("train_s", "train s", "{:.2f}"),
    ("total_s", "total s", "{:.1f}"), ("architecture", "architecture", "{}"),
    ("bottleneck_images_per_s", "img/s", "{:.0f}"), ("model_mb", "MB", "{:.1f}"), ("optimizer", "optimizer", "{}"),
    ("learning_rate", "lr", "{:g}"), ("device", "device", "{}"),
]
LEFT = {0, 7, 10, 12}  # text columns, left-aligned


def _cell(row, key, fmt) -> str:
    v = row.get(key)
    if v is None:
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def _short_device(d: str | None) -> str | None:
    """'CPU: Intel(R) Xeon(R) ... (2 cores); onnxruntime CPUExecutionProvider' -> a shorter form."""
    if not d:
        return d
    return d.replace("onnxruntime ", "").replace("ExecutionProvider", "").replace("(R)", "")


def format_table(rows: list[dict]) -> str:
    cells = [[h for _, h, _ in COLUMNS]]
    for r in rows:
        r = dict(r, device=_short_device(r.get("device")))
        cells.append([_cell(r, k, f) for k, _, f in COLUMNS])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = []
    for j, c in enumerate(cells):
        padded = (v.ljust(w) if i in LEFT else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths)))
        lines.append("  ".join(padded).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def text_plot(rows: list[dict], width: int = PLOT_W, height: int = PLOT_H) -> str:
    """Validation accuracy against step as characters: one mark per run, legend below."""
    pts = [(x, y) for r in rows for x, y in r["curve"] if y is not None and y == y]
    if not pts:
        return "(no validation accuracy recorded)"
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    y0 = max(0.0, y0 - 0.02)
    y1 = min(1.0, y1 + 0.02) if y1 > y0 else y0 + 0.05
    x1 = x1 if x1 > x0 else x0 + 1
    grid = [[" "] * width for _ in range(height)]
    for i, r in enumerate(rows):
        mark = MARKS[i % len(MARKS)]
        good = [(x, y) for x, y in r["curve"] if y is not None and y == y]
        # Draw each segment densely so a line reads as a line, not scattered dots.
        for (xa, ya), (xb, yb) in zip(good, good[1:] or good):
            for t in range(0, 9):
                x = xa + (xb - xa) * t / 8
                y = ya + (yb - ya) * t / 8
                c = round((x - x0) / (x1 - x0) * (width - 1))
                rr = height - 1 - round((y - y0) / (y1 - y0) * (height - 1))
                grid[rr][c] = mark
    lines = ["validation accuracy against step"]
    for j, row in enumerate(grid):
        yv = y1 - (y1 - y0) * j / (height - 1)
        label = f"{yv:6.1%}" if j in (0, height // 2, height - 1) else " " * 6
        lines.append(f"{label} |{''.join(row)}")
    lines.append(" " * 7 + "+" + "-" * width)
    lines.append(" " * 8 + f"{x0:g}".ljust(width - len(f"{x1:g}")) + f"{x1:g}")
    lines.append("  " + "   ".join(f"{MARKS[i % len(MARKS)]} {r['name']}" for i, r in enumerate(rows)))
    return "\n".join(lines)


def compare_html(rows: list[dict]) -> str:
    from retrain.charts import esc, svg_line_chart
    from retrain.report import page

    left = ' class="l"'
    head = "".join(f"<th{left if i in LEFT else ''}>{esc(h)}</th>" for i, (_, h, _) in enumerate(COLUMNS))
    best = max((r["test_accuracy"] for r in rows if r["test_accuracy"] is not None), default=None)
    body_rows = []
    for r in rows:
        r = dict(r, device=_short_device(r.get("device")))
        tds = []
        for i, (k, _, f) in enumerate(COLUMNS):
            v = _cell(r, k, f)
            if k == "name":
                v = f'<a href="{esc(Path(r["path"]).resolve().as_uri())}/report.html">{esc(v)}</a>'
            else:
                v = esc(v)
            strong = k == "test_accuracy" and best is not None and r["test_accuracy"] == best
            v = f"<b>{v}</b>" if strong else v
            tds.append(f"<td{left if i in LEFT else ''}>{v}</td>")
        body_rows.append("<tr>" + "".join(tds) + "</tr>")
    table = f'<table id="runs-table"><tr>{head}</tr>{"".join(body_rows)}</table>'
    chart = svg_line_chart([(r["name"], r["curve"], False) for r in rows], title="validation accuracy",
                           ylabel="validation accuracy", width=900, height=380, css_id="chart-validation")
    return page(f"retrain compare: {len(rows)} runs", ", ".join(r["path"] for r in rows),
                 ['<h2 id="table">Runs</h2>', table, '<h2 id="plot">Validation accuracy against step</h2>', chart])


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or folders of runs (a sweep's output)")
    p.add_argument("--html", metavar="FILE", help="also write the table and plot as an HTML page")
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    p.add_argument("--sort", choices=("name", "test_accuracy", "validation_accuracy", "total_s"), default=None,
                   help="order of the rows (default: as given; accuracies best first, time fastest first)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="table only in the terminal")


def main(args) -> int:
    from retrain.progress import print_json

    rows = compare(args.runs)
    if args.sort:
        rev = args.sort.endswith("accuracy")
        rows.sort(key=lambda r: (r.get(args.sort) is None, (-(r[args.sort] or 0)) if rev else (r.get(args.sort) or 0))
                  if args.sort != "name" else r["name"])
    if args.html:
        from retrain.report import write_html

        write_html(args.html, compare_html(rows))
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        print_json(rows)
        return 0
    print(format_table(rows))
    if args.plot:
        print()
        print(text_plot(rows))
    return 0
