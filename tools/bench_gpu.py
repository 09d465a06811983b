"""One command that measures a GPU: training speed, MFU and peak memory, and the optimizer step alone, SinkGD against
AdamW, on one device and under DeepSpeed; each row kept on disk as soon as it is measured.

    python -m tools.bench_gpu out/gpu                      # on a machine with one CUDA GPU: the whole table
    python -m tools.bench_gpu out/gpu --budget_s 500       # what fits in 500 s; the same command again, the rest
    python -m tools.bench_gpu out/gpu --only llama_60m-sinkgd-eager llama_60m-adamw-eager
    python -m tools.bench_gpu out/gpu --data_dir data/c4   # on real shards instead of random tokens
    python -m tools.bench_gpu out/smoke --smoke            # every code path on the CPU, tiny model (the tests run it)

On a machine with one CUDA GPU: for SinkGD and AdamW at llama_60m and llama_130m, bf16, with and without --compile,
train.py runs --steps steps of the paper's batch (512 x 256 tokens); a row gives its median tokens/s and MFU over
the logged intervals after the first (compilation and warm-up) and the peak of torch.cuda.max_memory_allocated. The
optimizer step alone is timed on the model's real parameter split with random gradients (medians of interleaved
repeats). Then `deepspeed --num_gpus 1` with ZeRO-2 on llama_60m, for the same numbers.

The results land in OUT_DIR (out/gpu above): table.md (the markdown table, also printed at the end), results.json
(the numbers and the set-up), logs/ROW.log (each row's output). Each row is a fresh process; as it ends, its numbers
(or its failure, and the others go on) are added to results.json and table.md is rewritten, so a kill part-way keeps
every finished row. A rerun skips the rows results.json holds (failed ones are tried again). With --budget_s, a row is
not started unless it is estimated to end in time (from the longest recorded row of its kind) and is stopped at the
budget. Training runs write their checkpoints to a temporary folder that is deleted. Random GPT-2 token ids are the
default data: the speed does not depend on the text.
"""
import argparse
import importlib.metadata
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import prepare_c4
import train
from model import CONFIGS, Llama
from tools.common import ROOT, device_name, interleaved_medians, read_metrics


@dataclass(frozen=True)
class Mode:
    device: str
    sizes: dict  # model -> micro-batch size (the presets'), accumulated to batch_size sequences
    batch_size: int
    seq_len: int
    dtype: str
    compiles: tuple
    log_interval: int
    steps: int
    repeats: int
    train_tokens: int


GPU = Mode("cuda", {"llama_60m": 128, "llama_130m": 64}, 512, 256, "bfloat16", (False, True), 5, 25, 20, 20_000_000)
SMOKE = Mode("cpu", {"llama_tiny": 4}, 8, 32, "float32", (False,), 1, 3, 3, 100_000)
# Seconds a row of each kind is guessed to take on a GPU until one of its kind has been measured (then: the longest).
FIRST_ESTIMATE_S = {"eager": 90, "compile": 180, "zero2": 150, "step": 60}


@dataclass(frozen=True)
class Row:
    size: str
    optimizer: str = ""  # "" for the optimizer-step row, which times both
    kind: str = "eager"  # eager, compile, zero2 (deepspeed --num_gpus 1, ZeRO-2) or step (the optimizer step alone)

    @property
    def name(self) -> str:
        return "-".join(filter(None, (self.size, self.optimizer, self.kind)))


def rows_of(mode: Mode) -> list[Row]:
    rows = [Row(size, optimizer, "compile" if compile else "eager") for size in mode.sizes for compile in mode.compiles
            for optimizer in ("sinkgd", "adamw")]
    first = next(iter(mode.sizes))
    return rows + [Row(first, optimizer, "zero2") for optimizer in ("sinkgd", "adamw")] + [Row(s, "", "step")
                                                                                            for s in mode.sizes]


def random_token_shards(data_dir: Path, train_tokens: int) -> None:
    if (data_dir / "val_000000.bin").exists():  # written last (each shard atomically): an earlier run made them
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", train_tokens), ("val", max(10_000, train_tokens // 100))):
        prepare_c4.write_shard(data_dir / f"{split}_000000.bin", rng.integers(0, prepare_c4.VOCAB_SIZE, count,
                                                                              dtype=np.uint16))


