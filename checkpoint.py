"""Checkpoints that survive kill -9, a full disk and a torn write, and load as data only.

A file is written under a temporary name, fsynced and renamed, so a crash leaves the old file or the whole new one
(prepare_c4.py writes its shards the same way). A DeepSpeed checkpoint is a directory that every rank writes into;
each rank lists the sha256 of its own files in its own manifest, and a resume takes the newest checkpoint whose
every part is intact.
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
# DeepSpeed: out_dir/step_XXXXXXXX/, written by every rank. Each rank vouches for the files it wrote with its own
# manifest, so a checkpoint is checked where its files are, on shared storage or on each node's own disk
# ("checkpoint": {"use_node_local_storage": true}, where each node's first rank writes the model states too).


def manifest_name(rank: int) -> str:
    return f"manifest_rank{rank:05d}.json"


def durable_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # DeepSpeed does not fsync what it writes
        return hashlib.file_digest(f, "sha256").hexdigest()


def vouch_for(tag_dir: Path, paths: list[Path], rank: int, world_size: int, node_local: bool) -> None:
    """This rank's part of tag_dir is durable: the files it wrote there (none, for some ranks at stage 0) fsynced and
    hashed into its manifest, written atomically, with the setup that can load them."""
    manifest = {"world_size": world_size, "node_local": node_local,
                "files": {str(p.relative_to(tag_dir)): durable_sha256(p) for p in sorted(paths)}}
    tag_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(tag_dir / manifest_name(rank), lambda f: f.write(json.dumps(manifest, indent=1).encode()))


def commit_deepspeed(tag_dir: Path, rank: int, keep: int) -> None:
    """Once every rank has vouched for tag_dir, by the rank that keeps this copy of out_dir (rank 0 on shared storage,
    each node's first rank on node-local): DeepSpeed's `latest` (read by its own tools, e.g. zero_to_fp32.py) points
    at it, and the tags this copy holds are pruned to the newest `keep` that `rank` vouched for."""
    write_atomically(tag_dir.parent / "latest", lambda f: f.write(tag_dir.name.encode()))
    vouched = [d.name for d in sorted(tag_dir.parent.glob("step_*")) if (d / manifest_name(rank)).exists()]
    oldest_kept = vouched[-keep:][0]
    for old in sorted(tag_dir.parent.glob("step_*")):
        if old.name < oldest_kept:
            for manifest in old.glob("manifest_rank*.json"):  # first, so a deletion cut short leaves nothing that
                manifest.unlink()  # looks complete
            shutil.rmtree(old)


def own_parts(out_dir: Path, rank: int) -> dict:
    """What this rank finds in its out_dir: for each step_* tag, None if its own part is intact or why it is not; and
    the setups, (world size, node-local), that the manifests it can see were saved with."""
    parts, setups = {}, set()
    for tag_dir in sorted(Path(out_dir).glob("step_*")):
        for path in tag_dir.glob("manifest_rank*.json"):
            try:
                manifest = json.loads(path.read_text())
                setups.add((manifest["world_size"], manifest["node_local"]))
            except (OSError, ValueError, KeyError):
                pass  # reported below if it is this rank's
        try:
            files = json.loads((tag_dir / manifest_name(rank)).read_text())["files"]
            damaged = [name for name, digest in files.items() if durable_sha256(tag_dir / name) != digest]
            parts[tag_dir.name] = f"changed since saved: {', '.join(damaged)}" if damaged else None
        except FileNotFoundError:
            parts[tag_dir.name] = "its save did not finish"
        except (OSError, ValueError, KeyError) as e:
            parts[tag_dir.name] = f"{type(e).__name__}: {e}"
    return {"parts": parts, "setups": setups}


def agreed_deepspeed_tag(found: list[dict], out_dir: Path, world_size: int, node_local: bool, report: bool):
    """Given every rank's own_parts (the same list on every rank, so all decide alike): the newest tag whose parts are
    intact on every rank; the newer ones are reported (if `report`). None if no save ever finished; an error if some
    did but none is intact everywhere (starting afresh would overwrite them), or if they were saved by another
    setup (DeepSpeed would load the wrong partitions, or miss files)."""
    storage = {True: "node-local", False: "shared"}
    for saved_world_size, saved_node_local in sorted(set().union(*(f["setups"] for f in found))):
        if (saved_world_size, saved_node_local) != (world_size, node_local):
            raise CheckpointError(f"the checkpoints in {out_dir} were saved by {saved_world_size} ranks on "
                                  f"{storage[saved_node_local]} storage, this run has {world_size} on "
                                  f"{storage[node_local]}: resume with the same rank count and "
                                  "checkpoint.use_node_local_storage, or choose another --out_dir to start afresh")
    tags = sorted(set().union(*(f["parts"] for f in found)), reverse=True)
    for tag in tags:
        problems = [f"rank {rank}: {f['parts'].get(tag, 'not in its out_dir')}" for rank, f in enumerate(found)
                    if f["parts"].get(tag, "missing") is not None]
        if not problems:
            return tag
        if report:
            print(f"warning: skipping checkpoint {Path(out_dir) / tag}: {'; '.join(problems)}", file=sys.stderr)
    if any(f["setups"] for f in found):
        raise CheckpointError(f"none of the {len(tags)} checkpoints in {out_dir} is intact on every rank; move them "
                              "elsewhere to start afresh")
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
