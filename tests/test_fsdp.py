"""SinkGD on DTensor shards: FSDP2 on 2 CPU ranks, and FSDP2 with tensor parallelism on a 2 x 2 mesh, equal one
process with plain SinkGD; the step gathers nothing and all-reduces the README's count; a NaN in one shard skips the
step on every rank; torch.distributed.checkpoint resumes it exactly; what SinkGD cannot read is refused."""
import json
import os
import subprocess
import sys

import pytest
import torch

import fsdp_driver as driver
from common import REPO, launcher


def launch(mode, ranks, out):
    proc = subprocess.run(launcher(ranks) + [str(REPO / "tests" / "fsdp_driver.py"), mode, str(out)], cwd=REPO,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return launch("fsdp", 2, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def fsdp_tp(tmp_path_factory):
    return launch("fsdp_tp", 4, tmp_path_factory.mktemp("fsdp_tp"))


def assert_equal_weights(weights, expected, mode, tol=1e-5):
    initial = driver.build(mode).state_dict()
    assert weights.keys() == expected.keys()
    for name, ref in expected.items():
        moved = ((ref - initial[name]).norm() / ref.norm()).item()
        assert name.endswith("norm.weight") or moved > 100 * tol, (name, moved)  # 3 steps moved it
        assert ((weights[name] - ref).norm() / ref.norm()).item() < tol, name


def test_fsdp2_equals_one_process(fsdp):
    """Each block and the root fully_shard-ed over 2 ranks; gate_proj and up_proj split 19 + 18 rows."""
    weights = torch.load(fsdp / "weights.pt", weights_only=True)
    assert_equal_weights(weights, driver.reference("fsdp"), "fsdp")


def test_fsdp2_with_tensor_parallelism_equals_one_process(fsdp_tp):
    """Attention and MLP column- and row-parallel over "tp", FSDP2 over "dp": q, k, v, gate and up have their rows
    split over both, o and down their columns over "tp" and rows over "dp"."""
    weights = torch.load(fsdp_tp / "weights.pt", weights_only=True)
    assert_equal_weights(weights, driver.reference("fsdp_tp"), "fsdp_tp")


def all_reduced(matrices, mesh_dims, L=5):
    """The README's count of elements a rank all-reduces in one step: per matrix (m, n of its shard, and how many
    mesh dimensions split its rows and its columns), L n over each dimension that splits its rows (the column sums),
    (L + 1) m + L - 1 over each that splits its columns (the row maxima, the row sums, the gauge); the flag, once over
    each dimension of the mesh."""
    return mesh_dims + sum(rows * L * n + cols * ((L + 1) * m + L - 1) for m, n, rows, cols in matrices)


@pytest.mark.parametrize("mode", ["fsdp", "fsdp_tp"])
def test_the_step_gathers_nothing_and_all_reduces_the_stated_count(mode, request):
    comm = json.loads((request.getfixturevalue(mode) / "comm.json").read_text())
    assert set(comm["counts"]) == {"c10d.allreduce_"}, comm["counts"]  # no all-gather, nothing else
    assert {op for op, _ in comm["sent"]} == {"c10d.allreduce_.default"}
    layers = driver.CONFIGS[mode].num_hidden_layers
    if mode == "fsdp":  # rank 0's shards: every matrix's rows split over the one mesh dimension
        shapes = [(16, 32)] * 4 + [(19, 32)] * 2 + [(16, 37)]
        matrices = [(m, n, 1, 0) for m, n in shapes] * layers
    else:  # rank 0 (dp 0, tp 0): q, k, v, gate, up rows over both; o, down rows over dp and columns over tp
        matrices = ([(8, 32, 2, 0)] * 3 + [(10, 32, 2, 0)] * 2 + [(16, 16, 1, 1), (16, 19, 1, 1)]) * layers
    assert sum(n for _, n in comm["sent"]) == all_reduced(matrices, mesh_dims=1 if mode == "fsdp" else 2)


def test_a_nan_in_one_shard_skips_the_step_on_every_rank(fsdp):
    """Rank 1's shard of one gradient holds a NaN: on both ranks no weight, AdamW moment or step count changes,
    and optimizer.overflow says so."""
    for rank in range(2):
        result = json.loads((fsdp / f"nonfinite_rank{rank}.json").read_text())
        assert result == dict(overflow=True, unchanged=True, tensors=42), (rank, result)


def test_a_distributed_checkpoint_resumes_exactly(fsdp):
    """Saved with torch.distributed.checkpoint after step 2, loaded into fresh shards: step 3 equals the
    uninterrupted run's bit for bit."""
    resumed = torch.load(fsdp / "resumed.pt", weights_only=True)
    uninterrupted = torch.load(fsdp / "weights.pt", weights_only=True)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


REFUSED = """
import sys
sys.path.insert(0, {repo!r})
import torch, torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard
from sinkgd import SinkGD
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
placement, transposed = {case}
weight = nn.Parameter(DTensor.from_local(torch.ones(4, 6), mesh, [placement]))
SinkGD([dict(params=[nn.Parameter(torch.ones(3, 3)), weight], transposed=transposed)])
"""


@pytest.mark.parametrize("case, placements, why", [
    ("Partial(), False", "Partial(sum)", "a Partial placement (a sum not yet reduced)"),
    ("Shard(0), True", "Shard(dim=0)", "shards of an (in, out) group (transposed=True)")])
def test_what_sinkgd_cannot_read_is_refused_in_one_line(case, placements, why, tmp_path):
    script = tmp_path / "refused.py"
    script.write_text(REFUSED.format(repo=str(REPO), case=case))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]  # torch prefixes a rank's lines with "[rank0]: "
    assert last.endswith(f"ValueError: SinkGD: param group 0's tensor 1 is a DTensor, shape (4, 6), placements "
                         f"({placements},), and SinkGD does not normalize {why} exactly: use Shard or Replicate "
                         "placements of (out, in) matrices, or give it to AdamW (sinkgd=False)"), proc.stderr[-3000:]
