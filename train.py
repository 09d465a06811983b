"""Pretrain a LLaMA on token shards with SinkGD (or AdamW, the baseline), on one device or under DeepSpeed ZeRO.

    python train.py                                        # offline demo: tiny LLaMA, CPython docstrings
    python train.py --preset llama_60m --data_dir data/c4  # the paper's 60M recipe on one GPU
    python train.py --preset llama_60m --optimizer adamw --lr 1e-3
    python train.py --out_dir out/demo --resume            # continue from the newest intact checkpoint
    deepspeed --num_gpus 8 train.py --preset llama_1b --deepspeed_config ds_config.json

Options are the fields of TrainConfig, given as --key value; --preset picks a starting point; --help lists them.
"""
import argparse
import inspect
import json
import math
import os
import random
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import checkpoint
import prepare_c4
import zero
from model import CONFIGS, Llama, flops_per_token, peak_bf16_flops
from sinkgd import SinkGD, describe_split, sinkgd_param_groups
from sinkgd_zero import ZeroSinkGD


@dataclass
class TrainConfig:
    """Every field is an option, --key value; its comments are its --help text."""
    preset: str = "demo"  # starting values for the other options (listed below); the options given override them
    model: str = "llama_tiny"  # a key of model.CONFIGS
    data_dir: str = "data/demo"  # holds train_*.bin and val_*.bin from prepare_c4.py
    out_dir: str = "out/demo"  # checkpoints and metrics.jsonl
    optimizer: str = "sinkgd"  # sinkgd: the paper's hybrid (SinkGD on block matrices, AdamW on the rest); adamw
    lr: float = 0.02  # global lr: AdamW's; the SinkGD matrices get alpha * lr
    alpha: float = 0.05  # SinkGD's share of the lr (paper: 0.05)
    sinkhorn_iters: int = 5  # L, SR-Sinkhorn's iterations per step (paper: 5)
    weight_decay: float = 0.0  # decoupled, for every parameter: W <- (1 - lr * weight_decay) W
    beta1: float = 0.9  # AdamW's, for the embedding, norms and head
    beta2: float = 0.999  # AdamW's
    adam_eps: float = 1e-8  # AdamW's
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    # a step whose loss or gradient is not finite is skipped (no weight, optimizer or schedule update; the data
    # moves on) up to this many times in a run; one more stops the run. 0: stop at the first.
    max_bad_steps: int = 0
    batch_size: int = 512  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 32  # sequences per forward and backward on a rank; sets the memory, not the result
    seq_len: int = 256  # tokens per sequence
    max_steps: int = 10_000  # optimizer steps; the schedule ends here
    warmup_frac: float = 0.1  # linear warmup over this fraction of max_steps, then cosine decay
    min_lr_frac: float = 0.1  # ... to min_lr_frac * lr at max_steps
    eval_interval: int = 1000  # steps between validations (and one at the end)
    eval_tokens: int = 10_000_000  # the fixed validation budget: the first tokens of the val shards
    log_interval: int = 10  # steps between log lines
    ckpt_interval: int = 1000  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # the newest this many are kept
    resume: bool = False  # continue from the newest intact checkpoint in out_dir
    seed: int = 0  # for the initial weights and the data order
    device: str = "auto"  # auto: cuda if present, else cpu
    dtype: str = "auto"  # auto (bfloat16 on cuda, float32 on cpu), float32 or bfloat16
    compile: bool = False  # torch.compile the model
    # DeepSpeed: set by `deepspeed train.py --deepspeed_config ds_config.json` (or torchrun)
    deepspeed_config: str = ""
    local_rank: int = -1  # appended by the deepspeed launcher; LOCAL_RANK is read from the environment


