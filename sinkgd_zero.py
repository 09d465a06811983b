"""SinkGD under DeepSpeed ZeRO 1-3, for train.py and for training code that is not ours (Hugging
Face Trainer, accelerate). `pip install .` installs it beside sinkgd.py; it needs torch only.

Under ZeRO an optimizer does not receive whole matrices: DeepSpeed flattens each parameter group,
cuts it into one contiguous partition per rank at arbitrary element offsets, and steps each
rank's partition. Row and column sums are additive over any split of a matrix. So each rank sums
over the elements it holds, and one all-reduce of the partial sums per half-iteration, for all
the matrices of the partition at once, gives every rank the sums of Alg. 3. The iteration itself
is sinkgd.sinkhorn's; this file supplies its sums. No gradient is gathered.
"""
import itertools
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

import sinkgd_cpu
from sinkgd import SinkGD, Sums, prescale, rebuild, row_abs_max, sinkhorn, work_dtype
from sinkgd_dtensor import REDUCE_OPS


@dataclass
class Piece:
    """Elements [start, start + count) of a row-major matrix of `shape`, at [offset, offset +
    count) of a rank's flat partition (count 0: the rank holds none of it)."""
    shape: tuple[int, int]
    start: int
    offset: int
    count: int


class Partition:
    """The matrices of a parameter group as they lie in one rank's flat partition, in the same
    order on every rank. Their rows are stacked end to end (rows of matrix 0, rows of matrix 1,
    ...), and so are their columns, so that one collective covers them all."""

    def __init__(self, pieces: list[Piece], process_group, device, dtype=torch.float32,
                 comm_device=None):
        self.process_group = process_group
        # The sums are all-reduced on comm_device (NCCL's is the GPU); the matrix work stays
        # where the partition is (the CPU under ZeRO-Offload).
        self.comm_device = torch.device(comm_device or device)
        row_at = [0, *itertools.accumulate(p.shape[0] for p in pieces)]  # matrix k's first row
        col_at = [0, *itertools.accumulate(p.shape[1] for p in pieces)]
        self.num_rows, self.num_cols = row_at[-1], col_at[-1]
        # The target squared norms, n for every stacked row and m for every stacked column
        shapes = [p.shape for p in pieces]
        self.n = torch.tensor([n for m, n in shapes for _ in range(m)], dtype=dtype, device=device)
        self.m = torch.tensor([m for m, n in shapes for _ in range(n)], dtype=dtype, device=device)
        # The pieces cut into rectangles (a partial first row, whole rows, a partial last row):
        # (first stacked row, first stacked column, rows, columns, offset in the partition)
        self.blocks = []
        for k, p in enumerate(pieces):
            n, start, offset, end = p.shape[1], p.start, p.offset, p.offset + p.count
            while offset < end:
                i, j = divmod(start, n)
                left = end - offset  # elements of this piece not yet in a block
                rows, cols = (left // n, n) if j == 0 and left >= n else (1, min(n - j, left))
                self.blocks.append((row_at[k] + i, col_at[k] + j, rows, cols, offset))
                start, offset = start + rows * cols, offset + rows * cols


def sr_sinkhorn_sharded(grad: Tensor, part: Partition, num_iters: int, all_reduce,
                        out: Tensor | None = None) -> Tensor:
    """sinkgd.sr_sinkhorn of every matrix of `part`, from this rank's flat gradient partition
    (numel,): the same prescale, iterations and rebuild, with every sum formed over the blocks
    this rank holds, then reduced over the ranks. Every rank calls it with its own partition of
    the same matrices; all_reduce(t, op) reduces t in place over them, op "sum" or "max".
    Returns X laid out as `grad` (zero where no matrix lies), in float32 (float64 if grad is),
    in the first elements of `out` (flat, X's dtype) when given."""
    out = (torch.empty(grad.numel(), dtype=work_dtype(grad), device=grad.device) if out is None
           else out[:grad.numel()]).view(grad.shape)
    at = 0
    for start, end in sorted((o, o + h * w) for _, _, h, w, o in part.blocks) + [(len(out),) * 2]:
        if start > at:
            out[at:start].zero_()  # where no matrix lies: ZeRO's padding
        at = end
    # Per block: its stacked rows and columns, and its gradient and X as (rows, columns) views
    blocks = [(slice(r, r + h), slice(c, c + w), grad[o:o + h * w].view(h, w),
               out[o:o + h * w].view(h, w)) for r, c, h, w, o in part.blocks]
    row_max = out.new_zeros(part.num_rows)
    for rows, _, g, _ in blocks:  # blocks never share a row
        row_max[rows] = row_abs_max(g)
    all_reduce(row_max, "max")
    for rows, _, g, x in blocks:  # 1. prescale: x holds B until the rebuild
        prescale(g, row_max[rows, None], out=x)
    sums = partition_sums(blocks, part, out, all_reduce)
    u, v = sinkhorn(sums, out.new_ones(part.num_cols), part.n, part.m, num_iters)  # 2. iterate
    for rows, cols, g, x in blocks:  # 3. rebuild
        rebuild(g, row_max[rows, None], u[rows, None], v[cols], out=x)
    return out


def partition_sums(blocks, part: Partition, out: Tensor, all_reduce) -> Sums:
    """B v and B^T u over the stacked rows and columns: partial sums over this rank's blocks, then
    one all-reduce for all the matrices. The gauge is one for all: any positive scalar per matrix
    is, and the summed columns are the same on every rank."""
    u_in, row_sums = out.new_zeros(part.num_rows), out.new_zeros(part.num_rows)
    v_in, col_sums = out.new_zeros(part.num_cols), out.new_zeros(part.num_cols)

    def summed(vector_in, sums, products):
        """vector -> sums: each (sums part, block, vector part) view made once, as addmv's args."""
        def apply(vector):
            vector_in.copy_(vector)
            sums.zero_()
            for sums_part, block, vector_part in products:
                sums_part.addmv_(block, vector_part)
            all_reduce(sums, "sum")
            return sums
        return apply
    rows = summed(v_in, row_sums, [(row_sums[r], x, v_in[c]) for r, c, _, x in blocks])
    cols = summed(u_in, col_sums, [(col_sums[c], x.t(), u_in[r]) for r, c, _, x in blocks])
    return Sums(rows, cols, col_max=lambda s: s.amax())


class ZeroSinkGD(SinkGD):
    """SinkGD whose matrix groups may reach step() as ZeRO 1-3 flat partitions. Once DeepSpeed has
    wrapped it, `attach` reads where the matrices lie in them. At stage 0 DeepSpeed hands over
    whole matrices and this is plain SinkGD. Training steps before attach() raise: without it the
    partitions would be taken for matrices."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.partitions: dict[int, Partition] = {}  # id(flat fp32 partition) -> its matrices
        self.workspace: Tensor | None = None  # X, for the largest partition
        self.attached = False

    def attach(self, wrapper) -> None:
        """wrapper: the engine deepspeed.initialize returned, DeepSpeed's optimizer, or any
        optimizer whose chain of `.optimizer` reaches this one (accelerate's, the Trainer's)."""
        # The engine's parsed DeepSpeed config, where the wrapper is an engine
        config = getattr(getattr(wrapper, "_config", None), "_param_dict", None)
        if isinstance(config, dict):
            check_config(config)
        outer, inner = None, wrapper
        while inner is not self:
            if not hasattr(inner, "optimizer"):
                raise ValueError(f"ZeroSinkGD.attach: {type(wrapper).__name__} does not wrap this "
                                 "optimizer; pass the engine that deepspeed.initialize returned, "
                                 "or the optimizer accelerate's prepare did")
            outer, inner = inner, inner.optimizer
        self.partitions = zero_partitions(outer, self) if outer is not None else {}
        self.attached = True

    @torch.no_grad()
    def step(self, closure=None):
        if self.attached:
            return super().step(closure)
        # At stage 0 DeepSpeed's bf16/fp16 optimizers step once with zero gradients while
        # deepspeed.initialize builds them, to create optimizer state. That is no training step.
        # AdamW would count it, its bias corrections a step behind for the whole run, and weight
        # decay would apply; so it does nothing. Any other step is a missed attach.
        params = (p for group in self.param_groups for p in group["params"])
        if any(p.grad is not None and p.grad.any() for p in params):
            raise RuntimeError("ZeroSinkGD.step() before attach(): call optimizer.attach(engine) "
                               "after deepspeed.initialize (Trainer: "
                               "callbacks=[sinkgd_zero.trainer_callback()]); "
                               "without DeepSpeed use sinkgd.SinkGD")
        return None

    def _check_matrices(self) -> None:
        # The partitions that attach() read are what ZeRO hands over (ZeRO-3: one sub-group at a
        # time). Anything else is checked.
        matrices = (p for group in self.param_groups if group["sinkgd"] for p in group["params"])
        if not all(id(p) in self.partitions for p in matrices):
            super()._check_matrices()

    def _found_inf(self):
        # Under ZeRO, DeepSpeed's optimizer has skipped the step if the gradient norm is not finite.
        return None if self.partitions else super()._found_inf()

    def _sinkgd_update(self, group: dict, found_inf) -> None:
        flats = [p for p in group["params"] if id(p) in self.partitions]
        if not flats:
            return super()._sinkgd_update(group, found_inf)
        for flat in flats:
            part = self.partitions[id(flat)]
            if sinkgd_cpu.step_partition(self, flat, part, group, all_reduce_over(part),
                                         self._workspace(flat.grad)):
                continue  # stepped in sinkgd_cpu.py's kernel
            X = sr_sinkhorn_sharded(flat.grad, part, group["sinkhorn_iters"], all_reduce_over(part),
                                    out=self._workspace(flat.grad))
            self._apply([flat], X[None], group, found_inf)

    def _workspace(self, grad: Tensor) -> Tensor:
        """X's memory for each partition in turn, kept from step to step: on the CPU a fresh one
        is mapped anew each step, and its page faults cost a fifth of the step."""
        w, dtype = self.workspace, work_dtype(grad)
        if w is None or w.numel() < grad.numel() or (w.dtype, w.device) != (dtype, grad.device):
            self.workspace = w = torch.empty(grad.numel(), dtype=dtype, device=grad.device)
        return w


def all_reduce_over(part: Partition):
    """The all_reduce of sr_sinkhorn_sharded over part's ranks, on part's communication device."""
    def all_reduce(t: Tensor, op: str) -> None:
        on_comm = t.to(part.comm_device)  # the same tensor when t is there already
        dist.all_reduce(on_comm, op=REDUCE_OPS[op], group=part.process_group)
        if on_comm is not t:
            t.copy_(on_comm)
    return all_reduce


def zero_partitions(zo, optimizer: SinkGD) -> dict[int, Partition]:
    """id(flat fp32 partition) -> Partition, for the partitions of sinkgd groups, from `zo`, the
    object that wraps `optimizer`. DeepSpeed 0.19.8's ZeRO optimizers are told apart by their
    attributes (anything else, e.g. the stage-0 engine: none). Matrices not as the group was built
    (transposed, or resized by tensor parallelism) raise ValueError. tests/test_deepspeed.py
    checks the result against one process at every stage."""
    from deepspeed.accelerator import get_accelerator  # attach() runs under DeepSpeed
    comm_device, found = get_accelerator().current_device_name(), {}

    def add(flat, g, group, pieces):
        built = optimizer.param_groups[g]
        layout = ("(in, out) matrices (transposed=True)" if built["transposed"] else
                  "expert stacks flattened along the rows (experts=E)" if built.get("experts")
                  else None)
        if layout:
            raise ValueError(f"ZeroSinkGD: param group {g} holds {layout}, which sinkgd_zero does "
                             "not read: train it at ZeRO stage 0")
        resized = {p.shape for p in pieces} - {tuple(s[-2:]) for s in optimizer.matrix_shapes[g]}
        if resized:
            raise ValueError(f"ZeroSinkGD: DeepSpeed holds param group {g}'s matrices as "
                             f"{sorted(resized)[:3]}, not as the group was built: sharded by "
                             "tensor parallelism (tensor_parallel.autotp_size > 1?); "
                             "SR-Sinkhorn needs whole matrices, so shard with ZeRO alone")
        found[id(flat)] = Partition(pieces, group, flat.device, comm_device=comm_device)

    if hasattr(zo, "fp32_groups_flat_partition"):  # BF16_Optimizer: ZeRO-1, bf16 weights
        # Each group's params are flattened end to end in order; rank r holds [r * size, (r + 1) *
        # size).
        for g, flat in enumerate(zo.fp32_groups_flat_partition):
            if optimizer.param_groups[g]["sinkgd"]:
                group, shapes = zo.real_dp_process_group[g], [p.shape for p in zo.bf16_groups[g]]
                lo = dist.get_rank(group=group) * flat.numel()
                offsets = itertools.accumulate((s.numel() for s in shapes), initial=0)
                pieces = matrix_pieces(zip(shapes, offsets), lo, lo + flat.numel(), 0)
                add(flat, g, group, pieces)
    elif hasattr(zo, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        # The same, in round-robin order, at the offsets DeepSpeed keeps.
        for g, flat in enumerate(zo.single_partition_of_fp32_groups):
            if optimizer.param_groups[g]["sinkgd"]:
                group = zo.real_dp_process_group[g]
                lo = dist.get_rank(group=group) * int(zo.partition_size[g])
                shapes = (m.shape for m in zo.round_robin_bit16_meta[g])
                pieces = matrix_pieces(zip(shapes, zo.round_robin_bit16_offsets[g]), lo,
                                       lo + flat.numel(), 0)
                add(flat, g, group, pieces)
    elif hasattr(zo, "fp32_partitioned_groups_flat"):  # ZeRO-3
        # Every param is split evenly over the ranks, rank r holding [r * k, (r + 1) * k) of it;
        # a sub-group's flat partition is its params' pieces end to end, k elements each.
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
    """The pieces of the matrices that lie at `offsets` of a buffer (a 3-D expert stack: one
    matrix per expert), held by a partition of elements [lo, hi) of that buffer; element k of the
    buffer is at at + k - lo of the partition."""
    pieces = []
    for shape, offset in shapes_offsets:
        m, n = shape[-2:]
        for first in range(offset, offset + shape.numel(), m * n):
            start, end = max(lo, first), min(hi, first + m * n)
            held = max(end - start, 0)
            pieces.append(Piece((m, n), start - first if held else 0,
                                at + start - lo if held else 0, held))
    return pieces


# DeepSpeed options under which the fp32 partitions are not where, or not what, zero_partitions
# reads: swapped to NVMe, split between devices, stepped by DeepSpeed's own optimizers, or
# matrices sharded by tensor parallelism.
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
    """Raise ValueError naming the first option of `config` (a DeepSpeed config dict) that
    ZeroSinkGD cannot follow."""
    for path, default, unsupported in UNSUPPORTED_OPTIONS:
        if unsupported(value := option(config, path, default)):
            raise ValueError(f"ZeroSinkGD does not support DeepSpeed's {path} = "
                             f"{json.dumps(value)}: the partitions are then not laid out as "
                             "sinkgd_zero reads them; remove it (README: DeepSpeed options)")


def trainer_callback():
    """A transformers.TrainerCallback that attaches the Trainer's ZeroSinkGD to DeepSpeed when
    training begins: Trainer(..., optimizer_cls_and_kwargs=(ZeroSinkGD, {"params": groups}),
    callbacks=[trainer_callback()])."""
    from transformers import TrainerCallback

    class AttachZeroSinkGD(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            inner = optimizer
            while not isinstance(inner, ZeroSinkGD):
                if not hasattr(inner, "optimizer"):
                    raise ValueError(f"the Trainer's optimizer ({type(optimizer).__name__}) is no "
                                     "ZeroSinkGD: pass optimizer_cls_and_kwargs=(ZeroSinkGD, "
                                     "{'params': groups}) to the Trainer (under DeepSpeed it "
                                     "ignores optimizers=)")
                inner = inner.optimizer
            if getattr(args, "hf_deepspeed_config", None) is not None:
                check_config(args.hf_deepspeed_config.config)
            inner.attach(optimizer)
    return AttachZeroSinkGD()
