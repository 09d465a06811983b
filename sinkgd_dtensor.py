"""SinkGD on DTensor shards (FSDP2, tensor parallel): what sinkgd.SinkGD asks of a parameter held
in pieces over ranks. Each rank holds a piece of a matrix; Alg. 3's sum of a row is all-reduced
over the ranks that split its columns, and the sum of a column over those that split its rows.
The iteration is sinkgd.sinkhorn's; this file only says over which ranks to reduce."""
import math
from typing import Callable, NamedTuple

import torch
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


# What a rank decides alone must not change which collectives it makes: every decision below
# reads what all ranks share (global shapes, placements, meshes), never a local shard's size.


def stepped(p: Tensor) -> bool:
    """Whether the step reads p. A DTensor that trains is read on every rank, gradient or not (a
    rank's stacks and all-reduces must pair with the others'); other tensors when they have one."""
    return p.grad is not None or (hasattr(p, "placements") and p.requires_grad)


def gradient(p: Tensor) -> Tensor:
    """p's gradient on this rank, laid out as local(p). A DTensor's missing gradient (None) reads
    as zeros: a rank with no gradient for its shard contributes a zero one."""
    return local(p.grad) if p.grad is not None else torch.zeros_like(local(p))


def place_gradient(p: Tensor) -> Tensor:
    """p.grad with p's placements, as torch's optimizers see it: a Partial gradient summed, a
    Replicate one cut to p's shard (DTensor.redistribute). The global tensor is the same."""
    grad = p.grad
    if not hasattr(grad, "placements"):
        raise ValueError(f"SinkGD: a DTensor parameter of shape {tuple(p.shape)} has a plain "
                         "gradient, not a DTensor: set its .grad as a DTensor on its mesh")
    if grad.placements != p.placements or grad.device_mesh != p.device_mesh:
        grad = grad.redistribute(p.device_mesh, p.placements)
    if grad.to_local().shape != p.to_local().shape:
        raise ValueError(f"SinkGD: the gradient of a DTensor of shape {tuple(p.shape)} holds "
                         f"{tuple(grad.to_local().shape)} on this rank, not its shard's "
                         f"{tuple(p.to_local().shape)}: nothing was updated")
    return grad


def largest_shard(p: Tensor) -> int:
    """The elements of p's largest shard over all ranks (torch.chunk's split: the first rank's),
    the same number on every rank; p's elements for a tensor held whole."""
    shape = list(p.shape)
    for mesh_dim, placement in enumerate(getattr(p, "placements", ())):
        if (dim := getattr(placement, "dim", None)) is not None:
            shape[dim] = -(-shape[dim] // p.device_mesh.size(mesh_dim))
    return math.prod(shape)


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


def max_over_ranks(flag: Tensor, params) -> Tensor:
    """The finiteness flag, the largest over the ranks of params' meshes (not the world: they may
    live on a sub-mesh): a NaN in one shard skips every rank. Over each dimension of each mesh, the
    largest first; a mesh whose ranks lie in a kept one adds nothing and is left out."""
    meshes = dict.fromkeys(p.device_mesh for p in params if hasattr(p, "placements"))
    meshes = sorted(meshes, key=lambda mesh: -mesh.size())  # in the params' order where sizes tie
    kept = []
    for mesh in meshes:
        if not any(set(mesh.mesh.flatten().tolist()) <= set(k.mesh.flatten().tolist())
                   for k in kept):
            kept.append(mesh)
    return reduce_over([mesh.get_group(d) for mesh in kept for d in range(mesh.ndim)])(flag, "max")


def found_inf(params: list[Tensor]) -> Tensor | None:
    """1.0 on the device if a gradient of params is not finite, else 0.0; by min and max, not a
    norm. With DTensors, over all ranks of their meshes."""
    grads = [g for g in (gradient(p) for p in params) if g.numel()]
    if not grads and not sharded(params):
        return None
    extremes = [x for g in grads for x in torch.aminmax(g)]
    flag = (torch.stack(extremes).isfinite().all().logical_not().float() if extremes else
            local(params[0]).new_zeros((), dtype=torch.float32))  # float32 on every rank
    return max_over_ranks(flag, params) if sharded(params) else flag
