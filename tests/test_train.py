"""train.py on CPU: config and presets, lr schedule, token loader, validation windows, the training loop,
checkpoints and resume, command-line errors. A 2-layer, 32-wide LLaMA keeps every run to seconds."""
import ast
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import model as model_module
import prepare_c4
import train
from common import REPO, assert_same_tensors, deterministic, load_ckpt, read_metrics
from model import Llama, LlamaConfig
from prepare_c4 import TokenLoader, validation_windows
from train import ConfigError, TrainConfig, lr_factor, parse_config

TEST_MODEL = "llama_test_train"
# GPT-2 vocabulary (the shards hold GPT-2 ids), everything else tiny
TEST_CONFIG = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                          max_position_embeddings=64)
SEQ_LEN, BATCH, MICRO = 32, 8, 4  # two micro-batches per step: gradient accumulation is exercised
EVAL_WINDOWS = 8
DETERMINISTIC_KEYS = ("step", "train_loss", "lr", "val_loss", "val_ppl")  # not time, throughput, memory


@pytest.fixture(scope="module", autouse=True)
def test_model_registered():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(model_module.CONFIGS, TEST_MODEL, TEST_CONFIG)
        if train.CONFIGS is not model_module.CONFIGS:
            mp.setitem(train.CONFIGS, TEST_MODEL, TEST_CONFIG)
        yield


# ---------------------------------------------------------------- helpers


def sequential_shards(lengths):
    """Shards of consecutive token ids, so every window of every shard has distinct contents."""
    shards, start = [], 0
    for n in lengths:
        shards.append(np.arange(start, start + n, dtype=np.uint16))
        start += n
    return shards


def reference_windows(shards, seq_len):
    """Independent reference: every complete (seq_len + 1)-token window of each shard, in order."""
    w = seq_len + 1
    return [tuple(int(t) for t in s[i * w:(i + 1) * w]) for s in shards for i in range(len(s) // w)]


def window_ids(tokens, index_of):
    return [index_of[tuple(row.tolist())] for row in tokens]


def tiny_config(data_dir, out_dir, **overrides) -> TrainConfig:
    cfg = replace(TrainConfig(), preset="llama_tiny", model=TEST_MODEL, data_dir=str(data_dir),
                  out_dir=str(out_dir), batch_size=BATCH, micro_batch_size=MICRO, seq_len=SEQ_LEN,
                  max_steps=24, eval_interval=8, eval_tokens=EVAL_WINDOWS * (SEQ_LEN + 1), log_interval=1,
                  ckpt_interval=8, keep_checkpoints=10, device="cpu", dtype="auto")
    cfg = replace(cfg, **overrides)
    train.validate(cfg)
    return cfg


def val_loss_of(state_dict, val_dir, micro_batch_size=MICRO):
    model = Llama(TEST_CONFIG)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    shards = [prepare_c4.open_shard(p) for p in prepare_c4.shard_paths(val_dir, "val")]
    windows = validation_windows(shards, SEQ_LEN, EVAL_WINDOWS * (SEQ_LEN + 1))
    return train.evaluate(model, windows, micro_batch_size, torch.device("cpu"),
                          torch.autocast("cpu", enabled=False))


# ---------------------------------------------------------------- fixtures: data and one baseline run


@pytest.fixture(scope="module")
def data_dir(learnable_data_dir):
    assert 3 * EVAL_WINDOWS * (SEQ_LEN + 1) == 792  # the validation tokens the corpus has
    return learnable_data_dir


@pytest.fixture(scope="module")
def baseline(data_dir, tmp_path_factory):
    """24 SinkGD steps, logged every step, evaluated and checkpointed every 8."""
    out_dir = tmp_path_factory.mktemp("baseline")
    cfg = tiny_config(data_dir, out_dir)
    result = train.train(cfg)
    return dict(cfg=cfg, result=result, out_dir=out_dir, metrics=read_metrics(out_dir))


# ---------------------------------------------------------------- training loop and metrics


def test_training_lowers_the_loss(baseline):
    metrics = baseline["metrics"]
    first, last = metrics[0]["train_loss"], metrics[-1]["train_loss"]
    assert first == pytest.approx(math.log(TEST_CONFIG.vocab_size), abs=0.5)  # step 1: the untrained model
    assert last < 0.5 * first, (first, last)
    val = [r["val_loss"] for r in metrics if "val_loss" in r]
    assert val[-1] < val[0] < math.log(TEST_CONFIG.vocab_size)
    assert val[-1] < 0.5 * math.log(TEST_CONFIG.vocab_size)


def test_metrics_jsonl_records(baseline):
    cfg, metrics = baseline["cfg"], baseline["metrics"]
    assert [r["step"] for r in metrics] == list(range(1, cfg.max_steps + 1))  # log_interval 1
    for r in metrics:
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert r["tokens_per_sec"] > 0
        # the lr logged for step s is the one that step used: scheduler index s - 1
        assert r["lr"] == pytest.approx(cfg.lr * lr_factor(cfg, r["step"] - 1), rel=1e-9)
        evaluated = r["step"] % cfg.eval_interval == 0 or r["step"] == cfg.max_steps
        assert ("val_loss" in r) == ("val_ppl" in r) == evaluated
        if evaluated:
            assert r["val_loss"] > 0
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-12)
    assert max(r["lr"] for r in metrics) == pytest.approx(cfg.lr)
    assert baseline["result"] == metrics[-1]  # train() returns the final eval record


def test_checkpoints_written_at_intervals(baseline):
    paths = checkpoint.checkpoint_paths(baseline["out_dir"])
    assert [p.name for p in paths] == ["ckpt_00000008.pt", "ckpt_00000016.pt", "ckpt_00000024.pt"]
    assert not list(baseline["out_dir"].glob("*.tmp"))


def test_newest_checkpoint_loads_and_reproduces_final_val_loss(baseline, data_dir):
    cfg = baseline["cfg"]
    ckpt = load_ckpt(checkpoint.checkpoint_paths(baseline["out_dir"])[-1])  # weights_only: no pickled code
    assert ckpt["step"] == cfg.max_steps
    assert ckpt["config"] == asdict(cfg)
    assert {"model", "optimizer", "scheduler", "loader", "rng"} <= ckpt.keys()
    fresh_loss = val_loss_of(None, data_dir)
    loaded_loss = val_loss_of(ckpt["model"], data_dir)  # strict load into a freshly built Llama
    # the final evaluation in train() ran on the very weights that were checkpointed
    assert loaded_loss == pytest.approx(baseline["result"]["val_loss"], rel=1e-6)
    assert loaded_loss < fresh_loss - 1.0
    # SinkGD keeps no state for the block matrices; AdamW state for the embedding, norms and head
    model = Llama(TEST_CONFIG)
    n_block_linears = sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    n_params = len(list(model.parameters()))
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["sinkgd"] for g in groups] == [True, False]
    assert len(groups[0]["params"]) == n_block_linears
    assert len(ckpt["optimizer"]["state"]) == n_params - n_block_linears
    assert groups[0]["lr"] == pytest.approx(cfg.alpha * groups[1]["lr"])


