"""Crash safety of train.py: a run killed with SIGKILL (between steps, mid-step, while writing a checkpoint)
and resumed equals the uninterrupted run; checkpoints are never half-written; a full disk, a non-finite loss
or gradient and bad input stop the run with one line and leave what was written intact.

Faults are injected into real training processes by `install_faults`, which `DRIVER` runs before train.main.
"""
import hashlib
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import checkpoint
import model as model_module
import prepare_c4
import train
import zero
from common import REPO, assert_same_tensors, deterministic, launcher, load_ckpt, read_metrics

TEST_MODEL = "llama_test_crash"
TEST_CONFIG = model_module.LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                       num_hidden_layers=2, max_position_embeddings=64)
ACCUMULATION = 2  # micro-batches per step in every run here, so a fault can land mid-step
# 12 steps; a checkpoint every 4 with only the newest 2 kept, so pruning happens too
ARGS = ["--device", "cpu", "--preset", "llama_tiny", "--model", TEST_MODEL, "--seq_len", "32", "--batch_size", "8",
        "--micro_batch_size", "4", "--max_steps", "12", "--warmup_frac", "0.25", "--eval_interval", "4",
        "--eval_tokens", "264", "--log_interval", "1", "--ckpt_interval", "4", "--keep_checkpoints", "2",
        "--device", "cpu", "--dtype", "float32"]
DRIVER = f"""
import os, sys
sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
import test_crash, train
test_crash.install_faults(os.environ)
train.main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # as common.TRAIN_DRIVER
"""
DETERMINISTIC_KEYS = ("step", "train_loss", "lr", "val_loss", "val_ppl", "skipped")


# ---------------------------------------------------------------- fault injection


class NanGradient(torch.autograd.Function):
    """The identity going forward, NaN going back: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def poisoned_llama(nan_loss_steps=(), nan_grad_steps=()):
    """A Llama whose loss (or only its gradient) is NaN on the first micro-batch of the given steps."""
    class PoisonedLlama(model_module.Llama):
        instances = []

        def __init__(self, config):
            super().__init__(config)
            self.training_calls = 0
            PoisonedLlama.instances.append(self)

        def forward(self, input_ids, targets=None):
            logits, loss = super().forward(input_ids, targets)
            if self.training:
                self.training_calls += 1
                step, micro = divmod(self.training_calls - 1, ACCUMULATION)
                if micro == 0 and step + 1 in nan_loss_steps:
                    loss = loss * math.nan
                if micro == 0 and step + 1 in nan_grad_steps:
                    loss = NanGradient.apply(loss)
            return logits, loss
    return PoisonedLlama


def kill_self(delay_s: float = 0.0):
    time.sleep(delay_s)
    os.kill(os.getpid(), signal.SIGKILL)


def fault_at_batch(next_batch, at: int, fault):
    """TokenLoader.next_batch, calling fault() as the at-th micro-batch is read."""
    calls = 0

    def next_batch_or_fault(self, batch_size):
        nonlocal calls
        calls += 1
        if calls == at:
            fault()
        return next_batch(self, batch_size)
    return next_batch_or_fault


def install_faults(env):
    """Run in the training process: register the test model, then arm the faults that env names.
    KILL_AT_BATCH=n: SIGKILL as the n-th micro-batch is read. PAUSE_AT_BATCH=n: there, create the file PAUSED_FILE
    and wait, for the test to kill the run from outside at a known point. KILL_IN_SAVE=name: the torch.save to a path
    containing `name` writes half its bytes, then SIGKILL (after KILL_DELAY_S; on rank KILL_RANK only).
    KILL_AFTER_RENAME=name: SIGKILL just after a file is renamed to `name`.
    NAN_LOSS_STEPS, NAN_GRAD_STEPS: comma-separated steps whose loss or gradient is NaN."""
    model_module.CONFIGS[TEST_MODEL] = TEST_CONFIG
    steps = {key: {int(s) for s in env.get(key, "").split(",") if s} for key in ("NAN_LOSS_STEPS", "NAN_GRAD_STEPS")}
    if any(steps.values()):
        train.Llama = poisoned_llama(steps["NAN_LOSS_STEPS"], steps["NAN_GRAD_STEPS"])
    if env.get("KILL_RANK", "0") != env.get("RANK", "0"):
        return

    def pause():
        Path(env["PAUSED_FILE"]).touch()
        threading.Event().wait()  # until killed

    for key, fault in (("KILL_AT_BATCH", kill_self), ("PAUSE_AT_BATCH", pause)):
        if key in env:
            prepare_c4.TokenLoader.next_batch = fault_at_batch(prepare_c4.TokenLoader.next_batch, int(env[key]), fault)

    if "KILL_IN_SAVE" in env:
        save = torch.save

        def save_half_then_die(obj, f, *args, **kwargs):
            if env["KILL_IN_SAVE"] not in str(getattr(f, "name", f)):
                return save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(f, "wb") if isinstance(f, (str, os.PathLike)) else f as out:
                out.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
                out.flush()
                os.fsync(out.fileno())
                kill_self(float(env.get("KILL_DELAY_S", 0)))
        torch.save = save_half_then_die

    if "KILL_AFTER_RENAME" in env:
        replace = os.replace

        def replace_then_die(src, dst):
            replace(src, dst)
            if Path(dst).name == env["KILL_AFTER_RENAME"]:
                kill_self()
        os.replace = replace_then_die



# ---------------------------------------------------------------- helpers


def launch(args, out_dir, ranks=None, faults=None, wait=True):
    """train.py (through DRIVER) in fresh processes: one, or `ranks` DeepSpeed ranks under torchrun."""
    driver = out_dir.parent / "driver.py"
    driver.write_text(DRIVER)
    # one thread: the same float summation order in every process, so single-process runs match bit for bit
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (faults or {})
    proc = subprocess.Popen(launcher(ranks) + [str(driver), *args, "--out_dir", str(out_dir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.stdout_text, proc.stderr_text = proc.communicate(timeout=600)
    return proc


def snapshot(path):
    """The file at path, or every file under it: its bytes' sha256 and its mtime."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    assert files
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


