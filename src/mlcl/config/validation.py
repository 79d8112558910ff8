"""``validate(cfg)``: check a composed config before anything heavy (data, model, trainer) is built.

Checks, in order: mandatory values (``???``) and interpolations; every key a schema declares
(:mod:`mlcl.config.schemas`, the loss plugin's ``hyperparams``) for type, range and choices; paths
(relative ones are made absolute against the project root, in place, and must exist); then
combinations that cannot work. The first problem raises :class:`~mlcl.errors.UserError` naming the
key; keys that have no effect are returned (and logged) as warnings. Unknown keys and groups pass.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlcl.config.params import Param
from mlcl.config.root import ENV as ROOT_ENV
from mlcl.config.root import project_root
from mlcl.config.schemas import AUGMENT_BY_SOURCE, SCHEMAS
from mlcl.errors import UserError

log = logging.getLogger("mlcl")
_ENV_REF = re.compile(r"oc\.env:(\w+)")
#: what to type for a mandatory value, by key (the rest get a generic hint)
_REQUIRED_FIX = {
    "data.root": "point it at the dataset folder, e.g. data.root=/data/coco",
    "data.path": "point it at the .npz/.h5 file, e.g. data.path=/data/table.npz",
    "missing.path": "point it at the observed-label file, e.g. missing.path=/data/coco_train_0.75left.txt",
    "backbone.name": "name a timm model, e.g. backbone.name=convnext_tiny",
    "ckpt_path": "point it at a checkpoint, e.g. ckpt_path=outputs/train/bce/<run>/checkpoints/best.ckpt",
    "stage1_ckpt": "point it at the stage-one run's checkpoints/best.ckpt (or null: no initialisation)",
    "pretrain_ckpt": "point it at the pre-training run's checkpoints/last.ckpt (or null: no pre-training)",
}


def _node(cfg: Any, path: str) -> Any:
    return cfg if not path else OmegaConf.select(cfg, path, throw_on_missing=False)


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _is_interpolation(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = _node(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and OmegaConf.is_interpolation(node, leaf)


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys holding ``???`` (without resolving interpolations, which may need Hydra's runtime)."""
    found: list[str] = []
    if isinstance(node, DictConfig):
        items = [(str(k), k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        items = [(str(i), i) for i in range(len(node))]
    else:
        return found
    for name, k in items:
        key = _key(prefix, name)
        if key == "hydra":
            continue
        if OmegaConf.is_missing(node, k):
            found.append(key)
        elif not OmegaConf.is_interpolation(node, k):
            found += _missing_keys(node._get_node(k), key)
    return found


def _check_required_and_resolvable(cfg: DictConfig) -> None:
    missing = _missing_keys(cfg)
    if missing:
        key = missing[0]
        fix = _REQUIRED_FIX.get(key, f"add {key}=<value> to the command line")
        raise UserError(f"{key} is required but not set", key, fix)
    for name in cfg:
        if name == "hydra":
            continue
        try:  # resolving every value surfaces a broken interpolation with its key
            OmegaConf.to_container(cfg[name], resolve=True) if OmegaConf.is_config(cfg[name]) else cfg[name]
        except OmegaConfBaseException as exc:
            if "HydraConfig was not set" in str(exc):
                continue  # ${hydra:...} outside a Hydra run (composed in tests or notebooks)
            key = getattr(exc, "full_key", None) or str(name)
            first = str(exc).splitlines()[0]
            raise UserError(f"{key} cannot be resolved: {first}", key, "fix that value") from exc


def _typed_key(key: str, raw: str) -> str:
    """The key the user types for ``key``: the target of a plain ``${other}`` / ``${..other}`` link."""
    link = re.fullmatch(r"\$\{(\.*)([\w.]+)\}", raw.strip())
    if not link:
        return key
    dots, target = link.groups()
    if not dots:
        return target
    parent = key.split(".")[: -len(dots)]
    return ".".join([*parent, target])


class _Checker:
    """Checks one config: declared keys and paths against the project root; collects warnings."""

    def __init__(self, cfg: DictConfig, task: str) -> None:
        self.cfg, self.task = cfg, task
        self.root = project_root()
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ declared keys
    def check_node(self, path: str, spec: Mapping[str, Param]) -> None:
        """Every key of ``spec`` present in the node at ``path`` (others are left alone)."""
        node = _node(self.cfg, path)
        if not isinstance(node, DictConfig):
            return
        for name, param in spec.items():
            if name not in node:
                continue
            key = _key(path, name)
            value = (
                OmegaConf.to_container(node[name], resolve=True)
                if OmegaConf.is_config(node[name])
                else node[name]
            )
            if param.kind == "path":
                self.check_path(key, value, param)
            else:
                param.check(value, key)

    def check_path(self, key: str, value: Any, param: Param) -> None:
        """A relative path is made absolute under the root (in the config); it must exist."""
        if value is True and key == "backbone.pretrained":
            raise UserError(
                "backbone.pretrained=true would download weights and there is no network here",
                key,
                "set backbone.pretrained=/path/to/weights.pth (a local file) or backbone.pretrained=null",
            )
        value = param.check(value, key)
        if value is None or (key == "ckpt_path" and value == "last"):
            return
        path = Path(str(value)).expanduser()
        if not path.is_absolute():
            path = self.root / path
            if not _is_interpolation(self.cfg, key):
                OmegaConf.update(self.cfg, key, str(path), merge=False)
        ok = {"file": path.is_file, "dir": path.is_dir}.get(param.exists, path.exists)()
        if ok:
            return
        raw = self._raw(key)
        key = _typed_key(key, raw)
        envs = [e for e in _ENV_REF.findall(raw) if e != ROOT_ENV]
        if "paths.data_dir" in raw:
            envs.append("MLCL_DATA")
        envs.append(ROOT_ENV)
        kind = {"file": "file", "dir": "folder"}.get(param.exists, "path")
        what = f"{kind} not found: {path}" if not path.exists() else f"{path} is not a {kind}"
        raise UserError(
            what,
            key,
            f"set {key} to an existing {kind}; relative paths resolve against the project root "
            f"{self.root} (set {' or '.join(envs)} to change where it is looked for)",
        )

    def _raw(self, key: str) -> str:
        parent, _, leaf = key.rpartition(".")
        node = _node(self.cfg, parent) if parent else self.cfg
        try:
            return str(node._get_node(leaf)._value())  # the unresolved text, to name its env variables
        except Exception:  # noqa: BLE001 (best effort: only used to word the hint)
            return ""

    def check_declared(self) -> None:
        for path, schemas in SCHEMAS.items():
            node = _node(self.cfg, path)
            if not isinstance(node, DictConfig):
                continue
            for schema in schemas:
                self.check_node(path, schema(node))
        source = _node(self.cfg, "data.source")
        if isinstance(source, DictConfig):
            name = str(source.get("_target_", "")).rsplit(".", 1)[-1]
            self.check_node("data.augment", AUGMENT_BY_SOURCE.get(name, {}))

    def warn(self, key: str, text: str) -> None:
        message = f"mlcl: warning: {text} ({key})"
        self.warnings.append(message)
        log.warning(message)


def validate(cfg: DictConfig, *, task: str = "train") -> list[str]:
    """Check ``cfg`` (a composed train or eval config); raise UserError, return the warnings.

    Relative paths of the declared path keys (``data.path``, ``backbone.pretrained``, ...) are
    replaced in ``cfg`` by absolute ones under the project root.
    """
    from mlcl.config.checks import check_combinations, check_loss, check_metrics

    _check_required_and_resolvable(cfg)
    checker = _Checker(cfg, task)
    checker.check_declared()
    if task == "train" and "loss" in cfg:
        plugin = check_loss(checker)
        check_combinations(checker, plugin)
        check_metrics(checker)
    return checker.warnings
