"""`retrain fit DIR --ray ADDRESS` refused in one line, before any work: without Ray installed, with
an address where nothing answers, and with the flags it does not combine with. (The fit itself on
a two-node cluster is in tests/test_ray.py, slow.)"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import one_error_line, run_cli


def test_fit_ray_without_ray_is_one_line_saying_what_to_install(tmp_path, tiny_dataset):
    """A subprocess where `import ray` fails, whether or not Ray is installed here."""
    run = tmp_path / "run"
    code = ("import sys; sys.modules['ray'] = None; from retrain.cli import main; "
            f"sys.exit(main(['fit', {str(tiny_dataset)!r}, '--ray', '127.0.0.2:6379', '-o', {str(run)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert line.startswith("error: --ray needs Ray") and "pip install 'retrain[ray]'" in line
    assert not run.exists()  # refused before any work


def _refused_port(host: str) -> int:
    """A port of `host` where nothing listens (bound, then closed again)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def test_fit_ray_with_no_cluster_at_the_address_is_one_line_before_any_work(tmp_path, tiny_dataset):
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'retrain[ray]'")
    run = tmp_path / "run"
    address = f"127.0.0.2:{_refused_port('127.0.0.2')}"
    r = run_cli("fit", tiny_dataset, "--ray", address, "-o", run, check=False, timeout=60)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert f"no Ray cluster at {address}" in line and "ray start --head" in line
    assert "Found" not in r.stderr and not run.exists()  # nothing scanned, nothing written
    r = run_cli("fit", tiny_dataset, "--ray", "not-an-address", "-o", run, check=False, timeout=60)
    assert r.returncode == 2 and "HOST:PORT" in one_error_line(r.stderr) and not run.exists()


@pytest.mark.parametrize("extra,words", [
    (["--fine-tune"], "--fine-tune and distortions"),
    (["--flip_left_right"], "--fine-tune and distortions"),
])
def test_fit_ray_refuses_what_it_does_not_compute_on_the_cluster(tmp_path, tiny_dataset, extra, words):
    r = run_cli("fit", tiny_dataset, "--ray", "127.0.0.2:6379", "-o", tmp_path / "run", *extra, check=False)
    assert r.returncode == 2 and words in one_error_line(r.stderr) and not (tmp_path / "run").exists()


def test_fit_ray_refuses_a_feature_store(tmp_path):
    r = run_cli("fit", "--features", tmp_path / "store", "--ray", "127.0.0.2:6379", "-o", tmp_path / "run",
                check=False)
    assert r.returncode == 2 and "--features STORE already holds them" in one_error_line(r.stderr)
