"""Preprocessed documents are what the tokenizer gives at inference, plus EOD: ``<s> text </s>``.

The reference is independent of our wrappers: ``transformers.AutoTokenizer`` on the folder that
tools/train_tokenizer.py exports (both backends), and mistral-common's own Tekkenizer with
``bos=True`` for Tekken. Real text from examples/data/corpus/."""
from __future__ import annotations

import gzip
import io
import json

import pytest

from megatron_normistral.data.indexed import IndexedReader, read_stats_sidecar
from megatron_normistral.data.objective import ObjectiveConfig
from megatron_normistral.data.preprocess import PreprocessConfig, preprocess
from megatron_normistral.testing.tool_runs import run_tool_script
from megatron_normistral.tokenizer import load_tokenizer

from .conftest import LANGS


@pytest.fixture(scope="module")
def documents(corpus) -> list[str]:
    """The first 6 documents of every language (with paragraphs, punctuation, Sámi letters)."""
    docs = []
    for lang in LANGS:
        with gzip.open(corpus[lang], "rt", encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line, _ in zip(f, range(6))]
    return docs


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, documents):
    path = tmp_path_factory.mktemp("bos") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in documents), encoding="utf-8")
    return path


def _preprocess(jsonl, prefix, tokenizer: str, **kw) -> tuple[list[list[int]], str]:
    log = io.StringIO()
    preprocess(PreprocessConfig([str(jsonl)], str(prefix), tokenizer, workers=kw.pop("workers", 0), append_eod=True,
                                progress_interval=0, **kw), log=log)
    r = IndexedReader(prefix)
    return [r[i].tolist() for i in range(r.num_documents)], log.getvalue()


@pytest.mark.parametrize("backend", ["bytelevel", "sentencepiece"])
def test_read_back_equals_auto_tokenizer_plus_eos(tmp_path, small_tokenizers, jsonl, documents, backend):
    from transformers import AutoTokenizer

    folder = small_tokenizers[backend]
    hf = AutoTokenizer.from_pretrained(str(folder))
    expect = [hf(t)["input_ids"] + [hf.eos_token_id] for t in documents]
    assert all(ids[0] == hf.bos_token_id == 1 for ids in expect)  # the exported tokenizer adds <s>
    specs = [str(folder)]
    if (folder / "tokenizer.model").exists():  # the SentencePiece wrapper, with the segment cache
        specs.append(str(folder / "tokenizer.model"))
    for i, spec in enumerate(specs):
        got, log = _preprocess(jsonl, tmp_path / f"out{i}", spec, workers=2)
        assert got == expect, spec
        assert "each document: <s> (id 1) + text + </s> (id 2)" in log
        stats, _ = read_stats_sidecar(tmp_path / f"out{i}")
        assert (stats.bos, stats.eod) == (True, True)


def test_segment_cache_stays_exact_with_bos(tmp_path, small_tokenizers, jsonl):
    spec = str(small_tokenizers["bytelevel"])
    outputs = {}
    for cached in (True, False):
        log = io.StringIO()
        res = preprocess(PreprocessConfig([str(jsonl)], str(tmp_path / str(cached)), spec, workers=0, append_eod=True,
                                          progress_interval=0, segment_cache=cached), log=log)
        assert (res.segment_hits > 0) == cached and res.bos_id == 1
        outputs[cached] = [(tmp_path / f"{cached}{ext}").read_bytes() for ext in (".bin", ".idx")]
    assert outputs[True] == outputs[False]


def test_tekken_read_back_equals_mistral_common_with_bos(tmp_path, jsonl, documents):
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    from megatron_normistral.tokenizer.wrappers import tekken_path

    reference = Tekkenizer.from_file(tekken_path())
    expect = [reference.encode(t, bos=True, eos=False) + [reference.eos_id] for t in documents[::3]]
    sub = tmp_path / "sub.jsonl"
    sub.write_text("".join(line + "\n" for line in jsonl.read_text(encoding="utf-8").splitlines()[::3]), encoding="utf-8")
    got, log = _preprocess(sub, tmp_path / "tekken", "tekken")
    assert got == expect
    assert expect[0][0] == reference.bos_id == 1
    assert "each document: <s> (id 1) + text + </s> (id 2)" in log


def test_no_bos_flag_leaves_it_out_and_says_so(tmp_path, small_tokenizers, jsonl, documents):
    spec = str(small_tokenizers["bytelevel"])
    tok = load_tokenizer(spec)
    out = tmp_path / "nobos"
    p = run_tool_script("preprocess_data", "--input", str(jsonl), "--output-prefix", str(out), "--tokenizer", spec,
                        "--append-eod", "--no-bos", "--workers", "0", "--progress-interval", "0")
    assert p.returncode == 0, p.stderr
    assert "each document: text + </s> (id 2)" in p.stderr
    r = IndexedReader(out)
    assert [r[i].tolist() for i in range(r.num_documents)] == [tok.encode(t) + [tok.eod_id] for t in documents]
    stats, _ = read_stats_sidecar(out)
    assert (stats.bos, stats.eod) == (False, True)
    help_text = run_tool_script("preprocess_data", "--help").stdout
    assert "--no-bos" in help_text and "BOS" in help_text


def test_every_wrapper_has_bos_one_below_the_special_range(small_tokenizers):
    """<s> is never a loss target (causal: targets >= num_special_tokens) and never masked
    (masked mode chooses only ids >= num_special_tokens) for every tokenizer kind we load."""
    limit = ObjectiveConfig().num_special_tokens
    folder = small_tokenizers["sentencepiece"]
    specs = ["tekken", str(small_tokenizers["bytelevel"]), str(folder), str(folder / "tokenizer.model")]
    for spec in specs:
        tok = load_tokenizer(spec)
        assert tok.bos_id == 1 and tok.piece(tok.bos_id) == "<s>" and tok.bos_id < limit, spec
        assert tok.eod_id == 2 and tok.eod_id < limit, spec


def test_tokenizer_without_bos(tmp_path, jsonl, documents):
    """A tokenizer without <s> (GPT-2 style): documents are written without it, the log says
    why, and asking for BOS explicitly is refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.train_from_iterator(documents, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    assert tok.bos_id is None
    got, log = _preprocess(jsonl, tmp_path / "out", str(tmp_path))
    assert got == [tok.encode(t) + [tok.eod_id] for t in documents]
    assert "each document: text + </s> (id 1) (the tokenizer has no BOS)" in log
    assert read_stats_sidecar(tmp_path / "out")[0].bos is False
    with pytest.raises(ValueError, match="has no BOS token"):
        _preprocess(jsonl, tmp_path / "forced", str(tmp_path), bos=True)
