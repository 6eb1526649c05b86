"""What a trial's model costs to run and to train, measured in the worker that trains it:
parameters, GFLOPs of one forward pass, batch-1 latency on the training device, and the peak
memory of training. Reported with every evaluated epoch, so a sweep can optimise or constrain
them (`sweep.objectives`, `sweep.constraints`)."""

from __future__ import annotations

import contextlib
import functools
import re
import resource
import statistics
import time
from contextlib import AbstractContextManager

import torch
from torch import nn

from deeplab_sweep.trainable.cost import flops_per_image
from deeplab_sweep.trainable.run_config import ModelConfig

MODEL_METRICS = ("model/params", "model/gflops", "model/latency_ms", "model/peak_mem_mb")
LATENCY_WARMUP, LATENCY_RUNS = 3, 20


def profile_crop(cfg) -> int:
    """The side of the square image latency and FLOPs are measured at: the validation crop,
    else the training crop (validation on whole images has no one size)."""
    return cfg.data.val_crop or cfg.data.crop_size


def static_costs(cfg, model: nn.Module) -> dict[str, float]:
    """What the config alone decides: parameters and forward GFLOPs at the profile crop."""
    gflops = _forward_gflops(cfg.model.model_dump_json(), cfg.data.num_classes, profile_crop(cfg))
    return {"model/params": float(sum(p.numel() for p in model.parameters())), "model/gflops": gflops}


@functools.lru_cache(maxsize=16)
def _forward_gflops(model_json: str, num_classes: int, crop: int) -> float:
    """Counted once per model in a process: a reused Tune actor's next trial with the same
    architecture (only its lr differs, say) does not count again."""
    model_cfg = ModelConfig.model_validate_json(model_json)
    return flops_per_image(model_cfg, num_classes, crop, train=False) / 1e9


@torch.no_grad()
def latency_ms(
    model: nn.Module, crop: int, device: torch.device, channels_last: bool, autocast: AbstractContextManager
) -> float:
    """Median wall time of one batch-1 forward pass in eval mode, after warm-up; the model is
    put back in the mode it was in."""
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, crop, crop, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = []
    try:
        with autocast:
            for i in range(LATENCY_WARMUP + LATENCY_RUNS):
                sync_device(device)
                t = time.perf_counter()
                model(x)
                sync_device(device)
                if i >= LATENCY_WARMUP:
                    times.append(time.perf_counter() - t)
    finally:
        model.train(was_training)
    return statistics.median(times) * 1e3


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
