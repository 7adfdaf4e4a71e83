"""Moving a Hugging Face Mistral checkpoint to a new tokenizer (embedding transfer).

Which tensors are the input embeddings and the LM head comes from the model family that reads
the checkpoint's ``config.json`` (``convert.families``, by ``model_type``).

For every regular token of the target tokenizer we take its *surface*: the raw bytes it stands
for (SentencePiece's U+2581 becomes a space, byte-level characters become their bytes, a
``<0xNN>`` byte-fallback piece becomes byte NN). The surface is encoded with the source
tokenizer as it stands (no BOS/EOS, no dummy prefix, no normalisation; see
``Tokenizer.encode_surface``) and the new row is the mean, in fp32, of the source rows of those
pieces. This is applied to the input embeddings (``--init``) and to the LM head (``--head``).

Special tokens follow :data:`SPECIAL_TABLE`. A token falls back to a random row when its
surface is empty or the source tokenizer can only spell it with ``<unk>``; the report lists
them with the reason. Random rows are N(0, s^2) with s the standard deviation of the source
matrix's entries.

Every other tensor is copied byte for byte; safetensors files are read and written one tensor
at a time (peak memory: about one embedding matrix).
"""
from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from megatron_normistral.convert.families import ConversionError, family_for_hf_config
from megatron_normistral.convert.safetensors_io import CheckpointIOError, HFCheckpointReader, encode_header, read_header, tensor_bytes
from megatron_normistral.tokenizer.wrappers import TOKENIZER_FILES, Tokenizer, TokenizerSpecError, load_tokenizer
from megatron_normistral.runtime.logs import get_logger, progress
from megatron_normistral.runtime.progress import ProgressMeter

log = get_logger(__name__)

INIT_METHODS = ("mean", "random", "first")
HEAD_METHODS = ("mean", "source", "random")

# target special token -> which source row(s) it starts from.
#   "bos"/"eos"/"unk"/"pad": the source tokenizer's token of that role ("pad" falls back to "eos"
#   when the source has none); "all": the mean of every source row.
SPECIAL_TABLE: dict[str, str] = {
    "<unk>": "unk",
    "<s>": "bos",
    "</s>": "eos",
    "<pad>": "pad",
    "<mask>": "all",
    # any other special / control token (e.g. <reserved_5>..<reserved_15>): "all"
}
SPECIAL_DEFAULT = "all"

COPY_CHUNK = 8 << 20  # bytes read at a time when copying a tensor


class TransferError(ValueError):
    pass


@dataclass
class TransferConfig:
    source: str  # Hugging Face Mistral folder (safetensors, sharded or not)
    source_tokenizer: str  # "tekken" or a tokenizer folder (load_tokenizer spec)
    target_tokenizer: str  # tokenizer folder (copied into the output)
    output: str
    init: str = "mean"
    head: str = "mean"  # mean: mean of pieces; source: the same method as --init; random
    seed: int = 0
    chunk_rows: int = 8192
    verbose: bool = True
    progress_interval: float = 5.0  # seconds between row-progress lines of a matrix at most (its last always comes)


@dataclass
class RowSource:
    """Where a target row comes from: ``kind`` is "pieces" (mean of ``ids``), "all" (mean of
    every source row) or "random" (``reason`` says why)."""

    kind: str
    ids: tuple[int, ...] = ()
    reason: str = ""


@dataclass
class TransferPlan:
    rows: list[RowSource]
    specials: dict[int, str] = field(default_factory=dict)  # target id -> description

    def summary(self) -> dict[str, int]:
        c: Counter = Counter()
        for i, r in enumerate(self.rows):
            if i in self.specials:
                c["special"] += 1
            elif r.kind == "pieces":
                n = len(r.ids)
                c["1 piece" if n == 1 else "2 pieces" if n == 2 else "3+ pieces"] += 1
            else:
                c[r.kind] += 1
        return dict(c)

    def random_rows(self) -> dict[int, str]:
        return {i: r.reason for i, r in enumerate(self.rows) if r.kind == "random"}


