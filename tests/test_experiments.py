"""tools/export_hf.py (round trip through transformers) and tools/experiments.py: the memory estimate, steps to reach
a loss, throughput from metrics.jsonl, effective throughput, the AdamW grid search and its extension, aggregation over
seeds, options passed through to train.py, plots."""
import json
import math
import statistics
import subprocess
import sys

import pytest
import torch

import train
from common import REPO
from model import CONFIGS, Llama
from tools import experiments, export_hf

TINY = CONFIGS["llama_tiny"]


def random_llama(seed):
    """llama_tiny with weights far from init (norms included), so that every weight shows in the logits."""
    torch.manual_seed(seed)
    model = Llama(TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model


def save_train_checkpoint(path, model, step):
    """The part of train.py's single-process checkpoint that an export reads."""
    torch.save({"model": model.state_dict(), "step": step, "config": {"model": "llama_tiny"}}, path)


def test_export_round_trip_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    older, newest = random_llama(0), random_llama(1)
    save_train_checkpoint(tmp_path / "ckpt_00000100.pt", older, 100)
    save_train_checkpoint(tmp_path / "ckpt_00000200.pt", newest, 200)

    export_hf.export(tmp_path, tmp_path / "hf")  # a train.py out_dir: its newest checkpoint
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["num_key_value_heads"] == config["num_attention_heads"] == TINY.num_attention_heads
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.dtype == torch.float32

    idx = torch.randint(0, TINY.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = newest(idx)
        theirs = hf(idx).logits
        other, _ = older(idx)
    assert expected.abs().max() > 1.0  # not a comparison of near-zero tensors
    assert (theirs - expected).abs().max() < 1e-4
    assert (other - expected).abs().max() > 0.1  # so exporting the older checkpoint would have failed

    export_hf.export(tmp_path / "ckpt_00000100.pt", tmp_path / "hf_older")  # a checkpoint file
    with torch.no_grad():
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf_older").eval()(idx).logits
    assert (theirs - other).abs().max() < 1e-4


def test_export_finds_the_size_from_shapes_alone():
    # DeepSpeed checkpoints record no model size: it is inferred, and a state_dict of no known size is refused
    state_dict = Llama(TINY).state_dict()
    assert export_hf.model_config(state_dict, None) is TINY
    del state_dict["lm_head.weight"]
    with pytest.raises(ValueError, match="match 0 sizes"):
        export_hf.model_config(state_dict, None)
    with pytest.raises(ValueError, match="llama_tiny"):
        export_hf.model_config(state_dict, "llama_tiny")


def test_memory_estimate_by_hand_for_llama_60m():
    d, f, layers, vocab = 512, 1376, 8, 50304
    embedding_and_head = 2 * vocab * d
    norms = (2 * layers + 1) * d
    block_matrices = layers * (4 * d * d + 3 * d * f)  # q, k, v, o; gate, up, down
    total = embedding_and_head + norms + block_matrices
    assert total == 76_816_896
    estimate = experiments.memory_estimate(CONFIGS["llama_60m"])
    assert estimate["params"] == total and estimate["sinkgd_params"] == block_matrices
    # bf16: weights plus AdamW's two moments, for every parameter or only off the block matrices
    assert estimate["adamw_bytes"] == 2 * 3 * total == 460_901_376
    assert estimate["sinkgd_bytes"] == 2 * (total + 2 * (embedding_and_head + norms)) == 359_713_792
    # Muon: one momentum buffer as large as the block matrices, AdamW's moments on the rest
    assert estimate["muon_bytes"] == estimate["sinkgd_bytes"] + 2 * block_matrices == 410_307_584


def synthetic_metrics(val_losses, tokens_per_sec, eval_interval=5, steps=50):
    """A metrics.jsonl as train.py writes it with --log_interval 1; val_losses[k] at step (k + 1) * eval_interval.
    The interval that follows an evaluation also timed it, so its tokens/s is low."""
    metrics = []
    for step in range(1, steps + 1):
        after_eval = step > 1 and (step - 1) % eval_interval == 0
        record = {"step": step, "train_loss": 9.0, "tokens_per_sec": tokens_per_sec / (10 if after_eval else 1),
                  "time": 1000.0 + step}
        if step % eval_interval == 0:
            record["val_loss"] = val_losses[step // eval_interval - 1]
        metrics.append(record)
    return metrics


def test_steps_to_reach_and_effective_throughput():
    adamw = synthetic_metrics([8.0, 7.5, 7.0, 6.8, 6.6, 6.5, 6.4, 6.3, 6.25, 6.2], 1000)
    sinkgd = synthetic_metrics([7.9, 7.0, 6.6, 6.3, 6.19, 6.1, 6.0, 5.9, 5.8, 5.7], 1000)
    assert experiments.final_val_loss(adamw) == 6.2
    assert experiments.steps_to_reach(adamw, 6.2) == 50
    assert experiments.steps_to_reach(sinkgd, 6.2) == 25  # first evaluation at or below 6.2
    assert experiments.steps_to_reach(sinkgd, 5.0) is None
    result = experiments.effective_throughput(adamw, sinkgd, baseline_tokens_per_sec=1000, sinkgd_tokens_per_sec=900)
    assert result["target_val_loss"] == 6.2
    assert (result["baseline_steps"], result["sinkgd_steps"]) == (50, 25)
    assert result["tokens_per_sec_ratio"] == pytest.approx(0.9)
    assert result["effective_throughput_ratio"] == pytest.approx(0.9 * 50 / 25)
    never = synthetic_metrics([7.0] * 10, 1000)
    assert experiments.effective_throughput(adamw, never, 1000, 1000)["effective_throughput_ratio"] is None


def test_median_tokens_per_sec_leaves_out_intervals_with_an_evaluation():
    # evaluations at steps 1, 2, 3 (logged) and 7 (not logged: --log_interval 2 from there on): the intervals
    # ending at steps 2, 3, 4 and 8 timed them; were they counted, the median would be 100.
    metrics = [
        {"step": 1, "tokens_per_sec": 1000.0, "val_loss": 9.0},
        {"step": 2, "tokens_per_sec": 100.0, "val_loss": 8.0},
        {"step": 3, "tokens_per_sec": 100.0, "val_loss": 7.0},
        {"step": 4, "tokens_per_sec": 100.0},
        {"step": 6, "tokens_per_sec": 1000.0},
        {"step": 7, "val_loss": 6.0},
        {"step": 8, "tokens_per_sec": 100.0},
        {"step": 10, "tokens_per_sec": 900.0},
    ]
    assert experiments.median_tokens_per_sec(metrics) == 1000.0  # median of 1000, 1000, 900
    assert experiments.median_tokens_per_sec(synthetic_metrics([7.0] * 10, 1234)) == 1234


def write_run(run_dir, metrics):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_plot_writes_a_png(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    write_run(tmp_path / "adamw", synthetic_metrics([7.0 - 0.1 * k for k in range(10)], 1000))
    write_run(tmp_path / "sinkgd", synthetic_metrics([6.9 - 0.12 * k for k in range(10)], 1000))
    out = tmp_path / "curves.png"
    assert experiments.plot_runs([tmp_path / "adamw", tmp_path / "sinkgd"], out)
    pixels = image.imread(out)
    assert pixels.shape[:2] == (540, 1440)  # 12 x 4.5 inches at 120 dpi
    assert pixels.std() > 0.05  # something was drawn


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run", synthetic_metrics([7.0] * 10, 1000))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    assert not experiments.plot_runs([tmp_path / "run"], tmp_path / "curves.png")
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "curves.png").exists()


# ---------------------------------------------------------------- the AdamW grid, seeds, options


def bowl(best_lr):
    """A fake final val loss, lowest at best_lr and rising with |log10(lr / best_lr)|; records the lrs tried."""
    tried = []

    def final_loss_at(lr):
        tried.append(lr)
        return 3.0 + abs(math.log10(lr / best_lr))
    return final_loss_at, tried


def test_grid_search_keeps_an_interior_best():
    final_loss_at, tried = bowl(1e-3)
    best, grid, losses = experiments.search_lr(final_loss_at, experiments.PAPER_ADAMW_LRS, max_extensions=3)
    assert best == 1e-3 and grid == sorted(experiments.PAPER_ADAMW_LRS) and len(tried) == 5
    assert losses[1e-3] == 3.0


def test_grid_is_extended_past_the_upper_edge_until_the_best_is_interior():
    final_loss_at, tried = bowl(0.05)  # best beyond the paper's largest lr, 1e-2
    best, grid, _ = experiments.search_lr(final_loss_at, experiments.PAPER_ADAMW_LRS, max_extensions=5)
    # 1e-2 and 5e-3 are a factor 2 apart: 2e-2, 4e-2, 8e-2; at 8e-2 the best (4e-2) is interior and it stops
    assert tried[5:] == pytest.approx([2e-2, 4e-2, 8e-2])
    assert best == pytest.approx(4e-2) and grid[0] < best < grid[-1]


def test_grid_is_extended_past_the_lower_edge():
    final_loss_at, tried = bowl(1e-5)
    best, grid, _ = experiments.search_lr(final_loss_at, [1e-3, 1e-4], max_extensions=5)
    assert tried[2:] == pytest.approx([1e-5, 1e-6]) and best == pytest.approx(1e-5) and grid[0] < best < grid[-1]


def test_grid_extension_is_bounded():
    final_loss_at, tried = bowl(10.0)
    best, grid, _ = experiments.search_lr(final_loss_at, [1e-3, 1e-2], max_extensions=2)
    assert len(tried) == 4 and best == grid[-1] == pytest.approx(1.0)  # still at the edge: the summary says so


def test_spread_over_seeds():
    assert experiments.spread([7.0, 7.5, 8.5]) == {"mean": 7.666666666666667, "std": statistics.stdev([7.0, 7.5, 8.5]),
                                                   "min": 7.0, "max": 8.5, "n": 3, "missing": 0}
    assert experiments.spread([2.0]) == {"mean": 2.0, "std": 0.0, "min": 2.0, "max": 2.0, "n": 1, "missing": 0}
    assert experiments.spread([None, 4.0, 6.0])["mean"] == 5.0 and experiments.spread([None, 4.0, 6.0])["missing"] == 1
    assert experiments.spread([None]) == {"n": 0, "missing": 1}


def test_options_reach_train_py_and_others_pass_through(tmp_path):
    args, passthrough = experiments.parser().parse_known_args(
        ["compare", "--model", "llama_small", "--data_dir", str(tmp_path), "--max_steps", "300", "--batch_size", "16",
         "--micro_batch_size", "4", "--seq_len", "64", "--seeds", "2", "--warmup_frac", "0.05", "--dtype", "bfloat16"])
    assert args.seeds == 2 and passthrough == ["--warmup_frac", "0.05", "--dtype", "bfloat16"]
    cfg = train.parse_config(experiments.run_args(args, passthrough) + ["--optimizer", "adamw", "--seed", "1"])
    assert (cfg.model, cfg.data_dir, cfg.max_steps) == ("llama_small", str(tmp_path), 300)
    assert (cfg.batch_size, cfg.micro_batch_size, cfg.seq_len) == (16, 4, 64)
    assert (cfg.warmup_frac, cfg.dtype, cfg.optimizer, cfg.seed) == (0.05, "bfloat16", "adamw", 1)
    with pytest.raises(SystemExit, match="--nonsense"):  # a bad option stops the tool before any run
        experiments.main(["compare", "--data_dir", str(tmp_path), "--nonsense", "1"])


def test_compare_tunes_every_baseline_and_aggregates_the_seeds(tmp_path, monkeypatch):
    """compare's flow with train.py replaced by synthetic runs: each baseline's loss depends on its lr (AdamW best at
    5e-3, Muon at 1e-3, 0.1 above AdamW) and the seed; SinkGD is ahead of both."""
    best = {"adamw": 5e-3, "muon": 1e-3}

    def fake_run(run_dir, args):
        cfg = train.parse_config(args + ["--out_dir", str(run_dir)])
        run_dir.mkdir(parents=True)
        offset = 0.1 * cfg.seed + (-0.5 if cfg.optimizer == "sinkgd" else abs(math.log10(cfg.lr / best[cfg.optimizer]))
                                   + 0.1 * (cfg.optimizer == "muon"))
        return synthetic_metrics([8.0 - 0.2 * k + offset for k in range(10)], 1000)

    speed = {"adamw": 1000.0, "muon": 950.0, "sinkgd": 900.0}
    monkeypatch.setattr(experiments, "run_training", fake_run)
    monkeypatch.setattr(experiments, "interleaved_tokens_per_sec", lambda variants, steps: {k: speed[k]
                                                                                          for k in variants})
    below = {"adamw": 0.0, "muon": 0.1, "sinkgd": 0.3}  # per-window losses below AdamW's
    monkeypatch.setattr(experiments, "window_losses", lambda run_dir, *a: torch.linspace(6.0, 7.0, 101).double().numpy()
                        - below[run_dir.name.split("_")[0]] + 0.01 * int(run_dir.name[-1]))
    monkeypatch.setattr(experiments, "plot_groups", lambda *a: True)
    args, _ = experiments.parser().parse_known_args(["compare", "--out_dir", str(tmp_path), "--seeds", "3",
                                                     "--baselines", "adamw", "muon"])
    summary = experiments.compare(args, [])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(
        [f"{b}_lr{lr:g}_seed0" for b in best for lr in experiments.PAPER_ADAMW_LRS]
        + [f"adamw_lr0.005_seed{s}" for s in (1, 2)] + [f"muon_lr0.001_seed{s}" for s in (1, 2)]
        + [f"sinkgd_seed{s}" for s in range(3)])
    adamw, muon = summary["baselines"]["adamw"], summary["baselines"]["muon"]
    assert (adamw["best_lr"], muon["best_lr"]) == (5e-3, 1e-3) and adamw["best_lr_is_interior"]
    assert adamw["final_val_loss"]["mean"] == pytest.approx(6.51)
    assert muon["final_val_loss"]["mean"] == pytest.approx(6.41)
    assert (adamw["gap"]["mean"], muon["gap"]["mean"]) == (pytest.approx(0.3), pytest.approx(0.2))
    assert summary["sinkgd_final_val_loss"]["std"] == pytest.approx(0.01)
    se = statistics.stdev(torch.linspace(6.0, 7.0, 101).tolist()) / math.sqrt(101)
    assert summary["final_val_standard_error"]["max"] == pytest.approx(se)
    # the standard error, 0.029, is below a tenth of the 0.3 gap to AdamW, not of the 0.2 gap to Muon
    assert adamw["standard_error_below_a_tenth_of_gap"] and not muon["standard_error_below_a_tenth_of_gap"]
    # per seed, SinkGD (0.5 lower) reaches AdamW's final 6.2 + 0.1 * seed at step 40 of 50, Muon's (0.1 higher) at 35
    assert adamw["sinkgd_steps_to_its_final"] == dict(mean=40, std=0.0, min=40, max=40, n=3, missing=0)
    assert adamw["effective_throughput_ratio"]["mean"] == pytest.approx(0.9 * 50 / 40)
    assert muon["effective_throughput_ratio"]["mean"] == pytest.approx(900 / 950 * 50 / 35)
    assert muon["tokens_per_sec_ratio"] == pytest.approx(900 / 950)
    # the curves are parallel: SinkGD 0.5 below AdamW and 0.6 below Muon at every horizon, in every seed
    for name, gap in (("adamw", 0.5), ("muon", 0.6)):
        horizon = summary["baselines"][name]["horizon"]
        assert list(horizon) == ["15", "30", "50"]  # a third and two thirds of 50, down to an evaluated step
        assert [h["gap"]["mean"] for h in horizon.values()] == [pytest.approx(gap)] * 3
        assert [h["sinkgd_lower_in"] for h in horizon.values()] == [3] * 3
    assert summary["baselines"]["adamw"]["horizon"]["30"]["sinkgd_loss"]["mean"] == pytest.approx(7.0 - 0.5 + 0.1)
    table = experiments.compare_table(summary)
    assert "| 30 | 7.100 ± 0.100 | 7.200 ± 0.100 | 6.600 ± 0.100 | 0.500 ± 0.000 (3 of 3) | 0.600 ± 0.000 (3 of 3) |" \
        in table, table
    assert "| AdamW | 0.005 (grid" and "| Muon | 0.001 (grid" in table and "| SinkGD | 0.02" in table
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == 3


def test_horizon_gaps_read_each_seed_at_each_step():
    """Curves that cross: the baseline ahead at step 10 in both seeds, SinkGD ahead at 30 in one seed. Each gap is
    the pair of the same seed at the same evaluated step."""
    baseline = [synthetic_metrics([5.0, 4.0, 3.0], 1, eval_interval=10, steps=30),
                synthetic_metrics([5.2, 4.1, 3.2], 1, eval_interval=10, steps=30)]
    sinkgd = [synthetic_metrics([5.5, 4.0, 2.9], 1, eval_interval=10, steps=30),
              synthetic_metrics([5.3, 4.4, 3.3], 1, eval_interval=10, steps=30)]
    rows = experiments.horizon_gaps(baseline, sinkgd, [10, 30])
    assert list(rows) == ["10", "30"]
    assert rows["10"]["gap"]["mean"] == pytest.approx(-0.3) and rows["10"]["sinkgd_lower_in"] == 0
    assert (rows["30"]["gap"]["min"], rows["30"]["gap"]["max"]) == (pytest.approx(-0.1), pytest.approx(0.1))
    assert rows["30"]["sinkgd_lower_in"] == 1 and rows["30"]["loss"]["mean"] == pytest.approx(3.1)
    assert rows["30"]["sinkgd_loss"]["mean"] == pytest.approx(3.1)
    with pytest.raises(StopIteration):  # a step without an evaluation has no value to read
        experiments.horizon_gaps(baseline, sinkgd, [15])


@pytest.mark.parametrize("horizons", [["7"], ["0"], ["60"], ["25", "50"]])
def test_horizons_must_be_evaluated_steps(horizons, tmp_path):
    with pytest.raises(SystemExit, match=r"--horizons must be steps that are evaluated: multiples of --eval_interval "
                       r"10 up to --max_steps 55"):
        experiments.main(["compare", "--data_dir", str(tmp_path), "--max_steps", "55", "--eval_interval", "10",
                          "--horizons", *horizons])
    args, _ = experiments.parser().parse_known_args(["compare", "--max_steps", "55", "--eval_interval", "10",
                                                     "--horizons", "20", "55"])
    assert experiments.horizon_steps(args) == [20, 55]


def test_compare_with_muon_on_a_tiny_run(data_dir, tmp_path):
    """compare --baselines adamw muon for real, at the smallest size: both baselines tuned (a one-point grid each),
    SinkGD's ratio against each, every optimizer in the table and the figure."""
    pytest.importorskip("matplotlib")
    experiments.main(["compare", "--baselines", "adamw", "muon", "--adamw_lrs", "1e-3", "--muon_lrs", "1e-3",
                      "--max_extensions", "0", "--seeds", "1", "--data_dir", str(data_dir), "--max_steps", "2",
                      "--batch_size", "2", "--micro_batch_size", "2", "--seq_len", "16", "--eval_interval", "1",
                      "--eval_tokens", "170", "--final_eval_tokens", "170", "--timing_steps", "1",
                      "--out_dir", str(tmp_path), "--device", "cpu", "--dtype", "float32"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["baselines"].keys() == {"adamw", "muon"}
    for b in summary["baselines"].values():
        assert b["grid"] == [1e-3] and b["best_lr"] == 1e-3 and b["tokens_per_sec_ratio"] > 0
        assert b["final_val_loss"]["n"] == 1 and b["effective_throughput_ratio"]["n"] + \
            b["effective_throughput_ratio"]["missing"] == 1
    assert summary["interleaved_tokens_per_sec"].keys() == {"adamw", "muon", "sinkgd"}
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_gpu_benchmark_says_it_needs_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the tool would measure it")
    proc = subprocess.run([sys.executable, "-m", "tools.bench_gpu", str(tmp_path / "gpu")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: tools.bench_gpu measures a CUDA GPU and this machine has none; run it where torch.cuda.is_available() "
        "is True"]


def test_runs_windows_and_speed_for_real(data_dir, tmp_path, monkeypatch):
    """run_training, window_losses and interleaved_tokens_per_sec at the smallest size, nothing mocked: 2 steps of
    llama_tiny through train.py; the per-window losses of its final weights average to train.py's own validation
    loss (two code paths); the same config continues its run, a changed one starts afresh; tokens/s is the batch's
    tokens (2 micro-batches) over the measured median seconds of a step."""
    args, _ = experiments.parser().parse_known_args(
        ["compare", "--model", "llama_tiny", "--data_dir", str(data_dir), "--max_steps", "2", "--batch_size", "2",
         "--micro_batch_size", "2", "--seq_len", "16", "--eval_interval", "2", "--eval_tokens", "170"])
    base = experiments.run_args(args, ["--device", "cpu", "--dtype", "float32"])
    run_dir = tmp_path / "sinkgd"
    metrics = experiments.run_training(run_dir, base + experiments.SINKGD_ARGS)
    assert [m["step"] for m in metrics] == [1, 2] and "val_loss" in metrics[-1]
    checkpoint = run_dir / "ckpt_00000002.pt"
    written = checkpoint.stat().st_mtime_ns

    losses = experiments.window_losses(run_dir, str(data_dir), 16, 170)
    assert losses.shape == (10,)  # 170 tokens: 10 windows of 17
    assert losses.mean() == pytest.approx(experiments.final_val_loss(metrics), rel=1e-6)

    assert experiments.run_training(run_dir, base + experiments.SINKGD_ARGS) == metrics  # continued: already done
    assert checkpoint.stat().st_mtime_ns == written
    changed = experiments.run_training(run_dir, base + experiments.SINKGD_ARGS + ["--alpha", "0.1"])
    assert [m["step"] for m in changed] == [1, 2] and changed[-1]["val_loss"] != metrics[-1]["val_loss"]
    assert checkpoint.stat().st_mtime_ns != written  # started afresh

    measured = {}

    def spy(runs, repeats, device):
        measured.update(interleaved_medians(runs, repeats, device))
        return measured
    interleaved_medians = experiments.interleaved_medians
    monkeypatch.setattr(experiments, "interleaved_medians", spy)
    two_micro_batches = base + ["--batch_size", "4"]
    speed = experiments.interleaved_tokens_per_sec({"adamw": two_micro_batches + ["--optimizer", "adamw"],
                                                    "sinkgd": two_micro_batches + experiments.SINKGD_ARGS}, steps=2)
    assert speed.keys() == {"adamw", "sinkgd"} and all(s > 0 for s in measured.values())
    assert speed == {name: 4 * 16 / seconds for name, seconds in measured.items()}
