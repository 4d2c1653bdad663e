"""`retrain serve`: the real CLI in a subprocess on 127.0.0.1, real HTTP, real ONNX Runtime.

One server per module on the flowers run (upload limit lowered to 2 MB so the over-limit case
is quick), one with an API key on the tiny run (default 10 MB limit).
"""

import concurrent.futures
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import pytest

from conftest import EXAMPLES, UNSEEN, run_cli

KEY = "s3cret-key-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`retrain serve RUN --port P ...` in a subprocess; stopped (and its output kept) on exit."""

    def __init__(self, run, *args, env=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        e = dict(os.environ)
        e.pop("RETRAIN_API_KEY", None)
        e.update(env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "retrain", "serve", str(run), "--port", str(self.port),
                                      "-q", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=e)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"retrain serve exited {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("retrain serve did not answer /healthz within 90 s")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stdout.read()


@pytest.fixture(scope="module")
def server(flowers_run):
    s = Server(flowers_run, "--max-upload-mb", "2")
    yield s
    out = s.stop()
    assert "Traceback" not in out, out


@pytest.fixture(scope="module")
def keyed(tiny_run):
    s = Server(tiny_run, env={"RETRAIN_API_KEY": KEY})
    yield s
    s.stop()


def train_photos(run: Path, n_per_class=1) -> list[tuple[Path, str]]:
    """Photos from the run's training split, with their class: the model has learnt these."""
    split = json.loads((run / "split.json").read_text())
    out, seen = [], {}
    for rel in split["files"]["train"]:
        cls = rel.split("/")[0]
        if seen.get(cls, 0) < n_per_class:
            seen[cls] = seen.get(cls, 0) + 1
            out.append((EXAMPLES / rel, cls))
    return out


def png_bytes(w=32, h=24) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def png_bomb(w=30000, h=30000) -> bytes:
    """A valid PNG header claiming w x h pixels (900 MP) with a tiny compressed body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------- the API works

def test_classify_raw_and_multipart_match_retrain_label(server, flowers_run):
    photos = train_photos(flowers_run)
    label = json.loads(run_cli("label", flowers_run, *[p for p, _ in photos], "--json", "-q").stdout)
    info = httpx.get(f"{server.url}/v1/model").json()
    for (photo, cls), expected in zip(photos, label):
        data = photo.read_bytes()
        raw = httpx.post(f"{server.url}/v1/classify", content=data, headers={"Content-Type": "image/jpeg"})
        assert raw.status_code == 200, raw.text
        r = raw.json()
        assert r["model_id"] == info["model_id"]
        assert r["label"] == cls == expected["label"]
        assert [p["label"] for p in r["predictions"]] == [p["label"] for p in expected["predictions"]]
        for got, want in zip(r["predictions"], expected["predictions"]):
            assert got["score"] == pytest.approx(want["score"], abs=1e-4)
        assert len(r["predictions"]) == 5 and r["time_ms"]["total"] > 0
        mp = httpx.post(f"{server.url}/v1/classify?top_k=2", files={"file": (photo.name, data, "image/jpeg")})
        assert mp.status_code == 200, mp.text
        m = mp.json()
        assert m["filename"] == photo.name and m["label"] == cls
        assert m["predictions"] == r["predictions"][:2]


def test_octet_stream_and_png_accepted(server):
    for ctype, data in (("application/octet-stream", (EXAMPLES / "daisy").glob("*.jpg").__next__().read_bytes()),
                        ("image/png", png_bytes())):
        r = httpx.post(f"{server.url}/v1/classify", content=data, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        # a flat red picture may well be answered "unknown" (novelty), with its best classes still given
        labels = httpx.get(f"{server.url}/v1/model").json()["labels"]
        assert r.json()["label"] in labels + ["unknown"] and r.json()["predictions"][0]["label"] in labels


def test_batch_endpoint_gives_one_result_per_image(server, flowers_run):
    photos = train_photos(flowers_run)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p, _ in photos]
    files.insert(2, ("files", ("notes.txt", b"just some text", "text/plain")))
    r = httpx.post(f"{server.url}/v1/classify/batch?top_k=3", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    results = body["results"]
    assert len(results) == len(photos) + 1
    assert results[2]["filename"] == "notes.txt"
    assert results[2]["error"]["code"] == "not_an_image"
    good = results[:2] + results[3:]
    assert [x["label"] for x in good] == [cls for _, cls in photos]
    assert all(len(x["predictions"]) == 3 for x in good)
    # the photos of one request share model calls
    assert max(x["batch_size"] for x in good) > 1


def test_model_health_and_spec(server, flowers_run):
    m = httpx.get(f"{server.url}/v1/model").json()
    assert m["labels"] == ["daisy", "dandelion", "roses", "sunflowers", "tulips"]
    assert m["architecture"] == "efficientnet_lite0+efficientnet_lite1"  # the default
    assert m["input_size"] == [224, 224]
    report = json.loads((flowers_run / "report.json").read_text())
    assert m["metrics"]["test"]["accuracy"] == pytest.approx(report["metrics"]["test"]["accuracy"])
    assert m["model_id"].startswith("efficientnet_lite0+efficientnet_lite1-") and len(m["model_id"].split("-")[-1]) == 12
    assert m["limits"]["max_upload_bytes"] == 2 * 1024 * 1024
    assert str(flowers_run) not in json.dumps(m)  # no server paths
    h = httpx.get(f"{server.url}/healthz").json()
    assert h["status"] == "ok" and h["model_id"] == m["model_id"]
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/classify", "/v1/classify/batch", "/v1/model", "/healthz"} <= set(spec["paths"])
    assert "multipart/form-data" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]


def test_page_and_assets_are_served_locally(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        r = httpx.get(f"{server.url}{asset}")
        assert r.status_code == 200 and len(r.content) > 500
        assert "https://" not in r.text and "http://" not in r.text
    # only those files: no path from the request reaches the file system
    for probe in ("/static/../serve.py", "/static/index.html", "/static/%2e%2e/serve.py", "/static/"):
        assert httpx.get(f"{server.url}{probe}").status_code == 404


def test_concurrent_requests_are_micro_batched(server, flowers_run):
    photos = train_photos(flowers_run, n_per_class=2)
    single = {p: httpx.post(f"{server.url}/v1/classify", content=p.read_bytes()).json() for p, _ in photos}
    before = httpx.get(f"{server.url}/healthz").json()

    def post(p):
        with httpx.Client(timeout=60) as c:
            return p, c.post(f"{server.url}/v1/classify", content=p.read_bytes()).json()

    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        results = list(ex.map(post, [p for p, _ in photos] * 2))
    after = httpx.get(f"{server.url}/healthz").json()
    assert len(results) == 2 * len(photos)
    for p, r in results:
        assert r["label"] == single[p]["label"]
        assert r["predictions"][0]["score"] == pytest.approx(single[p]["predictions"][0]["score"], abs=1e-4)
    images = after["images"] - before["images"]
    batches = after["batches"] - before["batches"]
    assert images == len(results)
    assert batches < images, f"{images} concurrent images ran in {batches} model calls: no batching"
    assert max(r["batch_size"] for _, r in results) > 1


# ------------------------------------------------------------------------------------ bad input

def _jpeg() -> bytes:
    return next((EXAMPLES / "roses").glob("*.jpg")).read_bytes()


BAD = {
    "not_an_image": dict(content=b"%PDF-1.4 definitely not a photo " * 20, headers={"Content-Type": "image/jpeg"}),
    "truncated": dict(content=None, headers={"Content-Type": "image/jpeg"}),  # filled in below
    "bomb": dict(content=png_bomb(), headers={"Content-Type": "image/png"}),
    "too_large_raw": dict(content=b"\xff\xd8" + b"\0" * (2 * 1024 * 1024 + 10), headers={"Content-Type": "image/jpeg"}),
    "too_large_multipart": dict(files={"file": ("big.jpg", b"\xff\xd8" + b"\0" * (2 * 1024 * 1024 + 10), "image/jpeg")}),
    "text_plain": dict(content=b"hello", headers={"Content-Type": "text/plain"}),
    "json": dict(content=b'{"image": "/etc/passwd"}', headers={"Content-Type": "application/json"}),
    "form_urlencoded": dict(content=b"file=%2Fetc%2Fpasswd", headers={"Content-Type": "application/x-www-form-urlencoded"}),
    "empty_raw": dict(content=b"", headers={"Content-Type": "image/jpeg"}),
    "empty_file": dict(files={"file": ("empty.jpg", b"", "image/jpeg")}),
    "form_without_file": dict(content=b"--b\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n/etc/passwd\r\n--b--\r\n",
                              headers={"Content-Type": "multipart/form-data; boundary=b"}),
    "two_files": dict(files=[("file", ("a.png", png_bytes(), "image/png")), ("file", ("b.png", png_bytes(), "image/png"))]),
    "broken_multipart": dict(content=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                             headers={"Content-Type": "multipart/form-data; boundary=xyz"}),
    "multipart_no_boundary": dict(content=b"abc", headers={"Content-Type": "multipart/form-data"}),
    "bad_top_k": dict(content=png_bytes(), headers={"Content-Type": "image/png"}, params={"top_k": "0"}),
    "bad_top_k_text": dict(content=png_bytes(), headers={"Content-Type": "image/png"}, params={"top_k": "five"}),
    "bad_content_length": None,  # sent by hand below: no client library sends this
}
EXPECT = {  # case: (status, error code, words the message must contain)
    "not_an_image": (422, "not_an_image", "not an image"),
    "truncated": (422, "truncated_image", "truncated"),
    "bomb": (413, "image_too_large", "pixels"),
    "too_large_raw": (413, "too_large", "limit"),
    "too_large_multipart": (413, "too_large", "limit"),
    "text_plain": (415, "unsupported_media_type", "text/plain"),
    "json": (415, "unsupported_media_type", "application/json"),
    "form_urlencoded": (415, "unsupported_media_type", "x-www-form-urlencoded"),
    "empty_raw": (400, "empty_body", "empty"),
    "empty_file": (400, "empty_image", "empty"),
    "form_without_file": (400, "no_file", "no file"),
    "two_files": (400, "too_many_files", "batch"),
    "broken_multipart": (400, "bad_multipart", "multipart"),
    "multipart_no_boundary": (400, "bad_multipart", "multipart"),
    "bad_top_k": (422, "invalid_parameter", "top_k"),
    "bad_top_k_text": (422, "invalid_parameter", "top_k"),
    "bad_content_length": (400, "bad_content_length", "Content-Length"),
}


@pytest.mark.parametrize("case", list(EXPECT))
def test_bad_input_gets_4xx_json_and_server_keeps_serving(server, case):
    kw = dict(BAD[case] or {})
    if case == "truncated":
        j = _jpeg()
        kw["content"] = j[: len(j) // 2]
    if case == "bad_content_length":
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Content-Length: 12abc\r\n\r\n")
            reply = s.recv(4096).decode("latin-1")
        assert reply.startswith("HTTP/1.1 400"), reply  # refused by the HTTP layer itself
    else:
        r = httpx.post(f"{server.url}/v1/classify", timeout=60, **kw)
        status, code, words = EXPECT[case]
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        err = r.json()["error"]
        assert err["code"] == code
        assert words.lower() in err["message"].lower(), err["message"]
    ok = httpx.post(f"{server.url}/v1/classify", content=_jpeg(), headers={"Content-Type": "image/jpeg"})
    assert ok.status_code == 200 and server.alive()


def test_batch_endpoint_bad_requests(server):
    u = f"{server.url}/v1/classify/batch"
    r = httpx.post(u, content=png_bytes(), headers={"Content-Type": "image/png"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(u, files=[("files", (f"{i}.png", png_bytes(8, 8), "image/png")) for i in range(33)])
    assert r.status_code == 413 and "32" in r.json()["error"]["message"]
    r = httpx.post(u, files=[("files", ("big.png", b"\0" * (2 * 1024 * 1024 + 1), "image/png"))])
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_unknown_routes_and_methods_are_json(server):
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server.url}/v1/classify")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert httpx.get(f"{server.url}/docs").status_code == 404  # Swagger UI would load from a CDN


# ------------------------------------------------------------------------------------- API key

def test_api_key_on_every_endpoint_but_healthz(keyed):
    u = keyed.url
    assert httpx.get(f"{u}/healthz").status_code == 200
    for method, path in (("GET", "/v1/model"), ("GET", "/"), ("GET", "/static/app.js"),
                         ("GET", "/openapi.json"), ("POST", "/v1/classify"), ("POST", "/v1/classify/batch")):
        r = httpx.request(method, f"{u}{path}", content=png_bytes() if method == "POST" else None,
                          headers={"Content-Type": "image/png"} if method == "POST" else None)
        assert r.status_code == 401, (path, r.status_code)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Basic")
    bad = httpx.get(f"{u}/v1/model", headers={"Authorization": "Bearer wrong"})
    assert bad.status_code == 401 and "wrong" in bad.json()["error"]["message"]
    for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}):
        assert httpx.get(f"{u}/v1/model", headers=headers).status_code == 200
    assert httpx.get(f"{u}/", auth=("anyone", KEY)).status_code == 200  # what a browser sends
    r = httpx.post(f"{u}/v1/classify", content=png_bytes(), headers={"X-API-Key": KEY, "Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("circle", "stripes", "squares")


def test_default_upload_limit_is_10_mb(keyed):
    h = {"X-API-Key": KEY, "Content-Type": "image/jpeg"}
    r = httpx.post(f"{keyed.url}/v1/classify", content=b"\0" * (10 * 1024 * 1024 + 1), headers=h)
    assert r.status_code == 413 and "10,485,760" in r.json()["error"]["message"]
    r = httpx.post(f"{keyed.url}/v1/classify", content=b"\0" * (3 * 1024 * 1024), headers=h)
    assert r.status_code == 422  # under the limit: read, then refused as not an image


# ------------------------------------------------------------------------------------ the CLI

def test_cli_errors_are_one_line(tmp_path, server):
    p = run_cli("serve", tmp_path / "nope", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error: model not found") and "Traceback" not in p.stderr
    p = run_cli("serve", EXAMPLES, check=False)
    assert p.returncode == 2 and "not a retrain run folder" in p.stderr
    p = run_cli("serve", server_run(server), "--port", server.port, check=False, timeout=60)
    assert p.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in p.stderr, p.stderr
    p = run_cli("serve", server_run(server), "--max-upload-mb", "0", check=False)
    assert p.returncode == 2 and "--max-upload-mb" in p.stderr
    p = run_cli("serve", server_run(server), "--wokers", "2", check=False)
    assert p.returncode == 2 and "--workers" in p.stderr


def server_run(server) -> str:
    return server.proc.args[4]


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_binds_loopback_by_default(server):
    assert "--host" not in server.proc.args
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, port = local.rsplit(":", 1)
                if state == "0A" and int(port, 16) == server.port:  # 0A: LISTEN
                    listening.append(addr)
    assert listening == ["0100007F"], listening  # 127.0.0.1 only, little-endian hex


def test_several_workers(flowers_run):
    s = Server(flowers_run, "--workers", "2")
    try:
        photo, cls = train_photos(flowers_run)[0]
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            rs = list(ex.map(lambda _: httpx.post(f"{s.url}/v1/classify", content=photo.read_bytes(), timeout=60),
                             range(8)))
        assert all(r.status_code == 200 and r.json()["label"] == cls for r in rs)
    finally:
        out = s.stop()
    assert "Traceback" not in out, out


def test_cpu_server_makes_one_single_threaded_session_per_model_slot(flowers_run, monkeypatch):
    """On a CPU each model slot gets one ONNX Runtime session, built once with one thread (no
    session is made with other settings and thrown away: that loaded the model a second time)."""
    from retrain import runtime
    from retrain.serve import ServeConfig, create_app

    made = []

    def recording_make_session(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    real = runtime.make_session
    monkeypatch.setattr(runtime, "make_session", recording_make_session)
    app = create_app(flowers_run, ServeConfig(provider="cpu", cores=3))
    assert app.state.batcher.parallel == 3
    assert len(made) == 3, "one session per slot, each made once"
    assert [s.get_session_options().intra_op_num_threads for s in made] == [1, 1, 1]
    assert all(s.get_providers() == ["CPUExecutionProvider"] for s in made)


# ---------------------------------------------------------------------------------- schemathesis

@pytest.mark.skipif(shutil.which("st") is None and not (Path(sys.executable).parent / "st").exists(),
                    reason="schemathesis is not installed (pip install schemathesis)")
def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Schema-driven fuzzing of every operation (valid and invalid requests): never a 5xx."""
    import re

    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    p = subprocess.run([st, "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error",
                        "--max-examples", "60", "--no-color", "--request-timeout", "30",
                        "--generation-database", "none"],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "No issues found" in out, out[-4000:]
    generated = int(re.search(r"(\d+) generated", out).group(1))
    assert generated >= 100, out[-2000:]
    assert httpx.post(f"{server.url}/v1/classify", content=_jpeg()).status_code == 200 and server.alive()


def test_unknown_threshold_from_the_model_is_honoured(flowers_run, tmp_path):
    """A model whose metadata sets unknown_threshold answers 'unknown' below it (as `retrain label`).

    The threshold goes halfway between the least and the most confident of the unseen photos, as
    this machine scores them: each is then on its side by a wide margin, whatever the float
    rounding (a fixed threshold near 1.0 breaks where a saturated score rounds to exactly 1.0)."""
    import numpy as np
    import onnx

    from retrain.classifier import Classifier

    photos = sorted(UNSEEN.glob("*/*.jpg"))
    clf = Classifier(flowers_run)
    top = clf.predict(np.stack([clf.load_image(p) for p in photos])).max(axis=1)
    low, high = photos[int(top.argmin())], photos[int(top.argmax())]
    assert top.max() - top.min() > 0.1, top  # the model is not saturated on these photos
    threshold = round(float(top.min() + top.max()) / 2, 6)

    run = tmp_path / "run"
    shutil.copytree(flowers_run, run)
    m = onnx.load(str(run / "model.onnx"))
    onnx.helper.set_model_props(m, {**{p.key: p.value for p in m.metadata_props},
                                    "unknown_threshold": str(threshold)})
    onnx.save(m, str(run / "model.onnx"))
    s = Server(run)
    try:
        info = httpx.get(f"{s.url}/v1/model").json()
        assert info["unknown_threshold"] == pytest.approx(threshold)
        r = httpx.post(f"{s.url}/v1/classify", content=low.read_bytes(), headers={"Content-Type": "image/jpeg"}).json()
        assert r["predictions"][0]["score"] < threshold
        assert r["label"] == "unknown" and r["predictions"][0]["label"] in info["labels"]
        r = httpx.post(f"{s.url}/v1/classify", content=high.read_bytes(), headers={"Content-Type": "image/jpeg"}).json()
        assert r["predictions"][0]["score"] >= threshold
        assert r["label"] == r["predictions"][0]["label"] in info["labels"]
    finally:
        s.stop()


def test_overload_and_slow_bodies_are_refused(flowers_run):
    """--max-pending bounds requests in flight (503 + Retry-After); --body-timeout-s drops a
    client that trickles its body (408); the server keeps serving after both."""
    s = Server(flowers_run, "--max-pending", "1", "--body-timeout-s", "1")
    try:
        # a client that sends headers and 10 of 1000 bytes holds the only slot...
        slow = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        slow.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b"\xff" * 10)
        time.sleep(0.3)
        busy = httpx.post(f"{s.url}/v1/classify", content=_jpeg(), headers={"Content-Type": "image/jpeg"})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "busy"
        assert busy.headers["retry-after"] == "1"
        # ...until its time is up
        reply = ""
        while "body_timeout" not in reply:
            chunk = slow.recv(4096).decode("latin-1")
            if not chunk:
                break
            reply += chunk
        slow.close()
        assert reply.startswith("HTTP/1.1 408") and "body_timeout" in reply, reply
        ok = httpx.post(f"{s.url}/v1/classify", content=_jpeg(), headers={"Content-Type": "image/jpeg"})
        assert ok.status_code == 200 and s.alive()
    finally:
        out = s.stop()
    assert "Traceback" not in out, out
