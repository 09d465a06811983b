"""SinkGD (Sinkhorn Gradient Descent), from "Gradient Multi-Normalization for Stateless and
Scalable LLM Training" (Scetbon, Ma, Gong, Meeds; arXiv 2502.06742). `sr_sinkhorn_paper` is Alg. 3
as the paper writes it, `sr_sinkhorn` its fast form, `SinkGD` Alg. 4. The paper's split into SinkGD
and AdamW groups, `sinkgd_param_groups`, is in sinkgd_split.py."""
import itertools
import math
from collections import defaultdict
from typing import Callable, NamedTuple

import torch
from torch import Tensor
from torch.optim.adamw import adamw

import sinkgd_cpu
from sinkgd_dtensor import (Split, found_inf, gradient, largest_shard, local, place_gradient,
                            split_of, stepped, whole)
from sinkgd_split import check_group, check_unchanged
from sinkgd_split import describe_split, sinkgd_param_groups  # noqa: F401  (re-exported)

# ---------------------------------------------------------------------------------------------
# Alg. 3 as the paper writes it. G is (m, n), or a stack (..., m, n) of matrices, each on its own.


def normalize_rows(X: Tensor) -> Tensor:
    """X <- sqrt(n) Q(X)^-1 X: every row to l2 norm sqrt(n). A zero row stays zero."""
    Q = torch.linalg.vector_norm(X, dim=-1, keepdim=True)  # (..., m, 1): the rows' norms
    return torch.where(Q > 0, math.sqrt(X.shape[-1]) * X / Q, 0.0)


def normalize_columns(X: Tensor) -> Tensor:
    """X <- sqrt(m) X R(X)^-1: every column to l2 norm sqrt(m). A zero column stays zero."""
    R = torch.linalg.vector_norm(X, dim=-2, keepdim=True)  # (..., 1, n): the columns' norms
    return torch.where(R > 0, math.sqrt(X.shape[-2]) * X / R, 0.0)


def sr_sinkhorn_paper(G: Tensor, num_iters: int = 5) -> Tensor:
    """Alg. 3, L = num_iters times rows then columns, in G's dtype. The definition that
    sr_sinkhorn is tested against; slow, and in float32 a tiny gradient's squares underflow."""
    X = G
    for _ in range(num_iters):
        X = normalize_rows(X)
        X = normalize_columns(X)
    return X


# ---------------------------------------------------------------------------------------------
# Alg. 3, fast form. Three parts: prescale, iterate, rebuild.
#
# The numerics. Every iterate is X = diag(r) G diag(c), so the loop keeps only u = r^2 (m,) and
# v = c^2 (n,), and B = G^2 taken entrywise: row i's squared norm is u_i (B v)_i, column j's is
# v_j (B^T u)_j. Each row of G is first divided by its largest magnitude; X does not change, as
# its first step normalizes the rows, and B <= 1 cannot overflow. An entry at most 2^-63
# (~1.08e-19) times its row's largest magnitude squares below float32's normal range and is left
# out of the sums (float64: 2^-511), a change below their rounding. The gauge (u, v) ->
# (u t, v / t) leaves X unchanged; before the last iteration v is scaled so that its smallest
# nonzero entry is 1, which keeps u <= n whatever G's dynamic range. A zero row or column has a
# zero sum; its scaling is set to 0, so it stays zero and adds nothing to the other sums. The
# products follow torch.set_float32_matmul_precision: "highest" (torch's default) gives Alg. 3 to
# float32 rounding; "high" (TF32) or "medium" (bf16) leave ~1e-3 in X.


def work_dtype(grad: Tensor) -> torch.dtype:  # float32 for bf16 and float32, float64 for float64
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


def row_abs_max(G: Tensor) -> Tensor:  # (..., m, n) -> (..., m); two reductions beat aminmax
    if not G.shape[-1]:  # a shard with no columns
        return G.new_zeros(G.shape[:-1], dtype=work_dtype(G))
    return torch.maximum(G.amax(dim=-1), G.amin(dim=-1).neg()).to(work_dtype(G))


def prescale(G: Tensor, row_max: Tensor, out: Tensor | None = None) -> Tensor:
    """B = (G / row max)^2 with row_max (..., m, 1); entries below the normal range are zero."""
    tiny, eps = torch.finfo(row_max.dtype).tiny, torch.finfo(row_max.dtype).eps
    B = torch.div(G, row_max.clamp_min(tiny * eps), out=out).square_()  # zero rows: 0 / (tiny eps)
    return torch.nn.functional.threshold_(B, tiny, 0.0)


