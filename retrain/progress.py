"""Progress bars and messages on stderr; silent with --quiet, plain when not a terminal."""

from __future__ import annotations

import sys


def bar(iterable=None, *, desc: str, total=None, unit: str = "it", quiet: bool = False):
    from tqdm import tqdm  # plain terminal bars; tqdm.auto would also probe for Jupyter

    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=True if quiet else None,
                file=sys.stderr, dynamic_ncols=True, leave=False)


class Log:
    """Messages for people go to stderr; stdout is kept for results (JSON, labels)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr, flush=True)
