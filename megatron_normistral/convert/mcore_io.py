"""megatron-core distributed checkpoints (dist_checkpointing, torch_dist format) of model weights.

Two ways in and out:

- From model chunks (training, tests): :func:`save_model_checkpoint` / :func:`load_model_checkpoint`.
  The state dict is ``{"model": chunk.sharded_state_dict()}`` for one chunk and
  ``{"model0": ..., "model1": ...}`` per virtual stage; dist_checkpointing stores tensors by
  their global (TP=1, PP=1) coordinates, so a checkpoint saved at any TP/PP/VPP layout loads at
  any other. Loading reads only the model's keys, so it works on training checkpoints that
  also hold optimizer state.
- Without a model, one group of tensors at a time (conversion): :class:`LayerwiseCheckpointWriter`
  and :func:`read_megatron_tensors`. These build the same ShardedTensors that a TP=1, PP=1
  GPTModel would (:func:`sharded_entries`; a test pins them to the model's own), so memory is
  bounded by one group, not the model.

Beside the weights, ``normistral_model.json`` records the architecture, so that tools can
rebuild the model without being told which one it is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Iterable

import torch

from megatron_normistral.convert.mistral import ConversionError
from megatron_normistral.model.architectures import ArchConfig
from megatron_normistral.model.sharding import unwrap_model
from megatron_normistral.runtime.parallel import free_port

MODEL_JSON = "normistral_model.json"
MODEL_JSON_FORMAT = 1


# ---- architecture description beside the weights ----------------------------------------
def write_model_metadata(directory: str | os.PathLike, arch: ArchConfig, **extra) -> Path:
    """Write ``normistral_model.json`` (architecture + free-form extras such as the dtype)."""
    path = Path(directory) / MODEL_JSON
    payload = {"format": MODEL_JSON_FORMAT, "arch": dataclasses.asdict(arch), **extra}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_model_metadata(directory: str | os.PathLike) -> tuple[ArchConfig, dict]:
    """(architecture, whole JSON) of a checkpoint written by this module."""
    path = Path(directory) / MODEL_JSON
    if not path.exists():
        raise ConversionError(f"{path} not found: not a checkpoint written by megatron_normistral (pass --arch)")
    payload = json.loads(path.read_text())
    if payload.get("format") != MODEL_JSON_FORMAT:
        raise ConversionError(f"{path}: unknown format {payload.get('format')!r}")
    return ArchConfig(**payload["arch"]), payload


def _arch_of(model_config) -> ArchConfig:
    if isinstance(model_config, ArchConfig):
        return model_config
    return model_config.architecture()  # provider.ModelConfig


def model_config_from_checkpoint(directory: str | os.PathLike, **model_config_fields):
    """A ``provider.ModelConfig`` that builds the architecture recorded in the checkpoint,
    also when it is not one of the named architectures (e.g. converted from an HF config).

    ``provider.ModelConfig`` resolves ``arch`` by name only, so this subclass returns the
    stored ArchConfig instead (honouring the ``vocab_size``/``num_layers`` overrides)."""
    from megatron_normistral.model.provider import ModelConfig

    stored, _ = read_model_metadata(directory)

    @dataclasses.dataclass
    class CheckpointModelConfig(ModelConfig):
        def architecture(self) -> ArchConfig:
            overrides = {k: v for k, v in (("vocab_size", self.vocab_size), ("num_layers", self.num_layers)) if v is not None}
            return dataclasses.replace(stored, **overrides) if overrides else stored

    return CheckpointModelConfig(arch=stored.name, **model_config_fields)


# ---- from model chunks -------------------------------------------------------------------


def model_sharded_state_dict(chunks: Iterable[torch.nn.Module]) -> dict:
    """The model part of a dist_checkpointing state dict, keyed as training checkpoints key it."""
    chunks = [unwrap_model(c) for c in chunks]
    return {key: chunk.sharded_state_dict() for key, chunk in zip(model_state_keys(len(chunks)), chunks)}


def model_state_keys(num_chunks: int) -> list[str]:
    """Top-level keys of the model part: 'model', or 'model0', 'model1', ... per virtual stage."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def save_model_checkpoint(chunks, directory: str | os.PathLike, model_config, **metadata_extra) -> None:
    """Save the weights of this process's chunks (collective: every rank calls it).

    ``model_config``: a ``provider.ModelConfig`` (or an ``ArchConfig``), recorded in
    ``normistral_model.json``. Callers' scripts need an ``if __name__ == "__main__":`` guard:
    dist_checkpointing's writer starts a spawn multiprocessing manager.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))
    if rank == 0:
        dtype = next(unwrap_model(next(iter(chunks))).parameters()).dtype
        write_model_metadata(directory, _arch_of(model_config), dtype=str(dtype).removeprefix("torch."), **metadata_extra)
    if dist.is_initialized():
        dist.barrier()


def load_model_checkpoint(chunks, directory: str | os.PathLike) -> None:
    """Load weights into this process's chunks, whatever layout the checkpoint was saved at.

    Only the model's keys are read (a training checkpoint's optimizer state is ignored).
    Every model tensor must be present with its global shape (megatron-core names the tensor
    otherwise). Collective: every rank calls it.
    """
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if (directory / MODEL_JSON).exists():
        arch, _ = read_model_metadata(directory)
        _check_chunks_match(chunks, arch)
    state = dist_checkpointing.load(model_sharded_state_dict(chunks), str(directory))
    chunks = [unwrap_model(c) for c in chunks]
    keys = model_state_keys(len(chunks))
    for chunk, key in zip(chunks, keys):
        chunk.load_state_dict(state[key], strict=True)


def _check_chunks_match(chunks, arch: ArchConfig) -> None:
    cfg = unwrap_model(next(iter(chunks))).config
    vocab = unwrap_model(next(iter(chunks))).vocab_size
    ours = dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                num_query_groups=cfg.num_query_groups, head_dim=cfg.kv_channels, ffn_hidden_size=cfg.ffn_hidden_size,
                vocab_size=vocab)
    diffs = [f"{k}: model {v} vs checkpoint {getattr(arch, k)}" for k, v in ours.items() if v != getattr(arch, k)]
    if diffs:
        raise ConversionError(f"model does not match the checkpoint's architecture {arch.name!r}: " + "; ".join(diffs))


# ---- without a model: ShardedTensors of one group ----------------------------------------
_LAYER_PREFIX = "decoder.layers."
# The local layer spec stores the two norms under Transformer Engine's names (the norm is
# fused into the following linear there), so checkpoints are interchangeable between the two.
_NORM_KEYS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
# megatron-core's linear layers save an (empty) ``_extra_state`` object per layer; loading a
# model asks for them, so checkpoints written without a model must contain them too.
_LINEARS_WITH_EXTRA_STATE = (
    "self_attention.linear_proj",
    "self_attention.linear_qkv",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


def checkpoint_key(megatron_name: str) -> tuple[str, int | None]:
    """(dist_checkpointing key, global layer index or None) of a TP=1 megatron parameter name."""
    if not megatron_name.startswith(_LAYER_PREFIX):
        return megatron_name, None
    layer, rest = megatron_name[len(_LAYER_PREFIX):].split(".", 1)
    return _LAYER_PREFIX + _NORM_KEYS.get(rest, rest), int(layer)


def _sharded_tensor(key: str, data: torch.Tensor, layer: int | None, num_layers: int):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    if layer is None:
        return ShardedTensor.from_rank_offsets(key, data, replica_id=0)
    # Layers are stacked along a leading axis of size num_layers (one chunk per layer).
    return ShardedTensor.from_rank_offsets(key, data, (0, layer, num_layers), replica_id=0, prepend_axis_num=1)


def sharded_entries(tensors: dict[str, torch.Tensor], num_layers: int) -> dict:
    """ShardedTensors (+ the layers' extra-state objects) for full TP=1 tensors by megatron name."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    entries = {}
    layers = set()
    for name, tensor in tensors.items():
        key, layer = checkpoint_key(name)
        entries[name] = _sharded_tensor(key, tensor, layer, num_layers)
        if layer is not None:
            layers.add(layer)
    for layer in sorted(layers):
        for linear in _LINEARS_WITH_EXTRA_STATE:
            entries[f"{_LAYER_PREFIX}{layer}.{linear}._extra_state"] = ShardedObject(
                f"{_LAYER_PREFIX}{linear}._extra_state", None, (num_layers,), (layer,), replica_id=0
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

    def __init__(self, directory: str | os.PathLike, num_layers: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if any(self.directory.iterdir()):
            raise ConversionError(f"output directory {self.directory} is not empty")
        self.num_layers = num_layers
        self._parts: list[tuple[Path, int | None]] = []

    def write_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Save full (TP=1) tensors by megatron name; all of one layer, or none of a layer."""
        from megatron.core import dist_checkpointing

        layers = {checkpoint_key(name)[1] for name in tensors}
        if len(layers) != 1:
            raise ConversionError(f"a part must hold one layer or only non-layer tensors, got layers {layers}")
        layer = layers.pop()
        if layer is not None:  # saved as layer 0 of a 1-layer model, moved in finalize()
            prefix = f"{_LAYER_PREFIX}{layer}."
            tensors = {f"{_LAYER_PREFIX}0.{n[len(prefix):]}": t for n, t in tensors.items()}
        part = self.directory / f".part{len(self._parts):05d}"
        part.mkdir()
        dist_checkpointing.save(sharded_entries(tensors, num_layers=1), str(part))
        self._parts.append((part, layer))

    def _relocate(self, key: str, item, layer: int):
        """(key, metadata) of a part's entry, moved from layer 0 of 1 to ``layer`` of num_layers."""
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata, ChunkStorageMetadata, TensorStorageMetadata

        if not key.startswith(_LAYER_PREFIX):
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
                if layer is not None and offset is not None and index.fqn.startswith(_LAYER_PREFIX):
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
                          tensor_metadata: dict | None = None) -> dict[str, torch.Tensor]:
    """Full (TP=1) tensors by megatron name, read from a checkpoint saved at any layout; only
    these bytes are read. ``shapes``: the expected shape of each; a mismatch is refused by name.
    Needs no process group."""
    import torch.distributed.checkpoint as dcp

    tensor_metadata = tensor_metadata if tensor_metadata is not None else checkpoint_tensor_metadata(directory)
    regions, out = {}, {}
    for name, shape in shapes.items():
        key, layer = checkpoint_key(name)
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
    dcp.load({}, storage_reader=dcp.FileSystemReader(str(directory)), planner=_region_planner_class()(regions), no_dist=True)
    return out
