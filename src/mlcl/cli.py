"""The error wrapper of every entry point: a user error ends in one paragraph on stderr and exit 2.

``mlcl: error: <what is wrong> (<key or file[:line]>); <how to fix it>``

User errors are :class:`~mlcl.errors.UserError` (anywhere in the exception chain), Hydra composition
errors (unknown group option, bad override, unknown key), OmegaConf errors (``???`` values, missing
interpolations, type errors) and missing files. Their traceback is not printed; it is written to the
run's log files (every ``logging.FileHandler`` attached, e.g. ``train.log``), and
``HYDRA_FULL_ERROR=1`` prints it before the paragraph. Anything else is a programming error and keeps
its traceback.

Use ``@cli.hydra_main("train")`` instead of ``@hydra.main(...)`` on a Hydra task, and ``@cli.guard`` on
an argparse ``main``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback
import zipfile
from collections.abc import Callable
from typing import Any, TypeVar

from mlcl.errors import UserError

log = logging.getLogger("mlcl")
F = TypeVar("F", bound=Callable[..., Any])
FULL = "HYDRA_FULL_ERROR"
_OURS = "MLCL_SET_HYDRA_FULL_ERROR"  # marks a HYDRA_FULL_ERROR=1 set by this wrapper, not by the user


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _hydra_error(exc: BaseException) -> UserError | None:
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if not isinstance(exc, (ConfigCompositionException, MissingConfigException, OverrideParseException)):
        return None
    text = str(exc)
    found = re.search(r"Could not find '([^']+)/([^']+)'", text)
    options = re.search(r"Available options in '([^']+)':\s*\n((?:\s+\S+\n?)+)", text)
    if found:
        group, name = found.groups()
        fix = f"pick one of: {', '.join(options.group(2).split())}" if options else f"check {group}/ options"
        return UserError(f"unknown {group} option {name!r}", group, fix)
    struct = re.search(r"Could not override '([^']+)'", text)
    if struct:
        key = struct.group(1)
        cause = _one_line(str(exc.__cause__).splitlines()[0]) if exc.__cause__ else _one_line(text)
        return UserError(
            f"cannot set {key}: {cause}",
            key,
            f"check the spelling of {key}; a key that is not in the config is added with +{key}=...",
        )
    if isinstance(exc, OverrideParseException):
        return UserError(
            f"cannot parse the override: {_one_line(text)}", "command line", "quote values with spaces"
        )
    key = getattr(exc.__cause__, "full_key", None) or "config"
    return UserError(_one_line(text.split("\n\n")[0]), key, "see the available options with --help")


def _omegaconf_error(exc: BaseException) -> UserError | None:
    from omegaconf.errors import (
        InterpolationToMissingValueError,
        MissingMandatoryValue,
        OmegaConfBaseException,
    )

    if not isinstance(exc, OmegaConfBaseException):
        return None
    key = getattr(exc, "full_key", None) or "config"
    first = _one_line(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    if isinstance(exc, (MissingMandatoryValue, InterpolationToMissingValueError)):
        return UserError(
            f"a required value is not set: {first}", key, "add it on the command line (<key>=<value>)"
        )
    return UserError(first, key, "fix that value on the command line or in the YAML")


_DATA_DIR = os.sep + os.path.join("mlcl", "data") + os.sep
_LEADING_FILE = re.compile(r"^(?P<file>[^\s:][^:\n]*?)(?::(?P<line>\d+))?: (?P<what>.+)$", re.DOTALL)
_SET_KEY = re.compile(r"\bset (?P<key>[a-z_]+(?:\.[\w{},]+)+)")


def _raised_in_data_code(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if _DATA_DIR in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _data_error(exc: BaseException) -> UserError | None:
    """A ValueError/OSError that the data code raised about a file or a data key (its message says
    which: ``<file>[:<line>]: <what>`` or ``...; set data.<key>``)."""
    if not isinstance(exc, (ValueError, OSError, EOFError, zipfile.BadZipFile)) or not _raised_in_data_code(
        exc
    ):
        return None
    text = _one_line(str(exc))
    found = _LEADING_FILE.match(text)
    if found and os.path.exists(found["file"]):
        where = found["file"] + (f":{found['line']}" if found["line"] else "")
        return UserError(found["what"], where, "fix or replace the file, or point the config at another one")
    key = _SET_KEY.search(text)
    filename = getattr(exc, "filename", None)
    where = key["key"] if key else str(filename or "data")
    return UserError(text, where, f"check {where}" if key else "check the data files and the data.* keys")


def to_user_error(exc: BaseException) -> UserError | None:
    """The :class:`UserError` that ``exc`` stands for, or None for a programming error."""
    chain = _chain(exc)
    for e in chain:
        if isinstance(e, UserError):
            return e
    for e in chain:
        converted = _hydra_error(e) or _omegaconf_error(e) or _data_error(e)
        if converted is not None:
            return converted
    for e in chain:
        if isinstance(
            e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
        ) and getattr(e, "filename", None):
            return UserError(
                f"{e.strerror or 'cannot open'}: {e.filename}", str(e.filename), "check the path"
            )
    return None


def _file_handlers() -> list[logging.Handler]:
    found: list[logging.Handler] = []
    for logger in (logging.getLogger(), log):
        found += [h for h in logger.handlers if isinstance(h, logging.FileHandler) and h not in found]
    return found


def log_traceback(exc: BaseException, paragraph: str) -> None:
    """Write the traceback to the log files only (the console gets the one paragraph)."""
    if getattr(exc, "_mlcl_logged", False):
        return
    record = log.makeRecord(
        log.name, logging.ERROR, __file__, 0, "%s", (paragraph,), (type(exc), exc, exc.__traceback__)
    )
    for handler in _file_handlers():
        handler.handle(record)
    try:
        exc._mlcl_logged = True  # type: ignore[attr-defined]
    except AttributeError:
        pass


def _user_full_error() -> bool:
    return os.environ.get(FULL) == "1" and os.environ.get(_OURS) != "1"


def report(exc: BaseException, err: UserError) -> None:
    """Log the traceback, print the paragraph (after the traceback with HYDRA_FULL_ERROR=1)."""
    log_traceback(exc, err.paragraph())
    sys.stdout.flush()
    if _user_full_error():
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(err.paragraph(), file=sys.stderr, flush=True)


def _reporting(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; a user error is reported and becomes ``SystemExit(2)``, others propagate."""
    try:
        return fn(*args, **kwargs)
    except BrokenPipeError:  # `mlcl-train --help | head`: the reader left; nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit flush
        raise SystemExit(0) from None
    except Exception as exc:
        err = to_user_error(exc)
        if err is None:
            raise
        report(exc, err)
        raise SystemExit(2) from None


