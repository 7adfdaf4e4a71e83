"""The whole NorMistral pipeline, small, on CPU: what `make demo` runs.

    python examples/demo/run_demo.py [--run-dir runs/demo] [--fresh] [--smoke]

Every step runs the project's own command-line tools and `torchrun pretrain_normistral.py`,
exactly as on a cluster, only with tiny settings:

  1. prepare    split the bundled corpus (nb nn se sv da en) into train / held-out; tokenize
                the source model's train splits (English and Danish) with Tekken
  2. source     train a tiny Mistral with Tekken's 131,072-entry vocabulary on English-centric
                text, 70% English and 30% Danish (examples/tiny/source_english_danish.yaml):
                the stand-in for Mistral-NeMo-Base-2407, which saw multilingual text (a source
                that knows only English has nothing to transfer); export it to Hugging Face
  3. tokenizer  train the new tokenizer (byte-level BPE, the authors' settings)
  4. fertility  subword tokens per word, Tekken vs the new tokenizer
  5. preprocess tokenize every language with the new tokenizer (indexed .bin/.idx)
  6. transfer   mean-of-pieces embedding transfer, then HF -> megatron-core checkpoint
  7. variants   two other initialisations of the new tokens' rows (same transformer, same
                tokenizer): input embeddings transferred but random LM-head rows (the authors'
                variant), and random rows in both
  8. eval_init  held-out loss per word and masked accuracy of the three initialisations, before
                any training, with tools/evaluate_model.py and stage 2's evaluation settings (it
                equals the training loop's evaluation: tests/tools/test_evaluate_model.py)
  9. stage2     embeddings + LM head only, TP=2 (torchrun, 2 processes)
 10. stage3     everything, hybrid objective, upsampled mixture, PP=2 (torchrun, 2 processes)
 11. export     megatron-core -> Hugging Face; generate Norwegian; fill a <mask>; the exported and
                the source model scored and timed on the same Bokmål words (tools/evaluate_model.py)
 12. report     report.md + PNGs (tools/plot_run.py) in the run folder, the method's claims measured: the
                initialisations compared, a checksum of the transformer weights before and
                after stage 2, English before and after, masked-token accuracy against
                predictors that learned nothing

Finished steps are recorded in RUN/.done/ and skipped when the demo is run again (an
interrupted training step resumes from its last checkpoint); --fresh starts over. With real
weights, step 2 is replaced by Mistral-NeMo-Base-2407 from Hugging Face (see README.md).
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "examples" / "data" / "corpus"
LANGUAGES = ["nb", "nn", "se", "sv", "da", "en"]
SOURCE_RECIPE = "source_english_danish"  # examples/tiny/<name>.yaml: the source model's recipe
NORWEGIAN_PROMPT = "Debian er et fritt operativsystem som"
MASK_SENTENCE = "Du kan installere programmet med {mask} på datamaskinen din."
MASK_WORD = "pakkebehandleren"
# Other initialisations of the new tokens' rows, evaluated before any training beside the
# default (mean of the pieces' rows in both the input embeddings and the LM head):
# name -> (tools/transfer_embeddings.py --init, --head).
INIT_VARIANTS = {
    "head_random": ("mean", "random"),  # input embeddings only, as the authors' script did
    "random": ("random", "random"),     # random rows for every new token
}


@dataclass(frozen=True)
class Scale:
    """Sizes of one demo run. 'full' is what `make demo` runs; 'smoke' is the CI test's."""

    vocab_size: int
    source_iters: int
    stage2_iters: int
    stage3_iters: int
    eval_max_words: int  # held-out words per language: every tokenizer is scored on the same words
    max_docs: int | None  # documents per language (None: all)
    heldout_every: int  # every N-th document is held out
    inference_words: int  # held-out Bokmål words of the inference-cost comparison
    generation_tokens: int  # new tokens generated to time each model


