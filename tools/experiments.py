"""The SinkGD paper's claims (arXiv 2502.06742) checked on your model and data: convergence against a tuned AdamW,
effective throughput (the paper's Figure 1c) over several seeds, the number of Sinkhorn iterations L, and memory.

    python -m tools.experiments compare                 # CPU default: llama_tiny, demo corpus, 3 seeds (~15 min)
    python -m tools.experiments compare --baselines adamw muon      # Muon tuned too
    python -m tools.experiments compare --model llama_small --data_dir data/c4_sample --max_steps 300 --seeds 2
    python -m tools.experiments compare --model llama_60m --data_dir data/c4 --max_steps 1000 --seeds 1 \\
        --batch_size 512 --micro_batch_size 128 --seq_len 256 --eval_interval 50 --dtype bfloat16   # a GPU
    python -m tools.experiments ablation                # SinkGD with L = 1, 2, 5, 10
    python -m tools.experiments memory                  # weights + optimizer state: bf16 estimate, measured step
    python -m tools.experiments plot out/compare/sinkgd_seed0 out/compare/adamw_lr0.01_seed0 --out curves.png

compare: each baseline (--baselines: AdamW, and Muon on the same matrices as SinkGD) over a log-spaced lr grid
(seed 0), extended past an edge while the best lr sits on it, then each baseline's best lr and SinkGD at the paper's
defaults (global lr 0.02, alpha 0.05, L = 5; no tuning on our side) over --seeds seeds (model init and data order).
Every run is train.py in its own process, with every option that is not this tool's own passed through. A run whose
directory already holds a checkpoint of the same config continues from it, so an interrupted experiment picks up
where it stopped. Validation: every --eval_interval steps on --eval_tokens (the curves, "steps to reach", and each
baseline's gap to SinkGD at the --horizons steps), and at the end on --final_eval_tokens, whose standard error over
windows the summary gives. Speed comes from timing a few training steps of every optimizer in turn in one process,
since consecutive runs on a shared machine can differ several-fold. summary.json, a markdown table and curves.png
(mean and seed band per optimizer, loss against steps and wall-clock) go to --out_dir.
"""
import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import prepare_c4
import train
from model import CONFIGS, Llama
from sinkgd import sinkgd_param_groups
from tools.common import (ROOT, device_name, in_fresh_process, interleaved_medians, proc_status_bytes, read_metrics,
                          reset_peak_rss)

PAPER_ADAMW_LRS = [1e-2, 5e-3, 1e-3, 5e-4, 1e-4]  # the paper's AdamW grid
SINKGD_ARGS = ["--optimizer", "sinkgd", "--lr", "0.02", "--alpha", "0.05", "--sinkhorn_iters", "5"]  # its defaults
ABLATION_ITERS = [1, 2, 5, 10]
BENCHMARK_SIZES = ["llama_60m", "llama_130m", "llama_350m", "llama_1b"]

# --------------------------------------------------------------------------------------------------
# Runs through train.py, and what is read from them.


def run_args(args, passthrough: list[str]) -> list[str]:
    """The train.py options shared by every run of an experiment: this tool's options, then the passed-through ones
    (which train.py validates)."""
    return ["--model", args.model,
            "--data_dir", args.data_dir, "--max_steps", str(args.max_steps), "--batch_size", str(args.batch_size),
            "--micro_batch_size", str(args.micro_batch_size), "--seq_len", str(args.seq_len),
            "--eval_interval", str(args.eval_interval), "--eval_tokens", str(args.eval_tokens),
            "--ckpt_interval", str(args.eval_interval), "--keep_checkpoints", "1", "--log_interval", "1",
            *passthrough]


