"""The property test of tests/test_sharding.py: SinkGD on pieces of matrices held over W ranks equals one process on
the whole matrices, and every rank makes the same collectives, over generated cases. One launch per world size:

    python -m torch.distributed.run --standalone --nproc_per_node W tests/sharding_driver.py OUT SEED CASES MODELS \
        ZEROS [LOAD]

Every rank draws the same cases from random.Random(SEED) and runs each:
- "dtensor" (CASES of them): groups of same-shape matrices and expert stacks, given as DTensors on a 1-D mesh of
  every rank, a 2-D mesh (HSDP's [Replicate, Shard], rows and columns split), or a sub-mesh that leaves a rank out
  (it does other work meanwhile); shapes that do and do not divide, fewer rows, columns or experts than ranks; bf16
  or fp32; stack_bytes at and around the boundaries of the largest and smallest shard; gradients laid out as the
  parameter, Replicate against Shard, Partial against Replicate or Shard, missing on one rank, or NaN on one rank;
  an AdamW vector beside them. Two steps each.
- models (MODELS, each kind in turn): FSDP2 (fully_shard, Shard(0) or Shard(1) placements, HSDP on a 2-D mesh),
  tensor parallelism alone with a torchtitan-style plan (SequenceParallel norms, RowwiseParallel embedding,
  ColwiseParallel head, loss parallel), FSDP2 x TP on 2 x 2.
- ZEROS cases of ZeRO 1, 2 and 3 in turn, from DeepSpeed with ZeroSinkGD, on matrices of generated shapes.
- resume: a torch.distributed.checkpoint of an FSDP2 run after step 1 saved to OUT/dcp (LOAD: one saved by another
  world size, loaded here for step 2).

Each case compares every weight with one process running SinkGD on the whole matrices, and every rank's record of
the step's collectives (op, dtype, elements, group) with the other ranks'. A failing check does not stop the run:
OUT/rank<r>.json lists the failures, each with its case's description and seed.
"""
import contextlib
import json
import os
import random
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import Llama, LlamaConfig  # noqa: E402
from sinkgd import SinkGD, sinkgd_param_groups  # noqa: E402

BF16_ULP = 2.0 ** -7  # bf16's spacing relative to a value, at most


# ---------------------------------------------------------------------------------------------------------------------
# What a rank sends


