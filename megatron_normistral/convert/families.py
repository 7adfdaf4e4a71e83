"""Model families: the one owner of parameter names.

A :class:`ModelFamily` is a family of Hugging Face models (today Mistral, :mod:`.mistral`),
registered once, by name, with the HF ``model_type``\\ s it reads. It owns the declarative
mapping between HF tensors and megatron-core tensors, each entry saying what the tensor is
(its :data:`Role`), and every other name is derived from that mapping:

- the tensors with one row per vocabulary entry (:meth:`ModelFamily.vocab_mappings`): stage 2
  trains only them (``training.stages``) and the embedding transfer rewrites them
  (``tokenizer.transfer``);
- the dist_checkpointing key of each tensor and the linears that save an ``_extra_state``
  (:meth:`~ModelFamily.checkpoint_key`, :meth:`~ModelFamily.extra_state_modules`, used by
  :mod:`.mcore_io`), and which checkpoint keys are model weights
  (:meth:`~ModelFamily.model_key_prefixes`, used by the export in :mod:`.hf_mcore`);
- which family reads an HF ``config.json`` (:func:`arch_from_hf_config`, by ``model_type``)
  and writes one (:func:`hf_config_from_arch`, by ``ArchConfig.family``).

An architecture names its family in ``ArchConfig.family``, so ``normistral_model.json``
records it; a checkpoint written before that field existed is Mistral's (the default).

Adding a family: write a module like :mod:`.mistral` (the mapping tables and the two config
translations), pass its ``ModelFamily`` to :func:`register_family` when the module is
imported, and import the module from ``convert/__init__.py`` so that it is registered
whenever ``megatron_normistral.convert`` is. Why here and not in ``model/``: what a family
holds is Hugging Face knowledge (names, ``config.json``), which ``model/`` does not have, and
the Mistral family registers itself from ``convert/``; ``model/`` stays plain arithmetic and
megatron-core specs.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable, Iterator, Literal, get_args

import torch

from megatron_normistral.model.architectures import DEFAULT_FAMILY, ArchConfig


class ConversionError(ValueError):
    """A checkpoint does not match the architecture; the message names the tensor."""


class UnknownFamilyError(ConversionError):
    """No registered family has this name or HF ``model_type``; the message lists them."""


# ---- transforms ------------------------------------------------------------------------
@dataclass(frozen=True)
class Transform:
    """HF tensors (in ``TensorMapping.hf`` order) <-> one megatron tensor. Transforms only
    reshape, slice and concatenate, so the inverse gives the HF tensors back bit-exactly."""

    name: str
    to_megatron: Callable[[ArchConfig, tuple[torch.Tensor, ...]], torch.Tensor]
    to_hf: Callable[[ArchConfig, torch.Tensor], tuple[torch.Tensor, ...]]


IDENTITY = Transform("identity", lambda arch, t: t[0], lambda arch, t: (t,))


# ---- the mapping -----------------------------------------------------------------------
Shape = Callable[[ArchConfig], tuple[int, ...]]
# What a tensor is. "embedding": the input embeddings; "output": the LM head (untied); both
# have one row per vocabulary entry. "linear": a linear layer's weight inside a transformer
# layer (megatron-core saves an ``_extra_state`` object per such module). "norm": a norm weight.
Role = Literal["embedding", "output", "linear", "norm"]
_VOCAB_ROLES = ("embedding", "output")
_LAYER = "{layer}"


@dataclass(frozen=True)
class TensorMapping:
    """One megatron tensor and the HF tensors it is made of. ``{layer}`` is the layer index.

    ``checkpoint_key``: the dist_checkpointing key when it is not the parameter name (the
    local layer spec stores the norms that Transformer Engine fuses into the next linear
    under TE's names, so checkpoints are interchangeable between the two implementations)."""

    megatron: str
    hf: tuple[str, ...]
    transform: Transform
    hf_shapes: tuple[Shape, ...]  # expected shape of each HF tensor, for the checks
    role: Role
    checkpoint_key: str | None = None

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(layer=layer) for n in self.hf)

    def megatron_name(self, layer: int | None = None) -> str:
        return self.megatron.format(layer=layer)


@dataclass(frozen=True)
class Group:
    """Mappings converted together: the embeddings, one layer, or the head. Conversion streams
    one group at a time, which bounds memory to the largest group."""

    name: str
    layer: int | None
    mappings: tuple[TensorMapping, ...]


