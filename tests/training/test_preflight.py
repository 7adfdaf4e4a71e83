"""Bad inputs are refused before any process group, in one line naming the file or field:
corpora whose .bin/.idx disagree or that hold ids outside the vocabulary, a wrong prefix, a
Hugging Face folder or another architecture as the pretrained checkpoint, a missing eval set,
a tokenizer larger than the model's vocabulary."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import yaml

from megatron_normistral.data.indexed import IndexedDatasetWriter, stats_path
from megatron_normistral.testing.tiny_run import REPO, TOKENIZER_VOCAB, prepare_tiny_data, tiny_recipe
from megatron_normistral.training.preflight import PreflightError, preflight


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("tiny-data"))


def refused(recipe) -> str:
    with pytest.raises(PreflightError) as error:
        preflight(recipe, world_size=1, rank=0)
    message = str(error.value)
    assert "\n" not in message
    return message


def with_corpus_prefix(recipe, prefix: str):
    recipe.data.corpora = [replace(recipe.data.corpora[0], prefix=prefix)] + recipe.data.corpora[1:]
    return recipe


def test_good_inputs_pass(data, tmp_path):
    preflight(tiny_recipe(data, tmp_path), world_size=1, rank=0)


def test_only_rank_0_reads_the_files(data, tmp_path):
    recipe = with_corpus_prefix(tiny_recipe(data, tmp_path), str(tmp_path / "missing"))
    preflight(recipe, world_size=2, rank=1)  # the others wait for rank 0's verdict through the launcher
    refused(recipe)


def test_idx_with_a_larger_bin_from_another_corpus(data, tmp_path):
    nb, nn = data["prefixes"]["nb"], data["prefixes"]["nn"]
    mixed = str(tmp_path / "mixed_text_document")
    shutil.copy(nn + ".idx", mixed + ".idx")
    shutil.copy(nb + ".bin", mixed + ".bin")  # nb is the larger corpus
    message = refused(with_corpus_prefix(tiny_recipe(data, tmp_path), mixed))
    assert f"{mixed}.bin" in message and "was the .bin produced with this .idx?" in message


def test_wrong_corpus_prefix(data, tmp_path):
    message = refused(with_corpus_prefix(tiny_recipe(data, tmp_path), str(tmp_path / "nb_text_document")))
    assert "neither" in message and "tools/preprocess_data.py" in message


@pytest.mark.parametrize("sidecar", [True, False], ids=["sidecar", "scan"])
def test_token_ids_outside_the_vocabulary(data, tmp_path, sidecar):
    prefix = str(tmp_path / "foreign_text_document")
    rng = np.random.default_rng(0)
    docs = [rng.integers(16, TOKENIZER_VOCAB, size=200).tolist() for _ in range(50)]
    docs[37][5] = TOKENIZER_VOCAB + 11  # one id outside the model's vocabulary, deep in the corpus
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_documents(docs)
    if not sidecar:
        os.remove(stats_path(prefix))  # a corpus from another tool: the .bin is scanned
    message = refused(with_corpus_prefix(tiny_recipe(data, tmp_path), prefix))
    assert f"{prefix}.bin holds token id {TOKENIZER_VOCAB + 11}, outside the model's vocabulary of {TOKENIZER_VOCAB}" in message


def test_hugging_face_folder_as_pretrained_checkpoint(data, tmp_path):
    hf = tmp_path / "nemo-hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    (hf / "model.safetensors").write_bytes(b"")
    message = refused(tiny_recipe(data, tmp_path, checkpoint={"pretrained": str(hf)}))
    assert "is a Hugging Face folder" in message and f"tools/convert_checkpoint.py hf-to-mcore --hf {hf}" in message


def test_pretrained_checkpoint_of_another_architecture(data, tmp_path):
    from megatron_normistral.checkpoint.weights import write_model_metadata
    from megatron_normistral.model.architectures import get_architecture

    ckpt = tmp_path / "other-mcore"
    ckpt.mkdir()
    (ckpt / ".metadata").write_bytes(b"")
    write_model_metadata(ckpt, get_architecture("tiny", vocab_size=1024, num_layers=2))
    message = refused(tiny_recipe(data, tmp_path, checkpoint={"pretrained": str(ckpt)}))
    assert "num_layers 2 vs 4" in message and f"vocab_size 1024 vs {TOKENIZER_VOCAB}" in message


def test_missing_eval_set(data, tmp_path):
    recipe = tiny_recipe(data, tmp_path)
    recipe.data.eval_sets = [replace(recipe.data.eval_sets[0], path=str(tmp_path / "heldout_nb.jsonl"))]
    assert "data.eval_sets[0] (nb)" in refused(recipe) and "no such file" in refused(recipe)


def test_tokenizer_larger_than_the_model(data, tmp_path):
    message = refused(tiny_recipe(data, tmp_path, model={"vocab_size": 256}))
    assert f"has {TOKENIZER_VOCAB} entries but the model's vocabulary is 256" in message


def test_refused_in_one_line_before_any_process_group(data, tmp_path):
    recipe = with_corpus_prefix(tiny_recipe(data, tmp_path), str(tmp_path / "nowhere"))
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe.to_dict()))
    # Rank 0 of 2 with no second process: reaching process-group creation would hang, not fail.
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    out = subprocess.run([sys.executable, str(REPO / "pretrain_normistral.py"), "--config", str(config)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().startswith("pretrain_normistral.py: error: data.corpora (nb): corpus prefix")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr[-3000:]


def test_partly_copied_checkpoint_to_resume_from(data, tmp_path):
    from megatron_normistral.testing.distributed import run_distributed
    from megatron_normistral.testing.tiny_run import run_pretrain

    run = tiny_recipe(data, tmp_path / "run", training={"train_iters": 1})
    run_distributed(run_pretrain, 1, args=(run,))
    shard = sorted((tmp_path / "run" / "ckpt" / "iter_0000001").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # an interrupted copy
    message = refused(tiny_recipe(data, tmp_path / "again", checkpoint={"load": str(tmp_path / "run" / "ckpt")}))
    assert message.startswith("--load: checkpoint") and "is incomplete" in message and shard.name in message
