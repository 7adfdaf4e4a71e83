"""Tokenizers: wrappers (Tekken, SentencePiece, Hugging Face), training, fertility, embedding transfer.

Library entry points (the tools in ``tools/`` are thin CLIs over them)::

    from megatron_normistral.tokenizer.trainer import TokenizerTrainingConfig, SamplingConfig, train_tokenizer
    from megatron_normistral.tokenizer.fertility import FertilityConfig, measure_fertility
    from megatron_normistral.tokenizer.transfer import TransferConfig, transfer_embeddings
"""
from megatron_normistral.tokenizer.wrappers import Tokenizer, TokenizerSpecError, load_tokenizer

__all__ = ["Tokenizer", "TokenizerSpecError", "load_tokenizer"]
