"""Errors whose message is meant for the person using the studio.

Anything raised as a ``StudioError`` is shown as-is (one line, no traceback) by the
CLI and the UI; anything else is a bug.
"""


class StudioError(Exception):
    """An error with a message written for the user."""


class InputError(StudioError):
    """Bad user input: a file that is not an image, an empty prompt, a bad name..."""


class NotFoundError(StudioError):
    """A template, job or backbone that does not exist."""


class CancelledError(StudioError):
    """A job stopped because the user asked it to."""


class InsufficientMemoryError(StudioError):
    """A run that would not fit this GPU (or machine), refused before it starts; says what would fit."""