@dataclass
class TransferReport:
    output: Path
    source_vocab: int
    target_vocab: int
    summary: dict[str, int]
    random_rows: dict[int, str]
    specials: dict[int, str]
    tensors_copied: int
    seconds: float

    def format(self, target: Tokenizer | None = None, limit: int = 20) -> str:
        lines = [
            f"embedding transfer -> {self.output}: vocabulary {self.source_vocab} -> {self.target_vocab}",
            "target tokens initialised from: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.summary.items())),
            "special tokens: " + "; ".join(f"{i}: {d}" for i, d in sorted(self.specials.items())),
        ]
        if self.random_rows:
            lines.append(f"{len(self.random_rows)} token(s) fell back to random rows:")
            for i, why in list(self.random_rows.items())[:limit]:
                lines.append(f"  {i}: {why}")
            if len(self.random_rows) > limit:
                lines.append(f"  ... and {len(self.random_rows) - limit} more (see transfer_report.json)")
        else:
            lines.append("no token fell back to a random row")
        lines.append(f"{self.tensors_copied} other tensors copied bit for bit; {self.seconds:.1f} s")
        return "\n".join(lines)


def _special_name(tok: Tokenizer, i: int) -> str:
    piece = getattr(tok, "piece", None)
    if piece is not None:
        return piece(i)
    for attr, name in (("unk_id", "<unk>"), ("bos_id", "<s>"), ("eos_id", "</s>"), ("pad_id", "<pad>"), ("mask_id", "<mask>")):
        if getattr(tok, attr, None) == i:
            return name
    return f"special {i}"


def plan_transfer(source: Tokenizer, target: Tokenizer, source_rows: int | None = None) -> TransferPlan:
    """Decide, for every target id, which source rows initialise it (see module docstring)."""
    n_src = source_rows if source_rows is not None else source.vocab_size
    rows: list[RowSource] = []
    specials: dict[int, str] = {}
    for i in range(target.vocab_size):
        surface = target.token_surface(i)
        if surface is None:
            name = _special_name(target, i)
            role = SPECIAL_TABLE.get(name, SPECIAL_DEFAULT)
            src = None
            if role == "pad":
                src = source.pad_id if source.pad_id is not None else source.eos_id
                role = "pad" if source.pad_id is not None else "eos (source has no pad)"
            elif role != "all":
                src = getattr(source, f"{role}_id")
            if src is None:
                rows.append(RowSource("all"))
                specials[i] = f"{name} <- mean of all source rows"
            else:
                rows.append(RowSource("pieces", (src,)))
                specials[i] = f"{name} <- source {role} ({src})"
            continue
        if not surface:
            rows.append(RowSource("random", reason="empty surface"))
            continue
        ids = source.encode_surface(surface)
        if not ids:
            rows.append(RowSource("random", reason=f"source tokenizer gives no pieces for {surface!r}"))
        elif source.unk_id is not None and source.unk_id in ids:
            rows.append(RowSource("random", reason=f"source tokenizer spells {surface!r} with <unk>"))
        elif max(ids) >= n_src or min(ids) < 0:
            raise TransferError(f"source tokenizer id {max(ids)} outside the source embedding ({n_src} rows)")
        else:
            rows.append(RowSource("pieces", tuple(ids)))
    return TransferPlan(rows, specials)


def init_rows(source_matrix, plan: TransferPlan, method: str, seed: int = 0, chunk_rows: int = 8192, out_dtype=None,
              on_rows: Callable[[int, int], None] | None = None):
    """New matrix (``len(plan.rows)`` x hidden, ``out_dtype``, default fp32) from
    ``source_matrix`` (any float dtype); arithmetic in fp32, cast once per row at the end.
    ``on_rows(done, total)`` is called as the new rows start (0) and after each chunk of them.

    ``mean``: mean of the pieces' rows (fp32 arithmetic); ``first``: the first piece's row;
    ``random``: every regular row random (specials still follow the table). Rows the plan marks
    random are N(0, s^2), s = std of the source matrix entries (fp32, computed in chunks)."""
    import torch

    if method not in INIT_METHODS:
        raise TransferError(f"init method must be one of {INIT_METHODS}, got {method!r}")
    n_src, hidden = source_matrix.shape
    # column mean and entry std of the source matrix, in chunks
    total = torch.zeros(hidden, dtype=torch.float64)
    sq = torch.zeros((), dtype=torch.float64)
    for a in range(0, n_src, chunk_rows):
        blk = source_matrix[a : a + chunk_rows].to(torch.float64)
        total += blk.sum(0)
        sq += (blk * blk).sum()
    mean_all = (total / n_src).to(torch.float32)
    count = n_src * hidden
    var = sq / count - (total.sum() / count) ** 2
    std = float(var.clamp_min(0).sqrt())
    gen = torch.Generator().manual_seed(seed)
    n_new = len(plan.rows)
    out = torch.empty(n_new, hidden, dtype=out_dtype or torch.float32)
    if on_rows is not None:
        on_rows(0, n_new)
    for a in range(0, n_new, chunk_rows):
        b = min(n_new, a + chunk_rows)
        blk = torch.zeros(b - a, hidden, dtype=torch.float32)
        tgt, src, w = [], [], []
        for i in range(a, b):
            r = plan.rows[i]
            regular = i not in plan.specials
            if r.kind == "all":
                blk[i - a] = mean_all
            elif r.kind == "random" or (method == "random" and regular):
                blk[i - a] = torch.randn(hidden, generator=gen) * std
            elif method == "first" and regular:
                tgt.append(i - a), src.append(r.ids[0]), w.append(1.0)
            else:
                n = len(r.ids)
                for s in r.ids:
                    tgt.append(i - a), src.append(s), w.append(1.0 / n)
        if tgt:
            src_t = torch.tensor(src, dtype=torch.long)
            gathered = source_matrix.index_select(0, src_t).to(torch.float32)
            gathered *= torch.tensor(w, dtype=torch.float32).unsqueeze(1)
            blk.index_add_(0, torch.tensor(tgt, dtype=torch.long), gathered)
        out[a:b] = blk
        if on_rows is not None:
            on_rows(b, n_new)
    return out


