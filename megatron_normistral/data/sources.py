"""Where documents come from: JSON Lines (plain or gzip), parquet files and saved Hugging Face
datasets, named by path or glob. Shared by tools/preprocess_data.py, tools/train_tokenizer.py and
tools/fertility.py.

The kind of an input is told by the input itself (:func:`input_kind`):

- a folder: a dataset written by ``datasets.Dataset.save_to_disk`` (opened with
  ``datasets.load_from_disk``);
- a file named ``*.parquet`` or starting with parquet's magic bytes ``PAR1``: parquet;
- any other file: JSON Lines, one JSON object per line (gzip-compressed when named ``*.gz``
  or starting with gzip's magic bytes; each reader says which rule it uses).

Parquet files and saved datasets are read one record batch at a time and only the text column
(:class:`ColumnReader`), so memory is bounded by a batch (for parquet: by one row group's column
chunk), not by the file. A saved dataset is opened with ``datasets.load_from_disk`` (which checks
the folder and names its Arrow files) but its Arrow files are then streamed from disk instead of
memory-mapped as ``datasets`` does: the pages of a mapping that were read count as the process's
resident memory until the kernel reclaims them, so peak RSS would grow with the corpus.

pyarrow and datasets are optional packages (``pip install -e .[data]``; requirements.txt pins
them): reading such an input without them fails with one line naming the package to install.
Errors are :class:`SourceError` (a ``ValueError``): one line naming the file and what to do.
"""
from __future__ import annotations

import glob as _glob
import os
from pathlib import Path
from typing import Iterator

JSONL, PARQUET, HF_DATASET = "jsonl", "parquet", "hf-dataset"
INPUT_KINDS = (JSONL, PARQUET, HF_DATASET)
PARQUET_MAGIC = b"PAR1"
DEFAULT_BATCH_ROWS = 1024


class SourceError(ValueError):
    """Bad input: an input that cannot be found, opened or read. One line naming the file."""


def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def expand_inputs(patterns: list[str], flag: str = "--input") -> list[str]:
    """Files and folders named or matched, in the order given (each glob sorted). A glob that
    matches nothing and a path that does not exist are errors showing the flag as given
    (``flag`` ending in ``=``, e.g. ``--input nb=``, is written before the value)."""
    def given(value: str) -> str:
        return f"{flag}{value}" if flag.endswith("=") else f"{flag} {value}"

    out: list[str] = []
    for pattern in patterns:
        if is_glob(pattern):
            matched = sorted(_glob.glob(pattern))
            if not matched:
                raise SourceError(f"{given(repr(pattern))} matches no file; check the pattern (quote it so the "
                                  "shell leaves it to the tool)")
            out.extend(matched)
        elif os.path.exists(pattern):
            out.append(pattern)
        else:
            raise SourceError(f"{pattern}: no such file or folder (given as {given(pattern)})")
    return out


def input_kind(path: str | os.PathLike) -> str:
    """:data:`JSONL`, :data:`PARQUET` or :data:`HF_DATASET` (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return HF_DATASET
    if path.suffix == ".parquet":
        return PARQUET
    if not path.is_file():  # a pipe is read once, by the JSON Lines reader: never peek into it
        return JSONL
    try:
        with open(path, "rb") as f:
            return PARQUET if f.read(4) == PARQUET_MAGIC else JSONL
    except OSError:
        return JSONL  # the JSON Lines reader reports the error in its own words


def _require(module: str, what: str):
    """Import an optional package or fail in one line saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise SourceError(f"{what} needs the optional package {package!r}: pip install {package} "
                          f"(or pip install -e .[data]; requirements.txt pins it)") from None


def _is_text_type(pa, arrow_type) -> bool:
    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


