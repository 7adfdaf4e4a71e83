"""Python reference of the C++ helpers' shared core (``csrc/helpers.h``), and the backend names.

Every C++ helper (``megatron_normistral._helpers``) has a pure-Python/numpy reference it must
equal bit for bit: the objective's in :mod:`~megatron_normistral.data.objective`, the mixture
index's in :mod:`~megatron_normistral.data.mixture`, the indexed writer's in
:mod:`~megatron_normistral.data.indexed`. The primitives they share are written once on each
side: in ``csrc/helpers.h`` and here, name for name, specified by the docstrings below
(tests/data/test_reference_core.py compares each with its C++ binding). Integer arithmetic
only, wrapped to 64 bits as C++ does.

Each primitive takes Python ints (exact; what the scalar loops of the references use) or
numpy ``uint64`` arrays/scalars (vectorised; ``bounded64`` takes ints only).

Randomness is counter based, nothing sequential: a key is derived from the seed along a path of
labels (:func:`key_path`: a sample index, a corpus slot, an epoch, a stream salt) and the i-th
draw of a key is :func:`draw`. Any draw can be computed alone (no replay after a resume), and
draws do not depend on the order or the process that asks for them.

Backends: functions with both implementations take ``backend="cpp"`` (the C++ helpers, the
default) or ``backend="reference"`` (the Python reference); :func:`check_backend` validates.
"""
from __future__ import annotations

import numpy as np

__all__ = ["U64", "BACKENDS", "check_backend", "splitmix64", "derive_key", "key_path", "draw",
           "bounded32", "bounded64"]

U64 = (1 << 64) - 1

BACKENDS = ("cpp", "reference")


def check_backend(backend: str, old_name: str | None = None) -> str:
    """``backend`` as one of :data:`BACKENDS`, or ValueError. ``old_name``: the spelling a caller
    accepted for the reference before the names were unified (``"numpy"`` for the objective,
    ``"python"`` for the indexed writer and preprocessing), still accepted there."""
    if old_name is not None and backend == old_name:
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'cpp' (the C++ helpers) or 'reference' (their Python reference), "
                         f"got {backend!r}")
    return backend


def _is_array(*xs) -> bool:
    return any(isinstance(x, (np.ndarray, np.generic)) for x in xs)


def splitmix64(x):
    """splitmix64 (Steele, Lea and Flood 2014): ``z = x + 0x9E3779B97F4A7C15``, then
    ``z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9``, ``z = (z ^ (z >> 27)) * 0x94D049BB133111EB``,
    result ``z ^ (z >> 31)``, all modulo 2**64."""
    if _is_array(x):
        z = np.asarray(x, dtype=np.uint64)
        with np.errstate(over="ignore"):
            z = z + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
    z = (x + 0x9E3779B97F4A7C15) & U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
    return z ^ (z >> 31)


def derive_key(key, label):
    """The key of ``label`` under ``key``: ``splitmix64(key ^ label)``."""
    if _is_array(key, label):
        return splitmix64(np.asarray(key, dtype=np.uint64) ^ np.asarray(label, dtype=np.uint64))
    return splitmix64((key ^ label) & U64)


def key_path(seed: int, *labels):
    """The key of a path of labels under ``seed``: ``k = splitmix64(seed)``, then
    ``k = derive_key(k, label)`` for each label in order. (The objective's sample key is
    ``key_path(seed, global_index)`` and its stream keys ``key_path(seed, global_index, SALT)``;
    the mixture's epoch key is ``key_path(seed, slot, epoch)``.) A label may be an array: one key
    per element."""
    key = splitmix64(int(seed) & U64)
    for label in labels:
        key = derive_key(key, label)
    return key


def draw(key, i):
    """Draw ``i`` of the stream of ``key``: ``splitmix64(key + i)``."""
    if _is_array(key, i):
        with np.errstate(over="ignore"):
            return splitmix64(np.asarray(key, dtype=np.uint64) + np.asarray(i, dtype=np.uint64))
    return splitmix64((key + i) & U64)


def bounded32(x, n):
    """An integer in ``[0, n)`` from the high 32 bits of a draw: ``((x >> 32) * n) >> 32``
    (``n < 2**32``). The objective's bounded draw."""
    if _is_array(x):
        return ((np.asarray(x, dtype=np.uint64) >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)
    return ((x >> 32) * n) >> 32


def bounded64(x: int, n: int) -> int:
    """An integer in ``[0, n)`` from all 64 bits of a draw: ``(x * n) >> 64`` (exact, 128-bit
    product). The mixture shuffle's bounded draw; not interchangeable with :func:`bounded32`."""
    return (x * n) >> 64
