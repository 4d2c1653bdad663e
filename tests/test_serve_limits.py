"""`retrain serve` under hostile or careless input: the real CLI in a subprocess on 127.0.0.1.

Malformed files whose decoders raise odd exceptions, a flood of huge-pixel images, a body over the
upload limit from clients that write it all before reading, and absurd numeric flags.
One server on the tiny run with the default limits (10 MB bodies, default pixel budgets).
"""

import concurrent.futures
import io
import json
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
from conftest import run_cli
from test_serve import Server, _jpeg, png_bytes

MB = 1024 * 1024


@pytest.fixture(scope="module")
def plain(tiny_run):
    s = Server(tiny_run)
    yield s
    out = s.stop()
    assert "Traceback" not in out and "internal error" not in out, out


# ------------------------------------------------------------- decoders that raise odd errors

def malformed_tiff() -> bytes:
    """A TIFF written by Pillow whose first IFD's next-IFD offset points far past the end of the
    file: Pillow raises TypeError('Missing dimensions') while reading it (not an OSError)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"II*\0"  # little-endian TIFF: first IFD offset at 4, entry count there
    ifd = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, ifd)[0]
    struct.pack_into("<I", data, ifd + 2 + 12 * entries, 0x7FFFFFF0)
    return bytes(data)


def malformed_dds() -> bytes:
    """A DDS written by Pillow with its pixel-format flags (header offset 80) zeroed: Pillow
    raises NotImplementedError('Unknown pixel format flags 0')."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (16, 16), (200, 30, 30, 255)).save(buf, "DDS")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"DDS "
    struct.pack_into("<I", data, 80, 0)
    return bytes(data)


MALFORMED = {"bad.tif": (malformed_tiff, "image/tiff"), "bad.dds": (malformed_dds, "image/vnd-ms.dds")}


def pillow_error(data: bytes) -> BaseException | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(getattr(im, "n_frames", 1) - 1)
            im.load()
    except Exception as e:  # noqa: BLE001
        return e
    return None


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_file_is_422_not_500(plain, name):
    make, ctype = MALFORMED[name]
    data = make()
    err = pillow_error(data)
    # the case is real: Pillow raises something other than the OSError family for these bytes
    assert err is not None and not isinstance(err, (OSError, SyntaxError, ValueError, EOFError)), repr(err)
    r = httpx.post(f"{plain.url}/v1/classify", content=data, headers={"Content-Type": ctype})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "bad_image"
    r = httpx.post(f"{plain.url}/v1/classify", files={"file": (name, data, ctype)})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith(name), r.text
    assert httpx.post(f"{plain.url}/v1/classify", content=_jpeg()).status_code == 200 and plain.alive()


def test_malformed_files_in_a_batch_get_their_own_errors(plain):
    files = [("files", ("a.png", png_bytes(), "image/png")),
             ("files", ("bad.tif", malformed_tiff(), "image/tiff")),
             ("files", ("b.jpg", _jpeg(), "image/jpeg")),
             ("files", ("bad.dds", malformed_dds(), "image/vnd-ms.dds"))]
    r = httpx.post(f"{plain.url}/v1/classify/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.png", "bad.tif", "b.jpg", "bad.dds"]
    for bad in (results[1], results[3]):
        assert bad["error"]["code"] == "bad_image" and bad["error"]["message"].startswith(bad["filename"])
    for good in (results[0], results[2]):
        assert "error" not in good and good["predictions"][0]["label"] in ("circle", "stripes", "squares")


# ------------------------------------------------------------------------------- pixel floods

