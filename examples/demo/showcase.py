"""Use the exported model with plain `transformers`: generate a Norwegian continuation and fill a
<mask> with the model used bidirectionally. Writes RUN/showcase.json. (The inference-cost
comparison with the source model is tools/evaluate_model.py's, run by the demo's export step.)

    python examples/demo/showcase.py --run-dir runs/demo
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from run_demo import MASK_SENTENCE, MASK_WORD, NORWEGIAN_PROMPT  # noqa: E402


def generate(model, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # BOS added by the tokenizer
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def fill_mask(model, tokenizer, sentence: str, top_k: int = 5) -> list[tuple[str, float]]:
    """Masked next-token prediction: position i predicts token i + 1, so the <mask> at
    position m is read from the output at m - 1, with full (bidirectional) attention."""
    left, right = sentence.split("{mask}")
    ids = tokenizer(left, return_tensors="pt").input_ids[0].tolist()
    mask_pos = len(ids)
    ids += [tokenizer.mask_token_id] + tokenizer(right, add_special_tokens=False).input_ids
    input_ids = torch.tensor([ids])
    # A 4-D mask is used as given by the eager attention: all zeros = everyone sees everyone.
    bidirectional = torch.zeros(1, 1, len(ids), len(ids))
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=bidirectional).logits[0, mask_pos - 1]
    probs = logits.float().softmax(-1)
    top = probs.topk(top_k)
    return [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--run-dir", required=True, help="the demo's run folder")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    torch.manual_seed(0)

    final = AutoModelForCausalLM.from_pretrained(run / "final" / "hf", attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "final" / "hf")

    continuation = generate(final, tokenizer, NORWEGIAN_PROMPT)
    filled = fill_mask(final, tokenizer, MASK_SENTENCE)

    result = {
        "prompt": NORWEGIAN_PROMPT,
        "continuation": continuation,
        "mask_sentence": MASK_SENTENCE,
        "mask_word": MASK_WORD,
        "mask_top5": filled,
    }
    (run / "showcase.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"generate: {NORWEGIAN_PROMPT!r} -> {continuation!r}")
    print(f"fill-mask: {MASK_SENTENCE} -> {filled}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
