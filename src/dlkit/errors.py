"""User-facing errors: each says what went wrong and what to do, in one line."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class DlkitError(Exception):
    """A mistake the user can fix; the CLI prints the message alone and exits with code 2."""


class ConfigError(DlkitError):
    """A recipe field, override or option is unknown or has a bad value."""


class RegistryError(DlkitError):
    """A name is unknown to a registry, or registered twice."""


class DataError(DlkitError):
    """A data set is missing, corrupt or does not fit the recipe."""


class RunDirError(DlkitError):
    """A run directory is missing, incomplete or unreadable."""


class InputError(DlkitError):
    """An input given for prediction cannot be read or has the wrong shape."""


class TrainingError(DlkitError):
    """Training cannot go on (a non-finite loss, for instance)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so that both stop a run the same way (exit 143, not 130)."""


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM; the message says what was kept. Not a user mistake: the
    CLI prints it as `interrupted: ...` and exits 130 (143 for SIGTERM)."""

    def __init__(self, message: str, cause: BaseException | None = None):
        super().__init__(message)
        self.exit_code = 143 if isinstance(cause, Terminated) else 130


def error_line(exc: BaseException) -> str:
    """One line for an error: a DlkitError's message, an OS error as `what: file`, else the text."""
    if isinstance(exc, DlkitError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc.strerror or exc)
    return " ".join(str(exc).split()) or type(exc).__name__


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest choice, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
