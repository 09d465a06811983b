"""Pretrain a LLaMA on C4 token shards with SinkGD (or AdamW, the baseline).

    python train.py                                        # offline demo: tiny LLaMA, CPython docstrings
    python train.py --preset llama_60m --data_dir data/c4  # the paper's 60M recipe on one GPU
    python train.py --preset llama_60m --optimizer adamw --lr 1e-3
    python train.py --out_dir out/demo --resume            # continue from the newest intact checkpoint
    deepspeed --num_gpus 8 train.py --preset llama_1b --deepspeed_config ds_config.json

Options are the fields of TrainConfig, given as --key value; --preset picks a starting point.
"""
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import prepare_c4
from model import CONFIGS, Llama
from sinkgd import FlatLayout, SinkGD, grads_finite, sinkgd_param_groups


@dataclass
class TrainConfig:
    preset: str = "demo"
    model: str = "llama_tiny"  # a key of model.CONFIGS
    data_dir: str = "data/demo"  # holds train_*.bin and val_*.bin from prepare_c4.py
    out_dir: str = "out/demo"
    # optimizer: the paper's hybrid (SinkGD on block matrices, AdamW on the rest), or plain AdamW
    optimizer: str = "sinkgd"
    lr: float = 0.02  # global lr: AdamW's; the SinkGD matrices get alpha * lr
    alpha: float = 0.05
    sinkhorn_iters: int = 5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    # a step whose loss or gradient is not finite is skipped (no weight, optimizer or schedule update; the
    # data moves on) up to this many times in a run; one more stops the run. 0: stop at the first.
    max_bad_steps: int = 0
    # batch: batch_size sequences of seq_len tokens per step, as micro-batches x accumulation
    batch_size: int = 512
    micro_batch_size: int = 32
    seq_len: int = 256
    # schedule: linear warmup, then cosine decay to min_lr_frac * lr at max_steps
    max_steps: int = 10_000
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.1
    # evaluation, logging and checkpoints (every *_interval steps, and at the end)
    eval_interval: int = 1000
    eval_tokens: int = 10_000_000  # the fixed validation budget: the first tokens of the val shards
    log_interval: int = 10
    ckpt_interval: int = 1000
    keep_checkpoints: int = 3
    resume: bool = False
    seed: int = 0
    device: str = "auto"  # auto: cuda if present, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on cuda, float32 on cpu
    compile: bool = False
    # DeepSpeed: set by `deepspeed train.py --deepspeed_config ds_config.json` (or torchrun)
    deepspeed_config: str = ""
    local_rank: int = -1  # appended by the deepspeed launcher; LOCAL_RANK is read from the environment


PRESETS = {
    # A few minutes on a laptop CPU, on text every Python install carries.
    "demo": dict(model="llama_tiny", data_dir="data/demo", out_dir="out/demo", batch_size=16,
                 micro_batch_size=16, seq_len=128, max_steps=200, eval_interval=100,
                 eval_tokens=64 * 129, log_interval=10, ckpt_interval=100),
    # The paper's recipe (Zhao et al. 2024 benchmark): 512 x 256 tokens per step.
    "llama_60m": dict(model="llama_60m", max_steps=10_000, micro_batch_size=128),
    "llama_130m": dict(model="llama_130m", max_steps=20_000, micro_batch_size=64),
    "llama_350m": dict(model="llama_350m", max_steps=60_000, micro_batch_size=64),
    "llama_1b": dict(model="llama_1b", max_steps=100_000, micro_batch_size=32),
}
for _name in CONFIGS:  # tiny sizes and the benchmark sizes, each under its own out_dir
    PRESETS.setdefault(_name, dict(model=_name))
for _name, _preset in PRESETS.items():
    _preset.setdefault("data_dir", "data/c4")
    _preset.setdefault("out_dir", f"out/{_name}")


class ConfigError(ValueError):
    pass