@pytest.fixture
def test_model_registered(monkeypatch):
    """For runs in this process: the test model, on one thread (a second only contends on a busy machine)."""
    monkeypatch.setitem(model_module.CONFIGS, TEST_MODEL, TEST_CONFIG)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- kill -9, then --resume: the same run


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted") / "out"
    proc = launch(ARGS + ["--data_dir", str(data_dir)], out_dir)
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    return out_dir


KILLS = {  # fault -> the step the resumed run continues from
    "between_steps": ({"KILL_AT_BATCH": str(6 * ACCUMULATION + 1)}, 4),  # step 6 done, step 7 not begun
    "mid_step": ({"KILL_AT_BATCH": str(7 * ACCUMULATION + 2)}, 4),  # second micro-batch of step 8
    "mid_checkpoint_write": ({"KILL_IN_SAVE": "ckpt_00000008"}, 4),  # half of step 8's checkpoint written
    "after_checkpoint_rename": ({"KILL_AFTER_RENAME": "ckpt_00000008.pt"}, 8),  # before its directory fsync
    "external_kill": ({"PAUSE_AT_BATCH": str(5 * ACCUMULATION + 1)}, 4),  # by the test: step 5 done, step 6 waits
}


def wait_until(condition, proc, what: str, deadline_s: float = 300):
    """Poll condition() until it holds; fail, naming `what`, if proc exits first or the deadline passes."""
    end = time.monotonic() + deadline_s
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"no sign of {what} within {deadline_s} s")
        time.sleep(0.05)


