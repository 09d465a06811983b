"""Export a train.py checkpoint as a Hugging Face LLaMA folder: config.json + model.safetensors.

    python -m tools.export_hf out/demo hf/demo                        # the newest ckpt_*.pt of a train.py out_dir
    python -m tools.export_hf out/demo/ckpt_00000200.pt hf/demo       # one checkpoint file
    python -m tools.export_hf out/llama_1b hf/llama_1b                # DeepSpeed: the tag named in `latest` ...
    python -m tools.export_hf out/llama_1b/step_00100000 hf/llama_1b  # ... or one step_* directory

    model = transformers.LlamaForCausalLM.from_pretrained("hf/demo")

model.py already uses HF's parameter names and rotary convention, so the weights are written as they are, in
float32; exporting needs safetensors, not transformers.
"""
import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

import checkpoint
import train
import zero
from model import CONFIGS, Llama, LlamaConfig
from prepare_c4 import EOT_TOKEN


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state_dict, model name when the checkpoint records it) from a ckpt_*.pt file, a train.py out_dir
    (its newest ckpt_*.pt) or a DeepSpeed checkpoint (an out_dir with `latest`, or a step_* directory)."""
    if path.is_dir() and checkpoint.checkpoint_paths(path):
        path = checkpoint.checkpoint_paths(path)[-1]
    if path.is_file():
        # mmap: the optimizer state, twice the model's size under AdamW, is never read into memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return state["model"], state["config"]["model"]
    tag_dir = path / (path / "latest").read_text().strip() if (path / "latest").exists() else path
    bf16_ranks = sorted(tag_dir.glob("bf16_zero_pp_rank_*_optim_states.pt"), key=lambda f: int(f.name.split("_")[4]))
    # ZeRO-1 with fp32 gradient accumulation (BF16_Optimizer): each group's fp32 partitions, in order. ZeRO-3 with bf16
    # names its optimizer files the same, but keeps per-rank model states, and zero_to_fp32 below reads it.
    if bf16_ranks and (tag_dir / "mp_rank_00_model_states.pt").exists():
        partitions = [zero.load_deepspeed_file(f)["optimizer_state_dict"]["single_partition_of_fp32_groups"]
                      for f in bf16_ranks]
        states = zero.load_deepspeed_file(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu")
        weights = {}
        for g, shapes in enumerate(states["param_shapes"]):
            flat = torch.cat([rank[g] for rank in partitions])
            sizes = [shape.numel() for shape in shapes.values()]
            pieces = flat[:sum(sizes)].split(sizes)  # the rest is alignment padding
            weights |= {name: t.view(shape).clone() for (name, shape), t in zip(shapes.items(), pieces)}
        return weights, None
    if list(tag_dir.glob("*zero_pp_rank_*")):  # ZeRO 1-3: merge the fp32 master weights of every rank
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name), None
    if (tag_dir / "mp_rank_00_model_states.pt").exists():  # stage 0: the whole model on every rank
        states = zero.load_deepspeed_file(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu")
        masters = (states.get("optimizer") or {}).get("fp32_groups")
        if masters:  # bf16: the fp32 master weights its optimizer kept, in the order of train.py's param groups
            names = param_group_names(train.TrainConfig(**states["config"]))
            return {name: t for group_names, group in zip(names, masters) for name, t in zip(group_names, group)}, None
        return states["module"], None
    raise FileNotFoundError(f"{path}: neither a checkpoint file nor a directory holding ckpt_*.pt or a "
                            "DeepSpeed checkpoint")


def param_group_names(cfg: train.TrainConfig) -> list[list[str]]:
    """The parameter names of each param group of the optimizer train.py builds for cfg."""
    with torch.device("meta"):  # shapes only, no memory
        model = Llama(CONFIGS[cfg.model])
    names = {id(p): name for name, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in train.build_optimizer(cfg, model).param_groups]


def state_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only, no memory
        return {name: tuple(t.shape) for name, t in Llama(config).state_dict().items()}


def model_config(state_dict: dict[str, torch.Tensor], name: str | None) -> LlamaConfig:
    """The config of the named size, or, for a DeepSpeed checkpoint (which records none), the one size in
    model.CONFIGS whose parameter shapes match; either way the shapes must match exactly."""
    shapes = {key: tuple(t.shape) for key, t in state_dict.items()}
    if name is None:
        matching = [n for n, c in CONFIGS.items() if state_shapes(c) == shapes]
        if len(matching) != 1:
            raise ValueError(f"the checkpoint names no model size, and its shapes match {len(matching)} "
                             "sizes in model.CONFIGS")
        name = matching[0]
    if state_shapes(CONFIGS[name]) != shapes:
        raise ValueError(f"the checkpoint's parameters do not have the names and shapes of {name}")
    return CONFIGS[name]


def hf_config(config: LlamaConfig) -> dict:
    return asdict(config) | {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "head_dim": config.head_dim,
        "num_key_value_heads": config.num_attention_heads,  # plain multi-head attention, no grouped queries
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,  # model.py's lm_head is its own matrix
        "bos_token_id": EOT_TOKEN,  # GPT-2's <|endoftext|> separates documents in the training data
        "eos_token_id": EOT_TOKEN,
        "torch_dtype": "float32",
    }


def export(checkpoint, out_dir) -> Path:
    state_dict, name = load_weights(Path(checkpoint))
    config = model_config(state_dict, name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {key: t.float().contiguous() for key, t in state_dict.items()}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})  # HF wants the "format" key
    (out_dir / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a ckpt_*.pt file, a train.py out_dir, or a DeepSpeed checkpoint")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    try:
        out_dir = export(args.checkpoint, args.out_dir)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out_dir / 'config.json'} and {out_dir / 'model.safetensors'}")


if __name__ == "__main__":
    main()