SCALES = {
    "full": Scale(vocab_size=16384, source_iters=40, stage2_iters=40, stage3_iters=100, eval_max_words=8192, max_docs=None, heldout_every=10,
                  inference_words=2000, generation_tokens=64),
    "smoke": Scale(vocab_size=1024, source_iters=3, stage2_iters=2, stage3_iters=3, eval_max_words=500, max_docs=30, heldout_every=5,
                   inference_words=200, generation_tokens=4),
}


class Demo:
    def __init__(self, run_dir: Path, scale: Scale, workers: int):
        self.run = run_dir
        self.scale = scale
        self.workers = workers
        self.done = run_dir / ".done"
        self.logs = run_dir / "logs"
        self.timings: dict[str, tuple[float, float]] = {}  # step -> (wall s, CPU s of the demo and its children)

    # ---- plumbing -----------------------------------------------------------------------
    def step(self, name: str, fn) -> None:
        marker = self.done / name
        if marker.exists():
            wall, _, cpu = marker.read_text().partition(" ")
            self.timings[name] = (float(wall or 0), float(cpu or 0))
            print(f"== {name}: done earlier, reused ({marker})", flush=True)
            return
        print(f"\n== {name}", flush=True)
        started, cpu_started = time.perf_counter(), cpu_seconds()
        fn()
        self.timings[name] = (time.perf_counter() - started, cpu_seconds() - cpu_started)
        self.done.mkdir(parents=True, exist_ok=True)
        marker.write_text("%.1f %.1f" % self.timings[name])
        print("== %s: %.1f s, %.1f CPU s" % (name, *self.timings[name]), flush=True)

    def sh(self, *args: str | Path, log: str) -> None:
        """Run a command from the repository root, streaming its output, also into logs/."""
        cmd = [str(a) for a in args]
        print("$ " + " ".join(cmd), flush=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{log}.log", "a") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore"))
            for line in proc.stdout:
                out.write(line)
                if "warn" not in line.lower():
                    sys.stdout.write(line)
            if proc.wait() != 0:
                sys.exit(f"demo: step failed (exit {proc.returncode}): {' '.join(cmd)}\nfull output: {self.logs / (log + '.log')}")

    def tool(self, name: str, *args, log: str) -> None:
        self.sh(sys.executable, REPO / "tools" / f"{name}.py", *args, log=log)

    def torchrun(self, recipe: Path, *overrides, log: str) -> None:
        self.sh(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                REPO / "pretrain_normistral.py", "--config", recipe, *overrides, log=log)

    def recipe(self, name: str, **changes) -> Path:
        """examples/tiny/<name>.yaml with paths moved into this run folder and the scale's
        sizes applied; written to RUN/recipes/ (the exact recipe each step ran)."""
        text = (REPO / "examples" / "tiny" / f"{name}.yaml").read_text().replace("runs/demo", str(self.run))
        data = yaml.safe_load(text)
        changes.setdefault("evaluation", {})["max_words"] = self.scale.eval_max_words
        if name != SOURCE_RECIPE:
            changes.setdefault("model", {})["vocab_size"] = self.scale.vocab_size
        for section, values in changes.items():
            set_fields(data, section, values)
        out = self.run / "recipes" / f"{name}.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(data, sort_keys=False))
        return out

    # ---- steps --------------------------------------------------------------------------
    def prepare(self) -> None:
        split = self.run / "data" / "split"
        split.mkdir(parents=True, exist_ok=True)
        for lang in LANGUAGES:
            with gzip.open(CORPUS / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
                docs = [line for line in f if line.strip()][: self.scale.max_docs]
            every = self.scale.heldout_every
            (split / f"{lang}_train.jsonl").write_text("".join(d for i, d in enumerate(docs) if i % every != every - 1))
            (split / f"{lang}_heldout.jsonl").write_text("".join(d for i, d in enumerate(docs) if i % every == every - 1))
        for lang in source_languages():  # the source model's training text, tokenized with Tekken
            self.tool("preprocess_data", "--input", split / f"{lang}_train.jsonl", "--output-prefix", self.run / "data" / "tekken" / f"{lang}_text_document",
                      "--tokenizer", "tekken", "--workers", self.workers, "--append-eod", log="prepare")

    def source(self) -> None:
        recipe = self.recipe(SOURCE_RECIPE)
        self.torchrun(recipe, "--train-iters", self.scale.source_iters, log="source")
        self.tool("convert_checkpoint", "mcore-to-hf", "--mcore", self.latest(self.run / "source" / "ckpt"),
                  "--out", self.fresh_dir(self.run / "source" / "hf"), "--dtype", "fp32", log="source")

    def tokenizer(self) -> None:
        split = self.run / "data" / "split"
        self.tool("train_tokenizer", *[a for lang in LANGUAGES for a in ("--input", f"{lang}={split / f'{lang}_train.jsonl'}")],
                  "--vocab-size", self.scale.vocab_size, "--backend", "bytelevel", "--output", self.fresh_dir(self.run / "tokenizer"), log="tokenizer")

    def fertility(self) -> None:
        split = self.run / "data" / "split"
        self.tool("fertility", "--tokenizer", "tekken", "--label", "Tekken (Mistral-NeMo, 131072)",
                  "--tokenizer", self.run / "tokenizer", "--label", f"new ({self.scale.vocab_size})",
                  *[a for lang in LANGUAGES for a in ("--input", f"{lang}={split / f'{lang}_train.jsonl'}")],
                  "--markdown", self.run / "fertility.md", "--plot", self.run / "fertility.png", log="fertility")

    def preprocess(self) -> None:
        split = self.run / "data" / "split"
        for lang in LANGUAGES:
            self.tool("preprocess_data", "--input", split / f"{lang}_train.jsonl", "--output-prefix", self.run / "data" / "normistral" / f"{lang}_text_document",
                      "--tokenizer", self.run / "tokenizer", "--workers", self.workers, "--append-eod", log="preprocess")

    def transfer(self) -> None:
        self.tool("transfer_embeddings", "--source", self.run / "source" / "hf", "--source-tokenizer", "tekken",
                  "--target-tokenizer", self.run / "tokenizer", "--output", self.fresh_dir(self.run / "transferred" / "hf"), log="transfer")
        self.tool("convert_checkpoint", "hf-to-mcore", "--hf", self.run / "transferred" / "hf", "--out", self.fresh_dir(self.run / "transferred" / "mcore"),
                  "--tp", "2", log="transfer")

    def variants(self) -> None:
        """Other initialisations of the new tokens' rows (same source model, same tokenizer):
        variants/<name>/hf."""
        for name, (init, head) in INIT_VARIANTS.items():
            self.tool("transfer_embeddings", "--source", self.run / "source" / "hf", "--source-tokenizer", "tekken",
                      "--target-tokenizer", self.run / "tokenizer", "--init", init, "--head", head,
                      "--output", self.fresh_dir(self.run / "variants" / name / "hf"), log="variants")

    def eval_init(self) -> None:
        """Every initialisation scored before any training on stage 2's held-out words, windows and
        masked spans (its recipe, as the training loop would evaluate it at step 0), in one
        process: logs/eval_init.json (tools/evaluate_model.py --json)."""
        models = [("mean_of_pieces", self.run / "transferred" / "hf")]
        models += [(name, self.run / "variants" / name / "hf") for name in INIT_VARIANTS]
        self.tool("evaluate_model", "--recipe", self.recipe("stage2_embeddings"),
                  *[a for label, hf in models for a in ("--model", hf, "--label", label, "--tokenizer", self.run / "tokenizer")],
                  "--generation-tokens", "0", "--json", self.logs / "eval_init.json", log="eval_init")

    def stage2(self) -> None:
        self.torchrun(self.recipe("stage2_embeddings", checkpoint={"save_interval": self.scale.stage2_iters}), "--train-iters", self.scale.stage2_iters, log="stage2")

    def stage3(self) -> None:
        start = self.run / "stage2" / "ckpt" / f"iter_{self.scale.stage2_iters:07d}"
        recipe = self.recipe("stage3_full", checkpoint={"pretrained": str(start)},
                             schedule={"decay_iters": max(1, self.scale.stage3_iters // 5), "warmup_iters": min(5, self.scale.stage3_iters - 1)})
        self.torchrun(recipe, "--train-iters", self.scale.stage3_iters, log="stage3")

    def export(self) -> None:
        self.tool("convert_checkpoint", "mcore-to-hf", "--mcore", self.latest(self.run / "stage3" / "ckpt"), "--out", self.fresh_dir(self.run / "final" / "hf"),
                  "--tokenizer", self.run / "tokenizer", "--dtype", "fp32", log="export")
        self.sh(sys.executable, REPO / "examples" / "demo" / "showcase.py", "--run-dir", self.run, log="showcase")
        # Inference cost: the exported and the source model on the same held-out Bokmål words,
        # with the metric the training loop reports and greedy generation timed.
        self.tool("evaluate_model", "--model", self.run / "final" / "hf", "--label", "new tokenizer (exported)",
                  "--model", self.run / "source" / "hf", "--label", "source (Tekken)", "--tokenizer", "own", "--tokenizer", "tekken",
                  "--eval", f"nb={self.run / 'data' / 'split' / 'nb_heldout.jsonl'}", "--max-words", self.scale.inference_words,
                  "--seq-length", "128", "--generation-tokens", self.scale.generation_tokens,
                  "--json", self.logs / "inference.json", log="export")

    def report(self) -> None:
        from report import write_report  # examples/demo/report.py

        # Loss, lr, grad norm, throughput and held-out curves of the three trainings, end to end.
        self.tool("plot_run", *[f"{name}={self.logs / f'{name}.jsonl'}" for name in ("source", "stage2", "stage3")],
                  "--out-dir", self.run / "plots", log="report")

        write_report(self.run, self.scale, self.timings, self.run / "recipes" / f"{SOURCE_RECIPE}.yaml")
        print((self.run / "report.md").read_text())

    # ---- helpers ----------------------------------------------------------------------
    @staticmethod
    def latest(ckpt_root: Path) -> Path:
        return ckpt_root / (ckpt_root / "latest").read_text().strip()

    @staticmethod
    def fresh_dir(path: Path) -> Path:
        """A step that is redone overwrites its own output folder."""
        if path.exists():
            shutil.rmtree(path)
        return path


def set_fields(recipe: dict, section: str, values: dict) -> None:
    """Set fields of a recipe's section by their current names, dropping an old spelling of the
    same field that the example recipe may still use (the recipe refuses both at once)."""
    from megatron_normistral.config.fields import old_names
    from megatron_normistral.config.recipe import Recipe

    old_spelling = {new: old for old, new in old_names(type(dict(Recipe().sections())[section])).items()}
    fields = recipe.setdefault(section, {})
    for key, value in values.items():
        fields.pop(old_spelling.get(key), None)
        fields[key] = value


def source_languages() -> list[str]:
    """The languages the source model trains on: those of its recipe's corpora."""
    data = yaml.safe_load((REPO / "examples" / "tiny" / f"{SOURCE_RECIPE}.yaml").read_text())
    return [corpus["language"] for corpus in data["data"]["corpora"]]


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (torchrun's
    workers included): a cost measure that a busy shared machine does not inflate as it does
    wall time."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


STEPS = ("prepare", "source", "tokenizer", "fertility", "preprocess", "transfer", "variants", "eval_init", "stage2", "stage3", "export")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "demo"), help="where everything is written (default runs/demo)")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first and start over")
    parser.add_argument("--smoke", action="store_true", help="far smaller settings (the CI test of this pipeline)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizing processes for preprocessing (default 2)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    scale = SCALES["smoke" if args.smoke else "full"]
    sys.path.insert(0, str(Path(__file__).parent))
    demo = Demo(run_dir, scale, args.workers)
    started = time.perf_counter()
    for name in STEPS:
        demo.step(name, getattr(demo, name))
    demo.report()
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; report: {run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
