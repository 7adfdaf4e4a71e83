"""Embedding transfer on a tiny random Hugging Face Mistral with the real Tekken vocabulary."""
from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from megatron_normistral.tokenizer.transfer import TransferConfig, plan_transfer, transfer_embeddings
from megatron_normistral.tokenizer.wrappers import byte_level_alphabet, load_tokenizer

from .conftest import REPO

TEKKEN_VOCAB = 131072


def _tiny_mistral(path: Path, dtype=torch.float32, vocab: int = TEKKEN_VOCAB, shard: str | None = None) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MistralConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = transformers.MistralForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # distinct, non-trivial rows
        model.model.embed_tokens.weight.normal_(0, 1)
        model.lm_head.weight.normal_(0, 1)
    model.save_pretrained(path, max_shard_size=shard or "10GB")
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st_:
            for k in st_.keys():
                out[k] = st_.get_tensor(k)
    return out


@pytest.fixture(scope="module")
def tekken():
    return load_tokenizer("tekken")


@pytest.fixture(scope="module")
def source_model(tmp_path_factory):
    return _tiny_mistral(tmp_path_factory.mktemp("src") / "m", shard="3MB")


@pytest.fixture(scope="module")
def transferred(tmp_path_factory, source_model, small_tokenizers):
    root = tmp_path_factory.mktemp("out")
    out = {}
    for backend, tok in small_tokenizers.items():
        cfg = TransferConfig(str(source_model), "tekken", str(tok), str(root / backend), verbose=False)
        out[backend] = (transfer_embeddings(cfg), root / backend)
    return out


@functools.lru_cache(maxsize=4)
def _pieces(tok_dir: Path, backend: str) -> dict[int, str]:
    if backend == "sentencepiece":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
        return {i: sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return {v: k for k, v in vocab.items()}


def _direct_surface(tok_dir: Path, backend: str, i: int) -> bytes:
    """The token's text, computed from the tokenizer files without the library code (for
    byte-level tokens that are part of a multi-byte character this holds U+FFFD)."""
    piece = _pieces(tok_dir, backend)[i]
    if backend == "sentencepiece":
        if piece.startswith("<0x") and len(piece) == 6:
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()
    from tokenizers import decoders

    return decoders.ByteLevel().decode([piece]).encode("utf-8")


@pytest.mark.parametrize("backend", ["bytelevel", "sentencepiece"])
def test_rows_match_direct_computation(transferred, source_model, small_tokenizers, tekken, backend):
    report, out = transferred[backend]
    new, src = _tensors(out), _tensors(source_model)
    tok_dir = small_tokenizers[backend]
    checked = 0
    for i in range(16, 3000, 7):
        surface = _direct_surface(tok_dir, backend, i)
        try:
            text = surface.decode("utf-8")
        except UnicodeDecodeError:  # a byte-fallback piece
            continue
        if "\ufffd" in text:  # part of a multi-byte character: not decodable on its own
            continue
        ids = tekken._tok.encode(text, bos=False, eos=False)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = src[name][ids].double().mean(0).float()
            assert torch.allclose(new[name][i], expected, atol=1e-6), (i, surface, ids)
        checked += 1
    assert checked > 300
    assert report.summary["1 piece"] + report.summary["2 pieces"] + report.summary["3+ pieces"] == 3000 - 16


def test_other_tensors_config_and_files(transferred, source_model, small_tokenizers):
    import transformers

    _, out = transferred["sentencepiece"]
    new, src = _tensors(out), _tensors(source_model)
    assert set(new) == set(src)
    for k in src:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert new[k].shape == (3000, 16) and new[k].dtype == src[k].dtype
        else:
            assert new[k].dtype == src[k].dtype and torch.equal(new[k].view(torch.uint8), src[k].view(torch.uint8)), k
    # sharding kept, index consistent
    src_index = json.loads((source_model / "model.safetensors.index.json").read_text())
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == src_index["weight_map"] and len(set(src_index["weight_map"].values())) > 1
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in new.values())
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (3000, 1, 2, 3)
    for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert (out / f).read_bytes() == (small_tokenizers["sentencepiece"] / f).read_bytes()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    x = torch.tensor([hf_tok("Dette er ein test.")["input_ids"]])
    assert model(x).logits.shape == (1, x.shape[1], 3000)


def test_specials_follow_table(transferred, source_model, tekken):
    report, out = transferred["bytelevel"]
    new, src = _tensors(out), _tensors(source_model)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        s, n = src[name], new[name]
        for target, source in ((0, tekken.unk_id), (1, tekken.bos_id), (2, tekken.eos_id), (3, tekken.pad_id)):
            assert torch.equal(n[target], s[source])
        mean_all = s.double().mean(0).float()
        for i in range(4, 16):
            assert torch.allclose(n[i], mean_all, atol=1e-6)
    assert "mean of all source rows" in report.specials[4] and len(report.specials) == 16


