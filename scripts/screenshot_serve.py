"""Screenshot of the `retrain serve` page after uploading a photo (docs/serve.png).

    python scripts/screenshot_serve.py RUN [PHOTO] [--out docs/serve.png]

Starts `retrain serve RUN` on a free loopback port, opens the page in headless Chromium
(Debian's /usr/bin/chromium via Playwright), picks PHOTO and saves a full-page PNG.
"""

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("photo", nargs="?", default=str(ROOT / "examples/unseen/roses/12240303_80d87f77a3_n.jpg"))
    ap.add_argument("--out", default=str(ROOT / "docs/serve.png"))
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = subprocess.Popen([sys.executable, "-m", "retrain", "serve", a.run, "--port", str(port)])
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium",
                                  args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                        "--disable-background-networking", "--disable-component-update"])
            page = b.new_page(viewport={"width": 1000, "height": 720})
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("input[type=file]", a.photo)
            page.wait_for_timeout(1500)
            page.screenshot(path=a.out, full_page=True)
            b.close()
        print(f"wrote {a.out}")
    finally:
        srv.terminate()
        srv.wait()


if __name__ == "__main__":
    main()