@pytest.mark.parametrize("fault", KILLS)
def test_resume_after_kill_equals_the_uninterrupted_run(fault, data_dir, uninterrupted, tmp_path):
    out_dir = tmp_path / "out"
    args = ARGS + ["--data_dir", str(data_dir)]
    faults, resumed_from = KILLS[fault]
    if "PAUSE_AT_BATCH" in faults:  # SIGKILL from outside, once the run says where it is
        paused = tmp_path / "paused"
        proc = launch(args, out_dir, faults=faults | {"PAUSED_FILE": str(paused)}, wait=False)
        wait_until(paused.exists, proc, f"the run pausing at micro-batch {faults['PAUSE_AT_BATCH']}")
        proc.kill()
        proc.communicate(timeout=60)
    else:
        proc = launch(args, out_dir, faults=faults)
    assert proc.returncode == -signal.SIGKILL
    if fault == "mid_checkpoint_write":
        assert (out_dir / "ckpt_00000008.pt.tmp").exists()  # the torn file, never under a checkpoint name
    if fault == "mid_step":  # a log line cut short, as a crash in the middle of writing it leaves
        with open(out_dir / "metrics.jsonl", "a") as f:
            f.write('{"step": 8, "train_lo')

    resumed = launch(args + ["--resume"], out_dir)
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    assert f"resumed from step {resumed_from}" in resumed.stdout_text
    expected = deterministic(read_metrics(uninterrupted), DETERMINISTIC_KEYS)
    assert deterministic(read_metrics(out_dir), DETERMINISTIC_KEYS) == expected
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in uninterrupted.iterdir())  # no .tmp
    final, reference = (load_ckpt(d / "ckpt_00000012.pt") for d in (out_dir, uninterrupted))
    for key in ("model", "optimizer", "scheduler", "loader", "rng", "step", "nonfinite_steps"):
        assert_same_tensors(final[key], reference[key])  # bit for bit


# ---------------------------------------------------------------- DeepSpeed, 2 ranks over gloo


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed")


class Killed(Exception):
    pass


def tags(out_dir):
    return sorted(d.name for d in Path(out_dir).glob("step_*"))


def write_tag(out_dir, step, ranks=(0, 1), world_size=2, node_local=False):
    """A DeepSpeed tag as `ranks` save it at ZeRO 1-2 (rank 0 writes the model states too), each vouching for its
    files."""
    tag_dir = Path(out_dir) / f"step_{step:08d}"
    tag_dir.mkdir(parents=True, exist_ok=True)
    for rank in ranks:
        paths = [tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]
        paths += [tag_dir / "mp_rank_00_model_states.pt"] if rank == 0 or node_local else []
        for path in paths:
            path.write_bytes(os.urandom(64))
        checkpoint.vouch_for(tag_dir, paths, rank, world_size, node_local)
    return tag_dir


def agreed(*rank_dirs, world_size=2, node_local=False):
    """The tag that ranks seeing rank_dirs (one each) resume from, as zero.resume decides it."""
    found = [checkpoint.own_parts(out_dir, rank) for rank, out_dir in enumerate(rank_dirs)]
    return checkpoint.agreed_deepspeed_tag(found, rank_dirs[0], world_size, node_local, report=True)


def test_deepspeed_prune_cut_short_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    """The rank that keeps out_dir prunes old DeepSpeed tags after committing a new one. A prune killed half-way
    through deleting a tag leaves it without manifests, so no resume takes it for intact, and the next commit
    finishes the deletion."""
    for step in (1, 2, 3):
        checkpoint.commit_deepspeed(write_tag(tmp_path, step), rank=0, keep=2)
    assert tags(tmp_path) == ["step_00000002", "step_00000003"]
    assert (tmp_path / "latest").read_text() == "step_00000003"

    def killed_rmtree(path):  # deletes one data file, then the process dies
        sorted(Path(path).glob("*.pt"))[-1].unlink()
        raise Killed
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)
    with pytest.raises(Killed):
        checkpoint.commit_deepspeed(write_tag(tmp_path, 4), rank=0, keep=2)
    monkeypatch.undo()
    cut_short = tmp_path / "step_00000002"
    assert cut_short.is_dir() and not list(cut_short.glob("manifest*"))
    assert agreed(tmp_path, tmp_path) == "step_00000004"
    shutil.rmtree(tmp_path / "step_00000004")
    shutil.rmtree(tmp_path / "step_00000003")  # only the cut-short tag left: it is not resumable
    assert agreed(tmp_path, tmp_path) is None
    checkpoint.commit_deepspeed(write_tag(tmp_path, 3), rank=0, keep=1)
    assert tags(tmp_path) == ["step_00000003"]


