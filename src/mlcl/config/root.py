"""The project root: the one folder that relative data, weight and output paths resolve against.

Resolution order (first match wins):

1. ``$MLCL_ROOT`` (``~`` expanded; a relative value is taken relative to the current directory);
2. the nearest ancestor of the current directory (itself included) holding a ``.mlcl-root`` file or
   the mlcl ``pyproject.toml`` (``name = "mlcl"``), i.e. a source checkout;
3. the source checkout of an editable install (the repository that holds ``src/mlcl``);
4. the current directory, with a logged note (a wheel install run outside any checkout).

The YAMLs read it through the OmegaConf resolver ``${mlcl.root:}`` (registered on ``import mlcl``);
:func:`resolve_path` applies the same rule to a path typed on the command line.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("mlcl")

ENV = "MLCL_ROOT"
MARKER = ".mlcl-root"
_NAME = re.compile(r'^\s*name\s*=\s*["\']mlcl["\']\s*$', re.MULTILINE)
_noted: set[str] = set()


def _is_checkout(folder: Path) -> bool:
    """``folder`` holds the marker file or mlcl's own ``pyproject.toml``."""
    if (folder / MARKER).is_file():
        return True
    pyproject = folder / "pyproject.toml"
    try:
        return pyproject.is_file() and bool(_NAME.search(pyproject.read_text(errors="replace")))
    except OSError:
        return False


def _editable_checkout() -> Path | None:
    """The repository of an editable (``src/mlcl``) install, None for a wheel install."""
    package = Path(__file__).resolve().parents[1]
    if package.parent.name != "src":
        return None
    repo = package.parent.parent
    return repo if _is_checkout(repo) else None


def project_root() -> Path:
    """The absolute project root (see the module docstring for the order of the rules)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser().absolute()
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if _is_checkout(folder):
            return folder
    repo = _editable_checkout()
    if repo is not None:
        return repo
    if str(cwd) not in _noted:  # once per directory, not once per interpolation
        _noted.add(str(cwd))
        log.info(
            "project root: %s (the current directory; no %s, no %s file or mlcl checkout above it). "
            "Relative data and output paths resolve against it; set %s to choose another root.",
            cwd,
            ENV,
            MARKER,
            ENV,
        )
    return cwd


def resolve_path(value: str | os.PathLike[str], root: Path | None = None) -> Path:
    """``value`` with ``~`` expanded; a relative path is taken relative to the project root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (root or project_root()) / path


def register_resolvers() -> None:
    """Register ``${mlcl.root:}`` with OmegaConf (idempotent; called on ``import mlcl``)."""
    if not OmegaConf.has_resolver("mlcl.root"):
        OmegaConf.register_new_resolver("mlcl.root", lambda: str(project_root()))
