"""Progress bars and messages on stderr; silent with --quiet, plain when not a terminal."""

from __future__ import annotations

import sys


def bar(iterable=None, *, desc: str, total=None, unit: str = "it", quiet: bool = False):
    from tqdm import tqdm  # plain terminal bars; tqdm.auto would also probe for Jupyter

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=True if quiet else None,
                file=sys.stderr, dynamic_ncols=True, leave=False)


class Log:
    """Messages for people go to stderr; stdout is kept for results (JSON, labels).

    The one logger of the library: every function that reports progress takes `log: Log | None`
    and, given None, says nothing (Log.silent()). The CLI passes Log(quiet=args.quiet), which
    prints messages unless quiet, and warnings always.
    """

    def __init__(self, quiet: bool = False, *, warnings: bool = True):
        self.quiet = quiet
        self.warnings = warnings

    @classmethod
    def silent(cls) -> "Log":
        return cls(quiet=True, warnings=False)

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        if self.warnings:
            print(f"warning: {msg}", file=sys.stderr, flush=True)


def in_background(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a thread of its own; returns its Future. The thread is joined at
    exit, not killed: a thread killed inside a native library (OpenVINO, an import) can abort
    the process."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1, thread_name_prefix="retrain-background")
    try:
        return pool.submit(fn, *args, **kwargs)
    finally:
        pool.shutdown(wait=False)


def print_json(obj) -> None:
    """A command's result as JSON on stdout (what --json prints; messages stay on stderr)."""
    import json

    json.dump(obj, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")
