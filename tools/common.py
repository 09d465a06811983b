"""What the tools share: naming the device, peak memory measured in a fresh process, interleaved timing, metrics."""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def device_name(device: str = "cuda" if torch.cuda.is_available() else "cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def proc_status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (Linux), e.g. VmRSS (resident now) or VmHWM (resident at peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset the peak resident set (VmHWM) to the current one, which it returns in bytes (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_bytes("VmRSS")


def in_fresh_process(module: str, *args):
    """`python -m module *args` from the repository root, in a process whose malloc maps every large block on its own
    (so that a freed tensor leaves the resident set at once); the JSON printed on its last line."""
    out = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                         env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"})
    if out.returncode:
        raise RuntimeError(f"python -m {module} {' '.join(map(str, args))} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def interleaved_medians(runs: dict, repeats: int, device) -> dict[str, float]:
    """Median seconds of each zero-argument callable over `repeats` rounds, each round calling every one in turn so
    that a change in machine load hits them all alike (consecutive runs on a shared machine can differ several-fold).
    One untimed round first warms up (AdamW allocates its state)."""
    seconds = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            if round_:
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def read_metrics(run_dir) -> list[dict]:
    """The records of a train.py run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
