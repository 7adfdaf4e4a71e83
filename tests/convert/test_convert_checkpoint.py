"""HF Mistral <-> megatron-core checkpoints, end to end on the tiny architecture (head_dim 32
!= hidden/heads 16, GQA 4 heads / 2 groups), CPU + gloo.

One spawn of 4 processes runs every layout in turn (see ``testing.convert_workers``):
TP2 PP2 loads the converted checkpoint and saves its own; TP2, PP2 and TP1 load the converted
one; PP2, PP2+VPP2 and TP1 load the TP2 PP2 save; the VPP one saves again like a training
checkpoint (with extra non-model keys), which TP1 loads and mcore-to-hf exports.
"""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_normistral.convert import ConversionError, families, hf_mcore, mistral
from megatron_normistral.testing.convert_workers import Step, make_hf_checkpoint, make_tokenizer, run_steps
from megatron_normistral.model.architectures import get_architecture
from megatron_normistral.testing.distributed import run_distributed

def _load_cli():
    # tools/ is not a package: load the script by path.
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint_cli", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_CLI = _load_cli()
build_parser, cli = _CLI.build_parser, _CLI.main

TINY = get_architecture("tiny")
GEN_TOKENS = 6
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def hf_model(work):
    """fp32 tiny Mistral, saved sharded (several files + index) to exercise index reading."""
    state = make_hf_checkpoint(work / "hf", TINY, torch.float32, seed=0, max_shard_size="100KB")
    assert (work / "hf" / "model.safetensors.index.json").exists()
    return state


@pytest.fixture(scope="module")
def mcore_dir(work, hf_model):
    assert cli(["hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mcore"), "--tp", "2", "--pp", "2",
                "--arch", "tiny"]) == 0
    return work / "mcore"


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, TINY.vocab_size, (2, 12), generator=g)


@pytest.fixture(scope="module")
def hf_reference(work, hf_model, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "hf", attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(prompts).logits


@pytest.fixture(scope="module")
def expected_megatron(hf_model):
    """The full TP=1 megatron state dict the mapping makes of the HF weights."""
    out = {}
    for group in mistral.MISTRAL.groups(TINY):
        for m in group.mappings:
            hf = tuple(hf_model[n] for n in m.hf_names(group.layer))
            out[m.megatron_name(group.layer)] = families.hf_to_megatron(TINY, m, group.layer, hf)
    return out


@pytest.fixture(scope="module")
def runs(work, mcore_dir, prompts):
    """All layouts' results by step name."""
    toks = prompts.tolist()
    tp2pp2 = str(work / "saved_tp2pp2")
    vpp = str(work / "saved_vpp_training")
    steps = [
        # 4 processes: layouts with fewer model-parallel ranks run data-parallel replicas.
        Step("tp2pp2", str(mcore_dir), tp=2, pp=2, tokens=toks, generate=GEN_TOKENS, want_weights=True,
             save_dir=tp2pp2),
        Step("tp2", str(mcore_dir), tp=2, tokens=toks),
        Step("pp2", str(mcore_dir), pp=2, tokens=toks),
        Step("pp2<-tp2pp2", tp2pp2, pp=2, want_weights=True),
        Step("pp2vpp2<-tp2pp2", tp2pp2, pp=2, vpp=2, tokens=toks, want_weights=True, save_dir=vpp,
             save_extra_keys=True),
        Step("tp1", str(mcore_dir), tokens=toks, generate=GEN_TOKENS, check_template=True),
        Step("tp1<-tp2pp2", tp2pp2, want_weights=True),
        Step("tp1<-pp2vpp2", vpp, want_weights=True),
        Step("tp2 bf16", str(mcore_dir), tp=2, want_weights=True, bf16=True),
    ]
    results = {step.name: step.outputs for step in run_distributed(run_steps, world_size=4, args=(steps,), timeout_s=300)}
    return results


# ---- conversion checks -----------------------------------------------------------------
def test_cli_help_explains_every_flag():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name, p in sub.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 15, (name, action.dest)


def test_checkpoint_records_architecture(mcore_dir):
    meta = json.loads((mcore_dir / "normistral_model.json").read_text())
    assert meta["arch"]["name"] == "tiny" and meta["arch"]["head_dim"] == 32
    assert meta["layout"] == {"tp": 2, "pp": 2, "vpp": None} and meta["dtype"] == "float32"


def test_conversion_writes_what_a_model_would(runs):
    """The ShardedTensors written without a model equal the TP=1 model's own."""
    assert runs["tp1"]["template_mismatches"] == []


@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2", "tp2pp2", "pp2vpp2<-tp2pp2"])
def test_logits_match_transformers(runs, hf_reference, layout):
    diff = (runs[layout]["logits"] - hf_reference).abs().max().item()
    print(f"\n[parity] {layout}: max |logit diff| vs MistralForCausalLM (eager, fp32) = {diff:.3e} "
          f"(|logits| up to {hf_reference.abs().max().item():.2f})")
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("layout", ["tp2pp2", "pp2<-tp2pp2", "pp2vpp2<-tp2pp2", "tp1<-tp2pp2", "tp1<-pp2vpp2"])
def test_weights_bit_identical_across_layouts(runs, expected_megatron, layout):
    weights = runs[layout]["weights"]
    assert set(weights) == set(expected_megatron)
    different = [n for n, t in expected_megatron.items() if not torch.equal(weights[n], t)]
    assert different == []


def test_fp32_checkpoint_loads_into_bf16_model(runs, expected_megatron):
    weights = runs["tp2 bf16"]["weights"]
    different = [n for n, t in expected_megatron.items()
                 if weights[n].dtype != torch.bfloat16 or not torch.equal(weights[n], t.to(torch.bfloat16))]
    assert different == []


def _read_hf_folder(folder) -> dict:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(folder / f))
    assert set(out) == set(index["weight_map"])
    return out


