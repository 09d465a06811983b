"""Helpers shared by the tests that launch and compare training runs."""
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def launcher(ranks: int | None) -> list[str]:
    """The command prefix for one process, or for `ranks` ranks under torchrun. --standalone: the launcher binds its
    rendezvous store to a free port itself and the ranks join that store, so two runs at once cannot collide (a port
    picked here and handed over could be taken in between)."""
    if not ranks:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


# train.py's main, then an exit that skips the interpreter's teardown of the ~3,000 modules DeepSpeed loads: about
# 1.2 s of CPU per process, in every launch, on this machine. The launches that test train.py's own exit run it
# directly (the CLI tests, DeepSpeed without a launcher, the README demo).
TRAIN_DRIVER = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import train
train.main(sys.argv[1:])
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def train_driver(folder) -> Path:
    """TRAIN_DRIVER as a script in `folder`."""
    path = Path(folder) / "train_driver.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TRAIN_DRIVER)
    return path


# What a stock CUDA image may lack or hold at another major version, and training must not need.
NOT_FOR_TRAINING = ("huggingface_hub", "httpx", "httpx2", "transformers", "accelerate")


def env_without_hub_client(tmp_path) -> dict:
    """os.environ with a sitecustomize on PYTHONPATH that makes NOT_FOR_TRAINING unimportable in the process and in
    every process it starts."""
    site = Path(tmp_path) / "no_hub_client"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(f"import sys\nsys.modules.update(dict.fromkeys({NOT_FOR_TRAINING!r}))\n")
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def deterministic(records: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """The fields of each record that a rerun must reproduce (not time, throughput or memory)."""
    return [{k: r[k] for k in keys if k in r} for r in records]


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b):
    """Nested dicts, lists and tensors equal bit for bit, dtypes included."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b
