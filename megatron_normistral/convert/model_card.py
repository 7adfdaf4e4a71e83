"""The model card (``README.md``) that ``mcore-to-hf`` writes into the Hugging Face folder.

Nothing in it is invented: every figure is read from a file, and a section whose file is
absent is left out.

- Model: the architecture in the checkpoint's ``normistral_model.json`` and the written
  ``config.json`` (model type, class, dtype).
- Base model: ``--base-model`` as given (checkpoints do not record it); a checkpoint converted
  from Hugging Face names its source folder (``converted_from`` in ``normistral_model.json``).
- Training: the checkpoint's ``train_state.json`` (a training checkpoint's; a converted one has
  none): steps, samples consumed, skipped steps, what was trained at that step, the layout.
- Tokenizer: the tokenizer folder's ``training.json`` (written by tools/train_tokenizer.py:
  backend, vocabulary, sampling, documents and characters per language), else the vocabulary
  of the copied tokenizer; and a fertility table written by ``tools/fertility.py --markdown``
  (``--fertility FILE``), included as it is.
- How to load it with ``transformers``, and the licence, as placeholders marked PLACEHOLDER.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from megatron_normistral.convert.families import ConversionError
from megatron_normistral.convert.safetensors_io import read_json

CARD_FILE = "README.md"
FERTILITY_HEADER = "Fertility (subword tokens per word)."  # the first line tools/fertility.py --markdown writes

# normistral_model.json "arch" fields shown, in this order, with their labels.
_ARCH_ROWS = (
    ("num_layers", "layers"),
    ("hidden_size", "hidden size"),
    ("ffn_hidden_size", "FFN hidden size"),
    ("num_attention_heads", "attention heads"),
    ("num_query_groups", "key/value heads (GQA groups)"),
    ("head_dim", "head dimension"),
    ("vocab_size", "vocabulary size"),
    ("max_position_embeddings", "max position embeddings"),
    ("rope_theta", "RoPE theta"),
    ("norm_eps", "RMSNorm epsilon"),
)
_TRAINABLE = {"full": "all parameters", "embeddings": "the embeddings and the LM head only"}
_LAYOUT = (("tensor_model_parallel_size", "TP"), ("pipeline_model_parallel_size", "PP"),
           ("virtual_pipeline_model_parallel_size", "VPP"), ("data_parallel_size", "DP"))


@dataclass
class ModelCardInputs:
    """What the card is written from (each read from a file by :func:`gather`)."""

    name: str                                  # the output folder's name: the card's title
    checkpoint: str                            # the megatron-core checkpoint folder exported
    model_json: dict                           # normistral_model.json
    hf_config: dict                            # the config.json written
    train_state: dict | None = None            # train_state.json of a training checkpoint
    tokenizer_source: str | None = None        # the --tokenizer folder copied
    tokenizer_training: dict | None = None     # its training.json
    tokenizer_vocab_size: int | None = None    # entries of the copied tokenizer
    fertility_markdown: str | None = None      # tools/fertility.py --markdown output
    fertility_source: str | None = None
    base_model: str | None = None              # --base-model
    sources: list[str] = field(default_factory=list)  # the files read, for the card's last line


def read_fertility(path: str | os.PathLike) -> str:
    """The Markdown of ``tools/fertility.py --markdown``; ConversionError for anything else."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConversionError(f"--fertility {path}: no such file (write it with tools/fertility.py --markdown)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"--fertility {path}: unreadable ({e})") from None
    if not text.startswith(FERTILITY_HEADER):
        raise ConversionError(f"--fertility {path}: not a table written by tools/fertility.py --markdown (its first "
                              f"line starts {FERTILITY_HEADER!r})")
    return text


