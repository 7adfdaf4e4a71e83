"""Checkpoint conversion between Hugging Face Mistral and megatron-core (dist_checkpointing).

- :mod:`.mistral`: the declarative HF <-> megatron weight mapping and config translation.
- :mod:`.safetensors_io`: streaming HF safetensors reader / sharded writer.
- :mod:`.mcore_io`: megatron-core checkpoints of model weights (save/load at any layout).
- :mod:`.hf_mcore`: the two streaming conversions used by ``tools/convert_checkpoint.py``.
"""
from megatron_normistral.convert.mistral import ConversionError, arch_from_hf_config, hf_config_from_arch

__all__ = ["ConversionError", "arch_from_hf_config", "hf_config_from_arch"]
