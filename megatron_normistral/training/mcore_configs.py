"""Our config sections that are megatron-core's own config classes, subclassed
(:class:`~.optimizer.OptimizerConfig`, :class:`~.ddp.DDPConfig`), so that megatron-core receives
the section itself instead of a field-by-field copy. What they share is here: importing
megatron-core's classes without its import-time warnings, and the fields another section owns.
"""
from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager


@contextmanager
def quiet_mcore_import():
    """megatron-core warns when its modules are imported that Transformer Engine and Apex are
    missing (always so on CPU). The recipe imports these classes before anything runs
    (``--help``, ``--print-config``, one-line errors on stderr), where the warnings would be noise;
    which layers a run uses is printed when the model is built."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        yield


def with_owned_fields(config, values: dict[str, object]):
    """A copy of ``config`` with the fields another recipe section owns set to that section's
    values (``values``: field -> value). ``type(config).OWNED_ELSEWHERE`` names each field's
    owner. A field set to anything but its default or the owner's value is refused, in one line:
    the owner is the only source. The copy runs megatron-core's ``__post_init__`` on the final
    values (the recipe sets fields one by one after construction)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, value in values.items():
        mine = getattr(config, name)
        if mine != defaults[name] and mine != value:
            owner = type(config).OWNED_ELSEWHERE[name]
            raise ValueError(f"{type(config).__name__}.{name} = {mine!r}, but {owner} gives {value!r}: "
                             f"{name} comes from {owner}; set it there only")
    return dataclasses.replace(config, **values)
