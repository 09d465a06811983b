"""One command that measures a GPU: training speed, MFU and peak memory, and the optimizer step alone, SinkGD against
AdamW, on one device and under DeepSpeed.

    python -m tools.bench_gpu out/gpu                      # ~10 minutes on an H100
    python -m tools.bench_gpu out/gpu --data_dir data/c4   # on real shards instead of random tokens

On a machine with one CUDA GPU: for SinkGD and AdamW at llama_60m and llama_130m, bf16, with and without --compile,
train.py runs --steps steps of the paper's batch (512 x 256 tokens); the table gives its median tokens/s and MFU over
the logged intervals after the first (compilation and warm-up) and the peak of torch.cuda.max_memory_allocated. The
optimizer step alone is timed on the model's real parameter split with random gradients (medians of interleaved
repeats). Then `deepspeed --num_gpus 1` with ZeRO-2 on llama_60m, for the same numbers. Prints one markdown table with
the device name and writes it (table.md) and every raw number (results.json) to OUT_DIR. A run that fails is reported
in the table and the others go on. Random GPT-2 token ids are the default data: the speed does not depend on the text.
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import prepare_c4
import train
from model import CONFIGS, Llama
from tools.common import ROOT, device_name, interleaved_medians, read_metrics

SIZES = {"llama_60m": 128, "llama_130m": 64}  # micro-batch per size (the presets'), accumulated to 512 sequences


def random_token_shards(data_dir: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 20_000_000), ("val", 200_000)):
        tokens = rng.integers(0, prepare_c4.VOCAB_SIZE, count, dtype=np.uint16)
        prepare_c4.write_shard(data_dir / f"{split}_000000.bin", tokens)


def training_run(out_dir: Path, data_dir: str, size: str, optimizer: str, compile: bool, steps: int,
                 deepspeed_config: str = "") -> dict:
    """train.py in its own process (or under the deepspeed launcher); its speed, MFU and peak memory."""
    lr = "0.02" if optimizer == "sinkgd" else "0.001"
    args = ["--preset", size, "--data_dir", data_dir, "--max_steps", str(steps),
            "--micro_batch_size", str(SIZES[size]), "--optimizer", optimizer, "--lr", lr, "--log_interval", "5",
            "--eval_interval", str(steps), "--eval_tokens", str(8 * 257), "--ckpt_interval", str(steps),
            "--keep_checkpoints", "1", "--compile", str(compile), "--out_dir", str(out_dir)]
    launcher = [sys.executable]
    if deepspeed_config:
        launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1"]
        args += ["--deepspeed_config", deepspeed_config]
    shutil.rmtree(out_dir, ignore_errors=True)
    proc = subprocess.run(launcher + [str(ROOT / "train.py"), *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    timed = [m for m in read_metrics(out_dir) if "tokens_per_sec" in m][1:]  # the first interval compiles and warms
    return {"tokens_per_sec": statistics.median(m["tokens_per_sec"] for m in timed),
            "mfu": statistics.median(m["mfu"] for m in timed) if "mfu" in timed[0] else None,
            "peak_memory_gib": max(m["memory_mib"] for m in timed) / 1024}


def optimizer_step_ms(size: str, repeats: int) -> dict[str, float]:
    """The optimizer step alone on the model's parameters (SinkGD: the paper's split) with random gradients."""
    steps = {}
    for optimizer in ("sinkgd", "adamw"):
        model = Llama(CONFIGS[size]).cuda()
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        steps[optimizer] = train.build_optimizer(train.TrainConfig(model=size, optimizer=optimizer), model).step
    return {name: 1e3 * s for name, s in interleaved_medians(steps, repeats, "cuda").items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data_dir", help="token shards from prepare_c4.py (default: random tokens)")
    parser.add_argument("--steps", type=int, default=25, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=20, help="timed optimizer steps per optimizer")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("error: tools.bench_gpu measures a CUDA GPU and this machine has none; run it where "
                 "torch.cuda.is_available() is True")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or str(args.out_dir / "tokens")
    if not args.data_dir:
        random_token_shards(Path(data_dir))
    runs = [(size, optimizer, compile, "") for size in SIZES for compile in (False, True)
            for optimizer in ("sinkgd", "adamw")]
    runs += [("llama_60m", optimizer, False, str(ROOT / "ds_config.json")) for optimizer in ("sinkgd", "adamw")]
    results = []
    for size, optimizer, compile, deepspeed_config in runs:
        engine = "deepspeed ZeRO-2" if deepspeed_config else "one device"
        print(f"{size} {optimizer} {engine}{' compile' if compile else ''} ...", flush=True)
        run = training_run(args.out_dir / "runs" / f"{size}_{optimizer}_{compile}_{bool(deepspeed_config)}",
                           data_dir, size, optimizer, compile, args.steps, deepspeed_config)
        results.append({"size": size, "optimizer": optimizer, "compile": compile, "engine": engine} | run)
    step_ms = {size: optimizer_step_ms(size, args.repeats) for size in SIZES}

    lines = [f"{device_name()}, torch {torch.__version__}, bf16, 512 x 256 tokens per step, {args.steps} steps per run"
             f"{', random tokens' if not args.data_dir else ''}\n",
             "| model | engine | compile | optimizer | tokens/s | vs AdamW | MFU | peak GiB | optimizer step ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        same = lambda x: x["size"] == r["size"] and x["engine"] == r["engine"] and x["compile"] == r["compile"]
        adamw = next(x for x in results if same(x) and x["optimizer"] == "adamw")
        if "error" in r:
            lines.append(f"| {r['size']} | {r['engine']} | {r['compile']} | {r['optimizer']} | failed: {r['error']} "
                         "| | | | |")
            continue
        ratio = f"{r['tokens_per_sec'] / adamw['tokens_per_sec']:.3f}" if "error" not in adamw else ""
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "unknown device"
        step = f"{step_ms[r['size']][r['optimizer']]:.1f}" if r["engine"] == "one device" else ""
        lines.append(f"| {r['size']} | {r['engine']} | {r['compile']} | {r['optimizer']} | {r['tokens_per_sec']:,.0f} "
                     f"| {ratio} | {mfu} | {r['peak_memory_gib']:.2f} | {step} |")
    table = "\n".join(lines)
    print(table)
    (args.out_dir / "table.md").write_text(table + "\n")
    (args.out_dir / "results.json").write_text(json.dumps({"device": device_name(), "torch": torch.__version__,
                                                           "runs": results, "optimizer_step_ms": step_ms}, indent=1))


if __name__ == "__main__":
    main()
