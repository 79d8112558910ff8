"""Config support: the project root (:mod:`.root`), declared parameters (:mod:`.params`), the group
schemas (:mod:`.schemas`) and :func:`validate`, the check run before anything heavy is built.

Imports stay light (OmegaConf only) because ``import mlcl`` registers the root resolver from here.
"""

from __future__ import annotations

from typing import Any

from mlcl.config.root import ENV as ROOT_ENV
from mlcl.config.root import project_root, resolve_path


def validate(cfg: Any, *, task: str = "train") -> list[str]:
    """Check a composed config (see :func:`mlcl.config.validate.validate`); returns the warnings."""
    from mlcl.config.validation import validate as _validate

    return _validate(cfg, task=task)


__all__ = ["ROOT_ENV", "project_root", "resolve_path", "validate"]
