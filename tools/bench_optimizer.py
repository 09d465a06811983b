"""Optimizer step time and memory on the transformer-block matrices of a LLaMA config, against torch's AdamW.

    python -m tools.bench_optimizer                       # llama_60m and llama_130m, on CUDA if present
    python -m tools.bench_optimizer --configs llama_60m --repeats 30

Every optimizer updates the same matrices (attention q/k/v/o, MLP gate/up/down: the parameters SinkGD owns in the
paper's split) from the same gradients. Step times are medians over interleaved repeats, reported as ratios to
torch.optim.AdamW(fused=True), the fastest torch AdamW, measured in the same run. Memory: state = optimizer state
bytes; transient = peak extra memory during a step beyond weights, grads and state (CUDA: allocator peak; CPU: peak
RSS of a fresh process per optimizer, page-granular).

This file also holds the paper's Alg. 1 (MultiNorm) written plainly, with SR-Sinkhorn (the projections of
sinkgd.sr_sinkhorn_paper) and SWAN as its instances: SWAN is the baseline whose cost SinkGD removes.
"""
import argparse
import itertools
import json
from typing import Callable

import torch
from torch import Tensor

from model import CONFIGS
from sinkgd import SinkGD, normalize_columns, normalize_rows
from tools.common import device_name, in_fresh_process, interleaved_medians, proc_status_bytes, reset_peak_rss, sync

# --------------------------------------------------------------------------------------------------
# Alg. 1 (MultiNorm) and its instances. Each projection costs a full pass over the matrix:
#   SR-Sinkhorn = multinorm(G, [normalize_rows, normalize_columns], L)   O(mn) per iteration
#   SWAN        = multinorm(G, [standardize_rows, whiten], 1)            O(min(m,n)^2 max(m,n)) per NS step


def multinorm(grad: Tensor, projections: list[Callable[[Tensor], Tensor]], num_iters: int) -> Tensor:
    """Alg. 1: apply the normalisation projections P_1, ..., P_K in turn, num_iters times."""
    x = grad
    for _ in range(num_iters):
        for project in projections:
            x = project(x)
    return x


def sr_sinkhorn_multinorm(grad: Tensor, num_iters: int = 5) -> Tensor:
    """SR-Sinkhorn as MultiNorm with projections [normalize rows, normalize columns], L passes: the steps
    of sinkgd.sr_sinkhorn_paper."""
    return multinorm(grad, [normalize_rows, normalize_columns], num_iters)


def standardize_rows(x: Tensor) -> Tensor:
    """SWAN's GradNorm: every row to zero mean and unit standard deviation."""
    std, mean = torch.std_mean(x, dim=1, keepdim=True, correction=0)
    return (x - mean) / std.clamp_min(torch.finfo(x.dtype).tiny)


def whiten(x: Tensor, ns_iters: int = 10) -> Tensor:
    """SWAN's GradWhitening (X X^T)^(-1/2) X, by the cubic Newton-Schulz iteration for the polar factor. Each
    iteration costs O(min(m, n)^2 max(m, n)) in matmuls: the cost that SinkGD removes."""
    if x.shape[0] > x.shape[1]:  # same polar factor, smaller Gram matrix
        return whiten(x.T, ns_iters).T
    y = x / torch.linalg.matrix_norm(x).clamp_min(torch.finfo(x.dtype).tiny)  # singular values <= 1
    for _ in range(ns_iters):
        y = 1.5 * y - 0.5 * (y @ y.T) @ y
    return y


def swan(grad: Tensor, ns_iters: int = 10) -> Tensor:
    """SWAN (Ma et al. 2024) as MultiNorm with projections [standardize rows, whiten], one pass."""
    return multinorm(grad.float(), [standardize_rows, lambda x: whiten(x, ns_iters)], num_iters=1)


class SWAN(torch.optim.Optimizer):
    """Stateless like SinkGD, with SWAN's standardise + whiten in place of SR-Sinkhorn (for comparison)."""

    def __init__(self, params, lr=1e-3):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(swan(p.grad), alpha=-group["lr"])


# --------------------------------------------------------------------------------------------------
# The benchmark.


class ZeroPathSinkGD:
    """What ZeroSinkGD steps under ZeRO-Offload, on one rank holding every matrix, over a flat fp32 partition (the
    matrices end to end): sinkgd_cpu.step_partition (its default on the CPU; whole_matrices=False: every matrix by
    blocks, as at ZeRO-3), or with cpu_kernel=False sinkgd_zero's sr_sinkhorn_sharded, then W <- W - lr X."""

    def __init__(self, params, lr=1e-3, sinkhorn_iters=5, cpu_kernel=None, whole_matrices=True):
        from sinkgd_zero import Partition, matrix_pieces
        shapes = [p.shape for p in params]
        offsets = list(itertools.accumulate((p.numel() for p in params), initial=0))
        self.weight = torch.cat([p.detach().reshape(-1) for p in params])
        self.grad = torch.cat([p.grad.reshape(-1) for p in params])
        pieces = matrix_pieces(zip(shapes, offsets), 0, offsets[-1], 0)
        self.part, self.lr, self.iters = Partition(pieces, None, params[0].device), lr, sinkhorn_iters
        self.workspace = torch.empty_like(self.grad)  # X's memory, kept as ZeroSinkGD keeps it
        self.state, self.cpu_kernel, self.whole_matrices = {}, cpu_kernel, whole_matrices  # stateless

    def step(self):
        import sinkgd_cpu
        from sinkgd_zero import sr_sinkhorn_sharded
        flat = torch.nn.Parameter(self.weight, requires_grad=False)  # the same memory
        flat.grad, group = self.grad, dict(sinkhorn_iters=self.iters, lr=self.lr, weight_decay=0.0)
        if sinkgd_cpu.step_partition(self, flat, self.part, group, lambda t, op: t, self.workspace,
                                     self.whole_matrices):
            return
        X = sr_sinkhorn_sharded(self.grad, self.part, self.iters, lambda t, op: t, out=self.workspace)  # one rank
        self.weight.add_(X, alpha=-self.lr)