def test_round_trip_hf_mcore_tp2pp2_hf_is_bit_exact(work, runs, hf_model):
    make_tokenizer(work / "tok", TINY.vocab_size)
    out = work / "hf_back"
    assert cli(["mcore-to-hf", "--mcore", str(work / "saved_tp2pp2"), "--out", str(out), "--tokenizer",
                str(work / "tok"), "--dtype", "fp32", "--max-shard-size", "0.0001"]) == 0
    back = _read_hf_folder(out)
    assert set(back) == set(hf_model)
    different = [n for n, t in hf_model.items() if not (back[n].dtype == t.dtype and torch.equal(back[n], t))]
    assert different == []
    shards = list(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size <= 100_000 + 70_000 for s in shards)  # 100 kB cap (+1 tensor)
    k_name = "model.layers.0.self_attn.k_proj.weight"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with safe_open(out / index["weight_map"][k_name], framework="pt") as f:
        assert f.get_slice(k_name).get_shape() == [64, 64] and f.get_slice(k_name).get_dtype() == "F32"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert tok.convert_ids_to_tokens([1, 2, 5]) == ["<s>", "</s>", "w1"]


def test_export_reads_only_model_keys_of_a_training_checkpoint(work, runs, hf_model):
    out = work / "hf_from_training"
    hf_mcore.mcore_to_hf(work / "saved_vpp_training", out, dtype="fp32")
    back = _read_hf_folder(out)
    assert all(torch.equal(back[n], t) for n, t in hf_model.items())


