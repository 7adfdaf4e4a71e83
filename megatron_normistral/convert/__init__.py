"""Checkpoint conversion between Hugging Face models and megatron-core (dist_checkpointing).

- :mod:`.families`: model families (a registry by name and HF ``model_type``); a family's
  mapping is the one owner of parameter names.
- :mod:`.mistral`: the Mistral family: its declarative HF <-> megatron mapping and config translation.
- :mod:`.safetensors_io`: streaming HF safetensors reader / sharded writer.
- :mod:`.mcore_io`: megatron-core checkpoints of model weights (save/load at any layout).
- :mod:`.hf_mcore`: the two streaming conversions used by ``tools/convert_checkpoint.py``.
"""
from megatron_normistral.convert.families import ConversionError, arch_from_hf_config, hf_config_from_arch
from megatron_normistral.convert import mistral  # noqa: F401  (registers the Mistral family)

__all__ = ["ConversionError", "arch_from_hf_config", "hf_config_from_arch"]