def test_resume_matches_an_uninterrupted_run(baseline, tmp_path, capsys):
    cfg = baseline["cfg"]
    out_dir = tmp_path / "resumed"
    shutil.copytree(baseline["out_dir"], out_dir)
    for path in checkpoint.checkpoint_paths(out_dir)[1:]:  # as if the run had stopped after step 8
        path.unlink()
    capsys.readouterr()
    result = train.train(replace(cfg, out_dir=str(out_dir), resume=True))
    out, err = capsys.readouterr()
    assert "resumed from step 8" in out
    assert "warning" not in err
    metrics = read_metrics(out_dir)
    # per-step losses, lrs, val losses
    assert deterministic(metrics, DETERMINISTIC_KEYS) == deterministic(baseline["metrics"], DETERMINISTIC_KEYS)
    # steps up to 8 were kept from the first run, not re-run
    assert [r["time"] for r in metrics[:8]] == [r["time"] for r in baseline["metrics"][:8]]
    assert result["val_loss"] == baseline["result"]["val_loss"]
    final, reference = (load_ckpt(d / "ckpt_00000024.pt") for d in (out_dir, baseline["out_dir"]))
    assert_same_tensors(final["model"], reference["model"])  # bit for bit
    assert_same_tensors(final["optimizer"], reference["optimizer"])
    assert final["loader"] == reference["loader"]


def test_resume_skips_a_torn_checkpoint(baseline, tmp_path, capsys):
    cfg = baseline["cfg"]
    out_dir = tmp_path / "torn"
    shutil.copytree(baseline["out_dir"], out_dir)
    newest = out_dir / "ckpt_00000024.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    train.train(replace(cfg, out_dir=str(out_dir), resume=True))
    out, err = capsys.readouterr()
    assert "ckpt_00000024.pt" in err and "warning" in err
    assert "resumed from step 16" in out
    resumed = read_metrics(out_dir)
    assert deterministic(resumed, DETERMINISTIC_KEYS) == deterministic(baseline["metrics"], DETERMINISTIC_KEYS)
    assert_same_tensors(load_ckpt(newest)["model"], load_ckpt(baseline["out_dir"] / "ckpt_00000024.pt")["model"])


def test_training_leaves_the_float32_matmul_precision_alone(data_dir, tmp_path, monkeypatch):
    """Never TF32 (or bf16) for float32 products, on any device: SinkGD's are then exact Alg. 3, one device and ZeRO
    alike (see train()). A call that set it for CUDA only would be invisible here, so no call at all is allowed."""
    def refuse(precision):
        raise AssertionError(f"train.py set the float32 matmul precision to {precision!r}")
    monkeypatch.setattr(torch, "set_float32_matmul_precision", refuse)
    train.train(tiny_config(data_dir, tmp_path / "out", max_steps=1))
    assert torch.get_float32_matmul_precision() == "highest"


