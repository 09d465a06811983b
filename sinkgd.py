"""SinkGD: Sinkhorn Gradient Descent, from Scetbon, Ma, Gong, Meeds, "Gradient Multi-Normalization for Stateless
and Scalable LLM Training" (arXiv 2502.06742): `sr_sinkhorn` is Alg. 3, `SinkGD` Alg. 4 (torch's fused AdamW where the
paper has AdamW); `sinkgd_param_groups`, the paper's split, is in sinkgd_split.py. sinkgd_zero.py: Alg. 3 on DeepSpeed
ZeRO's partitions."""
from collections import defaultdict

import torch
from torch import Tensor
from torch.optim.adamw import adamw

from sinkgd_split import describe_split, sinkgd_param_groups  # noqa: F401  (the paper's split, sinkgd_split.py)


def work_dtype(grad: Tensor) -> torch.dtype:
    """float32 whatever the gradient dtype (bf16 is common); float64 stays float64."""
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


def sr_sinkhorn(grad: Tensor, num_iters: int = 5, out: Tensor | None = None) -> Tensor:
    """Alg. 3 on every trailing (m, n) matrix of G (..., m, n), each on its own: alternately rescale its rows to l2
    norm sqrt(n) and its columns to l2 norm sqrt(m), num_iters times, ending on the columns. Returns X shaped like G,
    in float32 (float64 if G is), written into `out` (contiguous) when given: the only G-sized memory it uses.

    The iterate is always X = diag(r) G diag(c), so the loop runs on u = r^2 and v = c^2 with B = G^2 (elementwise):
    rows to norm sqrt(n) is u = n / (B v), columns to norm sqrt(m) is v = m / (B^T u). Each row of G is divided by
    its largest magnitude before squaring: X does not change (rows are normalised first) and B <= 1 cannot
    overflow. An entry at most 2^-63 (~1.08e-19) times its row's largest magnitude then squares below float32's
    normal range and counts as zero: X is Alg. 3 of G with those entries set to zero (float64 G: 2^-511)."""
    if grad.dim() < 2:
        raise ValueError(f"sr_sinkhorn expects a matrix or a stack of matrices, got shape {tuple(grad.shape)}")
    m, n = grad.shape[-2:]
    G = grad.reshape(-1, m, n)  # (k, m, n), a view for the layouts SinkGD passes
    row_max = torch.maximum(G.amax(dim=2), G.amin(dim=2).neg()).to(work_dtype(grad))  # (k, m); aminmax is slow
    tiny = torch.finfo(row_max.dtype).tiny
    # A zero row divides by the smallest subnormal instead of by 0, and stays zero.
    B = torch.div(G, row_max.clamp_min(tiny * torch.finfo(row_max.dtype).eps)[:, :, None],
                  out=None if out is None else out.view(G.shape)).square_()
    torch.nn.functional.threshold_(B, tiny, 0.0)  # squares below the normal range: zero, not subnormal
    B_t, floor, v = B.mT, B.new_full((), tiny), B.new_ones(len(B), 1, n)
    for i in range(num_iters):  # u and v as row vectors (k, 1, m) and (k, 1, n): v^T B^T is the CPU's fast bmm
        u = torch.baddbmm(floor, v, B_t, alpha=1 / n).reciprocal_()  # a zero row gets 1/tiny and adds 0 below
        col_sumsq = torch.bmm(u, B)
        # Before the last iteration v is taken up to the gauge (u, v) -> (u t, v / t), which leaves X unchanged:
        # scaled so that its smallest entry is 1, it bounds u <= n for any dynamic range of G. A zero column: 0.
        v = (m / col_sumsq if i == num_iters - 1 else col_sumsq.amax(2, keepdim=True) / col_sumsq).nan_to_num_(posinf=0)
    return B.mul_(u.mT).mul_(v).sqrt_().copysign_(G).view(grad.shape)


