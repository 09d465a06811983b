"""train.py's DeepSpeed glue: the config file, the process group, the engine, checkpoints. SinkGD's ZeRO math is in
sinkgd_zero.py."""
import json
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

import checkpoint
from sinkgd_zero import ZeroSinkGD, check_config


class ConfigFileError(ValueError):
    """A --deepspeed_config that is missing or not a JSON object."""


def read_config(path: str, optimizer: str = "sinkgd", bf16: bool = False) -> dict:
    """The DeepSpeed config file, as a dict; refused for what `optimizer` cannot follow under it."""
    fix = "start from ds_config.json in this repository"
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise ConfigFileError(f"--deepspeed_config {path}: no such file; {fix}") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not text
        raise ConfigFileError(f"--deepspeed_config {path} is not valid JSON ({e}); fix it or {fix}") from None
    if not isinstance(config, dict):
        raise ConfigFileError(f"--deepspeed_config {path} holds a JSON {type(config).__name__}, not an object; {fix}")
    try:
        check_config(config)
    except ValueError as e:  # before DeepSpeed starts, which on some of these would stop with a traceback
        raise ConfigFileError(f"--deepspeed_config {path}: {e}") from None
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if optimizer == "muon" and (stage or bf16):  # DeepSpeed would hand Muon flat tensors
        raise ConfigFileError(f"--optimizer muon needs whole matrices, which DeepSpeed gives an optimizer only at "
                              f"ZeRO stage 0 in float32 (here: stage {stage}{', bf16' if bf16 else ''}): use stage 0 "
                              "with --dtype float32, or one process without --deepspeed_config")
    return config


# Set by torchrun and the deepspeed launcher; by mpirun (for DeepSpeed's MPI discovery) the last two.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def init_distributed(device_type: str) -> None:
    """The process group of the launcher's ranks; without a launcher (`python train.py --deepspeed_config ...`), one
    rank, as torchrun would start it, where DeepSpeed alone would look for MPI. Port 0: the only rank picks a free
    one, so two such runs cannot collide."""
    import deepspeed
    import deepspeed.ops
    if not any(name in os.environ for name in LAUNCHER_VARIABLES):
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
        print("no launcher: DeepSpeed runs as one rank (start several with `deepspeed --num_gpus N train.py ...`)")
    if device_type == "cpu":  # skip building the unused shared-memory comm op (~30 s per start)
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")


def initialize(config: dict, model, optimizer, scheduler, *, batch_size: int, micro_batch_size: int,
               grad_clip: float, bf16: bool, compile: bool = False):
    """deepspeed.initialize on the config file's contents (read_config), with the batch, clipping and precision set
    from train.py's options (one file serves every model size), and the engine's torch.compile if asked."""
    import deepspeed
    config = config | {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": batch_size // (micro_batch_size * dist.get_world_size()),
        "gradient_clipping": grad_clip,  # explicit: DeepSpeed 0.19.8 clips at 1.0 when the key is absent
        "bf16": config.get("bf16", {}) | {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        # With offload_optimizer DeepSpeed wants its own CPU Adam; SinkGD's matrices have no state to offload, and its
        # AdamW groups run torch's AdamW where the partition is (the CPU).
        "zero_force_ds_cpu_optimizer": False,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if isinstance(optimizer, ZeroSinkGD):
        optimizer.attach(engine)
    engine.checkpoint_engine.load = load_deepspeed_file
    engine.files_saved = record_saves(engine.checkpoint_engine)
    if compile:
        engine.compile()
    return engine


def load_deepspeed_file(path: str, map_location=None):
    """DeepSpeed 0.19.8 loads its checkpoint files with torch.load(weights_only=False), which runs whatever code a
    crafted file holds. Load them as data instead, allowing only the DeepSpeed classes they contain."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        what = next((line for line in str(e).splitlines() if "GLOBAL" in line), type(e).__name__)
        raise checkpoint.CheckpointError(f"{path} holds more than tensors and DeepSpeed's own data ({what}); not "
                                         "loaded, as that could run code: resume from a checkpoint you trust") from None


def save(engine, out_dir: Path, step: int, state: dict, keep: int) -> None:
    """Every rank writes its part of step_XXXXXXXX/ through DeepSpeed (model, optimizer, schedule; `state` rides
    along) and vouches for it; once all have, the tag is committed on each copy of out_dir."""
    tag_dir = Path(out_dir) / f"step_{step:08d}"
    rank, node_local = dist.get_rank(), engine.use_node_local_storage()
    # A tag saved again (after a resume from an older one) is incomplete until every rank has vouched for it anew.
    (tag_dir / checkpoint.manifest_name(rank)).unlink(missing_ok=True)
    engine.files_saved.clear()
    try:
        engine.save_checkpoint(str(out_dir), tag=tag_dir.name, client_state=state, save_latest=False)
        checkpoint.vouch_for(tag_dir, engine.files_saved, rank, dist.get_world_size(), node_local)
    except (OSError, RuntimeError) as e:  # torch reports a failed write to a path as a RuntimeError
        raise OSError(checkpoint.write_error(tag_dir, e)) from e
    dist.barrier()
    if (engine.local_rank if node_local else rank) == 0:
        checkpoint.commit_deepspeed(tag_dir, rank, keep)
    dist.barrier()


def resume(engine, out_dir: Path) -> dict | None:
    """Load the newest checkpoint whose parts every rank finds intact (each checks its own files, where they are);
    its client state, or None."""
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, checkpoint.own_parts(out_dir, dist.get_rank()))
    tag = checkpoint.agreed_deepspeed_tag(found, out_dir, dist.get_world_size(), engine.use_node_local_storage(),
                                          report=dist.get_rank() == 0)
    if tag is None:
        return None
    return engine.load_checkpoint(str(out_dir), tag=tag)[1]


def record_saves(checkpoint_engine) -> list[Path]:
    """The list of paths that DeepSpeed's checkpoint engine writes from now on in this process, filled as it goes:
    what this rank vouches for (DeepSpeed decides which files each rank writes, e.g. the model states on each node
    with node-local storage)."""
    paths, save = [], checkpoint_engine.save

    def save_and_record(state_dict, path):
        save(state_dict, path)
        paths.append(Path(path))
    checkpoint_engine.save = save_and_record
    return paths


def local_rank_device(device_type: str) -> torch.device:
    if device_type != "cuda":
        return torch.device(device_type)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device