def test_export_writes_a_model_card_from_the_checkpoint_records(work, runs):
    """README.md in the HF folder: the architecture from config.json, training rows from the
    checkpoint's train_state.json only where the checkpoint has one, licence placeholders."""
    import shutil

    converted = work / "saved_tp2pp2"  # a converted checkpoint: no train state
    assert not (converted / "train_state.json").exists()
    trained = work / "card_trained"
    shutil.copytree(converted, trained, dirs_exist_ok=True)
    state = {"step": 1234, "consumed_samples": 9872, "skipped_steps": 3, "trainable": "full"}
    (trained / "train_state.json").write_text(json.dumps(state))
    for ckpt, out in ((converted, work / "hf_card_converted"), (trained, work / "hf_card_trained")):
        hf_mcore.mcore_to_hf(ckpt, out, dtype="fp32")
    card = (work / "hf_card_trained" / "README.md").read_text()
    config = json.loads((work / "hf_card_trained" / "config.json").read_text())
    assert "## Training" in card
    for row in ("| optimizer steps | 1234 |", "| samples consumed | 9872 |", "| steps skipped (non-finite loss) | 3 |"):
        assert row in card, row
    assert str(config["num_hidden_layers"]) in card and "PLACEHOLDER" in card
    assert "## Training" not in (work / "hf_card_converted" / "README.md").read_text()


def test_greedy_generation_of_exported_model_matches_megatron(work, runs, prompts):
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = work / "hf_gen"
    hf_mcore.mcore_to_hf(work / "saved_tp2pp2", out, dtype="fp32")
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    # No eos: a tiny random model may emit token 2; both sides must run the full length.
    gen = GenerationConfig(do_sample=False, max_new_tokens=GEN_TOKENS, min_new_tokens=GEN_TOKENS, eos_token_id=None,
                           pad_token_id=0)
    with torch.no_grad():
        hf_tokens = model.generate(prompts, generation_config=gen)[:, prompts.shape[1]:].tolist()
    print(f"\n[generate] HF {hf_tokens}\n[generate] megatron tp2pp2 {runs['tp2pp2']['generated']}")
    assert hf_tokens == runs["tp2pp2"]["generated"] == runs["tp1"]["generated"]


def test_bf16_single_file_round_trip(work):
    src = work / "hf_bf16"
    state = make_hf_checkpoint(src, TINY, torch.bfloat16, seed=3)
    assert (src / "model.safetensors").exists() and not (src / "model.safetensors.index.json").exists()
    hf_mcore.hf_to_mcore(src, work / "mcore_bf16")  # stored as fp32 (exact)
    hf_mcore.mcore_to_hf(work / "mcore_bf16", work / "hf_bf16_back", dtype="bf16")
    back = _read_hf_folder(work / "hf_bf16_back")
    assert all(back[n].dtype == torch.bfloat16 and torch.equal(back[n], t) for n, t in state.items())


# ---- progress ----------------------------------------------------------------------------
_PROGRESS = re.compile(r"\[convert\] (embedding|layer (\d+)/4|head) \| (\d+\.\d)% \| elapsed \d+:\d\d:\d\d \| "
                       r"ETA (?:\d+:\d\d:\d\d|-)")


def test_both_directions_print_a_progress_line_per_layer_on_stderr(work, capsys):
    src = work / "hf_progress"
    state = make_hf_checkpoint(src, TINY, torch.float32, seed=4)
    hf_mcore.hf_to_mcore(src, work / "mcore_progress", progress_interval=0)
    hf_mcore.mcore_to_hf(work / "mcore_progress", work / "hf_progress_back", progress_interval=0,
                         write_model_card=False)
    out, err = capsys.readouterr()
    assert "[convert]" not in out  # stdout stays the tools' result
    total = sum(t.numel() for t in state.values())
    embedding = state["model.embed_tokens.weight"].numel()
    shown = [line for line in err.splitlines() if line.startswith("[convert] ")]
    starts = [i for i, line in enumerate(shown) if " groups (embedding, 4 layers, head), " in line]
    assert [shown[i].split(":")[0] for i in starts] == ["[convert] hf-to-mcore", "[convert] mcore-to-hf"]
    for part in (shown[starts[0] + 1:starts[1]], shown[starts[1] + 1:]):
        lines = [line for line in part if " | " in line]
        matches = [_PROGRESS.fullmatch(line) for line in lines]
        assert all(matches), lines
        assert [m.group(1) for m in matches] == ["embedding", "layer 1/4", "layer 2/4", "layer 3/4", "layer 4/4", "head"]
        percentages = [float(m.group(3)) for m in matches]
        # shares of the parameters, not of the groups: the embedding is more than a sixth here
        assert percentages[0] == float(f"{embedding / total:.1%}".rstrip("%")) and percentages[-1] == 100.0
        assert percentages == sorted(percentages) and len(set(percentages)) == 6
        assert lines[-1].endswith("ETA 0:00:00")


