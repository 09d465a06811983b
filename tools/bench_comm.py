"""Bytes communicated per optimizer step under DeepSpeed ZeRO: SinkGD vs AdamW at the same stage.

    torchrun --nproc_per_node 2 -m tools.bench_comm                     # llama_tiny, ZeRO 0-3, CPU (gloo)
    torchrun --nproc_per_node 2 -m tools.bench_comm --stages 2 3 --steps 5 --breakdown
    deepspeed --num_gpus 8 --module tools.bench_comm --model llama_60m --bf16   # GPUs (nccl)

Both optimizers are built exactly as train.py builds them (train.build_optimizer, zero.initialize on
ds_config.json with the stage replaced) and trained for a few steps on random tokens. Every collective
is counted by wrapping torch.distributed before DeepSpeed starts, so DeepSpeed's own traffic and the
plain torch.distributed.all_reduce calls of sinkgd_zero.py are both seen. Steps after --warmup are counted,
split into forward, backward, engine.step outside the optimizer (ZeRO: gradient reduction, parameter
all-gather, grad norm) and the client optimizer's own step().

Bytes are the size of each collective's full logical buffer: the tensor of an all-reduce, the output
of an all-gather, the input of a reduce-scatter. "ring B/rank" converts them to what one rank sends
with ring algorithms (all-reduce 2(p-1)/p, all-gather and reduce-scatter (p-1)/p of the buffer).

Expected: under ZeRO 1-3 SinkGD's step all-reduces, per flat partition of its matrices, the row
maxima (m floats each) and then, per Sinkhorn iteration, the m- and n-length partial sums:
4 * ((L + 1) * sum(m) + L * sum(n)) bytes. AdamW's step sends nothing, and neither optimizer all-reduces a
finiteness flag (DeepSpeed's ZeRO optimizer skips a non-finite step before calling them).
At stage 0 gradients arrive whole, so SinkGD adds nothing. The "predicted" column is this formula.
"""
import argparse
import functools
import inspect
import json
import os
import sys
import tempfile
import warnings
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch import nn


class CommCounter:
    """Counts calls and bytes of torch.distributed collectives, keyed by (phase, op).

    install() must run before deepspeed.init_distributed: DeepSpeed's backend keeps references to
    all_gather_into_tensor / reduce_scatter_tensor taken at that point."""

    # op -> (argument holding the full buffer, multiplier of its size, ring bytes sent per rank / buffer)
    OPS = {
        "all_reduce": ("tensor", 1, lambda p: 2 * (p - 1) / p),
        "all_reduce_coalesced": ("tensors", 1, lambda p: 2 * (p - 1) / p),
        "reduce": ("tensor", 1, lambda p: 1.0),
        "broadcast": ("tensor", 1, lambda p: 1.0),
        "all_gather": ("tensor_list", 1, lambda p: (p - 1) / p),
        "all_gather_coalesced": ("output_tensor_lists", 1, lambda p: (p - 1) / p),
        "all_gather_single": ("output_tensor", 1, lambda p: (p - 1) / p),
        "all_gather_into_tensor": ("output_tensor", 1, lambda p: (p - 1) / p),
        "_all_gather_base": ("output_tensor", 1, lambda p: (p - 1) / p),
        "reduce_scatter": ("input_list", 1, lambda p: (p - 1) / p),
        "reduce_scatter_single": ("input", 1, lambda p: (p - 1) / p),
        "reduce_scatter_tensor": ("input", 1, lambda p: (p - 1) / p),
        "_reduce_scatter_base": ("input", 1, lambda p: (p - 1) / p),
        "all_to_all_single": ("input", 1, lambda p: (p - 1) / p),
        "all_to_all": ("input_tensor_list", 1, lambda p: (p - 1) / p),
        "gather": ("tensor", "world", lambda p: (p - 1) / p),  # each rank's piece, times the ranks
        "scatter": ("tensor", "world", lambda p: (p - 1) / p),
        "send": ("tensor", 1, lambda p: 1.0),
        "isend": ("tensor", 1, lambda p: 1.0),
        "recv": ("tensor", 1, lambda p: 0.0),  # the sender counts it
        "irecv": ("tensor", 1, lambda p: 0.0),
    }

    def __init__(self):
        self.phase = "other"
        self.counts = defaultdict(lambda: [0, 0, 0.0])  # (phase, op) -> [calls, bytes, ring bytes/rank]
        self._inside = 0  # > 0 while in a counted op: its internal calls are not counted again
        self._paused = False

    def install(self) -> "CommCounter":
        for op in self.OPS:
            for module in (dist, c10d):  # the same functions, reachable under two names
                fn = getattr(module, op, None)
                if fn is not None and not getattr(fn, "_comm_counted", False):
                    setattr(module, op, self._wrap(op, fn))
        return self

    def _wrap(self, op, fn):
        arg, times, ring = self.OPS[op]
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if not self._inside and not self._paused:
                bound = signature.bind_partial(*args, **kwargs).arguments
                group_size = dist.get_world_size(bound.get("group"))
                nbytes = _nbytes(bound.get(arg)) * (group_size if times == "world" else 1)
                entry = self.counts[(self.phase, op)]
                entry[0] += 1
                entry[1] += nbytes
                entry[2] += nbytes * ring(group_size)
            self._inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside -= 1

        counted._comm_counted = True
        return counted

    @contextmanager
    def tagged(self, phase):
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    @contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def reset(self):
        self.counts.clear()


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


