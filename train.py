"""Pretrain a LLaMA on token shards with SinkGD (or AdamW, or Muon), on one device or under DeepSpeed ZeRO.

    python train.py                                        # offline demo: tiny LLaMA, CPython docstrings
    python train.py --preset llama_60m --data_dir data/c4  # the paper's 60M recipe on one GPU
    python train.py --preset llama_60m --optimizer adamw --lr 1e-3  # or muon: the baselines
    python train.py --out_dir out/demo --resume            # continue from the newest intact checkpoint
    deepspeed --num_gpus 8 train.py --preset llama_1b --deepspeed_config ds_config.json  # options: --help
"""
import argparse
import json
import math
import os
import random
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from functools import partial
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


def option(default, help: str, choices: tuple = ()):
    """A TrainConfig field: its default, its --help text and, for some, the values it takes."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    """Every field is an option, --key value, described by its help text (python train.py --help)."""
    preset: str = option("demo", "starting values for the other options, listed below; those given override them")
    model: str = option("llama_tiny", "a key of model.CONFIGS")
    data_dir: str = option("data/demo", "holds train_*.bin and val_*.bin from prepare_c4.py")
    out_dir: str = option("out/demo", "checkpoints and metrics.jsonl")
    optimizer: str = option("sinkgd", "sinkgd: the paper's hybrid (SinkGD on block matrices, AdamW on the rest); "
                            "adamw: AdamW on all; muon: torch.optim.Muon on its matrices", ("sinkgd", "adamw", "muon"))
    lr: float = option(0.02, "global lr: AdamW's, and Muon's; the SinkGD matrices get alpha * lr")
    alpha: float = option(0.05, "SinkGD's share of the lr (paper: 0.05)")
    sinkhorn_iters: int = option(5, "L, SR-Sinkhorn's iterations per step (paper: 5)")
    muon_momentum: float = option(0.95, "Muon's momentum (torch's default), Nesterov")
    muon_adjust_lr: str = option("match_rms_adamw", "Muon's lr per matrix. match_rms_adamw: Moonlight's, --lr as "
                                 "AdamW's; original: Keller Jordan's and torch's default, lr near 0.02",
                                 ("match_rms_adamw", "original"))
    weight_decay: float = option(0.0, "decoupled, W <- (1 - lr wd) W, for every parameter (torch's Muon default: 0.1)")
    beta1: float = option(0.9, "AdamW's, for the embedding, norms and head")
    beta2: float = option(0.999, "AdamW's")
    adam_eps: float = option(1e-8, "AdamW's")
    grad_clip: float = option(0.0, "max global grad norm; 0 = off")
    max_bad_steps: int = option(0, "steps with a non-finite loss or gradient skipped (nothing updated, the data moves "
                                "on) in a run before one more stops it; 0: stop at the first")
    batch_size: int = option(512, "sequences per optimizer step, over all ranks")
    micro_batch_size: int = option(32, "sequences per forward and backward on a rank: the memory, not the result")
    seq_len: int = option(256, "tokens per sequence")
    max_steps: int = option(10_000, "optimizer steps; the schedule ends here")
    warmup_frac: float = option(0.1, "linear warmup over this fraction of max_steps, then cosine decay")
    min_lr_frac: float = option(0.1, "... to min_lr_frac * lr at max_steps")
    eval_interval: int = option(1000, "steps between validations (and one at the end)")
    eval_tokens: int = option(10_000_000, "the fixed validation budget: the first tokens of the val shards")
    log_interval: int = option(10, "steps between log lines")
    ckpt_interval: int = option(1000, "steps between checkpoints (and one at the end)")
    keep_checkpoints: int = option(3, "the newest this many are kept")
    resume: bool = option(False, "continue from the newest intact checkpoint in out_dir")
    seed: int = option(0, "for the initial weights and the data order")
    device: str = option("auto", "auto: cuda if present, else cpu")
    dtype: str = option("auto", "auto: bfloat16 on cuda, float32 on cpu", ("auto", "float32", "bfloat16"))
    compile: bool = option(False, "torch.compile the model")
    deepspeed_config: str = option("", "a DeepSpeed config file, e.g. ds_config.json; run under deepspeed or torchrun")
    local_rank: int = option(-1, "appended by the deepspeed launcher; LOCAL_RANK is read from the environment")


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


def build_parser(preset: str) -> ArgumentParser:
    """--key value (or --key=value) for every TrainConfig field, its default the preset's; a bool also as --key."""
    defaults = replace(TrainConfig(), **PRESETS[preset])
    presets = "\n".join(f"  {name}: {' '.join(f'{k}={v}' for k, v in p.items())}" for name, p in PRESETS.items())
    parser = ArgumentParser(description=__doc__, epilog=f"presets (--preset NAME applies first):\n{presets}",
                            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    for f in fields(TrainConfig):
        kind = dict(type=boolean, nargs="?", const=True, metavar="{true,false}") if f.type is bool else {"type": f.type}
        choices = f" (one of {', '.join(f.metadata['choices'])})" if f.metadata["choices"] else ""
        description = f"{f.metadata['help']}{choices} (default: {getattr(defaults, f.name)!r})".replace("%", "%%")
        parser.add_argument(f"--{f.name}", default=getattr(defaults, f.name), help=description, **kind,
                            **dict(choices=list(PRESETS)) if f.name == "preset" else {})
    return parser


def parse_config(argv: list[str]) -> TrainConfig:
    """The options given over the preset's values (TrainConfig's defaults, then PRESETS[--preset]); validated."""
    argv = list(argv)
    for i in reversed(range(1, len(argv))):  # argparse before Python 3.13 reads -1e-8 as an option's name
        if argv[i - 1].startswith("--") and "=" not in argv[i - 1] and re.fullmatch(r"-[\d.]+e[-+]?\d+", argv[i], re.I):
            argv[i - 1:i + 1] = [f"{argv[i - 1]}={argv[i]}"]
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
    if (model_cfg := CONFIGS.get(cfg.model)) is None:
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(CONFIGS)}")
    for f in fields(cfg):
        if (choices := f.metadata["choices"]) and getattr(cfg, f.name) not in choices:
            raise ConfigError(f"--{f.name} must be {', '.join(choices[:-1])} or {choices[-1]}, got "
                              f"{getattr(cfg, f.name)!r}")
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
    if cfg.max_bad_steps < 0 or cfg.muon_momentum < 0:
        raise ConfigError(f"--max_bad_steps and --muon_momentum must be >= 0, got {cfg.max_bad_steps} and "
                          f"{cfg.muon_momentum}")
    for name, holds, must in (("weight_decay", 0 <= cfg.weight_decay < math.inf, ">= 0 (as in torch's optimizers)"),
                              ("alpha", 0 < cfg.alpha < math.inf, "a positive number"),
                              ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
                              ("adam_eps", 0 <= cfg.adam_eps < math.inf, ">= 0"),
                              ("grad_clip", 0 <= cfg.grad_clip < math.inf, ">= 0 (0: off)"),
                              ("warmup_frac", 0 <= cfg.warmup_frac <= 1, "in [0, 1]"),
                              ("min_lr_frac", 0 <= cfg.min_lr_frac <= 1, "in [0, 1]")):
        if not holds:
            raise ConfigError(f"--{name} must be {must}, got {getattr(cfg, name)}")
    if Path(cfg.out_dir).resolve() == Path.cwd().resolve():
        raise ConfigError("--out_dir must not be the current directory: checkpoints are pruned there")


