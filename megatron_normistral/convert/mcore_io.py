"""Conversion's side of megatron-core checkpoints: model weights without a model, one group
of tensors at a time (:class:`LayerwiseCheckpointWriter`, :func:`read_megatron_tensors`).

These build the same ShardedTensors that a TP=1, PP=1 GPTModel would (:func:`sharded_entries`;
a test pins them to the model's own), so memory is bounded by one group, not the model. What a
checkpoint is (keys, the architecture record ``normistral_model.json``, the loader of weights
into model chunks) is :mod:`megatron_normistral.checkpoint.weights`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pickle
import shutil
from pathlib import Path

import torch

from megatron_normistral.convert.families import ConversionError, get_family
from megatron_normistral.model.architectures import DEFAULT_FAMILY
from megatron_normistral.runtime.parallel import free_port

# ---- without a model: ShardedTensors of one group ----------------------------------------
# Names come from the model family's mapping (convert.families): the checkpoint key of each
# tensor (norms stored under Transformer Engine's names) and the linears with ``_extra_state``.
def checkpoint_key(megatron_name: str, family: str = DEFAULT_FAMILY) -> tuple[str, int | None]:
    """(dist_checkpointing key, global layer index or None) of a TP=1 megatron parameter name."""
    return get_family(family).checkpoint_key(megatron_name)


def _sharded_tensor(key: str, data: torch.Tensor, layer: int | None, num_layers: int):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if layer is None:
        return ShardedTensor.from_rank_offsets(key, data, replica_id=0)
    # Layers are stacked along a leading axis of size num_layers (one chunk per layer).
    return ShardedTensor.from_rank_offsets(key, data, (0, layer, num_layers), replica_id=0, prepend_axis_num=1)


def sharded_entries(tensors: dict[str, torch.Tensor], num_layers: int, family: str = DEFAULT_FAMILY) -> dict:
    """ShardedTensors (+ the layers' extra-state objects) for full TP=1 tensors by megatron name."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_family = get_family(family)
    prefix = model_family.layer_prefix
    entries = {}
    layers = set()
    for name, tensor in tensors.items():
        key, layer = model_family.checkpoint_key(name)
        entries[name] = _sharded_tensor(key, tensor, layer, num_layers)
        if layer is not None:
            layers.add(layer)
    for layer in sorted(layers):
        for linear in model_family.extra_state_modules():
            entries[f"{prefix}{layer}.{linear}._extra_state"] = ShardedObject(
                f"{prefix}{linear}._extra_state", None, (num_layers,), (layer,), replica_id=0
            )
    return entries




@contextlib.contextmanager
def single_process_world():
    """torch.distributed as a world of one (dist_checkpointing.save needs a process group),
    unless one is already up. A free port is picked so that concurrent tools do not collide;
    the environment is restored afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    from megatron_normistral.runtime import parallel

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        parallel.init_distributed()
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class LayerwiseCheckpointWriter:
    """Writes one torch_dist checkpoint in parts, one ``dist_checkpointing.save`` per group
    (embeddings, one layer, head), then merges the parts into one checkpoint that megatron-core
    loads like any other.

    Why: a single ``dist_checkpointing.save`` needs every tensor in memory at once (the whole
    model, in one process). A save cannot hold just a slice of a global tensor in a world of
    one (megatron-core assumes every fragment of a partly-held tensor lives on another rank),
    so each layer is saved as a model of one layer (layer axis of size 1), and the merge moves
    it to its place: layer axis size 1 -> num_layers, chunk offset 0 -> layer index, and the
    extra-state objects' keys ``.../shard_0_1`` -> ``.../shard_<layer>_<num_layers>``. This
    edits the same metadata that megatron-core's own ``remove_sharded_tensors`` edits. The
    merge then checks that every global tensor is covered exactly once.
    """

    def __init__(self, directory: str | os.PathLike, num_layers: int, family: str = DEFAULT_FAMILY):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if any(self.directory.iterdir()):
            raise ConversionError(f"output directory {self.directory} is not empty")
        self.num_layers = num_layers
        self.family = family
        self._layer_prefix = get_family(family).layer_prefix
        self._parts: list[tuple[Path, int | None]] = []

    def write_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Save full (TP=1) tensors by megatron name; all of one layer, or none of a layer."""
        from megatron.core import dist_checkpointing

        layers = {checkpoint_key(name, self.family)[1] for name in tensors}
        if len(layers) != 1:
            raise ConversionError(f"a part must hold one layer or only non-layer tensors, got layers {layers}")
        layer = layers.pop()
        if layer is not None:  # saved as layer 0 of a 1-layer model, moved in finalize()
            prefix = f"{self._layer_prefix}{layer}."
            tensors = {f"{self._layer_prefix}0.{n[len(prefix):]}": t for n, t in tensors.items()}
        part = self.directory / f".part{len(self._parts):05d}"
        part.mkdir()
        dist_checkpointing.save(sharded_entries(tensors, num_layers=1, family=self.family), str(part))
        self._parts.append((part, layer))

    def _relocate(self, key: str, item, layer: int):
        """(key, metadata) of a part's entry, moved from layer 0 of 1 to ``layer`` of num_layers."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, ChunkStorageMetadata, TensorStorageMetadata

        if not key.startswith(self._layer_prefix):
            return key, item
        if isinstance(item, BytesStorageMetadata):
            base, shard = key.rsplit("/", 1)
            assert shard == "shard_0_1", key
            return f"{base}/shard_{layer}_{self.num_layers}", item
        assert item.size[0] == 1, (key, item.size)
        chunks = [ChunkStorageMetadata(torch.Size((layer, *c.offsets[1:])), c.sizes) for c in item.chunks]
        return key, TensorStorageMetadata(item.properties, torch.Size((self.num_layers, *item.size[1:])), chunks)

    def finalize(self) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

        state_md: dict = {}
        storage: dict = {}
        for n, (part, layer) in enumerate(self._parts):
            md = FileSystemReader(str(part)).read_metadata()
            renamed_keys = {}
            for key, item in md.state_dict_metadata.items():
                new_key, item = self._relocate(key, item, layer) if layer is not None else (key, item)
                renamed_keys[key] = new_key
                if new_key not in state_md:
                    state_md[new_key] = item
                elif isinstance(item, BytesStorageMetadata) or isinstance(state_md[new_key], BytesStorageMetadata):
                    raise ConversionError(f"object {new_key!r} was written twice")
                else:
                    have = state_md[new_key]
                    if have.size != item.size or have.properties.dtype != item.properties.dtype:
                        raise ConversionError(f"tensor {new_key!r}: parts disagree on global shape or dtype")
                    have.chunks.extend(item.chunks)
            renamed_files = {}
            for file in sorted({info.relative_path for info in md.storage_data.values()}):
                renamed_files[file] = f"p{n:05d}{file}"
                os.replace(part / file, self.directory / renamed_files[file])
            for index, info in md.storage_data.items():
                offset = index.offset
                if layer is not None and offset is not None and index.fqn.startswith(self._layer_prefix):
                    offset = torch.Size((layer, *offset[1:]))
                new_index = MetadataIndex(renamed_keys.get(index.fqn, index.fqn), offset, index.index)
                storage[new_index] = dataclasses.replace(info, relative_path=renamed_files[info.relative_path])
        for key, item in state_md.items():
            if not isinstance(item, BytesStorageMetadata):
                _check_coverage(key, item)
        with open(self.directory / ".metadata", "wb") as f:
            pickle.dump(Metadata(state_dict_metadata=state_md, planner_data={}, storage_data=storage), f)
        for name in ("metadata.json", "common.pt"):
            shutil.copy2(self._parts[0][0] / name, self.directory / name)
        for part, _ in self._parts:
            shutil.rmtree(part)


def _check_coverage(key: str, item) -> None:
    """Every element of a global tensor is stored exactly once."""
    seen = set()
    total = 0
    for chunk in item.chunks:
        offsets = tuple(chunk.offsets)
        if offsets in seen:
            raise ConversionError(f"tensor {key!r}: chunk at {offsets} written twice")
        seen.add(offsets)
        total += int(torch.Size(chunk.sizes).numel())
    if total != item.size.numel():
        raise ConversionError(f"tensor {key!r}: chunks cover {total} of {item.size.numel()} elements")


def checkpoint_tensor_metadata(directory: str | os.PathLike) -> dict:
    """key -> TensorStorageMetadata (global size, dtype, chunks) of every tensor in a checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(directory)).read_metadata()
    return {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


@functools.cache
def _region_planner_class():
    """A torch.distributed.checkpoint load planner that reads one region (offsets, destination
    tensor) of each requested global tensor, from whatever chunks the checkpoint stored it in.
    Why not megatron-core's load: in a world of one it can read a global tensor only whole
    (all layers at once), which is the memory this streaming avoids.

    Defined once (not per call): a class made per call sits in a reference cycle, and would
    keep its regions' tensors alive until the cyclic garbage collector runs."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class RegionLoadPlanner(DefaultLoadPlanner):
        def __init__(self, regions: dict[str, tuple[torch.Size, torch.Tensor]]):
            super().__init__()
            self.regions = regions

        def create_local_plan(self) -> LoadPlan:
            items = []
            for key, (offsets, dest) in self.regions.items():
                chunk = ChunkStorageMetadata(offsets=offsets, sizes=dest.shape)
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
            return LoadPlan(items)

        def lookup_tensor(self, index):
            return self.regions[index.fqn][1]

    return RegionLoadPlanner


def read_megatron_tensors(directory: str | os.PathLike, shapes: dict[str, tuple[int, ...]], num_layers: int,
                          tensor_metadata: dict | None = None, family: str = DEFAULT_FAMILY) -> dict[str, torch.Tensor]:
    """Full (TP=1) tensors by megatron name, read from a checkpoint saved at any layout; only
    these bytes are read. ``shapes``: the expected shape of each; a mismatch is refused by name.
    Needs no process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    tensor_metadata = tensor_metadata if tensor_metadata is not None else checkpoint_tensor_metadata(directory)
    regions, out = {}, {}
    for name, shape in shapes.items():
        key, layer = checkpoint_key(name, family)
        if key not in tensor_metadata:
            raise ConversionError(f"tensor {name!r} (checkpoint key {key!r}) is missing from {directory}")
        md = tensor_metadata[key]
        global_shape = tuple(shape) if layer is None else (num_layers, *shape)
        if tuple(md.size) != global_shape:
            raise ConversionError(
                f"tensor {name!r} (checkpoint key {key!r}) has global shape {tuple(md.size)} in {directory}, "
                f"but the architecture needs {global_shape}"
            )
        if key in regions:
            raise ConversionError(f"checkpoint key {key!r} requested twice in one read")
        dest = torch.empty(global_shape if layer is None else (1, *shape), dtype=md.properties.dtype)
        offsets = torch.Size((0,) * len(global_shape) if layer is None else (layer,) + (0,) * len(shape))
        regions[key] = (offsets, dest)
        out[name] = dest if layer is None else dest[0]
    try:
        dcp.load({}, storage_reader=dcp.FileSystemReader(str(directory)), planner=_region_planner_class()(regions),
                 no_dist=True)
    except (OSError, EOFError, pickle.UnpicklingError, CheckpointException) as e:
        # check_checkpoint_complete catches missing and short files first; this is damage inside them.
        raise ConversionError(f"{directory}: reading {', '.join(sorted(shapes))} failed "
                              f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}): "
                              "the checkpoint is damaged; use another one") from None
    return out