def training_command(mode: Mode, row: Row, data_dir: str, run_dir: Path) -> list[str]:
    lr = "0.02" if row.optimizer == "sinkgd" else "0.001"
    args = ["--preset", row.size, "--data_dir", data_dir, "--out_dir", str(run_dir), "--device", mode.device,
            "--dtype", mode.dtype, "--max_steps", str(mode.steps), "--batch_size", str(mode.batch_size),
            "--seq_len", str(mode.seq_len), "--micro_batch_size", str(mode.sizes[row.size]),
            "--optimizer", row.optimizer, "--lr", lr, "--log_interval", str(mode.log_interval),
            "--eval_interval", str(mode.steps), "--eval_tokens", str(8 * (mode.seq_len + 1)),
            "--keep_checkpoints", "1", "--compile", str(row.kind == "compile")]
    if row.kind == "zero2":  # no launcher: train.py runs DeepSpeed as one rank, its store on a port it binds itself
        args += ["--deepspeed_config", str(ROOT / "ds_config.json")]
    return [sys.executable, str(ROOT / "train.py"), *args]


def step_command(mode: Mode, row: Row) -> list[str]:
    call = f"print_optimizer_step_ms({row.size!r}, {mode.device!r}, {mode.repeats})"
    return [sys.executable, "-c", f"from tools.bench_gpu import print_optimizer_step_ms; {call}"]


def print_optimizer_step_ms(size: str, device: str, repeats: int) -> None:
    """The optimizer step alone on the model's parameters (SinkGD: the paper's split) with random gradients; prints
    {optimizer: ms} as JSON on the last line."""
    steps = {}
    for optimizer in ("sinkgd", "adamw"):
        model = Llama(CONFIGS[size]).to(device)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        steps[optimizer] = train.build_optimizer(train.TrainConfig(model=size, optimizer=optimizer), model).step
    print(json.dumps({name: 1e3 * s for name, s in interleaved_medians(steps, repeats, device).items()}))


def run_logged(command: list[str], log: Path, timeout: float | None) -> int:
    """command with its output in log (written as it runs, so a kill keeps it); stopped, with all the processes it
    started, after timeout seconds (exit status 124)."""
    with open(log, "w") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\nstopped after {timeout:.0f} s: the --budget_s ran out\n")
            return 124