def gather(checkpoint: Path, hf_dir: Path, hf_config: dict, model_json: dict, tokenizer_dir: Path | None,
           tokenizer_vocab_size: int | None, fertility: str | os.PathLike | None, base_model: str | None,
           name: str) -> ModelCardInputs:
    """Read everything the card says: ``checkpoint``'s ``train_state.json``, the tokenizer's
    training record (as copied into ``hf_dir``), the fertility file. ``model_json``: the
    checkpoint's ``normistral_model.json`` (or the ``--arch`` architecture when it has none)."""
    from megatron_normistral.checkpoint import weights

    inputs = ModelCardInputs(name=name, checkpoint=str(checkpoint), model_json=model_json, hf_config=hf_config,
                             base_model=base_model)
    has_record = (checkpoint / weights.MODEL_JSON).is_file()
    inputs.sources.append(f"{checkpoint.name}/{weights.MODEL_JSON}" if has_record else "the --arch architecture")
    if (checkpoint / "train_state.json").is_file():
        inputs.train_state = read_json(checkpoint / "train_state.json", "the checkpoint's train state")
        inputs.sources.append(f"{checkpoint.name}/train_state.json")
    if tokenizer_dir is not None:
        inputs.tokenizer_source = str(tokenizer_dir)
        inputs.tokenizer_vocab_size = tokenizer_vocab_size
        if (hf_dir / "training.json").is_file():
            inputs.tokenizer_training = read_json(hf_dir / "training.json", "the tokenizer's training record")
            inputs.sources.append("training.json (the tokenizer's, copied here)")
    if fertility is not None:
        inputs.fertility_markdown = read_fertility(fertility)
        inputs.fertility_source = Path(fertility).name
        inputs.sources.append(Path(fertility).name)
    return inputs


def _value(v) -> str:
    """A figure exactly as its JSON file holds it."""
    return json.dumps(v)


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]


def _front_matter(c: ModelCardInputs) -> list[str]:
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "license: other  # PLACEHOLDER: the licence of these weights; set it before publishing"]
    if c.base_model:
        lines.append(f"base_model: {c.base_model}")
    return lines + ["---", ""]


def _model_section(c: ModelCardInputs) -> list[str]:
    arch = c.model_json.get("arch", {})
    cls = ", ".join(c.hf_config.get("architectures", [])) or "?"
    rows = [("architecture", f"`{arch.get('name', '?')}` (Hugging Face `{c.hf_config.get('model_type', '?')}`, "
                             f"`{cls}`)")]
    rows += [(label, _value(arch[key])) for key, label in _ARCH_ROWS if key in arch]
    if "untie_embeddings" in arch:
        rows.append(("input and output embeddings", "separate" if arch["untie_embeddings"] else "tied"))
    if "dtype" in c.hf_config or "torch_dtype" in c.hf_config:
        rows.append(("weights", f"{c.hf_config.get('dtype') or c.hf_config.get('torch_dtype')} (safetensors)"))
    return ["## Model", "", *_table(rows), ""]


def _base_section(c: ModelCardInputs) -> list[str]:
    converted_from = c.model_json.get("converted_from")
    if c.base_model:
        text = f"`{c.base_model}` (as given at export)."
    elif converted_from:
        text = f"The checkpoint was converted from the Hugging Face folder `{converted_from}`."
    else:
        return []
    return ["## Base model", "", text, ""]


def _training_section(c: ModelCardInputs) -> list[str]:
    state = c.train_state
    if state is None:
        return []
    rows = []
    if "step" in state:
        rows.append(("optimizer steps", _value(state["step"])))
    if "consumed_samples" in state:
        rows.append(("samples consumed", _value(state["consumed_samples"])))
    if "skipped_steps" in state:
        rows.append(("steps skipped (non-finite loss)", _value(state["skipped_steps"])))
    trainable = state.get("trainable")
    if trainable:
        rows.append(("trained at this step", f"{_TRAINABLE.get(trainable, trainable)} (`{trainable}`)"))
    layout = state.get("layout") or {}
    parts = [f"{short} {_value(layout[key])}" for key, short in _LAYOUT if layout.get(key) is not None]
    if parts:
        rows.append(("parallel layout at the save", ", ".join(parts)))
    return ["## Training", "", f"From the checkpoint's `train_state.json` (`{Path(c.checkpoint).name}`):", "",
            *_table(rows), ""]


