"""Streaming I/O of Hugging Face safetensors checkpoints.

Reading opens tensors one at a time (``safe_open`` reads only the requested tensor's bytes),
so a converter holds only what it is converting. Writing buffers nothing: the output tensors
are known up front (from the architecture), so shard headers are written first and each
tensor's bytes as it arrives. Both sides count every tensor, so a conversion can prove that
each was consumed / written exactly once.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # HF's "5GB" shard limit (decimal, as transformers uses)


class CheckpointIOError(ValueError):
    """A checkpoint file is missing, unreadable or damaged; the message names the file."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def open_safetensors(path: Path):
    """``safe_open`` that names the file when it is missing or damaged (safetensors' own
    errors do not: "incomplete metadata, file not fully covered" is a truncated file)."""
    try:
        handle = safe_open(path, framework="pt")
    except FileNotFoundError:
        raise CheckpointIOError(f"{path}: not found (the folder or its index names it): download it again") from None
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError: any unreadable file
        raise CheckpointIOError(f"{path}: not a readable safetensors file ({_first_line(e)}): "
                                "truncated or damaged? download it again") from None
    with handle as f:
        yield f


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``; errors name the file."""
    if not path.is_file():
        raise CheckpointIOError(f"{path} not found: {what}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointIOError(f"{path}: not valid JSON ({_first_line(e)}): truncated or damaged?") from None
    if not isinstance(data, dict):
        raise CheckpointIOError(f"{path}: a JSON {type(data).__name__}, not an object")
    return data


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data section) of a safetensors file, reading only the header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointIOError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise CheckpointIOError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointIOError(f"{path}: unreadable safetensors header ({e})") from None
    return header, 8 + n


def encode_header(header: dict) -> bytes:
    """What precedes a safetensors file's data: the JSON header's length (8 bytes, little
    endian) and the header, padded with spaces so that the data starts 8-byte aligned."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's data as safetensors stores it (row-major, native little-endian bytes)."""
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class HFCheckpointReader:
    """Tensors of an HF folder: ``model.safetensors`` or shards listed by the index."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointIOError(f"{self.directory}: no such folder (give a Hugging Face model folder)")
        index = self.directory / INDEX_NAME
        if index.exists():
            weight_map = read_json(index, "").get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointIOError(f"{index}: no 'weight_map' object: not a safetensors index")
        elif (self.directory / SINGLE_NAME).exists():
            with open_safetensors(self.directory / SINGLE_NAME) as f:
                weight_map = {name: SINGLE_NAME for name in f.keys()}
        elif (self.directory / ".metadata").exists():
            raise CheckpointIOError(f"{self.directory} is a megatron-core checkpoint, not a Hugging Face folder "
                                    "(mcore-to-hf converts it)")
        else:
            raise CheckpointIOError(f"{self.directory}: neither {INDEX_NAME} nor {SINGLE_NAME} found: "
                                    "not a Hugging Face safetensors model folder")
        self._file_of: dict[str, str] = dict(weight_map)
        self._consumed: set[str] = set()

    def config(self) -> dict:
        return read_json(self.directory / "config.json", "a Hugging Face model folder has one")

    def names(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, name: str) -> str:
        """The weight file (relative to the folder) that holds ``name``."""
        return self._file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the file header (no tensor data is read)."""
        with open_safetensors(self.directory / self._file_of[name]) as f, self._reading(name):
            return tuple(f.get_slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read from disk now. Reading a tensor twice is a conversion bug."""
        if name not in self._file_of:
            raise CheckpointIOError(f"tensor {name!r} is missing from the HF checkpoint {self.directory}")
        if name in self._consumed:
            raise CheckpointIOError(f"tensor {name!r} was read twice")
        with open_safetensors(self.directory / self._file_of[name]) as f, self._reading(name):
            tensor = f.get_tensor(name)
        self._consumed.add(name)
        return tensor

    @contextlib.contextmanager
    def _reading(self, name: str):
        try:
            yield
        except Exception as e:  # noqa: BLE001 - SafetensorError: e.g. the index names a tensor its file lacks
            path = self.directory / self._file_of[name]
            raise CheckpointIOError(f"{path}: cannot read tensor {name!r} ({_first_line(e)})") from None

    def skip(self, name: str) -> None:
        """Mark a tensor as deliberately not converted."""
        self._consumed.add(name)

    def unconsumed(self) -> list[str]:
        return sorted(set(self._file_of) - self._consumed)


_SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


class ShardedSafetensorsWriter:
    """Writes ``model-0000i-of-0000N.safetensors`` shards of at most ``max_shard_bytes`` (a
    tensor larger than that gets a shard of its own) plus ``model.safetensors.index.json``.

    Nothing is buffered: the tensors to write (names, shapes, dtypes, order) are planned up
    front, so every shard's safetensors header can be written before its data, and each
    tensor's bytes go to disk as soon as it is added. Tensors must be added in plan order;
    anything else (an unplanned, repeated or mis-shaped tensor, or a missing one at close)
    is refused by name.
    """

    def __init__(self, directory: str | os.PathLike, plan: list[PlannedTensor],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        names = [p.name for p in plan]
        if len(set(names)) != len(names):
            raise CheckpointIOError("the plan names a tensor twice")
        self._plan = list(plan)
        # Assign shards in order: a new shard starts when the next tensor would not fit.
        self._shards: list[list[PlannedTensor]] = []
        size = 0
        for p in self._plan:
            if not self._shards or (size + p.nbytes > max_shard_bytes and self._shards[-1]):
                self._shards.append([])
                size = 0
            self._shards[-1].append(p)
            size += p.nbytes
        n = len(self._shards)
        self._file_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._next = 0  # index into the plan
        self._shard_of = [i for i, shard in enumerate(self._shards) for _ in shard]
        self._file = None

    def _open_shard(self, i: int) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for p in self._shards[i]:
            header[p.name] = {"dtype": _SAFETENSORS_DTYPES[p.dtype], "shape": list(p.shape),
                              "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        self._file = open(self.directory / (self._file_names[i] + ".partial"), "wb")
        self._file.write(encode_header(header))

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._plan):
            raise CheckpointIOError(f"tensor {name!r} is not planned (or was written twice)")
        planned = self._plan[self._next]
        if name != planned.name:
            done = {p.name for p in self._plan[: self._next]}
            what = "was written twice" if name in done else f"comes out of order (expected {planned.name!r})"
            raise CheckpointIOError(f"tensor {name!r} {what}")
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise CheckpointIOError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                                    f"planned {planned.shape} {planned.dtype}")
        shard = self._shard_of[self._next]
        if self._file is None:
            self._open_shard(shard)
        if tensor.numel():
            self._file.write(tensor_bytes(tensor))
        self._next += 1
        if self._next == len(self._plan) or self._shard_of[self._next] != shard:
            self._file.close()
            self._file = None
            os.replace(self.directory / (self._file_names[shard] + ".partial"), self.directory / self._file_names[shard])

    def close(self) -> dict:
        """Check that every planned tensor was written; write and return the index."""
        if self._next != len(self._plan):
            missing = [p.name for p in self._plan[self._next:]]
            raise CheckpointIOError(f"tensors not written: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        weight_map = {p.name: self._file_names[i] for i, shard in enumerate(self._shards) for p in shard}
        index = {"metadata": {"total_size": sum(p.nbytes for p in self._plan)}, "weight_map": weight_map}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return index
