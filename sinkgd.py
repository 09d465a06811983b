"""SinkGD: Sinkhorn Gradient Descent, from Scetbon, Ma, Gong, Meeds, "Gradient Multi-Normalization for Stateless
and Scalable LLM Training" (arXiv 2502.06742). Algorithm numbers are the paper's.

`sr_sinkhorn` is Alg. 3 for one matrix; `SinkGD` is Alg. 4 with torch's AdamW for the parameters the paper leaves to
it; `sinkgd_param_groups` makes the paper's split. zero.py runs Alg. 3 on DeepSpeed ZeRO's flat partitions.
"""
import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw


def work_dtype(grad: Tensor) -> torch.dtype:
    """float32 whatever the gradient dtype (bf16 is common); float64 stays float64."""
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


def sr_sinkhorn(grad: Tensor, num_iters: int = 5, out: Tensor | None = None) -> Tensor:
    """Alg. 3: alternately rescale the rows of G (m, n) to l2 norm sqrt(n) and its columns to l2 norm sqrt(m),
    num_iters times, ending on the columns. Returns X (m, n) in float32 (float64 if G is), written into `out` when
    given: the only matrix-sized memory it uses.

    The iterate is always X = diag(r) G diag(c), so the loop runs on u = r^2 and v = c^2 with B = G^2 (elementwise):
    rows to norm sqrt(n) is u = n / (B v), columns to norm sqrt(m) is v = m / (B^T u). Each row of G is divided by
    its largest magnitude before squaring: X does not change (rows are normalised first) and B <= 1 cannot
    overflow. An entry at most 2^-63 (~1.08e-19) times its row's largest magnitude then squares below float32's
    normal range and counts as zero: X is Alg. 3 of G with those entries set to zero (float64 G: 2^-511)."""
    if grad.dim() != 2:
        raise ValueError(f"sr_sinkhorn expects a 2-D matrix, got shape {tuple(grad.shape)}")
    m, n = grad.shape
    row_max = torch.maximum(grad.amax(dim=1), grad.amin(dim=1).neg()).to(work_dtype(grad))  # (m,); aminmax is slow
    tiny = torch.finfo(row_max.dtype).tiny
    # A zero row divides by the smallest subnormal instead of by 0, and stays zero.
    B = torch.div(grad, row_max.clamp_min(tiny * torch.finfo(row_max.dtype).eps)[:, None], out=out).square_()
    torch.nn.functional.threshold_(B, tiny, 0.0)  # squares below the normal range: zero, not subnormal
    B_t, floor, v = B.t(), B.new_full((), tiny), B.new_ones(n)
    for k in range(num_iters):
        u = torch.addmv(floor, B, v, alpha=1 / n).reciprocal_()  # (m,); a zero row gets 1/tiny and adds 0 below
        col_sumsq = torch.mv(B_t, u)  # (n,)
        # Before the last iteration v is taken up to the gauge (u, v) -> (u k, v / k), which leaves X unchanged:
        # scaled so that its smallest entry is 1, it bounds u <= n for any dynamic range of G. A zero column: 0.
        v = (m / col_sumsq if k == num_iters - 1 else col_sumsq.amax() / col_sumsq).nan_to_num_(posinf=0.0)
    return B.mul_(u[:, None]).mul_(v).sqrt_().copysign_(grad)


class SinkGD(torch.optim.Optimizer):
    """Alg. 4. A group with sinkgd=True holds 2-D matrices and keeps no state:
        W <- (1 - lr * weight_decay) W - lr * sr_sinkhorn(grad, sinkhorn_iters)
    A group with sinkgd=False is stepped by torch's own AdamW (the embedding, norms and head in the paper).

    Finiteness is decided once per step for all gradients, before any weight is written (the step's one host sync).
    A non-finite gradient raises FloatingPointError, or with skip_nonfinite=True skips the whole step and sets
    `overflow`, the flag by which DeepSpeed's engine (and train.py's) leaves the lr schedule alone too."""

    def __init__(self, params, lr: float = 1e-3, sinkhorn_iters: int = 5, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, sinkgd: bool = True, skip_nonfinite: bool = False):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1, got {sinkhorn_iters}")
        super().__init__(params, dict(lr=lr, sinkhorn_iters=sinkhorn_iters, betas=betas, eps=eps,
                                      weight_decay=weight_decay, sinkgd=sinkgd))
        self.skip_nonfinite, self.overflow = skip_nonfinite, False

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        not_matrices = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
        if group["sinkgd"] and not_matrices:
            raise ValueError(f"SinkGD groups take 2-D matrices only, got shapes {not_matrices}; put them in a "
                             "group with sinkgd=False (AdamW), e.g. via sinkgd_param_groups()")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.overflow = not self._grads_finite()
        if self.overflow and not self.skip_nonfinite:
            raise FloatingPointError("SinkGD.step: non-finite gradient, no weight was updated")
        if not self.overflow:
            for group in self.param_groups:
                (self._sinkgd_update if group["sinkgd"] else self._adamw_update)(group)
        return loss

    def _grads_finite(self) -> bool:
        """By every gradient's min and max: NaN propagates to both, and unlike a norm they cannot overflow."""
        extremes = [x for group in self.param_groups for p in group["params"]
                    if p.grad is not None and p.grad.numel() for x in torch.aminmax(p.grad)]
        return not extremes or bool(torch.stack(extremes).isfinite().all())

    def _sinkgd_update(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if params:  # one buffer the size of the largest matrix, reused matrix after matrix
            workspace = torch.empty(max(p.numel() for p in params), dtype=work_dtype(params[0].grad),
                                    device=params[0].device)
        for p in params:
            update = sr_sinkhorn(p.grad, group["sinkhorn_iters"], out=workspace[:p.numel()].view(p.shape))
            self._apply(p, update, group)

    @staticmethod
    def _apply(p: Tensor, update: Tensor, group: dict) -> None:
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, as in AdamW
        p.add_(update, alpha=-group["lr"])

    def _adamw_update(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:  # torch.optim.AdamW's state, made on first use
            self.state[p] = self.state[p] or dict(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                                  exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1],
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def sinkgd_param_groups(model: nn.Module, blocks: nn.Module, lr: float, alpha: float = 0.05,
                        weight_decay: float = 0.0) -> list[dict]:
    """The paper's split: SinkGD, at lr alpha * lr, on the weight of every nn.Linear inside `blocks` (the transformer
    layers: attention q/k/v/o and MLP gate/up/down); AdamW, at lr, on all other parameters (token embedding, RMSNorm
    weights, output head). By module role, not by dim() == 2: the embedding and head are matrices that AdamW owns."""
    matrices = [m.weight for m in blocks.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    chosen = {id(p) for p in matrices}
    if not chosen <= {id(p) for p in model.parameters()}:
        raise ValueError("sinkgd_param_groups: `blocks` must be a submodule of `model`")
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    return [dict(params=matrices, sinkgd=True, lr=alpha * lr, weight_decay=weight_decay),
            dict(params=others, sinkgd=False, lr=lr, weight_decay=weight_decay)]
