"""User errors: mistakes in a config, a file or the data, reported as one paragraph (exit code 2).

Raise :class:`UserError` wherever the cause is something the user typed or pointed at; the entry
points print ``mlcl: error: <what> (<where>); <fix>`` on stderr without a traceback (the traceback
goes to the run's log). Anything else is a programming error and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A user mistake: ``what`` is wrong, ``where`` (config key or ``file[:line]``), ``fix`` how to fix it."""

    exit_code = 2

    def __init__(self, what: str, where: str | None = None, fix: str | None = None) -> None:
        self.what, self.where, self.fix = what.strip(), where, fix
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        """``mlcl: error: <what> (<where>); <fix>`` on one line."""
        text = self.what.rstrip(".")
        if self.where:
            text += f" ({self.where})"
        if self.fix:
            text += f"; {self.fix.strip()}"
        return f"mlcl: error: {' '.join(text.split())}"


class DataError(UserError, ValueError):
    """Bad content in a data file (corrupt, truncated, malformed, non-binary, NaN, empty split).

    ``where`` is ``file[:line]``; also a ``ValueError`` so callers that caught those keep working.
    """

    def __init__(self, what: str, path: object, fix: str | None = None, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(what, where, fix or "fix or replace the file, or point the config at another one")
