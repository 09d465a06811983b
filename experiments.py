"""The SinkGD paper's claims (arXiv 2502.06742) checked at small scale: optimizer memory, convergence against
AdamW, effective throughput (its Figure 1c) and the number of Sinkhorn iterations L.

    python experiments.py memory     # weights + optimizer state per size: bf16 estimate and a measured step
    python experiments.py compare    # AdamW (small lr grid) vs SinkGD: val ppl, steps to reach, throughput
    python experiments.py ablation   # SinkGD with L = 1, 2, 5, 10
    python experiments.py plot out/compare/adamw_lr0.006 out/compare/sinkgd --out curves.png

compare and ablation train a tiny LLaMA through train.py, one subprocess per run (each writes its own
metrics.jsonl), on the C4 sample in ../shared when it is there and on the offline demo corpus otherwise, then
time a few training steps of every variant taken in turn in one process: runs made one after another on a
shared machine can differ several-fold in speed, so the speed ratios (and the effective throughput) come from
that interleaved timing, and each run's own median tokens/s is reported beside it. summary.json and curves.png
are written beside the runs (out/compare, out/ablation). Each command takes 5 (idle) to 15 (shared) minutes on
a 2-core CPU.
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import prepare_c4
import train
from bench_optimizer import proc_status_bytes
from model import CONFIGS, Llama
from sinkgd import sinkgd_param_groups

ROOT = Path(__file__).resolve().parent
C4_SAMPLE = ROOT.parent / "shared" / "data" / "c4-sample.00000-of-00001.json.gz"
BENCHMARK_SIZES = ["llama_60m", "llama_130m", "llama_350m", "llama_1b"]
BF16_BYTES = 2

# Every compare and ablation run: 8 x 128 tokens per step, train loss and tokens/s at every step, validation
# loss on 16 fixed windows every 5 steps (the resolution of "steps to reach"), one checkpoint at the end.
MODEL, BATCH_SIZE, SEQ_LEN, MAX_STEPS = "llama_tiny", 8, 128, 50
RUN_ARGS = ["--preset", "demo", "--model", MODEL, "--batch_size", str(BATCH_SIZE),
            "--micro_batch_size", str(BATCH_SIZE), "--seq_len", str(SEQ_LEN), "--log_interval", "1",
            "--eval_interval", "5", "--eval_tokens", str(16 * (SEQ_LEN + 1)), "--keep_checkpoints", "1"]
ADAMW_LRS = [0.002, 0.006, 0.02]  # 0.02 is also the lr of the AdamW part (embedding, norms, head) of SinkGD
SINKGD_ARGS = ["--optimizer", "sinkgd", "--lr", "0.02", "--alpha", "0.05"]  # the paper's defaults
ABLATION_ITERS = [1, 2, 5, 10]


# --------------------------------------------------------------------------------------------------
# Memory: weights + optimizer state, estimated as in the paper's tables and measured over one step.


def memory_estimate(config) -> dict:
    """Parameter counts and the bytes of weights + optimizer state in bf16: AdamW keeps two moments for every
    parameter; the hybrid keeps them only for the AdamW group (embedding, norms, head), SinkGD none."""
    with torch.device("meta"):  # shapes only
        model = Llama(config)
    sinkgd_group, adamw_group = sinkgd_param_groups(model, model.model.layers, lr=1.0)
    n_sinkgd = sum(p.numel() for p in sinkgd_group["params"])
    n_adamw = sum(p.numel() for p in adamw_group["params"])
    n_total = n_sinkgd + n_adamw
    return {"params": n_total, "sinkgd_params": n_sinkgd,
            "adamw_bytes": BF16_BYTES * (n_total + 2 * n_total),
            "sinkgd_bytes": BF16_BYTES * (n_total + 2 * n_adamw)}


def measure_step(size: str, optimizer: str, batch_size: int, seq_len: int) -> float:
    """Peak MiB of building the model and optimizer and taking one training step (forward, backward, step),
    as train.py does it: fp32 weights (bf16 autocast on CUDA). CUDA: allocator peak; CPU: peak RSS beyond the
    interpreter's, page-granular. Run it in a fresh process, so nothing earlier counts."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        baseline = proc_status_bytes("VmRSS")
    model = Llama(CONFIGS[size]).to(device)
    opt = train.build_optimizer(train.TrainConfig(model=size, optimizer=optimizer), model)
    tokens = torch.randint(0, CONFIGS[size].vocab_size, (batch_size, seq_len + 1), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    opt.step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (proc_status_bytes("VmHWM") - baseline) / 2**20


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def memory(args) -> None:
    cuda = torch.cuda.is_available()
    measure = args.measure if args.measure is not None else BENCHMARK_SIZES if cuda else ["llama_60m", "llama_130m"]
    rows = []
    for size in BENCHMARK_SIZES:
        row = {"size": size} | memory_estimate(CONFIGS[size])
        for optimizer in ["adamw", "sinkgd"] if size in measure else []:
            # a fresh process per measurement; small mmap threshold: a freed tensor leaves RSS at once
            out = subprocess.run([sys.executable, __file__, "memory", "--measure_one", size, optimizer,
                                  "--batch_size", str(args.batch_size), "--seq_len", str(args.seq_len)],
                                 capture_output=True, text=True, check=True,
                                 env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"})
            row[f"{optimizer}_measured_mib"] = json.loads(out.stdout.splitlines()[-1])
        rows.append(row)

    measured = lambda row, key: f"{row[key] / 1024:.2f}" if key in row else "not measured"
    print(f"Weights + optimizer state. Estimate: bf16 weights and moments, as in the paper's tables. Measured: "
          f"peak of one training step, fp32 weights{' with bf16 autocast' if cuda else ''}, batch "
          f"{args.batch_size} x {args.seq_len} tokens (weights, grads, state, activations), {device_name()}, "
          f"torch {torch.__version__}.\n")
    print("| size | params | on SinkGD | AdamW est. GiB | SinkGD est. GiB | est. saving | "
          "AdamW measured GiB | SinkGD measured GiB | measured saving |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        saved = (f"{1 - r['sinkgd_measured_mib'] / r['adamw_measured_mib']:.0%}"
                 if "adamw_measured_mib" in r else "")
        print(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['sinkgd_params'] / 1e6:.1f}M | "
              f"{r['adamw_bytes'] / 2**30:.2f} | {r['sinkgd_bytes'] / 2**30:.2f} | "
              f"{1 - r['sinkgd_bytes'] / r['adamw_bytes']:.0%} | {measured(r, 'adamw_measured_mib')} | "
              f"{measured(r, 'sinkgd_measured_mib')} | {saved} |")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"device": device_name(), "torch": torch.__version__,
                                                 "batch_size": args.batch_size, "seq_len": args.seq_len,
                                                 "rows": rows}, indent=1))


