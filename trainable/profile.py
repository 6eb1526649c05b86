"""What a trial's model costs to run and to train, measured in the worker that trains it:
parameters, GFLOPs of one forward pass, batch-1 latency on the training device, and the peak
memory of training. Reported with every evaluated epoch, so a sweep can optimise or constrain
them (`sweep.objectives`, `sweep.constraints`)."""

from __future__ import annotations

import contextlib
import re
import resource
import statistics
import time
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

MODEL_METRICS = ("model/params", "model/gflops", "model/latency_ms", "model/peak_mem_mb")
LATENCY_WARMUP, LATENCY_RUNS = 3, 20


def profile_crop(cfg) -> int:
    """The side of the square image latency and FLOPs are measured at: the validation crop,
    else the training crop (validation on whole images has no one size)."""
    return cfg.data.val_crop or cfg.data.crop_size


@torch.no_grad()
def forward_profile(
    model: nn.Module, crop: int, device: torch.device, channels_last: bool, autocast: AbstractContextManager
) -> dict[str, float]:
    """Parameters, GFLOPs and latency of one batch-1 forward pass in eval mode, on the model's
    device as validation runs it: FLOPs counted by FlopCounterMode on the first warm-up pass
    (a real pass, faster than tracing on the meta device), latency the median wall time of the
    passes after warm-up. The model is put back in the mode it was in."""
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, crop, crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    counter, times = FlopCounterMode(display=False), []
    try:
        with autocast:
            for i in range(LATENCY_WARMUP + LATENCY_RUNS):
                sync_device(device)
                t = time.perf_counter()
                with counter if i == 0 else contextlib.nullcontext():
                    model(x)
                sync_device(device)
                if i >= LATENCY_WARMUP:
                    times.append(time.perf_counter() - t)
    finally:
        model.train(was_training)
    return {
        "model/params": float(sum(p.numel() for p in model.parameters())),
        "model/gflops": counter.get_total_flops() / 1e9,
        "model/latency_ms": statistics.median(times) * 1e3,
    }


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of training from `reset()` on: the CUDA allocator's peak on a GPU; on CPU the
    process's peak resident set (Linux's VmHWM, reset through /proc/self/clear_refs, so a Tune
    actor reused for the next trial does not carry the last trial's peak)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # Not Linux, or not allowed: the process's peak since it started.
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def read_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as f:
                return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
        except (OSError, AttributeError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
