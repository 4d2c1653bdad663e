"""The `retrain` command: a thin layer over the library.

Each subcommand lives in the module of its pipeline stage, which provides
`add_arguments(parser)` and `main(args) -> int`. Only the chosen subcommand's module is
imported, so `retrain label` never pays for torch, scipy or the web server.
Library errors (RetrainError) become one line on stderr and exit code 2; no tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from retrain import __version__
from retrain.errors import ConfigError, RetrainError, did_you_mean
from retrain.interrupt import ctrl_c_outside_imports

# name: (module, one-line description)
COMMANDS = {
    "fit": ("retrain.fit", "train a classifier on a folder of photos (one subfolder per class)"),
    "embed": ("retrain.embed", "bottlenecks of a folder of photos into a feature store (Parquet; --ray: on a cluster)"),
    "label": ("retrain.label", "top-k labels for images or folders of images"),
    "evaluate": ("retrain.evaluate", "accuracy, per-class precision/recall, confusion on labelled photos"),
    "check": ("retrain.check", "check an image folder before training: counts, corrupt files, duplicates"),
    "report": ("retrain.report", "rewrite a run's report.html"),
    "compare": ("retrain.compare", "compare runs side by side"),
    "serve": ("retrain.serve", "serve a model over HTTP with a web page"),
    "export": ("retrain.export", "export a run as onnx, onnx-int8 or onnx-fp16, verified"),
    "bench": ("retrain.bench", "latency, throughput and size of a model"),
    "backbones": ("retrain.backbones", "the known backbones: size, input, accuracy, offline or not, speed here"),
}


class Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, with a suggestion) instead of exiting."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message}")


def _usage() -> str:
    cmds = COMMANDS
    w = max(len(c) for c in cmds)
    lines = [f"retrain {__version__}: train an image classifier on your own photos by transfer learning",
             "", "usage: retrain COMMAND [options]   (retrain COMMAND --help for its options)", "",
             "commands:"]
    lines += [f"  {c:<{w}}  {d}" for c, (_, d) in cmds.items()]
    lines += ["", "example:", "  retrain fit flower_photos/ --output runs/flowers",
              "  retrain label runs/flowers daisy.jpg"]
    return "\n".join(lines)


def build_parser(command: str):
    module_name, desc = COMMANDS[command]
    module = importlib.import_module(module_name)
    p = Parser(prog=f"retrain {command}", description=desc, allow_abbrev=False)
    module.add_arguments(p)
    return p, module


def parse(argv: list[str]):
    """(module, args) for argv, with 'did you mean' for unknown commands and options."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0)
    if argv[0] == "--version":
        print(f"retrain {__version__}")
        raise SystemExit(0)
    command, rest = argv[0], argv[1:]
    cmds = COMMANDS
    if command not in cmds:
        raise ConfigError(f"unknown command '{command}'; commands: {', '.join(cmds)}.{did_you_mean(command, cmds)}")
    p, module = build_parser(command)
    args, unknown = p.parse_known_args(rest)
    if unknown:
        opts = [o for a in p._actions for o in a.option_strings]
        bad = unknown[0]
        flag = bad.split("=", 1)[0]
        if flag.startswith("-"):
            raise ConfigError(f"retrain {command}: unknown option '{flag}'.{did_you_mean(flag, opts)} "
                              f"(see retrain {command} --help)")
        raise ConfigError(f"retrain {command}: unexpected argument '{bad}' (see retrain {command} --help)")
    return module, args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")  # file names that are not UTF-8 print as-is
    try:
        module, args = parse(argv)
        with ctrl_c_outside_imports():
            return int(module.main(args) or 0)
    except RetrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the disk, not the input: full, read-only, a name too long, ...
        if isinstance(e, BrokenPipeError):
            return 0
        from retrain.run import os_error_message

        print(f"error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept (cached bottlenecks, checkpoints); "
              "run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("RETRAIN_DEBUG"):
            raise
        print(f"error: internal error ({type(e).__name__}: {str(e)[:200]}); this is a bug in retrain: please "
              "report it with the command that caused it (RETRAIN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