@dataclass(frozen=True)
class ModelFamily:
    """A family of HF models: its name, the HF ``model_type``\\ s it reads, its mapping (in
    checkpoint order: embedding group, the group of each layer, head group) and its two
    ``config.json`` translations.

    ``arch_from_hf_config(config, name) -> ArchConfig`` refuses (ConversionError) what the
    megatron model would compute differently; ``hf_config_from_arch(arch, bos_token_id,
    eos_token_id, pad_token_id, dtype) -> dict`` is its inverse. ``ignored_hf_suffixes``: HF
    tensors that carry no weights and are skipped on import."""

    name: str
    hf_model_types: tuple[str, ...]
    embedding_mappings: tuple[TensorMapping, ...]
    layer_mappings: tuple[TensorMapping, ...]
    head_mappings: tuple[TensorMapping, ...]
    arch_from_hf_config: Callable[[dict, str], ArchConfig]
    hf_config_from_arch: Callable[..., dict]
    ignored_hf_suffixes: tuple[str, ...] = ()

    def __post_init__(self):
        problems = []
        for m in self.embedding_mappings + self.head_mappings:
            if any(_LAYER in n for n in (m.megatron, *m.hf, m.checkpoint_key or "")):
                problems.append(f"{m.megatron}: a global mapping has a {_LAYER} placeholder")
        for m in self.layer_mappings:
            if not all(_LAYER in n for n in (m.megatron, *m.hf, m.checkpoint_key or _LAYER)):
                problems.append(f"{m.megatron}: a layer mapping needs {_LAYER} in every name")
            if m.role in _VOCAB_ROLES:
                problems.append(f"{m.megatron}: role {m.role!r} outside the embedding and head groups")
        for m in self.embedding_mappings + self.layer_mappings + self.head_mappings:
            if m.role not in get_args(Role):
                problems.append(f"{m.megatron}: role {m.role!r} is not one of {get_args(Role)}")
            if len(m.hf) != len(m.hf_shapes):
                problems.append(f"{m.megatron}: {len(m.hf)} HF names but {len(m.hf_shapes)} shapes")
        roles = [m.role for m in self.embedding_mappings + self.head_mappings]
        if roles.count("embedding") != 1 or roles.count("output") > 1:
            problems.append("a family has one 'embedding' mapping and at most one 'output' mapping")
        for m in self.vocab_mappings() if not problems else ():
            if m.transform is not IDENTITY or len(m.hf) != 1:
                problems.append(f"{m.megatron}: a vocabulary tensor maps to one HF tensor unchanged")
        if len({m.megatron.split(_LAYER)[0] for m in self.layer_mappings}) > 1:
            problems.append("layer mappings disagree on the layer prefix before {layer}")
        if problems:
            raise ValueError(f"model family {self.name!r}: " + "; ".join(problems))

    # ---- names in checkpoint order -------------------------------------------------------
    def groups(self, arch: ArchConfig) -> Iterator[Group]:
        """Groups in checkpoint order: embeddings, layers 0..L-1, final norm + head."""
        yield Group("embedding", None, self.embedding_mappings)
        for layer in range(arch.num_layers):
            yield Group(f"layer {layer}", layer, self.layer_mappings)
        yield Group("head", None, self.head_mappings)

    def hf_names(self, arch: ArchConfig) -> list[str]:
        return [n for g in self.groups(arch) for m in g.mappings for n in m.hf_names(g.layer)]

    def megatron_names(self, arch: ArchConfig) -> list[str]:
        return [m.megatron_name(g.layer) for g in self.groups(arch) for m in g.mappings]

    def vocab_mappings(self) -> tuple[TensorMapping, ...]:
        """The tensors with one row per vocabulary entry: input embeddings, then the LM head
        (absent when tied). Their names are plain (no layer), HF and megatron alike."""
        by_role = {m.role: m for m in self.embedding_mappings + self.head_mappings}
        return tuple(by_role[r] for r in _VOCAB_ROLES if r in by_role)

    # ---- dist_checkpointing keys ---------------------------------------------------------
    @cached_property
    def layer_prefix(self) -> str:
        """What megatron names of layer tensors start with, before the layer index."""
        return self.layer_mappings[0].megatron.split(_LAYER)[0] if self.layer_mappings else ""

    @cached_property
    def _key_aliases(self) -> dict[str, str]:
        """Megatron name -> checkpoint key, for the tensors stored under another name (layer
        names without their ``layer_prefix{layer}.``)."""
        head = self.layer_prefix + _LAYER + "."
        aliases = {m.megatron[len(head):]: m.checkpoint_key[len(head):]
                   for m in self.layer_mappings if m.checkpoint_key}
        aliases.update({m.megatron: m.checkpoint_key for m in self.embedding_mappings + self.head_mappings
                        if m.checkpoint_key})
        return aliases

    def checkpoint_key(self, megatron_name: str) -> tuple[str, int | None]:
        """(dist_checkpointing key, global layer index or None) of a TP=1 megatron parameter
        name. Layers are stacked along a leading axis, so layer keys have no index."""
        prefix = self.layer_prefix
        if not prefix or not megatron_name.startswith(prefix):
            return self._key_aliases.get(megatron_name, megatron_name), None
        layer, rest = megatron_name[len(prefix):].split(".", 1)
        return prefix + self._key_aliases.get(rest, rest), int(layer)

    def extra_state_modules(self) -> tuple[str, ...]:
        """Modules of a layer (names after ``layer_prefix{layer}.``) that save an
        ``_extra_state`` object: the layer's linears. Loading a model asks for them, so a
        checkpoint written without a model must hold them too. (GPTModel drops the one of its
        output layer, which is why the head's linear has role "output", not "linear".)"""
        head = self.layer_prefix + _LAYER + "."
        return tuple(dict.fromkeys(m.megatron[len(head):].rsplit(".", 1)[0]
                                   for m in self.layer_mappings if m.role == "linear"))

    def model_key_prefixes(self) -> tuple[str, ...]:
        """First components (with the dot) of every model checkpoint key; other keys of a
        training checkpoint (optimizer state, RNG, ...) are not model weights."""
        names = [n for m in self.embedding_mappings + self.layer_mappings + self.head_mappings
                 for n in (m.megatron, m.checkpoint_key or m.megatron)]
        return tuple(dict.fromkeys(n.split(".", 1)[0] + "." for n in names))


