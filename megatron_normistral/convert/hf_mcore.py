"""The two conversions, streaming one group (embeddings / one layer / head) at a time.

HF -> mcore: read a group's HF tensors, fuse them (:mod:`.mistral`), write them as one part
of a torch_dist checkpoint (:class:`.mcore_io.LayerwiseCheckpointWriter`), drop them.
mcore -> HF: read a group's full tensors from a checkpoint of any layout, split them, write
their bytes straight into the planned safetensors shards. Peak memory is about one group.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_normistral.convert import mcore_io
from megatron_normistral.convert.mistral import (
    IGNORED_HF_SUFFIXES,
    ConversionError,
    all_hf_names,
    all_megatron_names,
    arch_from_hf_config,
    check_arch_matches,
    check_shape,
    groups,
    hf_config_from_arch,
    hf_to_megatron,
    megatron_shape,
    megatron_to_hf,
)
from megatron_normistral.convert.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    HFCheckpointReader,
    PlannedTensor,
    ShardedSafetensorsWriter,
)
from megatron_normistral.model.architectures import ArchConfig, get_architecture

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# Files of a Hugging Face tokenizer folder copied on export (SentencePiece, fast tokenizers,
# Mistral's tekken.json, chat templates).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "tekken.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
# dist_checkpointing keys of model weights start with these; other keys of a training
# checkpoint (optimizer state, RNG, ...) are not ours to convert.
_MODEL_KEY_PREFIXES = ("embedding.", "decoder.", "output_layer.")


@dataclass
class ConversionReport:
    arch: ArchConfig
    tensors_read: int = 0
    tensors_written: int = 0
    skipped: list[str] = field(default_factory=list)


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
                vpp: int | None = None, arch_name: str | None = None, dtype: str | None = "fp32") -> ConversionReport:
    """HF Mistral folder -> torch_dist checkpoint + ``normistral_model.json``.

    The checkpoint stores global tensors, so it loads at any layout; ``tp/pp/vpp`` are checked
    against the architecture now (rather than when training starts) and recorded.
    ``dtype`` None keeps the HF dtype; the default fp32 is what fp32 and mixed-precision
    (fp32 main weights) training hold, and bf16/fp16 -> fp32 is exact.
    """
    from megatron_normistral.model.provider import validate_layout
    from megatron_normistral.runtime.parallel import ParallelConfig

    reader = HFCheckpointReader(hf_dir)
    arch = arch_from_hf_config(reader.config(), name=arch_name or "hf")
    if arch_name is not None:
        named = get_architecture(arch_name)
        check_arch_matches(named, arch, f"the HF config in {hf_dir}")
        arch = named
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    parallel.validate()
    validate_layout(arch, parallel)
    target = _parse_dtype(dtype)

    # Check names and shapes before writing anything (headers only; no tensor data is read).
    expected = set(all_hf_names(arch))
    present = set(reader.names())
    skipped = sorted(n for n in present - expected if n.endswith(IGNORED_HF_SUFFIXES))
    missing, unexpected = sorted(expected - present), sorted(present - expected - set(skipped))
    if missing or unexpected:
        raise ConversionError(f"HF checkpoint {hf_dir} does not match architecture {arch.name!r}: "
                              f"missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    for name in skipped:
        reader.skip(name)
    for group in groups(arch):
        for mapping in group.mappings:
            for name, shape_fn in zip(mapping.hf_names(group.layer), mapping.hf_shapes):
                check_shape(name, reader.shape(name), shape_fn(arch), arch, f"HF checkpoint {hf_dir}")

    report = ConversionReport(arch=arch, skipped=skipped)
    with mcore_io.single_process_world():
        writer = mcore_io.LayerwiseCheckpointWriter(out_dir, arch.num_layers)
        for group in groups(arch):
            tensors = {}
            for mapping in group.mappings:
                hf = tuple(reader.read(n) for n in mapping.hf_names(group.layer))
                report.tensors_read += len(hf)
                fused = hf_to_megatron(arch, mapping, group.layer, hf, where=f"HF checkpoint {hf_dir}")
                tensors[mapping.megatron_name(group.layer)] = fused.to(target) if target is not None else fused
                del hf, fused
            writer.write_group(tensors)
            report.tensors_written += len(tensors)
            del tensors
        left = reader.unconsumed()
        if left:
            raise ConversionError(f"HF tensors not converted: {left}")
        writer.finalize()
    out_dtype = _DTYPE_NAMES.get(target) if target is not None else "source"
    mcore_io.write_model_metadata(out_dir, arch, dtype=out_dtype, converted_from=str(hf_dir),
                                  layout={"tp": tp, "pp": pp, "vpp": vpp})
    return report


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
            copied.append(name)
    if not copied:
        raise ConversionError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")
    return copied


def _tokenizer_special_ids(out_dir: Path, vocab_size: int) -> dict[str, int | None]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    if len(tok) > vocab_size:
        raise ConversionError(f"tokenizer has {len(tok)} tokens, more than the model's vocabulary ({vocab_size})")
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def mcore_to_hf(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                dtype: str = "bf16", arch_name: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                special_ids: dict[str, int | None] | None = None) -> ConversionReport:
    """torch_dist checkpoint (any layout; may also hold optimizer state) -> HF Mistral folder.

    The architecture comes from ``normistral_model.json`` in the checkpoint, or ``arch_name``.
    Special token ids: ``special_ids`` overrides, else the tokenizer's, else Mistral's (1, 2).
    """
    mcore_dir, out_dir = Path(mcore_dir), Path(out_dir)
    if arch_name is not None:
        arch = get_architecture(arch_name)
        if (mcore_dir / mcore_io.MODEL_JSON).exists():
            check_arch_matches(arch, mcore_io.read_model_metadata(mcore_dir)[0], f"the checkpoint {mcore_dir}")
    else:
        arch, _ = mcore_io.read_model_metadata(mcore_dir)
    target = _parse_dtype(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)

    tensor_md = mcore_io.checkpoint_tensor_metadata(mcore_dir)
    wanted_keys = {mcore_io.checkpoint_key(n)[0] for n in all_megatron_names(arch)}
    stray = sorted(k for k in tensor_md if k.startswith(_MODEL_KEY_PREFIXES) and k not in wanted_keys)
    if stray:
        raise ConversionError(f"checkpoint {mcore_dir} has model tensors that architecture {arch.name!r} "
                              f"does not map to HF: {stray}")

    report = ConversionReport(arch=arch)
    plan = [PlannedTensor(name, shape_fn(arch), target)
            for group in groups(arch) for m in group.mappings
            for name, shape_fn in zip(m.hf_names(group.layer), m.hf_shapes)]
    writer = ShardedSafetensorsWriter(out_dir, plan, max_shard_bytes=max_shard_bytes)
    for group in groups(arch):
        shapes = {m.megatron_name(group.layer): megatron_shape(arch, m) for m in group.mappings}
        tensors = mcore_io.read_megatron_tensors(mcore_dir, shapes, arch.num_layers, tensor_md)
        report.tensors_read += len(tensors)
        for mapping in group.mappings:
            name = mapping.megatron_name(group.layer)
            for hf_name, t in megatron_to_hf(arch, mapping, group.layer, tensors.pop(name),
                                             where=f"checkpoint {mcore_dir}").items():
                writer.add(hf_name, t.to(target))
                report.tensors_written += 1
        if tensors:
            raise ConversionError(f"megatron tensors read but not converted: {sorted(tensors)}")
    writer.close()

    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), out_dir)
        ids.update(_tokenizer_special_ids(out_dir, arch.vocab_size))
    ids.update(special_ids or {})
    config = hf_config_from_arch(arch, dtype=_DTYPE_NAMES[target], **ids)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: v for k, v in ids.items() if v is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return report
