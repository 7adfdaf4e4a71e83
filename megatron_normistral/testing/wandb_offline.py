"""W&B in tests: read back what an offline run wrote (its id, config and history rows, decoded
from its ``.wandb`` transaction log with the protobuf classes of the installed wandb package,
which ships no reader of the file itself), and a training worker for which ``wandb`` cannot be
imported.

The file is W&B's header (``:W&B``, a 2-byte magic, a version byte) followed by a LevelDB
log: 32 KiB blocks of chunks, each a 7-byte header (CRC-32C, length: 2 bytes little-endian,
type: 1 full, 2 first, 3 middle, 4 last) and its bytes; a block's last < 7 bytes are padding.
The chunks of one record join into one serialized ``wandb_internal_pb2.Record``. The CRCs
are not checked: a damaged record fails to parse, which is enough for a test.
"""
from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

BLOCK = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc, length, type
FILE_HEADER = 7  # b":W&B", magic (2 bytes), version (1 byte)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator:
    """Every record of a ``.wandb`` file, in the order written."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = FILE_HEADER, b""
    while pos + CHUNK_HEADER.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER.size:  # padding at the end of a block
            pos += left_in_block
            continue
        _crc, length, kind = CHUNK_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zeros: the rest of the block was never written
            pos += left_in_block
            continue
        if kind not in (FULL, FIRST, MIDDLE, LAST):
            raise ValueError(f"{path}: chunk of unknown type {kind} at byte {pos}")
        pending += data[pos + CHUNK_HEADER.size : pos + CHUNK_HEADER.size + length]
        pos += CHUNK_HEADER.size + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """One ``offline-run-<time>-<id>/run-<id>.wandb`` file, decoded."""

    path: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    """One dict per logged step: {"_step": step, name: value, ...} (W&B's own keys start with _)."""

    @classmethod
    def read(cls, path: str | Path) -> "OfflineRun":
        run = cls(Path(path))
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_id, run.project, run.name = record.run.run_id, record.run.project, record.run.display_name
                run.config.update({_key(item): json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                run.config.update({_key(item): json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                run.history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        return run

    def series(self, name: str) -> dict[int, float]:
        """step -> value of one logged name."""
        return {row["_step"]: row[name] for row in self.history if name in row}


def offline_runs(wandb_dir: str | Path) -> list[OfflineRun]:
    """Every offline run under a W&B folder (``dir`` of wandb.init), oldest first (the folders
    are named by their start time)."""
    return [OfflineRun.read(path) for path in sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))]


def run_pretrain_without_wandb(rank: int, world_size: int, recipe) -> dict:
    """Worker: a run for which ``import wandb`` fails (as if the package were not installed).
    megatron-core imports wandb itself when it is installed (and copes with an ImportError),
    so whether *our* code needs it shows only with the import blocked, not in sys.modules."""
    from megatron_normistral.testing.tiny_run import run_pretrain

    sys.modules["wandb"] = None  # type: ignore[assignment]  # None in sys.modules: import raises ImportError
    return run_pretrain(rank, world_size, recipe)