@pytest.fixture(scope="module")
def plans(small_tokenizers, tekken):
    out = {}
    for backend, tok in small_tokenizers.items():
        target = load_tokenizer(tok)
        out[backend] = (target, plan_transfer(tekken, target))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(i=st.integers(16, 2999), backend=st.sampled_from(["bytelevel", "sentencepiece"]))
def test_pieces_spell_the_token(small_tokenizers, tekken, plans, i, backend):
    target, plan = plans[backend]
    surface = target.token_surface(i)
    assert surface == _direct_surface(small_tokenizers[backend], backend, i) or b"\xef\xbf\xbd" in _direct_surface(
        small_tokenizers[backend], backend, i)
    assert b"".join(tekken.token_bytes(t) for t in plan.rows[i].ids) == surface


def test_byte_level_alphabet_matches_tokenizers():
    from tokenizers import pre_tokenizers

    mapping = byte_level_alphabet()
    assert sorted(mapping.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(set(mapping.values())) == 256


def test_init_and_head_options(tmp_path, source_model, small_tokenizers, plans, transferred):
    tok = small_tokenizers["bytelevel"]
    plan = plans["bytelevel"][1]
    src = _tensors(source_model)
    mean_new = _tensors(transferred["bytelevel"][1])
    transfer_embeddings(TransferConfig(str(source_model), "tekken", str(tok), str(tmp_path / "f"),
                                       init="first", head="source", verbose=False))
    first = _tensors(tmp_path / "f")
    transfer_embeddings(TransferConfig(str(source_model), "tekken", str(tok), str(tmp_path / "r"),
                                       init="random", head="random", seed=3, verbose=False))
    rand = _tensors(tmp_path / "r")
    multi = [i for i in range(16, 3000) if len(plan.rows[i].ids) > 1]
    assert len(multi) > 100
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        for i in multi[:50]:
            assert torch.equal(first[name][i], src[name][plan.rows[i].ids[0]])
        r = rand[name][16:]
        assert not torch.allclose(r, mean_new[name][16:])
        assert abs(float(r.std()) - float(src[name].std())) < 0.05 * float(src[name].std())
        assert torch.equal(rand[name][:4], mean_new[name][:4])  # specials still follow the table
    # the default head (mean) differs from the head that follows --init first
    assert not torch.equal(first["lm_head.weight"][multi], mean_new["lm_head.weight"][multi])


def test_bf16_rounds_fp32_mean(tmp_path, small_tokenizers, plans):
    src_dir = _tiny_mistral(tmp_path / "bf16", dtype=torch.bfloat16)
    tok = small_tokenizers["sentencepiece"]
    transfer_embeddings(TransferConfig(str(src_dir), "tekken", str(tok), str(tmp_path / "o"), verbose=False))
    new, src = _tensors(tmp_path / "o"), _tensors(src_dir)
    assert new["lm_head.weight"].dtype == torch.bfloat16 and (tmp_path / "o" / "model.safetensors").exists()
    plan = plans["sentencepiece"][1]
    for i in range(300, 3000, 50):
        ids = list(plan.rows[i].ids)
        expected = src["model.embed_tokens.weight"][ids].float().mean(0).to(torch.bfloat16)
        assert torch.equal(new["model.embed_tokens.weight"][i], expected)


_ROWS = re.compile(r"  (\S+): rows ([\d,]+)/3,000 \| (\d+\.\d)% \| elapsed \d+:\d\d:\d\d \| ETA (?:\d+:\d\d:\d\d|-)")


def test_row_progress_of_each_matrix_on_stderr(tmp_path, source_model, small_tokenizers, capsys):
    tok = str(small_tokenizers["sentencepiece"])  # 3,000 target rows
    transfer_embeddings(TransferConfig(str(source_model), "tekken", tok, str(tmp_path / "every"), chunk_rows=1000,
                                       progress_interval=0))
    every = capsys.readouterr()
    transfer_embeddings(TransferConfig(str(source_model), "tekken", tok, str(tmp_path / "hourly"), chunk_rows=1000,
                                       progress_interval=3600))
    hourly = capsys.readouterr()
    assert "rows" not in every.out + hourly.out  # progress goes to stderr only

    def rows(err: str) -> list[tuple[str, int, float]]:
        lines = [line for line in err.splitlines() if ": rows " in line]
        assert all(_ROWS.fullmatch(line) for line in lines), lines
        return [(m.group(1), int(m.group(2).replace(",", "")), float(m.group(3)))
                for m in map(_ROWS.fullmatch, lines)]

    assert rows(every.err) == [(name, n, pct) for name in ("model.embed_tokens.weight", "lm_head.weight")
                               for n, pct in ((1000, 33.3), (2000, 66.7), (3000, 100.0))]
    # at most a line per interval, and each matrix's last line always
    assert rows(hourly.err) == [("model.embed_tokens.weight", 3000, 100.0), ("lm_head.weight", 3000, 100.0)]


def test_unknown_pieces_fall_back_to_random_and_are_reported(tmp_path, small_tokenizers):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "og", "i", " ", "e", "n", "r", "t", "s"]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    (tmp_path / "wl").mkdir()
    wl.save(str(tmp_path / "wl" / "tokenizer.json"))
    src_dir = _tiny_mistral(tmp_path / "small", vocab=len(words))
    tool = str(REPO / "tools" / "transfer_embeddings.py")
    r = subprocess.run([sys.executable, tool, "--source", str(src_dir), "--source-tokenizer", str(tmp_path / "wl"),
                        "--target-tokenizer", str(small_tokenizers["bytelevel"]), "--output", str(tmp_path / "o"),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "fell back to random rows" in r.stdout and "<unk>" in r.stdout
    rep = json.loads((tmp_path / "o" / "transfer_report.json").read_text())
    target = load_tokenizer(small_tokenizers["bytelevel"])
    assert rep["summary"]["1 piece"] >= 5
    for i in range(16, 3000):
        surface = target.token_surface(i)
        in_vocab = all(part in words for part in re.split("( )", surface.decode("utf-8", "replace")) if part)
        assert (str(i) in rep["random_rows"]) == (not in_vocab), (i, surface)


def test_cli_help_and_errors(tmp_path, small_tokenizers):
    tool = str(REPO / "tools" / "transfer_embeddings.py")
    h = subprocess.run([sys.executable, tool, "--help"], capture_output=True, text=True).stdout
    for s in ("--source", "--source-tokenizer", "--target-tokenizer", "--output", "--init", "--head", "fp32", "<s> <- source bos"):
        assert s in h
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, tool, "--source", str(tmp_path / "empty"), "--source-tokenizer", "tekken",
                        "--target-tokenizer", str(small_tokenizers["bytelevel"]), "--output", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no config.json" in r.stderr
    (tmp_path / "empty" / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, tool, "--source", str(tmp_path / "empty"), "--source-tokenizer", "tekken",
                        "--target-tokenizer", str(small_tokenizers["bytelevel"]), "--output", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no model.safetensors" in r.stderr


_PEAK_SCRIPT = r"""
import resource, sys
sys.path.insert(0, sys.argv[1])
from megatron_normistral.tokenizer.transfer import TransferConfig, transfer_embeddings
transfer_embeddings(TransferConfig(sys.argv[2], "tekken", sys.argv[3], sys.argv[4], verbose=False))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _fake_checkpoint(path: Path, big_tensors: int) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": TEKKEN_VOCAB}))
    gen = torch.Generator().manual_seed(0)
    save_file({"model.embed_tokens.weight": torch.randn(TEKKEN_VOCAB, 16, generator=gen),
               "lm_head.weight": torch.randn(TEKKEN_VOCAB, 16, generator=gen)}, str(path / "model-1.safetensors"))
    weight_map = {"model.embed_tokens.weight": "model-1.safetensors", "lm_head.weight": "model-1.safetensors"}
    for k in range(big_tensors):
        name = f"model.layers.{k}.mlp.weight"
        save_file({name: torch.full((8 << 20,), float(k))}, str(path / f"model-{k + 2}.safetensors"))  # 32 MiB
        weight_map[name] = f"model-{k + 2}.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def test_streams_tensor_by_tensor(tmp_path, small_tokenizers):
    """Peak memory does not grow with the size of the other tensors (6 x 32 MiB vs 1 x 32 MiB)."""
    peaks = {}
    for n in (1, 6):
        src = _fake_checkpoint(tmp_path / f"src{n}", n)
        r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(REPO), str(src),
                            str(small_tokenizers["bytelevel"]), str(tmp_path / f"out{n}")],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        peaks[n] = int(r.stdout.split()[-1]) * 1024
        out = _tensors(tmp_path / f"out{n}")
        assert float(out[f"model.layers.{n - 1}.mlp.weight"][123]) == float(n - 1)
    assert peaks[6] - peaks[1] < 48 << 20, peaks