class Sums(NamedTuple):
    """Alg. 3's reductions of B, each over every element of a matrix, however the matrix is held:
    whole here, in pieces over ranks in sinkgd_zero.py (partial sums, then an all-reduce)."""
    rows: Callable[[Tensor], Tensor]  # v -> B v: each row's sum of B_ij v_j
    cols: Callable[[Tensor], Tensor]  # u -> B^T u: each column's sum of u_i B_ij
    col_max: Callable[[Tensor], Tensor]  # s -> the largest s_j of each matrix, for the gauge


def sinkhorn(sums: Sums, v: Tensor, n, m, num_iters: int) -> tuple[Tensor, Tensor]:
    """The L iterations of Alg. 3 on the squared scalings (u, v), from v (all ones). n and m: each
    row's and each column's target squared norm (numbers, or one per row or column)."""
    for i in range(num_iters):
        # X <- sqrt(n) Q(X)^-1 X: u_i (B v)_i = n
        u = torch.div(n, sums.rows(v)).nan_to_num_(posinf=0.0)
        # X <- sqrt(m) X R(X)^-1: v_j (B^T u)_j = m; up to the gauge before the last iteration
        s = sums.cols(u)
        v = torch.div(m if i == num_iters - 1 else sums.col_max(s), s).nan_to_num_(posinf=0.0)
    return u, v


def rebuild(G: Tensor, row_max: Tensor, u: Tensor, v: Tensor, out: Tensor) -> Tensor:
    """X = diag(r) G diag(c), r = sqrt(u) / row max (.., m, 1), c = sqrt(v) (.., 1, n), in out."""
    tiny, eps = torch.finfo(row_max.dtype).tiny, torch.finfo(row_max.dtype).eps
    r = u.sqrt().div_(row_max.clamp_min(tiny * eps))  # as in prescale; zero rows: u = 0
    return torch.mul(G, r, out=out).mul_(v.sqrt())


def sr_sinkhorn(grad: Tensor | list[Tensor], num_iters: int = 5, out: Tensor | None = None,
                split: Split | None = None) -> Tensor:
    """Alg. 3 of every trailing (m, n) matrix of grad, like sr_sinkhorn_paper, in float32
    (float64 if grad is). grad may be a list of same-shape tensors, each read where it lies, X
    then stacked. X is written into `out` (contiguous, X's shape) when given. split: grad's
    matrices are pieces of larger ones, held over ranks (sinkgd_dtensor.py)."""
    shape = grad.shape if torch.is_tensor(grad) else (len(grad), *grad[0].shape)  # X's shape
    if len(shape) < 2:
        raise ValueError(f"sr_sinkhorn expects a matrix or a stack of matrices, got shape {shape}")
    across_rows, across_cols, m, n = split or (whole, whole, *shape[-2:])
    Gs = [g.reshape(math.prod(g.shape[:-2]), *shape[-2:])  # (k_i, m, n) views; k_i may be 0
          for g in (grad if isinstance(grad, list) else [grad])]
    at = list(itertools.accumulate((len(g) for g in Gs), initial=0))  # Gs[i]: matrices at[i]:..
    B = (torch.empty(at[-1], *shape[-2:], dtype=work_dtype(Gs[0]), device=Gs[0].device)
         if out is None else out.view(at[-1], *shape[-2:]))  # (k, m, n)
    # 1. prescale: B = (G / row max)^2
    row_max = [row_abs_max(g) for g in Gs]
    row_max = across_cols(row_max[0] if len(Gs) == 1 else torch.cat(row_max), "max")[..., None]
    for G, a, b in zip(Gs, at, at[1:]):
        prescale(G, row_max[a:b], out=B[a:b])
    # 2. iterate, on u (k, 1, m) and v (k, 1, n) as row vectors: v B^T is the CPU's fast bmm
    B_t = B.mT
    sums = Sums(rows=lambda v: across_cols(torch.bmm(v, B_t), "sum"),
                cols=lambda u: across_rows(torch.bmm(u, B), "sum"),
                col_max=lambda s: across_cols(s.amax(dim=-1, keepdim=True) if s.shape[-1] else
                                              s.new_zeros(len(s), 1, 1), "max"))  # per matrix
    u, v = sinkhorn(sums, B.new_ones(len(B), 1, shape[-1]), n, m, num_iters)
    # 3. rebuild: X = diag(r) G diag(c), in B's memory
    for G, a, b in zip(Gs, at, at[1:]):
        rebuild(G, row_max[a:b], u.mT[a:b], v[a:b], out=B[a:b])
    return B.view(shape)