def test_resume_without_checkpoint_starts_afresh(data_dir, tmp_path, capsys):
    cfg = tiny_config(data_dir, tmp_path / "empty", max_steps=2, resume=True)
    train.train(cfg)
    assert "no checkpoint" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(cfg.out_dir)] == [1, 2]


@pytest.mark.parametrize("dtype", ["float16", "bf16", "fp32", "half"])
def test_dtype_is_one_of_the_supported(dtype):
    with pytest.raises(ConfigError, match=f"--dtype must be auto, float32 or bfloat16, got '{dtype}'"):
        parse_config(["--dtype", dtype])
    assert parse_config(["--dtype", "bfloat16"]).dtype == "bfloat16"


def deterministic_losses(out_dir):
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(out_dir)]


def compiled_graphs(counters) -> tuple[int, int]:
    """(graphs dynamo captured, graphs inductor compiled or took from its cache), from torch._dynamo's counters."""
    return counters["stats"]["unique_graphs"], sum(counters["inductor"].values())


def test_compiled_training_matches_eager(data_dir, tmp_path):
    """--compile (inductor; on the CPU it generates C++ with gcc): graphs are compiled, and the per-step losses are
    eager's to float rounding."""
    from torch._dynamo.utils import counters
    eager, compiled = (tiny_config(data_dir, tmp_path / name, max_steps=4, eval_interval=2, compile=name == "compiled")
                       for name in ("eager", "compiled"))
    counters.clear()
    train.train(eager)
    assert compiled_graphs(counters) == (0, 0)
    train.train(compiled)
    graphs, inductor_graphs = compiled_graphs(counters)
    assert graphs >= 1 and inductor_graphs >= 1, dict(counters)
    # inductor wrote its cache into the suite's own folder (conftest.py), not into one shared with other runs
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert cache.name.startswith("sinkgd-tests-inductor-") and any(cache.rglob("*.py")), cache
    for (step, loss, val), (step_c, loss_c, val_c) in zip(deterministic_losses(eager.out_dir),
                                                          deterministic_losses(compiled.out_dir), strict=True):
        assert step == step_c and loss_c == pytest.approx(loss, rel=1e-4)
        assert (val is None) == (val_c is None) and (val is None or val_c == pytest.approx(val, rel=1e-4))


def test_bf16_autocast_on_one_device_tracks_float32(data_dir, tmp_path):
    cfg, fp32 = (tiny_config(data_dir, tmp_path / dtype, max_steps=8, dtype=dtype) for dtype in ("bfloat16", "float32"))
    train.train(cfg)
    train.train(fp32)
    losses, reference = ([r["train_loss"] for r in read_metrics(c.out_dir)] for c in (cfg, fp32))
    assert losses != reference  # bf16 arithmetic did run
    assert all(abs(a - b) < 0.03 * b for a, b in zip(losses, reference, strict=True)), (losses, reference)
    weights = load_ckpt(checkpoint.checkpoint_paths(cfg.out_dir)[-1])["model"]
    assert all(p.dtype == torch.float32 for p in weights.values())  # autocast: the weights stay float32


def test_adamw_runs_and_old_checkpoints_are_pruned(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "adamw", optimizer="adamw", lr=3e-3, max_steps=6,
                      ckpt_interval=2, keep_checkpoints=2, eval_interval=3)
    result = train.train(cfg)
    metrics = read_metrics(cfg.out_dir)
    assert [r["step"] for r in metrics] == [1, 2, 3, 4, 5, 6]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert math.isfinite(result["val_loss"])
    paths = checkpoint.checkpoint_paths(Path(cfg.out_dir))
    assert [p.name for p in paths] == ["ckpt_00000004.pt", "ckpt_00000006.pt"]
    ckpt = load_ckpt(paths[-1])
    n_params = len(list(Llama(TEST_CONFIG).parameters()))
    assert len(ckpt["optimizer"]["param_groups"]) == 1
    assert len(ckpt["optimizer"]["state"]) == n_params  # plain AdamW: moments for every parameter
    assert all("exp_avg" in s for s in ckpt["optimizer"]["state"].values())


def test_one_sinkhorn_iteration_is_accepted_and_used(data_dir, tmp_path):
    args = ["--preset", "llama_tiny", "--model", TEST_MODEL, "--data_dir", str(data_dir),
            "--out_dir", str(tmp_path / "sk1"), "--batch_size", str(BATCH), "--micro_batch_size", str(MICRO),
            "--seq_len", str(SEQ_LEN), "--max_steps", "3", "--eval_tokens", str(4 * (SEQ_LEN + 1)),
            "--device", "cpu", "--sinkhorn_iters", "1"]
    cfg = parse_config(args)
    assert cfg.sinkhorn_iters == 1
    result = train.train(cfg)
    assert math.isfinite(result["val_loss"])
    ckpt = load_ckpt(checkpoint.checkpoint_paths(Path(cfg.out_dir))[-1])
    assert ckpt["optimizer"]["param_groups"][0]["sinkhorn_iters"] == 1


