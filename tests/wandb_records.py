"""Read an offline W&B run back from its ``run-<id>.wandb`` file (no W&B server, no mocks).

The file is a 7-byte header (``:W&B``, magic, version) followed by LevelDB-style log records in
32 KiB blocks: ``crc32 (4) | length (2, little endian) | type (1: full, 2: first, 3: middle,
4: last)`` then the payload; a block tail shorter than a record header is padding. Each complete
payload is a ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[Any]:
    """Every protobuf ``Record`` stored in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, out, parts = HEADER, [], []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # padding at a block's end
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        parts.append(payload)
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            out.append(rec)
            parts = []
    return out


@dataclass
class OfflineRun:
    """What a test needs of one offline run: identity, config, summary, history keys, exit code."""

    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history_keys: set[str] = field(default_factory=set)
    artifacts: list[str] = field(default_factory=list)
    exit_code: int | None = None


def _value(text: str) -> Any:
    return json.loads(text) if text else None


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def read_run(path: Path) -> OfflineRun:
    """Fold the records of one ``.wandb`` file into an :class:`OfflineRun` (later values win)."""
    run = OfflineRun()
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            run.name, run.group, run.job_type, run.tags = (
                r.display_name,
                r.run_group,
                r.job_type,
                list(r.tags),
            )
            for item in r.config.update:
                run.config[_key(item)] = _value(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                run.config[_key(item)] = _value(item.value_json)
        elif kind == "summary":
            for item in rec.summary.update:
                run.summary[_key(item)] = _value(item.value_json)
        elif kind == "history":
            run.history_keys |= {_key(i) for i in rec.history.item}
        elif kind == "artifact":
            run.artifacts += [e.path for e in rec.artifact.manifest.contents]
        elif kind == "exit":
            run.exit_code = rec.exit.exit_code
    return run


def offline_runs(root: Path) -> list[OfflineRun]:
    """Every offline run below ``root`` (one per ``run-*.wandb`` file)."""
    return [read_run(p) for p in sorted(Path(root).rglob("offline-run-*/run-*.wandb"))]
