"""SinkGD on DTensor shards (FSDP2, tensor parallel): what sinkgd.SinkGD asks of a parameter held
in pieces over ranks. Each rank holds a piece of a matrix; Alg. 3's sum of a row is all-reduced
over the ranks that split its columns, and the sum of a column over those that split its rows.
The iteration is sinkgd.sinkhorn's; this file only says over which ranks to reduce."""
from typing import Callable, NamedTuple

import torch.distributed as dist
from torch import Tensor

REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class Split(NamedTuple):
    """Where a piece of a matrix held over ranks lies: across_rows(t, op) and across_cols(t, op)
    reduce t in place, "sum" or "max", over the ranks holding the matrix's other rows and other
    columns, and return it; (m, n) is the whole matrix's shape."""
    across_rows: Callable[[Tensor, str], Tensor]
    across_cols: Callable[[Tensor, str], Tensor]
    m: int
    n: int


def whole(t: Tensor, op: str) -> Tensor:  # the reduction of a matrix held whole: none
    return t


def local(t: Tensor) -> Tensor:  # a DTensor's shard on this rank; any other tensor as it is
    return t.to_local() if hasattr(t, "placements") else t


def sharded(params) -> bool:
    return any(hasattr(p, "placements") for p in params)


def reduce_over(groups: list):
    """(t, op) -> t all-reduced in place over each process group in turn; none: `whole`."""
    def reduce(t: Tensor, op: str) -> Tensor:
        for group in groups:
            dist.all_reduce(t, op=REDUCE_OPS[op], group=group)
        return t
    return reduce if groups else whole


def split_of(p: Tensor) -> Split | None:
    """How p's shard lies: over the mesh dimensions that split its rows (dim -2), and those that
    split its columns (dim -1). A split of an expert stack's first dimension leaves its matrices
    whole. Shard and FSDP2's _StridedShard have a dim; Replicate splits nothing."""
    if not hasattr(p, "placements"):
        return None
    rows, cols = [], []
    for mesh_dim, placement in enumerate(p.placements):
        dim = getattr(placement, "dim", None)
        if dim is not None and dim % p.dim() >= p.dim() - 2:
            split = rows if dim % p.dim() == p.dim() - 2 else cols
            split.append(p.device_mesh.get_group(mesh_dim))
    return Split(reduce_over(rows), reduce_over(cols), *p.shape[-2:])


def check_shards(p: Tensor, which: str, group: dict) -> None:
    """A DTensor is read exactly where its rows and columns are whole or split: Shard and
    Replicate placements of (out, in) matrices or (experts, out, in) stacks. Else ValueError."""
    placements = tuple(getattr(p, "placements", ()))
    why = ("a Partial placement (a sum not yet reduced)" if any(
               placement.is_partial() for placement in placements) else
           "shards of an (in, out) group (transposed=True)" if group["transposed"] else
           "shards of flattened expert stacks (experts=E)" if group.get("experts") else None)
    if placements and why:
        raise ValueError(f"SinkGD: {which} is a DTensor, shape {tuple(p.shape)}, placements "
                         f"{placements}, and SinkGD does not normalize {why} exactly: use Shard "
                         "or Replicate placements of (out, in) matrices, or give it to AdamW "
                         "(sinkgd=False)")


def max_over_ranks(flag: Tensor) -> Tensor:
    """The finiteness flag, the largest over all ranks: a NaN in one shard skips every rank."""
    return reduce_over([dist.group.WORLD])(flag, "max")
