"""Make docs/report.png: train on the flowers, then screenshot report.html in headless Chromium.

    python scripts/screenshot_report.py                      # ../shared/data/flower_photos
    python scripts/screenshot_report.py --data DIR --out docs/report.png --height 1900

Runs the real CLI (`retrain fit DATA -o RUN`), then
`chromium --headless --screenshot` on RUN/report.html (offline: a file:// URL).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flower_photos"),
                   help="image folder to train on (default: the shared flower_photos)")
    p.add_argument("--run", default=str(ROOT / "runs" / "flowers"), help="run folder to write")
    p.add_argument("--cache-dir", default=None, help="bottleneck cache (default: retrain's)")
    p.add_argument("--out", default=str(ROOT / "docs" / "report.png"), help="PNG to write")
    p.add_argument("--width", type=int, default=1200)
    p.add_argument("--height", type=int, default=1900, help="the top of the page, in CSS pixels")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--skip-fit", action="store_true", help="reuse RUN/report.html as it is")
    a = p.parse_args()

    run = Path(a.run)
    if not a.skip_fit:
        cmd = [sys.executable, "-m", "retrain", "fit", a.data, "-o", str(run), "-q"]
        if a.cache_dir:
            cmd += ["--cache-dir", a.cache_dir]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    html = run / "report.html"
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [a.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--force-device-scale-factor=1", f"--user-data-dir={profile}",
               f"--window-size={a.width},{a.height}", f"--screenshot={out.resolve()}", html.resolve().as_uri()]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    from PIL import Image

    im = Image.open(out)
    im.load()
    im.save(out, optimize=True)  # smaller file, same pixels
    print(f"wrote {out} ({im.size[0]}x{im.size[1]}, {out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