def test_deepspeed_resume_agrees_on_the_newest_tag_intact_on_every_rank(tmp_path, capsys):
    """Two nodes with their own disks, a rank each: each rank checks only its own files, and all resume from the
    newest tag intact on both. What one node lacks or holds damaged is skipped on both, and said."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for step in (2, 4, 6, 8):
        for rank, node in enumerate(nodes):
            write_tag(node, step, ranks=[rank], node_local=True)
    assert agreed(*nodes, node_local=True) == "step_00000008"
    torn = nodes[1] / "step_00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torn.write_bytes(torn.read_bytes()[:32])
    (nodes[1] / "step_00000006" / checkpoint.manifest_name(1)).unlink()  # rank 1 killed before vouching
    shutil.rmtree(nodes[0] / "step_00000004")  # lost on node 0
    assert agreed(*nodes, node_local=True) == "step_00000002"
    assert capsys.readouterr().err.splitlines() == [
        f"warning: skipping checkpoint {nodes[0] / 'step_00000008'}: rank 1: changed since saved: {torn.name}",
        f"warning: skipping checkpoint {nodes[0] / 'step_00000006'}: rank 1: its save did not finish",
        f"warning: skipping checkpoint {nodes[0] / 'step_00000004'}: rank 0: not in its out_dir"]
    (nodes[0] / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match="none of the 4 checkpoints in .* is intact on every rank"):
        agreed(*nodes, node_local=True)
    assert agreed(tmp_path / "empty", tmp_path / "empty") is None


@pytest.mark.parametrize("saved, resumed", [((2, True), (2, False)), ((2, True), (3, True)), ((2, False), (1, False))])
def test_deepspeed_resume_in_another_setup_is_one_line(saved, resumed, tmp_path):
    """Checkpoints saved by another rank count, or on node-local storage and resumed from shared (or the reverse),
    are refused in one line: DeepSpeed would load other ranks' partitions or miss files."""
    (world_size, node_local), (resumed_world_size, resumed_node_local) = saved, resumed
    write_tag(tmp_path, 2, ranks=[0], world_size=world_size, node_local=node_local)
    rank_dirs = [tmp_path] * resumed_world_size
    with pytest.raises(checkpoint.CheckpointError) as error:
        agreed(*rank_dirs, world_size=resumed_world_size, node_local=resumed_node_local)
    storage = {True: "node-local", False: "shared"}
    assert str(error.value) == (
        f"the checkpoints in {tmp_path} were saved by {world_size} ranks on {storage[node_local]} storage, this run "
        f"has {resumed_world_size} on {storage[resumed_node_local]}: resume with the same rank count and "
        "checkpoint.use_node_local_storage, or choose another --out_dir to start afresh")


@needs_deepspeed
def test_deepspeed_resume_skips_torn_and_corrupt_checkpoints(data_dir, tmp_path):
    from test_deepspeed import assert_same_training, deepspeed_weights, ds_config
    config = ds_config(tmp_path, 3, sub_group_size=2_000_000)
    # 6 steps of 2 ranks x micro-batch 2 x 2 micro-batches, a checkpoint every 2, the newest 2 kept; --adam_eps: see
    # test_deepspeed.py
    args = ARGS + ["--data_dir", str(data_dir), "--deepspeed_config", str(config), "--micro_batch_size", "2",
                   "--max_steps", "6", "--ckpt_interval", "2", "--eval_interval", "2", "--keep_checkpoints", "2",
                   "--adam_eps", "1e-5"]
    straight = launch(args, tmp_path / "straight", ranks=2)
    assert straight.returncode == 0, straight.stderr_text[-3000:]
    assert tags(tmp_path / "straight") == ["step_00000004", "step_00000006"]  # step 2's pruned by step 6's commit

    # Rank 1 dies half-way through writing step 6's checkpoint, 3 s after rank 0 finished its part: time in
    # which DeepSpeed's own save_checkpoint would already have pointed `latest` at the torn step_00000006.
    out_dir = tmp_path / "killed"
    killed = launch(args, out_dir, ranks=2,
                    faults={"KILL_IN_SAVE": "step_00000006", "KILL_RANK": "1", "KILL_DELAY_S": "3"})
    assert killed.returncode != 0
    assert not (out_dir / "step_00000006" / checkpoint.manifest_name(1)).exists()
    assert (out_dir / "latest").read_text() == "step_00000004"
    # and step 4's, complete, has since lost a byte on disk
    damaged = sorted((out_dir / "step_00000004").glob("*optim_states.pt"))[0]
    damaged.write_bytes(damaged.read_bytes()[:-1])

    resumed = launch(args + ["--resume"], out_dir, ranks=2)
    assert resumed.returncode == 0, resumed.stderr_text[-3000:]
    assert "resumed from step 2" in resumed.stdout_text
    assert (f"warning: skipping checkpoint {out_dir / 'step_00000006'}: rank 0: its save did not finish; rank 1: "
            "its save did not finish" in resumed.stderr_text)  # rank 0 waits in DeepSpeed's save until rank 1 is done
    assert (f"warning: skipping checkpoint {damaged.parent}: rank 0: changed since saved: {damaged.name}"
            in resumed.stderr_text)
    assert (out_dir / "latest").read_text() == "step_00000006"
    assert tags(out_dir) == ["step_00000004", "step_00000006"]  # both saved again; step 2's, resumed from, pruned
    assert_same_training(read_metrics(out_dir), deepspeed_weights(out_dir, 3, "step_00000006"),
                         read_metrics(tmp_path / "straight"),
                         deepspeed_weights(tmp_path / "straight", 3, "step_00000006"), tol=1e-6)


