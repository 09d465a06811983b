"""SinkGD under DeepSpeed ZeRO 1-3, for train.py and for training code that is not ours (Hugging Face Trainer,
accelerate): `pip install .` installs it beside sinkgd.py; it needs torch only, DeepSpeed being the caller's.

Under ZeRO an optimizer does not receive whole matrices: DeepSpeed flattens each parameter group, cuts it into one
contiguous partition per rank at arbitrary element offsets, and steps each rank's partition. Row and column sums
of squares are additive over any split of a matrix, so each rank sums over the elements it holds, and one all-reduce
of the m- (then n-) length partial sums per half-iteration, for all the matrices of the partition at once, gives
every rank the exact scalings of Alg. 3. No gradient is gathered.
"""
import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sinkgd import SinkGD, work_dtype


@dataclass
class Piece:
    """Elements [start, start + count) of a row-major matrix of `shape`, at [offset, offset + count) of a rank's
    flat partition (count 0: the rank holds none of it)."""
    shape: tuple[int, int]
    start: int
    offset: int
    count: int


class Partition:
    """The matrices of a parameter group as they lie in one rank's flat partition, in the same order on every rank.

    Their scaling vectors are stacked end to end (rows of matrix 0, rows of matrix 1, ...), so one collective covers
    them all; `blocks` are the pieces cut into rectangles: a partial first row, whole rows, a partial last row."""

    def __init__(self, pieces: list[Piece], process_group, device, dtype=torch.float32):
        self.process_group = process_group
        row_at = [0, *itertools.accumulate(p.shape[0] for p in pieces)]  # where each matrix's rows start
        col_at = [0, *itertools.accumulate(p.shape[1] for p in pieces)]
        self.num_rows, self.num_cols = row_at[-1], col_at[-1]
        # 1/n for every stacked row and m for every stacked column, made once: no host copy in a step
        self.inv_n = torch.tensor([1 / n for (m, n) in (p.shape for p in pieces) for _ in range(m)], dtype=dtype,
                                  device=device)
        self.m = torch.tensor([m for (m, n) in (p.shape for p in pieces) for _ in range(n)], dtype=dtype, device=device)
        self.blocks = []  # (first stacked row, first stacked column, rows, columns, offset in the partition)
        for k, p in enumerate(pieces):
            n, start, offset, end = p.shape[1], p.start, p.offset, p.offset + p.count
            while offset < end:
                i, j = divmod(start, n)
                rows, cols = ((end - offset) // n, n) if j == 0 and end - offset >= n else (1, min(n - j, end - offset))
                self.blocks.append((row_at[k] + i, col_at[k] + j, rows, cols, offset))
                start, offset = start + rows * cols, offset + rows * cols


def sr_sinkhorn_sharded(grad: Tensor, part: Partition, num_iters: int, all_reduce) -> Tensor:
    """sinkgd.sr_sinkhorn of every matrix of `part`, from this rank's flat gradient partition (numel,). Every rank
    calls it with its own partition of the same matrices; all_reduce(t, op) reduces t in place over them, op "sum"
    or "max". Returns X laid out as `grad` (zero where no matrix lies), in float32 (float64 if grad is)."""
    out = torch.zeros(grad.shape, dtype=work_dtype(grad), device=grad.device)
    row_max, u, row_sumsq = (out.new_zeros(part.num_rows) for _ in range(3))
    v, col_sumsq = out.new_ones(part.num_cols), out.new_zeros(part.num_cols)
    # Per block: (rows of u and of the row sums, columns of v and of the column sums, gradient, output) as views.
    blocks = [(slice(r, r + h), slice(c, c + w), grad[o:o + h * w].view(h, w), out[o:o + h * w].view(h, w))
              for r, c, h, w, o in part.blocks]
    for rows, _, g, _ in blocks:  # blocks never share a row
        row_max[rows] = torch.maximum(g.amax(dim=1), g.amin(dim=1).neg())
    all_reduce(row_max, "max")
    tiny = torch.finfo(out.dtype).tiny
    floor = out.new_full((), tiny)
    row_max.clamp_min_(tiny * torch.finfo(out.dtype).eps)
    for rows, _, g, x in blocks:  # x holds B = (G / row max)^2 until the end, as in sr_sinkhorn
        torch.nn.functional.threshold_(torch.div(g, row_max[rows, None], out=x).square_(), tiny, 0.0)
    views = [(row_sumsq[rows], u[rows], col_sumsq[cols], v[cols], x, x.t()) for rows, cols, _, x in blocks]
    for k in range(num_iters):
        row_sumsq.zero_()
        for sumsq, _, _, v_part, x, _ in views:
            sumsq.addmv_(x, v_part)
        all_reduce(row_sumsq, "sum")
        torch.addcmul(floor, row_sumsq, part.inv_n, out=u).reciprocal_()  # u = n / (B v)
        col_sumsq.zero_()
        for _, u_part, sumsq, _, _, x_t in views:
            sumsq.addmv_(x_t, u_part)
        all_reduce(col_sumsq, "sum")
        # v = m / (B^T u) at the end; before, up to one gauge for all matrices (any positive scalar per matrix is)
        torch.div(part.m if k == num_iters - 1 else col_sumsq.amax(), col_sumsq, out=v).nan_to_num_(posinf=0.0)
    for (_, u_part, _, v_part, x, _), (_, _, g, _) in zip(views, blocks):
        x.mul_(u_part[:, None]).mul_(v_part).sqrt_().copysign_(g)
    return out


REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class ZeroSinkGD(SinkGD):
    """SinkGD whose matrix groups may reach step() as ZeRO 1-3 flat partitions. Once DeepSpeed has wrapped it,
    `attach` reads where the matrices lie in them; at stage 0 DeepSpeed hands over whole matrices and this is plain
    SinkGD. Training steps before attach() raise: without it the partitions would be taken for matrices."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.partitions: dict[int, Partition] = {}  # id(flat fp32 partition) -> where its matrices lie
        self.attached = False

    def attach(self, wrapper) -> None:
        """wrapper: the engine deepspeed.initialize returned, DeepSpeed's optimizer, or any optimizer whose chain of
        `.optimizer` reaches this one (accelerate's, the Trainer's)."""
        outer, inner = None, wrapper
        while inner is not self:
            if not hasattr(inner, "optimizer"):
                raise ValueError(f"ZeroSinkGD.attach: {type(wrapper).__name__} does not wrap this optimizer; pass the "
                                 "engine that deepspeed.initialize returned, or the optimizer accelerate's prepare did")
            outer, inner = inner, inner.optimizer
        self.partitions, self.attached = zero_partitions(outer, self) if outer is not None else {}, True

    @torch.no_grad()
    def step(self, closure=None):
        if self.attached:
            return super().step(closure)
        # At stage 0 DeepSpeed's bf16/fp16 optimizers step once with zero gradients while deepspeed.initialize builds
        # them, to create optimizer state. That is no training step: AdamW would count it (its bias corrections lag a
        # step for the whole run) and weight decay would apply, so it does nothing. Any other step is a missed attach.
        if any(p.grad is not None and p.grad.any() for group in self.param_groups for p in group["params"]):
            raise RuntimeError("ZeroSinkGD.step() before attach(): call optimizer.attach(engine) after "
                               "deepspeed.initialize (Trainer: callbacks=[sinkgd_zero.trainer_callback()]); "
                               "without DeepSpeed use sinkgd.SinkGD")
        return None

    def _check_matrices(self) -> None:
        # Partitions that attach() read are what ZeRO hands over (ZeRO-3 one sub-group at a time); all else is checked.
        if not all(id(p) in self.partitions for group in self.param_groups if group["sinkgd"] for p in group["params"]):
            super()._check_matrices()

    def _found_inf(self):
        # Under ZeRO, DeepSpeed's optimizer already skipped the step if the global gradient norm was not finite.
        return None if self.partitions else super()._found_inf()

    def _sinkgd_update(self, group: dict, found_inf) -> None:
        flats = [p for p in group["params"] if id(p) in self.partitions]
        if not flats:
            return super()._sinkgd_update(group, found_inf)
        for flat in flats:
            part = self.partitions[id(flat)]
            update = sr_sinkhorn_sharded(flat.grad, part, group["sinkhorn_iters"],
                                         lambda t, op: dist.all_reduce(t, op=REDUCE_OPS[op], group=part.process_group))
            self._apply([flat], update[None], group, found_inf)


def zero_partitions(zo, optimizer: SinkGD) -> dict[int, Partition]:
    """id(flat fp32 partition) -> Partition, for the partitions of sinkgd groups, from `zo`, the object that wraps
    `optimizer`: DeepSpeed 0.19.8's ZeRO optimizers are told apart by their attributes (anything else, e.g. the stage-0
    engine: none). tests/test_deepspeed.py checks the result against one process at every stage."""
    found = {}

    def add(flat, group, shapes_offsets, lo):
        """A partition holding elements [lo, lo + flat.numel()) of a buffer where the matrices lie at offsets."""
        pieces = []
        for shape, offset in shapes_offsets:
            start, end = max(lo, offset), min(lo + flat.numel(), offset + shape.numel())
            held = max(end - start, 0)
            pieces.append(Piece(tuple(shape), start - offset if held else 0, start - lo if held else 0, held))
        found[id(flat)] = Partition(pieces, group, flat.device)

    if hasattr(zo, "fp32_groups_flat_partition"):  # BF16_Optimizer: ZeRO-1, bf16 weights, fp32 gradient accumulation
        # Each group's params are flattened end to end in order; rank r holds [r * size, (r + 1) * size).
        for g, flat in enumerate(zo.fp32_groups_flat_partition):
            if optimizer.param_groups[g]["sinkgd"]:
                offsets = itertools.accumulate((p.numel() for p in zo.bf16_groups[g]), initial=0)
                group = zo.real_dp_process_group[g]
                add(flat, group, zip((p.shape for p in zo.bf16_groups[g]), offsets),
                    dist.get_rank(group=group) * flat.numel())
    elif hasattr(zo, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        # The same, in round-robin order, at the offsets DeepSpeed keeps.
        for g, flat in enumerate(zo.single_partition_of_fp32_groups):
            if optimizer.param_groups[g]["sinkgd"]:
                group = zo.real_dp_process_group[g]
                add(flat, group, zip((m.shape for m in zo.round_robin_bit16_meta[g]), zo.round_robin_bit16_offsets[g]),
                    dist.get_rank(group=group) * int(zo.partition_size[g]))
    elif hasattr(zo, "fp32_partitioned_groups_flat"):  # ZeRO-3
        # Every param is split evenly over the ranks (rank r holds [r * k, (r + 1) * k) of it) and a sub-group's flat
        # partition is the concatenation of its params' pieces, k elements each.
        for g, params in enumerate(zo.fp16_groups):
            if optimizer.param_groups[zo.sub_group_to_group_id[g]]["sinkgd"]:
                group, offset, pieces = zo.sub_group_process_groups[g], 0, []
                for p in params:
                    per_rank = p.partition_numel()
                    start = dist.get_rank(group=group) * per_rank
                    held = max(0, min(per_rank, p.ds_numel - start))
                    pieces.append(Piece(tuple(p.ds_shape), start if held else 0, offset, held))
                    offset += per_rank
                flat = zo.fp32_partitioned_groups_flat[g]
                found[id(flat)] = Partition(pieces, group, flat.device)
    return found


def trainer_callback():
    """A transformers.TrainerCallback that attaches the Trainer's ZeroSinkGD to DeepSpeed when training begins:
    Trainer(..., optimizer_cls_and_kwargs=(ZeroSinkGD, {"params": groups}), callbacks=[trainer_callback()])."""
    from transformers import TrainerCallback

    class AttachZeroSinkGD(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            inner = optimizer
            while not isinstance(inner, ZeroSinkGD):
                if not hasattr(inner, "optimizer"):
                    raise ValueError(f"the Trainer's optimizer ({type(optimizer).__name__}) is no ZeroSinkGD: pass "
                                     "optimizer_cls_and_kwargs=(ZeroSinkGD, {'params': groups}) to the Trainer (under "
                                     "DeepSpeed it ignores optimizers=)")
                inner = inner.optimizer
            inner.attach(optimizer)
    return AttachZeroSinkGD()
