"""Checkpoints that survive kill -9, a full disk and a torn write, and load as data only.

A file is written under a temporary name, fsynced and renamed, so a crash leaves the old file or the whole new one
(prepare_c4.py writes its shards the same way). A DeepSpeed checkpoint is a directory that every rank writes into;
it counts only once rank 0 has written its manifest (the sha256 of every file) after all ranks have finished.
"""
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def write_atomically(path: Path, write) -> None:
    """write(f) into path's temporary twin, fsync, rename over path, fsync the directory (so the rename itself is
    durable). On an error the twin is removed."""
    path = Path(path)
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
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: Path, error: Exception) -> str:
    """One line on a failed checkpoint write, with the free space: a full disk is the usual cause."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
    free_mib = shutil.disk_usage(path.parent).free / 2**20
    return (f"could not write checkpoint {path} ({reason}; {free_mib:.0f} MiB free there); earlier checkpoints are "
            "intact")


def truncate_log(path: Path, step: int) -> None:
    """Keep the JSON lines of `path` up to `step` (the one resumed from; 0: none), dropping lines a crash cut short:
    what the lost steps logged goes, and the resumed run logs them again."""
    kept = []
    for line in path.read_text().splitlines() if step and path.exists() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except ValueError:
            pass
    write_atomically(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


# --------------------------------------------------------------------------------------------------
# One process: out_dir/ckpt_XXXXXXXX.pt, a dict of tensors and plain values.


def checkpoint_paths(out_dir: Path) -> list[Path]:
    return sorted(Path(out_dir).glob("ckpt_*.pt"))


def save(out_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write the checkpoint of `step`, then prune to the newest `keep` (and any .tmp left by a killed save)."""
    path = Path(out_dir) / f"ckpt_{step:08d}.pt"
    try:
        write_atomically(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise OSError(write_error(path, e)) from e
    for old in checkpoint_paths(out_dir)[:-keep] + list(Path(out_dir).glob("ckpt_*.pt.tmp")):
        old.unlink()
    return path


def load_latest(out_dir: Path) -> dict | None:
    """The newest readable checkpoint, reporting the unreadable ones; None if there is none."""
    paths = checkpoint_paths(out_dir)
    for path in reversed(paths):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt file: say so, fall back to the one before
            print(f"warning: skipping unreadable checkpoint {path}: {e}", file=sys.stderr)
    if paths:  # starting afresh would overwrite them
        raise CheckpointError(f"none of the {len(paths)} checkpoints in {out_dir} can be read; move them elsewhere "
                              "to start afresh")
    return None


# --------------------------------------------------------------------------------------------------
# DeepSpeed: out_dir/step_XXXXXXXX/ written by every rank, committed by rank 0's manifest.


def durable_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # DeepSpeed does not fsync what it writes
        return hashlib.file_digest(f, "sha256").hexdigest()


def commit_deepspeed(tag_dir: Path, keep: int) -> None:
    """Rank 0, once every rank has written tag_dir: the manifest makes it resumable; then DeepSpeed's `latest` (read
    by its own tools, e.g. zero_to_fp32.py) and pruning to the newest `keep` committed checkpoints."""
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
    """The newest step_* directory whose files all match its manifest; the others are reported. None if no save
    ever finished; an error if some did but none is intact, as starting afresh would overwrite them."""
    committed = 0
    for tag_dir in sorted(Path(out_dir).glob("step_*"), reverse=True):
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
        raise CheckpointError(f"none of the {committed} checkpoints in {out_dir} is intact; move them elsewhere to "
                              "start afresh")
    return None


# --------------------------------------------------------------------------------------------------
# RNG state, as tensors and plain Python values, so a checkpoint holding it loads with weights_only=True.


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                       "gauss": gauss}}
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
