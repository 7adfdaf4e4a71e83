"""One tokenizer API over the three kinds this project meets.

- ``tekken``: Mistral-NeMo's Tekken (131,072 entries), from the ``mistral-common`` package;
- a SentencePiece ``.model`` file;
- a Hugging Face tokenizer: a folder holding ``tokenizer.json`` or the file itself.

``encode`` never adds BOS/EOS: callers add specials explicitly (``bos_id``/``eos_id``), so
every tool counts and packs tokens the same way whichever tokenizer it is given.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


class TokenizerSpecError(ValueError):
    pass


class Tokenizer:
    """Common interface. Subclasses set the id attributes and implement encode/decode."""

    name: str = ""
    vocab_size: int = 0
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    unk_id: int | None = None
    mask_id: int | None = None

    @property
    def eod_id(self) -> int:
        """Token appended after each document when packing (the EOS token)."""
        if self.eos_id is None:
            raise TokenizerSpecError(f"tokenizer {self.name} has no end-of-sequence token")
        return self.eos_id

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


def tekken_path(version: str = "240718") -> Path:
    """Path of Tekken's JSON file inside the installed mistral-common package."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / f"tekken_{version}.json"
    if not path.exists():
        raise TokenizerSpecError(f"mistral-common has no {path.name} (looked in {path.parent})")
    return path


class TekkenTokenizer(Tokenizer):
    """Mistral-NeMo's tokenizer: byte-level BPE (tiktoken-style), 1,000 special ids first."""

    def __init__(self, path: str | os.PathLike | None = None):
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        self.path = Path(path) if path is not None else tekken_path()
        self._tok = Tekkenizer.from_file(self.path)
        self.name = "tekken"
        self.vocab_size = self._tok.n_words
        self.num_special_tokens = self._tok.num_special_tokens
        self.bos_id, self.eos_id = self._tok.bos_id, self._tok.eos_id
        self.pad_id, self.unk_id = self._tok.pad_id, self._tok.unk_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, bos=False, eos=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a regular token stands for."""
        return self._tok.id_to_byte_piece(token_id, "raise")

    def is_special(self, token_id: int) -> bool:
        return token_id < self.num_special_tokens


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.name = self.path.name
        self.vocab_size = self._sp.get_piece_size()

        def known(i: int) -> int | None:
            return i if i >= 0 else None

        self.bos_id, self.eos_id = known(self._sp.bos_id()), known(self._sp.eos_id())
        self.pad_id, self.unk_id = known(self._sp.pad_id()), known(self._sp.unk_id())
        mask = self._sp.piece_to_id("<mask>")
        self.mask_id = mask if mask != self.unk_id else None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer, read from ``tokenizer.json`` with the ``tokenizers``
    library (no transformers import; identical ids to ``AutoTokenizer`` for fast tokenizers)."""

    SPECIAL_NAMES = {"bos_id": "<s>", "eos_id": "</s>", "pad_id": "<pad>", "unk_id": "<unk>", "mask_id": "<mask>"}

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as FastTokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise TokenizerSpecError(f"{path}: no tokenizer.json found")
        self.path = file
        self._tok = FastTokenizer.from_file(str(file))
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        for attr, piece in self.SPECIAL_NAMES.items():
            setattr(self, attr, self._tok.token_to_id(piece))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """``tekken`` | ``tekken:PATH.json`` | ``PATH.model`` (SentencePiece) | a Hugging Face
    tokenizer folder or ``tokenizer.json``."""
    spec = str(spec)
    if spec == "tekken":
        return TekkenTokenizer()
    if spec.startswith("tekken:"):
        return TekkenTokenizer(spec[len("tekken:"):])
    path = Path(spec)
    if not path.exists():
        raise TokenizerSpecError(
            f"tokenizer {spec!r}: not 'tekken' and no such file or folder "
            "(expected 'tekken', a SentencePiece .model, or a Hugging Face tokenizer folder/tokenizer.json)"
        )
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir() or path.suffix == ".json":
        return HFTokenizer(path)
    raise TokenizerSpecError(f"tokenizer {spec!r}: unrecognised file type {path.suffix!r}")