def parse_config(argv: list[str]) -> TrainConfig:
    """--key value (or --key=value) for every TrainConfig field; --preset applies first."""
    pairs = {}
    args = list(argv)
    types = {f.name: f.type.__name__ for f in fields(TrainConfig)}
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options are --key value")
        key, equals, value = arg[2:].partition("=")
        if equals and not value:
            raise ConfigError(f"--{key}= needs a value")
        if key not in types:
            raise ConfigError(f"unknown option --{key}; valid options: {', '.join('--' + k for k in types)}")
        if not value:
            flag = types[key] == "bool" and (not args or args[0].startswith("--"))
            value = "true" if flag else (args.pop(0) if args else "")
        pairs[key] = value
    preset = pairs.pop("preset", TrainConfig.preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = replace(TrainConfig(), preset=preset, **PRESETS[preset])
    for key, value in pairs.items():
        cfg = replace(cfg, **{key: _convert(key, value, types[key])})
    validate(cfg)
    return cfg


def _convert(key: str, value: str, type_name: str):
    try:
        if type_name == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        return {"int": int, "float": float, "str": str}[type_name](value)
    except ValueError:
        raise ConfigError(f"--{key} expects a {type_name}, got {value!r}") from None


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    model_cfg = CONFIGS.get(cfg.model)
    if model_cfg is None:
        raise ConfigError(f"unknown model {cfg.model!r}; choose one of {', '.join(CONFIGS)}")
    if cfg.optimizer not in ("sinkgd", "adamw"):
        raise ConfigError(f"--optimizer must be sinkgd or adamw, got {cfg.optimizer!r}")
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
# Data: memmapped token shards, cut into disjoint (seq_len + 1)-token windows.


class TokenLoader:
    """Shuffled windows of seq_len + 1 tokens from the train shards, epoch after epoch.

    The order is a permutation seeded by (seed, epoch), so a run is reproducible and its position is two
    integers. Each global batch is the next batch_size windows; rank r of world_size takes its own
    contiguous share of them, so ranks never see the same window in a step."""

    def __init__(self, shards: list[np.ndarray], seq_len: int, seed: int, rank: int = 0, world_size: int = 1):
        self.shards, self.window, self.seed = shards, seq_len + 1, seed
        self.rank, self.world_size = rank, world_size
        counts = [len(s) // self.window for s in shards]
        self.first_window = np.cumsum([0] + counts)  # window index where each shard starts
        if self.first_window[-1] == 0:
            raise prepare_c4.ShardError(f"train shards hold fewer than {self.window} tokens")
        self.epoch, self.position = 0, 0
        self._order = None

    def order(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(int(self.first_window[-1]))
        return self._order

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the next global batch: (inputs, targets), each (batch/world, seq_len).
        A batch never spans two epochs (the last partial batch of an epoch is dropped), so no window
        appears twice in it."""
        if batch_size > len(self.order()):
            raise prepare_c4.ShardError(f"train shards hold {len(self.order())} windows of {self.window} "
                                        f"tokens, fewer than one batch of {batch_size}")
        if self.position + batch_size > len(self.order()):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        picked = self.order()[self.position:self.position + batch_size]
        self.position += batch_size
        per_rank = batch_size // self.world_size
        rows = [self.read_window(w) for w in picked[self.rank * per_rank:(self.rank + 1) * per_rank]]
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        return tokens[:, :-1], tokens[:, 1:]

    def read_window(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.first_window, index, side="right")) - 1
        start = (index - self.first_window[shard]) * self.window
        return self.shards[shard][start:start + self.window]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


def validation_windows(shards: list[np.ndarray], seq_len: int, budget: int) -> np.ndarray:
    """The first `budget` tokens of the val shards as (seq_len + 1)-token windows, in order."""
    window = seq_len + 1
    rows = [s[i:i + window] for s in shards for i in range(0, len(s) - window + 1, window)]
    rows = rows[:max(1, budget // window)]
    if not rows:
        raise prepare_c4.ShardError(f"val shards hold fewer than {window} tokens")
    return np.stack(rows).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Model, optimizer, schedule.


def build_optimizer(cfg: TrainConfig, model: Llama) -> torch.optim.Optimizer:
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=betas, eps=cfg.adam_eps,
                                 weight_decay=cfg.weight_decay)
    groups = sinkgd_param_groups(model, model.model.layers, lr=cfg.lr, alpha=cfg.alpha,
                                 weight_decay=cfg.weight_decay)
    return SinkGD(groups, lr=cfg.lr, sinkhorn_iters=cfg.sinkhorn_iters, betas=betas, eps=cfg.adam_eps)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over warmup_frac of the steps, then cosine from 1 to min_lr_frac."""
    warmup = int(cfg.warmup_frac * cfg.max_steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.max_steps - warmup)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# --------------------------------------------------------------------------------------------------
# DeepSpeed. Under ZeRO 1-3 the client optimizer steps flat fp32 partitions cut at arbitrary element
# offsets; SinkGD needs to know which matrix elements each holds (see sinkgd.FlatLayout).


def init_distributed(device_type: str) -> None:
    import deepspeed
    import deepspeed.ops
    if device_type == "cpu":  # skip building the unused shared-memory comm op (~30 s per start)
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")


def deepspeed_engine(cfg: TrainConfig, model, optimizer, scheduler, use_bf16: bool):
    import deepspeed
    with open(cfg.deepspeed_config) as f:
        ds_config = json.load(f)
    world_size = dist.get_world_size()
    ds_config |= {  # one config file for every size: the batch and precision come from train.py
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.batch_size // (cfg.micro_batch_size * world_size),
        "gradient_clipping": cfg.grad_clip,  # explicit: DeepSpeed 0.19.8 clips at 1.0 when absent
        "bf16": {"enabled": use_bf16},
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if isinstance(optimizer, SinkGD):
        optimizer.flat_layouts = zero_flat_layouts(engine)
    if engine.optimizer is optimizer:  # stage 0 in fp32: no DeepSpeed optimizer wrapper checks the gradient
        skip_nonfinite_steps(optimizer)
    engine.checkpoint_engine.load = load_deepspeed_file
    return engine


def skip_nonfinite_steps(optimizer: torch.optim.Optimizer) -> None:
    """Make optimizer.step a no-op on a non-finite gradient and set optimizer.overflow, as DeepSpeed's ZeRO
    and bf16 optimizers do; the engine then skips the lr schedule too and was_step_applied() is False."""
    step = optimizer.step

    def step_if_finite(*args, **kwargs):
        optimizer.overflow = not grads_finite(p for group in optimizer.param_groups for p in group["params"])
        if not optimizer.overflow:
            return step(*args, **kwargs)
    optimizer.step = step_if_finite


def load_deepspeed_file(path: str, map_location=None):
    """DeepSpeed 0.19.8 loads its checkpoint files with torch.load(weights_only=False), which runs whatever
    code a crafted file holds. Load them as data instead, allowing only the DeepSpeed classes they contain."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def zero_flat_layouts(engine) -> dict[int, FlatLayout]:
    """id(flat fp32 partition) -> the matrix elements it holds, for the groups of 2-D params.

    Reads DeepSpeed 0.19.8's ZeRO optimizer attributes; tests/test_deepspeed.py checks the result
    against single-process training at every stage."""
    zo, stage, layouts = engine.optimizer, engine.zero_optimization_stage(), {}
    if stage in (1, 2):
        # Each group's params are flattened end to end in round-robin order (exact offsets kept by
        # DeepSpeed); rank r holds elements [r * size, (r + 1) * size) of that buffer.
        for g, flat in enumerate(zo.single_partition_of_fp32_groups):
            size = int(zo.partition_size[g])
            lo = dist.get_rank(group=zo.real_dp_process_group[g]) * size
            matrices = []
            for meta, offset in zip(zo.round_robin_bit16_meta[g], zo.round_robin_bit16_offsets[g]):
                start, end = max(lo, offset), min(lo + size, offset + meta.numel())
                held = max(end - start, 0)
                matrices.append((tuple(meta.shape), start - offset if held else 0, start - lo if held else 0, held))
            layouts[id(flat)] = FlatLayout(matrices, zo.real_dp_process_group[g])
    elif stage == 3:
        # Every param is split evenly over the ranks (rank r holds [r * k, (r + 1) * k) of it) and a
        # sub-group's flat partition is the concatenation of its params' pieces, k elements each.
        for g, params in enumerate(zo.fp16_groups):
            group = zo.sub_group_process_groups[g]
            offset, matrices = 0, []
            for p in params:
                per_rank = p.partition_numel()
                start = dist.get_rank(group=group) * per_rank
                held = max(0, min(per_rank, p.ds_numel - start))
                matrices.append((tuple(p.ds_shape), start if held else 0, offset, held))
                offset += per_rank
            layouts[id(zo.fp32_partitioned_groups_flat[g])] = FlatLayout(matrices, group)
    return {key: layout for key, layout in layouts.items() if all(len(s) == 2 for s, *_ in layout.matrices)}


# --------------------------------------------------------------------------------------------------
# Checkpoints. A file is written under a temporary name, fsynced and renamed, so a crash leaves the old
# file or the whole new one. A DeepSpeed checkpoint is a directory that every rank writes into; it counts
# only once rank 0 has written its manifest (the sha256 of every file), after all ranks have finished.


def fsync_dir(path: Path) -> None:
    """Make renames and deletions in a directory durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write) -> None:
    """write(f) into path's temporary twin, fsync, rename over path. On an error the twin is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_error(path: Path, error: Exception) -> str:
    """One line on a failed checkpoint write, with the free space: a full disk is the usual cause."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    free_mib = shutil.disk_usage(path.parent).free / 2**20
    return (f"could not write checkpoint {path} ({reason}; {free_mib:.0f} MiB free there); "
            "earlier checkpoints are intact")


def checkpoint_paths(out_dir: Path) -> list[Path]:
    return sorted(out_dir.glob("ckpt_*.pt"))


def save_checkpoint(out_dir: Path, step: int, state: dict, keep: int) -> Path:
    path = out_dir / f"ckpt_{step:08d}.pt"
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise OSError(write_error(path, e)) from e
    for old in checkpoint_paths(out_dir)[:-keep] + list(out_dir.glob("ckpt_*.pt.tmp")):  # .tmp: a killed save
        old.unlink()
    return path


def load_latest_checkpoint(out_dir: Path) -> dict | None:
    paths = checkpoint_paths(out_dir)
    for path in reversed(paths):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file: say so, fall back to the one before
            print(f"warning: skipping unreadable checkpoint {path}: {e}", file=sys.stderr)
    if paths:  # starting afresh would overwrite them
        raise ConfigError(f"none of the {len(paths)} checkpoints in {out_dir} can be read; move them elsewhere "
                          "to start afresh")
    return None


MANIFEST = "manifest.json"


def durable_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # DeepSpeed does not fsync what it writes
        return hashlib.file_digest(f, "sha256").hexdigest()


def commit_deepspeed_checkpoint(tag_dir: Path, keep: int) -> None:
    """Rank 0, once every rank has written tag_dir: the manifest makes it resumable; then DeepSpeed's `latest`
    (read by its own tools, e.g. zero_to_fp32.py) and pruning to the newest `keep` committed checkpoints."""
    digests = {p.name: durable_sha256(p) for p in sorted(tag_dir.iterdir()) if p.name != MANIFEST}
    write_atomically(tag_dir / MANIFEST, lambda f: f.write(json.dumps(digests, indent=1).encode()))
    write_atomically(tag_dir.parent / "latest", lambda f: f.write(tag_dir.name.encode()))
    committed = [d.name for d in sorted(tag_dir.parent.glob("step_*")) if (d / MANIFEST).exists()]
    oldest_kept = committed[-keep:][0]
    for old in sorted(tag_dir.parent.glob("step_*")):
        if old.name < oldest_kept:
            (old / MANIFEST).unlink(missing_ok=True)  # first, so a deletion cut short leaves no complete-looking tag
            shutil.rmtree(old)


def newest_intact_deepspeed_tag(out_dir: Path) -> str | None:
    """The newest step_* directory whose files all match its manifest; the others are reported. None if no
    save ever finished; an error if some did but none is intact, as starting afresh would overwrite them."""
    committed = 0
    for tag_dir in sorted(out_dir.glob("step_*"), reverse=True):
        if not (tag_dir / MANIFEST).exists():
            print(f"warning: skipping incomplete checkpoint {tag_dir} (its save did not finish)", file=sys.stderr)
            continue
        committed += 1
        try:
            expected = json.loads((tag_dir / MANIFEST).read_text())
            damaged = [name for name, digest in expected.items() if durable_sha256(tag_dir / name) != digest]
            if not damaged:
                return tag_dir.name
            problem = f"{', '.join(damaged)} differ from {MANIFEST}"
        except (OSError, ValueError) as e:
            problem = str(e)
        print(f"warning: skipping corrupt checkpoint {tag_dir}: {problem}", file=sys.stderr)
    if committed:
        raise ConfigError(f"none of the {committed} checkpoints in {out_dir} is intact; move them elsewhere to "
                          "start afresh")
    return None


def rng_state() -> dict:
    """Every RNG, as tensors and plain Python values, so the checkpoint loads with weights_only=True."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------
# Training.


def memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS, KiB on Linux


def rss_mib() -> float | None:
    """Resident memory now (the peak alone cannot show slow growth over a long run); None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def all_ranks_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(model, windows: np.ndarray, micro_batch_size: int, device, autocast) -> float:
    """Mean next-token loss over the fixed validation windows, the batches dealt out over the ranks."""
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, token count
    num_batches = math.ceil(len(windows) / micro_batch_size)
    for k in range(rank, math.ceil(num_batches / world) * world, world):
        # a rank past the last batch still runs one forward: under ZeRO-3 every forward is collective
        batch = torch.from_numpy(windows[k * micro_batch_size:(k + 1) * micro_batch_size] if k < num_batches
                                 else windows[:1]).to(device)
        with autocast:
            _, loss = model(batch[:, :-1], batch[:, 1:])
        if k < num_batches:
            total += torch.tensor([loss.item() * batch[:, 1:].numel(), batch[:, 1:].numel()], device=device)
    model.train()
    loss_sum, count = all_ranks_sum(total).tolist()
    return loss_sum / count


def open_data(cfg: TrainConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    data_dir = Path(cfg.data_dir)
    if cfg.preset == "demo" and not list(data_dir.glob("train_*.bin")):
        print(f"building the demo corpus in {data_dir} (once)")
        prepare_c4.prepare_demo(data_dir)
    return ([prepare_c4.open_shard(p) for p in prepare_c4.shard_paths(data_dir, "train")],
            [prepare_c4.open_shard(p) for p in prepare_c4.shard_paths(data_dir, "val")])


def train(cfg: TrainConfig) -> dict:
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    use_deepspeed = bool(cfg.deepspeed_config)
    if use_deepspeed:
        init_distributed(device.type)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if use_deepspeed else (0, 1)
    validate(cfg, world_size)
    main_rank = rank == 0
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    # DeepSpeed casts the model to bf16 itself; a single device uses autocast.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16 and not use_deepspeed)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    if not cfg.resume and (checkpoint_paths(out_dir) or list(out_dir.glob("step_*"))):
        raise ConfigError(f"{out_dir} holds the checkpoints of an earlier run: pass --resume to continue it, "
                          "or choose another --out_dir")

    if main_rank or not use_deepspeed:
        train_shards, val_shards = open_data(cfg)  # rank 0 builds the demo shards if missing
    if use_deepspeed:
        dist.barrier()
        train_shards, val_shards = open_data(cfg)
    loader = TokenLoader(train_shards, cfg.seq_len, cfg.seed, rank, world_size)
    val_windows = validation_windows(val_shards, cfg.seq_len, cfg.eval_tokens)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = Llama(CONFIGS[cfg.model]).to(device)
    n_params = model.num_params()
    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
    engine = deepspeed_engine(cfg, model, optimizer, scheduler, use_bf16) if use_deepspeed else None
    resumed = None
    if cfg.resume and engine is not None:
        tag = [newest_intact_deepspeed_tag(out_dir) if main_rank else None]
        dist.broadcast_object_list(tag, src=0)  # every rank loads the tag that rank 0 verified
        if tag[0] is not None:
            _, resumed = engine.load_checkpoint(str(out_dir), tag=tag[0])
    elif cfg.resume:
        resumed = load_latest_checkpoint(out_dir)
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
    # nonfinite_steps: the steps skipped for a non-finite loss or gradient (DeepSpeed's checkpoints already
    # hold a "skipped_steps" of their own)
    step, nonfinite_steps = 0, []
    if resumed is not None:
        loader.load_state_dict(resumed["loader"])
        set_rng_state(resumed["rng"])
        step, nonfinite_steps = resumed["step"], resumed["nonfinite_steps"]
    if main_rank and cfg.resume:
        print(f"resumed from step {step}" if resumed is not None else f"no checkpoint in {out_dir}: starting afresh")
    forward = engine if engine is not None else torch.compile(model) if cfg.compile else model

    metrics_path = out_dir / "metrics.jsonl"
    if main_rank:  # keep what was logged up to the resumed step, drop what the lost steps logged
        kept = []
        for line in metrics_path.read_text().splitlines() if resumed is not None and metrics_path.exists() else []:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except ValueError:  # a line cut short by a crash
                pass
        write_atomically(metrics_path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
    accumulation = cfg.batch_size // (cfg.micro_batch_size * world_size)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    if main_rank:
        print(f"{cfg.model}: {n_params / 1e6:.1f}M params | {cfg.optimizer} | {tokens_per_step} tokens/step "
              f"({cfg.micro_batch_size} x {accumulation} x {world_size} x {cfg.seq_len}) | {device}"
              f"{' bf16' if use_bf16 else ''}{' | deepspeed' if engine is not None else ''}")

    def log(record: dict) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in record.items() if k != "time"), flush=True)

    def save(step: int) -> None:
        state = {"loader": loader.state_dict(), "rng": rng_state(), "step": step, "nonfinite_steps": nonfinite_steps,
                 "config": asdict(cfg)}
        if engine is not None:  # DeepSpeed saves the model, optimizer and schedule; state rides along
            tag_dir = out_dir / f"step_{step:08d}"
            if main_rank:  # saving a tag again (after a resume from an older one): incomplete until committed
                (tag_dir / MANIFEST).unlink(missing_ok=True)
            try:
                engine.save_checkpoint(str(out_dir), tag=tag_dir.name, client_state=state, save_latest=False)
            except (OSError, RuntimeError) as e:  # torch reports a failed write to a path as a RuntimeError
                raise OSError(write_error(tag_dir, e)) from e
            if main_rank:
                commit_deepspeed_checkpoint(tag_dir, cfg.keep_checkpoints)
            dist.barrier()
        else:
            state |= {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict()}
            save_checkpoint(out_dir, step, state, cfg.keep_checkpoints)

    result = {}
    t_last, tokens_since = time.perf_counter(), 0
    while step < cfg.max_steps:
        lr = optimizer.param_groups[-1]["lr"]
        loss_sum = torch.zeros((), device=device)
        for micro in range(accumulation):
            inputs, targets = (t.to(device) for t in loader.next_batch(cfg.micro_batch_size * world_size))
            with autocast:
                _, loss = forward(inputs, targets)
            loss_sum += loss.detach().float() / accumulation
            if micro == accumulation - 1:  # before the backward that ends in an optimizer step
                loss_sum = all_ranks_sum(loss_sum) / world_size
                loss_is_finite = math.isfinite(loss_sum.item())
                if engine is not None and not loss_is_finite:
                    loss = loss * math.nan  # a non-finite gradient: DeepSpeed skips the step on every rank
            if engine is not None:
                engine.backward(loss)
                engine.step()  # DeepSpeed steps the optimizer and schedule after the last micro-batch
            else:
                (loss / accumulation).backward()
        if engine is None:
            step_applied = loss_is_finite and bool(grads_finite(model.parameters()))
            if step_applied:
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            step_applied = engine.was_step_applied()
        step += 1
        tokens_since += tokens_per_step

        record = None
        if not step_applied:
            nonfinite_steps.append(step)
            problem = f"non-finite {'loss' if not loss_is_finite else 'gradient'} at step {step}"
            if len(nonfinite_steps) > cfg.max_bad_steps:
                raise FloatingPointError(f"{problem} ({len(nonfinite_steps)} such step(s), --max_bad_steps "
                                         f"{cfg.max_bad_steps}); weights not updated and the last checkpoint is "
                                         "intact: resume from it with a lower --lr")
            record = {"step": step, "skipped": problem, "nonfinite_steps": len(nonfinite_steps)}
        elif step % cfg.log_interval == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - t_last
            record = {"step": step, "train_loss": loss_sum.item(), "lr": lr,
                      "tokens_per_sec": tokens_since / elapsed, "memory_mib": memory_mib(device),
                      "rss_mib": rss_mib(), "time": time.time()}
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val_loss = evaluate(forward, val_windows, cfg.micro_batch_size, device, autocast)
            record = (record or {"step": step}) | {"val_loss": val_loss, "val_ppl": math.exp(val_loss)}
            result = record
        if record is not None and main_rank:
            log(record)
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps:
            save(step)
        if record is not None and "tokens_per_sec" in record:  # restart the clock after eval and save
            t_last, tokens_since = time.perf_counter(), 0
    return result


def main(argv=None) -> None:
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
        result = train(cfg)
    except (ConfigError, prepare_c4.ShardError, FileNotFoundError, FloatingPointError, OSError) as e:
        sys.exit(f"error: {e}")
    if result and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"final validation loss {result['val_loss']:.4f}, perplexity {result['val_ppl']:.2f}")


if __name__ == "__main__":
    main()