# ---- the registry ----------------------------------------------------------------------
_REGISTRY: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` known by its name and its HF model types (each may belong to one
    family only). Registering the same object again is a no-op."""
    if _REGISTRY.get(family.name) is family:
        return family
    if family.name in _REGISTRY:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    for other in _REGISTRY.values():
        shared = sorted(set(other.hf_model_types) & set(family.hf_model_types))
        if shared:
            raise ValueError(f"model family {family.name!r}: HF model_type {shared} already belongs to {other.name!r}")
    _REGISTRY[family.name] = family
    return family


def registered_families() -> tuple[ModelFamily, ...]:
    return tuple(_REGISTRY.values())


def _known() -> str:
    listed = ", ".join(f"{f.name} (model_type {', '.join(f.hf_model_types)})" for f in _REGISTRY.values())
    return (f"registered: {listed or 'none'}; to add one, build a ModelFamily (convert/mistral.py is the example) "
            "and pass it to megatron_normistral.convert.families.register_family")


def get_family(name: str) -> ModelFamily:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownFamilyError(f"unknown model family {name!r}; {_known()}") from None


def family_of(arch: ArchConfig) -> ModelFamily:
    return get_family(arch.family)


def family_for_hf_config(config: dict) -> ModelFamily:
    """The family that reads this ``config.json`` (by ``model_type``; none means Mistral, as
    before families existed)."""
    model_type = config.get("model_type")
    if model_type is None:
        return get_family(DEFAULT_FAMILY)
    for family in _REGISTRY.values():
        if model_type in family.hf_model_types:
            return family
    raise UnknownFamilyError(f"model_type {model_type!r} belongs to no registered model family; {_known()}")


def arch_from_hf_config(config: dict, name: str = "hf") -> ArchConfig:
    """ArchConfig of a Hugging Face ``config.json`` (as a dict), read by the family that
    handles its ``model_type``; the family refuses what megatron would compute differently."""
    family = family_for_hf_config(config)
    return replace(family.arch_from_hf_config(config, name), family=family.name)


def hf_config_from_arch(arch: ArchConfig, **ids_and_dtype) -> dict:
    """``config.json`` for the HF model of ``arch``'s family (keywords: ``bos_token_id``,
    ``eos_token_id``, ``pad_token_id``, ``dtype``)."""
    return family_of(arch).hf_config_from_arch(arch, **ids_and_dtype)


# ---- applying a mapping ----------------------------------------------------------------
def megatron_shape(arch: ArchConfig, mapping: TensorMapping) -> tuple[int, ...]:
    shapes = [s(arch) for s in mapping.hf_shapes]
    if mapping.transform is IDENTITY:
        return shapes[0]
    return (sum(s[0] for s in shapes), shapes[0][1])  # every fusion concatenates along dim 0


def check_shape(name: str, tensor_shape, expected: tuple[int, ...], arch: ArchConfig, where: str) -> None:
    if tuple(tensor_shape) != tuple(expected):
        raise ConversionError(
            f"tensor {name!r} in {where} has shape {tuple(tensor_shape)}, but architecture "
            f"{arch.name!r} needs {tuple(expected)}"
        )


def hf_to_megatron(arch: ArchConfig, mapping: TensorMapping, layer: int | None, tensors: tuple[torch.Tensor, ...],
                   where: str = "the HF checkpoint") -> torch.Tensor:
    for name, shape_fn, t in zip(mapping.hf_names(layer), mapping.hf_shapes, tensors):
        check_shape(name, t.shape, shape_fn(arch), arch, where)
    return mapping.transform.to_megatron(arch, tensors)


def megatron_to_hf(arch: ArchConfig, mapping: TensorMapping, layer: int | None, tensor: torch.Tensor,
                   where: str = "the megatron checkpoint") -> dict[str, torch.Tensor]:
    check_shape(mapping.megatron_name(layer), tensor.shape, megatron_shape(arch, mapping), arch, where)
    return dict(zip(mapping.hf_names(layer), mapping.transform.to_hf(arch, tensor)))


def check_arch_matches(expected: ArchConfig, actual: ArchConfig, what: str) -> None:
    """Refuse when two architectures differ in anything that changes weights, names or math."""
    fields = ("family", "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
              "ffn_hidden_size", "vocab_size", "rope_theta", "norm_eps", "untie_embeddings")
    diffs = [f"{f}: {getattr(expected, f)} vs {getattr(actual, f)}" for f in fields
             if getattr(expected, f) != getattr(actual, f)]
    if diffs:
        raise ConversionError(f"architecture {expected.name!r} does not match {what}: " + "; ".join(diffs))