def measure(mode: Mode, row: Row, data_dir: str, logs: Path, timeout: float | None) -> dict:
    """Run one row; its numbers, or {"error": the last line of its log}."""
    log = logs / f"{row.name}.log"
    with tempfile.TemporaryDirectory(prefix=f"bench_{row.name}_") as run_dir:  # its checkpoints go with it
        command = step_command(mode, row) if row.kind == "step" else training_command(mode, row, data_dir,
                                                                                      Path(run_dir))
        status = run_logged(command, log, timeout)
        output = log.read_text().strip().splitlines()
        if status:
            return {"error": f"{output[-1] if output else ''} (exit status {status})"}
        if row.kind == "step":
            return {"optimizer_step_ms": json.loads(output[-1])}
        metrics = read_metrics(run_dir)
        (logs / f"{row.name}.metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    timed = [m for m in metrics if "tokens_per_sec" in m][1:]  # the first interval compiles and warms up
    return {"tokens_per_sec": statistics.median(m["tokens_per_sec"] for m in timed),
            "mfu": statistics.median(m["mfu"] for m in timed) if "mfu" in timed[0] else None,
            "peak_memory_gib": max(m["memory_mib"] for m in timed) / 1024}


def estimate_s(row: Row, results: list[dict]) -> float:
    """The longest recorded row of the same kind and size, else of the same kind, else the first guess."""
    for same in (lambda r: r["kind"] == row.kind and r["size"] == row.size, lambda r: r["kind"] == row.kind):
        seconds = [r["seconds"] for r in results if same(r)]
        if seconds:
            return max(seconds)
    return FIRST_ESTIMATE_S[row.kind]


def table(header: str, results: list[dict]) -> str:
    lines = [header + "\n", "| model | engine | compile | optimizer | tokens/s | vs AdamW | MFU | peak GiB "
             "| optimizer step ms |", "|---|---|---|---|---|---|---|---|---|"]
    step_ms = {r["size"]: r["optimizer_step_ms"] for r in results if r["kind"] == "step" and "error" not in r}
    for r in results:
        engine = "deepspeed ZeRO-2" if r["kind"] == "zero2" else "one device"
        cells = [r["size"], engine if r["kind"] != "step" else "optimizer step alone", str(r["kind"] == "compile"),
                 r["optimizer"]]
        if "error" in r:
            lines.append(f"| {' | '.join(cells)} | failed: {r['error']} (logs/{r['name']}.log) | | | | |")
        elif r["kind"] != "step":
            adamw = next((x for x in results if x["size"] == r["size"] and x["kind"] == r["kind"]
                          and x["optimizer"] == "adamw" and "error" not in x), None)
            ratio = f"{r['tokens_per_sec'] / adamw['tokens_per_sec']:.3f}" if adamw else ""
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "unknown device"
            step = step_ms.get(r["size"], {}).get(r["optimizer"]) if r["kind"] == "eager" else None
            lines.append(f"| {' | '.join(cells)} | {r['tokens_per_sec']:,.0f} | {ratio} | {mfu} "
                         f"| {r['peak_memory_gib']:.2f} | {f'{step:.1f}' if step else ''} |")
    return "\n".join(lines)


def write_atomically(path: Path, text: str) -> None:
    path.with_suffix(".tmp").write_text(text)
    os.replace(path.with_suffix(".tmp"), path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data_dir", help="token shards from prepare_c4.py (default: random tokens)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps, on the CPU: every code path")
    parser.add_argument("--steps", type=int, help=f"training steps per run (default {GPU.steps}; smoke {SMOKE.steps})")
    parser.add_argument("--repeats", type=int, help="timed optimizer steps per optimizer")
    parser.add_argument("--only", nargs="+", metavar="ROW", help="measure only these rows (names as in the logs)")
    parser.add_argument("--budget_s", type=float, help="start no row that would not end within this many seconds")
    args = parser.parse_args(argv)
    mode = SMOKE if args.smoke else GPU
    mode = Mode(**asdict(mode) | {k: getattr(args, k) for k in ("steps", "repeats") if getattr(args, k) is not None})
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("error: tools.bench_gpu measures a CUDA GPU and this machine has none; run it where "
                 "torch.cuda.is_available() is True")
    if mode.steps <= mode.log_interval:
        sys.exit(f"error: --steps must be more than {mode.log_interval}: the first {mode.log_interval} logged "
                 "step(s) compile and warm up and are not timed")
    rows = rows_of(mode)
    unknown = set(args.only or ()) - {row.name for row in rows}
    if unknown:
        sys.exit(f"error: unknown --only row(s) {', '.join(sorted(unknown))}; rows: {', '.join(r.name for r in rows)}")
    try:
        deepspeed = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        deepspeed = None
    setup = {"device": device_name(mode.device), "torch": torch.__version__, "cuda": torch.version.cuda,
             "deepspeed": deepspeed, "python": platform.python_version(), "data": args.data_dir or "random tokens",
             "mode": asdict(mode)}
    results_path, logs = args.out_dir / "results.json", args.out_dir / "logs"
    results = json.loads(results_path.read_text())["rows"] if results_path.exists() else []
    if results and json.loads(results_path.read_text())["setup"] != json.loads(json.dumps(setup)):  # tuples: lists
        sys.exit(f"error: {results_path} holds rows measured on another machine or with other settings; "
                 "choose another OUT_DIR")
    logs.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or str(args.out_dir / "tokens")
    if not args.data_dir:
        random_token_shards(Path(data_dir), mode.train_tokens)
    header = (f"{setup['device']}, torch {torch.__version__} (CUDA {torch.version.cuda}), DeepSpeed {deepspeed}, "
              f"{mode.dtype}, {mode.batch_size} x {mode.seq_len} tokens per step, {mode.steps} steps per run"
              f"{', random tokens' if not args.data_dir else ''}")
    start, not_run = time.monotonic(), []
    for row in rows:
        if args.only and row.name not in args.only or any(r["name"] == row.name and "error" not in r for r in results):
            continue
        left = args.budget_s - (time.monotonic() - start) if args.budget_s else None
        if left is not None and estimate_s(row, results) > left:
            not_run.append(row.name)
            continue
        print(f"{row.name} ...", flush=True)
        began = time.monotonic()
        outcome = measure(mode, row, data_dir, logs, left)
        results = [r for r in results if r["name"] != row.name] + [
            {"name": row.name} | asdict(row) | outcome | {"seconds": time.monotonic() - began}]
        print(f"{row.name}: {outcome} ({time.monotonic() - began:.0f} s)", flush=True)
        results.sort(key=lambda r: [x.name for x in rows].index(r["name"]))  # the table in the order of rows_of
        write_atomically(results_path, json.dumps({"setup": setup, "rows": results}, indent=1))
        write_atomically(args.out_dir / "table.md", table(header, results) + "\n")
    print(table(header, results))
    if not_run:
        print(f"not started, past --budget_s: {' '.join(not_run)}; the same command again measures them")
    failed = [r["name"] for r in results if "error" in r]
    if failed:
        sys.exit(f"error: {len(failed)} row(s) failed: {' '.join(failed)}; their logs are in {logs}")


if __name__ == "__main__":
    main()