def run_nodes(args, node_dirs, faults=None):
    """train.py (through DRIVER) on two nodes of one DeepSpeed rank each, simulated on this machine: two launchers
    joined by torchrun's static rendezvous (--nnodes 2), each rank its node's first, and each node given its own
    --out_dir, so that a rank sees only its node's files, as on node-local disks. If node 0 fails (a fault killed it),
    node 1 is killed, as a cluster's scheduler ends the job. The two finished launchers, node 0's first."""
    driver = node_dirs[0].parent / "driver.py"
    driver.parent.mkdir(parents=True, exist_ok=True)
    driver.write_text(DRIVER)
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (faults or {})
    for _ in range(3):  # the port picked here can be taken before node 0's launcher binds it: then try another
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", str(driver), *args, "--out_dir", str(out_dir)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for node, out_dir in enumerate(node_dirs)]
        procs[0].stdout_text, procs[0].stderr_text = procs[0].communicate(timeout=600)
        if procs[0].returncode != 0:
            os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].stdout_text, procs[1].stderr_text = procs[1].communicate(timeout=600)
        if "EADDRINUSE" not in procs[0].stderr_text:
            return procs
    pytest.fail(f"no free port for the rendezvous in 3 tries: {procs[0].stderr_text[-3000:]}")


def merged_fp32_weights(node_dirs, tag, stage):
    """The fp32 master weights of a ZeRO checkpoint whose ranks' files are spread over node_dirs."""
    from test_deepspeed import deepspeed_weights
    merged = node_dirs[0].parent / "merged"
    shutil.rmtree(merged, ignore_errors=True)
    for node in node_dirs:
        shutil.copytree(node / tag, merged / tag, dirs_exist_ok=True)
    return deepspeed_weights(merged, stage, tag)


