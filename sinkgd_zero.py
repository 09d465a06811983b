"""SinkGD under DeepSpeed ZeRO 1-3, for train.py and for training code that is not ours (Hugging Face Trainer,
accelerate): `pip install .` installs it beside sinkgd.py; it needs torch only, DeepSpeed being the caller's.

Under ZeRO an optimizer does not receive whole matrices: DeepSpeed flattens each parameter group, cuts it into one
contiguous partition per rank at arbitrary element offsets, and steps each rank's partition. Row and column sums
of squares are additive over any split of a matrix, so each rank sums over the elements it holds, and one all-reduce
of the m- (then n-) length partial sums per half-iteration, for all the matrices of the partition at once, gives
every rank the exact scalings of Alg. 3. No gradient is gathered.
"""
import itertools
import json
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

    def __init__(self, pieces: list[Piece], process_group, device, dtype=torch.float32, comm_device=None):
        # The scaling vectors are all-reduced on comm_device (NCCL's is the GPU) while the matrix work stays where the
        # partition is: the CPU under ZeRO-Offload.
        self.process_group, self.comm_device = process_group, torch.device(comm_device or device)
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
        config = getattr(getattr(wrapper, "_config", None), "_param_dict", None)  # the engine's parsed config
        if isinstance(config, dict):
            check_config(config)
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
            update = sr_sinkhorn_sharded(flat.grad, part, group["sinkhorn_iters"], all_reduce_over(part))
            self._apply([flat], update[None], group, found_inf)


def all_reduce_over(part: Partition):
    """The all_reduce of sr_sinkhorn_sharded over part's ranks, on part's communication device."""
    def all_reduce(t: Tensor, op: str) -> None:
        on_comm = t.to(part.comm_device)  # the same tensor when t is there already
        dist.all_reduce(on_comm, op=REDUCE_OPS[op], group=part.process_group)
        if on_comm is not t:
            t.copy_(on_comm)
    return all_reduce