def test_main_runs_from_command_line_options(data_dir, tmp_path, capsys):
    out_dir = tmp_path / "main"
    train.main(["--preset", "llama_tiny", "--model", TEST_MODEL, "--data_dir", str(data_dir),
                "--out_dir", str(out_dir), "--batch_size=4", "--micro_batch_size=4", "--seq_len=16",
                "--max_steps=4", "--eval_tokens=34", "--log_interval=2", "--device=cpu"])
    out = capsys.readouterr().out
    assert "final validation loss" in out
    d, f, layers = TEST_CONFIG.hidden_size, TEST_CONFIG.intermediate_size, TEST_CONFIG.num_hidden_layers
    in_blocks, total = layers * (4 * d * d + 3 * f * d), sum(p.numel() for p in Llama(TEST_CONFIG).parameters())
    # the split at start: q k v o gate up down per layer; AdamW the embedding, 2 norms per layer, the last, the head
    assert (f"split: SinkGD {7 * layers} matrices ({in_blocks / 1e6:.2f}M params) | AdamW {2 * layers + 3} other "
            f"tensors ({(total - in_blocks) / 1e6:.2f}M params)") in out
    metrics = read_metrics(out_dir)
    assert [r["step"] for r in metrics] == [2, 4]
    assert [p.name for p in checkpoint.checkpoint_paths(out_dir)] == ["ckpt_00000004.pt"]
    # one progress line per interval: step k/N first, the time so far and the ETA at the interval's speed last
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2, out
    for line, r in zip(lines, metrics):
        duration = r"(\d+):(\d\d):(\d\d)"
        found = re.fullmatch(rf"step {r['step']}/4 \| train_loss .* \| elapsed {duration} \| eta {duration}"
                             r"( \| val_loss .*)?", line)
        assert found, line
        h, m, s, eta_h, eta_m, eta_s = map(int, found.groups()[:6])
        assert r["eta_s"] == pytest.approx((4 - r["step"]) * 4 * 16 / r["tokens_per_sec"], rel=1e-9)
        assert 3600 * eta_h + 60 * eta_m + eta_s == round(r["eta_s"]) and 3600 * h + 60 * m + s == round(r["elapsed_s"])
    assert metrics[0]["eta_s"] > 0 and metrics[-1]["eta_s"] == 0
    assert 0 < metrics[0]["elapsed_s"] < metrics[-1]["elapsed_s"]