# ---------------------------------------------------------------------------------------------
# Alg. 4. STACK_BYTES: float32 X per stack, and a GPU's copy of its gradients, per device type
# (absent: one matrix at a time).
STACK_BYTES = {"cuda": 64 * 2**20, "cpu": 16 * 2**20}


class SinkGD(torch.optim.Optimizer):
    """Alg. 4. A group with sinkgd=True holds matrices (or stacks: MoE experts), keeps no state:
        W <- (1 - lr * weight_decay) W - lr * sr_sinkhorn(grad, sinkhorn_iters)
    Groups with sinkgd=False (the paper's embedding, norms, head) step by torch's fused AdamW.
    transposed=True: weights stored (..., in, out). experts=E: E matrices flattened along rows.
    Same-shape matrices run as one sr_sinkhorn per stack of at most stack_bytes (bytes, or a dict
    per device type). DTensor shards (FSDP2, tensor parallel) are read where they lie, each
    gradient first laid out as its parameter; a missing one reads as zeros. A non-finite
    gradient raises FloatingPointError, or with skip_nonfinite=True sets `overflow`; either way no
    weight or AdamW state changes. cpu_kernel: the step of float32/float64 row-major matrices on
    the CPU in sinkgd_cpu.py's C++ kernel (True), eagerly (False), or the kernel where it builds."""

    def __init__(self, params, lr: float = 1e-3, sinkhorn_iters: int = 5, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, sinkgd: bool = True,
                 transposed: bool = False, skip_nonfinite: bool = False,
                 stack_bytes: int | dict[str, int] = STACK_BYTES, cpu_kernel: bool | None = None):
        if not (lr > 0 and sinkhorn_iters >= 1 and weight_decay >= 0):
            raise ValueError(f"need lr > 0, sinkhorn_iters >= 1, weight_decay >= 0; got lr={lr}, "
                             f"sinkhorn_iters={sinkhorn_iters}, weight_decay={weight_decay}")
        per_device = stack_bytes.values() if isinstance(stack_bytes, dict) else [stack_bytes]
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in per_device):
            raise ValueError("stack_bytes must be a number of bytes >= 0 or a dict of them per "
                             f"device type, e.g. {{'cuda': 64 << 20}}; got {stack_bytes!r}")
        self.matrix_shapes: list[list[torch.Size]] = []  # per group: step() checks they hold
        # fused=True is the AdamW groups' math; load_state_dict then keeps `step` on the device
        super().__init__(params, dict(lr=lr, sinkhorn_iters=sinkhorn_iters, betas=betas, eps=eps,
                                      weight_decay=weight_decay, sinkgd=sinkgd,
                                      transposed=transposed, fused=True))
        self.skip_nonfinite, self.overflow, self.stack_bytes = skip_nonfinite, False, stack_bytes
        self.cpu_kernel = cpu_kernel and sinkgd_cpu.kernel(required=True) is not None  # built now

    @torch.no_grad()
    def step(self, closure=None):
        self._check_matrices()
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        for p in (p for g in self.param_groups for p in g["params"] if hasattr(p, "placements")):
            p.grad = None if p.grad is None else place_gradient(p)  # laid out as p
        found_inf = self._found_inf()  # 1.0 on the device if any gradient is not finite
        for group in self.param_groups:
            (self._sinkgd_update if group["sinkgd"] else self._adamw_update)(group, found_inf)
        self.overflow = found_inf is not None and bool(found_inf)  # the one host sync, last
        if self.overflow and not self.skip_nonfinite:
            raise FloatingPointError("SinkGD.step: non-finite gradient, no weight was updated")
        return loss

    def _sinkgd_update(self, group: dict, found_inf: Tensor | None) -> None:
        experts = group.get("experts")  # E experts flattened along the rows (DBRX)

        def as_paper(t):  # (..., out features, in features), each expert its own matrix
            t = t.view(experts, -1, t.shape[-1]) if experts else t
            return t.mT if group["transposed"] else t
        stacks, workspace = self._stacks(group)  # workspace: X of each stack in turn
        for stack in stacks:
            grads = [as_paper(gradient(p)) for p in stack]  # a DTensor's: its shard's
            weights = [as_paper(local(p)) for p in stack]
            if sinkgd_cpu.step_stack(self, stack, grads, weights, workspace, group, found_inf):
                continue  # stepped in sinkgd_cpu.py's kernel
            # one copy of the stack where a kernel costs more than a pass over it (a GPU)
            G = grads if len(grads) == 1 or grads[0].is_cpu else torch.stack(grads)
            X = sr_sinkhorn(G, group["sinkhorn_iters"], workspace[:len(grads) * grads[0].numel()],
                            split_of(stack[0]))
            self._apply(weights, X, group, found_inf)
            del G  # before the next stack's copy is made

    @staticmethod
    def _apply(weights: list[Tensor], X: Tensor, group: dict, found_inf: Tensor | None) -> None:
        """W <- (1 - lr * weight_decay) W - lr * X for each weight; nothing on a skipped step."""
        lr, weight_decay = group["lr"], group["weight_decay"]
        if found_inf is not None and (found_inf.device.type != "cpu" or found_inf.item()):
            X.masked_fill_(found_inf > 0, 0.0)  # a pass over X: on the CPU (read free) if skipped
        if weight_decay:
            keep = 1 if found_inf is None else 1 - found_inf  # 0 on a skipped step
            torch._foreach_mul_(weights, 1 - lr * weight_decay * keep)
        torch._foreach_add_(weights, X.unbind(0), alpha=-lr)

    def _adamw_update(self, group: dict, found_inf: Tensor | None) -> None:
        """torch.optim.AdamW(fused=True)'s math, on its state, made on first use."""
        params = [p for p in group["params"] if stepped(p)]
        for p in params:
            self.state[p] = self.state[p] or dict(step=torch.zeros((), device=p.device),
                                                  exp_avg=torch.zeros_like(p),
                                                  exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        adamw([local(p) for p in params], [gradient(p) for p in params],
              [local(s["exp_avg"]) for s in states], [local(s["exp_avg_sq"]) for s in states], [],
              [s["step"] for s in states], fused=True,
              found_inf=found_inf, amsgrad=False, beta1=group["betas"][0],
              beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False)

    # -----------------------------------------------------------------------------------------
    # Below Alg. 4: the stacks, the checks of what a step is given, the finiteness flag.

    def _stacks(self, group: dict) -> tuple[list[list[Tensor]], Tensor | None]:
        """The matrices with gradients by shape, dtype and device, in stacks of at most stack_bytes
        of float32 X (a GPU's: and the gradients' copy), at least one matrix; and a workspace."""
        by_shape, stacks = defaultdict(list), []
        for p in filter(stepped, group["params"]):  # the same on every rank, as the keys are
            split = (tuple(p.placements), p.device_mesh) if hasattr(p, "placements") else None
            by_shape[p.shape, split, (p if p.grad is None else p.grad).dtype, p.device].append(p)
        for (_, _, dtype, device), same in by_shape.items():
            budget = self.stack_bytes
            budget = budget.get(device.type, 0) if isinstance(budget, dict) else budget
            per = 4 + (dtype.itemsize if device.type != "cpu" else 0)  # X, and a copy of G on a GPU
            k = max(1, budget // (max(1, largest_shard(same[0])) * per))
            stacks += [same[i:i + k] for i in range(0, len(same), k)]
        if not stacks:
            return [], None
        first = gradient(stacks[0][0])
        return stacks, torch.empty(max(len(s) * local(s[0]).numel() for s in stacks),
                                   dtype=work_dtype(first), device=first.device)

    def _check_matrices(self) -> None:  # sinkgd_zero.ZeroSinkGD: except its partitions
        check_unchanged(self.param_groups, self.matrix_shapes)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        check_group(self.param_groups[-1], len(self.param_groups) - 1)
        self.matrix_shapes.append([p.shape for p in self.param_groups[-1]["params"]])

    def _found_inf(self) -> Tensor | None:  # sinkgd_zero.ZeroSinkGD: None, DeepSpeed checks
        return found_inf([p for group in self.param_groups for p in group["params"] if stepped(p)])