def run_training(run_dir: Path, args: list[str]) -> list[dict]:
    """train.py with `args` writing to run_dir; continued (--resume) if run_dir holds a checkpoint of this very
    config, else started afresh. Returns its metrics."""
    cfg = train.parse_config(args + ["--out_dir", str(run_dir)])
    paths = sorted(run_dir.glob("ckpt_*.pt"))
    state = torch.load(paths[-1], map_location="cpu", weights_only=True, mmap=True) if paths else None
    same = state is not None and {**state["config"], "resume": False} == asdict(cfg)
    if not same:
        shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, str(ROOT / "train.py"), *args, "--out_dir", str(run_dir), "--resume", str(same)]
    print(f"\n$ python {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT)
    return read_metrics(run_dir)


def final_val_loss(metrics: list[dict]) -> float:
    return [m["val_loss"] for m in metrics if "val_loss" in m][-1]


def val_loss_at(metrics: list[dict], step: int) -> float:
    return next(m["val_loss"] for m in metrics if m["step"] == step and "val_loss" in m)


def horizon_gaps(baseline_runs: list[list[dict]], sinkgd_runs: list[list[dict]], steps: list[int]) -> dict:
    """At each of `steps`, the baseline's validation loss minus SinkGD's, per seed (the runs paired by seed, evaluated
    on the same windows), read off the curves of the full-length runs: a point on the whole schedule, not the end of a
    shorter run."""
    rows = {}
    for step in steps:
        gaps = [val_loss_at(b, step) - val_loss_at(s, step) for b, s in zip(baseline_runs, sinkgd_runs, strict=True)]
        rows[str(step)] = {"loss": spread([val_loss_at(b, step) for b in baseline_runs]),
                           "sinkgd_loss": spread([val_loss_at(s, step) for s in sinkgd_runs]),
                           "gap": spread(gaps), "sinkgd_lower_in": sum(g > 0 for g in gaps)}
    return rows


def horizon_steps(args) -> list[int]:
    """--horizons, or a third, two thirds (down to an evaluated step) and all of --max_steps."""
    thirds = [args.max_steps * k // 3 // args.eval_interval * args.eval_interval for k in (1, 2)]
    return args.horizons or sorted({s for s in thirds if s > 0} | {args.max_steps})


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


def effective_throughput(baseline: list[dict], sinkgd: list[dict], baseline_tokens_per_sec: float,
                         sinkgd_tokens_per_sec: float) -> dict:
    """Figure 1c: the tokens/s ratio times the ratio of the steps each optimizer needs to reach the baseline's final
    validation loss (both runs take the same tokens per step)."""
    target = final_val_loss(baseline)
    baseline_steps, sinkgd_steps = steps_to_reach(baseline, target), steps_to_reach(sinkgd, target)
    speed = sinkgd_tokens_per_sec / baseline_tokens_per_sec
    return {"target_val_loss": target, "baseline_steps": baseline_steps, "sinkgd_steps": sinkgd_steps,
            "tokens_per_sec_ratio": speed,
            "effective_throughput_ratio": speed * baseline_steps / sinkgd_steps if sinkgd_steps else None}


@torch.no_grad()
def window_losses(run_dir: Path, data_dir: str, seq_len: int, budget: int, batch_size: int = 16) -> np.ndarray:
    """The mean next-token loss of every validation window (the first `budget` tokens) under the run's final
    weights, in float32."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = torch.load(sorted(run_dir.glob("ckpt_*.pt"))[-1], map_location="cpu", weights_only=True, mmap=True)
    model = Llama(CONFIGS[state["config"]["model"]]).to(device).eval()
    model.load_state_dict(state["model"])
    windows = torch.from_numpy(prepare_c4.validation_windows(prepare_c4.open_splits(data_dir)[1], seq_len, budget))
    losses = []
    for batch in windows.to(device).split(batch_size):
        logits, _ = model(batch[:, :-1])
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
                      .view(len(batch), -1).mean(1))
    return torch.cat(losses).double().cpu().numpy()


def spread(values) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max of values; None entries are left out and
    counted."""
    kept = [v for v in values if v is not None]
    if not kept:
        return {"n": 0, "missing": len(values)}
    return {"mean": statistics.fmean(kept), "std": statistics.stdev(kept) if len(kept) > 1 else 0.0,
            "min": min(kept), "max": max(kept), "n": len(kept), "missing": len(values) - len(kept)}


def search_lr(final_loss_at, grid: list[float], max_extensions: int) -> tuple[float, list[float], dict]:
    """final_loss_at(lr) over the grid; while the best lr is at an edge of the grid, one more lr beyond that edge (at
    the ratio of the edge to its neighbour, or 10^0.5 for a one-point grid), at most max_extensions times. Returns
    (best lr, the final grid in ascending order, {lr: final loss})."""
    losses = {lr: final_loss_at(lr) for lr in sorted(grid)}
    for _ in range(max_extensions):
        lrs, best = sorted(losses), min(losses, key=losses.get)
        if best not in (lrs[0], lrs[-1]) or len(lrs) > 1 and losses[lrs[0]] == losses[lrs[-1]]:
            break
        ratio = lrs[-1] / lrs[-2] if best == lrs[-1] and len(lrs) > 1 else lrs[1] / lrs[0] if len(lrs) > 1 else 10**0.5
        new = best * ratio if best == lrs[-1] else best / ratio
        losses[new] = final_loss_at(new)
    return min(losses, key=losses.get), sorted(losses), losses


def interleaved_tokens_per_sec(variants: dict[str, list[str]], steps: int) -> dict[str, float]:
    """Tokens/s of a whole training step (forward, backward, optimizer) of each variant of the train.py options, as
    train.py takes it (same model, optimizer, autocast), the variants' steps taken in turn in one process."""
    cfgs = {name: train.parse_config(args) for name, args in variants.items()}
    cfg = next(iter(cfgs.values()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    tokens = torch.randint(0, CONFIGS[cfg.model].vocab_size, (cfg.micro_batch_size, cfg.seq_len + 1), device=device)
    accumulation = cfg.batch_size // cfg.micro_batch_size

    def training_step(model, optimizer):
        def step():
            for _ in range(accumulation):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    _, loss = model(tokens[:, :-1], tokens[:, 1:])
                (loss / accumulation).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    runs = {}
    for name, c in cfgs.items():
        model = Llama(CONFIGS[c.model]).to(device)
        runs[name] = training_step(model, train.build_optimizer(c, model))
    seconds = interleaved_medians(runs, steps, device)
    return {name: cfg.batch_size * cfg.seq_len / s for name, s in seconds.items()}


# --------------------------------------------------------------------------------------------------
# compare and ablation.


def setup(args, passthrough) -> dict:
    return {"device": device_name(), "torch": torch.__version__, "model": args.model, "data_dir": args.data_dir,
            "max_steps": args.max_steps, "tokens_per_step": args.batch_size * args.seq_len,
            "train.py args": " ".join(run_args(args, passthrough))}


def final_evaluation(run_dir: Path, args) -> dict:
    losses = window_losses(run_dir, args.data_dir, args.seq_len, args.final_eval_tokens)
    return {"loss": float(losses.mean()), "standard_error": float(losses.std(ddof=1) / math.sqrt(len(losses))),
            "windows": len(losses), "per_window": losses}


def compare(args, passthrough: list[str]) -> dict:
    out, base = Path(args.out_dir), run_args(args, passthrough)
    baseline_args = lambda name, lr: base + ["--optimizer", name, "--lr", f"{lr:g}"]
    metrics = {}

    def run(name, extra_args, seed):
        metrics[(name, seed)] = run_training(out / f"{name}_seed{seed}", extra_args + ["--seed", str(seed)])
        return metrics[(name, seed)]

    tuned = {}  # baseline -> (best lr, the grid searched, {lr: final val loss})
    for b in args.baselines:
        tuned[b] = search_lr(lambda lr: final_val_loss(run(f"{b}_lr{lr:g}", baseline_args(b, lr), 0)),
                             getattr(args, f"{b}_lrs"), args.max_extensions)
    runs = {b: f"{b}_lr{tuned[b][0]:g}" for b in args.baselines} | {"sinkgd": "sinkgd"}  # optimizer -> its runs
    variants = {b: baseline_args(b, tuned[b][0]) for b in args.baselines} | {"sinkgd": base + SINKGD_ARGS}
    for seed in range(args.seeds):
        for name, run_name in runs.items():
            if (run_name, seed) not in metrics:
                run(run_name, variants[name], seed)
    print(f"\ntiming {args.timing_steps} training steps of each optimizer, in turn", flush=True)
    speed = interleaved_tokens_per_sec(variants, args.timing_steps)
    evaluations = {(name, seed): final_evaluation(out / f"{run_name}_seed{seed}", args)
                   for name, run_name in runs.items() for seed in range(args.seeds)}
    baselines = {}
    for b in args.baselines:
        best_lr, grid, grid_losses = tuned[b]
        per_seed = []
        for seed in range(args.seeds):
            mine, sinkgd = evaluations[(b, seed)], evaluations[("sinkgd", seed)]
            gap = mine["per_window"] - sinkgd["per_window"]  # the same windows: paired
            per_seed.append(effective_throughput(metrics[(runs[b], seed)], metrics[("sinkgd", seed)], speed[b],
                                                 speed["sinkgd"]) | {
                "seed": seed, "gap": float(gap.mean()),
                "gap_standard_error": float(gap.std(ddof=1) / math.sqrt(len(gap)))})
        baselines[b] = {
            "grid": grid, "grid_final_val_loss": {f"{lr:g}": grid_losses[lr] for lr in grid}, "best_lr": best_lr,
            "best_lr_is_interior": grid[0] < best_lr < grid[-1],
            "final_val_loss": spread([evaluations[(b, s)]["loss"] for s in range(args.seeds)]),
            "gap": spread([r["gap"] for r in per_seed]),
            "steps_to_own_final": spread([r["baseline_steps"] for r in per_seed]),
            "sinkgd_steps_to_its_final": spread([r["sinkgd_steps"] for r in per_seed]),
            "tokens_per_sec_ratio": speed["sinkgd"] / speed[b],
            "effective_throughput_ratio": spread([r["effective_throughput_ratio"] for r in per_seed]),
            "per_seed": per_seed,
            "horizon": horizon_gaps([metrics[(runs[b], s)] for s in range(args.seeds)],
                                    [metrics[("sinkgd", s)] for s in range(args.seeds)], horizon_steps(args))}
    errors = spread([e["standard_error"] for e in evaluations.values()])
    for summary_b in baselines.values():
        summary_b["standard_error_below_a_tenth_of_gap"] = errors["max"] < abs(summary_b["gap"]["mean"]) / 10
    summary = setup(args, passthrough) | {
        "seeds": args.seeds, "sinkgd_args": " ".join(SINKGD_ARGS), "interleaved_tokens_per_sec": speed,
        "eval_tokens": args.eval_tokens,
        "final_eval_tokens": args.final_eval_tokens,
        "final_eval_windows": evaluations[("sinkgd", 0)]["windows"],
        "sinkgd_final_val_loss": spread([evaluations[("sinkgd", s)]["loss"] for s in range(args.seeds)]),
        "final_val_standard_error": errors, "baselines": baselines,
        "median_tokens_per_sec_in_runs": {f"{n}_seed{s}": median_tokens_per_sec(m) for (n, s), m in metrics.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(compare_table(summary))
    plot_groups({f"{LABELS[b]} lr {baselines[b]['best_lr']:g}": [out / f"{runs[b]}_seed{s}" for s in range(args.seeds)]
                 for b in args.baselines} | {"SinkGD": [out / f"sinkgd_seed{s}" for s in range(args.seeds)]},
                out / "curves.png", f"{args.model}, {args.max_steps} steps of {args.batch_size} x {args.seq_len} "
                f"tokens, {Path(args.data_dir).name}")
    return summary


LABELS = {"adamw": "AdamW", "muon": "Muon", "sinkgd": "SinkGD"}


def plus_minus(d: dict, f: str = ".3f") -> str:
    """A spread() as mean ± std, or "not reached" when no seed gave a value."""
    return f"{d['mean']:{f}} ± {d['std']:{f}}" if d["n"] else "not reached"


def compare_table(s: dict) -> str:
    """The summary as a markdown table, one row per optimizer, plus the lines that qualify it."""
    pm = plus_minus
    speed = s["interleaved_tokens_per_sec"]
    lines = [f"\n{s['model']}, {s['max_steps']} steps of {s['tokens_per_step']} tokens, {s['data_dir']}, "
             f"{s['seeds']} seed(s); {s['device']}, torch {s['torch']}\n",
             "| optimizer | lr | final val loss | tokens/s | steps to its final val loss: it, SinkGD | "
             "SinkGD's effective throughput against it |", "|---|---|---|---|---|---|"]
    for name, b in s["baselines"].items():
        reached, missing = b["sinkgd_steps_to_its_final"]["n"], b["sinkgd_steps_to_its_final"]["missing"]
        lines.append(f"| {LABELS[name]} | {b['best_lr']:g} (grid {', '.join(f'{lr:g}' for lr in b['grid'])}) | "
                     f"{pm(b['final_val_loss'])} | {speed[name]:.0f} | {pm(b['steps_to_own_final'], '.0f')}, "
                     f"{pm(b['sinkgd_steps_to_its_final'], '.0f')}"
                     f"{f' (not reached in {missing} seed(s))' if missing and reached else ''} | "
                     f"{pm(b['effective_throughput_ratio'], '.2f')}{'x' if reached else ''} |")
    lines += [f"| SinkGD | 0.02, alpha 0.05, L = 5 (paper defaults) | {pm(s['sinkgd_final_val_loss'])} | "
              f"{speed['sinkgd']:.0f} | | |", ""]
    for name, b in s["baselines"].items():
        lines.append(f"{LABELS[name]} - SinkGD final val loss: {pm(b['gap'])} "
                     f"(standard error of a final val loss over its {s['final_eval_windows']} windows at most "
                     f"{s['final_val_standard_error']['max']:.4f}: "
                     f"{'below' if b['standard_error_below_a_tenth_of_gap'] else 'NOT below'} a tenth of it). "
                     f"Best lr {'inside' if b['best_lr_is_interior'] else 'AT THE EDGE of'} the searched grid.")
    return "\n".join(lines + horizon_table(s))


def horizon_table(s: dict) -> list[str]:
    """The validation loss on the curves' windows at each horizon step, and each baseline's gap to SinkGD."""
    pm = plus_minus
    gap = lambda r: f"{pm(r['gap'])} ({r['sinkgd_lower_in']} of {r['gap']['n']})"
    names = list(s["baselines"])
    first = s["baselines"][names[0]]["horizon"]
    lines = ["", f"Along the {s['max_steps']}-step runs (validation loss on the first {s['eval_tokens']} val tokens, "
             "as the curves; a positive gap: SinkGD lower):", "",
             f"| step | {' | '.join(LABELS[b] for b in names)} | SinkGD | "
             f"{' | '.join(f'{LABELS[b]} - SinkGD (SinkGD lower in)' for b in names)} |",
             "|---" * (2 * len(names) + 2) + "|"]
    for step in first:
        rows = [s["baselines"][b]["horizon"][step] for b in names]
        lines.append(f"| {step} | {' | '.join(pm(r['loss']) for r in rows)} | {pm(first[step]['sinkgd_loss'])} | "
                     f"{' | '.join(gap(r) for r in rows)} |")
    return lines


def ablation(args, passthrough: list[str]) -> dict:
    out, base = Path(args.out_dir), run_args(args, passthrough)
    variants = {L: base + SINKGD_ARGS + ["--sinkhorn_iters", str(L)] for L in ABLATION_ITERS}
    for L, variant in variants.items():
        for seed in range(args.seeds):
            run_training(out / f"sinkgd_L{L}_seed{seed}", variant + ["--seed", str(seed)])
    print(f"\ntiming {args.timing_steps} training steps of each L, in turn", flush=True)
    speed = interleaved_tokens_per_sec({str(L): v for L, v in variants.items()}, args.timing_steps)
    rows = {L: {"final_val_loss": spread([final_evaluation(out / f"sinkgd_L{L}_seed{s}", args)["loss"]
                                          for s in range(args.seeds)]),
                "interleaved_tokens_per_sec": speed[str(L)]} for L in ABLATION_ITERS}
    summary = setup(args, passthrough) | {"seeds": args.seeds, "by_sinkhorn_iters": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nSinkGD (lr 0.02, alpha 0.05), {args.model}, {args.max_steps} steps, {args.data_dir}, {args.seeds} "
          f"seed(s); {summary['device']}\n\n| L | final val loss, mean ± std | tokens/s (interleaved) |\n"
          "|---|---|---|")
    for L, r in rows.items():
        loss = r["final_val_loss"]
        print(f"| {L} | {loss['mean']:.3f} ± {loss['std']:.3f} | {r['interleaved_tokens_per_sec']:.0f} |")
    plot_groups({f"L = {L}": [out / f"sinkgd_L{L}_seed{s}" for s in range(args.seeds)] for L in ABLATION_ITERS},
                out / "curves.png")
    return summary


# --------------------------------------------------------------------------------------------------
# Plots.


def plot_runs(run_dirs, out_path) -> bool:
    """Each run on its own (the plot command)."""
    return plot_groups({Path(d).name: [Path(d)] for d in run_dirs}, out_path)


def plot_groups(groups: dict[str, list[Path]], out_path, title: str | None = None) -> bool:
    """Per group of runs (the seeds of one optimizer): validation loss, mean line with a min-max band over the runs,
    and the mean train loss (faint), against steps and against mean wall-clock time, in type that stays legible at
    a README's width. Returns False, saying why, when matplotlib is not installed: only the plots need it."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed, so no plot was written: pip install matplotlib", file=sys.stderr)
        return False
    with matplotlib.rc_context({"font.size": 14}):
        fig = Figure(figsize=(12, 4.5), layout="constrained")
        by_step, by_time = fig.subplots(1, 2, sharey=True)
        top = []  # the highest validation loss: train loss spikes above it are cut
        for i, (label, run_dirs) in enumerate(groups.items()):
            runs = [read_metrics(d) for d in run_dirs]
            for key, style in (("train_loss", dict(alpha=0.25, linewidth=1)),
                               ("val_loss", dict(marker="o", markersize=4, linewidth=2.5))):
                steps = sorted(set.intersection(*({m["step"] for m in r if key in m} for r in runs)))
                values = np.array([[next(m[key] for m in r if m["step"] == s and key in m) for s in steps]
                                   for r in runs])
                elapsed = np.array([[elapsed_at(r, s) for s in steps] for r in runs]).mean(0)
                for ax, x in ((by_step, steps), (by_time, elapsed)):
                    ax.plot(x, values.mean(0), color=f"C{i % 10}", label=label if key == "val_loss" else None,
                            **style)
                    if key == "val_loss" and len(runs) > 1:
                        ax.fill_between(x, values.min(0), values.max(0), color=f"C{i % 10}", alpha=0.2)
                if key == "val_loss":
                    top.append(values.max())
        seeds = max(len(run_dirs) for run_dirs in groups.values())
        by_step.set(xlabel="step", ylabel="loss", ylim=(None, max(top) + 0.1))
        by_time.set(xlabel="wall-clock seconds (mean over seeds)")
        by_step.legend(title=f"validation{f', {seeds} seeds' if seeds > 1 else ''}; train faint")
        for ax in (by_step, by_time):
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.savefig(out_path, dpi=120)
    print(f"wrote {out_path}")
    return True


def elapsed_at(metrics: list[dict], step: int) -> float:
    """Seconds from the first logged step to the record of `step` (an evaluation-only record: the logged one
    before it)."""
    timed = [m for m in metrics if "time" in m]
    return next((m["time"] for m in reversed(timed) if m["step"] <= step), timed[0]["time"]) - timed[0]["time"]


# --------------------------------------------------------------------------------------------------
# Memory: weights + optimizer state, estimated as in the paper's tables and measured over one step.


def memory_estimate(config) -> dict:
    """Parameter counts and the bytes of weights + optimizer state in bf16: AdamW keeps two moments for every
    parameter; the hybrids keep them only for the AdamW group (embedding, norms, head), where Muon keeps one momentum
    buffer as large as its matrices and SinkGD none."""
    with torch.device("meta"):  # shapes only
        model = Llama(config)
    sinkgd_group, adamw_group = sinkgd_param_groups(model, model.model.layers, lr=1.0)
    n_sinkgd = sum(p.numel() for p in sinkgd_group["params"])
    n_adamw = sum(p.numel() for p in adamw_group["params"])
    n_total = n_sinkgd + n_adamw
    return {"params": n_total, "sinkgd_params": n_sinkgd, "adamw_bytes": 2 * (n_total + 2 * n_total),
            "muon_bytes": 2 * (n_total + n_sinkgd + 2 * n_adamw), "sinkgd_bytes": 2 * (n_total + 2 * n_adamw)}


def measure_step(size: str, optimizer: str, batch_size: int, seq_len: int) -> float:
    """Peak MiB of building the model and optimizer and taking one training step (forward, backward, step), as
    train.py does it: fp32 weights (bf16 autocast on CUDA). CUDA: allocator peak; CPU: peak RSS beyond the
    interpreter's, page-granular. Run it in a fresh process (in_fresh_process), so nothing earlier counts."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    baseline = reset_peak_rss() if device.type == "cpu" else 0
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


MEMORY_OPTIMIZERS = ["adamw", "muon", "sinkgd"]


def memory_table(rows: list[dict]) -> str:
    """Estimated and measured GiB per optimizer, and SinkGD's saving against AdamW and Muon."""
    gib = lambda r, key: f"{r[key] / (2**30 if key.endswith('bytes') else 1024):.2f}" if key in r else ""
    saving = lambda r, key, other: (f"{1 - r[f'sinkgd_{key}'] / r[f'{other}_{key}']:.0%}"
                                    if f"{other}_{key}" in r else "")
    lines = ["| size | params | on SinkGD or Muon | est. GiB: AdamW, Muon, SinkGD | est. saving vs AdamW, Muon | "
             "measured GiB: AdamW, Muon, SinkGD | measured saving vs AdamW, Muon |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        measured = [gib(r, f"{o}_measured_mib") for o in MEMORY_OPTIMIZERS]
        lines.append(f"| {r['size']} | {r['params'] / 1e6:.1f}M | {r['sinkgd_params'] / 1e6:.1f}M | "
                     f"{', '.join(gib(r, f'{o}_bytes') for o in MEMORY_OPTIMIZERS)} | "
                     f"{saving(r, 'bytes', 'adamw')}, {saving(r, 'bytes', 'muon')} | "
                     f"{', '.join(measured) if all(measured) else 'not measured'} | "
                     f"{', '.join(saving(r, 'measured_mib', o) for o in ('adamw', 'muon')) if all(measured) else ''} |")
    return "\n".join(lines)


def memory(args) -> None:
    cuda = torch.cuda.is_available()
    measure = args.measure if args.measure is not None else BENCHMARK_SIZES if cuda else ["llama_60m", "llama_130m"]
    rows = []
    for size in BENCHMARK_SIZES:
        row = {"size": size} | memory_estimate(CONFIGS[size])
        for optimizer in MEMORY_OPTIMIZERS if size in measure else []:
            row[f"{optimizer}_measured_mib"] = in_fresh_process(
                "tools.experiments", "memory", "--measure_one", size, optimizer, "--batch_size", args.batch_size,
                "--seq_len", args.seq_len)
        rows.append(row)
    print(f"Weights + optimizer state. Estimate: bf16 weights and optimizer state, as in the paper's tables. "
          f"Measured: peak of one training step, fp32 weights{' with bf16 autocast' if cuda else ''}, batch "
          f"{args.batch_size} x {args.seq_len} tokens (weights, grads, state, activations), {device_name()}, torch "
          f"{torch.__version__}. Saving: SinkGD's against each.\n")
    print(memory_table(rows))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps({"device": device_name(), "torch": torch.__version__,
                                                 "batch_size": args.batch_size, "seq_len": args.seq_len,
                                                 "rows": rows}, indent=1))


# --------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    m = commands.add_parser("memory", help="memory table: bf16 estimate and measured peak of one step")
    m.add_argument("--measure", nargs="*", choices=BENCHMARK_SIZES,
                   help="sizes to measure (default: all on a GPU; llama_60m and llama_130m on a CPU)")
    m.add_argument("--batch_size", type=int, default=2)
    m.add_argument("--seq_len", type=int, default=256)
    m.add_argument("--out_dir", default="out/memory")
    m.add_argument("--measure_one", nargs=2, metavar=("SIZE", "OPTIMIZER"), help=argparse.SUPPRESS)  # the child
    for name in ("compare", "ablation"):
        c = commands.add_parser(name, help="train through train.py and summarise; other options go to train.py")
        c.add_argument("--model", default="llama_tiny", choices=list(CONFIGS))
        c.add_argument("--data_dir", default="data/demo", help="shards from prepare_c4.py (default: the demo corpus, "
                       "built on first use)")
        c.add_argument("--max_steps", type=int, default=50)
        c.add_argument("--batch_size", type=int, default=8)
        c.add_argument("--micro_batch_size", type=int, default=8)
        c.add_argument("--seq_len", type=int, default=128)
        c.add_argument("--seeds", type=int, default=3 if name == "compare" else 1)
        c.add_argument("--eval_interval", type=int, default=5, help="steps between evaluations (the resolution of "
                       "'steps to reach')")
        c.add_argument("--eval_tokens", type=int, default=32 * 129, help="validation budget of those evaluations")
        c.add_argument("--final_eval_tokens", type=int, default=10_000_000, help="validation budget of the final "
                       "evaluation and its standard error (default: all of a C4-sample or demo val split)")
        c.add_argument("--timing_steps", type=int, default=10, help="training steps timed per variant, in turn")
        c.add_argument("--out_dir", default=f"out/{name}")
        if name == "compare":
            c.add_argument("--horizons", type=int, nargs="+", help="steps at which the table gives each baseline's "
                           "gap to SinkGD, each an evaluated step (default: a third, two thirds and all of the run)")
            c.add_argument("--baselines", nargs="+", default=["adamw"], choices=["adamw", "muon"],
                           help="the optimizers SinkGD is compared with, each tuned over its lr grid")
            c.add_argument("--adamw_lrs", type=float, nargs="+", default=PAPER_ADAMW_LRS)
            c.add_argument("--muon_lrs", type=float, nargs="+", default=PAPER_ADAMW_LRS, help="Muon's lr grid "
                           "(train.py's Muon matches AdamW's update size, so AdamW's grid by default)")
            c.add_argument("--max_extensions", type=int, default=3, help="extra runs of a baseline past a grid "
                           "edge, at most")
    plot = commands.add_parser("plot", help="loss curves of any runs, from their metrics.jsonl")
    plot.add_argument("run_dirs", nargs="+")
    plot.add_argument("--out", required=True, help="PNG file to write")
    return p


def main(argv=None) -> None:
    args, passthrough = parser().parse_known_args(argv)
    if passthrough and args.command not in ("compare", "ablation"):
        parser().error(f"unrecognized arguments: {' '.join(passthrough)}")
    try:
        if args.command == "memory":
            if args.measure_one:
                print(json.dumps(measure_step(*args.measure_one, args.batch_size, args.seq_len)))
            else:
                memory(args)
        elif args.command == "plot":
            sys.exit(0 if plot_runs(args.run_dirs, args.out) else 1)
        else:
            train.parse_config(run_args(args, passthrough))  # a bad option fails here, before any run
            if args.command == "compare" and any(not 0 < h <= args.max_steps or h % args.eval_interval and
                                                 h != args.max_steps for h in args.horizons or []):
                raise train.ConfigError(f"--horizons must be steps that are evaluated: multiples of --eval_interval "
                                        f"{args.eval_interval} up to --max_steps {args.max_steps}, got {args.horizons}")
            {"compare": compare, "ablation": ablation}[args.command](args, passthrough)
    except (train.ConfigError, FileNotFoundError, subprocess.CalledProcessError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
