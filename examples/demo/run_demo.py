"""The whole NorMistral pipeline, small, on CPU: what `make demo` runs.

    python examples/demo/run_demo.py [--run-dir runs/demo] [--fresh] [--smoke]

Every step runs the project's own command-line tools and `torchrun pretrain_normistral.py`,
exactly as on a cluster, only with tiny settings:

  1. prepare    split the bundled corpus (nb nn se sv da en) into train / held-out; tokenize
                the English train split with Tekken for the source model
  2. source     train a tiny Mistral with Tekken's 131,072-entry vocabulary on English only
                (the stand-in for Mistral-NeMo-Base-2407), export it to Hugging Face format
  3. tokenizer  train the new tokenizer (byte-level BPE, the authors' settings)
  4. fertility  subword tokens per word, Tekken vs the new tokenizer
  5. preprocess tokenize every language with the new tokenizer (indexed .bin/.idx)
  6. transfer   mean-of-pieces embedding transfer, then HF -> megatron-core checkpoint
  7. eval       held-out loss per word of the transferred model, before any training
  8. stage2     embeddings + LM head only, TP=2 (torchrun, 2 processes)
  9. stage3     everything, hybrid objective, upsampled mixture, PP=2 (torchrun, 2 processes)
 10. export     megatron-core -> Hugging Face; generate Norwegian; fill a <mask>; time both models
 11. report     report.md + PNGs in the run folder

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
NORWEGIAN_PROMPT = "Debian er et fritt operativsystem som"
MASK_SENTENCE = "Du kan installere programmet med {mask} på datamaskinen din."
MASK_WORD = "pakkebehandleren"


@dataclass(frozen=True)
class Scale:
    """Sizes of one demo run. 'full' is what `make demo` runs; 'smoke' is the CI test's."""

    vocab_size: int
    source_iters: int
    stage2_iters: int
    stage3_iters: int
    eval_max_tokens: int
    max_docs: int | None  # documents per language (None: all)
    heldout_every: int  # every N-th document is held out


SCALES = {
    "full": Scale(vocab_size=16384, source_iters=40, stage2_iters=40, stage3_iters=100, eval_max_tokens=16384, max_docs=None, heldout_every=10),
    "smoke": Scale(vocab_size=1024, source_iters=3, stage2_iters=2, stage3_iters=3, eval_max_tokens=1024, max_docs=30, heldout_every=5),
}


class Demo:
    def __init__(self, run_dir: Path, scale: Scale, workers: int):
        self.run = run_dir
        self.scale = scale
        self.workers = workers
        self.done = run_dir / ".done"
        self.logs = run_dir / "logs"
        self.timings: dict[str, float] = {}

    # ---- plumbing -----------------------------------------------------------------------
    def step(self, name: str, fn) -> None:
        marker = self.done / name
        if marker.exists():
            self.timings[name] = float(marker.read_text() or 0)
            print(f"== {name}: done earlier, reused ({marker})", flush=True)
            return
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - started
        self.done.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{self.timings[name]:.1f}")
        print(f"== {name}: {self.timings[name]:.1f} s", flush=True)

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
        s = self.scale
        data["evaluation"]["eval_max_tokens"] = s.eval_max_tokens
        if name != "source_english":
            data["model"]["vocab_size"] = s.vocab_size
        for section, values in changes.items():
            data.setdefault(section, {}).update(values)
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
        self.tool("preprocess_data", "--input", split / "en_train.jsonl", "--output-prefix", self.run / "data" / "tekken" / "en_text_document",
                  "--tokenizer", "tekken", "--workers", self.workers, "--append-eod", log="prepare")

    def source(self) -> None:
        recipe = self.recipe("source_english")
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

    def eval_before(self) -> None:
        """The transferred model's held-out loss, before stage 2 (training for 0 steps)."""
        recipe = self.recipe("stage2_embeddings", checkpoint={"save": None, "load": None, "save_interval": None},
                             logging={"log_json": str(self.logs / "eval_before.jsonl")})
        self.torchrun(recipe, "--train-iters", "0", log="eval_before")

    def stage2(self) -> None:
        self.torchrun(self.recipe("stage2_embeddings", checkpoint={"save_interval": self.scale.stage2_iters}), "--train-iters", self.scale.stage2_iters, log="stage2")

    def stage3(self) -> None:
        start = self.run / "stage2" / "ckpt" / f"iter_{self.scale.stage2_iters:07d}"
        recipe = self.recipe("stage3_full", checkpoint={"pretrained_checkpoint": str(start)},
                             schedule={"decay_iters": max(1, self.scale.stage3_iters // 5), "warmup_iters": min(5, self.scale.stage3_iters - 1)})
        self.torchrun(recipe, "--train-iters", self.scale.stage3_iters, log="stage3")

    def export(self) -> None:
        self.tool("convert_checkpoint", "mcore-to-hf", "--mcore", self.latest(self.run / "stage3" / "ckpt"), "--out", self.fresh_dir(self.run / "final" / "hf"),
                  "--tokenizer", self.run / "tokenizer", "--dtype", "fp32", log="export")
        self.sh(sys.executable, REPO / "examples" / "demo" / "showcase.py", "--run-dir", self.run, log="showcase")

    def report(self) -> None:
        from report import write_report  # examples/demo/report.py

        write_report(self.run, self.scale, self.timings)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    for name in ("prepare", "source", "tokenizer", "fertility", "preprocess", "transfer", "eval_before", "stage2", "stage3", "export"):
        demo.step(name, getattr(demo, name))
    demo.report()
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; report: {run_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
