"""What the recipe reads from a section's dataclass: its settings, their help, their types.

- Settings (:func:`section_fields`): the fields the class body declares itself. A section that
  subclasses a megatron-core config (``training/optimizer.py``, ``training/ddp.py``) declares
  the fields a recipe may set (with our defaults); megatron-core's other fields keep its
  defaults, and those that another section owns (``OWNED_ELSEWHERE``) are set from it.
- Help (:func:`field_help`): each field's docstring, the string literal written under it, as
  megatron-core and torchtitan document their config fields; the first class of the MRO that
  has one gives it. The one source of ``--help`` and of the README's configuration reference.
- Old names (``OLD_NAMES``, old -> new): still read, with a one-line note.
- Values (:func:`read_section`, :func:`convert`): a YAML mapping or a command-line string
  coerced to the field's type; errors name the file, section and field.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Callable, Literal

from megatron_normistral.training.errors import RecipeError

Note = Callable[[str], None]


def section_fields(cls) -> list[dataclasses.Field]:
    """The settings of section class ``cls``, in the order its body declares them."""
    own = vars(cls).get("__annotations__", {})
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    return [by_name[name] for name in own if name in by_name]


def old_names(cls) -> dict[str, str]:
    """Renamed fields of ``cls``: old name -> new name."""
    return getattr(cls, "OLD_NAMES", {})


def field_help(cls, name: str) -> str:
    """The docstring of field ``name`` of ``cls`` (whitespace collapsed); '' if none."""
    for klass in cls.__mro__:
        doc = _attribute_docstrings(klass).get(name)
        if doc:
            return doc
    return ""


@functools.cache
def _attribute_docstrings(klass) -> dict[str, str]:
    """{field: docstring} of the annotated assignments in ``klass``'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # a builtin, or a class without source
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for statement, after in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[statement.target.id] = " ".join(after.value.value.split())
    return docs


@functools.cache
def _type_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_type(cls, name: str):
    return _type_hints(cls)[name]


def strip_optional(tp):
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def convert(value: Any, tp, where: str, note: Note | None = None):
    """Coerce a YAML or command-line value to the field's type, with a clear error."""
    tp = strip_optional(tp)
    if value is None:
        return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"expected true/false, got {value!r}")
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if origin is Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                raise ValueError(f"expected one of {list(choices)}, got {value!r}")
            return value
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if dataclasses.is_dataclass(item_tp):
                return [read_section(item_tp, v, f"{where}[{i}]", note) for i, v in enumerate(value)]
            return [convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from None
    return value


def read_section(cls, data: dict, where: str, note: Note | None = None):
    """An instance of ``cls`` from a mapping of its settings (old names noted and renamed)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    for old, new in old_names(cls).items():
        if old in data:
            if new in data:
                raise RecipeError(f"{where}: both {old} and {new} are given; {old} is the old name of {new}: keep {new}")
            if note:
                note(f"{where}.{old}: renamed to {new}; the old name still works")
            data[new] = data.pop(old)
    known = [f.name for f in section_fields(cls)]
    for name, owner in getattr(cls, "OWNED_ELSEWHERE", {}).items():
        if name in data:
            raise RecipeError(f"{where}.{name}: set by {owner}; give it there")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    required = [f.name for f in section_fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise RecipeError(f"{where}: missing key(s) {missing}")
    values = {k: convert(v, field_type(cls, k), f"{where}.{k}", note) for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as exc:  # a config's own check (__post_init__)
        raise RecipeError(f"{where}: {exc}") from None
