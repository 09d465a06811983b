"""SinkGD: Sinkhorn Gradient Descent.

Scetbon, Ma, Gong, Meeds, "Gradient Multi-Normalization for Stateless and Scalable LLM Training",
arXiv 2502.06742. Algorithm numbers below are the paper's.

- `multinorm` (Alg. 1) alternates normalisation projections of a gradient; SR-Sinkhorn and SWAN are
  two instances of it, written out plainly with one full-matrix pass per projection.
- `sr_sinkhorn` (Alg. 3) is the same fixed-point scheme for the row/column l2 norms, computed on two
  scaling vectors instead of the matrix: O(m + n) extra memory beyond one float32 buffer.
- `sr_sinkhorn_sharded` runs it on flat fragments of matrices spread over ranks (ZeRO partitions),
  exchanging only the m- and n-length partial sums, never the gradient.
- `SinkGD` (Alg. 4) is a thin, stateless optimizer around it, with AdamW for the parameter groups
  flagged `sinkgd=False` (embedding, norms, head), and `sinkgd_param_groups` builds the paper's split.
"""
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

# --------------------------------------------------------------------------------------------------
# Alg. 1 (MultiNorm) and its instances, plainly. Each projection costs a full pass over the matrix:
#   SR-Sinkhorn = multinorm(G, [normalize_rows, normalize_columns], L)   O(mn) per iteration
#   SWAN        = multinorm(G, [standardize_rows, whiten], 1)            O(min(m,n)^2 max(m,n)) per NS step


def multinorm(grad: Tensor, projections: list[Callable[[Tensor], Tensor]], num_iters: int) -> Tensor:
    """Alg. 1: apply the normalisation projections P_1, ..., P_K in turn, num_iters times."""
    x = grad
    for _ in range(num_iters):
        for project in projections:
            x = project(x)
    return x


def normalize_rows(x: Tensor) -> Tensor:
    """Every row to l2 norm sqrt(n) (a zero row stays zero)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x * torch.where(norms > 0, math.sqrt(x.shape[1]) / norms, 0.0)


def normalize_columns(x: Tensor) -> Tensor:
    """Every column to l2 norm sqrt(m) (a zero column stays zero)."""
    return normalize_rows(x.T).T


def standardize_rows(x: Tensor) -> Tensor:
    """SWAN's GradNorm: every row to zero mean and unit standard deviation."""
    std, mean = torch.std_mean(x, dim=1, keepdim=True, correction=0)
    return (x - mean) / std.clamp_min(torch.finfo(x.dtype).tiny)


def whiten(x: Tensor, ns_iters: int = 10) -> Tensor:
    """SWAN's GradWhitening (X X^T)^(-1/2) X, by the cubic Newton-Schulz iteration for the polar factor.

    Each iteration costs O(min(m, n)^2 max(m, n)) in matmuls: the cost that SinkGD removes."""
    if x.shape[0] > x.shape[1]:  # same polar factor, smaller Gram matrix
        return whiten(x.T, ns_iters).T
    y = x / torch.linalg.matrix_norm(x).clamp_min(torch.finfo(x.dtype).tiny)  # singular values <= 1
    for _ in range(ns_iters):
        y = 1.5 * y - 0.5 * (y @ y.T) @ y
    return y


def swan(grad: Tensor, ns_iters: int = 10) -> Tensor:
    """SWAN (Ma et al. 2024) as MultiNorm with projections [standardize rows, whiten], one pass."""
    return multinorm(grad.float(), [standardize_rows, lambda x: whiten(x, ns_iters)], num_iters=1)


# --------------------------------------------------------------------------------------------------
# Alg. 3 (SR-Sinkhorn) on scaling vectors. The iterate is always X = diag(r) G diag(c), so
#   squared row norms of X    = r^2 * (G^2 @ c^2)
#   squared column norms of X = c^2 * (r^2 @ G^2)
# and all L iterations need only matrix-vector products with G^2, computed once.


def _work_dtype(grad: Tensor) -> torch.dtype:
    """float32 whatever the gradient dtype (bf16 is common); float64 stays float64."""
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


def _inv_sqrt(x: Tensor) -> Tensor:
    """1/sqrt(x), and 0 where x is 0: an all-zero row or column stays zero instead of becoming NaN."""
    return torch.where(x > torch.finfo(x.dtype).tiny, x.rsqrt(), 0.0)


