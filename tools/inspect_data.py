#!/usr/bin/env python
"""See what the model is fed (thin CLI over megatron_normistral.reporting.data_inspection).

  corpus   the documents of one or more preprocessed corpora (PREFIX.bin/.idx), decoded with their
           tokenizer; per-corpus document, sequence and token counts; a document-length histogram.
  mixture  the samples of the training mixture at a step and data-parallel rank, built by the
           training loop's own code from a recipe: text, mode (causal/masked), the positions chosen
           in masked mode, document boundaries, token ids; the mixture plan (tokens, samples and
           epochs per corpus) and a document-length histogram of the recipe's corpora.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_normistral.reporting.files import save_json  # noqa: E402
from megatron_normistral.tool_io import run_tool  # noqa: E402

EPILOG = """\
Examples:
  python tools/inspect_data.py corpus --prefix data/nb_text_document --tokenizer tokenizers/normistral-51200 \\
      --first 2 --histogram nb_lengths.png
  python tools/inspect_data.py mixture --config examples/normistral_11b/stage3_full.yaml --step 1000 \\
      --dp-rank 3 --world-size 512 --json step1000_rank3.json
  # recipe flags as pretrain_normistral.py takes them, after --:
  python tools/inspect_data.py mixture --config stage3.yaml --step 5 --dp-rank 0 -- --global-batch-size 64

