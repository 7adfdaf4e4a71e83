"""The shared core of the C++ helpers (csrc/helpers.h) equals its Python reference
(megatron_normistral.data.reference) primitive by primitive, and the backend names: 'cpp' and
'reference' everywhere, each entry point's old name for the reference still accepted there."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from megatron_normistral import _helpers
from megatron_normistral.data import reference as ref
from megatron_normistral.data.indexed import IndexedDatasetWriter
from megatron_normistral.data.mixture import CorpusSpec, MixtureConfig, build_index_arrays, compute_plan
from megatron_normistral.data.objective import ObjectiveConfig, corrupt, sample_modes

EDGES = [0, 1, 2, 0x9E3779B97F4A7C15, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63, ref.U64 - 1, ref.U64]


def _values(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return EDGES + [int(x) for x in rng.integers(0, 1 << 64, size=n, dtype=np.uint64)]


def test_splitmix64_known_answer():
    # The first outputs of splitmix64 seeded with 0 (state advanced by the gamma each call):
    # a shared typo in the constants would pass a C++ == Python comparison, not this.
    assert ref.splitmix64(0) == _helpers.splitmix64(0) == 0xE220A8397B1DCDAF
    assert ref.splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def test_primitives_cpp_equal_reference_on_ints_and_arrays():
    xs = _values()
    ys = _values(seed=1)
    arr_x, arr_y = np.array(xs, dtype=np.uint64), np.array(ys, dtype=np.uint64)
    sm = [_helpers.splitmix64(x) for x in xs]
    assert [ref.splitmix64(x) for x in xs] == sm
    assert ref.splitmix64(arr_x).tolist() == sm
    dk = [_helpers.derive_key(x, y) for x, y in zip(xs, ys)]
    assert [ref.derive_key(x, y) for x, y in zip(xs, ys)] == dk
    assert ref.derive_key(arr_x, arr_y).tolist() == dk
    dr = [_helpers.draw(x, y) for x, y in zip(xs, ys)]
    assert [ref.draw(x, y) for x, y in zip(xs, ys)] == dr
    assert ref.draw(arr_x, arr_y).tolist() == dr
    bounds = [1, 2, 3, 7, 1000, (1 << 31) + 5, (1 << 32) - 1]
    for n in bounds:
        b32 = [_helpers.bounded32(x, n) for x in xs]
        assert [ref.bounded32(x, n) for x in xs] == b32
        assert ref.bounded32(arr_x, n).tolist() == b32
        assert all(0 <= b < n for b in b32)
    for n in bounds + [1 << 40, ref.U64]:
        b64 = [_helpers.bounded64(x, n) for x in xs]
        assert [ref.bounded64(x, n) for x in xs] == b64
        assert all(0 <= b < n for b in b64)


@pytest.mark.parametrize("labels", [(), (5,), (3, 7), (ref.U64, 0, 1 << 63), (1, 2, 3, 4)])
def test_key_path_cpp_equals_reference(labels):
    for seed in (0, 1234, ref.U64):
        want = _helpers.key_path(seed, *labels)
        assert ref.key_path(seed, *labels) == want
        k = ref.splitmix64(seed)  # the path, one derive_key per label
        for label in labels:
            k = ref.derive_key(k, label)
        assert k == want
    idx = np.arange(50, dtype=np.int64)  # a label array: one key per element
    assert ref.key_path(99, idx, 7).tolist() == [_helpers.key_path(99, int(i), 7) for i in idx]


def test_backend_names_and_old_names():
    assert ref.BACKENDS == ("cpp", "reference")
    assert ref.check_backend("cpp") == "cpp" and ref.check_backend("reference") == "reference"
    assert ref.check_backend("numpy", old_name="numpy") == "reference"
    for bad in ("numpy", "python", "CPP", ""):
        with pytest.raises(ValueError, match=r"^backend must be 'cpp' \(the C\+\+ helpers\) or 'reference'"):
            ref.check_backend(bad)


def test_every_entry_point_takes_reference_and_its_old_name(tmp_path):
    cfg = ObjectiveConfig(masked_fraction=0.5)
    x = np.arange(16, 80)
    modes = {b: sample_modes(cfg.seed, np.arange(64), 0.5, backend=b) for b in ("cpp", "reference", "numpy")}
    assert np.array_equal(modes["cpp"], modes["reference"]) and np.array_equal(modes["cpp"], modes["numpy"])
    out = {b: corrupt(x, 3, cfg, 4, 100, backend=b) for b in ("cpp", "reference", "numpy")}
    for b in ("reference", "numpy"):
        assert all(np.array_equal(a, c) for a, c in zip(out["cpp"], out[b]))
    with pytest.raises(ValueError, match="backend must be 'cpp'"):
        sample_modes(cfg.seed, [0], 0.5, backend="python")  # the writer's old name, never the objective's

    written = {}
    for b in ("cpp", "reference", "python"):
        with IndexedDatasetWriter(tmp_path / b, np.uint16, backend=b) as w:
            w.add_documents([[1, 2, 3], [400, 5]])
        written[b] = (tmp_path / f"{b}.bin").read_bytes() + (tmp_path / f"{b}.idx").read_bytes()
    assert written["cpp"] == written["reference"] == written["python"]
    with pytest.raises(ValueError, match="backend must be 'cpp'"):
        IndexedDatasetWriter(tmp_path / "x", np.uint16, backend="numpy")

    plan = compute_plan(MixtureConfig([CorpusSpec("a", "nb", 1.0), CorpusSpec("b", "en", 2.0)], seq_length=4), 30,
                        corpus_tokens=[41, 29])
    got = [build_index_arrays([(plan, [0, 1])], 5, backend=b) for b in ("cpp", "reference")]
    assert all(np.array_equal(a, c) for a, c in zip(*got))
    with pytest.raises(ValueError, match="backend must be 'cpp'"):
        build_index_arrays([(plan, [0, 1])], 5, backend="numpy")


def test_cli_writer_flags_take_both_names():
    tools = Path(__file__).resolve().parents[2] / "tools"
    spec = importlib.util.spec_from_file_location("preprocess_data_cli", tools / "preprocess_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for name in ("cpp", "reference", "python"):
        args = cli.build_parser().parse_args(["--input", "x", "--output-prefix", "o", "--tokenizer", "t",
                                              "--writer", name])
        assert args.writer == name