# DeepSpeed 0.19.8 calls names that torch 2.13 deprecated (all_gather_into_tensor, ...): once is enough
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
COUNTER = CommCounter().install()  # before train.py (and through it DeepSpeed) sets anything up

import train  # noqa: E402
import zero  # noqa: E402
from model import CONFIGS, Llama  # noqa: E402
from sinkgd_zero import ZeroSinkGD  # noqa: E402

PHASES = ("forward", "backward", "engine.step", "optimizer.step", "init", "other")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama_tiny", choices=list(CONFIGS))
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    ap.add_argument("--optimizers", nargs="+", default=["adamw", "sinkgd"], choices=["adamw", "sinkgd"])
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps counted, after the warm-up")
    ap.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not counted")
    ap.add_argument("--micro_batch_size", type=int, default=2)
    ap.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--seq_len", type=int, default=32)
    ap.add_argument("--sinkhorn_iters", type=int, default=train.TrainConfig.sinkhorn_iters)
    ap.add_argument("--ds_config", default="ds_config.json", help="base config; its ZeRO stage is replaced")
    ap.add_argument("--bf16", action="store_true", help="DeepSpeed bf16 (ZeRO traffic in bf16)")
    ap.add_argument("--breakdown", action="store_true", help="also print calls and bytes per phase and op")
    ap.add_argument("--local_rank", type=int, default=-1)  # appended by the deepspeed launcher
    return ap.parse_args()


def stage_config(base_path: str, stage: int, directory: str) -> str:
    """A copy of the base DeepSpeed config with zero_optimization.stage set; returns its path."""
    with open(base_path) as f:
        config = json.load(f)
    config["zero_optimization"] = config.get("zero_optimization", {}) | {"stage": stage}
    path = os.path.join(directory, f"ds_stage{stage}_rank{dist.get_rank()}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def sinkgd_shapes(model: Llama) -> list[tuple[int, int]]:
    """(m, n) of the matrices SinkGD owns in train.py's split: nn.Linear weights of the blocks."""
    return [tuple(m.weight.shape) for m in model.model.layers.modules() if isinstance(m, nn.Linear)]


def measure(args, optimizer_name: str, stage: int, config_path: str, device) -> dict:
    """Train a fresh model for warmup + steps optimizer steps; return bytes per counted step."""
    world = dist.get_world_size()
    cfg = train.parse_config([
        "--model", args.model, "--optimizer", optimizer_name, "--seq_len", str(args.seq_len),
        "--micro_batch_size", str(args.micro_batch_size),
        "--batch_size", str(args.micro_batch_size * args.grad_accum * world),
        "--sinkhorn_iters", str(args.sinkhorn_iters), "--deepspeed_config", config_path])
    torch.manual_seed(cfg.seed)
    model = Llama(CONFIGS[cfg.model]).to(device)
    optimizer = train.build_optimizer(cfg, model, ZeroSinkGD)
    _tag_step(optimizer, "optimizer.step")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: train.lr_factor(cfg, step))
    with COUNTER.tagged("init"):
        engine = zero.initialize(zero.read_config(config_path), model, optimizer, scheduler, batch_size=cfg.batch_size,
                                 micro_batch_size=cfg.micro_batch_size, grad_clip=cfg.grad_clip, bf16=args.bf16)

    vocab = CONFIGS[cfg.model].vocab_size
    gen = torch.Generator().manual_seed(1000 + dist.get_rank())
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            COUNTER.reset()
        for _ in range(args.grad_accum):
            tokens = torch.randint(0, vocab, (args.micro_batch_size, args.seq_len + 1), generator=gen).to(device)
            with COUNTER.tagged("forward"):
                _, loss = engine(tokens[:, :-1], tokens[:, 1:])
            with COUNTER.tagged("backward"):
                engine.backward(loss)
            with COUNTER.tagged("engine.step"):  # the client optimizer's step re-tags itself
                engine.step()
    counts = {key: [v / args.steps for v in value] for key, value in COUNTER.counts.items()}

    with COUNTER.paused():  # every rank should have seen the same collectives
        total = torch.tensor([sum(v[1] for v in counts.values())], dtype=torch.float64, device=device)
        spread = torch.cat([total, -total])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        if spread[0] != -spread[1]:
            print(f"warning: ranks disagree on bytes/step: {-spread[1].item():.0f} .. {spread[0].item():.0f}",
                  file=sys.stderr)

    shapes = sinkgd_shapes(model)
    engine.destroy()
    del engine, optimizer, scheduler, model
    return {"counts": counts, "shapes": shapes}


