"""Corpora written as ``<s> text </s>`` through the training data path: ``<s>`` is never a loss
target and never masked, and it opens its own document's attention block; the sidecar's
format fields survive merges (and mixed formats are refused)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from megatron_normistral.data.indexed import IndexedDatasetWriter, merge_indexed, read_stats_sidecar, stats_path
from megatron_normistral.data.mixture import CorpusSpec, MixtureConfig, MixtureDataset
from megatron_normistral.data.objective import ObjectiveConfig, build_batch
from megatron_normistral.data.preprocess import PreprocessConfig, preprocess


def _bos_corpus(tmp_path, spm_model, corpus_texts, append_eod: bool) -> str:
    src = tmp_path / "nb.jsonl"
    # Short and long documents, so windows hold several document starts.
    texts = [t[: 50 + 11 * i] for i, t in enumerate(corpus_texts["nb"][:40])]
    src.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    prefix = str(tmp_path / ("nb_eod" if append_eod else "nb"))
    preprocess(PreprocessConfig([str(src)], prefix, spm_model, workers=0, append_eod=append_eod, progress_interval=0),
               log=io.StringIO())
    stats, _ = read_stats_sidecar(prefix)
    assert (stats.bos, stats.eod) == (True, append_eod)
    return prefix


@pytest.mark.parametrize("append_eod", [True, False], ids=["bos+eod", "bos-only"])
def test_bos_is_never_a_target_and_starts_its_own_block(tmp_path, spm_model, tokenizer, corpus_texts, append_eod):
    bos, eod, mask = tokenizer.bos_id, tokenizer.eod_id, 4
    prefix = _bos_corpus(tmp_path, spm_model, corpus_texts, append_eod)
    ds = MixtureDataset(MixtureConfig([CorpusSpec(prefix, "nb", 1.0, 100)], seq_length=48, seed=3), 64, verbose=False)
    cfg = ObjectiveConfig(masked_fraction=0.5, mask_rate=0.5, seed=11)
    assert bos < cfg.num_special_tokens
    bos_labels = starts = masked_rows = 0
    for first in range(0, 64, 8):
        idx = list(range(first, first + 8))
        samples = [np.asarray(ds[g]["tokens"]) for g in idx]
        batch = build_batch(samples, idx, cfg, eod_id=eod, mask_id=mask, vocab_size=tokenizer.vocab_size, bos_id=bos)
        tokens, labels = batch["tokens"].numpy(), batch["labels"].numpy()
        loss_mask, docs = batch["loss_mask"].numpy(), batch["document_ids"].numpy()
        original = np.stack(samples)[:, :-1]
        at_bos = labels == bos
        bos_labels += int(at_bos.sum())
        assert not loss_mask[at_bos].any()  # never a loss target, causal or masked rows
        assert (tokens[original == bos] == bos).all()  # never replaced by <mask> or a random token
        masked_rows += int(batch["masked"].sum())
        # Every <s> after the first position opens a new block, which its document's next token shares.
        rows, cols = np.nonzero(original[:, 1:] == bos)
        cols += 1
        starts += len(cols)
        assert (docs[rows, cols] == docs[rows, cols - 1] + 1).all()
        inside = cols + 1 < docs.shape[1]
        assert (docs[rows[inside], cols[inside] + 1] == docs[rows[inside], cols[inside]]).all()
        # With EOD the block ends at the EOD: the token after it (the next <s>) is in the next block.
        if append_eod:
            r, c = np.nonzero(original[:, :-1] == eod)
            assert (docs[r, c + 1] == docs[r, c] + 1).all()
            assert (original[r, c + 1] == bos).all()
    assert bos_labels > 10 and starts > 10 and masked_rows > 0  # the checks above did meet <s>


def _dataset(prefix, bos: bool | None) -> str:
    with IndexedDatasetWriter(prefix, np.uint16, bos=bos, eod=True) as w:
        w.add_documents([[1, 20, 21, 2]] if bos else [[20, 21, 2]])
    return str(prefix)


def test_merge_keeps_or_refuses_the_document_format(tmp_path):
    a, b = _dataset(tmp_path / "a", True), _dataset(tmp_path / "b", True)
    merge_indexed([a, b], tmp_path / "ab")
    stats, _ = read_stats_sidecar(tmp_path / "ab")
    assert (stats.bos, stats.eod) == (True, True)
    c = _dataset(tmp_path / "c", False)
    with pytest.raises(ValueError, match=r"the documents of .*a start with <s> \(BOS\), those of .*c do not"):
        merge_indexed([a, c], tmp_path / "ac")
    # An input whose sidecar does not state it (written before these fields): unknown, not refused.
    old = json.loads(open(stats_path(c)).read())
    del old["bos"], old["eod"]
    open(stats_path(c), "w").write(json.dumps(old))
    assert read_stats_sidecar(c)[0].bos is None
    merge_indexed([a, c], tmp_path / "ac")
    assert read_stats_sidecar(tmp_path / "ac")[0].bos is None
