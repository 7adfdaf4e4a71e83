"""The demo's whole pipeline (make demo) at smoke size: every step runs the real tools and
torchrun, and the report comes out with its tables and figures, and with the method's claims
measured: each row present, carrying numbers, and consistent with the run's own logs and
checkpoints. The source model is English-centric but not English-only (English and Danish), as
the report says: an English-only source gives the transfer nothing to carry."""
import json
import re
import subprocess
import sys

import yaml

from megatron_normistral.testing.tiny_run import REPO

LANGS = ["nb", "nn", "se", "sv", "da", "en"]
NUMBER = r"[-+−]?\d[\d,]*\.\d+"


def _numbers(text: str) -> list[float]:
    return [float(x.replace(",", "").replace("−", "-")) for x in re.findall(NUMBER, text)]


def _last_eval(path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in records if "eval" in r]
    last = max(r["step"] for r in evals)
    return {r["eval"]: r for r in evals if r["step"] == last}


def _check_source_mix(run, report: str) -> None:
    """The source model trained on English and Danish, mostly English: its recipe says so, its
    run's mixture plan gave both corpora samples, and the report describes it that way."""
    corpora = yaml.safe_load((run / "recipes" / "source_english_danish.yaml").read_text())["data"]["corpora"]
    weights = {c["language"]: c["weight"] for c in corpora}
    assert set(weights) == {"en", "da"} and weights["en"] > weights["da"] > 0, weights
    lines = (run / "logs" / "source.log").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Mixture plan"))
    rows = [line.split() for line in lines[start + 3 :] if not line.startswith("-")]
    rows = rows[: next(i for i, r in enumerate(rows) if r[0] == "total")]
    samples = {r[1]: int(r[6].replace(",", "")) for r in rows}  # corpus lang weight share tokens smp/epoch samples
    assert set(samples) == {"en", "da"} and samples["en"] > samples["da"] > 0, samples
    total = sum(weights.values())
    assert f"trained on en {weights['en'] / total:.0%}, da {weights['da'] / total:.0%}" in report
    assert "English only" not in report and "English-only source" not in report