@needs_deepspeed
def test_deepspeed_node_local_checkpoints_resume_where_every_node_is_intact(data_dir, tmp_path):
    """With "use_node_local_storage" each node's disk holds its ranks' files (and its own copy of the model states):
    each node prunes its own copy; after a kill -9, with a file of the newest checkpoint torn on node 1 alone, both
    ranks skip it and resume from the one before, ending where the uninterrupted run does."""
    from test_deepspeed import assert_same_training
    config = tmp_path / "ds_node_local.json"
    config.write_text(json.dumps(json.loads((REPO / "ds_config.json").read_text())  # ZeRO-2, as shipped
                                 | {"checkpoint": {"use_node_local_storage": True}}))
    args = ARGS + ["--data_dir", str(data_dir), "--deepspeed_config", str(config), "--micro_batch_size", "2",
                   "--max_steps", "6", "--ckpt_interval", "2", "--eval_interval", "2", "--keep_checkpoints", "2",
                   "--adam_eps", "1e-5"]
    straight = [tmp_path / "straight" / f"node{node}" for node in (0, 1)]
    procs = run_nodes(args, straight)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr_text[-3000:] + procs[1].stderr_text[-3000:]
    for node in straight:  # each node pruned its own copy, and its `latest` follows
        assert tags(node) == ["step_00000004", "step_00000006"] and (node / "latest").read_text() == "step_00000006"
    rank1_optimizer = "step_00000006/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert (straight[1] / rank1_optimizer).exists() and not (straight[0] / rank1_optimizer).exists()

    killed = [tmp_path / "killed" / f"node{node}" for node in (0, 1)]
    procs = run_nodes(args, killed, faults={"KILL_AT_BATCH": str(4 * ACCUMULATION + 1)})  # rank 0, as step 5 begins
    assert procs[0].returncode != 0 and "Signal 9 (SIGKILL)" in procs[0].stderr_text, procs[0].stderr_text[-3000:]
    for node in killed:
        assert tags(node) == ["step_00000002", "step_00000004"]
    torn = killed[1] / "step_00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torn.write_bytes(torn.read_bytes()[:torn.stat().st_size // 2])

    procs = run_nodes(args + ["--resume"], killed)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr_text[-3000:] + procs[1].stderr_text[-3000:]
    assert "resumed from step 2" in procs[0].stdout_text
    assert (f"warning: skipping checkpoint {killed[0] / 'step_00000004'}: rank 1: changed since saved: {torn.name}"
            in procs[0].stderr_text)
    for node in killed:
        assert tags(node) == ["step_00000004", "step_00000006"]
    assert_same_training(read_metrics(killed[0]), merged_fp32_weights(killed, "step_00000006", 2),
                         read_metrics(straight[0]), merged_fp32_weights(straight, "step_00000006", 2), tol=1e-6)

    # One process on node 0's copy, with storage taken as shared: refused in one line, the checkpoints untouched.
    before = snapshot(killed[0])
    shared = launch(ARGS + ["--data_dir", str(data_dir), "--deepspeed_config", str(REPO / "ds_config.json"),
                            "--resume"], killed[0])
    assert shared.returncode == 1 and shared.stderr_text.strip().splitlines()[-1] == (
        f"error: the checkpoints in {killed[0]} were saved by 2 ranks on node-local storage, this run has 1 on "
        "shared: resume with the same rank count and checkpoint.use_node_local_storage, or choose another --out_dir "
        "to start afresh")
    assert snapshot(killed[0]) == before


@needs_deepspeed
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_skips_a_nonfinite_gradient(stage, data_dir, tmp_path):
    """At stage 0 in fp32 DeepSpeed hands the gradient straight to our optimizer, which skips the step (for its SinkGD
    and AdamW groups alike); at ZeRO 1-3 DeepSpeed's ZeRO optimizer skips it (ZeRO-1's is ZeRO-2's code). Either way:
    no weight, state or schedule change, on every rank."""
    from test_deepspeed import ds_config
    from tools.export_hf import load_weights
    args = ARGS + ["--data_dir", str(data_dir), "--deepspeed_config", str(ds_config(tmp_path, stage)),
                   "--micro_batch_size", "2", "--max_steps", "4", "--ckpt_interval", "1", "--keep_checkpoints", "5",
                   "--lr", "1e-3", "--max_bad_steps", "1"]
    proc = launch(args, tmp_path / "out", ranks=2, faults={"NAN_GRAD_STEPS": "2"})
    assert proc.returncode == 0, proc.stderr_text[-3000:]
    metrics = read_metrics(tmp_path / "out")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[1]["skipped"] == "non-finite gradient at step 2"
    schedule = train.TrainConfig(max_steps=4, warmup_frac=0.25)
    assert metrics[2]["lr"] == pytest.approx(1e-3 * train.lr_factor(schedule, 1))  # step 2 left the schedule alone
    assert all(math.isfinite(m["train_loss"]) for m in metrics if "skipped" not in m)
    weights = [load_weights(tmp_path / "out" / f"step_{s:08d}")[0] for s in (1, 2, 3)]
    assert_same_tensors(weights[1], weights[0])  # step 2 changed nothing
    assert not torch.equal(weights[2]["lm_head.weight"], weights[1]["lm_head.weight"])
    assert all(torch.isfinite(w).all() for w in weights[2].values())


@needs_deepspeed
def test_deepspeed_files_load_as_data_only(tmp_path):
    """The loader alone; test_deepspeed.py shows it is the one a DeepSpeed resume uses."""
    from test_deepspeed import RunsCode
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": RunsCode(tmp_path / "pwned")}, path)
    with pytest.raises(checkpoint.CheckpointError, match=f"^{path} holds more than tensors .*posix.system"):
        zero.load_deepspeed_file(str(path))
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- a full disk


