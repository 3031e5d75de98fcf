"""The clock and the counter the speed benchmarks share: calls timed in turns (so a change of machine load
hits every configuration alike), the machine's load around them, and the FLOPs of one call."""
from __future__ import annotations

import os
import time

import torch


def load_average() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def device_kind(device: str) -> str:
    return "cpu" if torch.device(device).type == "cpu" else "gpu"


def sync_for(device: str):
    """What waits for the device's queued work (CUDA), so a clock reads finished work."""
    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def interleaved(fns: dict, reps: int, warmup: int = 1, sync=lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each fn, taking turns within every repetition (so a change of machine
    load hits all of them alike); the first ``warmup`` rounds are not recorded."""
    times = {k: [] for k in fns}
    for r in range(warmup + reps):
        for k, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def total_flops(fn) -> int:
    """Matmul + attention FLOPs of ``fn()`` (elastilab.core.compute registers the CPU attention formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    from elastilab.core import compute  # noqa: F401  (registers the FLOP formulas torch lacks)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
