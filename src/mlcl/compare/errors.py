"""The one error type of mlcl-compare: printed as ``mlcl-compare: error: <message>`` with exit code 2."""

from __future__ import annotations


class CompareError(ValueError):
    """A bad argument or an unusable directory (unknown key, non-numeric axis, no runs...)."""
