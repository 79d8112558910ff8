"""Hydra configs shipped with mlcl (``pkg://mlcl.conf``): train.yaml, eval.yaml and the config groups."""
