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

    # --- surface forms (used by embedding transfer) -------------------------------------
    def token_surface(self, token_id: int) -> bytes | None:
        """The raw bytes a regular token stands for in text (SentencePiece's U+2581 and
        byte-level's mapped characters turned back into real spaces / bytes; ``<0xNN>``
        byte-fallback pieces into their byte); ``None`` for special/control tokens."""
        raise NotImplementedError(f"{type(self).__name__} has no token_surface")

    def encode_surface(self, data: bytes) -> list[int]:
        """Encode raw bytes as they stand: no BOS/EOS, no dummy prefix, no normalisation, no
        special-token matching. Bytes that are not valid UTF-8 become byte tokens."""
        raise NotImplementedError(f"{type(self).__name__} has no encode_surface")

    def is_special(self, token_id: int) -> bool:
        return self.token_surface(token_id) is None

    def piece(self, token_id: int) -> str:
        """The token as the tokenizer spells it in its vocabulary (e.g. ``<s>``, ``▁og``)."""
        raise NotImplementedError(f"{type(self).__name__} has no piece")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"


def _utf8_runs(data: bytes) -> list[str | bytes]:
    """Split bytes into valid UTF-8 runs (as ``str``) and invalid runs (as ``bytes``)."""
    out: list[str | bytes] = []
    while data:
        try:
            out.append(data.decode("utf-8"))
            break
        except UnicodeDecodeError as e:
            if e.start:
                out.append(data[: e.start].decode("utf-8"))
            out.append(data[e.start : e.end])
            data = data[e.end :]
    return out


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2 style byte-level mapping: byte -> the printable character standing for it.
    Printable Latin-1 bytes stand for themselves; the other 68 get U+0100 onwards in order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


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

    def token_surface(self, token_id: int) -> bytes | None:
        return None if self.is_special(token_id) else self.token_bytes(token_id)

    def piece(self, token_id: int) -> str:
        return self._tok.id_to_piece(token_id)

    def encode_surface(self, data: bytes) -> list[int]:
        """Valid UTF-8: the ordinary encoding. Otherwise (a piece of a multi-byte character)
        byte-level BPE of the bytes as one piece."""
        runs = _utf8_runs(data)
        if all(isinstance(r, str) for r in runs):
            return self.encode("".join(runs))  # type: ignore[arg-type]
        return [self.num_special_tokens + i for i in self._tok._model._encode_bytes(data)]


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

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def token_surface(self, token_id: int) -> bytes | None:
        if self._sp.is_control(token_id) or self._sp.is_unknown(token_id):
            return None
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(_SP_SPACE, " ").encode("utf-8")

    def model_proto(self):
        """The model file parsed (a fresh ``sentencepiece_model_pb2.ModelProto`` each call)."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(self.path.read_bytes())
        return proto

    def encode_surface(self, data: bytes) -> list[int]:
        if not hasattr(self, "_sp_raw"):  # same model without dummy prefix / whitespace cleanup
            import sentencepiece as spm

            proto = self.model_proto()
            proto.normalizer_spec.add_dummy_prefix = False
            proto.normalizer_spec.remove_extra_whitespaces = False
            self._sp_raw = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        ids: list[int] = []
        for run in _utf8_runs(data):
            if isinstance(run, str):
                ids += self._sp_raw.encode(run)
            else:
                for b in run:
                    i = self._sp.piece_to_id(f"<0x{b:02X}>")
                    ids.append(i)
        return ids


_SP_SPACE = "\u2581"


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

    @property
    def convention(self) -> str:
        """How tokens spell text: ``bytelevel`` (GPT-2 mapped bytes), ``metaspace``
        (SentencePiece style, U+2581 for a space) or ``plain``."""
        if not hasattr(self, "_convention"):
            import json

            spec = json.loads(self.path.read_text(encoding="utf-8"))
            parts = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder"), spec.get("normalizer")], ensure_ascii=False)
            model = spec.get("model") or {}
            self._byte_fallback = bool(model.get("byte_fallback"))
            self._special_ids = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
            if '"ByteLevel"' in parts:
                self._convention = "bytelevel"
            elif '"Metaspace"' in parts or _SP_SPACE in parts:
                self._convention = "metaspace"
            else:
                self._convention = "plain"
            self._byte_decoder = {c: b for b, c in byte_level_alphabet().items()}
        return self._convention

    def is_special(self, token_id: int) -> bool:
        self.convention
        return token_id in self._special_ids

    def piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise TokenizerSpecError(f"{self.name}: no token with id {token_id}")
        return piece

    def token_surface(self, token_id: int) -> bytes | None:
        conv = self.convention
        if token_id in self._special_ids:
            return None
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise TokenizerSpecError(f"{self.name}: no token with id {token_id}")
        if self._byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        if conv == "bytelevel":
            try:
                return bytes(self._byte_decoder[c] for c in piece)
            except KeyError:  # an added (non-special) token written as plain text
                return piece.encode("utf-8")
        if conv == "metaspace":
            return piece.replace(_SP_SPACE, " ").encode("utf-8")
        return piece.encode("utf-8")

    def _byte_ids(self, run: bytes) -> list[int]:
        if self.convention == "bytelevel":
            alphabet = byte_level_alphabet()
            return [t.id for t in self._tok.model.tokenize("".join(alphabet[b] for b in run))]
        ids = []
        for b in run:
            i = self._tok.token_to_id(f"<0x{b:02X}>")
            ids.append(i if i is not None else self.unk_id)
        return ids

    def encode_surface(self, data: bytes) -> list[int]:
        import re

        conv = self.convention
        model = self._tok.model
        ids: list[int] = []
        runs = _utf8_runs(data)
        if conv == "bytelevel" and not all(isinstance(r, str) for r in runs):
            return self._byte_ids(data)  # part of a multi-byte character: BPE over all bytes
        for run in runs:
            if isinstance(run, bytes):
                ids += self._byte_ids(run)
                continue
            if conv == "bytelevel":
                pieces = [p for p, _ in self._tok.pre_tokenizer.pre_tokenize_str(run)]
            elif conv == "metaspace":
                pieces = [p for p in re.split(f"(?={_SP_SPACE})", run.replace(" ", _SP_SPACE)) if p]
            else:
                pieces = [p for p, _ in self._tok.pre_tokenizer.pre_tokenize_str(run)] if self._tok.pre_tokenizer else [run]
            for p in pieces:
                ids += [t.id for t in model.tokenize(p)]
        return ids


# The files a tokenizer folder may hold, and what is copied with it (embedding transfer, export
# to Hugging Face): SentencePiece, fast tokenizers, Mistral's tekken.json, chat templates and
# tools/train_tokenizer.py's training record.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "tekken.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "training.json")


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
