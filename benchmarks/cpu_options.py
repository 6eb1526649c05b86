"""CPU training-step options, in one run: threads, channels_last and torch.compile, each on the
engine's own `train_one_epoch` with the same model, batch and random data.

    python benchmarks/cpu_options.py [--backbone mobilenet_v2] [--crop 128] [--batch 4] [--iters 12]

Prints images/s per option (after warm-up steps; torch.compile's compile time is printed apart).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.trainable.engine import build_optimizer, poly_scheduler, train_one_epoch
from deeplab_sweep.trainable.models import build_from_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def measure(args, threads: int, channels_last: bool, compiled: bool) -> tuple[float, float]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_job(
        CONF / "train" / "demo.yaml",
        ["data.root=/unused", f"model.backbone={args.backbone}", f"train.channels_last={str(channels_last).lower()}"],
    ).run
    model = build_from_config(cfg.model, cfg.data.num_classes)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    sched = poly_scheduler(opt, 10_000, 0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    if compiled:
        model = torch.compile(model)
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(args.batch, 3, args.crop, args.crop, generator=g),
            torch.randint(0, 21, (args.batch, args.crop, args.crop), generator=g),
        )
        for _ in range(args.iters)
    ]
    device = torch.device("cpu")
    t = time.perf_counter()
    train_one_epoch(model, data[:2], opt, sched, scaler, cfg, device, 1)  # warm-up (and compile)
    warm = time.perf_counter() - t
    out = train_one_epoch(model, data, opt, sched, scaler, cfg, device, 1)
    return out["train/images_per_s"], warm


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    print(
        f"{args.backbone} crop {args.crop} batch {args.batch}, {args.iters} timed steps, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads available"
    )
    base = None
    options = [(1, False, False), (2, False, False), (2, True, False)]
    if not args.no_compile:
        options += [(2, False, True), (2, True, True)]
    for threads, cl, compiled in options:
        ips, warm = measure(args, threads, cl, compiled)
        base = base or ips
        name = f"threads {threads}" + (" channels_last" if cl else "") + (" torch.compile" if compiled else "")
        extra = f"  (warm-up incl. compile {warm:.0f} s)" if compiled else ""
        print(f"{name:40} {ips:7.2f} img/s  {ips / base:.2f}x{extra}", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
