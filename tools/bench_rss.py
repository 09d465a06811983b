"""Does resident memory grow over a long run? Trains a tiny LLaMA on the CPU and fits a line to RSS.

    OMP_NUM_THREADS=1 python -m tools.bench_rss           # llama_tiny, seq_len 16, batch 4, 3000 steps: ~10 min
    python -m tools.bench_rss --steps 10000 --model llama_small
    python -m tools.bench_rss --metrics out/llama_60m/metrics.jsonl   # the slope of a run that already logged

train.py logs `rss_mib` (current resident memory) with every metrics record. The slope is a least-squares
fit over the records after --warmup_frac of the steps, since the first steps fill allocator caches and
load shards. The run evaluates and checkpoints every 500 steps, so those paths count too. RSS swings by tens
of MiB from record to record as the allocator takes and returns memory; the standard error says how far
the slope can be trusted.
"""
import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

import train


def rss_slope(metrics_path: Path, warmup_frac: float) -> dict:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    points = np.array([(r["step"], r["rss_mib"]) for r in records if r.get("rss_mib") is not None])
    last_step = points[-1, 0]
    steady = points[points[:, 0] > warmup_frac * last_step]
    (slope, _), cov = np.polyfit(steady[:, 0], steady[:, 1], 1, cov=True)
    return {"steps": int(last_step), "records fitted": len(steady), "rss at first record (MiB)": points[0, 1],
            "rss after warm-up (MiB)": steady[0, 1], "rss at the end (MiB)": points[-1, 1],
            "peak rss (MiB)": max(r["memory_mib"] for r in records if "memory_mib" in r),
            "slope (MiB per 1000 steps)": 1000 * slope, "its standard error": 1000 * np.sqrt(cov[0, 0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--metrics", type=Path, help="fit this metrics.jsonl instead of training")
    parser.add_argument("--model", default="llama_tiny")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seq_len", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--warmup_frac", type=float, default=0.1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        metrics = args.metrics
        if metrics is None:
            train.main(["--preset", "demo", "--model", args.model, "--out_dir", out_dir, "--device", "cpu",
                        "--seq_len", str(args.seq_len), "--batch_size", str(args.batch_size),
                        "--micro_batch_size", str(args.batch_size), "--max_steps", str(args.steps),
                        "--log_interval", "10", "--eval_interval", "500", "--eval_tokens", "4096",
                        "--ckpt_interval", "500", "--keep_checkpoints", "2"])
            metrics = Path(out_dir) / "metrics.jsonl"
        for key, value in rss_slope(metrics, args.warmup_frac).items():
            print(f"{key:>28}: {value:.3f}" if isinstance(value, float) else f"{key:>28}: {value}")


if __name__ == "__main__":
    main()
