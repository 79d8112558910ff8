"""Declared hyper-parameters: one :class:`Param` per key, with its type, range and default.

A loss plugin lists its hyper-parameters once (``hparams = {"gamma": Float(2.0, ge=0), ...}``); the
plugin constructor and :func:`mlcl.config.validate` both check values against that declaration, and
the config groups (``conf/model``, ``conf/optimizer``, ...) are declared the same way in
:mod:`mlcl.config.schemas`. A failed check raises :class:`ConfigError` naming the full config key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mlcl.errors import UserError

REQUIRED: Any = "???"


class ConfigError(UserError, ValueError):
    """A config value of the wrong type, out of range or not among the choices (exit code 2)."""


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) else str(value)


@dataclass(frozen=True)
class Param:
    """One hyper-parameter: ``kind`` (float, int, bool, str, list, dict, any), bounds, choices, default.

    ``item`` is the kind of list elements (bounds then apply to every element); ``nullable`` allows null;
    ``choices`` lists the accepted values (compared as strings, so ``precision: 32`` matches "32").
    """

    default: Any = REQUIRED
    kind: str = "float"
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False
    item: str | None = None
    doc: str = ""
    #: kind "path": what must exist there ("file", "dir" or "any"); relative paths resolve against the root
    exists: str = "any"

    def describe(self) -> str:
        """Human description of the accepted values, e.g. ``a number > 0`` or ``one of a, b``."""
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        else:
            noun = {
                "float": "a number",
                "int": "an integer",
                "bool": "true or false",
                "str": "a string",
                "path": "a path",
                "any": "a value",
            }
            text = noun.get(self.kind, f"a {self.kind}")
            if self.kind == "list" and self.item:
                text = f"a list of {noun.get(self.item, self.item)}s"
            bounds = [f"{op} {_fmt(b)}" for op, b in self._bounds() if b is not None]
            if bounds:
                text += " " + " and ".join(bounds)
        return text + (" (or null)" if self.nullable else "")

    def _bounds(self) -> list[tuple[str, Any]]:
        return [(">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)]

    def _error(self, key: str, value: Any, problem: str | None = None) -> ConfigError:
        what = f"{key}={_fmt(value)} is {problem or 'not valid'}"
        fix = f"set {key} to {self.describe()}"
        if self.default is not REQUIRED:
            fix += f" (default {_fmt(self.default)})"
        return ConfigError(what, key, fix)

    def _scalar(self, kind: str, value: Any, key: str, shown: Any) -> Any:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise self._error(key, shown, "not a boolean")
        if kind in ("float", "int"):
            if isinstance(value, bool):
                raise self._error(key, shown, "not a number")
            if isinstance(value, str):  # a quoted number, e.g. '1e-5' from a YAML 1.1 loader
                try:
                    value = float(value)
                except ValueError:
                    raise self._error(key, shown, "not a number") from None
            if not isinstance(value, (int, float)):
                raise self._error(key, shown, "not a number")
            if not math.isfinite(value):
                raise self._error(key, shown, "not finite")
            if kind == "int":
                if isinstance(value, float) and not value.is_integer():
                    raise self._error(key, shown, "not an integer")
                value = int(value)
            else:
                value = float(value)
            for op, bound in self._bounds():
                ok = (
                    bound is None
                    or {
                        ">=": value >= bound,
                        ">": value > bound,
                        "<=": value <= bound,
                        "<": value < bound,
                    }[op]
                )
                if not ok:
                    raise self._error(key, shown, "out of range")
            return value
        if kind in ("str", "path"):
            if isinstance(value, str):
                return value
            raise self._error(key, shown, "not a string")
        return value

    def check(self, value: Any, key: str) -> Any:
        """``value`` converted to the declared kind (ints to float etc.); raises :class:`ConfigError`."""
        if value is None:
            if self.nullable:
                return None
            raise self._error(key, value, "null")
        if self.choices is not None:
            for choice in self.choices:
                if value == choice or str(value) == str(choice):
                    return choice if not isinstance(value, bool) else value
            raise self._error(key, value, "not one of the choices")
        if self.kind == "list":
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise self._error(key, value, "not a list")
            if self.item is None:
                return list(value)
            return [self._scalar(self.item, v, key, value) for v in value]
        if self.kind == "dict":
            if not isinstance(value, Mapping):
                raise self._error(key, value, "not a mapping")
            if self.item is None:
                return dict(value)
            return {k: self._scalar(self.item, v, f"{key}.{k}", v) for k, v in value.items()}
        return self._scalar(self.kind, value, key, value)


def Float(default: Any = REQUIRED, **kw: Any) -> Param:  # noqa: N802 (reads like a type)
    return Param(default, "float", **kw)


def Int(default: Any = REQUIRED, **kw: Any) -> Param:  # noqa: N802
    return Param(default, "int", **kw)


def Bool(default: Any = REQUIRED, **kw: Any) -> Param:  # noqa: N802
    return Param(default, "bool", **kw)


def Str(default: Any = REQUIRED, **kw: Any) -> Param:  # noqa: N802
    return Param(default, "str", **kw)


def Choice(default: Any, *choices: Any, **kw: Any) -> Param:  # noqa: N802
    return Param(default, "str", choices=tuple(choices), **kw)


def List(default: Any = REQUIRED, item: str | None = None, **kw: Any) -> Param:  # noqa: N802
    return Param(default, "list", item=item, **kw)


def Dict(default: Any = REQUIRED, item: str | None = None, **kw: Any) -> Param:  # noqa: N802
    return Param(default, "dict", item=item, **kw)


def Path_(default: Any = None, exists: str = "any", **kw: Any) -> Param:  # noqa: N802
    return Param(default, "path", exists=exists, **kw)


def Any_(default: Any = None, **kw: Any) -> Param:  # noqa: N802
    return Param(default, "any", **{"nullable": True, **kw})


def check_all(spec: Mapping[str, Param], given: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Every key of ``spec`` checked (defaults filled in); unknown keys raise :class:`ConfigError`."""
    unknown = sorted(set(given) - set(spec))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(
            f"unknown key {key}",
            key,
            f"valid keys here: {', '.join(sorted(spec)) or 'none'}",
        )
    out = {}
    for name, param in spec.items():
        key = f"{prefix}.{name}" if prefix else name
        out[name] = param.check(given.get(name, param.default), key)
    return out