def _check_claims(run, report: str) -> None:
    lines = report.splitlines()

    def row(label: str) -> list[str]:
        line = next((line for line in lines if line.startswith(f"| {label}")), None)
        assert line is not None, f"report has no row {label!r}"
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    def comparison(label: str, lower_is_better: bool, ours: dict, other: dict) -> None:
        """The row states the means of both sides over the languages, a count of languages
        where ours is better, and a verdict that follows from them; the means are those of
        the per-language figures it was computed from."""
        _, measured, verdict = row(label)
        a, b = _numbers(measured)[:2]
        assert abs(a - sum(ours.values()) / len(ours)) < 1e-3 and abs(b - sum(other.values()) / len(other)) < 1e-3, measured
        better = sum((ours[k] < other[k]) if lower_is_better else (ours[k] > other[k]) for k in ours)
        assert f"in {better} of {len(ours)} languages" in measured, measured
        mean_better = a < b if lower_is_better else a > b
        assert verdict == ("yes" if mean_better and better == len(ours) else "partly" if mean_better else "no"), (measured, verdict)

    # The initialisations were scored by tools/evaluate_model.py, on stage 2's held-out words.
    scored = {m["label"]: m["languages"] for m in json.loads((run / "logs" / "eval_init.json").read_text())["models"]}
    loss = {name: {k: r["loss_per_word"] for k, r in scored[name].items()} for name in ("mean_of_pieces", "head_random", "random")}
    stage2_words = {k: r["words"] for k, r in _last_eval(run / "logs" / "stage2.jsonl").items()}
    assert all({k: r["words"] for k, r in languages.items()} == stage2_words for languages in scored.values())
    for name in ("head_random", "random"):  # another initialisation is another model
        assert loss[name].keys() == loss["mean_of_pieces"].keys() == set(LANGS)
        assert all(loss[name][k] != loss["mean_of_pieces"][k] for k in LANGS), f"{name} scored like the transferred model: {loss}"
    comparison("mean-of-pieces rows beat random rows", True, loss["mean_of_pieces"], loss["random"])
    comparison("the mean-of-pieces LM head beats", True, loss["mean_of_pieces"], loss["head_random"])
    for label, key in (("mean of pieces, input embeddings and LM head", "mean_of_pieces"), ("random rows for every new token", "random")):
        assert _numbers(" ".join(row(label)[1:]))[:6] == [round(loss[key][k], 3) for k in LANGS], label

    # Checksums: the verdict is what the two checksums say; stage 2 must leave them equal, and
    # stage 3 (which trains the transformer) must change them, or the checksum sees nothing.
    for label in ("the transfer copies the source model's transformer", "stage 2 leaves every transformer weight"):
        _, measured, verdict = row(label)
        hashes = re.findall(r"`([0-9a-f]{16})`", measured)
        assert verdict == ("identical" if hashes[0] == hashes[1] else "differ"), (measured, verdict)
        assert verdict == "identical", f"{label}: {measured}"
    assert hashes[2] != hashes[1] and measured.endswith("differ)"), measured

    source, final = _last_eval(run / "logs" / "source.jsonl")["en"], _last_eval(run / "logs" / "stage3.jsonl")["en"]
    _, measured, verdict = row("English held-out loss per word")
    assert source["words"] == final["words"] and f"the same {source['words']:,} held-out words" in measured, measured
    difference = final["loss_per_word"] - source["loss_per_word"]
    assert f"source {source['loss_per_word']:.3f}, final {final['loss_per_word']:.3f}" in measured, measured
    assert f"final − source = {difference:+.3f}" in measured, measured
    assert verdict == f"{'worse' if difference > 0 else 'better'} by {abs(difference):.3f}", verdict

    claims = json.loads((run / "claims.json").read_text())
    baselines = claims["masked"]["baselines"]["languages"]
    assert set(baselines) == set(LANGS) and all(b["positions"] > 0 for b in baselines.values())
    # The best constant (chosen with hindsight) is at least as good as any other constant.
    assert all(0 <= b["most_frequent"] <= b["best_constant"] <= 1 and 0 <= b["copy_visible"] <= 1 for b in baselines.values())
    accuracy = {k: r["masked_accuracy"] for k, r in _last_eval(run / "logs" / "stage3.jsonl").items()}
    comparison("the masked mode learns", False, accuracy, {k: b["best_constant"] for k, b in baselines.items()})


def test_demo_pipeline_smoke(tmp_path):
    run = tmp_path / "demo"
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo" / "run_demo.py"), "--smoke", "--fresh", "--run-dir", str(run)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = (run / "report.md").read_text()
    for png in ("plots/loss.png", "plots/lr.png", "plots/eval_loss_per_word.png", "fertility.png"):
        assert (run / png).stat().st_size > 1000, png
        assert f"]({png})" in report, png
    for section in ("## The method's claims, measured", "## Fertility", "## Held-out loss per word", "mixture plan",
                    "## Inference cost", "Greedy continuation", "Fill-mask"):
        assert section in report, section

    def row(label):
        line = next(line for line in report.splitlines() if line.startswith(f"| {label}"))
        return [float(x) for x in re.findall(r"\d+\.\d+", line)]

    before, after = row("transferred, before stage 2"), row("after stage 3")
    assert len(before) == len(after) == 6
    assert after[0] < before[0]  # Bokmål held-out loss per word fell with training
    _check_source_mix(run, report)
    _check_claims(run, report)
    show = json.loads((run / "showcase.json").read_text())
    assert len(show["mask_top5"]) == 5
    # The inference-cost rows are tools/evaluate_model.py's figures for the two exported models.
    new, source = json.loads((run / "logs" / "inference.json").read_text())["models"]
    for model in (new, source):
        nb = model["languages"]["nb"]
        assert nb["words"] == 200 and model["generation"]["new_tokens"] == 4 and nb["generation_s_per_1000_words"] > 0
        assert f"| {model['label']} | {model['parameters'] / 1e6:.1f}M | {nb['tokens_per_word']:.3f} | {nb['loss_per_word']:.3f} |" in report
    assert source["vocab_size"] == 131072 and new["vocab_size"] == 1024
    # Re-running reuses every finished step.
    again = subprocess.run([sys.executable, str(REPO / "examples" / "demo" / "run_demo.py"), "--smoke", "--run-dir", str(run)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done earlier, reused") == 11
