"""Usage errors of the command line: printed as one clear message, exit code 2."""

from __future__ import annotations


class UsageError(Exception):
    """A bad command-line option: the message says what was expected, what came, and how to fix it."""

    exit_code = 2
