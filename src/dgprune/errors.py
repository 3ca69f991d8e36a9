"""User-facing exception types.

Anything raised as a `DgpruneError` is a problem the user can fix (bad config, missing data or weights);
the CLI prints its message without a traceback and exits non-zero. Other exceptions are bugs.
"""

from __future__ import annotations


class DgpruneError(Exception):
    """Base for user-facing errors: the CLI prints the message (no traceback) and exits non-zero."""

    exit_code: int = 2  # the CLI's exit status: 2 for a usage/config error


class RunFailedError(DgpruneError):
    """A correctly configured run that failed while running (e.g. diverged): the CLI exits with 1."""

    exit_code = 1


class DivergenceError(RunFailedError):
    """Training hit a non-finite loss, risk, score or weight; nothing after it is saved."""


class ConfigError(DgpruneError):
    """An invalid setting: unknown name, value out of range, inconsistent options."""


class ArgumentTypeError(ConfigError, TypeError):
    """A library function was handed the wrong kind of argument (Python API): also a TypeError, so
    code that catches the built-in error still does."""


class ArgumentValueError(ConfigError, ValueError):
    """A library function was handed an argument of the right kind but the wrong shape, size or count
    (Python API): also a ValueError."""


class DataError(DgpruneError):
    """A dataset cannot be found, read or split as asked."""


class WeightsError(DgpruneError):
    """A weights file is missing or does not fit the model."""
