"""SinkGD under FSDP2, alone and with tensor parallelism, for tests/test_fsdp.py: CPU ranks over gloo.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_driver.py fsdp OUT
    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/fsdp_driver.py fsdp_tp OUT

Both train CONFIGS[mode] for STEPS steps on every step's BATCH (each data-parallel rank its half), then save
every weight whole (full_tensor) to OUT/weights.pt, and what the last step() sent to OUT/comm.json. fsdp also
saves a torch.distributed.checkpoint after step 2, loads it into fresh shards and takes step 3 again
(OUT/resumed.pt), then steps once with a NaN in rank 1's shard of one gradient (OUT/nonfinite_rank<r>.json).
"""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import Llama, LlamaConfig  # noqa: E402
from sinkgd import SinkGD, sinkgd_param_groups  # noqa: E402
from sinkgd_dtensor import local  # noqa: E402

# FSDP2 alone: gate_proj and up_proj (37, 32) and the head (97, 32) have rows that do not divide by 2 ranks.
# With tensor parallelism they are (38, 32): 19 rows on each "tp" rank, which FSDP2 splits 10 + 9 over "dp"
# (DTensor's matmuls need the "tp" split even).
CONFIGS = {mode: LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=size, num_attention_heads=4,
                             num_hidden_layers=2, max_position_embeddings=16)
           for mode, size in [("fsdp", 37), ("fsdp_tp", 38)]}
STEPS, BATCH, SEQ, LR = 3, 8, 16, 0.02
TP_PLAN = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
           "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
           "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}


def batches(mode: str) -> torch.Tensor:
    """(STEPS, BATCH, SEQ + 1) token ids, the same on every rank."""
    return torch.randint(0, CONFIGS[mode].vocab_size, (STEPS, BATCH, SEQ + 1),
                         generator=torch.Generator().manual_seed(1))


def build(mode: str) -> Llama:
    torch.manual_seed(0)
    return Llama(CONFIGS[mode])


def optimizer_for(model: Llama) -> SinkGD:
    return SinkGD(sinkgd_param_groups(model, model.model.layers, lr=LR), lr=LR, skip_nonfinite=True)


def backward(model: Llama, tokens: torch.Tensor) -> None:
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()


def reference(mode: str) -> dict:
    """One process, plain SinkGD on every step's whole batch: the weights after STEPS steps."""
    model = build(mode)
    optimizer = optimizer_for(model)
    for tokens in batches(mode):
        backward(model, tokens)
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sharded(mode: str) -> tuple[Llama, object]:
    """The model on its mesh, and the mesh's data-parallel part: FSDP2 over every rank, or a 2 x 2 mesh,
    tensor parallel over "tp" and FSDP2 over "dp"."""
    model = build(mode)
    if mode == "fsdp":
        dp = init_device_mesh("cpu", (dist.get_world_size(),))
    else:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        dp = mesh["dp"]
        for block in model.model.layers:
            parallelize_module(block, mesh["tp"], TP_PLAN)
            block.self_attn.n_head //= mesh["tp"].size()  # this rank's heads
    for block in model.model.layers:
        fully_shard(block, mesh=dp)
    fully_shard(model, mesh=dp)
    return model, dp


class Sent(TorchDispatchMode):
    """(collective, elements) for every c10d collective dispatched inside the mode."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("c10d."):
            tensors = args[0] if isinstance(args[0], (list, tuple)) else [args[0]]
            self.calls.append((str(func), sum(t.numel() for t in tensors)))
        return func(*args, **(kwargs or {}))


def snapshot(model: Llama, optimizer: SinkGD) -> list[torch.Tensor]:
    """This rank's shards of every weight, and of every AdamW moment and step."""
    state = [t for s in optimizer.state.values() for t in s.values()]
    return [local(t).detach().clone() for t in list(model.parameters()) + state]


def main(mode: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, dp = sharded(mode)
    optimizer = optimizer_for(model)
    half = BATCH // dp.size()
    mine = batches(mode)[:, dp.get_local_rank() * half:(dp.get_local_rank() + 1) * half]  # this rank's data
    for step, tokens in enumerate(mine):
        backward(model, tokens)
        if step < STEPS - 1:
            optimizer.step()
        else:
            with CommDebugMode() as comm, Sent() as sent:
                optimizer.step()
        optimizer.zero_grad()
        if mode == "fsdp" and step == STEPS - 2:
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=out / "dcp")
    weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(weights, out / "weights.pt")
        counts = {str(op): n for op, n in comm.get_comm_counts().items()}
        (out / "comm.json").write_text(json.dumps(dict(counts=counts, sent=sent.calls)))
    if mode == "fsdp":
        resume_and_skip(out, mine)
    dist.barrier()
    dist.destroy_process_group()


def resume_and_skip(out: Path, mine: torch.Tensor) -> None:
    """Fresh shards loaded from the checkpoint of step 2 take step 3; then a step whose gradient is NaN in one
    element of rank 1's shard."""
    model, _ = sharded("fsdp")
    optimizer = optimizer_for(model)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=out / "dcp")
    set_model_state_dict(model, state["model"])
    # strict=False: SinkGD's matrices keep no state to load, as torch's SGD without momentum
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(strict=False))
    backward(model, mine[STEPS - 1])
    optimizer.step()
    optimizer.zero_grad()
    weights = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if dist.get_rank() == 0:
        torch.save(weights, out / "resumed.pt")

    backward(model, mine[0])
    if dist.get_rank() == 1:
        local(model.model.layers[0].mlp.gate_proj.weight.grad)[0, 0] = float("nan")
    before = snapshot(model, optimizer)
    optimizer.step()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, snapshot(model, optimizer)))
    (out / f"nonfinite_rank{dist.get_rank()}.json").write_text(json.dumps(dict(
        overflow=optimizer.overflow, unchanged=unchanged, tensors=len(before))))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)  # gloo can abort a rank in the interpreter's teardown after a clean finish