PRESETS = {
    # A few minutes on a laptop CPU, on text every Python install carries.
    "demo": dict(model="llama_tiny", data_dir="data/demo", out_dir="out/demo", batch_size=16, micro_batch_size=16,
                 seq_len=128, max_steps=200, eval_interval=100, eval_tokens=64 * 129, log_interval=10,
                 ckpt_interval=100),
    # The paper's recipe (Zhao et al. 2024 benchmark): 512 x 256 tokens per step.
    "llama_60m": dict(model="llama_60m", max_steps=10_000, micro_batch_size=128),
    "llama_130m": dict(model="llama_130m", max_steps=20_000, micro_batch_size=64),
    "llama_350m": dict(model="llama_350m", max_steps=60_000, micro_batch_size=64),
    "llama_1b": dict(model="llama_1b", max_steps=100_000, micro_batch_size=32),
}
PRESETS |= {name: dict(model=name) for name in CONFIGS if name not in PRESETS}  # the tiny and benchmark sizes
PRESETS = {name: dict(preset, data_dir=preset.get("data_dir", "data/c4"), out_dir=preset.get("out_dir", f"out/{name}"))
           for name, preset in PRESETS.items()}


class ConfigError(ValueError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its usage and exit 2; train.py's errors are one line
        raise ConfigError(f"{message} (see python train.py --help)")


def boolean(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expects true or false, got {text!r}")
    return text.lower() in ("true", "1")


def field_help(cls) -> dict[str, str]:
    """Each field's comments in the class source, as help text: the comment lines above it and the one after it."""
    help_text, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        code, _, comment = (part.strip() for part in line.partition("#"))
        if field := re.match(r"(\w+): ", code):
            help_text[field[1]] = " ".join(above + [comment]).strip()
        above = [*above, comment] if comment and not code else []
    return help_text


def build_parser(preset: str) -> ArgumentParser:
    """--key value (or --key=value) for every TrainConfig field, its default the preset's; a bool also as --key."""
    defaults = replace(TrainConfig(), **PRESETS[preset])
    presets = "\n".join(f"  {name}: {' '.join(f'{k}={v}' for k, v in p.items())}" for name, p in PRESETS.items())
    parser = ArgumentParser(description=__doc__, epilog=f"presets (--preset NAME applies first):\n{presets}",
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    help_text = field_help(TrainConfig)
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        kind = boolean if f.type is bool else f.type
        extra = dict(nargs="?", const=True, metavar="{true,false}") if kind is boolean else {}
        if f.name == "preset":
            extra["choices"] = list(PRESETS)
        description = f"{help_text[f.name]} (default: {default!r})".lstrip().replace("%", "%%")
        parser.add_argument(f"--{f.name}", type=kind, default=default, help=description, **extra)
    return parser


def parse_config(argv: list[str]) -> TrainConfig:
    """The options given over the preset's values (TrainConfig's defaults, then PRESETS[--preset]); validated."""
    preset = build_parser(TrainConfig.preset).parse_known_args(
        [a for a in argv if a not in ("-h", "--help")])[0].preset
    namespace, rest = build_parser(preset).parse_known_args(argv)
    if rest:
        raise ConfigError(f"unknown option {rest[0]}; see python train.py --help" if rest[0].startswith("-")
                          else f"unexpected argument {rest[0]!r}: options are --key value")
    cfg = TrainConfig(**vars(namespace))
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    model_cfg = CONFIGS.get(cfg.model)
    if model_cfg is None:
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(CONFIGS)}")
    if cfg.optimizer not in ("sinkgd", "adamw"):
        raise ConfigError(f"--optimizer must be sinkgd or adamw, got {cfg.optimizer!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr}")
    if not 0 < cfg.seq_len <= model_cfg.max_position_embeddings:
        raise ConfigError(f"--seq_len {cfg.seq_len} must be in 1..{model_cfg.max_position_embeddings} "
                          f"(max_position_embeddings of {cfg.model})")
    if cfg.micro_batch_size < 1 or cfg.batch_size % (cfg.micro_batch_size * world_size):
        raise ConfigError(f"--batch_size {cfg.batch_size} must be a multiple of --micro_batch_size "
                          f"{cfg.micro_batch_size} x {world_size} rank(s)")
    if cfg.max_steps < 1 or cfg.sinkhorn_iters < 1:
        raise ConfigError("--max_steps and --sinkhorn_iters must be >= 1")
    if cfg.max_bad_steps < 0:
        raise ConfigError(f"--max_bad_steps must be >= 0, got {cfg.max_bad_steps}")
    if Path(cfg.out_dir).resolve() == Path.cwd().resolve():
        raise ConfigError("--out_dir must not be the current directory: checkpoints are pruned there")


# --------------------------------------------------------------------------------------------------
# Data, optimizer and schedule, and the one-process engine.


def build_optimizer(cfg: TrainConfig, model: Llama, optimizer_class=SinkGD) -> SinkGD:
    """The paper's split (SinkGD on the block matrices, AdamW on the rest), or AdamW on everything: torch's AdamW
    math either way, and a non-finite step is skipped by the same check (see SinkGD.step)."""
    if cfg.optimizer == "adamw":
        groups = [dict(params=list(model.parameters()), sinkgd=False)]
    else:
        groups = sinkgd_param_groups(model, model.model.layers, lr=cfg.lr, alpha=cfg.alpha)
    return optimizer_class(groups, lr=cfg.lr, sinkhorn_iters=cfg.sinkhorn_iters, betas=(cfg.beta1, cfg.beta2),
                           eps=cfg.adam_eps, weight_decay=cfg.weight_decay, skip_nonfinite=True)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine from 1 to min_lr_frac."""
    warmup = int(cfg.warmup_frac * cfg.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.max_steps - warmup))
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


class LocalEngine(nn.Module):
    """One process, behind the part of DeepSpeed's engine interface that train() uses: forward, backward(loss), and
    step(), which after the last micro-batch of a batch clips, steps the optimizer and, if it applied the step (it
    skips a non-finite one, see SinkGD), the schedule; was_step_applied() says which."""

    def __init__(self, model: nn.Module, optimizer: SinkGD, scheduler, accumulation: int, grad_clip: float, compile):
        super().__init__()
        self.module, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.compiled = torch.compile(model) if compile else model
        self.accumulation, self.grad_clip, self.micro_steps, self.applied = accumulation, grad_clip, 0, True

    def forward(self, *args):
        return self.compiled(*args)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation:
            return
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.applied = not self.optimizer.overflow
        if self.applied:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def was_step_applied(self) -> bool:
        return self.applied

    # A checkpoint as zero.save and zero.resume write and read DeepSpeed's: the loop's state plus the engine's.
    def save(self, out_dir: Path, step: int, state: dict, keep: int) -> None:
        engine_state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}
        checkpoint.save(out_dir, step, state | engine_state, keep)

    def resume(self, out_dir: Path) -> dict | None:
        state = checkpoint.load_latest(out_dir)
        if state is not None:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        return state


# --------------------------------------------------------------------------------------------------
# Evaluation and metrics.


def all_ranks_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model, windows: np.ndarray, micro_batch_size: int, device, autocast) -> float:
    """Mean next-token loss over the fixed validation windows, the batches dealt out over the ranks."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=device), 0
    num_batches = math.ceil(len(windows) / micro_batch_size)
    for k in range(rank, math.ceil(num_batches / world) * world, world):
        # a rank past the last batch still runs one forward: under ZeRO-3 every forward is collective
        batch = torch.from_numpy(windows[k * micro_batch_size:(k + 1) * micro_batch_size] if k < num_batches
                                 else windows[:1]).to(device)
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        if k < num_batches:
            loss_sum += loss.double() * batch[:, 1:].numel()
            count += batch[:, 1:].numel()
    model.train()
    loss_sum, count = all_ranks_sum(torch.stack([loss_sum, loss_sum.new_tensor(count)])).tolist()
    return loss_sum / count


def memory_record(device: torch.device) -> dict:
    """Peak memory (CUDA: allocated tensors; CPU: the resident set) and the resident set now (the peak alone cannot
    show slow growth over a long run; None off Linux), in MiB."""
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        rss = None
    return {"memory_mib": peak / 2**20, "rss_mib": rss}


def log_line(record: dict, max_steps: int) -> str:
    """step k/N, then the record's values, durations (keys ending _s) as h:mm:ss: one line per --log_interval steps."""
    shown = [f"{k[:-2]} {timedelta(seconds=round(v))}" if k.endswith("_s") else f"{k} {v:.4g}" if isinstance(v, float)
             else f"{k} {v}" for k, v in record.items() if k not in ("step", "time")]
    return " | ".join([f"step {record['step']}/{max_steps}", *shown])


# --------------------------------------------------------------------------------------------------
# Training.


def train(cfg: TrainConfig) -> dict:
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if cfg.deepspeed_config:
        ds_config = zero.read_config(cfg.deepspeed_config)  # missing or malformed: one line, before DeepSpeed starts
        zero.init_distributed(device.type)
        device = zero.local_rank_device(device.type)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    validate(cfg, world_size)
    main_rank = rank == 0
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    # float32 matmuls stay at torch's "highest", never TF32: under bf16 the model's are bf16 anyway, and SinkGD's own
    # (the step runs outside autocast) are then exact Alg. 3, on one device as under ZeRO.
    # DeepSpeed casts the model to bf16 itself; one device uses autocast.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not cfg.deepspeed_config)
    for seed in (torch.manual_seed, random.seed, np.random.seed):
        seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    if not cfg.resume and (checkpoint.checkpoint_paths(out_dir) or list(out_dir.glob("step_*"))):
        raise ConfigError(f"{out_dir} holds the checkpoints of an earlier run: pass --resume to continue it, or "
                          "choose another --out_dir")
    if main_rank and cfg.data_dir == PRESETS["demo"]["data_dir"] and not list(Path(cfg.data_dir).glob("train_*")):
        prepare_c4.prepare_demo(cfg.data_dir)  # the offline demo corpus, once; the other ranks wait for it
    if dist.is_initialized():
        dist.barrier()
    train_shards, val_shards = prepare_c4.open_splits(cfg.data_dir)
    loader = prepare_c4.TokenLoader(train_shards, cfg.seq_len, cfg.seed, rank, world_size, device.type == "cuda")
    val_windows = prepare_c4.validation_windows(val_shards, cfg.seq_len, cfg.eval_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = Llama(CONFIGS[cfg.model]).to(device)
    num_params = model.num_params()  # counted before ZeRO-3 partitions the weights away
    optimizer = build_optimizer(cfg, model, ZeroSinkGD if cfg.deepspeed_config else SinkGD)
    split = describe_split(model, optimizer.param_groups)  # before ZeRO swaps the groups' tensors for partitions
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
    accumulation = cfg.batch_size // (cfg.micro_batch_size * world_size)
    if cfg.deepspeed_config:
        engine = zero.initialize(ds_config, model, optimizer, scheduler, batch_size=cfg.batch_size,
                                 micro_batch_size=cfg.micro_batch_size, grad_clip=cfg.grad_clip, bf16=bf16,
                                 compile=cfg.compile)
    else:
        engine = LocalEngine(model, optimizer, scheduler, accumulation, cfg.grad_clip, cfg.compile)
    save, resume = (zero.save, zero.resume) if cfg.deepspeed_config else (LocalEngine.save, LocalEngine.resume)
    resumed = resume(engine, out_dir) if cfg.resume else None
    step, nonfinite_steps = 0, []  # the steps skipped for a non-finite loss or gradient
    if resumed is not None:
        loader.load_state_dict(resumed["loader"])
        checkpoint.set_rng_state(resumed["rng"])
        step, nonfinite_steps = resumed["step"], resumed["nonfinite_steps"]
    if main_rank and cfg.resume:
        print(f"resumed from step {step}" if resumed is not None else f"no checkpoint in {out_dir}: starting afresh")
    metrics_path = out_dir / "metrics.jsonl"
    if main_rank:
        checkpoint.truncate_log(metrics_path, step)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak_flops = world_size * peak_bf16_flops(device_name)
    if main_rank:
        print(f"{cfg.model}: {num_params / 1e6:.1f}M params | {cfg.optimizer} | {tokens_per_step} "
              f"tokens/step ({cfg.micro_batch_size} x {accumulation} x {world_size} x {cfg.seq_len}) | {device}"
              f"{' bf16' if bf16 else ''}{' | deepspeed' if cfg.deepspeed_config else ''}")
        print(f"split: {split}")

    result, tokens_since = {}, 0
    t_start = t_last = time.perf_counter()
    while step < cfg.max_steps:
        lr = optimizer.param_groups[-1]["lr"]
        loss_sum = torch.zeros((), device=device)
        for _ in range(accumulation):
            # (micro-batch, seq_len + 1) tokens, pinned on CUDA: one asynchronous copy, sliced on the device
            tokens = loader.next_batch(cfg.micro_batch_size * world_size).to(device, non_blocking=True)
            with autocast:
                _, loss = engine(tokens[:, :-1], tokens[:, 1:])
            engine.backward(loss)
            engine.step()  # steps the optimizer and schedule after the last micro-batch
            loss_sum += loss.detach().float() / accumulation
        step += 1
        tokens_since += tokens_per_step

        record = None
        if not engine.was_step_applied():  # the optimizer skipped the step: no weight, state or schedule changed
            nonfinite_steps.append(step)
            problem = f"non-finite {'gradient' if all_ranks_sum(loss_sum).isfinite() else 'loss'} at step {step}"
            if len(nonfinite_steps) > cfg.max_bad_steps:
                raise FloatingPointError(f"{problem} ({len(nonfinite_steps)} such step(s), --max_bad_steps "
                                         f"{cfg.max_bad_steps}); weights not updated and the last checkpoint is "
                                         "intact: resume from it with a lower --lr")
            record = {"step": step, "skipped": problem, "nonfinite_steps": len(nonfinite_steps)}
        elif step % cfg.log_interval == 0 or step == cfg.max_steps:
            train_loss = (all_ranks_sum(loss_sum) / world_size).item()  # waits for the device: time it after
            tokens_per_sec = tokens_since / (time.perf_counter() - t_last)
            record = {"step": step, "train_loss": train_loss, "lr": lr, "tokens_per_sec": tokens_per_sec}
            if math.isfinite(peak_flops):  # model FLOPs utilisation, on a GPU of known peak
                record["mfu"] = tokens_per_sec * flops_per_token(CONFIGS[cfg.model], cfg.seq_len) / peak_flops
            # ETA at the last interval's speed (evaluation and checkpoints not counted)
            elapsed, eta = time.perf_counter() - t_start, (cfg.max_steps - step) * tokens_per_step / tokens_per_sec
            record |= memory_record(device) | {"elapsed_s": elapsed, "eta_s": eta, "time": time.time()}
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val_loss = evaluate(engine, val_windows, cfg.micro_batch_size, device, autocast)
            result = record = (record or {"step": step}) | {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
        if record is not None and main_rank:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(log_line(record, cfg.max_steps), flush=True)
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            state = {"loader": loader.state_dict(), "rng": checkpoint.rng_state(), "step": step,
                     "nonfinite_steps": nonfinite_steps, "config": asdict(cfg)}
            save(engine, out_dir, step, state, cfg.keep_checkpoints)
        if record is not None and "tokens_per_sec" in record:  # restart the clock after eval and save
            t_last, tokens_since = time.perf_counter(), 0
    return result


def main(argv=None) -> None:
    try:
        result = train(parse_config(sys.argv[1:] if argv is None else argv))
    except (ConfigError, zero.ConfigFileError, prepare_c4.ShardError, checkpoint.CheckpointError, FileNotFoundError,
            FloatingPointError, OSError) as e:
        sys.exit(f"error: {e}")
    if result and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"final validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}")
    if dist.is_initialized():  # before exit: gloo's threads torn down by the interpreter can abort the process
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