class ColumnReader:
    """The text column ``key`` of a parquet file or a saved Hugging Face dataset, in record batches.

    Opening checks that the input is readable and that the column exists and holds text; reading
    (:meth:`batches`) yields ``(first row, 1-based; values, None for a null; UTF-8 bytes of the
    values)``. Rows are counted over the whole input (a saved dataset's Arrow files in order)."""

    def __init__(self, path: str | os.PathLike, key: str, kind: str | None = None):
        self.path, self.key = str(path), key
        self.kind = kind or input_kind(path)
        self._pa = _require("pyarrow", f"reading {self.path} ({self.kind})")
        if self.kind == PARQUET:
            self._open_parquet()
        elif self.kind == HF_DATASET:
            self._open_dataset()
        else:
            raise SourceError(f"{self.path}: not a parquet file or a saved dataset folder")

    # ---- opening ---------------------------------------------------------------------------
    def _open_parquet(self) -> None:
        pq = _require("pyarrow.parquet", f"reading {self.path} (parquet)")
        try:
            self._parquet = pq.ParquetFile(self.path)
            schema = self._parquet.schema_arrow
        except (self._pa.ArrowException, OSError) as e:
            raise SourceError(f"{self.path}: not a readable parquet file ({_first_line(e)}); re-download or "
                              "re-write it") from None
        self.rows = self._parquet.metadata.num_rows
        self._check_column(schema)

    def _open_dataset(self) -> None:
        datasets = _require("datasets", f"reading {self.path} (a saved Hugging Face dataset)")
        try:
            ds = datasets.load_from_disk(self.path, keep_in_memory=False)
        except FileNotFoundError:
            raise SourceError(f"{self.path}: a folder, but not a dataset saved with datasets' save_to_disk (no "
                              "state.json / dataset_info.json); give a file or a saved dataset") from None
        except (self._pa.ArrowException, OSError, ValueError) as e:
            raise SourceError(f"{self.path}: cannot open the saved dataset ({_first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            raise SourceError(f"{self.path}: a DatasetDict with splits {', '.join(splits)}: give one split's "
                              f"folder, e.g. {Path(self.path) / splits[0]}")
        self._arrow_files = [f["filename"] for f in ds.cache_files]
        self.rows = ds.num_rows
        self._check_column(ds.data.schema)

    def _check_column(self, schema) -> None:
        if self.key not in schema.names:
            shown = ", ".join(schema.names[:12]) + (" ..." if len(schema.names) > 12 else "")
            raise SourceError(f"{self.path}: no column {self.key!r} (columns: {shown}); name the text column "
                              f"with --json-key")
        arrow_type = schema.field(self.key).type
        if not _is_text_type(self._pa, arrow_type):
            raise SourceError(f"{self.path}: column {self.key!r} holds {arrow_type}, not text; name the text "
                              f"column with --json-key")

    # ---- reading ---------------------------------------------------------------------------
    def _arrays(self, batch_rows: int) -> Iterator:
        if self.kind == PARQUET:
            for batch in self._parquet.iter_batches(batch_size=batch_rows, columns=[self.key], use_threads=False):
                yield batch.column(0)
            return
        pa = self._pa
        for filename in self._arrow_files:
            with pa.OSFile(filename) as stream:
                reader = pa.ipc.open_stream(stream)
                index = reader.schema.get_field_index(self.key)
                for batch in reader:
                    yield batch.column(index)

    def batches(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[tuple[int, list[str | None], int]]:
        """``(first row, values, UTF-8 bytes)`` per record batch; a read failure is a SourceError
        naming the file and the last row read."""
        import pyarrow.compute as pc

        row = 1
        try:
            for array in self._arrays(batch_rows):
                nbytes = pc.sum(pc.binary_length(array)).as_py() or 0
                values = array.to_pylist()
                yield row, values, nbytes
                row += len(values)
        except (self._pa.ArrowException, OSError) as e:
            where = f"after row {row - 1:,}" if row > 1 else "before its first row"
            raise SourceError(f"{self.path}: read failed {where} ({_first_line(e)}); re-download or re-write "
                              "it") from None
        if row - 1 != self.rows:
            raise SourceError(f"{self.path}: read {row - 1:,} rows, but it declares {self.rows:,}; the "
                              "dataset's files changed or are damaged")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