# Default stack_bytes, per device type: the most bytes of gradient copy and float32 X per stack (absent: one matrix
# at a time). tools/bench_optimizer.py: on a GPU a stack saves kernel launches; on a CPU, beyond its cache, nothing.
STACK_BYTES = {"cuda": 64 * 2**20, "cpu": 16 * 2**20}


class SinkGD(torch.optim.Optimizer):
    """Alg. 4. A group with sinkgd=True holds matrices (or stacks of them, e.g. MoE experts) and keeps no state:
        W <- (1 - lr * weight_decay) W - lr * sr_sinkhorn(grad, sinkhorn_iters)
    transposed=True for weights stored (..., in, out), so that rows are output features as in the paper; experts=E
    for 2-D stacks of E matrices flattened along the rows (DBRX's experts). A group with
    sinkgd=False is stepped by torch's fused AdamW (the embedding, norms and head in the paper).

    Same-shape matrices run as one batched sr_sinkhorn per stack of at most stack_bytes (a number of bytes, or a dict
    of them per device type; default STACK_BYTES), so the kernels of a step follow the number of shapes, not of
    layers. Their products follow torch.set_float32_matmul_precision, as every float32 matmul does: at the default
    "highest" X is Alg. 3 to float32 rounding; "high" (TF32 on CUDA) or "medium" (bf16) leave ~1e-3 in X.
    Finiteness is decided on the device and masks the whole step (AdamW's through its found_inf); the one host sync
    reads it after every kernel is queued. A non-finite gradient then raises FloatingPointError, or with
    skip_nonfinite=True sets `overflow`, by which DeepSpeed's engine (and train.py's) leaves the lr schedule alone too;
    no weight or AdamW state has changed. step() refuses matrices that a wrapper has since flattened or resized."""

    def __init__(self, params, lr: float = 1e-3, sinkhorn_iters: int = 5, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, sinkgd: bool = True, transposed: bool = False,
                 skip_nonfinite: bool = False, stack_bytes: int | dict[str, int] = STACK_BYTES):
        if not lr > 0 or sinkhorn_iters < 1:
            raise ValueError(f"need lr > 0 and sinkhorn_iters >= 1, got lr={lr}, sinkhorn_iters={sinkhorn_iters}")
        per_device = stack_bytes.values() if isinstance(stack_bytes, dict) else [stack_bytes]
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in per_device):
            raise ValueError(f"stack_bytes must be a number of bytes >= 0 or a dict of them per device type, e.g. "
                             f"{{'cuda': 64 << 20}}; got {stack_bytes!r}")
        self.matrix_shapes: list[list[torch.Size]] = []  # per group, as added: step() checks they still hold
        # fused=True, the AdamW groups' math, also makes load_state_dict move `step` to the parameter's device
        super().__init__(params, dict(lr=lr, sinkhorn_iters=sinkhorn_iters, betas=betas, eps=eps, fused=True,
                                      weight_decay=weight_decay, sinkgd=sinkgd, transposed=transposed))
        self.skip_nonfinite, self.overflow = skip_nonfinite, False
        self.stack_bytes = stack_bytes

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        not_matrices = [tuple(p.shape) for p in group["params"] if p.dim() < 2]
        shards = [tuple(p.shape) for p in group["params"] if hasattr(p, "placements")]  # DTensors: FSDP2, TP
        if group["sinkgd"] and not_matrices:
            raise ValueError(f"SinkGD groups take matrices only, got shapes {not_matrices}; put them in a group "
                             "with sinkgd=False (AdamW), e.g. via sinkgd_param_groups()")
        if group["sinkgd"] and shards:
            raise ValueError(f"SinkGD groups take whole matrices, got DTensor shards {shards} (FSDP2 or tensor "
                             "parallel); SR-Sinkhorn needs each matrix whole: shard with DeepSpeed ZeRO instead")
        self.matrix_shapes.append([p.shape for p in group["params"]])

    @torch.no_grad()
    def step(self, closure=None):
        self._check_matrices()
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        found_inf = self._found_inf()
        for group in self.param_groups:
            (self._sinkgd_update if group["sinkgd"] else self._adamw_update)(group, found_inf)
        self.overflow = found_inf is not None and bool(found_inf)  # the step's one host sync, after its kernels
        if self.overflow and not self.skip_nonfinite:
            raise FloatingPointError("SinkGD.step: non-finite gradient, no weight was updated")
        return loss

    def _check_matrices(self) -> None:
        """A wrapper (DeepSpeed ZeRO, FSDP1) may have swapped a group's matrices for flat pieces since it was made."""
        for group, shapes in zip(self.param_groups, self.matrix_shapes):
            if group["sinkgd"] and [p.shape for p in group["params"]] != shapes:
                raise RuntimeError(f"SinkGD: matrices {[tuple(s) for s in shapes][:3]} became tensors shaped "
                                   f"{[tuple(p.shape) for p in group['params']][:3]}; SR-Sinkhorn of flat or sharded "
                                   "pieces is sign descent, not Alg. 3: under DeepSpeed use sinkgd_zero.ZeroSinkGD")

    def _found_inf(self) -> Tensor | None:
        """1.0 on the device if a gradient is not finite, else 0.0: by min and max, which NaN reaches and which,
        unlike a norm, cannot overflow."""
        extremes = [x for group in self.param_groups for p in group["params"]
                    if p.grad is not None and p.grad.numel() for x in torch.aminmax(p.grad)]
        return torch.stack(extremes).isfinite().all().logical_not().float() if extremes else None

    def _sinkgd_update(self, group: dict, found_inf: Tensor | None) -> None:
        by_shape, stacks = defaultdict(list), []
        for p in (p for p in group["params"] if p.grad is not None):
            by_shape[p.shape, p.grad.dtype, p.device].append(p)
        for (shape, dtype, device), same in by_shape.items():
            budget = self.stack_bytes.get(device.type, 0) if isinstance(self.stack_bytes, dict) else self.stack_bytes
            k = max(1, budget // (same[0].numel() * (dtype.itemsize + 4)))
            stacks += [same[i:i + k] for i in range(0, len(same), k)]
        if not stacks:
            return
        workspace = torch.empty(max(len(s) * s[0].numel() for s in stacks), dtype=work_dtype(stacks[0][0].grad),
                                device=stacks[0][0].device)  # X of each stack in turn
        experts = group.get("experts")  # a 2-D stack of this many experts, flattened along its rows (e.g. DBRX)

        def as_paper(t):  # (..., out features, in features), each expert its own matrix
            t = t.view(experts, -1, t.shape[-1]) if experts else t
            return t.mT if group["transposed"] else t
        for stack in stacks:
            grads = [as_paper(p.grad) for p in stack]
            G = grads[0][None] if len(grads) == 1 else torch.stack(grads)  # (k, ..., m, n); a lone one: no copy
            X = sr_sinkhorn(G, group["sinkhorn_iters"], out=workspace[:G.numel()].view(G.shape))
            self._apply([as_paper(p) for p in stack], X, group, found_inf)
            del G  # before the next stack's copy is made

    @staticmethod
    def _apply(weights: list[Tensor], updates: Tensor, group: dict, found_inf: Tensor | None) -> None:
        """weights[i] -= lr * updates[i] after decoupled weight decay, none of it on a skipped step."""
        lr, weight_decay = group["lr"], group["weight_decay"]
        if found_inf is not None:
            updates.masked_fill_(found_inf > 0, 0.0)
        if weight_decay:
            torch._foreach_mul_(weights, 1 - lr * weight_decay * (1 if found_inf is None else 1 - found_inf))
        torch._foreach_add_(weights, updates.unbind(0), alpha=-lr)

    def _adamw_update(self, group: dict, found_inf: Tensor | None) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:  # torch.optim.AdamW(fused=True)'s state, made on first use
            self.state[p] = self.state[p] or dict(step=torch.zeros((), device=p.device),
                                                  exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=True, found_inf=found_inf, amsgrad=False,
              beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False)
