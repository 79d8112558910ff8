"""Which runs are seeds of one setting: default group keys, explicit ``--group-by`` and mixed groups.

By default runs are grouped by every setting that varies across them except the seed and
bookkeeping keys (paths, run directories, timestamps, checkpoint paths, ``hydra.*``, logger
settings). Keys that add nothing to the partition (``loss._target_`` once ``loss`` is a key) are
dropped so the table shows one readable column per real difference. A group whose runs still differ
in a setting other than the seed (possible with an explicit ``--group-by``) is flagged.
"""

from __future__ import annotations

import pandas as pd

from mlcl.compare.errors import CompareError
from mlcl.compare.load import ALIASES, config_columns

# config keys that never define a setting: where things were written, when, and how it was logged
NOISE_PREFIXES = ("hydra.", "paths.", "logger.", "callbacks.")
NOISE_NAMES = {
    "seed",
    "run_dir",
    "ckpt_path",
    "init_ckpt",
    "best_ckpt",
    "root",
    "task_name",
    "run_name",
    "progress_bar",
    "timestamp",
    "time",
    "date",
    "duration_s",
    "epochs",
    "skipped_steps",
    "overrides",
}
NOISE_SUFFIXES = ("_dir", "_path", "_file", "_folder", "_root", "_time")
# the config keys the aliases stand for: grouping shows the alias instead
ALIASED = {k for keys in ALIASES.values() for k in keys}


def is_noise(key: str) -> bool:
    """A bookkeeping key: never a reason to keep runs apart."""
    name = key.rsplit(".", 1)[-1]
    return key.startswith(NOISE_PREFIXES) or name in NOISE_NAMES or name.endswith(NOISE_SUFFIXES)


def _labels(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    """One hashable label per run for the tuple of ``keys`` (NaN and lists compare as text)."""
    if not keys:
        return pd.Series(["all"] * len(df), index=df.index)
    return df[keys].map(str).agg("\x1f".join, axis=1)


def _varies(df: pd.DataFrame, key: str) -> bool:
    return df[key].map(str).nunique() > 1


def _seed_derived(df: pd.DataFrame, key: str) -> bool:
    """Equal to the seed in every run (e.g. ``data.seed: ${seed}``): part of the seed, not a setting."""
    if "seed" not in df.columns:
        return False
    return bool((df[key].map(str) == df["seed"].map(str)).all())


def candidate_keys(df: pd.DataFrame) -> list[str]:
    """Settings that vary across runs and may define a group: aliases first, then config keys."""
    cols = config_columns(df)
    aliases = [a for a in ALIASES if a in cols and a != "seed"]
    rest = sorted(c for c in cols if c not in ALIASES and c not in ALIASED)
    out = []
    for k in aliases + rest:
        if is_noise(k) or not _varies(df, k) or _seed_derived(df, k):
            continue
        out.append(k)
    return out


def default_group_keys(df: pd.DataFrame) -> list[str]:
    """The smallest readable list of varying settings that separates every distinct setting."""
    chosen: list[str] = []
    n_groups = 1
    for key in candidate_keys(df):
        n = _labels(df, [*chosen, key]).nunique()
        if n > n_groups:  # the key splits some group further: it is a real difference
            chosen.append(key)
            n_groups = n
    return chosen


def check_keys(df: pd.DataFrame, keys: list[str], option: str) -> None:
    """Unknown keys -> one error naming the option and the keys that exist."""
    cols = config_columns(df)
    unknown = [k for k in keys if k not in df.columns]
    if unknown:
        varying = candidate_keys(df)
        hint = ", ".join(varying) if varying else "none vary"
        close = [c for c in cols if any(u.split(".")[-1] == c.split(".")[-1] for u in unknown)]
        near = f" (did you mean {', '.join(close[:5])}?)" if close else ""
        raise CompareError(
            f"{option} {','.join(unknown)}: no such config key in these runs{near}; keys that vary: {hint}"
        )


def differing(runs: pd.DataFrame, keys: list[str]) -> list[str]:
    """Which of ``keys`` take more than one value in ``runs`` (each nested key named once), plus
    ``"repeated seeds"`` when two runs share a seed."""
    differ = [k for k in keys if k in runs.columns and _varies(runs, k)]
    differ = [k for k in differ if not any(k.startswith(d + ".") for d in differ)]
    if not differ and "seed" in runs.columns and runs["seed"].duplicated().any():
        differ = ["repeated seeds"]
    return differ
