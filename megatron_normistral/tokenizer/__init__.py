"""Tokenizers: wrappers (Tekken, SentencePiece, Hugging Face), training, fertility, embedding transfer."""
from megatron_normistral.tokenizer.wrappers import Tokenizer, TokenizerSpecError, load_tokenizer

__all__ = ["Tokenizer", "TokenizerSpecError", "load_tokenizer"]
