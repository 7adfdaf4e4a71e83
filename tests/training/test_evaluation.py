"""Held-out evaluation scores the same words for every tokenizer, packs them as training packs
documents (``<s> text </s>``), and counts every text token exactly once at any micro-batch size."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_normistral.config.recipe import RecipeError
from megatron_normistral.data.indexed import read_stats_sidecar, stats_path
from megatron_normistral.data.objective import ObjectiveConfig
from megatron_normistral.testing.distributed import run_distributed
from megatron_normistral.testing.tiny_run import CORPUS, prepare_tiny_data, read_log, run_pretrain_sequence, tiny_recipe
from megatron_normistral.tokenizer import load_tokenizer
from megatron_normistral.tokenizer.corpus import iter_documents, split_paragraphs
from megatron_normistral.training.batches import SpecialIds
from megatron_normistral.training.data_setup import documents_start_with_bos
from megatron_normistral.training.evaluation import EvalPacking, eval_batches, prepare_eval_data

HELD_OUT = str(CORPUS / "nb.jsonl.gz")  # real text: paragraphs, long documents


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="module")
def tiny_tokenizer(data):
    return load_tokenizer(data["tokenizer"])  # SentencePiece BPE, 512 entries


def _file_words(path: str) -> int:
    return sum(len(p.split()) for text in iter_documents(path) for p in split_paragraphs(text))


def test_every_tokenizer_is_scored_on_the_same_words(tiny_tokenizer):
    tekken = load_tokenizer("tekken")
    whole = str(CORPUS / "se.jsonl.gz")
    for path, budget, words in ((HELD_OUT, 3000, 3000), (whole, 0, _file_words(whole))):
        got = {name: prepare_eval_data("nb", path, tok, EvalPacking(128, max_words=budget, bos_id=tok.bos_id))
               for name, tok in (("tiny", tiny_tokenizer), ("tekken", tekken))}
        assert got["tiny"].words == got["tekken"].words == words
        assert got["tiny"].tokens > 1.5 * got["tekken"].tokens  # very different tokenizers, same text
    # A token cap, by contrast, charges the tokenizers on different words (and says so).
    capped = [prepare_eval_data("nb", HELD_OUT, tok, EvalPacking(128, max_words=3000, max_tokens=2000))
              for tok in (tiny_tokenizer, tekken)]
    assert capped[0].cut_by_max_tokens and capped[1].cut_by_max_tokens
    assert capped[0].words < capped[1].words < 3000


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_windows_hold_the_packed_paragraphs_once(tiny_tokenizer, bos):
    tok = tiny_tokenizer
    packing = EvalPacking(64, max_words=700, bos_id=tok.bos_id if bos else None)
    ev = prepare_eval_data("nb", HELD_OUT, tok, packing)
    paragraphs, left = [], 700
    for text in iter_documents(HELD_OUT):
        for p in split_paragraphs(text):
            if left > 0:
                words = p.split()[:left]
                left -= len(words)
                paragraphs.append(p if left > 0 or len(words) == len(p.split()) else " ".join(words))
    start = [tok.bos_id] if bos else []
    stream = ([] if bos else [tok.eod_id]) + [t for p in paragraphs for t in start + tok.encode(p) + [tok.eod_id]]
    assert stream[0] == (tok.bos_id if bos else tok.eod_id)
    labels = [t for w, n in zip(ev.windows, ev.targets) for t in w[1:1 + n].tolist()]
    assert labels == stream[1:]  # every token after the first is a label exactly once, none dropped
    assert all(len(w) == 65 for w in ev.windows) and all(n == 64 for n in ev.targets[:-1])
    assert ev.words == 700 and ev.tokens == sum(1 for t in stream if t >= packing.num_special_tokens)


def test_eval_batches_count_every_text_token_at_any_micro_batch(tiny_tokenizer):
    tok = tiny_tokenizer
    ev = prepare_eval_data("nb", HELD_OUT, tok, EvalPacking(64, max_words=500, bos_id=tok.bos_id))
    assert len(ev.windows) % 4 and len(ev.windows) % 5  # a tail at micro-batch 4 and 5
    ids = SpecialIds(eod_id=tok.eod_id, mask_id=tok.mask_id, vocab_size=tok.vocab_size, bos_id=tok.bos_id)
    chosen = {}
    for mbs in (1, 4, 5):
        causal = eval_batches(ev, ObjectiveConfig(masked_fraction=0.0), ids, mbs)
        assert all(b["tokens"].shape[0] == mbs for b in causal)  # same shape for every micro-batch (PP)
        assert sum(int(b["loss_mask"].sum()) for b in causal) == ev.tokens
        masked = eval_batches(ev, ObjectiveConfig(masked_fraction=1.0), ids, mbs)
        rows = np.concatenate([b["loss_mask"].numpy() for b in masked])[: len(ev.windows)]
        chosen[mbs] = rows
        assert not np.concatenate([b["loss_mask"].numpy() for b in masked])[len(ev.windows):].any()
    assert np.array_equal(chosen[1], chosen[4]) and np.array_equal(chosen[1], chosen[5]) and chosen[1].sum() > 0


def test_evaluation_packs_as_the_corpora_do(data, tmp_path, tiny_tokenizer):
    """The tiny corpora were preprocessed with the default (BOS): evaluation packs <s> too, and
    <s> must be a special id; corpora that disagree are refused."""
    recipe = tiny_recipe(data, tmp_path)
    assert all(read_stats_sidecar(p)[0].bos for p in data["prefixes"].values())
    assert documents_start_with_bos(recipe, tiny_tokenizer)
    ev = prepare_eval_data("nb", data["heldout"]["nb"], tiny_tokenizer, EvalPacking(64, bos_id=tiny_tokenizer.bos_id))
    stream = np.concatenate([ev.windows[0]] + [w[1:] for w in ev.windows[1:]])[: sum(ev.targets) + 1]  # no padding
    starts = np.nonzero(stream[:-1] == tiny_tokenizer.eod_id)[0] + 1
    assert stream[0] == tiny_tokenizer.bos_id and len(starts) > 5 and (stream[starts] == tiny_tokenizer.bos_id).all()
    with pytest.raises(RecipeError, match=r"its BOS <s> has id 1, not below objective.num_special_tokens 1"):
        documents_start_with_bos(tiny_recipe(data, tmp_path, objective={"num_special_tokens": 1}), tiny_tokenizer)
    # A copy of the nn corpus whose sidecar says "no BOS", beside the nb corpus with BOS: refused.
    nn = data["prefixes"]["nn"]
    for ext in (".bin", ".idx"):
        shutil.copy(nn + ext, tmp_path / f"nn{ext}")
    sidecar = json.loads(Path(stats_path(nn)).read_text())
    Path(stats_path(tmp_path / "nn")).write_text(json.dumps({**sidecar, "bos": False}))
    mixed = dict(data, prefixes={"nb": data["prefixes"]["nb"], "nn": str(tmp_path / "nn")})
    with pytest.raises(RecipeError, match=r"the documents of .*nb_text_document start with <s> \(BOS\), those of "
                                          r".*nn do not"):
        documents_start_with_bos(tiny_recipe(mixed, tmp_path), tiny_tokenizer)


def test_micro_batch_size_does_not_change_the_evaluation(data, tmp_path, tiny_tokenizer):
    """The same model and text at micro-batch 1 and 4 (windows not a multiple of 4): the same
    token count and loss per word; the tail windows are scored, not dropped."""
    packing = EvalPacking(64, max_words=300, bos_id=tiny_tokenizer.bos_id)
    windows = {lang: len(prepare_eval_data(lang, p, tiny_tokenizer, packing).windows) for lang, p in data["heldout"].items()}
    assert all(n % 4 for n in windows.values()), windows
    recipes = [
        tiny_recipe(data, tmp_path / f"mbs{mbs}", training={"train_iters": 0, "micro_batch_size": mbs},
                    evaluation={"max_words": 300}, checkpoint={"save": None, "load": None})
        for mbs in (1, 4)
    ]
    run_distributed(run_pretrain_sequence, 1, args=(recipes,))
    evals = [{r["eval"]: r for r in read_log(recipe.logging.json) if "eval" in r} for recipe in recipes]
    assert set(evals[0]) == set(evals[1]) == set(data["heldout"])
    for lang in data["heldout"]:
        one, four = evals[0][lang], evals[1][lang]
        assert one["words"] == four["words"] == 300
        assert one["tokens"] == four["tokens"]
        assert four["loss_per_word"] == pytest.approx(one["loss_per_word"], rel=1e-5)
        assert four["masked_accuracy"] == pytest.approx(one["masked_accuracy"], abs=1e-9)
