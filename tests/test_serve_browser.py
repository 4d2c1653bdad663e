"""The web page of `retrain serve` in a real headless Chromium (Debian's, driven by Playwright).

Uploads a real photo and reads the predicted label, bars and time from the page; checks that
the page loads nothing from anywhere but the server (it must work offline), shows the server's
error for a file that is not an image, and works behind an API key (HTTP Basic in the browser).
"""

import shutil
from pathlib import Path

import httpx
import pytest

from test_serve import KEY, Server, train_photos

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
        # a fake camera (Chromium's test pattern) and no permission prompt, for the camera test
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(flowers_run):
    s = Server(flowers_run)
    yield s
    s.stop()


def expect(locator):
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def watch(page, origin):
    """Every URL the page asks for, and console errors."""
    seen = {"requests": [], "errors": []}
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    return seen


def test_upload_a_photo_and_read_the_label(browser, server, flowers_run, tmp_path):
    photo, cls = train_photos(flowers_run)[2]
    api = httpx.post(f"{server.url}/v1/classify", content=photo.read_bytes()).json()
    assert api["label"] == cls

    context = browser.new_context()
    # Nothing but the server may be fetched: anything else is aborted and recorded.
    outside = []
    context.route("**/*", lambda route: (route.continue_() if route.request.url.startswith(server.url)
                                         else (outside.append(route.request.url), route.abort())))
    page = context.new_page()
    seen = watch(page, server.url)
    page.goto(f"{server.url}/")
    page.wait_for_selector("body[data-state=ready]", state="attached", timeout=20_000)
    assert "efficientnet_lite0" in page.text_content("#model")
    assert api["model_id"] in page.text_content("#model")

    page.set_input_files("#file", str(photo))
    page.wait_for_selector("body[data-state=done]", state="attached", timeout=30_000)
    assert page.text_content("#label") == cls
    bars = page.query_selector_all("#bars li")
    assert len(bars) == 5
    assert [b.get_attribute("data-label") for b in bars] == [p["label"] for p in api["predictions"]]
    top = float(bars[0].get_attribute("data-score"))
    assert top == pytest.approx(api["predictions"][0]["score"], abs=1e-4)
    width = page.eval_on_selector("#bars li .fill", "e => e.style.width")
    assert float(width.rstrip("%")) == pytest.approx(top * 100, abs=0.2)
    assert page.text_content("#time").split()[1] == "ms" and int(page.text_content("#time").split()[0]) > 0
    assert page.is_visible("#preview") and page.eval_on_selector("#preview", "e => e.naturalWidth") > 0
    assert page.is_hidden("#error")

    # A second photo replaces the first result.
    photo2, cls2 = train_photos(flowers_run)[0]
    page.set_input_files("#file", str(photo2))
    expect(page.locator("#label")).to_have_text(cls2, timeout=30_000)

    # Not an image: the server's message is shown, and the page keeps working.
    bad = tmp_path / "notes.jpg"
    bad.write_text("these are notes, not a photo")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("body[data-state=error]", state="attached", timeout=30_000)
    assert "not an image" in page.text_content("#error")
    page.set_input_files("#file", str(photo))
    page.wait_for_selector("body[data-state=done]", state="attached", timeout=30_000)
    assert page.text_content("#label") == cls and page.is_hidden("#error")

    assert outside == [], f"the page fetched from outside the server: {outside}"
    assert all(u.startswith(server.url) or u.startswith(("blob:", "data:")) for u in seen["requests"]), seen
    assert not [e for e in seen["errors"] if "422" not in e], seen["errors"]  # only the expected bad upload
    context.close()


def test_drop_a_photo(browser, server, flowers_run):
    photo, cls = train_photos(flowers_run)[1]
    page = browser.new_page()
    page.goto(f"{server.url}/")
    page.wait_for_selector("body[data-state=ready]", state="attached", timeout=20_000)
    # A real drop event carrying the photo as a File, as a drag from the desktop would.
    data = list(photo.read_bytes())
    page.evaluate("""([bytes, name]) => {
        const file = new File([new Uint8Array(bytes)], name, {type: 'image/jpeg'});
        const dt = new DataTransfer(); dt.items.add(file);
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", [data, photo.name])
    page.wait_for_selector("body[data-state=done]", state="attached", timeout=30_000)
    assert page.text_content("#label") == cls
    page.close()


def test_take_a_photo_with_the_camera(browser, server):
    """Chromium's fake camera stands in for a webcam: open it, take the photo, get labels."""
    context = browser.new_context()
    context.grant_permissions(["camera"], origin=server.url)
    page = context.new_page()
    page.goto(f"{server.url}/")
    page.wait_for_selector("body[data-state=ready]", state="attached", timeout=20_000)
    page.click("#camera-start")
    page.wait_for_selector("#camera-shoot", state="visible", timeout=20_000)
    page.wait_for_selector("#video:not([hidden])", timeout=20_000)
    for _ in range(50):  # the stream's first frame
        if page.eval_on_selector("#video", "v => v.videoWidth") > 0:
            break
        page.wait_for_timeout(100)
    page.click("#camera-shoot")
    page.wait_for_selector("body[data-state=done]", state="attached", timeout=30_000)
    labels = httpx.get(f"{server.url}/v1/model").json()["labels"]
    # Chromium's fake camera films a test pattern, no flower: it may well be "unknown" (novelty),
    # with the best five labels still shown as bars
    assert page.text_content("#label") in labels + ["unknown"]
    assert len(page.query_selector_all("#bars li")) == 5
    page.click("#camera-stop")
    assert page.is_hidden("#video")
    context.close()


def test_page_behind_an_api_key(browser, flowers_run):
    s = Server(flowers_run, "--api-key", KEY)
    try:
        from playwright.sync_api import Error as PlaywrightError

        photo, cls = train_photos(flowers_run)[3]
        page = browser.new_page()
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            page.goto(f"{s.url}/")  # no key, no page (a headless browser cannot show the prompt)
        page.close()
        context = browser.new_context(http_credentials={"username": "me", "password": KEY})
        page = context.new_page()
        page.goto(f"{s.url}/")
        page.wait_for_selector("body[data-state=ready]", state="attached", timeout=20_000)
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("body[data-state=done]", state="attached", timeout=30_000)
        assert page.text_content("#label") == cls
        context.close()
    finally:
        s.stop()