def _unit_max(v: Tensor, lengths: Tensor) -> Tensor:
    """Divide each matrix's segment of v by its maximum. diag(r) G diag(c) is unchanged by
    (r, c) -> (r k, c / k), so this costs nothing in exactness and keeps r^2 and c^2 from
    overflowing on gradients with a huge dynamic range."""
    peak = torch.segment_reduce(v, "max", lengths=lengths).clamp_min(torch.finfo(v.dtype).tiny)
    return v / peak.repeat_interleave(lengths, output_size=v.numel())


def _sinkhorn_scalings(row_sumsq: Callable[[Tensor], Tensor], col_sumsq: Callable[[Tensor], Tensor],
                       ms: list[int], ns: list[int], num_iters: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """The (r, c) of Alg. 3 after num_iters iterations, for one or more matrices whose scaling
    vectors are stacked end to end (ms, ns: their row and column counts; for a single matrix these
    are just r and c). row_sumsq(v) returns G^2 @ v and col_sumsq(u) returns u @ G^2, per matrix."""
    ms, ns = torch.tensor(ms), torch.tensor(ns)
    n_of_row = ns.repeat_interleave(ms).to(like)  # the n of the matrix that each row belongs to
    m_of_col = ms.repeat_interleave(ns).to(like)
    ms, ns = ms.to(like.device), ns.to(like.device)
    c = torch.ones_like(m_of_col)
    for _ in range(num_iters):
        c = _unit_max(c, ns)
        r = _unit_max(_inv_sqrt(row_sumsq(c * c) / n_of_row), ms)  # rows of X to norm sqrt(n)
        c = _inv_sqrt(col_sumsq(r * r) / m_of_col)  # then columns to norm sqrt(m), ending here
    return r, c


def _abs_row_max(block: Tensor) -> Tensor:
    """max_j |G_ij| per row, without a temporary the size of the block."""
    return torch.maximum(block.amax(dim=1), -block.amin(dim=1))


def _divisor(row_max: Tensor) -> Tensor:
    """Row i is divided by its largest |entry| before squaring: that changes nothing, since rows are
    normalised first, but keeps every square <= 1 so a large finite gradient cannot overflow. A row
    whose entries are all below the smallest normal float (~1e-38 in float32) counts as zero."""
    return torch.where(row_max >= torch.finfo(row_max.dtype).tiny, row_max, math.inf)[:, None]


def sr_sinkhorn(grad: Tensor, num_iters: int = 5, out: Tensor | None = None) -> Tensor:
    """Alg. 3: alternately rescale the rows of G (m x n) to l2 norm sqrt(n) and its columns to l2 norm
    sqrt(m), num_iters times, ending on the columns. Returns a float32 matrix (float64 if G is),
    written into `out` when given: the only matrix-sized memory it uses."""
    if grad.dim() != 2:
        raise ValueError(f"sr_sinkhorn expects a 2-D matrix, got shape {tuple(grad.shape)}")
    m, n = grad.shape
    buf = torch.empty((m, n), dtype=_work_dtype(grad), device=grad.device) if out is None else out
    row_max = _divisor(_abs_row_max(grad).to(buf.dtype))
    torch.div(grad, row_max, out=buf).square_()  # (G / row_max)^2 while iterating, then the result
    r, c = _sinkhorn_scalings(lambda v: buf @ v, lambda u: u @ buf, [m], [n], num_iters, like=buf)
    return torch.mul(grad, r[:, None] / row_max, out=buf).mul_(c)


# --------------------------------------------------------------------------------------------------
# SR-Sinkhorn on fragments. Row and column sums of squares are additive over any split of a matrix,
# so each rank sums over the elements it holds and an all-reduce of the m- (or n-) length vectors
# per half-iteration gives every rank the exact (r, c) without moving any gradient. The vectors of
# all matrices are stacked so that each half-iteration is a single all-reduce.


@dataclass
class Fragment:
    """Elements [start, start + grad.numel()) of a row-major matrix of `shape`, held by this rank."""
    grad: Tensor  # 1-D, possibly empty
    start: int
    shape: tuple[int, int]


def _blocks(flat: Tensor, start: int, n: int) -> list[tuple[int, int, Tensor]]:
    """A flat run of a row-major matrix with n columns, starting at element `start`, as 2-D views
    (first row, first column, view): a partial head row, whole rows, a partial tail row."""
    blocks = []
    head = min((n - start % n) % n, flat.numel())
    if head:
        blocks.append((start // n, start % n, flat[:head].view(1, head)))
    whole = (flat.numel() - head) // n
    if whole:
        blocks.append(((start + head) // n, 0, flat[head:head + whole * n].view(whole, n)))
    tail = flat.numel() - head - whole * n
    if tail:
        blocks.append(((start + head) // n + whole, 0, flat[-tail:].view(1, tail)))
    return blocks


def sr_sinkhorn_sharded(fragments: list[Fragment], num_iters: int,
                        all_reduce: Callable[[Tensor, str], None]) -> list[Tensor]:
    """sr_sinkhorn of several matrices, each given as this rank's (possibly empty) fragment of it.

    Every rank passes fragments of the same matrices in the same order. all_reduce(t, op) reduces t in
    place over the ranks, op being "sum" or "max". Returns each fragment's part of the result, flat."""
    dtype = _work_dtype(fragments[0].grad)
    device = fragments[0].grad.device
    ms, ns = [f.shape[0] for f in fragments], [f.shape[1] for f in fragments]
    row_at = [0, *itertools.accumulate(ms)]  # where each matrix's rows start in the stacked vectors
    col_at = [0, *itertools.accumulate(ns)]
    outs = [torch.empty(f.grad.shape, dtype=dtype, device=device) for f in fragments]
    # Every block held here, with where its rows and columns sit in the stacked vectors, the gradient
    # block, and the same block of the output buffer (which holds (G / row_max)^2 until the end).
    placed = []
    for k, (f, out) in enumerate(zip(fragments, outs)):
        for (i, j, g), (_, _, b) in zip(_blocks(f.grad, f.start, f.shape[1]), _blocks(out, f.start, f.shape[1])):
            rows = slice(row_at[k] + i, row_at[k] + i + g.shape[0])
            cols = slice(col_at[k] + j, col_at[k] + j + g.shape[1])
            placed.append((rows, cols, g, b))

    row_max = torch.zeros(row_at[-1], dtype=dtype, device=device)
    for rows, _, g, _ in placed:
        row_max[rows] = _abs_row_max(g)  # blocks never share a row
    all_reduce(row_max, "max")
    row_max = _divisor(row_max)
    for rows, _, g, b in placed:
        torch.div(g, row_max[rows], out=b).square_()

    def row_sumsq(c2):
        total = torch.zeros(row_at[-1], dtype=dtype, device=device)
        for rows, cols, _, b in placed:
            total[rows] += b @ c2[cols]
        all_reduce(total, "sum")
        return total

    def col_sumsq(r2):
        total = torch.zeros(col_at[-1], dtype=dtype, device=device)
        for rows, cols, _, b in placed:
            total[cols] += r2[rows] @ b
        all_reduce(total, "sum")
        return total

    r, c = _sinkhorn_scalings(row_sumsq, col_sumsq, ms, ns, num_iters, like=row_max)
    for rows, cols, g, b in placed:
        torch.mul(g, r[rows, None] / row_max[rows], out=b).mul_(c[cols])
    return outs


# --------------------------------------------------------------------------------------------------
# Alg. 4 (SinkGD) and the paper's parameter split.


@dataclass
class FlatLayout:
    """Where the matrices of a parameter group lie in one rank's flat partition of it (ZeRO 1-3 hand the
    optimizer such partitions). One entry per matrix of the group, in the same order on every rank:
    (shape, first element of the matrix held here, offset in the flat tensor, elements held)."""
    matrices: list[tuple[tuple[int, int], int, int, int]]
    process_group: object = None  # the ranks sharing the group; None: the default group


def _all_reduce(t: Tensor, op: str, group=None) -> None:
    ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
    torch.distributed.all_reduce(t, op=ops[op], group=group)


def grads_finite(params) -> Tensor:
    """Whether every gradient entry is finite, as a bool tensor. Checked through each gradient's max and
    min: NaN propagates through both and, unlike a norm, they cannot overflow on a large finite gradient;
    two fast reductions, where an inf-norm is ~20x slower on CPU."""
    extremes = [x.float() for p in params if p.grad is not None and p.grad.numel()
                for x in (p.grad.amax(), p.grad.amin())]
    return torch.stack(extremes).isfinite().all() if extremes else torch.tensor(True)


class SinkGD(torch.optim.Optimizer):
    """Alg. 4. Groups with sinkgd=True hold 2-D matrices and keep no state:
        W <- (1 - lr * weight_decay) W - lr * sr_sinkhorn(grad, sinkhorn_iters)
    Groups with sinkgd=False are stepped by torch's own AdamW (embedding, norms and head in the paper).

    A non-finite gradient raises FloatingPointError before any weight is touched.

    Under ZeRO, a SinkGD group arrives as one flat partition per rank; `flat_layouts[id(flat)]` then says
    which matrix elements it holds, and SR-Sinkhorn runs on those fragments (sr_sinkhorn_sharded)."""

    def __init__(self, params, lr: float = 1e-3, sinkhorn_iters: int = 5, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, sinkgd: bool = True):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        defaults = dict(lr=lr, sinkhorn_iters=sinkhorn_iters, betas=betas, eps=eps,
                        weight_decay=weight_decay, sinkgd=sinkgd)
        super().__init__(params, defaults)
        self.flat_layouts: dict[int, FlatLayout] = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        not_matrices = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
        if group["sinkgd"] and not_matrices:
            raise ValueError(f"SinkGD groups take 2-D matrices only, got shapes {not_matrices}; put "
                             "them in a group with sinkgd=False (AdamW), e.g. via sinkgd_param_groups()")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        bad = ~grads_finite(p for group in self.param_groups for p in group["params"])
        if self.flat_layouts:  # sharded: every rank must decide alike, or the others hang in a collective
            bad = bad.float()
            _all_reduce(bad, "max", next(iter(self.flat_layouts.values())).process_group)
        if bad:
            raise FloatingPointError("SinkGD.step: non-finite gradient, no weight was updated")
        for group in self.param_groups:
            if group["sinkgd"]:
                self._sinkgd_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _sinkgd_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        whole = [p for p in params if id(p) not in self.flat_layouts]
        if whole:  # one buffer the size of the largest matrix, reused matrix after matrix
            workspace = torch.empty(max(p.numel() for p in whole), dtype=_work_dtype(whole[0].grad),
                                    device=whole[0].device)
        for p in whole:
            update = sr_sinkhorn(p.grad, group["sinkhorn_iters"], out=workspace[:p.numel()].view(p.shape))
            self._apply(p, update, group)
        for p in params:
            if id(p) in self.flat_layouts:
                self._sharded_step(p, self.flat_layouts[id(p)], group)

    def _sharded_step(self, flat: Tensor, layout: FlatLayout, group: dict) -> None:
        fragments = [Fragment(flat.grad[offset:offset + count], start, shape)
                     for shape, start, offset, count in layout.matrices]
        updates = sr_sinkhorn_sharded(fragments, group["sinkhorn_iters"],
                                      lambda t, op: _all_reduce(t, op, layout.process_group))
        for (_, _, offset, count), update in zip(layout.matrices, updates):
            self._apply(flat[offset:offset + count], update, group)

    @staticmethod
    def _apply(p: Tensor, update: Tensor, group: dict) -> None:
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, as in AdamW
        p.add_(update, alpha=-group["lr"])

    def _adamw_step(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:  # the same state layout as torch.optim.AdamW
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def sinkgd_param_groups(model: nn.Module, blocks: nn.Module, lr: float, alpha: float = 0.05,
                        weight_decay: float = 0.0) -> list[dict]:
    """The paper's split: SinkGD, at lr alpha * lr, on the weight of every nn.Linear inside `blocks`
    (the transformer layers: attention q/k/v/o and MLP gate/up/down); AdamW, at lr, on all other
    parameters (token embedding, RMSNorm weights, output head). Chosen by module role, not by
    dim() == 2: the embedding and the head are matrices too, and they belong to AdamW."""
    matrices = [m.weight for m in blocks.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    chosen = {id(p) for p in matrices}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    if not chosen <= {id(p) for p in model.parameters()}:
        raise ValueError("sinkgd_param_groups: `blocks` must be a submodule of `model`")
    return [dict(params=matrices, sinkgd=True, lr=alpha * lr, weight_decay=weight_decay),
            dict(params=others, sinkgd=False, lr=lr, weight_decay=weight_decay)]
