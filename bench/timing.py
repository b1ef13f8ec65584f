"""Median per-call time of an op with cold inputs, and the machine's copy bandwidth and matmul peak.

GPU: each call sits between two CUDA events. A batch of calls is queued behind `torch.cuda._sleep` so the CPU
enqueues the whole batch before the GPU reaches it: the events then measure GPU time only, without Python launch
gaps (the decode step runs as a CUDA graph, so launch gaps are not what a kernel is judged by). An op that
synchronizes inside (the torch reference reads tensors back to the host) is timed with its gaps, as it runs.
CPU: time.perf_counter around each call.

Cold inputs: a call gets its own copy of the inputs, rotating over enough copies that together they exceed the
L2 cache several times (`copies_for`), so a 32 MB weight matrix is read from HBM as in the real model.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

ROTATION_L2_MULTIPLE = 4  # the rotated copies together hold this many L2 caches of data
MAX_COPIES = 64


@dataclass
class Measurement:
    median_s: float
    samples: int
    copies: int
    method: str


def l2_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    return 32 * 2**20  # a guess: the CPU smoke test does not claim cold caches


def copies_for(set_bytes: int, device: torch.device) -> int:
    """How many copies of a `set_bytes` input set to rotate over so that the L2 cache cannot hold them."""
    target = ROTATION_L2_MULTIPLE * l2_cache_bytes(device)
    return max(1, min(MAX_COPIES, math.ceil(target / max(set_bytes, 1))))


class Timer:
    """Times callables: `measure(calls)` rotates over `calls` (one per input copy) and returns the median.

    budget_s: time spent sampling one measurement once `min_samples` are in; a slow op stops after
    `max_time_s` with at least 3 samples.
    """

    def __init__(self, device: torch.device, budget_s: float = 0.3, min_samples: int = 20, warmup: int = 3,
                 max_samples: int = 2000):
        self.device = torch.device(device)
        self.budget_s = budget_s
        self.min_samples = min_samples
        self.warmup = warmup
        self.max_samples = max_samples
        self.max_time_s = max(10 * budget_s, 1.0)
        self._sleep_cycles_per_s: float | None = None

    def measure(self, calls: Sequence[Callable[[], object]]) -> Measurement:
        if self.device.type == "cuda":
            return self._measure_cuda(calls)
        return self._measure_cpu(calls)

    def _enough(self, n: int, elapsed: float) -> bool:
        if n >= self.max_samples:
            return True
        if n >= self.min_samples and elapsed >= self.budget_s:
            return True
        return n >= 3 and elapsed >= self.max_time_s

    def _measure_cpu(self, calls) -> Measurement:
        for i in range(max(self.warmup, len(calls))):
            calls[i % len(calls)]()
        times: list[float] = []
        start = time.perf_counter()
        i = 0
        while not self._enough(len(times), time.perf_counter() - start):
            t0 = time.perf_counter()
            calls[i % len(calls)]()
            times.append(time.perf_counter() - t0)
            i += 1
        return Measurement(statistics.median(times), len(times), len(calls), "perf_counter")

    def _sleep_rate(self) -> float:
        """GPU clock cycles per second of torch.cuda._sleep, measured once."""
        if self._sleep_cycles_per_s is None:
            cycles = 2_000_000
            torch.cuda._sleep(cycles)  # warm-up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            torch.cuda.synchronize()
            self._sleep_cycles_per_s = cycles / max(start.elapsed_time(end) * 1e-3, 1e-6)
        return self._sleep_cycles_per_s

    def _measure_cuda(self, calls) -> Measurement:
        n = len(calls)
        for i in range(max(self.warmup, n)):
            calls[i % n]()
        torch.cuda.synchronize()
        # Probe: how long one call takes end to end and how long the CPU takes to enqueue one.
        t0 = time.perf_counter()
        for i in range(3):
            calls[i % n]()
        enqueue_s = (time.perf_counter() - t0) / 3
        torch.cuda.synchronize()
        wall_s = (time.perf_counter() - t0) / 3
        batch = int(min(32, max(1, 0.02 / max(wall_s, 1e-6))))
        can_sleep = hasattr(torch.cuda, "_sleep")
        method = "cuda-events, launches queued behind a sleep" if can_sleep else "cuda-events"
        times: list[float] = []
        start = time.perf_counter()
        i = 0
        while not self._enough(len(times), time.perf_counter() - start):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(batch + 1)]
            if can_sleep:
                sleep_s = min(0.05, 1.5 * enqueue_s * batch + 2e-5)
                torch.cuda._sleep(int(sleep_s * self._sleep_rate()))
            events[0].record()
            for j in range(batch):
                calls[i % n]()
                i += 1
                events[j + 1].record()
            torch.cuda.synchronize()
            times += [events[j].elapsed_time(events[j + 1]) * 1e-3 for j in range(batch)]
        return Measurement(statistics.median(times), len(times), n, method)


@dataclass
class Peaks:
    """What this device reached in this run: the roofline every op is measured against."""

    copy_bytes_per_s: float  # device-to-device copy, read + write bytes per second
    matmul_flop_per_s: float  # a large square matmul in the benchmark dtype
    copy_how: str
    matmul_how: str

    def to_json(self) -> dict:
        return {
            "copy_bandwidth": {"value": self.copy_bytes_per_s / 1e12, "unit": "TB/s", "how": self.copy_how},
            "matmul_peak": {"value": self.matmul_flop_per_s / 1e12, "unit": "TFLOP/s", "how": self.matmul_how},
        }


def copy_seconds(timer: Timer, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=timer.device).random_(0, 256)
    dst = torch.empty_like(src)
    return timer.measure([lambda: dst.copy_(src)]).median_s


def matmul_seconds(timer: Timer, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=timer.device).to(dtype)
    b = torch.randn(n, n, device=timer.device).to(dtype)
    out = torch.empty(n, n, device=timer.device, dtype=dtype)
    return timer.measure([lambda: torch.matmul(a, b, out=out)]).median_s


def measure_peaks(timer: Timer, dtype: torch.dtype) -> Peaks:
    big = timer.device.type == "cuda"
    nbytes = 2**30 if big else 64 * 2**20
    n = 8192 if big else 512
    return Peaks(
        copy_bytes_per_s=2 * nbytes / copy_seconds(timer, nbytes),
        matmul_flop_per_s=2 * n**3 / matmul_seconds(timer, n, dtype),
        copy_how=f"copy_ of a {nbytes / 2**20:.0f} MiB buffer, 2 x size bytes moved per copy",
        matmul_how=f"{n}x{n}x{n} matmul, {str(dtype).removeprefix('torch.')}",
    )
