"""Loss plugins. Importing this package imports every module in it, which registers its plugins,
so a new loss is one file here plus one YAML in ``conf/loss/`` (see ``base``)."""

import importlib
import pkgutil

from mlcl.losses.base import LOSSES, LossContext, LossPlugin, get_loss_class, list_losses, register_loss

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["LOSSES", "LossContext", "LossPlugin", "get_loss_class", "list_losses", "register_loss"]
