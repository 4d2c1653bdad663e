"""Every command on hostile inputs a careless user can give it: one `error:` line, a non-zero
exit, never a traceback and never an "internal error".

The cases run through the real CLI entry point (retrain.cli.main) in this process, each under
an alarm so that a hang fails the test instead of stalling the suite; a few run as real
subprocesses to check the exit code the shell sees.
"""

import json
import os
import signal
from pathlib import Path

import pytest

from conftest import make_dataset, make_image, one_error_line, run_cli
from retrain import cli

CASE_SECONDS = 60


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("hostile")
    data = make_dataset(root / "data", per_class=4)
    garbage = root / "garbage"
    for c in ("a", "b"):
        (garbage / c).mkdir(parents=True)
        for i in range(3):
            (garbage / c / f"{i}.jpg").write_bytes(os.urandom(200))
    (root / "notes.txt").write_text("my notes")
    (root / "empty").mkdir()
    (root / "not-a-run").mkdir()
    (root / "not-a-run" / "report.json").write_text("{not json")
    (root / "text.onnx").write_text("hello")
    (root / "zero.onnx").write_bytes(b"")
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("years of work")
    unknown = make_dataset(root / "unknown-classes", classes=("cats", "dogs"), per_class=2)
    fifo = root / "pipe.jpg"
    os.mkfifo(fifo)
    return {"root": root, "data": data, "garbage": garbage, "run": tiny_run, "unknown": unknown,
            "fifo": fifo, "foreign": foreign}


CASES = [
    # fit
    ("fit", "{root}/missing"),
    ("fit", "{root}/notes.txt"),
    ("fit", "{root}/empty"),
    ("fit", "{garbage}", "-o", "{root}/out-garbage"),
    ("fit", "{data}", "-o", "{root}/notes.txt"),
    ("fit", "{data}", "-o", "{foreign}"),
    ("fit", "{data}", "-o", "{data}"),
    ("fit", "{data}", "--l2", "inf"),
    ("fit", "{data}", "--l2", "-1"),
    ("fit", "{data}", "--learning_rate", "nan"),
    ("fit", "{data}", "--batch-size", "0"),
    ("fit", "{data}", "--seed", "abc"),
    ("fit", "{data}", "--epochs", "1000000"),
    ("fit", "{data}", "--random_crop", "inf"),
    ("fit", "{data}", "--testing_percentage", "nan"),
    ("fit", "{data}", "--architecture", "resnet9000"),
    ("fit", "{data}", "--output_graph", "{root}/notes.txt"),
    ("fit", "{data}", "--no-such-flag"),
    # label
    ("label", "{root}/missing", "{data}/circle/circle_0.jpg"),
    ("label", "{root}/text.onnx", "{data}/circle/circle_0.jpg"),
    ("label", "{root}/zero.onnx", "{data}/circle/circle_0.jpg"),
    ("label", "{root}/empty", "{data}/circle/circle_0.jpg"),
    ("label", "{run}", "{root}/missing.jpg"),
    ("label", "{run}", "{garbage}/a/0.jpg"),
    ("label", "{run}", "{fifo}"),
    ("label", "{run}", "{data}/circle/circle_0.jpg", "--top-k", "0"),
    ("label", "{run}", "{data}/circle/circle_0.jpg", "--top-k", "nan"),
    ("label", "{run}", "{data}/circle/circle_0.jpg", "--input_mean", "nan"),
    ("label", "{run}", "{data}/circle/circle_0.jpg", "--input_std", "0"),
    ("label", "{run}", "{data}/circle/circle_0.jpg", "--input_height", "100000"),
    ("label", "{run}", "{data}/circle/circle_0.jpg", "--labels", "{root}/missing.txt"),
    # evaluate
    ("evaluate", "{root}/text.onnx", "{data}"),
    ("evaluate", "{run}", "{root}/missing"),
    ("evaluate", "{run}", "{unknown}"),
    ("evaluate", "{run}", "{data}", "--batch-size", "-1"),
    ("evaluate", "{run}", "{data}", "--html", "{root}/notes.txt"),
    # export
    ("export", "{root}/not-a-run"),
    ("export", "{root}/missing"),
    ("export", "{run}", "--format", "tflite"),
    ("export", "{run}", "--tolerance", "nan"),
    ("export", "{run}", "--max-prob-diff", "inf"),
    ("export", "{run}", "-o", "{foreign}"),
    # check, report, compare, bench, serve
    ("check", "{root}/missing"),
    ("check", "{root}/notes.txt"),
    ("check", "{data}", "--max-distance", "99"),
    ("check", "{data}", "--workers", "100000"),
    ("report", "{root}/missing"),
    ("report", "{root}/not-a-run"),
    ("report", "{run}", "-o", "{root}/notes.txt"),
    ("compare", "{root}/missing"),
    ("compare", "{root}/not-a-run"),
    ("bench", "{root}/text.onnx"),
    ("bench", "{run}", "--batch", "0"),
    ("serve", "{root}/text.onnx"),
    ("serve", "{run}", "--port", "99999"),
    ("serve", "{run}", "--workers", "0"),
    ("nosuchcommand",),
]


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"no answer within {CASE_SECONDS} s")


@pytest.mark.parametrize("case", CASES, ids=[" ".join(c)[:60] for c in CASES])
def test_hostile_input_is_one_error_line(hostile, case, capsys, monkeypatch):
    monkeypatch.chdir(hostile["root"])
    argv = [a.format(**hostile) for a in case]
    before = (hostile["root"] / "notes.txt").read_text(), (hostile["foreign"] / "thesis.txt").read_text()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        code = cli.main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    err = capsys.readouterr().err
    assert code not in (0, 3), err
    one_error_line(err)
    after = (hostile["root"] / "notes.txt").read_text(), (hostile["foreign"] / "thesis.txt").read_text()
    assert after == before
    assert sorted(p.name for p in hostile["foreign"].iterdir()) == ["thesis.txt"]


def test_the_shell_sees_exit_code_2_and_no_traceback(hostile):
    for args in (("fit", hostile["data"], "--l2", "inf"), ("label", hostile["root"] / "text.onnx", hostile["fifo"])):
        p = run_cli(*args, check=False, timeout=120)
        assert p.returncode == 2, p.stderr
        one_error_line(p.stderr)


def test_garbage_in_a_class_is_listed_and_the_rest_trains(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=5)
    (data / "circle" / "random.jpg").write_bytes(os.urandom(300))
    (data / "circle" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    make_image(data / "stripes" / "ok.webp", 1, 77, fmt="WEBP")
    p = run_cli("fit", data, "-o", tmp_path / "run", "-q")
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {Path(s["path"]).name for s in rep["skipped"]} == {"random.jpg", "x.png"}
    assert "Traceback" not in p.stderr
