"""The two conversions, streaming one group (embeddings / one layer / head) at a time.

Every name comes from the model family (:mod:`.families`): the HF config's ``model_type``
picks it on import, the architecture's ``family`` on export.

HF -> mcore: read a group's HF tensors, fuse them (the family's mapping, e.g. :mod:`.mistral`),
write them as one part of a torch_dist checkpoint (:class:`.mcore_io.LayerwiseCheckpointWriter`),
drop them. mcore -> HF: read a group's full tensors from a checkpoint of any layout, split them,
write their bytes straight into the planned safetensors shards. Peak memory is about one group.

Both report progress on stderr (:class:`ConversionProgress`): a line after a group, at most one
every ``progress_interval`` seconds, with the share of the parameters done and an ETA.

mcore -> HF also writes a model card, ``README.md`` (:mod:`.model_card`), from the checkpoint's
records, the tokenizer's training record and an optional fertility table.

Both write into a hidden sibling of the output folder and rename it into place at the end
(:func:`megatron_normistral.tool_io.staged_folder`), after checking everything they can before
writing: a failed or interrupted conversion leaves no folder that looks like a checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_normistral.checkpoint import weights
from megatron_normistral.convert import mcore_io, model_card
from megatron_normistral.convert.families import (
    ConversionError,
    UnknownFamilyError,
    arch_from_hf_config,
    check_arch_matches,
    check_shape,
    family_for_hf_config,
    family_of,
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
from megatron_normistral.runtime.logs import get_logger, progress
from megatron_normistral.runtime.progress import ProgressMeter
from megatron_normistral.tokenizer.wrappers import TOKENIZER_FILES
from megatron_normistral.tool_io import staged_folder

log = get_logger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DEFAULT_PROGRESS_INTERVAL = 5.0  # seconds between progress lines at most: a small model gets few, not one per layer


@dataclass
class ConversionReport:
    arch: ArchConfig
    tensors_read: int = 0
    tensors_written: int = 0
    skipped: list[str] = field(default_factory=list)


class ConversionProgress:
    """``[convert] layer 12/40 | 31.2% | elapsed 0:01:02 | ETA 0:02:25`` on stderr after a group
    (embedding, a layer, head) is written, at most one line every ``interval`` seconds; the
    last group's line always comes. Nothing when not ``verbose``.

    The percentage counts parameters, not groups: groups differ in size (a 131k-row embedding
    holds as many parameters as two or three 12B layers), and the time a group takes (read,
    convert, write) grows with its bytes, so the ETA stays even across them."""

    def __init__(self, direction: str, arch: ArchConfig, verbose: bool, interval: float = DEFAULT_PROGRESS_INTERVAL):
        groups = list(family_of(arch).groups(arch))
        self.arch, self.verbose, self.groups = arch, verbose, len(groups)
        total = sum(self._parameters(group) for group in groups)
        self.meter = ProgressMeter(total, interval)
        self.done = self.groups_done = 0
        count = f"{total / 1e9:,.2f}B" if total >= 1e9 else f"{total / 1e6:,.2f}M"
        progress(log, verbose, f"[convert] {direction}: {self.groups} groups (embedding, {arch.num_layers} layers, "
                               f"head), {count} parameters")

    def _parameters(self, group) -> int:
        return sum(math.prod(megatron_shape(self.arch, m)) for m in group.mappings)

    def group_done(self, group) -> None:
        self.done += self._parameters(group)
        self.groups_done += 1
        if not self.verbose or not self.meter.due(force=self.groups_done == self.groups):
            return
        what = group.name if group.layer is None else f"layer {group.layer + 1}/{self.arch.num_layers}"
        progress(log, self.verbose, f"[convert] {what} | {self.meter.text(self.done)}")


def check_output_free(out_dir: str | os.PathLike) -> Path:
    """The output folder does not exist or is empty (a conversion never mixes with old files)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConversionError(f"output {out_dir} exists and is not an empty folder: remove it or choose another --out")
    return out_dir


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def hf_to_mcore(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
                vpp: int | None = None, arch_name: str | None = None, dtype: str | None = "fp32",
                verbose: bool = True, progress_interval: float = DEFAULT_PROGRESS_INTERVAL) -> ConversionReport:
    """HF folder (of a registered model family) -> torch_dist checkpoint + ``normistral_model.json``.

    The checkpoint stores global tensors, so it loads at any layout; ``tp/pp/vpp`` are checked
    against the architecture now (rather than when training starts) and recorded.
    ``dtype`` None keeps the HF dtype; the default fp32 is what fp32 and mixed-precision
    (fp32 main weights) training hold, and bf16/fp16 -> fp32 is exact.
    ``verbose``: progress lines on stderr (:class:`ConversionProgress`).
    """
    from megatron_normistral.model.provider import validate_layout
    from megatron_normistral.runtime.parallel import ParallelConfig

    check_output_free(out_dir)
    reader = HFCheckpointReader(hf_dir)
    config, config_path = reader.config(), Path(hf_dir) / "config.json"
    try:
        family_name = family_for_hf_config(config).name
    except UnknownFamilyError as e:
        raise ConversionError(f"{config_path}: {e}") from None
    try:
        arch = arch_from_hf_config(config, name=arch_name or "hf")
    except (ConversionError, KeyError, TypeError) as e:
        what = f"has no {e}" if isinstance(e, KeyError) else str(e)
        raise ConversionError(f"{config_path}: {what}: not a {family_name} config this converter maps") from None
    if arch_name is not None:
        named = get_architecture(arch_name)
        check_arch_matches(named, arch, f"the HF config in {hf_dir}")
        arch = named
    family = family_of(arch)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    try:
        parallel.validate()
        validate_layout(arch, parallel)
    except ValueError as e:
        raise ConversionError(f"layout tp={tp} pp={pp} vpp={vpp} does not fit the model in {hf_dir}: {e}") from None
    target = _parse_dtype(dtype)

    # Check names and shapes before writing anything (headers only; no tensor data is read).
    expected = set(family.hf_names(arch))
    present = set(reader.names())
    skipped = sorted(n for n in present - expected if n.endswith(family.ignored_hf_suffixes))
    missing, unexpected = sorted(expected - present), sorted(present - expected - set(skipped))
    if missing or unexpected:
        raise ConversionError(f"HF checkpoint {hf_dir} does not match architecture {arch.name!r}: "
                              f"missing tensors {missing[:8]}, unexpected tensors {unexpected[:8]}")
    for name in skipped:
        reader.skip(name)
    for group in family.groups(arch):
        for mapping in group.mappings:
            for name, shape_fn in zip(mapping.hf_names(group.layer), mapping.hf_shapes):
                check_shape(name, reader.shape(name), shape_fn(arch), arch, f"HF checkpoint {hf_dir}")

    report = ConversionReport(arch=arch, skipped=skipped)
    with staged_folder(out_dir) as staging, mcore_io.single_process_world():
        writer = mcore_io.LayerwiseCheckpointWriter(staging, arch.num_layers, family=family.name)
        shown = ConversionProgress("hf-to-mcore", arch, verbose, progress_interval)
        for group in family.groups(arch):
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
            shown.group_done(group)
        left = reader.unconsumed()
        if left:
            raise ConversionError(f"HF tensors not converted: {left}")
        writer.finalize()
        out_dtype = _DTYPE_NAMES.get(target) if target is not None else "source"
        weights.write_model_metadata(staging, arch, dtype=out_dtype, converted_from=str(hf_dir),
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


def _tokenizer_special_ids(out_dir: Path, vocab_size: int) -> tuple[dict[str, int | None], int]:
    """(bos/eos/pad ids, number of entries) of the tokenizer copied into ``out_dir``."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    if len(tok) > vocab_size:
        raise ConversionError(f"tokenizer has {len(tok)} tokens, more than the model's vocabulary ({vocab_size})")
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}, len(tok)


def mcore_to_hf(mcore_dir: str | os.PathLike, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                dtype: str = "bf16", arch_name: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                special_ids: dict[str, int | None] | None = None, fertility: str | os.PathLike | None = None,
                base_model: str | None = None, write_model_card: bool = True, verbose: bool = True,
                progress_interval: float = DEFAULT_PROGRESS_INTERVAL) -> ConversionReport:
    """torch_dist checkpoint (any layout; may also hold optimizer state) -> HF folder of its model family.

    The architecture comes from ``normistral_model.json`` in the checkpoint, or ``arch_name``.
    Special token ids: ``special_ids`` overrides, else the tokenizer's, else Mistral's (1, 2).
    ``write_model_card``: also write ``README.md`` (:mod:`.model_card`), with the fertility table
    of ``fertility`` (a ``tools/fertility.py --markdown`` file) and ``base_model`` as given.
    ``verbose``: progress lines on stderr (:class:`ConversionProgress`).
    """
    mcore_dir, out_dir = Path(mcore_dir), check_output_free(out_dir)
    weights.check_checkpoint_complete(mcore_dir)
    if arch_name is not None:
        arch = get_architecture(arch_name)
        if (mcore_dir / weights.MODEL_JSON).exists():
            check_arch_matches(arch, weights.read_model_metadata(mcore_dir)[0], f"the checkpoint {mcore_dir}")
    else:
        if not (mcore_dir / weights.MODEL_JSON).exists():
            raise ConversionError(f"{mcore_dir / weights.MODEL_JSON} not found: not a checkpoint written by "
                                  "megatron_normistral (pass --arch)")
        arch, _ = weights.read_model_metadata(mcore_dir)
    target = _parse_dtype(dtype)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise ConversionError(f"--tokenizer {tokenizer_dir}: no such folder (give a Hugging Face tokenizer folder)")
    if write_model_card and fertility is not None:
        model_card.read_fertility(fertility)  # a wrong file fails now, not after the conversion

    family = family_of(arch)
    tensor_md = mcore_io.checkpoint_tensor_metadata(mcore_dir)
    # Other keys of a training checkpoint (optimizer state, RNG, ...) are not ours to convert.
    wanted_keys = {family.checkpoint_key(n)[0] for n in family.megatron_names(arch)}
    stray = sorted(k for k in tensor_md if k.startswith(family.model_key_prefixes()) and k not in wanted_keys)
    if stray:
        raise ConversionError(f"checkpoint {mcore_dir} has model tensors that architecture {arch.name!r} "
                              f"does not map to HF: {stray}")

    report = ConversionReport(arch=arch)
    plan = [PlannedTensor(name, shape_fn(arch), target)
            for group in family.groups(arch) for m in group.mappings
            for name, shape_fn in zip(m.hf_names(group.layer), m.hf_shapes)]
    with staged_folder(out_dir) as staging:
        writer = ShardedSafetensorsWriter(staging, plan, max_shard_bytes=max_shard_bytes)
        shown = ConversionProgress("mcore-to-hf", arch, verbose, progress_interval)
        for group in family.groups(arch):
            shapes = {m.megatron_name(group.layer): megatron_shape(arch, m) for m in group.mappings}
            tensors = mcore_io.read_megatron_tensors(mcore_dir, shapes, arch.num_layers, tensor_md, family=family.name)
            report.tensors_read += len(tensors)
            for mapping in group.mappings:
                name = mapping.megatron_name(group.layer)
                for hf_name, t in megatron_to_hf(arch, mapping, group.layer, tensors.pop(name),
                                                 where=f"checkpoint {mcore_dir}").items():
                    writer.add(hf_name, t.to(target))
                    report.tensors_written += 1
            if tensors:
                raise ConversionError(f"megatron tensors read but not converted: {sorted(tensors)}")
            shown.group_done(group)
        writer.close()

        ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}
        tokenizer_entries = None
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), staging)
            tokenizer_ids, tokenizer_entries = _tokenizer_special_ids(staging, arch.vocab_size)
            ids.update(tokenizer_ids)
        ids.update(special_ids or {})
        config = family.hf_config_from_arch(arch, dtype=_DTYPE_NAMES[target], **ids)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        generation = {k: v for k, v in ids.items() if v is not None}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if write_model_card:
            model_json = (weights.read_model_metadata(mcore_dir)[1] if (mcore_dir / weights.MODEL_JSON).exists()
                          else {"arch": dataclasses.asdict(arch)})
            card = model_card.gather(mcore_dir, staging, config, model_json,
                                     Path(tokenizer_dir) if tokenizer_dir is not None else None, tokenizer_entries,
                                     fertility, base_model, name=out_dir.name)
            model_card.write(staging, card)
    return report