@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """8000 x 7999 pixels (just under the 64 MP per-image limit) in about 200 kB."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8000, 7999), (10, 120, 30)).save(buf, "PNG")
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_pixel_flood_leaves_room_for_a_photo(tiny_run, huge_png):
    """Two batches of 32 images of 64 MP each (6.5 MB bodies, 2 x 2 GP to decode) at once: the
    images past the per-request pixel budget are refused, the rest decode a few at a time in a
    bounded amount of memory, and a photo sent meanwhile is answered within seconds."""
    s = Server(tiny_run)
    try:
        photo = _jpeg()
        assert httpx.post(f"{s.url}/v1/classify", content=photo).status_code == 200
        limits = httpx.get(f"{s.url}/v1/model").json()["limits"]
        assert limits["max_request_pixels"] >= 64_000_000 and limits["max_inflight_pixels"] >= 64_000_000
        fit = limits["max_request_pixels"] // (8000 * 7999)  # huge images one request may decode
        before = rss_mb(s.proc.pid)
        peak, stop = [before], threading.Event()

        def watch():
            while not stop.is_set() and s.alive():
                peak.append(rss_mb(s.proc.pid))
                time.sleep(0.02)

        def flood():
            files = [("files", (f"huge{i}.png", huge_png, "image/png")) for i in range(32)]
            with httpx.Client(timeout=120) as c:
                return c.post(f"{s.url}/v1/classify/batch", files=files)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            floods = [ex.submit(flood) for _ in range(2)]
            time.sleep(0.3)  # the floods are in: decoding
            waits, deadline = [], time.monotonic() + 90
            while not all(f.done() for f in floods) and len(waits) < 30 and time.monotonic() < deadline:
                t = time.monotonic()
                r = httpx.post(f"{s.url}/v1/classify", content=photo, timeout=60)
                waits.append((round(time.monotonic() - t, 2), r.status_code))
                time.sleep(0.2)
            answers = [f.result() for f in floods]
        stop.set()
        watcher.join()

        assert waits, "the floods were over before any photo was sent"
        assert all(code == 200 for _, code in waits), waits
        assert max(w for w, _ in waits) < 5, f"a photo waited behind the flood: {waits}"
        grew = max(peak) - before
        assert grew < 1024, f"the server grew by {grew:.0f} MB while decoding the flood"
        for a in answers:
            assert a.status_code == 200, a.text
            codes = [x.get("error", {}).get("code", "ok") for x in a.json()["results"]]
            assert codes.count("too_many_pixels") == 32 - fit, codes
            assert codes.count("ok") >= 1 and set(codes) <= {"ok", "too_many_pixels", "busy"}, codes
        assert httpx.post(f"{s.url}/v1/classify", content=photo).status_code == 200 and s.alive()
    finally:
        out = s.stop()
    assert "Traceback" not in out, out


def test_request_pixel_budget(tiny_run):
    """One image over --max-request-pixels is a 413; in a batch, the images past it get their own
    413 error, in order, and the others are classified."""
    s = Server(tiny_run, "--max-request-pixels", "1e6")
    try:
        u = s.url
        assert httpx.get(f"{u}/v1/model").json()["limits"]["max_request_pixels"] == 1_000_000
        r = httpx.post(f"{u}/v1/classify", content=png_bytes(1200, 1000), headers={"Content-Type": "image/png"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", r.text
        assert "--max-request-pixels" in r.json()["error"]["message"]
        big = png_bytes(1000, 800)  # 0.8 MP: fits alone, not twice
        files = [("files", ("a.png", big, "image/png")), ("files", ("small.png", png_bytes(), "image/png")),
                 ("files", ("b.png", big, "image/png"))]
        results = httpx.post(f"{u}/v1/classify/batch", files=files).json()["results"]
        assert "error" not in results[0] and "error" not in results[1], results
        assert results[2]["error"]["code"] == "too_many_pixels"
        assert results[2]["error"]["message"].startswith("b.png") and "--max-request-pixels" in results[2]["error"]["message"]
    finally:
        out = s.stop()
    assert "Traceback" not in out, out


def test_pixel_budget_serves_the_smallest_waiter_first():
    """The in-flight budget (the class the server uses): a small image is never queued behind a
    huge one, a waiter gives up after wait_s, and a cancelled waiter leaves nothing taken."""
    import asyncio

    from retrain.serve.limits import PixelBudget

    async def scenario():
        b = PixelBudget(10, wait_s=0.3)
        assert await b.take(8)
        huge, small = asyncio.create_task(b.take(5)), asyncio.create_task(b.take(3))
        await asyncio.sleep(0.01)
        assert not huge.done() and not small.done()
        assert await b.take(1) and b.used == 9  # fits in what is free: passes no one
        b.give(8)  # 9 free: the 3 first, then the 5
        assert await small and await huge and b.used == 9
        assert not await b.take(2)  # nothing is given back within wait_s
        gone = asyncio.create_task(b.take(4))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        b.give(9)
        assert b.used == 0

    asyncio.run(scenario())


# -------------------------------------------------------------- 413 for clients that read late

def urllib_post(url: str, body: bytes, ctype: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_too_large_body_gets_its_413_in_every_client(plain):
    """12 MB to a 10 MB limit: urllib, httpx and requests (which write the whole body before they
    read) all get the 413 JSON, not a reset connection; so do other early answers (415)."""
    url = f"{plain.url}/v1/classify"
    body = b"\xff\xd8" + b"\0" * (12 * MB)
    for _ in range(2):  # the connection it leaves is fine for the next
        status, err = urllib_post(url, body, "image/jpeg")
        assert status == 413 and err["error"]["code"] == "too_large", err
        assert "10,485,760" in err["error"]["message"]
    status, err = urllib_post(url, b"x" * (3 * MB), "text/plain")  # refused before it is read
    assert status == 415 and err["error"]["code"] == "unsupported_media_type", err
    with httpx.Client(timeout=60) as c:
        for _ in range(2):
            r = c.post(url, content=body, headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    try:
        import requests
    except ImportError:
        requests = None
    if requests is not None:
        r = requests.post(url, data=body, headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert httpx.post(url, content=_jpeg()).status_code == 200 and plain.alive()


def test_expect_100_continue_gets_the_413_before_sending(plain):
    """A client that asks first (`Expect: 100-continue`, as curl does for big bodies) gets the 413
    straight away, with no '100 Continue' inviting the body."""
    import socket

    with socket.create_connection(("127.0.0.1", plain.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (12 * MB))
        reply = b""
        while b"}}" not in reply:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    text = reply.decode("latin-1")
    assert text.startswith("HTTP/1.1 413"), text
    assert "100 Continue" not in text and '"too_large"' in text


# ------------------------------------------------------------------------------- numeric flags

BAD_FLAGS = [("--max-upload-mb", "nan"), ("--max-upload-mb", "inf"), ("--max-upload-mb", "-1"),
             ("--max-upload-mb", "0"), ("--max-upload-mb", "1e9"), ("--body-timeout-s", "nan"),
             ("--body-timeout-s", "inf"), ("--batch-wait-ms", "nan"), ("--batch-wait-ms", "-1"),
             ("--max-pending", "0"), ("--max-batch", "100000"), ("--threads", "0"),
             ("--threads", "1000000"), ("--workers", "0"), ("--top-k", "0"), ("--port", "70000"),
             ("--max-request-pixels", "nan"), ("--max-request-pixels", "1e15"),
             ("--max-request-pixels", "0"), ("--max-inflight-pixels", "inf"),
             ("--max-inflight-pixels", "12.5"), ("--max-inflight-pixels", "lots")]


@pytest.mark.parametrize("flag,value", BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_numeric_flags_out_of_range_are_one_line_errors(tiny_run, flag, value):
    p = run_cli("serve", tiny_run, flag, value, check=False, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], p.stderr
