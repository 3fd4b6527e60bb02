"""Every error the tool reports on purpose, each carrying the exit code it ends a run with.

Two kinds matter to a batch: errors about one slide (`SlideError`: a failed row, the batch goes
on, exit code 1 at the end) and errors about the run itself (bad options, a wrong model or
features folder: one clear line before any work, exit code 2). The CLI catches
`WsiEmbedError` once and prints its message.
"""

from __future__ import annotations


class WsiEmbedError(Exception):
    """An expected failure whose message names the file and the fix."""

    exit_code = 1


class UsageError(WsiEmbedError):
    """Bad input found before any work starts (exit code 2)."""

    exit_code = 2


class SlideError(WsiEmbedError):
    """A problem with one slide: the batch records it and goes on with the others."""


class TileDecodeError(SlideError):
    """A compressed tile that does not decode cleanly: the slide fails, as in OpenSlide."""


class OutputError(SlideError):
    """An existing output that cannot be used as is (made with other settings)."""


class EncoderError(UsageError):
    """Unknown preset, unusable weights, or weights that cannot be found."""


class FeatureFileError(UsageError):
    """A features file that cannot be used for slide-level work (the message says why)."""


class ModelError(UsageError):
    """A model file that cannot be used (missing, corrupt, or for other features)."""


class TrainError(UsageError):
    """Bad training input; the message names the file or option and the fix."""


class TrainingDiverged(TrainError):
    """The loss became non-finite before any epoch could be kept (too high a learning rate)."""


def one_line(e: BaseException) -> str:
    """An error's message on one line, for a report's CSV cell."""
    return " ".join(str(e).split()) or type(e).__name__


def describe_error(e: BaseException) -> str:
    """An error for a report: its message alone when it is one of ours, else its type and
    its one-line message (an unexpected error must say what it was)."""
    if isinstance(e, WsiEmbedError):
        return one_line(e)
    return f"{type(e).__name__}: {one_line(e)}"
