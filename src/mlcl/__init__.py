"""mlcl: comparing multi-label contrastive losses with PyTorch Lightning and Hydra."""

from mlcl.config.root import register_resolvers as _register_resolvers

# ${mlcl.root:} must exist before Hydra composes any of the shipped configs
_register_resolvers()