# --------------------------------------------------------------------------------------------------
# Optimizer and schedule, the one-process engine, evaluation and metrics.


class MuonAdamW(SinkGD):
    """torch.optim.Muon on the matrices SinkGD would get (the groups with sinkgd=True), its momentum buffers kept in
    this optimizer's state; SinkGD's fused AdamW on the rest. So one schedule, checkpoint and non-finite skip serve
    both. Muon takes no found_inf: a non-finite step is decided on the host before it, and skips everything."""

    def __init__(self, params, momentum: float = 0.95, adjust_lr_fn: str | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.muons = [torch.optim.Muon(group["params"], momentum=momentum, adjust_lr_fn=adjust_lr_fn)
                      if group["sinkgd"] else None for group in self.param_groups]

    def _sinkgd_update(self, group: dict, found_inf) -> None:
        if found_inf is not None and found_inf.item():
            return
        # paired by position: load_state_dict replaces the group dicts, so a key by id would not last
        muon = next(m for g, m in zip(self.param_groups, self.muons) if g is group)
        muon.param_groups[0].update(lr=group["lr"], weight_decay=group["weight_decay"])  # as the schedule set them
        muon.state = self.state  # its buffers saved and loaded with this optimizer's state
        muon.step()


def build_optimizer(cfg: TrainConfig, model: Llama, optimizer_class=SinkGD) -> SinkGD:
    """The paper's split (SinkGD on the block matrices, AdamW on the rest), AdamW on everything, or Muon on the
    split's matrices: torch's fused AdamW in each, and a non-finite step skipped by the same check (SinkGD.step)."""
    if cfg.optimizer == "adamw":
        groups = [dict(params=list(model.parameters()), sinkgd=False)]
    else:
        alpha = 1.0 if cfg.optimizer == "muon" else cfg.alpha
        groups = sinkgd_param_groups(model, model.model.layers, lr=cfg.lr, alpha=alpha, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "muon":
        optimizer_class = partial(MuonAdamW, momentum=cfg.muon_momentum, adjust_lr_fn=cfg.muon_adjust_lr)
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
    step(), which after a batch's last micro-batch clips, steps the optimizer and, unless it skipped a non-finite
    step (was_step_applied() says), the schedule. Checkpoints as zero.save and zero.resume DeepSpeed's."""

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

    def save(self, out_dir: Path, step: int, state: dict, keep: int) -> None:
        parts = {"model": self.module, "optimizer": self.optimizer, "scheduler": self.scheduler}
        checkpoint.save(out_dir, step, state | {k: part.state_dict() for k, part in parts.items()}, keep)

    def resume(self, out_dir: Path) -> dict | None:
        if (state := checkpoint.load_latest(out_dir)) is not None:
            for part, key in ((self.module, "model"), (self.optimizer, "optimizer"), (self.scheduler, "scheduler")):
                part.load_state_dict(state[key])
        return state


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
    statm = Path("/proc/self/statm")
    rss = int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20 if statm.exists() else None
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
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    if cfg.deepspeed_config:
        # missing, malformed or not for this optimizer: one line, before DeepSpeed starts
        ds_config = zero.read_config(cfg.deepspeed_config, cfg.optimizer, bf16)
        zero.init_distributed(device.type)
        device = zero.local_rank_device(device.type)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    validate(cfg, world_size)
    main_rank = rank == 0
    # float32 matmuls stay at torch's "highest", never TF32, so that SinkGD's (outside autocast) are exact Alg. 3.
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
    # the split before ZeRO swaps the groups' tensors for partitions
    split = describe_split(model, optimizer.param_groups, "Muon" if cfg.optimizer == "muon" else "SinkGD")
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
    metrics_path, tokens_per_step = out_dir / "metrics.jsonl", cfg.batch_size * cfg.seq_len
    peak_flops = world_size * peak_bf16_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "")
    if main_rank:
        checkpoint.truncate_log(metrics_path, step)
        if cfg.resume:
            print(f"resumed from step {step}" if resumed else f"no checkpoint in {out_dir}: starting afresh")
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
        if result and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"final validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}")
    except (ConfigError, zero.ConfigFileError, prepare_c4.ShardError, checkpoint.CheckpointError, FileNotFoundError,
            FloatingPointError, OSError) as e:
        sys.exit(f"error: {e}")
    finally:  # on errors too: gloo's threads torn down by the interpreter at exit can abort the process
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