def test_full_disk_while_saving_reports_it_and_keeps_the_last_checkpoint(data_dir, tmp_path, test_model_registered):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full, where every write fails with ENOSPC")
    out_dir = tmp_path / "out"
    args = ARGS + ["--data_dir", str(data_dir), "--out_dir", str(out_dir), "--ckpt_interval", "2"]
    train.main(args + ["--max_steps", "2"])
    before = snapshot(out_dir / "ckpt_00000002.pt")
    (out_dir / "ckpt_00000004.pt.tmp").symlink_to("/dev/full")  # where step 4's checkpoint is written first
    with pytest.raises(SystemExit) as stop:
        train.main(args + ["--max_steps", "4", "--resume"])
    message = stop.value.code
    assert message.startswith(f"error: could not write checkpoint {out_dir / 'ckpt_00000004.pt'} "
                              "(No space left on device;") and message.endswith("earlier checkpoints are intact")
    assert "\n" not in message
    assert snapshot(out_dir / "ckpt_00000002.pt") == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["ckpt_00000002.pt", "metrics.jsonl"]  # temp file gone
    train.main(args + ["--max_steps", "4", "--resume"])  # space again: carries on from step 2
    assert load_ckpt(out_dir / "ckpt_00000004.pt")["step"] == 4


# ---------------------------------------------------------------- non-finite loss or gradient


@pytest.mark.parametrize("optimizer", ["sinkgd", "adamw"])
@pytest.mark.parametrize("poisoned", ["loss", "gradient"])
def test_nonfinite_step_stops_the_run_before_the_weights_change(poisoned, optimizer, data_dir, tmp_path, monkeypatch,
                                                                 capsys, test_model_registered):
    llama = poisoned_llama(**{("nan_loss_steps" if poisoned == "loss" else "nan_grad_steps"): {6}})
    monkeypatch.setattr(train, "Llama", llama)
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train.main(ARGS + ["--data_dir", str(data_dir), "--out_dir", str(out_dir), "--optimizer", optimizer,
                           "--ckpt_interval", "5"])
    assert stop.value.code == (f"error: non-finite {poisoned} at step 6 (1 such step(s), --max_bad_steps 0); weights "
                               "not updated and the last checkpoint is intact: resume from it with a lower --lr")
    assert capsys.readouterr().err == ""
    assert [r["step"] for r in read_metrics(out_dir)] == [1, 2, 3, 4, 5]
    assert [p.name for p in checkpoint.checkpoint_paths(out_dir)] == ["ckpt_00000005.pt"]
    weights = llama.instances[0].state_dict()  # what step 6 left in memory: still step 5's weights
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert_same_tensors(weights, load_ckpt(out_dir / "ckpt_00000005.pt")["model"])


def test_max_bad_steps_skips_and_reports_until_one_too_many(data_dir, tmp_path, monkeypatch, test_model_registered):
    llama = poisoned_llama(nan_loss_steps={2}, nan_grad_steps={5})
    monkeypatch.setattr(train, "Llama", llama)
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        train.main(ARGS + ["--data_dir", str(data_dir), "--out_dir", str(out_dir), "--max_bad_steps", "1",
                           "--ckpt_interval", "1", "--keep_checkpoints", "10"])
    assert stop.value.code.startswith("error: non-finite gradient at step 5 (2 such step(s), --max_bad_steps 1)")
    metrics = read_metrics(out_dir)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert metrics[1] == {"step": 2, "skipped": "non-finite loss at step 2", "nonfinite_steps": 1}
    # the skipped step left the weights, the optimizer state and the lr schedule as they were; the data moved on
    ckpt = {s: load_ckpt(out_dir / f"ckpt_{s:08d}.pt") for s in (1, 2, 3, 4)}
    for key in ("model", "optimizer", "scheduler"):
        assert_same_tensors(ckpt[2][key], ckpt[1][key])
    assert not torch.equal(ckpt[3]["model"]["lm_head.weight"], ckpt[2]["model"]["lm_head.weight"])
    assert ckpt[2]["loader"]["position"] == ckpt[1]["loader"]["position"] + 8
    assert ckpt[2]["nonfinite_steps"] == ckpt[4]["nonfinite_steps"] == [2]
    cfg = train.parse_config(ARGS)
    assert metrics[2]["lr"] == pytest.approx(cfg.lr * train.lr_factor(cfg, 1))  # step 3 uses step 2's lr
    assert train.lr_factor(cfg, 1) != train.lr_factor(cfg, 2)
    assert_same_tensors(llama.instances[0].state_dict(), ckpt[4]["model"])  # step 5 changed nothing either