def test_main_reports_errors_as_one_line(tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        train.main(["--lr", "abc", "--out_dir", str(tmp_path / "x")])
    assert str(excinfo.value.code).startswith("error: ") and "--lr" in str(excinfo.value.code)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    np.random.rand(5)  # mid-stream: the generator position matters
    path = tmp_path / "rng.pt"
    torch.save(checkpoint.rng_state(), path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


# ---------------------------------------------------------------- token loader


@pytest.fixture
def shards():
    return sequential_shards([23, 40, 17])  # 4 + 8 + 3 windows of 5 tokens, with leftovers


def test_loader_batches_are_whole_windows_of_one_shard(shards):
    ref = reference_windows(shards, 4)
    index_of = {w: i for i, w in enumerate(ref)}
    loader = TokenLoader(shards, seq_len=4, seed=0)
    tokens = loader.next_batch(6)
    assert tokens.shape == (6, 5) and tokens.dtype == torch.int64
    ids = window_ids(tokens, index_of)  # KeyError if a row is not a reference window
    assert len(set(ids)) == 6


def test_loader_reads_memmapped_shards(tmp_path):
    for i, s in enumerate(sequential_shards([50, 31])):
        prepare_c4.write_shard(tmp_path / f"train_{i:06d}.bin", s)
    mapped = [prepare_c4.open_shard(p) for p in prepare_c4.shard_paths(tmp_path, "train")]
    a = TokenLoader(mapped, seq_len=4, seed=3).next_batch(10)
    b = TokenLoader(sequential_shards([50, 31]), seq_len=4, seed=3).next_batch(10)
    assert torch.equal(a, b)


def test_loader_is_deterministic_per_seed(shards):
    def batches(seed):
        loader = TokenLoader(shards, seq_len=4, seed=seed)
        return [loader.next_batch(4) for _ in range(8)]
    same, again, other = batches(0), batches(0), batches(1)
    assert all(torch.equal(x, y) for x, y in zip(same, again))
    assert not all(torch.equal(x, y) for x, y in zip(same, other))


def test_every_epoch_is_a_fresh_shuffle_of_the_windows(shards):
    ref = reference_windows(shards, 4)
    index_of = {w: i for i, w in enumerate(ref)}
    assert len(ref) == 15
    loader = TokenLoader(shards, seq_len=4, seed=0)
    epochs = []
    for _ in range(4):  # 15 windows make 3 whole batches of 4 per epoch; the 3 left over are dropped
        epochs.append(sum((window_ids(loader.next_batch(4), index_of) for _ in range(3)), []))
        assert loader.state_dict() == {"epoch": len(epochs) - 1, "position": 12}
    for epoch in epochs:
        assert len(set(epoch)) == 12  # no window twice within an epoch
    assert len({tuple(e) for e in epochs}) == 4  # reshuffled every epoch
    assert set().union(*map(set, epochs)) == set(range(15))  # the dropped tail differs per epoch
    loader.next_batch(4)
    assert loader.state_dict() == {"epoch": 4, "position": 4}


def test_loader_state_dict_continues_identically(shards):
    a = TokenLoader(shards, seq_len=4, seed=7)
    for _ in range(5):  # 20 windows: into the second epoch
        a.next_batch(4)
    state = a.state_dict()
    json.dumps(state)  # plain integers: fits a weights_only checkpoint
    expected = [a.next_batch(4) for _ in range(6)]
    b = TokenLoader(shards, seq_len=4, seed=7)
    b.next_batch(4)  # a different position, overwritten by the load
    b.load_state_dict(state)
    assert all(torch.equal(b.next_batch(4), x) for x in expected)


def test_ranks_split_the_global_batch(shards):
    ref = reference_windows(shards, 4)
    index_of = {w: i for i, w in enumerate(ref)}
    single = TokenLoader(shards, seq_len=4, seed=5)
    ranks = [TokenLoader(shards, seq_len=4, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(8):  # 48 windows: across epoch boundaries too
        full = single.next_batch(6)
        parts = [loader.next_batch(6) for loader in ranks]
        for part in parts:
            assert part.shape == (3, 5)
        assert torch.equal(torch.cat(parts), full)
        assert not set(window_ids(parts[0], index_of)) & set(window_ids(parts[1], index_of))
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_loader_rejects_a_batch_larger_than_the_data(shards):
    with pytest.raises(prepare_c4.ShardError, match="fewer than one batch"):
        TokenLoader(shards, seq_len=4, seed=0).next_batch(16)


def test_loader_rejects_shards_shorter_than_a_window():
    with pytest.raises(prepare_c4.ShardError):
        TokenLoader(sequential_shards([4, 3]), seq_len=4, seed=0)


# ---------------------------------------------------------------- validation windows


def test_validation_windows_are_the_first_tokens_in_order(shards):
    ref = np.array(reference_windows(shards, 4))
    everything = validation_windows(shards, 4, budget=10**9)
    assert everything.dtype == np.int64
    assert np.array_equal(everything, ref)  # whole windows per shard, never across a boundary
    assert np.array_equal(everything[0], shards[0][:5])
    assert np.array_equal(validation_windows(shards, 4, budget=10**9), everything)  # deterministic


@pytest.mark.parametrize("budget", [5, 9, 19, 20, 42, 74, 75, 1000])
def test_validation_windows_respect_the_token_budget(shards, budget):
    windows = validation_windows(shards, 4, budget)
    assert windows.shape[1] == 5
    assert windows.size <= budget
    assert len(windows) == min(15, budget // 5)  # as many whole windows as fit
    assert np.array_equal(windows, np.array(reference_windows(shards, 4))[:len(windows)])


def test_validation_windows_need_one_window():
    with pytest.raises(prepare_c4.ShardError):
        validation_windows(sequential_shards([4]), 4, budget=100)


# ---------------------------------------------------------------- config


def test_unknown_option_is_named():
    with pytest.raises(ConfigError, match="--nonsense"):
        parse_config(["--nonsense", "1"])


@pytest.mark.parametrize("key, value", [("lr", "abc"), ("max_steps", "1.5"), ("seed", "x"), ("resume", "maybe")])
def test_bad_value_type(key, value):
    with pytest.raises(ConfigError, match=f"--{key}"):
        parse_config([f"--{key}", value])


def test_option_syntax():
    cfg = parse_config(["--lr=0.5", "--resume", "--seed", "3", "--out_dir", "out/x"])
    assert (cfg.lr, cfg.resume, cfg.seed, cfg.out_dir) == (0.5, True, 3, "out/x")
    assert parse_config(["--resume", "false"]).resume is False
    assert parse_config(["--compile"]).compile is True
    with pytest.raises(ConfigError):
        parse_config(["lr", "0.5"])


def test_seq_len_limited_by_the_model():
    assert parse_config(["--preset", "llama_tiny", "--seq_len", "1024"]).seq_len == 1024
    with pytest.raises(ConfigError, match="seq_len"):
        parse_config(["--preset", "llama_tiny", "--seq_len", "1025"])
    with pytest.raises(ConfigError, match="seq_len"):
        parse_config(["--model", TEST_MODEL, "--seq_len", "65"])
    with pytest.raises(ConfigError, match="seq_len"):
        parse_config(["--seq_len", "0"])


def test_batch_must_be_a_multiple_of_the_micro_batch():
    assert parse_config(["--batch_size", "12", "--micro_batch_size", "4"]).batch_size == 12
    with pytest.raises(ConfigError, match="batch_size"):
        parse_config(["--batch_size", "10", "--micro_batch_size", "4"])
    with pytest.raises(ConfigError):
        parse_config(["--micro_batch_size", "0"])
    cfg = replace(TrainConfig(), batch_size=8, micro_batch_size=4)
    train.validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="batch_size"):
        train.validate(cfg, world_size=4)


@pytest.mark.parametrize("lr", ["0", "-0.01", "nan", "inf"])
def test_lr_must_be_positive_and_finite(lr):
    with pytest.raises(ConfigError, match="--lr"):
        parse_config(["--lr", lr])


@pytest.mark.parametrize("name, value, must", [
    ("weight_decay", "-0.1", ">= 0 (as in torch's optimizers)"), ("weight_decay", "inf", ">= 0"),
    ("alpha", "0", "a positive number"), ("beta1", "1", "in [0, 1)"), ("beta2", "-0.5", "in [0, 1)"),
    ("beta2", "nan", "in [0, 1)"), ("adam_eps", "-1e-8", ">= 0"), ("grad_clip", "-1", ">= 0"),
    ("warmup_frac", "1.5", "in [0, 1]"), ("min_lr_frac", "-0.1", "in [0, 1]")])
def test_optimizer_settings_out_of_range_are_refused(name, value, must):
    """Each would train: a negative weight decay grows the weights, beta1 = 1 freezes AdamW's first moment."""
    with pytest.raises(ConfigError, match=rf"^--{name} must be {re.escape(must)}"):
        parse_config([f"--{name}", value])


@pytest.mark.parametrize("args", [["--preset", "llama_2b"], ["--model", "llama_2b"], ["--optimizer", "sgd"],
                                  ["--max_steps", "0"], ["--sinkhorn_iters", "0"], ["--out_dir", "."]])
def test_other_invalid_settings(args, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError):
        parse_config(args)


@pytest.mark.parametrize("name, steps", [("llama_60m", 10_000), ("llama_130m", 20_000),
                                         ("llama_350m", 60_000), ("llama_1b", 100_000)])
def test_paper_presets(name, steps):
    cfg = parse_config(["--preset", name])
    assert cfg.model == name and cfg.max_steps == steps
    assert (cfg.batch_size, cfg.seq_len) == (512, 256)  # 512 x 256 tokens per step
    assert cfg.batch_size % cfg.micro_batch_size == 0
    assert cfg.optimizer == "sinkgd"
    assert (cfg.lr, cfg.alpha, cfg.sinkhorn_iters) == (0.02, 0.05, 5)
    assert (cfg.warmup_frac, cfg.min_lr_frac, cfg.weight_decay) == (0.1, 0.1, 0.0)
    assert cfg.data_dir == "data/c4" and cfg.out_dir == f"out/{name}"


def test_help_lists_every_option_with_its_help_and_the_presets():
    out = subprocess.run([sys.executable, "train.py", "--preset", "llama_60m", "--help"], cwd=REPO, text=True,
                         capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())  # argparse wraps lines
    help_text = {f.name: f.metadata.get("help") for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        assert help_text[f.name], f"TrainConfig.{f.name} has no help text: declare it with train.option"
        assert f"--{f.name}" in text and " ".join(help_text[f.name].split()) in text
    assert "sinkgd: the paper's hybrid" in help_text["optimizer"] and "one more stops" in help_text["max_bad_steps"]
    assert "(default: 128)" in text.split("--micro_batch_size MICRO_BATCH_SIZE")[-1][:200]  # llama_60m's value
    assert all(f"{name}: model=" in out.stdout for name in train.PRESETS)


def test_boolean_options():
    assert parse_config(["--resume", "--compile", "false"]).resume is True
    assert parse_config(["--resume=0", "--compile", "1"]).compile is True
    assert parse_config([]).compile is False
    with pytest.raises(ConfigError, match="--compile: expects true or false, got 'yes'"):
        parse_config(["--compile", "yes"])


def test_preset_then_overrides():
    cfg = parse_config(["--max_steps", "7", "--preset", "llama_130m"])  # the preset applies first
    assert cfg.model == "llama_130m" and cfg.max_steps == 7
    assert parse_config([]).preset == "demo"


# ---------------------------------------------------------------- lr schedule


def test_lr_warmup_then_cosine():
    cfg = replace(TrainConfig(), max_steps=1000)  # warmup_frac 0.1, min_lr_frac 0.1
    for step in range(100):
        assert lr_factor(cfg, step) == pytest.approx((step + 1) / 100)  # linear, reaching 1 at 10%
    assert lr_factor(cfg, 100) == pytest.approx(1.0)
    assert lr_factor(cfg, 550) == pytest.approx(0.55)  # cosine half-way: (1 + 0.1) / 2
    assert lr_factor(cfg, 1000) == pytest.approx(0.1)
    assert lr_factor(cfg, 999) == pytest.approx(0.1, abs=1e-4)
    after = [lr_factor(cfg, s) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert all(0.1 - 1e-12 <= f <= 1 + 1e-12 for f in after)


def test_lr_schedule_of_the_paper_presets_ends_at_a_tenth():
    for name in ("llama_60m", "llama_1b"):
        cfg = parse_config(["--preset", name])
        warmup = cfg.max_steps // 10
        assert lr_factor(cfg, warmup - 1) == pytest.approx(1.0)
        assert lr_factor(cfg, warmup // 2 - 1) == pytest.approx(0.5)
        assert lr_factor(cfg, cfg.max_steps - 1) == pytest.approx(0.1, abs=1e-6)


def test_lr_schedule_without_warmup_steps():
    cfg = replace(TrainConfig(), max_steps=5)  # 10% of 5 steps rounds down to no warmup
    factors = [lr_factor(cfg, s) for s in range(6)]
    assert factors[0] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors, factors[1:]))


# ---------------------------------------------------------------- command line


def run_cli(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_unknown_option_exits_with_one_error_line():
    proc = run_cli("--nonsense", "1")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--nonsense" in lines[0], proc.stderr


def test_cli_negative_weight_decay_is_one_line_and_writes_nothing(tmp_path):
    proc = run_cli("--weight_decay", "-0.1", "--out_dir", str(tmp_path / "out"))
    assert proc.returncode == 1 and proc.stderr == (
        "error: --weight_decay must be >= 0 (as in torch's optimizers), got -0.1\n"), proc.stderr
    assert not (tmp_path / "out").exists()


def test_train_imports_nothing_from_tools():
    """The layers run one way: tools/ use train.py, never the reverse (the Muon baseline lives in train.py)."""
    tree = ast.parse((REPO / "train.py").read_text())
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    assert imported and not [m for m in imported if m and m.split(".")[0] == "tools"], imported


def test_cli_missing_data_says_to_run_prepare(tmp_path):
    proc = run_cli("--preset", "llama_tiny", "--data_dir", str(tmp_path / "nonexistent"),
                   "--out_dir", str(tmp_path / "out"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "prepare_c4.py" in lines[0] and "nonexistent" in lines[0]


@pytest.mark.parametrize("content, message", [
    (None, r"error: --deepspeed_config \S+missing.json: no such file; start from ds_config.json in this repository"),
    ('{"zero_optimization": {"stage": 2},}', r"error: --deepspeed_config \S+bad.json is not valid JSON \(Expecting "
     r"property name enclosed in double quotes: line 1 column 36 \(char 35\)\); fix it or start from ds_config.json "
     r"in this repository"),
    ("[2]", r"error: --deepspeed_config \S+bad.json holds a JSON list, not an object; start from ds_config.json in "
     r"this repository"),
])
def test_cli_bad_deepspeed_config_is_one_line_before_anything_starts(tmp_path, content, message):
    path = tmp_path / ("missing.json" if content is None else "bad.json")
    if content is not None:
        path.write_text(content)
    proc = run_cli("--deepspeed_config", str(path), "--out_dir", str(tmp_path / "out"))
    assert proc.returncode == 1 and re.fullmatch(message + "\n", proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the Muon baseline

BLOCK_MATRICES = {f"model.layers.{i}.{module}.{w}_proj.weight" for i in range(TEST_CONFIG.num_hidden_layers)
                  for module, ws in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down"))) for w in ws}


def step_by_hand(model, cfg, muon_names, grads):
    """torch.optim.Muon on the parameters named muon_names and torch.optim.AdamW(fused=True) on the others, stepped
    with each of grads (a list of {name: gradient}): the optimizers as their users would write them."""
    named = dict(model.named_parameters())
    muon = torch.optim.Muon([named[n] for n in sorted(muon_names)], lr=cfg.lr, weight_decay=cfg.weight_decay,
                            momentum=cfg.muon_momentum, adjust_lr_fn=cfg.muon_adjust_lr)
    adamw = torch.optim.AdamW([p for n, p in named.items() if n not in muon_names], lr=cfg.lr, fused=True,
                              betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    for grad in grads:
        for name, p in named.items():
            p.grad = grad[name].clone()
        muon.step()
        adamw.step()
    return named


def test_muon_is_torch_muon_on_the_split_and_fused_adamw_on_the_rest():
    """Three steps of --optimizer muon equal torch.optim.Muon on the block matrices plus torch.optim.AdamW(fused=True)
    on the embedding, norms and head, stepped by hand (1e-6); handing Muon the embedding too would not. A NaN
    gradient then changes no weight, momentum buffer or AdamW moment, and sets overflow."""
    cfg = replace(TrainConfig(), optimizer="muon", lr=3e-3, weight_decay=0.01)
    torch.manual_seed(0)
    model = Llama(TEST_CONFIG)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = train.build_optimizer(cfg, model)
    in_muon = {id(p) for g in optimizer.param_groups if g["sinkgd"] for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in in_muon} == BLOCK_MATRICES

    gen = torch.Generator().manual_seed(1)
    grads = [{n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in model.named_parameters()} for _ in range(3)]
    for grad in grads:
        for name, p in model.named_parameters():
            p.grad = grad[name].clone()
        optimizer.step()
    for muon_names, same in ((BLOCK_MATRICES, True), (BLOCK_MATRICES | {"model.embed_tokens.weight"}, False)):
        reference = Llama(TEST_CONFIG)
        reference.load_state_dict(initial)
        by_hand = step_by_hand(reference, cfg, muon_names, grads)
        close = [torch.allclose(p, by_hand[n], rtol=1e-6, atol=1e-7) for n, p in model.named_parameters()]
        assert all(close) if same else not all(close), [n for n, c in zip(by_hand, close) if not c]

    before = [t.clone() for t in [*model.parameters(), *(v for s in optimizer.state.values() for v in s.values())]]
    model.lm_head.weight.grad[0, 0] = float("nan")
    optimizer.step()
    after = [*model.parameters(), *(v for s in optimizer.state.values() for v in s.values())]
    assert optimizer.overflow and all(torch.equal(a, b) for a, b in zip(before, after))


def test_muon_trains_checkpoints_and_resumes_bit_identically(data_dir, tmp_path, capsys):
    cfg = tiny_config(data_dir, tmp_path / "muon", optimizer="muon", lr=3e-3, max_steps=8, ckpt_interval=4,
                      eval_interval=4)
    train.train(cfg)
    out = capsys.readouterr().out
    assert "| muon |" in out and "split: Muon 14 matrices" in out
    metrics = read_metrics(cfg.out_dir)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    reference = load_ckpt(Path(cfg.out_dir) / "ckpt_00000008.pt")
    model = Llama(TEST_CONFIG)
    name_of = {id(p): n for n, p in model.named_parameters()}
    named = [name_of[id(p)] for g in train.build_optimizer(cfg, model).param_groups for p in g["params"]]
    state = reference["optimizer"]["state"]  # by index over the groups' parameters
    assert {named[i] for i, s in state.items() if "momentum_buffer" in s} == BLOCK_MATRICES
    assert all("exp_avg" in s for i, s in state.items() if named[i] not in BLOCK_MATRICES)

    resumed = tmp_path / "resumed"
    shutil.copytree(cfg.out_dir, resumed)
    (resumed / "ckpt_00000008.pt").unlink()  # as if the run had stopped after step 4
    train.train(replace(cfg, out_dir=str(resumed), resume=True))
    assert "resumed from step 4" in capsys.readouterr().out
    assert deterministic(read_metrics(resumed), DETERMINISTIC_KEYS) == deterministic(metrics, DETERMINISTIC_KEYS)
    final = load_ckpt(resumed / "ckpt_00000008.pt")
    assert_same_tensors(final["model"], reference["model"])  # bit for bit
    assert_same_tensors(final["optimizer"], reference["optimizer"])


@pytest.mark.parametrize("stage, dtype, here", [(2, "float32", "stage 2"), (0, "bfloat16", "stage 0, bf16")])
def test_cli_muon_under_zero_or_bf16_is_one_line_before_deepspeed_starts(stage, dtype, here, tmp_path):
    """ZeRO 1-3 hand the optimizer flat partitions, and so does DeepSpeed's bf16 wrapper at stage 0."""
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    proc = run_cli("--optimizer", "muon", "--dtype", dtype, "--deepspeed_config", str(config),
                   "--out_dir", str(tmp_path / "out"))
    assert proc.returncode == 1 and proc.stderr == (
        "error: --optimizer muon needs whole matrices, which DeepSpeed gives an optimizer only at ZeRO stage 0 in "
        f"float32 (here: {here}): use stage 0 with --dtype float32, or one process without --deepspeed_config\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("optimizer", ["sinkgd", "adamw", "muon"])
def test_weight_decay_reaches_every_group(optimizer):
    """--weight_decay applies to every parameter whatever the optimizer (the split's groups carry their own)."""
    cfg = replace(TrainConfig(), optimizer=optimizer, weight_decay=0.1)
    groups = train.build_optimizer(cfg, Llama(TEST_CONFIG)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1] * len(groups)
