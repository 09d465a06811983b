"""Optimizer step time and memory on the transformer-block matrices of a LLaMA config.

    python bench_optimizer.py                       # llama_60m and llama_130m, on CUDA if present
    python bench_optimizer.py --configs llama_60m --repeats 30

Every optimizer updates the same matrices (attention q/k/v/o, MLP gate/up/down: the parameters SinkGD
owns in the paper's split) from the same gradients. Step times are medians over interleaved repeats,
reported as ratios to torch.optim.AdamW measured in the same run. Memory: persistent = optimizer state
bytes; transient = peak extra memory during a step beyond weights, grads and state (CUDA: allocator
peak; CPU: peak RSS of a fresh subprocess per optimizer, page-granular).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from model import CONFIGS
from sinkgd import SinkGD, swan


class SWAN(torch.optim.Optimizer):
    """Stateless like SinkGD, with SWAN's standardise + whiten in place of SR-Sinkhorn (for comparison)."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(swan(p.grad), alpha=-group["lr"])


OPTIMIZERS = {
    "SGD (floor)": lambda ps: torch.optim.SGD(ps, lr=1e-3),
    "AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "AdamW (for-loop)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    "SinkGD L=1": lambda ps: SinkGD(ps, lr=1e-3, sinkhorn_iters=1),
    "SinkGD L=5": lambda ps: SinkGD(ps, lr=1e-3, sinkhorn_iters=5),
    "SWAN": lambda ps: SWAN(ps, lr=1e-3),
}
BASELINE = "AdamW (foreach)"


def block_matrices(config_name, device):
    cfg = CONFIGS[config_name]
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = [(d, d)] * 4 + [(f, d), (f, d), (d, f)]
    gen = torch.Generator(device).manual_seed(0)
    params = []
    for _ in range(cfg.num_hidden_layers):
        for shape in shapes:
            p = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen) * 0.02)
            p.grad = torch.randn(shape, device=device, generator=gen) * 1e-3
            params.append(p)
    return params


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t))


def time_steps(config_name, device, repeats, names):
    params = block_matrices(config_name, device)
    opts = {name: OPTIMIZERS[name](params) for name in names}
    times = {name: [] for name in names}
    for name in names:  # warm-up, and AdamW allocates its state
        opts[name].step()
    for _ in range(repeats):
        for name in names:  # interleaved, so machine noise hits every optimizer alike
            sync(device)
            t0 = time.perf_counter()
            opts[name].step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, params


def proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def memory_of(config_name, name, device):
    """(persistent state bytes, transient peak bytes beyond weights, grads and state) of one step,
    after a warm-up step that allocates the state and initialises the libraries."""
    params = block_matrices(config_name, device)
    opt = OPTIMIZERS[name](params)
    opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        # Peak RSS since a reset (Linux: clear_refs 5 resets VmHWM). The parent runs this in a child
        # whose malloc maps every large block on its own, so a freed tensor leaves RSS at once.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = proc_status_bytes("VmRSS")
        opt.step()
        peak = proc_status_bytes("VmHWM")
    return state_bytes(opt), max(peak - base, 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["llama_60m", "llama_130m"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory_of", nargs=2, metavar=("CONFIG", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:  # child process of the CPU memory measurement
        print(json.dumps(memory_of(*args.memory_of, args.device)))
        return

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device_name}; torch {torch.__version__}")
    for config_name in args.configs:
        fast = [n for n in OPTIMIZERS if n != "SWAN"]
        times, params = time_steps(config_name, args.device, args.repeats, fast)
        times.update(time_steps(config_name, args.device, max(2, args.repeats // 5), ["SWAN", BASELINE])[0])
        largest = max(p.numel() for p in params) * 4
        print(f"\n{config_name}: {len(params)} matrices, {sum(p.numel() for p in params) / 1e6:.1f}M params, "
              f"largest float32 matrix {largest / 2**20:.1f} MiB")
        print("| optimizer | step ms | vs AdamW | state MiB | transient MiB | transient / largest matrix |")
        print("|---|---|---|---|---|---|")
        for name in OPTIMIZERS:
            if args.device == "cuda":
                persistent, transient = memory_of(config_name, name, args.device)
            else:
                out = subprocess.run([sys.executable, __file__, "--memory_of", config_name, name,
                                      "--device", args.device], capture_output=True, text=True, check=True,
                                     env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"})
                persistent, transient = json.loads(out.stdout)
            print(f"| {name} | {times[name] * 1e3:.1f} | {times[name] / times[BASELINE]:.2f}x | "
                  f"{persistent / 2**20:.0f} | {transient / 2**20:.1f} | {transient / largest:.2f} |")


if __name__ == "__main__":
    main()
