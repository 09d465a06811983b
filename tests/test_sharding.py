"""The property behind "SinkGD under FSDP2, tensor parallelism and ZeRO equals one process": at world sizes 1, 2, 3
and 4 (gloo CPU ranks), over generated cases, every weight equals one process running SinkGD on the whole matrices
and every rank makes the same collectives. tests/sharding_driver.py draws and runs the cases, one launch per world
size; a DCP checkpoint saved at 4 ranks resumes at 2, one saved at 2 resumes at 3, one saved at 3 resumes at 1.

SHARDING_SEED=<n> draws other cases (the seed of a failure is in its message).
"""
import json
import os
import subprocess

import pytest

from common import REPO, launcher

pytest.importorskip("deepspeed")

SEED = int(os.environ.get("SHARDING_SEED", 2026))
CASES, MODELS, ZEROS = 40, 4, 3  # per world size: DTensor cases, model cases (each kind in turn), ZeRO stages 1-3
ORDER = [(4, None), (2, 4), (3, 2), (1, 3)]  # (world size, the world size whose checkpoint it resumes)
KINDS = {1: {"fsdp"}, 2: {"fsdp", "hsdp", "tp"}, 3: {"fsdp"}, 4: {"fsdp", "hsdp", "tp", "fsdp_tp"}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world size: (rank 0's result, the launch's output)}; each launch resumes the previous one's checkpoint."""
    results = {}
    for world, load in ORDER:
        out = tmp_path_factory.mktemp(f"world{world}")
        args = [str(SEED), str(CASES), str(MODELS), str(ZEROS)] + ([str(results[load][2] / "dcp")] if load else [])
        proc = subprocess.run(launcher(world) + [str(REPO / "tests" / "sharding_driver.py"), str(out), *args],
                              cwd=REPO, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                              timeout=600)
        files = sorted(out.glob("rank*.json"))
        results[world] = ([json.loads(f.read_text()) for f in files], proc.stdout[-3000:] + proc.stderr[-6000:], out)
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_rank_equals_one_process_and_makes_the_same_collectives(runs, world):
    ranks, output, _ = runs[world]
    assert len(ranks) == world, f"world {world} (SHARDING_SEED={SEED}) did not finish:\n{output}"
    for result in ranks:
        failures = result["failures"]
        assert not failures, (f"world {world}, SHARDING_SEED={SEED}: {len(failures)} failures, the first:\n"
                              + json.dumps(failures[0], indent=1))
    cases = ranks[0]["cases"]
    assert cases["dtensor"] == CASES and cases["resume"] == 1
    assert {k for k in cases if k in KINDS[4]} == KINDS[world]  # every model kind this world size can run
    assert sum(cases[k] for k in KINDS[world]) == MODELS
    assert [cases.get(f"zero{stage}") for stage in (1, 2, 3)] == [1, 1, 1]
