"""SVG charts for retrain's HTML pages (report.html, compare.html), drawn here as text: no
matplotlib, no JavaScript, no CDN, so a page opens offline. Each function returns one inline
<svg> element (or a one-line <p> when there is nothing to draw).
"""

from __future__ import annotations

import html

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
          "#7f7f7f", "#bcbd22")


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    import math

    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks, v = [], start
    while v <= hi + 1e-9 * step:
        ticks.append(round(v, 10))
        v += step
    return ticks


def svg_line_chart(series, *, title: str, xlabel: str = "step", ylabel: str = "", width: int = 520,
                   height: int = 280, ylim=None, css_id: str | None = None) -> str:
    """Inline SVG: series = [(name, [(x, y), ...], dashed)] -> one polyline each, with a legend."""
    pts = [(x, y) for _, xy, _ in series for x, y in xy if y is not None and y == y]
    if not pts:
        return f'<p class="sub">{esc(title)}: no data</p>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = ylim if ylim else (min(ys), max(ys))
    if y0 is None:
        y0 = min(ys)
    if y1 is None:
        y1 = max(ys)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    L, R, T, B = 52, 12, 26, 40
    longest = max(len(name) for name, _, _ in series)
    lw = min(280, 34 + 7 * longest) if len(series) > 1 else 0  # legend column
    pw, ph = width - L - R - lw, height - T - B

    def sx(x):
        return L + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return T + ph - (min(max(y, y0), y1) - y0) / (y1 - y0) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}"'
           + (f' id="{esc(css_id)}"' if css_id else "") + ' style="background:#fff;border:1px solid #e2e4e8">',
           f'<text x="{L}" y="16" style="font-weight:600;font-size:13px">{esc(title)}</text>']
    for t in _nice_ticks(y0, y1):
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>'
                   f'<text x="{L - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    for t in _nice_ticks(x0, x1):
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{T + ph}" y2="{T + ph + 4}" stroke="#888"/>'
                   f'<text x="{sx(t):.1f}" y="{T + ph + 16}" text-anchor="middle">{t:g}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>')
    out.append(f'<text x="{L + pw / 2}" y="{height - 6}" text-anchor="middle">{esc(xlabel)}</text>')
    if ylabel:
        out.append(f'<text transform="translate(12,{T + ph / 2}) rotate(-90)" '
                   f'text-anchor="middle">{esc(ylabel)}</text>')
    for i, (name, xy, dashed) in enumerate(series):
        c = COLORS[i % len(COLORS)]
        good = [(x, y) for x, y in xy if y is not None and y == y]
        if not good:
            continue
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in good)
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        out.append(f'<polyline class="series" data-name="{esc(name)}" points="{d}" fill="none" stroke="{c}" '
                   f'stroke-width="1.8"{dash}/>')
        if len(good) == 1:
            out.append(f'<circle cx="{sx(good[0][0]):.1f}" cy="{sy(good[0][1]):.1f}" r="3" fill="{c}"/>')
        if lw:
            ly = T + 8 + i * 16
            out.append(f'<line x1="{width - lw}" x2="{width - lw + 18}" y1="{ly}" y2="{ly}" stroke="{c}" '
                       f'stroke-width="2"{dash}/><text x="{width - lw + 22}" y="{ly + 4}">{esc(name[:36])}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_bar_chart(counts: dict, *, title: str, width: int = 520, css_id: str | None = None) -> str:
    """Horizontal bars, one per class, with the count at the end."""
    if not counts:
        return ""
    names = list(counts)
    top = max(counts.values()) or 1
    row = 22
    L = min(200, 12 + 7 * max(len(n) for n in names))
    height = 30 + row * len(names)
    pw = width - L - 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{esc(title)}"' + (f' id="{esc(css_id)}"' if css_id else "")
           + ' style="background:#fff;border:1px solid #e2e4e8">',
           f'<text x="8" y="16" style="font-weight:600;font-size:13px">{esc(title)}</text>']
    for i, n in enumerate(names):
        y = 26 + i * row
        w = pw * counts[n] / top
        out.append(f'<text x="{L - 6}" y="{y + 13}" text-anchor="end">{esc(n[:28])}</text>'
                   f'<rect class="bar" x="{L}" y="{y}" width="{w:.1f}" height="{row - 6}" fill="{COLORS[0]}"/>'
                   f'<text x="{L + w + 4:.1f}" y="{y + 13}">{counts[n]}</text>')
    out.append("</svg>")
    return "".join(out)


def svg_histogram(hist: dict, *, title: str, width: int = 560, height: int = 280,
                  css_id: str | None = None) -> str:
    """Two overlaid histograms over shared bins (inside: blue, outside: red), each scaled to its
    own share of photos, with the threshold as a dashed line."""
    edges, a, b = hist.get("edges") or [], hist.get("inside") or [], hist.get("outside") or []
    if len(edges) < 2:
        return f'<p class="sub">{esc(title)}: no data</p>'
    na, nb = max(sum(a), 1), max(sum(b), 1)
    shares = [[v / na for v in a], [v / nb for v in b]]
    top = max(max(x) for x in shares if x) or 1
    L, R, T, B = 48, 12, 26, 72
    pw, ph = width - L - R, height - T - B
    x0, x1 = edges[0], edges[-1]

    def sx(x):
        return L + (x - x0) / ((x1 - x0) or 1) * pw

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{esc(title)}"' + (f' id="{esc(css_id)}"' if css_id else "")
           + ' style="background:#fff;border:1px solid #e2e4e8">',
           f'<text x="{L}" y="16" style="font-weight:600;font-size:13px">{esc(title)}</text>',
           f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#bbb"/>']
    for t in _nice_ticks(x0, x1):
        out.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{T + ph}" y2="{T + ph + 4}" stroke="#888"/>'
                   f'<text x="{sx(t):.1f}" y="{T + ph + 16}" text-anchor="middle">{t:g}</text>')
    names = (f"{hist.get('inside_label', 'inside')} (n={sum(a)})", f"{hist.get('outside_label', 'outside')} (n={sum(b)})")
    for k, (vals, color) in enumerate(zip(shares, (COLORS[0], COLORS[1]))):
        for i, v in enumerate(vals):
            if v:
                h = v / top * ph
                out.append(f'<rect class="bar-{("inside", "outside")[k]}" x="{sx(edges[i]):.1f}" y="{T + ph - h:.1f}" '
                           f'width="{max(sx(edges[i + 1]) - sx(edges[i]) - 1, 1):.1f}" height="{h:.1f}" '
                           f'fill="{color}" fill-opacity="0.55"/>')
        ly = height - 30 + 15 * k
        out.append(f'<rect x="{L + 4}" y="{ly - 9}" width="10" height="10" fill="{color}" fill-opacity="0.55"/>'
                   f'<text x="{L + 18}" y="{ly}">{esc(names[k][:80])}</text>')
    thr = hist.get("threshold")
    if thr is not None and x0 <= thr <= x1:
        out.append(f'<line id="{esc(css_id or "hist")}-threshold" x1="{sx(thr):.1f}" x2="{sx(thr):.1f}" y1="{T}" '
                   f'y2="{T + ph}" stroke="#222" stroke-dasharray="5,3"/><text x="{sx(thr) + 4:.1f}" y="{T + 12}">'
                   f'threshold {thr:.3f}: unknown above</text>')
    out.append(f'<text x="{L + pw / 2}" y="{T + ph + 30}" text-anchor="middle">novelty (share of each set per bin)</text>')
    out.append("</svg>")
    return "".join(out)
