"""Streaming I/O of Hugging Face safetensors checkpoints.

Reading opens tensors one at a time (``safe_open`` reads only the requested tensor's bytes),
so a converter holds only what it is converting. Writing buffers tensors only until a shard
is full, then writes it. Both sides count every tensor, so a conversion can prove that each
was consumed / written exactly once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # HF's "5GB" shard limit (decimal, as transformers uses)


class CheckpointIOError(ValueError):
    pass


class HFCheckpointReader:
    """Tensors of an HF folder: ``model.safetensors`` or shards listed by the index."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.directory / SINGLE_NAME).exists():
            with safe_open(self.directory / SINGLE_NAME, framework="pt") as f:
                weight_map = {name: SINGLE_NAME for name in f.keys()}
        else:
            raise CheckpointIOError(f"{self.directory}: neither {INDEX_NAME} nor {SINGLE_NAME} found")
        self._file_of: dict[str, str] = dict(weight_map)
        self._consumed: set[str] = set()

    def config(self) -> dict:
        path = self.directory / "config.json"
        if not path.exists():
            raise CheckpointIOError(f"{path} not found")
        return json.loads(path.read_text())

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header (no tensor data is read)."""
        with safe_open(self.directory / self._file_of[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now. Reading a tensor twice is a conversion bug."""
        if name not in self._file_of:
            raise CheckpointIOError(f"tensor {name!r} is missing from the HF checkpoint {self.directory}")
        if name in self._consumed:
            raise CheckpointIOError(f"tensor {name!r} was read twice")
        with safe_open(self.directory / self._file_of[name], framework="pt") as f:
            tensor = f.get_tensor(name)
        self._consumed.add(name)
        return tensor

    def skip(self, name: str) -> None:
        """Mark a tensor as deliberately not converted."""
        self._consumed.add(name)

    def unconsumed(self) -> list[str]:
        return sorted(set(self._file_of) - self._consumed)


class ShardedSafetensorsWriter:
    """Writes ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` plus
    ``model.safetensors.index.json``. Tensors are written in the order they are added; a
    shard is flushed as soon as the next tensor would not fit, so at most one shard is held.
    """

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self._written: set[str] = set()
        self._total_bytes = 0
        self._closed = False

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise CheckpointIOError("writer is closed")
        if name in self._written or name in self._buffer:
            raise CheckpointIOError(f"tensor {name!r} was written twice")
        size = self._nbytes(tensor)
        if self._buffer and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        # A private contiguous copy: the caller's tensor may be a view of a larger one.
        self._buffer[name] = tensor.detach().contiguous().clone() if not tensor.is_contiguous() else tensor.detach()
        self._buffer_bytes += size
        self._total_bytes += size

    def _tmp_name(self, i: int) -> str:
        return f"model-{i + 1:05d}.safetensors.partial"

    def _flush(self) -> None:
        if not self._buffer:
            return
        i = len(self._shards)
        save_file(self._buffer, str(self.directory / self._tmp_name(i)), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._written.update(self._buffer)
        self._buffer, self._buffer_bytes = {}, 0

    def close(self, expected: list[str] | None = None) -> dict:
        """Write the last shard and the index; with ``expected``, check that exactly those
        tensors were written. Returns the index."""
        self._flush()
        self._closed = True
        if expected is not None:
            missing = sorted(set(expected) - self._written)
            extra = sorted(self._written - set(expected))
            if missing or extra:
                raise CheckpointIOError(f"written tensors differ from expected: missing {missing}, unexpected {extra}")
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.directory / self._tmp_name(i), self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return index
