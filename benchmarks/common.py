"""Shared helpers for the benchmark scripts: timing, peak memory, machine facts, saving results."""
from __future__ import annotations

import inspect
import json
import os
import platform
import resource
import time
from pathlib import Path

RESULTS = Path(os.environ.get("GEOINDEX_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM, not ru_maxrss, which a child inherits from the
    parent it was forked from (so a small child of a big parent would report the parent's peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PEAK_RSS_SOURCE = inspect.getsource(peak_rss_mb) + "\n"  # pasted into child scripts


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine() -> dict:
    import torch
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def without_option(args: list, option: str) -> list:
    """A command's arguments less `option` and its value (`--opt V` or `--opt=V`): for an option that changes no
    figure, such as where logs went, and would put a machine's folder into a committed result."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **payload},
                               indent=2, default=float) + "\n")
    print(f"saved {path}")
    return path
