#!/usr/bin/env python
"""Peak RSS of tools/convert_checkpoint.py on a model large enough for streaming to show.

    .venv/bin/python benchmarks/convert_memory.py [--layers 8 --hidden 1024 --work /tmp/convert_memory]

Writes a random bf16 HF Mistral checkpoint (hidden 1024, 8 layers, 16 heads / 4 KV groups,
head_dim 128 != hidden/heads as in NeMo, FFN 4096, vocab 32768: ~0.2 B params), converts it
to megatron-core and back, and reports the peak RSS of each conversion. For contrast it also
measures the simple way (whole HF state dict -> whole TP=1 GPTModel -> one
``dist_checkpointing.save``).

Each conversion runs in a fresh process (this script with ``--child``) that first imports
everything and starts its process group, then resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), converts, and reports ``VmHWM``: "peak - start" is the memory the
conversion itself held. Compare it with the model size and with one group's size.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MB = 1024**2


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def child(argv: list[str]) -> None:
    """Run one conversion; print start RSS, peak RSS and wall time as JSON."""
    import importlib.util

    import megatron.core.dist_checkpointing  # noqa: F401  (imported before the measurement)
    import transformers  # noqa: F401

    from megatron_normistral.convert import hf_mcore, mcore_io  # noqa: F401

    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    with mcore_io.single_process_world():  # the tool reuses this process group
        start = _status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        t = time.time()
        if argv[0] == "whole-model":
            whole_model_save(*argv[1:])
        else:
            tool.main(argv)
        print(json.dumps({"start": start, "peak": _status_mb("VmHWM"), "wall": time.time() - t}))


def whole_model_save(hf_dir: str, like_ckpt: str, out: str) -> None:
    """The simple conversion, for contrast: everything in memory at once."""
    from safetensors.torch import load_file

    from megatron_normistral.checkpoint import weights
    from megatron_normistral.convert import families
    from megatron_normistral.model.provider import PrecisionConfig, build_model
    from megatron_normistral.model.sharding import load_full_state_dict
    from megatron_normistral.runtime import parallel

    index = json.loads((Path(hf_dir) / "model.safetensors.index.json").read_text())
    hf = {}
    for f in sorted(set(index["weight_map"].values())):
        hf.update(load_file(Path(hf_dir) / f))
    pc = parallel.ParallelConfig()
    parallel.init_model_parallel(pc)
    model_config = weights.model_config_from_checkpoint(like_ckpt)
    arch = model_config.architecture()
    chunks = build_model(model_config, pc, PrecisionConfig(), max_sequence_length=4096)
    full = {m.megatron_name(g.layer): families.hf_to_megatron(arch, m, g.layer, tuple(hf[n] for n in m.hf_names(g.layer)))
            for g in families.family_of(arch).groups(arch) for m in g.mappings}
    load_full_state_dict(chunks, full)
    weights.save_model_checkpoint(chunks, out, model_config)


def peak_rss_mb(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *argv], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_hf_checkpoint(directory: Path, arch) -> None:
    """Random weights, written tensor by tensor (the model is never built here)."""
    import torch

    from megatron_normistral.convert import families, hf_config_from_arch
    from megatron_normistral.convert.safetensors_io import PlannedTensor, ShardedSafetensorsWriter

    torch.manual_seed(0)
    plan = [PlannedTensor(name, shape_fn(arch), torch.bfloat16) for group in families.family_of(arch).groups(arch)
            for m in group.mappings for name, shape_fn in zip(m.hf_names(group.layer), m.hf_shapes)]
    writer = ShardedSafetensorsWriter(directory, plan, max_shard_bytes=200 * 1000**2)
    for p in plan:
        writer.add(p.name, (torch.randn(p.shape) * 0.02).to(torch.bfloat16))
    writer.close()
    (directory / "config.json").write_text(json.dumps(hf_config_from_arch(arch, dtype="bfloat16"), indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="number of decoder layers (default 8)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024; FFN is 4x)")
    parser.add_argument("--work", default="/tmp/convert_memory", help="scratch folder (deleted first)")
    args = parser.parse_args()

    from megatron_normistral.model.architectures import ArchConfig

    arch = ArchConfig(name="bench", num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=16,
                      num_query_groups=4, head_dim=128, ffn_hidden_size=4 * args.hidden, vocab_size=32768)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_hf_checkpoint(work / "hf", arch)

    runs = {
        "hf-to-mcore (fp32 out)": ["hf-to-mcore", "--hf", str(work / "hf"), "--out", str(work / "mcore")],
        "mcore-to-hf (bf16, 5 GB shards)": ["mcore-to-hf", "--mcore", str(work / "mcore"), "--out", str(work / "hf_back")],
        "mcore-to-hf (bf16, 0.1 GB shards)": ["mcore-to-hf", "--mcore", str(work / "mcore"), "--out",
                                              str(work / "hf_back_small"), "--max-shard-size", "0.1"],
        "whole model, one save (contrast)": ["whole-model", str(work / "hf"), str(work / "mcore"),
                                             str(work / "mcore_whole")],
    }
    fp32 = 4
    layer_mb = arch.layer_parameters() * fp32 / MB
    emb_mb = arch.vocab_size * arch.hidden_size * fp32 / MB
    model_mb = arch.num_parameters() * fp32 / MB
    print(f"model: {arch.num_parameters() / 1e6:.1f} M params = {model_mb:.0f} MiB fp32 ({model_mb / 2:.0f} MiB bf16); "
          f"one layer {layer_mb:.0f} MiB fp32, embedding (or head) {emb_mb:.0f} MiB fp32")
    for name, argv in runs.items():
        r = peak_rss_mb(argv)
        held = r["peak"] - r["start"]
        print(f"{name:36s} RSS at start {r['start']:5.0f} MiB, peak {r['peak']:5.0f} MiB: conversion held "
              f"{held:4.0f} MiB = {held / model_mb:.2f} x fp32 model = {held / (layer_mb + emb_mb):.2f} x "
              f"(fp32 layer + embedding)  [{r['wall']:.1f} s]")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
    else:
        main()