def row_progress(name: str, verbose: bool, interval: float) -> Callable[[int, int], None]:
    """An ``on_rows`` for :func:`init_rows` that logs ``  NAME: rows 8,192/51,200 | 16.0% |
    elapsed 0:00:03 | ETA 0:00:16`` at most every ``interval`` seconds, and the last chunk's
    line always. The clock starts with the new rows (``done`` 0), after the pass over the
    source matrix, so the ETA is the rate of the rows themselves."""
    meter: ProgressMeter | None = None

    def on_rows(done: int, total: int) -> None:
        nonlocal meter
        if done == 0:
            meter = ProgressMeter(total, interval)
            return
        if verbose and meter.due(force=done >= total):
            progress(log, verbose, f"  {name}: rows {done:,}/{total:,} | {meter.text(done)}")

    return on_rows


# --- safetensors, one tensor at a time ------------------------------------------------------
def _write_shard(src: Path, dst: Path, replace: dict[str, object], verbose: bool) -> tuple[int, int]:
    """Copy safetensors ``src`` to ``dst`` with tensors in ``replace`` (name -> torch tensor of
    the same dtype) substituted; returns (bytes of tensor data, tensors copied unchanged)."""
    header, base = read_header(src)
    names = [k for k in header if k != "__metadata__"]
    names.sort(key=lambda k: header[k]["data_offsets"][0])
    new_header: dict = {}
    if "__metadata__" in header:
        new_header["__metadata__"] = header["__metadata__"]
    offset = 0
    for k in names:
        if k in replace:
            t = replace[k]
            size = t.numel() * t.element_size()  # type: ignore[attr-defined]
            entry = {"dtype": header[k]["dtype"], "shape": list(t.shape)}  # type: ignore[attr-defined]
        else:
            a, b = header[k]["data_offsets"]
            size = b - a
            entry = {"dtype": header[k]["dtype"], "shape": header[k]["shape"]}
        entry["data_offsets"] = [offset, offset + size]
        new_header[k] = entry
        offset += size
    copied = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(encode_header(new_header))
        for k in names:
            if k in replace:
                fout.write(tensor_bytes(replace[k]))
                continue
            a, b = header[k]["data_offsets"]
            fin.seek(base + a)
            left = b - a
            while left:
                chunk = fin.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise TransferError(f"{src}: truncated tensor {k}")
                fout.write(chunk)
                left -= len(chunk)
            copied += 1
    return offset, copied


