"""The error types every layer raises. Each is a user mistake or a state the user can act on; the CLI prints
its message as one line (`vaelab: error: ...`) and exits with status 2, never with a traceback."""

from __future__ import annotations

import sys

ERROR_STATUS = 2  # the exit status of a VaelabError
INTERRUPTED_STATUS = 130  # ... and of Ctrl-C


class VaelabError(Exception):
    """Base of the errors that the CLI reports as one line."""


def say(error: VaelabError) -> None:
    """Prints the error's one line, once: a launcher's SIGTERM after the CLI printed it does not repeat it."""
    if not getattr(error, "printed", False):
        print(f"vaelab: error: {error}", file=sys.stderr, flush=True)
        error.printed = True  # type: ignore[attr-defined]


class ConfigError(VaelabError, ValueError):
    """A user-supplied setting is invalid; the message names the value and what is allowed."""


class DataError(VaelabError, ValueError):
    """The data is missing or malformed; the message says what was found and what is expected."""


class RunError(VaelabError, ValueError):
    """A run directory is missing or unreadable."""


class TrainingError(VaelabError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the likely cause."""


class NotNormalizedWarning(UserWarning):
    """A likelihood is used on data where it is not a normalized density (e.g. Bernoulli on grey pixels)."""
