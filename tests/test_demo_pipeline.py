"""The demo's whole pipeline (make demo) at smoke size: every step runs the real tools and
torchrun, and the report comes out with its tables and figures."""
import json
import re
import subprocess
import sys

from megatron_normistral.testing.tiny_run import REPO


def test_demo_pipeline_smoke(tmp_path):
    run = tmp_path / "demo"
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "demo" / "run_demo.py"), "--smoke", "--fresh", "--run-dir", str(run)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = (run / "report.md").read_text()
    for png in ("loss.png", "eval_loss_per_word.png", "fertility.png"):
        assert (run / png).stat().st_size > 1000, png
    for section in ("## Fertility", "## Held-out loss per word", "mixture plan", "## Inference cost", "Greedy continuation", "Fill-mask"):
        assert section in report, section

    def row(label):
        line = next(line for line in report.splitlines() if line.startswith(f"| {label}"))
        return [float(x) for x in re.findall(r"\d+\.\d+", line)]

    before, after = row("transferred, before stage 2"), row("after stage 3")
    assert len(before) == len(after) == 6
    assert after[0] < before[0]  # Bokmål held-out loss per word fell with training
    show = json.loads((run / "showcase.json").read_text())
    assert show["new_tokens"] > 0 and show["source_tokens"] > 0 and len(show["mask_top5"]) == 5
    # Re-running reuses every finished step.
    again = subprocess.run([sys.executable, str(REPO / "examples" / "demo" / "run_demo.py"), "--smoke", "--run-dir", str(run)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done earlier, reused") == 10