def transfer_embeddings(cfg: TransferConfig) -> TransferReport:
    """Write ``cfg.output``: the source checkpoint with its input embeddings and LM head (as its
    model family names them: ``embed_tokens``, ``lm_head`` for Mistral) resized to the target
    vocabulary, config updated (vocab size, special ids), target tokenizer files
    copied in, and ``transfer_report.json``."""
    t0 = time.time()
    if cfg.init not in INIT_METHODS:
        raise TransferError(f"--init must be one of {INIT_METHODS}, got {cfg.init!r}")
    if cfg.head not in HEAD_METHODS:
        raise TransferError(f"--head must be one of {HEAD_METHODS}, got {cfg.head!r}")
    src_dir, out = Path(cfg.source), Path(cfg.output)
    if not (src_dir / "config.json").exists():
        raise TransferError(f"{src_dir}: no config.json (expected a Hugging Face model folder)")
    if out.resolve() == src_dir.resolve():
        raise TransferError("--output must differ from --source")
    config = json.loads((src_dir / "config.json").read_text())
    try:
        family = family_for_hf_config(config)
    except ConversionError as e:
        raise TransferError(f"{src_dir / 'config.json'}: {e}") from None
    tgt_path = Path(cfg.target_tokenizer)
    if not tgt_path.is_dir():
        raise TransferError(f"--target-tokenizer {tgt_path}: expected a tokenizer folder")
    try:
        reader = HFCheckpointReader(src_dir)
    except CheckpointIOError:
        raise TransferError(f"{src_dir}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are read)") from None
    files = sorted({reader.file_of(name) for name in reader.names()})
    index_file = src_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else None
    try:
        source_tok = load_tokenizer(cfg.source_tokenizer)
        target_tok = load_tokenizer(tgt_path)
    except TokenizerSpecError as e:
        raise TransferError(str(e)) from None

    # the embedding and head tensors, as the family names them (no head: tied embeddings)
    vocab_names = {m.role: m.hf[0] for m in family.vocab_mappings()}
    embed_name, head_name = vocab_names["embedding"], vocab_names.get("output")
    if embed_name not in reader.names():
        raise TransferError(f"{src_dir}: no {embed_name} tensor (the input embeddings of a {family.name} checkpoint)")
    has_head = head_name is not None and head_name in reader.names()
    n_src, hidden = reader.shape(embed_name)
    progress(log, cfg.verbose, f"source {src_dir}: {len(files)} weight file(s), embedding {n_src} x {hidden}")

    progress(log, cfg.verbose, f"planning {target_tok.vocab_size} target rows from {source_tok.name} pieces ...")
    plan = plan_transfer(source_tok, target_tok, n_src)
    out.mkdir(parents=True, exist_ok=True)

    replace_by_file: dict[str, dict[str, object]] = {}
    for k in [embed_name] + ([head_name] if has_head else []):
        fname = reader.file_of(k)
        mat = reader.read(k)
        if list(mat.shape) != [n_src, hidden]:
            raise TransferError(f"{k}: shape {list(mat.shape)}, expected {[n_src, hidden]}")
        if k == embed_name:
            method = cfg.init
        else:
            method = {"mean": "mean", "source": cfg.init, "random": "random"}[cfg.head]
        progress(log, cfg.verbose, f"initialising {k} ({method}) ...")
        new = init_rows(mat, plan, method, seed=cfg.seed + (0 if k == embed_name else 1),
                        chunk_rows=cfg.chunk_rows, out_dtype=mat.dtype,
                        on_rows=row_progress(k, cfg.verbose, cfg.progress_interval))
        replace_by_file.setdefault(fname, {})[k] = new
        del mat, new

    total, copied = 0, 0
    for fname in files:
        progress(log, cfg.verbose, f"writing {out / fname} ...")
        size, n = _write_shard(src_dir / fname, out / fname, replace_by_file.get(fname, {}), cfg.verbose)
        replace_by_file.pop(fname, None)
        total += size
        copied += n
    if index is not None:
        index = dict(index)
        index["metadata"] = dict(index.get("metadata", {}), total_size=total)
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    # config and other files
    specials = {"bos_token_id": target_tok.bos_id, "eos_token_id": target_tok.eos_id, "pad_token_id": target_tok.pad_id}
    config["vocab_size"] = target_tok.vocab_size
    config.update(specials)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    skip = set(files) | {"config.json", "model.safetensors.index.json", "transfer_report.json"} | set(TOKENIZER_FILES)
    for p in src_dir.iterdir():
        if p.is_file() and p.name not in skip and not p.name.endswith(".safetensors"):
            if p.name == "generation_config.json":
                gen = json.loads(p.read_text())
                gen.update({k: v for k, v in specials.items() if k in gen or v is not None})
                (out / p.name).write_text(json.dumps(gen, indent=2) + "\n")
            else:
                shutil.copy2(p, out / p.name)
    for name in TOKENIZER_FILES:
        if (tgt_path / name).exists():
            shutil.copy2(tgt_path / name, out / name)

    report = TransferReport(
        out, n_src, target_tok.vocab_size, plan.summary(), plan.random_rows(), plan.specials, copied, time.time() - t0
    )
    (out / "transfer_report.json").write_text(json.dumps({
        "source": str(src_dir), "source_tokenizer": cfg.source_tokenizer, "target_tokenizer": str(tgt_path),
        "init": cfg.init, "head": cfg.head, "seed": cfg.seed, "summary": report.summary,
        "specials": {str(k): v for k, v in report.specials.items()},
        "random_rows": {str(k): v for k, v in report.random_rows.items()},
    }, indent=2, ensure_ascii=False) + "\n")
    return report
