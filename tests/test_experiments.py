"""export_hf.py (round trip through transformers) and the arithmetic of experiments.py: the memory estimate,
steps to reach a loss, throughput from metrics.jsonl, effective throughput, plots."""
import json
import sys

import pytest
import torch

import experiments
import export_hf
from model import CONFIGS, Llama

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
    result = experiments.effective_throughput(adamw, sinkgd, adamw_tokens_per_sec=1000, sinkgd_tokens_per_sec=900)
    assert result["target_val_loss"] == 6.2
    assert (result["adamw_steps"], result["sinkgd_steps"]) == (50, 25)
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
