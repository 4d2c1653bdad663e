"""retrain.files: the cache folder, SHA-256 of a file, and writes that are whole or not there.

The crash tests fail a write for real: a file-size limit (RLIMIT_FSIZE) that stops the write
half-way, the process killed by that limit, and a full tmpfs (where this machine lets us mount).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from retrain.files import cache_root, sha256_file, write_bytes_atomic, write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]


def test_sha256_file_matches_hashlib_across_chunk_boundaries(tmp_path):
    for size in (0, 1, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 17):  # around the 1 MiB read size
        f = tmp_path / f"f{size}"
        data = os.urandom(size)
        f.write_bytes(data)
        assert sha256_file(f) == hashlib.sha256(data).hexdigest(), size
    # A known value, worked out once: SHA-256 of b"abc" (FIPS 180-2, appendix B.1).
    (tmp_path / "abc").write_bytes(b"abc")
    assert sha256_file(tmp_path / "abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "report.json"
    p.write_text("old")
    write_json_atomic(p, {"accuracy": 0.9, "labels": ["a", "b"], "path": tmp_path})
    text = p.read_text()
    assert text.endswith("\n") and json.loads(text) == {"accuracy": 0.9, "labels": ["a", "b"],
                                                          "path": str(tmp_path)}  # default=str
    write_bytes_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["report.json"]


def test_atomic_write_keeps_names_that_are_not_utf8(tmp_path):
    p = tmp_path / "labels.txt"
    write_text_atomic(p, "caf\udce9\n")  # a file name read from a latin-1 disk (surrogateescape)
    assert p.read_bytes() == b"caf\xe9\n"


def test_atomic_write_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_bytes_atomic(tmp_path / "a", b"x")
        write_bytes_atomic(tmp_path / "b", b"x", mode=0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o640  # 0o644 & ~0o027
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600
    write_bytes_atomic(tmp_path / "c", b"x", mode=0o755)  # wider than mkstemp's 0o600
    assert (tmp_path / "c").stat().st_mode & 0o777 == 0o755 & ~old


def test_data_that_cannot_be_encoded_leaves_the_old_file(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("the old labels\n")

    class Unprintable:
        def __str__(self):
            raise RuntimeError("cannot be written")

    with pytest.raises(RuntimeError):
        write_json_atomic(p, {"labels": ["a", Unprintable()]})
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(p, "a lone surrogate \ud800 is not text")  # outside surrogateescape's range
    with pytest.raises(TypeError):
        write_bytes_atomic(p, "text, not bytes")  # fails inside the write, after the temporary exists
    assert p.read_text() == "the old labels\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["labels.txt"]


_WRITER = textwrap.dedent("""
    import resource, signal, sys
    from retrain.files import write_bytes_atomic
    # Python ignores SIGXFSZ (the write then fails with EFBIG); SIG_DFL: the kernel kills the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN if sys.argv[2] == "error" else signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB per file
    try:
        write_bytes_atomic(sys.argv[1], b"n" * (4 << 20))
    except OSError as e:
        print(e.errno)
        sys.exit(5)
""")


@pytest.mark.parametrize("how", ["error", "killed"])
def test_a_write_stopped_half_way_leaves_the_old_file(tmp_path, how):
    """4 MiB into a 1 MiB file-size limit: the write stops after 1 MiB, with an error (EFBIG) or
    with the process killed by SIGXFSZ. The old file is untouched either way."""
    import errno

    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no RLIMIT_FSIZE / SIGXFSZ on this system")
    p = tmp_path / "model.onnx"
    p.write_bytes(b"the old model")
    r = subprocess.run([sys.executable, "-c", _WRITER, str(p), how], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert p.read_bytes() == b"the old model"
    left = sorted(x.name for x in tmp_path.iterdir() if x != p)
    if how == "error":
        assert r.returncode == 5 and r.stdout.strip() == str(errno.EFBIG), (r.returncode, r.stdout, r.stderr)
        assert left == []  # the half-written temporary is removed
    else:
        assert r.returncode == -signal.SIGXFSZ, (r.returncode, r.stderr)
        # Killed in the middle: its hidden temporary may stay, half written; never the real name.
        assert all(n.startswith(".model.onnx.") and n.endswith(".part") for n in left), left
        assert all((tmp_path / n).stat().st_size <= 1 << 20 for n in left)


def test_a_full_disk_leaves_the_old_file(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount): {r.stderr.strip()}")
    try:
        p = disk / "report.json"
        p.write_text('{"old": true}\n')
        with pytest.raises(OSError) as e:
            write_bytes_atomic(p, b"x" * (256 << 10))
        import errno

        assert e.value.errno == errno.ENOSPC
        assert p.read_text() == '{"old": true}\n'
        assert sorted(x.name for x in disk.iterdir()) == ["report.json"]
        write_json_atomic(p, {"new": True})  # the space the failed write took is free again
        assert json.loads(p.read_text()) == {"new": True}
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_cache_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("RETRAIN_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.setenv("RETRAIN_CACHE", "")
    assert cache_root() == tmp_path / "xdg" / "retrain"
    monkeypatch.delenv("RETRAIN_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "retrain"