def test_cli_quiet_prints_no_progress(work, capsys):
    make_hf_checkpoint(work / "hf_quiet", TINY, torch.float32, seed=5)
    assert cli(["hf-to-mcore", "--hf", str(work / "hf_quiet"), "--out", str(work / "mcore_quiet"), "--quiet"]) == 0
    quiet = capsys.readouterr()
    assert "[convert]" not in quiet.err and quiet.out.startswith("hf-to-mcore: hf: read ")
    assert cli(["mcore-to-hf", "--mcore", str(work / "mcore_quiet"), "--out", str(work / "hf_quiet_back"),
                "--no-model-card"]) == 0
    shown = capsys.readouterr()
    assert "[convert] head | 100.0% |" in shown.err and shown.out.startswith("mcore-to-hf: hf: read ")


# ---- refusals ----------------------------------------------------------------------------
def _variant(work, hf_model, name, edit):
    folder = work / name
    folder.mkdir()
    state = dict(hf_model)
    edit(state)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text((work / "hf" / "config.json").read_text())
    return folder


def test_refuses_wrong_shape_naming_the_tensor(work, hf_model):
    folder = _variant(work, hf_model, "bad_shape",
                      lambda s: s.__setitem__("model.layers.2.mlp.up_proj.weight", torch.zeros(100, 64)))
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.mlp\.up_proj\.weight.*\(100, 64\).*\(128, 64\)"):
        hf_mcore.hf_to_mcore(folder, work / "out_bad_shape")
    assert not (work / "out_bad_shape").exists()  # refused before writing anything


def test_refuses_missing_and_unexpected_tensors(work, hf_model):
    def edit(s):
        s["model.layers.1.self_attn.q_norm.weight"] = torch.ones(32)
        del s["model.layers.0.mlp.down_proj.weight"]

    folder = _variant(work, hf_model, "bad_names", edit)
    with pytest.raises(ConversionError, match=r"missing tensors \['model\.layers\.0\.mlp\.down_proj\.weight'\], "
                                              r"unexpected tensors \['model\.layers\.1\.self_attn\.q_norm\.weight'\]"):
        hf_mcore.hf_to_mcore(folder, work / "out_bad_names")


def test_refuses_mismatched_architecture(work, hf_model, mcore_dir):
    with pytest.raises(ConversionError, match="tiny-tekken.*hidden_size: 128 vs 64"):
        hf_mcore.hf_to_mcore(work / "hf", work / "out_bad_arch", arch_name="tiny-tekken")
    with pytest.raises(ConversionError, match="tiny-tekken"):
        hf_mcore.mcore_to_hf(work / "mcore", work / "out_bad_arch2", arch_name="tiny-tekken")


def test_refuses_layout_the_architecture_cannot_take(work, hf_model):
    with pytest.raises(ValueError, match="layers \\(4\\) not divisible by pipeline size x virtual stages"):
        hf_mcore.hf_to_mcore(work / "hf", work / "out_bad_layout", pp=3)



def test_export_refuses_checkpoint_of_another_shape_naming_the_tensor(work, mcore_dir):
    import shutil

    no_json = work / "mcore_no_json"
    shutil.copytree(mcore_dir, no_json)
    (no_json / "normistral_model.json").unlink()
    with pytest.raises(ConversionError, match=r"not found.*--arch"):
        hf_mcore.mcore_to_hf(no_json, work / "out_no_json")
    with pytest.raises(ConversionError, match=r"'embedding\.word_embeddings\.weight'.*global shape \(256, 64\).*"
                                              r"\(131072, 128\)"):
        hf_mcore.mcore_to_hf(no_json, work / "out_wrong_arch", arch_name="tiny-tekken")