# --------------------------------------------------------------------------------------------------
# Reading metrics.jsonl: final loss, steps to reach a loss, throughput.


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_val_loss(metrics: list[dict]) -> float:
    return [m["val_loss"] for m in metrics if "val_loss" in m][-1]


def steps_to_reach(metrics: list[dict], target: float) -> int | None:
    """The first evaluated step whose validation loss is at or below target; None if none is."""
    return next((m["step"] for m in metrics if "val_loss" in m and m["val_loss"] <= target), None)


def median_tokens_per_sec(metrics: list[dict]) -> float:
    """Median training speed over the logging intervals without an evaluation in them. train.py evaluates after
    logging a step, so an evaluation at step e is timed in the interval that ends at the next logged step."""
    evals = [m["step"] for m in metrics if "val_loss" in m]
    clean, previous = [], 0
    for m in metrics:
        if "tokens_per_sec" in m:
            if not any(previous <= e < m["step"] for e in evals):
                clean.append(m["tokens_per_sec"])
            previous = m["step"]
    return statistics.median(clean)


def effective_throughput(adamw: list[dict], sinkgd: list[dict], adamw_tokens_per_sec: float,
                         sinkgd_tokens_per_sec: float) -> dict:
    """Figure 1c: the raw tokens/s ratio times the reduction in steps to reach AdamW's final validation loss
    (both runs take the same tokens per step)."""
    target = final_val_loss(adamw)
    adamw_steps, sinkgd_steps = steps_to_reach(adamw, target), steps_to_reach(sinkgd, target)
    speed = sinkgd_tokens_per_sec / adamw_tokens_per_sec
    return {"target_val_loss": target, "adamw_steps": adamw_steps, "sinkgd_steps": sinkgd_steps,
            "tokens_per_sec_ratio": speed,
            "effective_throughput_ratio": speed * adamw_steps / sinkgd_steps if sinkgd_steps else None}


# --------------------------------------------------------------------------------------------------
# Training runs through train.py, and their speed measured side by side.


def training_data() -> tuple[str, str]:
    """(data_dir, description): the C4 sample, tokenised on first use, or else the demo corpus."""
    if not C4_SAMPLE.exists():
        return "data/demo", "demo corpus (CPython docstrings)"  # train.py builds it for the demo preset
    data_dir = Path("data/c4_sample")
    if not list(data_dir.glob("train_*.bin")):
        prepare_c4.prepare_files([C4_SAMPLE], data_dir)
    return str(data_dir), f"C4 sample ({C4_SAMPLE.name}, Raffel et al. 2020)"