class Collectives(TorchDispatchMode):
    """(op, dtype, elements, the group's ranks) of every collective dispatched inside the mode: c10d's and the
    functional ones DTensor's redistribute uses."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(("c10d.", "_c10d_functional.")) and not name.endswith(
                ("wait_tensor.default", "_wrap_tensor_autograd.default")):
            tensors = list(flatten(args[0]))
            self.calls.append((name, str(tensors[0].dtype) if tensors else "", sum(t.numel() for t in tensors),
                               group_ranks(args)))
        return func(*args, **(kwargs or {}))


def flatten(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from flatten(y)


def group_ranks(args) -> list[int]:
    for arg in args:
        group = None
        if isinstance(arg, str) and arg not in ("sum", "max", "min", "avg", "product"):
            group = torch._C._distributed_c10d._resolve_process_group(arg)
        elif isinstance(arg, torch.ScriptObject):
            try:
                group = dist.ProcessGroup.unbox(arg)
            except RuntimeError:
                continue
        if group is not None:
            return dist.get_process_group_ranks(group)
    return []


def same_collectives(calls: list, group=None) -> str | None:
    """None if the ranks of `group` (None: the world) made the same sequence of collectives: the same ops and dtypes
    over groups of the same size in the same order, and over each group the same element counts on every rank in
    it; else why not."""
    members = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    gathered = [None] * len(members)
    dist.all_gather_object(gathered, calls, group=group)
    everyone = dict(zip(members, gathered))
    kinds = {r: [(op, dtype, len(ranks)) for op, dtype, _, ranks in everyone[r]] for r in members}
    if len({json.dumps(k) for k in kinds.values()}) > 1:
        return f"ranks differ in their collectives: {kinds}"
    for r in members:
        for ranks in {tuple(ranks) for *_, ranks in everyone[r]}:
            seqs = {q: [c[:3] for c in everyone[q] if tuple(c[3]) == ranks] for q in ranks}
            if len({json.dumps(s) for s in seqs.values()}) > 1:
                return f"over group {ranks} the ranks send different counts: {seqs}"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Checks


def close(name: str, got: torch.Tensor, want: torch.Tensor, steps: int = 1) -> str | None:
    """fp32: within 1e-6 of the reference, relative to its norm; bf16: every entry within `steps` bf16 steps."""
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.dtype == torch.bfloat16:
        bad = ((got.double() - want.double()).abs() > steps * BF16_ULP * want.double().abs()).sum().item()
        return None if bad == 0 else f"{name}: {bad} bf16 entries more than {steps} steps from one process"
    err = (got.double() - want.double()).norm().item() / max(want.double().norm().item(), 1e-30)
    return None if err < 1e-6 else f"{name}: {err:.2e} from one process"


class Checks:
    def __init__(self, seed: int):
        self.seed, self.failures, self.cases = seed, [], {}

    def run(self, kind: str, spec: dict, fn) -> None:
        """fn() -> a list of failure strings; an exception is one failure too (the other ranks may then fail at their
        next collective: the run's timeout says so)."""
        self.cases[kind] = self.cases.get(kind, 0) + 1
        try:
            found = [f for f in fn() if f]
        except Exception:  # noqa: BLE001  (recorded, with the case, for the test to show)
            found = [traceback.format_exc(limit=6)]
        self.failures += [dict(kind=kind, seed=self.seed, spec=spec, failure=f) for f in found]
        for f in found:
            print(f"rank {dist.get_rank()}: {kind} case failed: {spec}\n{f}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# DTensor cases


class Meshes:
    def __init__(self, world: int):
        self.world = world
        self.line = init_device_mesh("cpu", (world,))
        # HSDP replicates over "outer" and shards over "inner"; FSDP2 x TP: FSDP2 over "outer", TP over "inner"
        self.grid = (init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("outer", "inner"))
                     if world in (2, 4) else None)
        # ranks 0 .. world - 2: the last rank is left out (a pipeline stage of its own, say)
        self.sub = DeviceMesh("cpu", list(range(world - 1))) if world > 1 else None

    def get(self, name):
        return dict(line=self.line, grid=self.grid, sub=self.sub)[name]


MATRIX_PLACEMENTS = {1: [["S0"], ["S1"], ["R"]],
                     2: [["R", "S0"], ["S0", "S1"], ["S1", "S0"], ["S0", "S0"], ["R", "S1"]]}


def placement(code: str):
    return {"R": Replicate(), "S0": Shard(0), "S1": Shard(1), "S2": Shard(2), "P": Partial()}[code]


def draw_dtensor_case(rng: random.Random, world: int) -> dict:
    meshes = ["line"] + (["grid"] if world in (2, 4) else []) + (["sub"] if world > 1 else [])
    mesh = rng.choice(meshes)
    ndim, size = (2, world) if mesh == "grid" else (1, world - 1 if mesh == "sub" else world)
    small = range(1, 2 * size + 4)  # fewer than, as many as and more than the ranks; dividing or not
    groups = []
    for _ in range(rng.randint(1, 3)):
        experts = rng.choice([None, None, rng.randint(1, size + 1)])
        shape = [rng.choice(small), rng.choice(small)]
        places = list(rng.choice(MATRIX_PLACEMENTS[ndim]))
        if experts:  # FSDP2 splits an expert stack's first dimension
            shape, places = [experts] + shape, [{"S0": "S0", "S1": "S2", "R": "R"}[p] for p in places]
            places[-1] = rng.choice(["S0", places[-1]])
        grads = rng.choice(["same"] * 3 + ["replicate", "partial"])
        groups.append(dict(shape=shape, count=rng.randint(1, 4), placements=places, grads=grads))
    dtype = rng.choice(["float32", "float32", "bfloat16"])
    # the old stacking cut by the local shard's size: stack_bytes between multiples of two ranks' shard sizes
    first = groups[0]
    numels = [shard_numel(first["shape"], first["placements"], mesh, r) for r in range(world)]
    unit = rng.choice([max(numels), max(1, min(numels))]) * ((2 if dtype == "bfloat16" else 4) + 4)
    stack_bytes = rng.choice([0, 16 << 20, unit * rng.randint(1, 3) + rng.choice([-1, 0, 1])])
    fault = rng.choice([None] * 4 + ["none", "nan"])
    return dict(mesh=mesh, groups=groups, dtype=dtype, stack_bytes=max(0, stack_bytes), fault=fault,
                fault_rank=rng.randrange(size), fault_group=rng.randrange(len(groups)),
                vector=dict(size=rng.choice(small), placement=rng.choice(["R", "S0"]),
                            grads=rng.choice(["same", "partial"])),
                iters=rng.randint(1, 3), weight_decay=rng.choice([0.0, 0.1]), lr=rng.choice([0.01, 0.03]),
                seed=rng.randrange(2**31))


def shard_numel(shape, places, mesh: str, rank: int) -> int:
    """Elements of `rank`'s shard by torch.chunk's rule (only used to aim stack_bytes near the boundaries)."""
    if mesh == "sub" and rank == 0:
        return 0
    dims = list(shape)
    for code in places:
        if code.startswith("S"):
            d = int(code[1])
            dims[d] = -(-dims[d] // 2) if rank % 2 == 0 else dims[d] // 2
    return int(torch.tensor(dims).prod())


def gradient_places(places: list[str], how: str) -> list[str]:
    """A gradient's placements: the parameter's, Replicate everywhere, or Partial on the first mesh dimension that
    replicates (else the first)."""
    if how == "replicate":
        return ["R"] * len(places)
    if how == "partial":
        at = places.index("R") if "R" in places else 0
        return places[:at] + ["P"] + places[at + 1:]
    return places


def laid_out(full: torch.Tensor, mesh: DeviceMesh, places: list[str]) -> DTensor:
    """full on mesh with `places`, each rank cutting its own piece (no communication); a Partial dimension holds
    this rank's `full` as its summand."""
    spec = [placement(p) for p in places]
    base = distribute_tensor(full, mesh, [Replicate() if p == "P" else s for p, s in zip(places, spec)],
                             src_data_rank=None)
    return DTensor.from_local(base.to_local(), mesh, spec, shape=full.shape, stride=full.stride())


def run_dtensor_case(spec: dict, meshes: Meshes) -> list:
    mesh = meshes.get(spec["mesh"])
    if mesh.get_coordinate() is None:  # a rank left out of the sub-mesh: other work, then the next case
        torch.ones(64, 64) @ torch.ones(64, 64)
        return []
    group = SUBGROUPS[tuple(range(mesh.size()))] if spec["mesh"] == "sub" else None
    dtype = getattr(torch, spec["dtype"])
    seeded = torch.Generator().manual_seed(spec["seed"])  # the same on every rank
    ranked = torch.Generator().manual_seed(spec["seed"] + 1 + dist.get_rank())  # Partial gradients' summands

    def full(shape, gen=seeded):
        return torch.randn(shape, generator=gen).to(dtype)

    def summand(shape):  # eighths from -1 to 1: their sum over the ranks is exact in any order, bf16 too
        return (torch.randint(-8, 9, shape, generator=ranked) / 8).to(dtype)

    vector = spec["vector"]
    vector_places = ["R"] * mesh.ndim if vector["placement"] == "R" else ["R"] * (mesh.ndim - 1) + ["S0"]
    plan = [(g["shape"], g["placements"], g["grads"]) for g in spec["groups"] for _ in range(g["count"])]
    plan.append(([vector["size"]], vector_places, vector["grads"]))
    whole = [nn.Parameter(full(shape)) for shape, _, _ in plan]
    sharded = [nn.Parameter(laid_out(w.detach(), mesh, places)) for w, (_, places, _) in zip(whole, plan)]
    options = dict(lr=spec["lr"], weight_decay=spec["weight_decay"], sinkhorn_iters=spec["iters"],
                   skip_nonfinite=True)
    optimizer = SinkGD([dict(params=sharded[:-1]), dict(params=sharded[-1:], sinkgd=False)],
                       stack_bytes=spec["stack_bytes"], **options)
    reference = SinkGD([dict(params=whole[:-1]), dict(params=whole[-1:], sinkgd=False)], **options)
    faulty = sum(g["count"] for g in spec["groups"][:spec["fault_group"]])  # the faulty group's first matrix
    failures = []
    for step in range(2):
        grads = [laid_out(summand(shape) if how == "partial" else full(shape), mesh, gradient_places(places, how))
                 for shape, places, how in plan]
        fault = spec["fault"] if step == 1 and plan[faulty][2] == "same" else None
        here = fault and mesh.get_coordinate()[-1] == spec["fault_rank"] % mesh.size(-1)  # some ranks only
        local = grads[faulty].to_local()
        if here and fault == "nan" and local.numel():
            local[(0,) * local.dim()] = float("nan")
        if here and fault == "none":
            local.zero_()  # what one process sees: a zero piece
        # the gradients one process sees (Partial ones summed): outside the recording
        for p, g, w in zip(sharded, grads, whole):
            w.grad = g.full_tensor()
            p.grad = None if here and fault == "none" and p is sharded[faulty] else g
        nonfinite = torch.tensor([float(not torch.cat([w.grad.flatten() for w in whole]).isfinite().all())])
        dist.all_reduce(nonfinite, dist.ReduceOp.MAX, group=group)  # a NaN in one replica skips the step too
        before = [p.full_tensor() for p in sharded] if nonfinite.item() else []
        with Collectives() as sent:
            optimizer.step()
        failures.append(same_collectives(sent.calls, group))
        if nonfinite.item():
            failures.append(None if optimizer.overflow else "a non-finite gradient was not seen")
            failures += [None if torch.equal(b, p.full_tensor()) else f"tensor {i} changed on a skipped step"
                         for i, (b, p) in enumerate(zip(before, sharded))]
            continue
        reference.step()
        failures.append("overflow without a non-finite gradient" if optimizer.overflow else None)
        failures += [close(f"step {step} tensor {i}", p.full_tensor(), w.detach(), steps=step + 1)
                     for i, (p, w) in enumerate(zip(sharded, whole))]
        optimizer.zero_grad()
        reference.zero_grad()
    return failures


SUBGROUPS = {}


# ---------------------------------------------------------------------------------------------------------------------
# Models: FSDP2, HSDP, tensor parallelism as torchtitan plans it, FSDP2 x TP


MODEL_KINDS = {1: ["fsdp"], 2: ["fsdp", "hsdp", "tp"], 3: ["fsdp"], 4: ["fsdp", "hsdp", "tp", "fsdp_tp"]}


def draw_model_case(rng: random.Random, world: int, i: int) -> dict:
    kind = MODEL_KINDS[world][i % len(MODEL_KINDS[world])]  # each kind in turn
    tp = {"tp": world, "fsdp_tp": 2}.get(kind, 1)
    heads = tp * rng.choice([1, 2])
    return dict(kind=kind, heads=heads, head_dim=rng.choice([2, 4]), seed=rng.randrange(2**31),
                intermediate=tp * rng.randint(1, 9), vocab=tp * rng.randint(4, 16),
                placements=rng.choice(["S0", "S1", "mixed"]), reshard=rng.choice([True, False]),
                steps=2, batch=2 * world // tp, iters=rng.randint(1, 5), weight_decay=rng.choice([0.0, 0.1]))


def model_config(spec: dict) -> LlamaConfig:
    return LlamaConfig(vocab_size=spec["vocab"], hidden_size=spec["heads"] * spec["head_dim"],
                       intermediate_size=spec["intermediate"], num_attention_heads=spec["heads"],
                       num_hidden_layers=1, max_position_embeddings=8)


def build_model(spec: dict) -> Llama:
    torch.manual_seed(spec["seed"])
    return Llama(model_config(spec))


def model_optimizer(model: Llama, spec: dict) -> SinkGD:
    groups = sinkgd_param_groups(model, model.model.layers, lr=0.02, weight_decay=spec["weight_decay"])
    return SinkGD(groups, lr=0.02, sinkhorn_iters=spec["iters"], weight_decay=spec["weight_decay"])


def model_batches(spec: dict) -> torch.Tensor:
    return torch.randint(0, spec["vocab"], (spec["steps"], spec["batch"], 9), generator=torch.Generator().manual_seed(
        spec["seed"]))


TORCHTITAN_BLOCK = {  # torchtitan's LLaMA plan (parallelize_llama), named as this repository's modules are
    "input_layernorm": SequenceParallel(),
    "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                    desired_input_layouts=(Replicate(), None, None)),
    "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
    "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
    "post_attention_layernorm": SequenceParallel(),
    "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
    "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
    "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
}
TORCHTITAN_TOP = {
    "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
    "model.norm": SequenceParallel(),
    "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
}
PLAIN_TP = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}


def parallel_model(spec: dict, meshes: Meshes) -> tuple[Llama, int, int]:
    """The model laid out as spec["kind"] says, and this rank's data-parallel index and count."""
    model, world, rank = build_model(spec), dist.get_world_size(), dist.get_rank()
    kind = spec["kind"]
    if kind == "tp":
        parallelize_module(model, meshes.line, TORCHTITAN_TOP)
        for block in model.model.layers:
            parallelize_module(block, meshes.line, TORCHTITAN_BLOCK)
            block.self_attn.n_head //= world
        return model, 0, 1
    if kind == "fsdp_tp":
        for block in model.model.layers:
            parallelize_module(block, meshes.grid["inner"], PLAIN_TP)
            block.self_attn.n_head //= 2
        dp, index, count = meshes.grid["outer"], meshes.grid["outer"].get_local_rank(), 2
    else:
        dp, index, count = (meshes.grid, rank, world) if kind == "hsdp" else (meshes.line, rank, world)

    def placement_of(p):  # FSDP2 splits dims other than 0 only evenly, in the tensor-parallel shard
        shape = p.to_local().shape if isinstance(p, DTensor) else p.shape
        if p.dim() < 2 or spec["placements"] == "S0" or shape[1] % dp.size(-1):
            return Shard(0)
        return Shard(1) if spec["placements"] == "S1" or shape[0] < dp.size(-1) else Shard(0)
    for block in model.model.layers:
        fully_shard(block, mesh=dp, reshard_after_forward=spec["reshard"], shard_placement_fn=placement_of)
    fully_shard(model, mesh=dp, reshard_after_forward=spec["reshard"], shard_placement_fn=placement_of)
    return model, index, count


def loss_of(model: Llama, tokens: torch.Tensor, parallel_loss: bool) -> None:
    with loss_parallel() if parallel_loss else contextlib.nullcontext():
        model(tokens[:, :-1], tokens[:, 1:])[1].backward()


def one_process(spec: dict) -> dict:
    """The weights after spec's steps in one process, plain SinkGD on every step's whole batch."""
    reference = build_model(spec)
    optimizer = model_optimizer(reference, spec)
    for tokens in model_batches(spec):
        loss_of(reference, tokens, False)
        optimizer.step()
        optimizer.zero_grad()
    return reference.state_dict()


def run_model_case(spec: dict, meshes: Meshes) -> list:
    want = one_process(spec)
    model, index, count = parallel_model(spec, meshes)
    optimizer = model_optimizer(model, spec)
    per = spec["batch"] // count
    failures = []
    for tokens in model_batches(spec)[:, index * per:(index + 1) * per]:
        loss_of(model, tokens, spec["kind"] == "tp")
        with Collectives() as sent:
            optimizer.step()
        optimizer.zero_grad()
        failures.append(same_collectives(sent.calls, None))
    for name, p in model.state_dict().items():
        failures.append(close(name, p.full_tensor() if isinstance(p, DTensor) else p, want[name]))
    return failures


# ---------------------------------------------------------------------------------------------------------------------
# ZeRO 1-3 from DeepSpeed, with sinkgd_zero.ZeroSinkGD


def draw_zero_case(rng: random.Random, world: int, i: int) -> dict:
    small = range(1, 3 * world + 4)
    return dict(stage=1 + i % 3, shapes=[[rng.choice(small), rng.choice(small)]
                                                     for _ in range(rng.randint(1, 5))],
                vector=rng.choice(small), iters=rng.randint(1, 5), weight_decay=rng.choice([0.0, 0.1]),
                seed=rng.randrange(2**31))


class Layers(nn.Module):
    """Linear maps of the given (out, in) shapes and a vector: loss sum_k y_k . (x_k W_k^T) + c . vector, whose
    gradients (y_k^T x_k and c) are the same on every rank."""

    def __init__(self, shapes, vector: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(n, m, bias=False) for m, n in shapes)
        self.vector = nn.Parameter(torch.ones(vector))

    def forward(self, xs, ys, c):
        return sum((layer(x) * y).sum() for layer, x, y in zip(self.layers, xs, ys)) + (self.vector * c).sum()


def zero_inputs(spec: dict, step: int):
    gen = torch.Generator().manual_seed(spec["seed"] + step)
    xs = [torch.randn(8, n, generator=gen) for m, n in spec["shapes"]]
    ys = [torch.randn(8, m, generator=gen) for m, n in spec["shapes"]]
    return xs, ys, torch.randn(spec["vector"], generator=gen)


def zero_groups(model: Layers, spec: dict) -> list:
    return [dict(params=list(model.layers.parameters())), dict(params=[model.vector], sinkgd=False)]


def run_zero_case(spec: dict) -> list:
    import deepspeed

    import zero
    from sinkgd_zero import ZeroSinkGD
    options = dict(lr=0.02, sinkhorn_iters=spec["iters"], weight_decay=spec["weight_decay"])
    torch.manual_seed(spec["seed"])
    reference = Layers(spec["shapes"], spec["vector"])
    ref_optimizer = SinkGD(zero_groups(reference, spec), **options)
    model = Layers(spec["shapes"], spec["vector"])
    model.load_state_dict(reference.state_dict())
    engine = zero.initialize({"zero_optimization": {"stage": spec["stage"]}, "steps_per_print": 10**9}, model,
                             ZeroSinkGD(zero_groups(model, spec), **options), None,
                             batch_size=dist.get_world_size(), micro_batch_size=1, grad_clip=0.0, bf16=False)
    failures = []
    for step in range(2):
        inputs = zero_inputs(spec, step)
        reference(*inputs).backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()
        engine.backward(engine(*inputs))
        with Collectives() as sent:
            engine.step()
        failures.append(same_collectives(sent.calls, None))
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=spec["stage"] == 3):
        got = {k: v.detach().clone() for k, v in model.state_dict().items()}
    want = reference.state_dict()
    partitions = len(engine.optimizer.optimizer.partitions) if spec["stage"] else 1
    failures.append(None if partitions else "ZeroSinkGD met no ZeRO partition")
    return failures + [close(name, got[name], want[name]) for name in want]


# ---------------------------------------------------------------------------------------------------------------------
# Resume at another world size: FSDP2, a torch.distributed.checkpoint after step 1

RESUME = dict(kind="fsdp", heads=2, head_dim=4, seed=7, intermediate=13, vocab=23, placements="S0", reshard=True,
              steps=2, batch=12, iters=5, weight_decay=0.1)


def run_resume(out: Path, load: str | None, meshes: Meshes) -> list:
    """Step 1, save to out/dcp, step 2; and if `load`: fresh shards from that checkpoint (saved at another world
    size) take step 2. Both equal one process after 2 steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    want = one_process(RESUME)
    world, rank = dist.get_world_size(), dist.get_rank()
    per = RESUME["batch"] // world
    mine = model_batches(RESUME)[:, rank * per:(rank + 1) * per]

    def trained(model, optimizer, steps):
        for tokens in steps:
            loss_of(model, tokens, False)
            optimizer.step()
            optimizer.zero_grad()
        return [close(f"{name} after {len(steps)} steps here", p.full_tensor(), want[name])
                for name, p in model.state_dict().items()]

    def fresh():
        model = parallel_model(RESUME, meshes)[0]
        return model, model_optimizer(model, RESUME)
    model, optimizer = fresh()
    trained(model, optimizer, mine[:1])
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=out / "dcp")
    failures = trained(model, optimizer, mine[1:])
    if load and not (Path(load) / ".metadata").exists():
        return failures + [f"no checkpoint at {load}: the run at the world size that saves it failed"]
    if load:
        model, optimizer = fresh()
        # on an optimizer without state, get_state_dict steps it once at lr 0 to make some (AdamW's step count
        # then reads 1), as for torch's optimizers; the load below replaces it
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=load)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
        failures += [f and f.replace("here", "from a checkpoint saved at another world size")
                     for f in trained(model, optimizer, mine[1:])]
    return failures


def main(out: Path, seed: int, cases: int, models: int, zeros: int, load: str | None) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    meshes = Meshes(world)
    if world > 1:
        members = tuple(range(world - 1))
        SUBGROUPS[members] = dist.new_group(list(members))
    checks = Checks(seed)
    rng = random.Random(seed)
    for _ in range(cases):
        spec = draw_dtensor_case(rng, world)
        checks.run("dtensor", spec, lambda: run_dtensor_case(spec, meshes))
        dist.barrier()
    for i in range(models):
        spec = draw_model_case(rng, world, i)
        checks.run(spec["kind"], spec, lambda: run_model_case(spec, meshes))
        dist.barrier()
    if zeros:
        import zero
        zero.init_distributed("cpu")  # DeepSpeed on the process group already made
    for i in range(zeros):
        spec = draw_zero_case(rng, world, i)
        checks.run(f"zero{spec['stage']}", spec, lambda: run_zero_case(spec))
        dist.barrier()
    checks.run("resume", dict(RESUME, load=load), lambda: run_resume(out, load, meshes))
    (out / f"rank{rank}.json").write_text(json.dumps(dict(world=world, seed=seed, cases=checks.cases,
                                                          failures=checks.failures), default=str))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *map(int, sys.argv[2:6]), sys.argv[6] if len(sys.argv) > 6 else None)
    sys.stdout.flush()
    os._exit(0)  # gloo can abort a rank in the interpreter's teardown after a clean finish