In the text, ⟦doc k⟧ marks where document k of a sample starts, and ⟨seen→target⟩ a position chosen
in masked mode: what the model sees there (<mask>, a random token, or the token kept) and the token
it predicts (from the position before, as next-token prediction does).
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("corpus", allow_abbrev=False, help="decode documents of preprocessed corpora",
                       description="Counts, decoded documents and a document-length histogram of PREFIX.bin/.idx corpora.")
    c.add_argument("--prefix", action="append", required=True, metavar="[LABEL=]PREFIX",
                   help="a corpus: the path without .bin/.idx, optionally labelled. Repeat for several corpora")
    c.add_argument("--tokenizer", default=None, help="the corpora's tokenizer ('tekken', a SentencePiece .model, or a "
                   "Hugging Face tokenizer folder), to decode documents; without it only token ids are shown")
    c.add_argument("--first", type=int, default=2, help="decode the first N documents of each corpus (default 2)")
    c.add_argument("--document", type=int, action="append", default=None, metavar="I",
                   help="decode document I (0-based) instead of the first ones; repeat for several")

    m = sub.add_parser("mixture", allow_abbrev=False, help="decode the training samples of a step and DP rank",
                       description="The micro-batches a data-parallel rank trains on at a step, as the training loop "
                                   "builds them from the recipe (the mixture index is read from, or built into, the "
                                   "run's data cache as training would).")
    m.add_argument("--config", required=True, help="the run's YAML recipe (as given to pretrain_normistral.py); its "
                   "flags (--global-batch-size, --seed, ...) may follow after --")
    m.add_argument("--step", type=int, required=True,
                   help="the step as the training log numbers it: step N trains on global samples "
                        "(N-1) x global batch ... N x global batch - 1")
    m.add_argument("--dp-rank", type=int, default=0, help="data-parallel rank (default 0)")
    m.add_argument("--world-size", type=int, default=None,
                   help="processes of the run; DP = world size / (TP x PP) of the recipe. Default: TP x PP, i.e. DP 1, "
                        "whose one rank holds the whole global batch")
    m.add_argument("--max-samples", type=int, default=4,
                   help="print the text of the first N samples of the rank's step (default 4; 0: all); counts, JSON "
                        "and the histogram always cover all")

    for sp in (c, m):
        sp.add_argument("--histogram", default=None, metavar="OUT.png", help="write a histogram of tokens per document "
                        "(one line per corpus) to this PNG")
        sp.add_argument("--json", default=None, metavar="OUT.json", help="also write everything shown (token ids, "
                        "modes, masks, document ids, counts) as JSON to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if recipe_flags and args.command != "mixture":
        build_parser().error("recipe flags after -- are for the mixture command only")
    args.recipe_flags = recipe_flags
    from megatron_normistral.config.recipe import RecipeError

    return run_tool(lambda: _corpus(args) if args.command == "corpus" else _mixture(args), also=(RecipeError,))


def _histogram(summaries, path: str | None) -> None:
    from megatron_normistral.reporting.data_inspection import plot_document_lengths

    if path:
        plot_document_lengths(summaries, path)
        print(f"wrote {path} (tokens per document, {len(summaries)} corpora)")


def _print_counts(summaries) -> None:
    print(f"{'corpus':<28} {'documents':>12} {'sequences':>12} {'tokens':>15} {'tokens/doc':>11} {'max doc':>9}  dtype")
    for s in summaries:
        mean = s.tokens / s.documents if s.documents else 0.0
        longest = int(s.document_lengths.max()) if s.documents else 0
        print(f"{s.label:<28} {s.documents:>12,} {s.sequences:>12,} {s.tokens:>15,} {mean:>11.1f} {longest:>9,}  {s.dtype}")


def _corpus(args: argparse.Namespace) -> int:
    from megatron_normistral.reporting.data_inspection import corpus_documents, corpus_summary
    from megatron_normistral.reporting.run_plots import parse_run_argument
    from megatron_normistral.tokenizer import load_tokenizer

    if args.first < 0:
        raise ValueError(f"--first {args.first}: must be >= 0")
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
    summaries = [corpus_summary(prefix, label) for label, prefix in map(parse_run_argument, args.prefix)]
    _print_counts(summaries)
    documents = []
    for s in summaries:
        wanted = args.document if args.document is not None else range(min(args.first, s.documents))
        for doc in corpus_documents(s.prefix, wanted, tokenizer):
            documents.append(doc)
            print(f"\n== {s.label} document {doc['document']} ({doc['tokens']:,} tokens)")
            print(doc["text"] if "text" in doc else " ".join(map(str, doc["ids"])))
    _histogram(summaries, args.histogram)
    if args.json:
        save_json(args.json, {"corpora": [s.to_dict() for s in summaries], "documents": documents})
    return 0


def _mixture(args: argparse.Namespace) -> int:
    from megatron_normistral.config.recipe import parse_recipe
    from megatron_normistral.reporting.data_inspection import corpus_summary, render_sample, step_samples
    from megatron_normistral.tokenizer import load_tokenizer

    if args.max_samples < 0:
        raise ValueError(f"--max-samples {args.max_samples}: must be >= 0")
    recipe, _ = parse_recipe(["--config", args.config, *args.recipe_flags])
    p = recipe.parallel
    world_size = args.world_size or p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    dp_size = p.data_parallel_size(world_size)
    tokenizer = load_tokenizer(recipe.data.tokenizer)
    view = step_samples(recipe, args.step, args.dp_rank, dp_size, tokenizer)
    t = recipe.training
    print(f"\nstep {view.step} (after {view.consumed_samples:,} consumed samples), DP rank {view.dp_rank} of "
          f"{view.dp_size}: {len(view.micro_batches)} micro-batches of {t.micro_batch_size}, global samples "
          f"{view.samples[0]['global_index']:,}..{view.samples[-1]['global_index']:,}, {t.seq_length} tokens each")
    shown = view.samples if args.max_samples == 0 else view.samples[:args.max_samples]
    for s in shown:
        spans = " ".join(f"[{a},{b})" for a, b in s["documents"])
        print(f"\n== sample {s['global_index']:,} (micro-batch {s['micro_batch']}, row {s['row']}): {s['corpus']} "
              f"({s['language']}), {s['mode']}, {int(sum(s['loss_mask']))} scored labels, documents {spans}")
        if s["mode"] == "masked":
            print(f"   masked positions: {' '.join(map(str, s['masked_positions']))}")
        print(render_sample(tokenizer, s))
    if len(shown) < len(view.samples):
        print(f"\n({len(view.samples) - len(shown)} more samples: --max-samples 0 prints all, --json writes all)")
    print(f"\n{'corpus':<28} {'lang':<6} {'samples':>8} {'masked':>7} {'tokens':>10} {'scored':>10}   (this rank, this step)")
    for c in view.corpora:
        print(f"{Path(c['corpus']).name:<28} {c['language']:<6} {c['samples']:>8} {c['masked_samples']:>7} "
              f"{c['tokens']:>10,} {c['scored_tokens']:>10,}")
    prefixes = [c.prefix for c in recipe.data.all_corpora()]
    summaries = [corpus_summary(prefix) for prefix in prefixes] if args.histogram or args.json else []
    _histogram(summaries, args.histogram)
    if args.json:
        for s in view.samples:
            s["text"] = render_sample(tokenizer, s)
        save_json(args.json, {"step": view.step, "dp_rank": view.dp_rank, "dp_size": view.dp_size,
                                "consumed_samples": view.consumed_samples, "samples": view.samples,
                                "step_corpora": view.corpora, "plans": [plan.to_dict() for plan in view.plans],
                                "corpora": [s.to_dict() for s in summaries]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