def run_training(run_dir: Path, data_dir: str, max_steps: int, args: list[str]) -> list[dict]:
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: train.py refuses to overwrite checkpoints
    command = [sys.executable, str(ROOT / "train.py"), *RUN_ARGS, "--data_dir", data_dir, "--max_steps",
               str(max_steps), "--ckpt_interval", str(max_steps), *args, "--out_dir", str(run_dir)]
    print(f"\n$ {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True)
    return read_metrics(run_dir)


def interleaved_tokens_per_sec(variants: dict[str, list[str]], steps: int) -> dict[str, float]:
    """Median tokens/s of a whole training step (forward, backward, optimizer step) of each variant of the
    train.py arguments, their steps taken in turn in one process so that a change in machine load hits all of
    them alike: on a shared machine, runs made one after another can differ several-fold in speed."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # as train.py
    tokens = torch.randint(0, CONFIGS[MODEL].vocab_size, (BATCH_SIZE, SEQ_LEN + 1), device=device)
    models = {name: Llama(CONFIGS[MODEL]).to(device) for name in variants}
    optimizers = {name: train.build_optimizer(train.parse_config(RUN_ARGS + args), models[name])
                  for name, args in variants.items()}
    seconds = {name: [] for name in variants}
    for step in range(steps + 1):  # step 0 warms up: AdamW allocates its state
        for name in variants:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast:
                _, loss = models[name](tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                seconds[name].append(time.perf_counter() - start)
    return {name: BATCH_SIZE * SEQ_LEN / statistics.median(s) for name, s in seconds.items()}


def setup(data: str, max_steps: int) -> dict:
    return {"device": device_name(), "torch": torch.__version__, "data": data, "model": MODEL, "max_steps": max_steps,
            "tokens_per_step": BATCH_SIZE * SEQ_LEN, "train.py args": " ".join(RUN_ARGS)}


def compare(args) -> None:
    data_dir, data = training_data()
    out = Path(args.out_dir)
    runs = {f"adamw_lr{lr:g}": ["--optimizer", "adamw", "--lr", str(lr)] for lr in ADAMW_LRS}
    runs["sinkgd"] = SINKGD_ARGS
    metrics = {name: run_training(out / name, data_dir, args.max_steps, extra) for name, extra in runs.items()}
    best_adamw = min((name for name in runs if name.startswith("adamw")), key=lambda n: final_val_loss(metrics[n]))
    print(f"\ntiming {args.timing_steps} training steps of each optimizer, interleaved", flush=True)
    speed = interleaved_tokens_per_sec({"adamw": runs[best_adamw], "sinkgd": SINKGD_ARGS}, args.timing_steps)
    result = effective_throughput(metrics[best_adamw], metrics["sinkgd"], speed["adamw"], speed["sinkgd"])
    summary = setup(data, args.max_steps) | {"runs": {
        name: {"train.py args": " ".join(runs[name]), "final_val_loss": final_val_loss(m),
               "final_val_ppl": math.exp(final_val_loss(m)),
               "steps_to_reach_target": steps_to_reach(m, result["target_val_loss"]),
               "median_tokens_per_sec_in_run": median_tokens_per_sec(m)}
        for name, m in metrics.items()}, "best_adamw": best_adamw, "interleaved_tokens_per_sec": speed} | result
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    print(f"\n{MODEL}, {args.max_steps} steps of {BATCH_SIZE * SEQ_LEN} tokens, {data}; {summary['device']}, "
          f"torch {summary['torch']}\n")
    print(f"| run | final val loss | final val ppl | steps to reach {result['target_val_loss']:.3f} | "
          "tokens/s in its run (median) |")
    print("|---|---|---|---|---|")
    for name, r in summary["runs"].items():
        print(f"| {name}{' (best AdamW)' if name == best_adamw else ''} | {r['final_val_loss']:.3f} | "
              f"{r['final_val_ppl']:.1f} | {r['steps_to_reach_target'] or 'not reached'} | "
              f"{r['median_tokens_per_sec_in_run']:.0f} |")
    ratio = result["effective_throughput_ratio"]
    print(f"\nInterleaved timing: AdamW {speed['adamw']:.0f} tokens/s, SinkGD {speed['sinkgd']:.0f} tokens/s "
          f"(ratio {result['tokens_per_sec_ratio']:.2f}). Steps to reach AdamW's final validation loss: AdamW "
          f"{result['adamw_steps']}, SinkGD {result['sinkgd_steps'] or 'not reached'}. Effective throughput ratio: "
          + (f"{ratio:.2f}" if ratio else "undefined (SinkGD did not reach it)"))
    plot_runs([out / name for name in runs], out / "curves.png")


def ablation(args) -> None:
    data_dir, data = training_data()
    out = Path(args.out_dir)
    variants = {L: SINKGD_ARGS + ["--sinkhorn_iters", str(L)] for L in ABLATION_ITERS}
    metrics = {L: run_training(out / f"sinkgd_L{L}", data_dir, args.max_steps, extra) for L, extra in variants.items()}
    print(f"\ntiming {args.timing_steps} training steps of each L, interleaved", flush=True)
    speed = interleaved_tokens_per_sec(variants, args.timing_steps)
    summary = setup(data, args.max_steps) | {"by_sinkhorn_iters": {
        L: {"final_val_loss": final_val_loss(m), "median_tokens_per_sec_in_run": median_tokens_per_sec(m),
            "interleaved_tokens_per_sec": speed[L], "interleaved_ms_per_step": 1000 * BATCH_SIZE * SEQ_LEN / speed[L]}
        for L, m in metrics.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    print(f"\nSinkGD (lr 0.02, alpha 0.05), {MODEL}, {args.max_steps} steps of {BATCH_SIZE * SEQ_LEN} tokens, "
          f"{data}; {summary['device']}, torch {summary['torch']}\n")
    print("| L | final val loss | final val ppl | tokens/s in its run (median) | interleaved tokens/s | "
          "interleaved ms/step |")
    print("|---|---|---|---|---|---|")
    for L, r in summary["by_sinkhorn_iters"].items():
        print(f"| {L} | {r['final_val_loss']:.3f} | {math.exp(r['final_val_loss']):.1f} | "
              f"{r['median_tokens_per_sec_in_run']:.0f} | {r['interleaved_tokens_per_sec']:.0f} | "
              f"{r['interleaved_ms_per_step']:.0f} |")
    plot_runs([out / f"sinkgd_L{L}" for L in ABLATION_ITERS], out / "curves.png")


# --------------------------------------------------------------------------------------------------
# Plots.


def plot_runs(run_dirs, out_path) -> bool:
    """Train (thin) and validation (dots) loss of each run against steps and against wall-clock time, in one
    PNG. Returns False, saying why, when matplotlib is not installed: it is only needed here."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed, so no plot was written: pip install matplotlib", file=sys.stderr)
        return False
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for i, run_dir in enumerate(map(Path, run_dirs)):
        metrics = read_metrics(run_dir)
        start = next(m["time"] for m in metrics if "time" in m)
        for key, style in (("train_loss", dict(alpha=0.4, linewidth=1)),
                           ("val_loss", dict(marker="o", markersize=3, label=run_dir.name))):
            points = [m for m in metrics if key in m]
            by_step.plot([m["step"] for m in points], [m[key] for m in points], color=f"C{i % 10}", **style)
            timed = [m for m in points if "time" in m]  # an evaluation off the logging steps has no time
            by_time.plot([m["time"] - start for m in timed], [m[key] for m in timed], color=f"C{i % 10}", **style)
    by_step.set(xlabel="step", ylabel="loss (train: thin, validation: dots)")
    by_time.set(xlabel="wall-clock seconds since the first logged step")
    by_step.legend()
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    fig.savefig(out_path, dpi=120)
    print(f"wrote {out_path}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("memory", help="memory table: bf16 estimate and measured peak of one step")
    p.add_argument("--measure", nargs="*", choices=BENCHMARK_SIZES,
                   help="sizes to measure (default: all on a GPU; llama_60m and llama_130m on a CPU)")
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--out_dir", default="out/memory")
    p.add_argument("--measure_one", nargs=2, metavar=("SIZE", "OPTIMIZER"), help=argparse.SUPPRESS)  # the child
    for name, default_dir in (("compare", "out/compare"), ("ablation", "out/ablation")):
        p = commands.add_parser(name, help=f"train and summarise; runs go to {default_dir}")
        p.add_argument("--max_steps", type=int, default=MAX_STEPS)
        p.add_argument("--timing_steps", type=int, default=10, help="interleaved steps timed per variant")
        p.add_argument("--out_dir", default=default_dir)
    p = commands.add_parser("plot", help="loss curves of any runs, from their metrics.jsonl")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args()

    if args.command == "memory" and args.measure_one:
        print(json.dumps(measure_step(*args.measure_one, args.batch_size, args.seq_len)))
    elif args.command == "plot":
        try:
            sys.exit(0 if plot_runs(args.run_dirs, args.out) else 1)
        except FileNotFoundError as e:  # a run directory without metrics.jsonl
            sys.exit(f"error: {e}")
    else:
        {"memory": memory, "compare": compare, "ablation": ablation}[args.command](args)


if __name__ == "__main__":
    main()
