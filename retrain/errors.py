"""Typed errors. The library raises these; only the CLI prints them and picks the exit code."""


class RetrainError(Exception):
    """A problem the user can fix: the message says what was found and what to do."""

    exit_code = 2


class DataError(RetrainError):
    """The image folder is missing, empty, or shaped wrongly."""


class ImageError(RetrainError):
    """One image could not be read (corrupt, truncated, too large, not an image)."""


class ConfigError(RetrainError):
    """A flag or setting has a value that is not allowed."""


class ModelError(RetrainError):
    """A file is not a retrain model, or its labels do not match it."""


class MissingDependency(RetrainError):
    """An optional package (or hardware provider) needed for this feature is not installed."""


def closest(name, choices):
    """The closest valid choice to `name`, or None: for 'did you mean ...?' hints."""
    import difflib

    hits = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return hits[0] if hits else None


def did_you_mean(name, choices):
    hit = closest(name, choices)
    return f" Did you mean '{hit}'?" if hit else ""


class FineTuneProcessError(RetrainError):
    """A process of `fit --fine-tune --nproc` died or failed (not the input's fault: exit 1)."""

    exit_code = 1