def _tag_step(optimizer, phase: str) -> None:
    """Make optimizer.step() count its collectives under `phase`. Bound on the instance before the
    LR scheduler wraps it (the scheduler expects a bound method)."""
    step = type(optimizer).step

    def tagged_step(self, *args, **kwargs):
        with COUNTER.tagged(phase):
            return step(self, *args, **kwargs)

    optimizer.step = tagged_step.__get__(optimizer)


def predicted_extra(result: dict, stage: int, iters: int) -> int:
    """SinkGD's own bytes per step by the formula in the module docstring."""
    if stage == 0:
        return 0
    rows = sum(m for m, _ in result["shapes"])
    cols = sum(n for _, n in result["shapes"])
    return 4 * ((iters + 1) * rows + iters * cols)


def report(args, results: dict) -> None:
    world = dist.get_world_size()
    any_result = next(iter(results.values()))
    shapes = any_result["shapes"]
    rows, cols = sum(m for m, _ in shapes), sum(n for _, n in shapes)
    print(f"\n{args.model}: {world} ranks, micro-batch {args.micro_batch_size} x {args.seq_len} tokens, "
          f"{args.grad_accum} micro-batch(es)/step, {'bf16' if args.bf16 else 'fp32'}, "
          f"{args.steps} step(s) counted after {args.warmup} warm-up")
    print(f"SinkGD matrices: {len(shapes)}, sum m = {rows}, sum n = {cols}, L = {args.sinkhorn_iters}; "
          f"predicted extra = 4 * ((L+1) * sum m + L * sum n) bytes at ZeRO 1-3\n")
    header = (f"{'stage':>5} {'optimizer':>9} {'bytes/step':>14} {'ZeRO (fwd+bwd+eng)':>19} "
              f"{'in opt.step':>12} {'predicted':>10} {'extra vs AdamW':>15} {'ratio':>9} {'ring B/rank':>14} "
              f"{'ring ratio':>10}")
    print(header)
    print("-" * len(header))
    for stage in args.stages:
        base = results.get((stage, "adamw"))
        for name in args.optimizers:
            r = results[(stage, name)]
            total = sum(v[1] for v in r["counts"].values())
            ring = sum(v[2] for v in r["counts"].values())
            in_opt = sum(v[1] for (phase, _), v in r["counts"].items() if phase == "optimizer.step")
            pred = predicted_extra(r, stage, args.sinkhorn_iters) if name == "sinkgd" else 0
            if base is not None:
                base_total = sum(v[1] for v in base["counts"].values())
                base_ring = sum(v[2] for v in base["counts"].values())
                extra, ratio, ring_ratio = f"{total - base_total:,.0f}", total / base_total, ring / base_ring
            else:
                extra, ratio, ring_ratio = "-", float("nan"), float("nan")
            print(f"{stage:>5} {name:>9} {total:>14,.0f} {total - in_opt:>19,.0f} {in_opt:>12,.0f} {pred:>10,} "
                  f"{extra:>15} {ratio:>9.5f} {ring:>14,.0f} {ring_ratio:>10.5f}")
    print("\nratio: bytes/step over AdamW's at the same stage; ring ratio: the same in ring bytes sent per rank.")

    if args.breakdown:
        print(f"\n{'stage':>5} {'optimizer':>9} {'phase':>14} {'op':>24} {'calls/step':>10} {'bytes/step':>14}")
        for (stage, name), r in results.items():
            order = sorted(r["counts"].items(), key=lambda kv: (PHASES.index(kv[0][0]), kv[0][1]))
            for (phase, op), (calls, nbytes, _) in order:
                print(f"{stage:>5} {name:>9} {phase:>14} {op:>24} {calls:>10.1f} {nbytes:>14,.0f}")


def main():
    args = parse_args()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    zero.init_distributed(device_type)
    device = torch.device("cpu")
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            config_path = stage_config(args.ds_config, stage, tmp)
            for name in args.optimizers:
                results[(stage, name)] = measure(args, name, stage, config_path, device)
    if dist.get_rank() == 0:
        report(args, results)
    with COUNTER.paused():
        dist.barrier()
        dist.destroy_process_group()  # gloo's threads torn down at exit can abort the process


if __name__ == "__main__":
    main()
