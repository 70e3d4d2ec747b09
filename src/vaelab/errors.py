"""The error types every layer raises. Each is a user mistake or a state the user can act on; the CLI prints
its message as one line (`vaelab: error: ...`) and exits with status 2, never with a traceback."""

from __future__ import annotations


class VaelabError(Exception):
    """Base of the errors that the CLI reports as one line."""


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
