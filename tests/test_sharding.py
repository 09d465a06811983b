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
CASES, MODELS, ZEROS = 32, 4, 3  # per world size: DTensor cases, model cases (each kind in turn), ZeRO stages 1-3
ORDER = [(4, None), (2, 4), (3, 2), (1, 3)]  # (world size, the world size whose checkpoint it resumes)
KINDS = {1: {"fsdp"}, 2: {"fsdp", "hsdp", "tp"}, 3: {"fsdp"}, 4: {"fsdp", "hsdp", "tp", "fsdp_tp"}}


def launch(world: int, out, load) -> tuple[list[dict], str]:
    """The driver at `world` ranks: every rank's result, and the launch's output."""
    args = [str(SEED), str(CASES), str(MODELS), str(ZEROS)] + ([str(load)] if load else [])
    proc = subprocess.run(launcher(world) + [str(REPO / "tests" / "sharding_driver.py"), str(out), *args], cwd=REPO,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]
    return ranks, proc.stdout[-3000:] + proc.stderr[-6000:]


def problems(world: int, ranks: list[dict], output: str) -> list[str]:
    if len(ranks) != world:
        return [f"world {world} (SHARDING_SEED={SEED}) did not finish:\n{output}"]
    found = [f"world {world}, SHARDING_SEED={SEED}: {len(r['failures'])} failures on rank {i}, the first:\n"
             + json.dumps(r["failures"][0], indent=1) for i, r in enumerate(ranks) if r["failures"]]
    cases = ranks[0]["cases"]
    ran = dict(dtensor=cases["dtensor"], resume=cases["resume"], kinds={k for k in cases if k in KINDS[4]},
               models=sum(cases[k] for k in KINDS[world]), zero=[cases.get(f"zero{s}") for s in (1, 2, 3)])
    wanted = dict(dtensor=CASES, resume=1, kinds=KINDS[world], models=MODELS, zero=[1, 1, 1])
    return found + ([] if ran == wanted else [f"world {world} ran {ran}, not {wanted}"])


def test_every_world_size_equals_one_process_and_makes_the_same_collectives(tmp_path):
    """One test, so that the four launches run once, one after another (the checkpoints pass along them)."""
    found, saved = [], {}
    for world, load in ORDER:
        saved[world] = tmp_path / f"world{world}"
        saved[world].mkdir()
        found += problems(world, *launch(world, saved[world], saved[load] / "dcp" if load else None))
    assert not found, "\n\n".join(found)