def _sampling_text(sampling: dict) -> str | None:
    if sampling.get("share"):
        text = "characters shared between the languages as " + ", ".join(
            f"{k}={_value(v)}" for k, v in sampling["share"].items())
        text += f", documents drawn in a random order with seed {_value(sampling.get('seed'))}"
        if sampling.get("max_chars") is not None:
            text += f", at most {_value(sampling['max_chars'])} characters"
        return text
    if sampling.get("every"):
        return "every N-th document: " + ", ".join(f"{k}={_value(v)}" for k, v in sampling["every"].items()) + \
            " (other languages: every document)"
    return "every document" if sampling else None


def _tokenizer_section(c: ModelCardInputs) -> list[str]:
    if c.tokenizer_source is None and c.fertility_markdown is None:
        return []
    lines = ["## Tokenizer", ""]
    record = c.tokenizer_training
    if record is not None:
        rows = []
        if "backend" in record:
            rows.append(("kind", f"`{record['backend']}` BPE (tools/train_tokenizer.py)"))
        if "vocab_size" in record:
            rows.append(("vocabulary size", _value(record["vocab_size"])))
        if "normalisation" in record:
            rows.append(("normalisation", record["normalisation"]))
        sampling = _sampling_text(record.get("sampling") or {})
        if sampling:
            rows.append(("training sample", sampling))
        lines += ["From the tokenizer's training record (`training.json`):", "", *_table(rows), ""]
        documents, characters = record.get("documents") or {}, record.get("characters") or {}
        if documents:
            lines += ["| language | documents | characters |", "|---|---:|---:|"]
            lines += [f"| {lang} | {_value(n)} | {_value(characters[lang]) if lang in characters else ''} |"
                      for lang, n in documents.items()]
            lines.append("")
    elif c.tokenizer_vocab_size is not None:
        lines += [f"The tokenizer files copied from `{Path(c.tokenizer_source).name}` "
                  f"({_value(c.tokenizer_vocab_size)} entries); it has no training record.", ""]
    if c.fertility_markdown is not None:
        lines += [f"### Fertility (from `{c.fertility_source}`)", "", c.fertility_markdown.rstrip(), ""]
    return lines


def _usage_section(c: ModelCardInputs) -> list[str]:
    dtype = c.hf_config.get("dtype") or c.hf_config.get("torch_dtype")
    dtype_arg = f", dtype=torch.{dtype}" if dtype in ("bfloat16", "float16", "float32") else ""
    lines = ["## How to load", "", "```python", "import torch",
             "from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if c.tokenizer_source else ""), "",
             f'path = "{c.name}"  # this folder, or its Hugging Face Hub id once uploaded',
             f"model = AutoModelForCausalLM.from_pretrained(path{dtype_arg})"]
    if c.tokenizer_source:
        lines += ["tokenizer = AutoTokenizer.from_pretrained(path)",
                  'inputs = tokenizer("Oslo er", return_tensors="pt")',
                  "print(tokenizer.decode(model.generate(**inputs)[0]))"]
    lines += ["```", ""]
    if not c.tokenizer_source:
        lines += ["No tokenizer was exported with the model (`--tokenizer`): load the one it was trained with.", ""]
    return lines


def _licence_section() -> list[str]:
    return ["## Licence", "",
            "**PLACEHOLDER: fill in before publishing.** The licence of these weights, which must be compatible with "
            "the base model's licence and with the licences of the training data.", "",
            "**PLACEHOLDER: fill in before publishing.** Training data: sources, their licences, and intended use "
            "and limitations.", ""]


def render(c: ModelCardInputs) -> str:
    lines = _front_matter(c)
    lines += [f"# {c.name}", "",
              f"A causal language model exported from the megatron-core checkpoint `{Path(c.checkpoint).name}` by "
              "megatron-normistral (`tools/convert_checkpoint.py mcore-to-hf`). Sections marked PLACEHOLDER are "
              "to be filled in by hand; everything else was read from the files named at the end.", ""]
    for section in (_model_section(c), _base_section(c), _training_section(c), _tokenizer_section(c),
                    _usage_section(c), _licence_section()):
        lines += section
    lines += ["---", "", "Written from: " + ", ".join(f"`{s}`" for s in c.sources) + ", and the `config.json` here.", ""]
    return "\n".join(lines)


def write(hf_dir: Path, inputs: ModelCardInputs) -> Path:
    path = hf_dir / CARD_FILE
    path.write_text(render(inputs), encoding="utf-8")
    return path
