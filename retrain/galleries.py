"""The photo galleries of retrain's report pages: the misclassified photos and the possibly
mislabelled ones, each a small JPEG thumbnail inline as a data: URI (at most GALLERY_MAX of
them, THUMB_SIDE px) with its path and a caption, so the page opens offline and stays small.
"""

from __future__ import annotations

import base64
import io
import os

from retrain.charts import esc

GALLERY_MAX = 48  # misclassified thumbnails shown (most confident mistakes first)
THUMB_SIDE = 160  # px, longer side of a gallery thumbnail


def thumbnail_uri(path: str, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG of the image as a data: URI, or None when it cannot be read any more."""
    from retrain.errors import ImageError
    from retrain.images import open_image

    try:
        im = open_image(path, draft_size=side)
    except ImageError:
        return None
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(path, root: str | None, css_class: str, caption: str) -> str:
    """One thumbnail of a gallery with its path (relative to `root`) and a caption (HTML)."""
    p = str(path)
    name = os.path.relpath(p, root) if root and os.path.isabs(p) else p
    uri = thumbnail_uri(p) if os.path.isabs(p) or os.path.exists(p) else None
    img = (f'<img src="{uri}" alt="{esc(name)}">' if uri
           else f'<div class="missing" title="{esc(p)}">image not found</div>')
    return (f'<figure class="{css_class}">{img}<figcaption><span class="mono">{esc(name)}</span><br>'
            f'{caption}</figcaption></figure>')


def gallery_html(misclassified: list[dict], root: str | None = None, limit: int = GALLERY_MAX) -> str:
    if not misclassified:
        return '<p class="sub" id="gallery-empty">No misclassified images.</p>'
    items = [_figure(r["path"], root, "mis", f'true <b class="ok">{esc(r["true"])}</b>, predicted <b class="bad">'
                     f'{esc(r["predicted"])}</b> ({r["confidence"] * 100:.0f}%)') for r in misclassified[:limit]]
    more = (f'<p class="sub">{len(misclassified) - limit} more not shown (all are listed in report.json).</p>'
            if len(misclassified) > limit else "")
    return f'<div class="gallery" id="gallery">{"".join(items)}</div>{more}'


def label_issues_html(li: dict | None, root: str | None = None, limit: int = GALLERY_MAX // 2) -> list[str]:
    """The "possibly mislabelled photos" section (retrain.mislabels: confident learning on
    out-of-fold predictions): the most confused class pairs and thumbnails of the suspects,
    each with its folder, the class it looks like and its score. [] for a report without one."""
    if not li:
        return []
    if li.get("skipped"):
        return ['<h2 id="label-issues">Possibly mislabelled photos</h2>',
                f'<p class="sub" id="label-issues-skipped">{esc(li["skipped"])}</p>']
    sus = li.get("suspects") or []
    body = [f'<h2 id="label-issues">Possibly mislabelled photos ({len(sus)})</h2>',
            '<p class="sub" style="word-break:normal">Photos whose folder disagrees most with out-of-fold '
            f'predictions ({li.get("folds")}-fold '
            f'heads on the bottlenecks, L2 {esc(li.get("l2"))}: no photo is judged by a head that saw its label), '
            f'flagged by confident learning, most suspect first (score 1: the head is sure the folder is wrong). '
            '"Looks like" is the closest class; a photo of none of them belongs elsewhere. To move them into a '
            f'review folder (and back): <span class="mono">retrain check {esc(root or "IMAGE_DIR")} --labels '
            '--move-to REVIEW/</span></p>']
    pairs = li.get("confused_pairs") or []
    if pairs:
        rows = "".join(f'<tr><td class="l">{esc(p["labelled"])}</td><td class="l">{esc(p["looks_like"])}</td>'
                       f'<td>{p["count"]}</td></tr>' for p in pairs[:10])
        body.append('<table id="confused-pairs"><tr><th class="l">in the folder of</th><th class="l">looks like</th>'
                    f'<th>suspects</th></tr>{rows}</table>')
    if not sus:
        body.append('<p class="sub" id="label-gallery-empty">None found.</p>')
        return body
    items = [_figure(r["path"], root, "suspect", f'in <b class="bad">{esc(r["label"])}</b>, looks like <b class="ok">'
                     f'{esc(r["suggested"])}</b> (score {r["score"]:.2f})') for r in sus[:limit]]
    body.append(f'<div class="gallery" id="label-gallery">{"".join(items)}</div>')
    if len(sus) > limit:
        body.append(f'<p class="sub">{len(sus) - limit} more not shown (all are listed in report.json).</p>')
    return body