def deepspeed_cpu_adam(params):
    """DeepSpeed's CPU Adam (what ZeRO-Offload steps by default), where its extension builds."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    return DeepSpeedCPUAdam(params, lr=1e-3, adamw_mode=True)


OPTIMIZERS = {
    "SGD (floor)": lambda ps: torch.optim.SGD(ps, lr=1e-3),
    "DeepSpeedCPUAdam": deepspeed_cpu_adam,
    "AdamW (fused)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "SinkGD L=1": lambda ps: SinkGD(ps, lr=1e-3, sinkhorn_iters=1),
    "SinkGD L=5": lambda ps: SinkGD(ps, lr=1e-3, sinkhorn_iters=5),  # the CPU: sinkgd_cpu's kernel
    "SinkGD L=5, eager (a GPU's step)": lambda ps: SinkGD(ps, lr=1e-3, cpu_kernel=False),
    "SinkGD L=5, eager, one matrix at a time": lambda ps: SinkGD(ps, lr=1e-3, stack_bytes={}, cpu_kernel=False),
    "SinkGD L=5, eager, 64 MiB stacks": lambda ps: SinkGD(ps, lr=1e-3, stack_bytes={"cpu": 2**26, "cuda": 2**26},
                                                          cpu_kernel=False),
    "SinkGD L=5, ZeRO's path (sinkgd_zero)": ZeroPathSinkGD,  # the CPU: sinkgd_cpu's kernel
    "SinkGD L=5, ZeRO's path, by blocks (ZeRO-3)": lambda ps: ZeroPathSinkGD(ps, whole_matrices=False),
    "SinkGD L=5, ZeRO's path, eager": lambda ps: ZeroPathSinkGD(ps, cpu_kernel=False),
    "SWAN": lambda ps: SWAN(ps, lr=1e-3),
}
BASELINE = "AdamW (fused)"  # torch's fastest AdamW, on the CPU as on CUDA


def block_matrices(config_name: str, device) -> list[torch.nn.Parameter]:
    cfg = CONFIGS[config_name]
    d, f = cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator(device).manual_seed(0)
    params = []
    for _ in range(cfg.num_hidden_layers):
        for shape in [(d, d)] * 4 + [(f, d), (f, d), (d, f)]:
            p = torch.nn.Parameter(torch.randn(shape, device=device, generator=gen) * 0.02)
            p.grad = torch.randn(shape, device=device, generator=gen) * 1e-3
            params.append(p)
    return params


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def memory_of(config_name: str, name: str, device) -> tuple[int, int]:
    """(state bytes, transient peak bytes beyond weights, grads and state) of one step, after a warm-up step that
    allocates the state and initialises the libraries. On CPU, run it in a fresh process (in_fresh_process)."""
    opt = OPTIMIZERS[name](block_matrices(config_name, device))
    opt.step()
    sync(device)
    if torch.device(device).type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        sync(device)
        return state_bytes(opt), torch.cuda.max_memory_allocated() - base
    base = reset_peak_rss()
    opt.step()
    return state_bytes(opt), max(proc_status_bytes("VmHWM") - base, 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["llama_60m", "llama_130m"], choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory_of", nargs=2, metavar=("CONFIG", "OPTIMIZER"), help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(memory_of(*args.memory_of, args.device)))
        return

    print(f"device: {device_name(args.device)}; torch {torch.__version__}")
    for config_name in args.configs:
        params = block_matrices(config_name, args.device)
        optimizers = {}
        for name in OPTIMIZERS:
            try:
                optimizers[name] = OPTIMIZERS[name](params)
            except Exception as e:  # noqa: BLE001  (DeepSpeedCPUAdam: its C++ extension may not build here)
                print(f"{name}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        fast = {name: opt.step for name, opt in optimizers.items() if name != "SWAN"}
        times = interleaved_medians(fast, args.repeats, args.device)
        slow = {name: optimizers[name].step for name in ("SWAN", BASELINE)}  # SWAN is ~50x slower: fewer repeats
        times["SWAN"] = interleaved_medians(slow, max(2, args.repeats // 5), args.device)["SWAN"]
        largest = max(p.numel() for p in params) * 4
        print(f"\n{config_name}: {len(params)} matrices, {sum(p.numel() for p in params) / 1e6:.1f}M params, "
              f"largest float32 matrix {largest / 2**20:.1f} MiB")
        print("| optimizer | step ms | vs AdamW | state MiB | transient MiB | transient / largest matrix |")
        print("|---|---|---|---|---|---|")
        for name in optimizers:
            if torch.device(args.device).type == "cuda":
                persistent, transient = memory_of(config_name, name, args.device)
            else:
                persistent, transient = in_fresh_process("tools.bench_optimizer", "--memory_of", config_name, name,
                                                         "--device", args.device)
            print(f"| {name} | {times[name] * 1e3:.1f} | {times[name] / times[BASELINE]:.2f}x | "
                  f"{persistent / 2**20:.0f} | {transient / 2**20:.1f} | {transient / largest:.2f} |")


if __name__ == "__main__":
    main()