def zero_partitions(zo, optimizer: SinkGD) -> dict[int, Partition]:
    """id(flat fp32 partition) -> Partition, for the partitions of sinkgd groups, from `zo`, the object that wraps
    `optimizer`: DeepSpeed 0.19.8's ZeRO optimizers are told apart by their attributes (anything else, e.g. the stage-0
    engine: none). Matrices not as the group was built (transposed, or resized by tensor parallelism) raise
    ValueError. tests/test_deepspeed.py checks the result against one process at every stage."""
    from deepspeed.accelerator import get_accelerator  # attach() runs under DeepSpeed
    comm_device, found = get_accelerator().current_device_name(), {}

    def add(flat, g, group, pieces):
        layout = ("(in, out) matrices (transposed=True)" if optimizer.param_groups[g]["transposed"] else
                  "expert stacks flattened along the rows (experts=E)" if optimizer.param_groups[g].get("experts")
                  else None)
        if layout:
            raise ValueError(f"ZeroSinkGD: param group {g} holds {layout}, which sinkgd_zero does not read: train it "
                             "at ZeRO stage 0")
        resized = {p.shape for p in pieces} - {tuple(s[-2:]) for s in optimizer.matrix_shapes[g]}
        if resized:
            raise ValueError(f"ZeroSinkGD: DeepSpeed holds param group {g}'s matrices as {sorted(resized)[:3]}, not "
                             "as the group was built: sharded by tensor parallelism (tensor_parallel.autotp_size > 1?)"
                             "; SR-Sinkhorn needs whole matrices, so shard with ZeRO alone")
        found[id(flat)] = Partition(pieces, group, flat.device, comm_device=comm_device)

    if hasattr(zo, "fp32_groups_flat_partition"):  # BF16_Optimizer: ZeRO-1, bf16 weights, fp32 gradient accumulation
        # Each group's params are flattened end to end in order; rank r holds [r * size, (r + 1) * size).
        for g, flat in enumerate(zo.fp32_groups_flat_partition):
            if optimizer.param_groups[g]["sinkgd"]:
                group, shapes = zo.real_dp_process_group[g], [p.shape for p in zo.bf16_groups[g]]
                lo = dist.get_rank(group=group) * flat.numel()
                add(flat, g, group, matrix_pieces(zip(shapes, itertools.accumulate(
                    (s.numel() for s in shapes), initial=0)), lo, lo + flat.numel(), 0))
    elif hasattr(zo, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        # The same, in round-robin order, at the offsets DeepSpeed keeps.
        for g, flat in enumerate(zo.single_partition_of_fp32_groups):
            if optimizer.param_groups[g]["sinkgd"]:
                group = zo.real_dp_process_group[g]
                lo = dist.get_rank(group=group) * int(zo.partition_size[g])
                add(flat, g, group, matrix_pieces(zip((m.shape for m in zo.round_robin_bit16_meta[g]),
                                                      zo.round_robin_bit16_offsets[g]), lo, lo + flat.numel(), 0))
    elif hasattr(zo, "fp32_partitioned_groups_flat"):  # ZeRO-3
        # Every param is split evenly over the ranks (rank r holds [r * k, (r + 1) * k) of it) and a sub-group's flat
        # partition is the concatenation of its params' pieces, k elements each.
        for g, params in enumerate(zo.fp16_groups):
            if optimizer.param_groups[zo.sub_group_to_group_id[g]]["sinkgd"]:
                group, offset, pieces = zo.sub_group_process_groups[g], 0, []
                for p in params:
                    per_rank = p.partition_numel()
                    lo = dist.get_rank(group=group) * per_rank
                    pieces += matrix_pieces([(p.ds_shape, 0)], lo, lo + per_rank, offset)
                    offset += per_rank
                add(zo.fp32_partitioned_groups_flat[g], zo.sub_group_to_group_id[g], group, pieces)
    return found


def matrix_pieces(shapes_offsets, lo: int, hi: int, at: int) -> list[Piece]:
    """The pieces of the matrices that lie at `offsets` of a buffer (a 3-D expert stack: one matrix per expert) held
    by a partition of elements [lo, hi) of that buffer, element k of the buffer at at + k - lo of the partition."""
    pieces = []
    for shape, offset in shapes_offsets:
        m, n = shape[-2:]
        for first in range(offset, offset + shape.numel(), m * n):
            start, end = max(lo, first), min(hi, first + m * n)
            held = max(end - start, 0)
            pieces.append(Piece((m, n), start - first if held else 0, at + start - lo if held else 0, held))
    return pieces


# DeepSpeed options under which the fp32 partitions are not where, or not what, zero_partitions reads: swapped to
# NVMe, split between devices, stepped by DeepSpeed's own optimizers, or matrices sharded by tensor parallelism.
UNSUPPORTED_OPTIONS = [  # (option, its default, whether a value is unsupported)
    ("zero_optimization.offload_optimizer.device", None, lambda device: device == "nvme"),
    ("zero_optimization.offload_optimizer.ratio", 1.0, lambda ratio: ratio < 1),
    ("zero_optimization.offload_optimizer.super_offload", False, bool),
    ("zero_optimization.zenflow", None, lambda zenflow: zenflow is not None),
    ("tensor_parallel.autotp_size", 1, lambda size: size > 1),
]


def option(config: dict, path: str, default=None):
    """config["a"]["b"] for path "a.b", or default where a level is missing."""
    for key in path.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return default if config is None else config


def check_config(config: dict) -> None:
    """Raise ValueError naming the first option of `config` (a DeepSpeed config dict) that ZeroSinkGD cannot follow."""
    for path, default, unsupported in UNSUPPORTED_OPTIONS:
        if unsupported(value := option(config, path, default)):
            raise ValueError(f"ZeroSinkGD does not support DeepSpeed's {path} = {json.dumps(value)}: the partitions "
                             "are then not laid out as sinkgd_zero reads them; remove it (README: DeepSpeed options)")


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
            if getattr(args, "hf_deepspeed_config", None) is not None:
                check_config(args.hf_deepspeed_config.config)
            inner.attach(optimizer)
    return AttachZeroSinkGD()
