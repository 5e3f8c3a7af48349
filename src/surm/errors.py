"""The failures surm expects and reports in one line (the command line prints them and exits with status 2).

Every one of them is raised before or instead of a silent wrong result: bad input, a file that cannot be trusted,
a run that diverged. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class SurmError(Exception):
    """An expected failure whose message alone tells the user what went wrong and what to do."""


class CheckpointError(SurmError, ValueError):
    """A checkpoint that cannot be read, is not a surm checkpoint, or does not match the run that would resume it."""


class TrainingDiverged(SurmError, RuntimeError):
    """Training stopped because the loss became non-finite or grew far above its starting value."""


class RunsFailed(SurmError, RuntimeError):
    """Some runs of a comparison or search did not finish (each is listed in the message)."""
