"""retrain.progress: messages for people on stderr (never stdout, which carries results), quiet
means quiet, warnings still show, and the library's default logger says nothing."""

from __future__ import annotations

import threading

from conftest import make_dataset, run_cli
from retrain.progress import Log, bar, in_background


def test_log_goes_to_stderr_and_quiet_keeps_warnings(capsys):
    Log()("hello")
    Log().warn("careful")
    Log(quiet=True)("not shown")
    Log(quiet=True).warn("still shown")
    Log.silent()("nothing")
    Log.silent().warn("nothing either")
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "hello\nwarning: careful\nwarning: still shown\n"


def test_a_quiet_bar_prints_nothing_and_still_counts(capsys):
    with bar(total=5, desc="Work", quiet=True) as b:
        for _ in range(5):
            b.update(1)
    assert list(bar(range(3), desc="Work", quiet=True)) == [0, 1, 2]
    assert capsys.readouterr() == ("", "")


def test_in_background_runs_in_another_thread_and_returns_its_future():
    main = threading.get_ident()
    fut = in_background(lambda a, b=0: (threading.get_ident(), a + b), 2, b=3)
    ident, value = fut.result(timeout=10)
    assert value == 5 and ident != main
    boom = in_background(lambda: 1 / 0)
    assert isinstance(boom.exception(timeout=10), ZeroDivisionError)  # kept for the caller, not lost


def test_fit_keeps_stdout_for_its_summary_and_quiet_silences_stderr(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=4)
    loud = run_cli("fit", data, "-o", tmp_path / "r1", "--cache-dir", tmp_path / "c")
    assert loud.stdout.count("\n") == 1 and loud.stdout.startswith("retrain fit: 12 images")
    assert f"Found 12 images in 3 classes in {data}" in loud.stderr.splitlines()
    quiet = run_cli("fit", data, "-o", tmp_path / "r2", "--cache-dir", tmp_path / "c", "-q")
    assert quiet.stdout.startswith("retrain fit: 12 images") and quiet.stdout.count("\n") == 1
    assert all(line.startswith("warning: ") for line in quiet.stderr.splitlines()), quiet.stderr
