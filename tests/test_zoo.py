"""Named backbones (retrain.zoo): the table, the codelab names, and the download path against a
real HTTP server on 127.0.0.1 (good file, wrong hash, interrupted transfer, no network)."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading

import pytest

from conftest import make_dataset, one_error_line, run_cli
from retrain import zoo
from retrain.errors import MissingDependency

# The served file and its pinned SHA-256 (the test table's, as the real table pins the zoo's).
PAYLOAD = b"retrain test backbone file\n" * 40_000  # 1,080,000 bytes: several 1 MiB reads
PAYLOAD_SHA256 = "1f002a2eb8b06b35bcc158d53051568562b7a9f17d8c01cca349757e19e89e3c"


def test_payload_matches_its_pinned_hash():
    assert hashlib.sha256(PAYLOAD).hexdigest() == PAYLOAD_SHA256


class Server:
    """A real HTTP server on 127.0.0.1 serving `files` {path: bytes}; honours Range requests
    (unless told not to), and can cut the next transfer of a path in half."""

    def __init__(self, files: dict):
        outer = self
        self.files, self.requests, self.cut_next, self.honour_range = dict(files), [], set(), True

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests.append((self.path, self.headers.get("Range")))
                data = outer.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start, rng = 0, self.headers.get("Range")
                if rng and outer.honour_range:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in outer.cut_next:  # half the body, then the connection drops
                    outer.cut_next.discard(self.path)
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = Server({"/c0ffee/models/tiny.onnx": PAYLOAD})
    yield s
    s.stop()


def entry(server_url: str, **kw) -> zoo.ZooEntry:
    base = dict(name="tiny", description="test", path="models/tiny.onnx", commit="c0ffee", sha256=PAYLOAD_SHA256,
                size=len(PAYLOAD), input_size=32, params=1, url_base=server_url)
    base.update(kw)
    return zoo.ZooEntry(**base)


def test_good_file_is_downloaded_once_verified_and_reused(server, retrain_cache, capsys):
    e = entry(server.url)
    got = zoo.fetch(e)
    assert got == zoo.weights_dir() / "tiny.onnx" and got.read_bytes() == PAYLOAD
    assert not got.with_name("tiny.onnx.part").exists()
    assert len(server.requests) == 1
    assert zoo.fetch(e) == got and len(server.requests) == 1  # cached: no second request
    got.unlink()


def test_wrong_hash_is_refused_and_nothing_is_cached(server, retrain_cache):
    e = entry(server.url, sha256="0" * 64)
    with pytest.raises(MissingDependency, match="SHA-256 .* expected 000000000000.*refusing"):
        zoo.fetch(e)
    d = zoo.weights_dir()
    assert not (d / "tiny.onnx").exists() and not (d / "tiny.onnx.part").exists()


def test_interrupted_transfer_is_resumed_never_used_half_written(server, retrain_cache):
    e = entry(server.url)
    server.cut_next.add("/c0ffee/models/tiny.onnx")
    with pytest.raises(MissingDependency, match="stopped at .* run the command again to resume"):
        zoo.fetch(e)
    d = zoo.weights_dir()
    assert not (d / "tiny.onnx").exists()  # the half file is never where retrain would use it
    half = (d / "tiny.onnx.part").stat().st_size
    assert 0 < half < len(PAYLOAD)
    got = zoo.fetch(e)  # resumed from where it stopped
    assert got.read_bytes() == PAYLOAD
    assert server.requests[-1][1] == f"bytes={half}-"
    got.unlink()


def test_a_server_without_range_support_restarts_the_download(server, retrain_cache):
    e = entry(server.url)
    server.cut_next.add("/c0ffee/models/tiny.onnx")
    with pytest.raises(MissingDependency):
        zoo.fetch(e)
    server.honour_range = False  # answers 200 with the whole file: the part file is started afresh
    got = zoo.fetch(e)
    assert got.read_bytes() == PAYLOAD
    got.unlink()


def test_offline_is_one_line_with_the_url_and_where_to_put_the_file(retrain_cache):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = entry(f"http://127.0.0.1:{port}")
    with pytest.raises(MissingDependency) as err:
        zoo.fetch(e)
    msg = str(err.value)
    assert "\n" not in msg and e.url in msg and str(zoo.weights_dir() / "tiny.onnx") in msg
    assert "RETRAIN_WEIGHTS_MIRROR" in msg


def test_mirror_folder_is_used_and_checked(tmp_path, retrain_cache, monkeypatch):
    (tmp_path / "tiny.onnx").write_bytes(PAYLOAD)
    monkeypatch.setenv("RETRAIN_WEIGHTS_MIRROR", str(tmp_path))
    got = zoo.fetch(entry("http://127.0.0.1:9"))  # the URL itself is never reached
    assert got.read_bytes() == PAYLOAD
    got.unlink()


def test_codelab_names_map_to_the_nearest_published_mobilenet():
    assert zoo.codelab_alias("mobilenet_0.50_224")[:2] == ("mobilenetv2_050", 224)
    target, size, note = zoo.codelab_alias("mobilenet_1.0_128")
    assert (target, size) == ("mobilenetv2_100", 128) and "MobileNet v1 is not published" in note
    assert zoo.codelab_alias("mobilenet_0.25_160")[:2] == ("mobilenetv3_small_075", 160)
    assert zoo.codelab_alias("inception_v3") == ("inception_v3", None, None)
    assert zoo.codelab_alias("mobilenet_0.33_224") is None


def test_every_table_entry_pins_a_hash_a_size_and_a_commit_url():
    assert {"mobilenetv2_100", "inception_v3", "resnet50", "convnext_tiny"} <= set(zoo.ZOO)
    for e in zoo.ZOO.values():
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256) and e.size > 1_000_000
        assert re.fullmatch(r"[0-9a-f]{40}", e.commit) and e.commit in e.url and e.url.endswith(e.path)
        assert e.path.endswith(".onnx") and e.input_size in (224, 299)
        assert len(e.mean) == len(e.std) == 3 and 0 < e.crop_fraction <= 1
    assert zoo.ZOO["inception_v3"].input_size == 299


def test_codelab_commands_offline_give_the_one_line_message(tmp_path):
    data = make_dataset(tmp_path / "images")
    for arch in ("mobilenet_0.50_224", "inception_v3"):
        p = run_cli("fit", data, "-o", tmp_path / "run", "--architecture", arch, check=False,
                    env={"RETRAIN_OFFLINE": "1"})
        assert p.returncode == 2
        line = one_error_line(p.stderr)
        e = zoo.ZOO[zoo.codelab_alias(arch)[0]]
        assert e.url in line and e.filename in line and "weights" in line
    assert not (tmp_path / "run").exists()


def test_a_zoo_backbone_downloads_then_works_offline(tmp_path, retrain_cache, monkeypatch):
    """A table entry whose file is a real (tiny) ONNX classifier, served here: downloaded, verified,
    cut; the next lookup needs neither the network nor the file."""
    from test_onnx_backbone import tiny_classifier

    from retrain.architectures import get_backbone

    model = tiny_classifier(tmp_path / "net.onnx", size=32)
    blob = model.read_bytes()
    srv = Server({"/c0ffee/models/net.onnx": blob})
    e = entry(srv.url, name="tiny_net", path="models/net.onnx", sha256=hashlib.sha256(blob).hexdigest(),
              size=len(blob), mean=(127.0, 127.0, 127.0), std=(64.0, 64.0, 64.0))
    monkeypatch.setitem(zoo.ZOO, "tiny_net", e)
    try:
        bb = get_backbone("tiny_net")
    finally:
        srv.stop()
    assert bb.kind == "onnx" and bb.feature_dim == 8 and bb.image_size == 32 and bb.mean == (127.0, 127.0, 127.0)
    (zoo.weights_dir() / "net.onnx").unlink()  # gone, and the server is down: still resolves
    again = get_backbone("tiny_net")
    assert again == bb


def test_a_url_backbone_is_downloaded_once_and_its_pin_checked(tmp_path, retrain_cache):
    from test_onnx_backbone import tiny_classifier

    from retrain.architectures import get_backbone

    blob = tiny_classifier(tmp_path / "web.onnx", seed=3).read_bytes()
    srv = Server({"/models/web.onnx": blob})
    try:
        url = f"{srv.url}/models/web.onnx"
        with pytest.raises(MissingDependency, match="refusing"):
            get_backbone(f"{url}#sha256={'1' * 64}")
        bb = get_backbone(f"{url}#sha256={hashlib.sha256(blob).hexdigest()}")
        assert bb.name == "web.onnx" and bb.sha256 == hashlib.sha256(blob).hexdigest() and bb.feature_dim == 8
        n = len(srv.requests)
        assert get_backbone(f"{url}#sha256={bb.sha256}") == bb and len(srv.requests) == n  # no second download
    finally:
        srv.stop()
    with pytest.raises(Exception, match="is not a SHA-256"):
        get_backbone(f"{url}#sha256=abc")