# ---------------------------------------------------------------- bad input: one line, nothing written is lost


def rewrite_header(path, **fields):
    magic, version, vocab_size, eot, reserved, num_tokens = prepare_c4.HEADER.unpack(path.read_bytes()[:32])
    values = dict(magic=magic, version=version, vocab_size=vocab_size, eot=eot) | fields
    header = prepare_c4.HEADER.pack(values["magic"], values["version"], values["vocab_size"], values["eot"],
                                    reserved, num_tokens)
    path.write_bytes(header + path.read_bytes()[32:])


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


BAD_INPUTS = {  # name: (damage done to the copies of data/ and out/, extra options, what the message must say)
    "missing data dir": (None, ["--data_dir", "nowhere"], "create them with `python prepare_c4.py"),
    "truncated shard": (lambda root: truncate(root / "data/train_000000.bin", 1000), [], "truncated"),
    "shard shorter than its header": (lambda root: truncate(root / "data/val_000000.bin", 20), [], "truncated"),
    "not a shard": (lambda root: rewrite_header(root / "data/train_000000.bin", magic=b"GARBAGE!"), [],
                    "not a token shard"),
    "shard of another tokeniser": (lambda root: rewrite_header(root / "data/val_000000.bin", vocab_size=32000), [],
                                   "made by another tokeniser (vocab size 32000"),
    "shard of another format version": (lambda root: rewrite_header(root / "data/train_000000.bin", version=2), [],
                                        "shard format version 2"),
    "every checkpoint unreadable": (lambda root: truncate(root / "out/ckpt_00000002.pt", 1000), [],
                                    "none of the 1 checkpoints in out can be read"),
    "unknown option": (None, ["--nonsense", "1"], "unknown option --nonsense"),
    "seq_len above the model's": (None, ["--seq_len", "65"], "--seq_len 65 must be in 1..64"),
    "batch not a multiple of the micro-batch": (None, ["--batch_size", "10"], "--batch_size 10 must be a multiple"),
    "zero lr": (None, ["--lr", "0"], "--lr must be a positive number"),
    "negative lr": (None, ["--lr", "-0.1"], "--lr must be a positive number"),
    "fresh run over an earlier run's checkpoints": (None, ["--resume", "false"], "pass --resume to continue it"),
}


@pytest.fixture(scope="module")
def earlier_run(data_dir, tmp_path_factory):
    """The output of a finished 2-step run, to be left alone by every bad invocation."""
    out_dir = tmp_path_factory.mktemp("earlier") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(model_module.CONFIGS, TEST_MODEL, TEST_CONFIG)
        train.main(ARGS + ["--data_dir", str(data_dir), "--out_dir", str(out_dir), "--max_steps", "2"])
    return out_dir


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_line_and_touches_nothing(case, data_dir, earlier_run, tmp_path, monkeypatch, capsys,
                                                     test_model_registered):
    damage, options, expected = BAD_INPUTS[case]
    shutil.copytree(data_dir, tmp_path / "data")
    shutil.copytree(earlier_run, tmp_path / "out")
    if damage:
        damage(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main(ARGS + ["--data_dir", "data", "--out_dir", "out", "--resume", *options])
    message = stop.value.code  # a string: Python prints it to stderr and exits with status 1
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert expected in message
    assert all(line.startswith("warning: ") for line in capsys.readouterr().err.splitlines())
    assert snapshot(tmp_path) == before


def test_bad_shard_from_the_command_line(data_dir, tmp_path):
    shutil.copytree(data_dir, tmp_path / "data")
    rewrite_header(tmp_path / "data" / "train_000000.bin", vocab_size=32000)
    proc = launch(ARGS + ["--data_dir", str(tmp_path / "data")], tmp_path / "out")
    assert proc.returncode == 1
    assert proc.stderr_text.splitlines() == [
        f"error: {tmp_path / 'data' / 'train_000000.bin'}: made by another tokeniser (vocab size 32000, end-of-text "
        "50256; expected GPT-2's 50257, 50256); re-run prepare_c4.py"]
    assert not (tmp_path / "out").exists()