def run_guarded(fn: Callable[..., Any], *args: Any, hydra: bool = False, **kwargs: Any) -> Any:
    """Call ``fn``; a user error is reported (:func:`report`) and ends the process with exit code 2.

    ``hydra=True`` (``fn`` is a ``@hydra.main`` entry) asks Hydra to re-raise instead of printing its
    own report, so the error reaches this wrapper with its chain.
    """
    saved = {k: os.environ.get(k) for k in (FULL, _OURS)}
    if hydra and not _user_full_error():
        os.environ[FULL], os.environ[_OURS] = "1", "1"
    try:
        return _reporting(fn, *args, **kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def guard(main: F) -> F:
    """Decorator of a plain (argparse) ``main``: user errors end in one paragraph and exit 2."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run_guarded(main, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def hydra_main(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """``@hydra.main(config_path="conf", config_name=...)`` with user errors reported as one paragraph.

    The traceback of a user error inside the task is written to the run's log files while they are
    still attached. The undecorated task stays available as ``main.task``.
    """
    import hydra

    def decorate(task: Callable[[Any], Any]) -> Callable[[], Any]:
        @functools.wraps(task)
        def logged_task(cfg: Any) -> Any:
            # reported here, while the run's log files are attached; SystemExit passes through Hydra
            # without its "Error executing job" line
            return _reporting(task, cfg)

        entry = hydra.main(config_path="conf", config_name=config_name, version_base="1.3")(logged_task)

        @functools.wraps(task)
        def main() -> Any:
            return run_guarded(entry, hydra=True)

        main.task = task  # type: ignore[attr-defined]
        return main

    return decorate
