"""Error types whose messages name the file, the field and the problem.

The CLI turns any :class:`RedrecError` into a one-paragraph message on stderr and exit code 2,
so users see *what* is wrong and *where*, never a traceback for bad input.
"""

from __future__ import annotations

from pathlib import Path


class RedrecError(Exception):
    """Base class of the errors redrec raises for bad input or bad configuration."""


class DataError(RedrecError):
    """Bad input data.

    Args:
        path: the file (or directory) the problem was found in.
        field: the column / key / struct field concerned (``None`` when the whole file is bad).
        problem: what is wrong, in words, with the offending value or row where known.
        hint: optional suggestion (a flag that relaxes the check, a command to run).
    """

    def __init__(self, path: str | Path | None, field: str | None, problem: str, hint: str | None = None):
        self.path = str(path) if path is not None else None
        self.field = field
        self.problem = problem
        self.hint = hint
        where = self.path or "<input>"
        if field:
            where += f": field '{field}'"
        msg = f"{where}: {problem}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)

    def __reduce__(self):  # pickled with its fields (default: the message only, which __init__ cannot take)
        return type(self), (self.path, self.field, self.problem, self.hint)


class ConfigError(RedrecError):
    """A configuration value is missing, unknown or of the wrong type."""

    def __init__(self, source: str | Path | None, field: str, problem: str):
        self.source = str(source) if source is not None else "<config>"
        self.field = field
        self.problem = problem
        super().__init__(f"{self.source}: field '{field}': {problem}")

    def __reduce__(self):
        return type(self), (self.source, self.field, self.problem)
