"""tools.bench_gpu on the CPU (--smoke: every code path of the GPU run, tiny model), and the GPU-facing details of
train.py and the input pipeline that can be checked without a GPU."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import model
import prepare_c4
from common import env_without_hub_client
from tools import bench_gpu

REPO = bench_gpu.ROOT
SMOKE_ROWS = [row.name for row in bench_gpu.rows_of(bench_gpu.SMOKE)]


def failing_run(started):
    """A stand-in for bench_gpu.run_logged that records which rows start, with their timeout, and fails them."""
    def run(command, log, timeout):
        started.append((log.stem, timeout))
        log.write_text("not run\n")
        return 3
    return run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One full `--smoke` run as a user types it, its temporary folders under a TMPDIR of its own, where the Hub
    client, its HTTP libraries, transformers and accelerate cannot be imported (as on a stock CUDA image)."""
    out, tmp = tmp_path_factory.mktemp("smoke"), tmp_path_factory.mktemp("tmp")
    env = env_without_hub_client(tmp_path_factory.mktemp("site")) | {"TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "tools.bench_gpu", str(out), "--smoke"], cwd=REPO, text=True,
                          capture_output=True, env=env, timeout=600)
    return proc, out, tmp


def test_smoke_run_measures_every_row_and_keeps_no_checkpoint(smoke):
    proc, out, tmp = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == SMOKE_ROWS
    assert {"zero2", "eager", "step"} == {r["kind"] for r in results["rows"]}
    for r in results["rows"]:
        assert "error" not in r and (out / "logs" / f"{r['name']}.log").exists()
        if r["kind"] == "step":
            assert set(r["optimizer_step_ms"]) == {"sinkgd", "adamw"} and min(r["optimizer_step_ms"].values()) > 0
        else:
            assert r["tokens_per_sec"] > 0 and r["peak_memory_gib"] > 0 and r["mfu"] is None
    setup = results["setup"]
    assert setup["torch"] == torch.__version__ and setup["deepspeed"] and setup["device"].startswith("CPU")
    table = (out / "table.md").read_text()
    assert table.count("| llama_tiny |") == 4 and "deepspeed ZeRO-2" in table and table.strip() in proc.stdout
    assert not list(tmp.glob("bench_*"))  # the training runs' checkpoints went with their temporary folders
    assert not list(out.rglob("ckpt_*")) and not list(out.rglob("step_*"))


def test_a_failed_row_is_recorded_and_the_others_go_on_and_a_rerun_skips_done_rows(tmp_path, monkeypatch, capsys):
    failing = "llama_tiny-sinkgd-eager"
    training_command = bench_gpu.training_command
    monkeypatch.setattr(bench_gpu, "training_command", lambda mode, row, *args: (
        [sys.executable, "-c", "import sys; print('starting'); sys.exit('error: injected')"] if row.name == failing
        else training_command(mode, row, *args)))
    argv = [str(tmp_path), "--smoke", "--only", failing, "llama_tiny-step"]
    with pytest.raises(SystemExit, match=f"1 row\\(s\\) failed: {failing}"):
        bench_gpu.main(argv)
    rows = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows[failing]["error"] == "error: injected (exit status 1)"
    assert "starting" in (tmp_path / "logs" / f"{failing}.log").read_text()
    assert rows["llama_tiny-step"]["optimizer_step_ms"]["sinkgd"] > 0  # measured after the failure
    assert f"failed: error: injected (exit status 1) (logs/{failing}.log)" in (tmp_path / "table.md").read_text()

    started = []
    monkeypatch.setattr(bench_gpu, "run_logged", failing_run(started))
    with pytest.raises(SystemExit):
        bench_gpu.main(argv)
    assert [name for name, _ in started] == [failing]  # the measured row is kept; the failed one is tried again


def test_budget_starts_no_row_that_would_not_end_in_time(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(bench_gpu, "run_logged", failing_run(started))
    monkeypatch.setitem(bench_gpu.FIRST_ESTIMATE_S, "step", 1)  # only the step row is guessed to fit in 30 s
    with pytest.raises(SystemExit):
        bench_gpu.main([str(tmp_path), "--smoke", "--budget_s", "30"])
    assert [name for name, _ in started] == ["llama_tiny-step"] and 0 < started[0][1] <= 30
    assert "not started, past --budget_s: " + " ".join(SMOKE_ROWS[:-1]) in capsys.readouterr().out


def test_estimates_come_from_the_longest_recorded_row_of_the_kind():
    row = bench_gpu.Row("llama_130m", "sinkgd", "compile")
    recorded = [dict(kind="compile", size="llama_60m", seconds=50), dict(kind="compile", size="llama_60m", seconds=70),
                dict(kind="eager", size="llama_130m", seconds=400)]
    assert bench_gpu.estimate_s(row, recorded) == 70
    assert bench_gpu.estimate_s(row, recorded + [dict(kind="compile", size="llama_130m", seconds=20)]) == 20
    assert bench_gpu.estimate_s(row, []) == bench_gpu.FIRST_ESTIMATE_S["compile"]


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1"], "error: --steps must be more than 1"),
    (["--only", "llama_60m-sinkgd-eager"], "error: unknown --only row(s) llama_60m-sinkgd-eager; rows: "),
])
def test_bad_arguments_exit_with_one_line(tmp_path, argv, message):
    proc = subprocess.run([sys.executable, "-m", "tools.bench_gpu", str(tmp_path), "--smoke", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(message)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40", 181e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
    ("NVIDIA GeForce RTX 4090", math.nan), ("", math.nan)])
def test_mfu_peak_matches_the_exact_gpu_name(name, peak):
    assert model.peak_bf16_flops(name) == peak or math.isnan(peak) and math.isnan(model.peak_bf16_flops(name))


def test_loader_batch_is_one_contiguous_tensor_pinned_when_asked(monkeypatch):
    shards = [np.arange(100, dtype=np.uint16)]
    pinned, empty = [], torch.empty

    def empty_on_cpu(*args, pin_memory=False, **kwargs):  # pinning needs CUDA: record the request, allocate plainly
        pinned.append(pin_memory)
        return empty(*args, pin_memory=pin_memory and torch.cuda.is_available(), **kwargs)
    monkeypatch.setattr(torch, "empty", empty_on_cpu)
    tokens = prepare_c4.TokenLoader(shards, seq_len=9, seed=0, rank=1, world_size=2, pin_memory=True).next_batch(4)
    assert pinned == [True] and tokens.is_contiguous() and tokens.shape == (2, 10) and tokens.dtype == torch.int64
    assert tokens.is_pinned() == torch.cuda.is_available()
    for row in tokens:  # each row is a whole window of the shard
        assert row[0] % 10 == 0 and torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 10))
    prepare_c4.TokenLoader(shards, seq_len=9, seed=0).next_batch(4)
    assert pinned == [True, False]
