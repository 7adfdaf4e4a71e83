"""Checkpoints, below both training and conversion.

- :mod:`.weights`: the model part (megatron-core ``torch_dist`` weights + the architecture
  record ``normistral_model.json``), read by one loader, :func:`~.weights.load_model_weights`;
  written whole from model chunks by :func:`~.weights.save_model_checkpoint` (conversion also
  writes it layer by layer: ``convert/mcore_io.py``).
- :mod:`.resume`: training checkpoints (weights + optimizer + the loop's state + RNG, published
  atomically as ``iter_XXXXXXX`` + ``latest``) and what a resume may change.
- :class:`~.errors.CheckpointError`: the one error type, a one-line message.
"""
from megatron_normistral.checkpoint.errors import CheckpointError

__all__ = ["CheckpointError"]
