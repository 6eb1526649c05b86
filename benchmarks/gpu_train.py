"""GPU training throughput at the paper's crop, in one run: the engine's own `train_one_epoch`
against a bare PyTorch loop, fp32 against AMP (bf16 / fp16 + GradScaler) with channels_last and
cudnn.benchmark, BatchNorm against GroupNorm; images/s and peak GPU memory for each.

    python benchmarks/gpu_train.py [--backbones resnet50 resnet101] [--crop 513] [--batch 16] [--iters 20]

Batches are random, pinned in host memory and copied in each step (as the DataLoader's would
be), so the figures are the model + optimiser step, not the data pipeline (data_pipeline.py).
Ray Train is not part of this run: its per-step overhead is measured on CPU (train_overhead.py).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deeplab_sweep.search.compose import load_job
from deeplab_sweep.trainable.engine import _autocast, build_optimizer, compiled, poly_scheduler, train_one_epoch
from deeplab_sweep.trainable.models import build_from_config

CONF = Path(__file__).resolve().parents[1] / "conf"

VARIANTS = {
    # name: (amp, channels_last, cudnn.benchmark, norm, train.compile)
    "fp32": ("none", False, False, "bn", "off"),
    "bf16+cl+bench": ("bf16", True, True, "bn", "off"),
    "fp16+cl+bench": ("fp16", True, True, "bn", "off"),
    "bf16+cl+bench gn": ("bf16", True, True, "gn", "off"),
    "bf16+bench gn": ("bf16", False, True, "gn", "off"),  # GroupNorm in NCHW: no channels_last conversions
    "bf16+cl compile": ("bf16", True, True, "bn", "default"),
    "bf16+cl compile-cg": ("bf16", True, True, "bn", "reduce-overhead"),  # + CUDA graphs
}


def make_batches(n: int, batch: int, crop: int, classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = torch.randn(batch, 3, crop, crop, generator=g).pin_memory()
        y = torch.randint(0, classes, (batch, crop, crop), generator=g)
        y[:, :8] = 255  # some void
        out.append((x, y.pin_memory()))
    return out


def setup(cfg, device):
    model = build_from_config(cfg.model, cfg.data.num_classes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg)
    sched = poly_scheduler(opt, 10_000, cfg.train.poly_power)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16")
    return compiled(model, cfg), opt, sched, scaler


def bare_epoch(model, data, opt, cfg, device) -> None:
    """Forward, CE, backward, SGD: no per-step check, no scheduler, nothing the GPU waits on."""
    mem = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model.train()
    for x, y in data:
        x = x.to(device, non_blocking=True).contiguous(memory_format=mem)
        y = y.to(device, non_blocking=True)
        with _autocast(cfg, device):
            loss = F.cross_entropy(model(x), y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def measure(cfg, device, data, warmup: int, iters: int, bare: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    model, opt, sched, scaler = setup(cfg, device)
    timed = [data[i % len(data)] for i in range(iters)]

    def run(batches, model=model, opt=opt, sched=sched, scaler=scaler):
        if bare:
            bare_epoch(model, batches, opt, cfg, device)
        else:
            train_one_epoch(model, batches, opt, sched, scaler, cfg, device, epoch=1)

    t = time.perf_counter()
    run(timed[:warmup])  # cudnn.benchmark picks its algorithms here; torch.compile compiles
    torch.cuda.synchronize()
    if cfg.train.compile != "off":
        print(f"  compile + {warmup} warm-up steps: {time.perf_counter() - t:.1f} s", flush=True)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    run(timed)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30
    del run, model, opt, sched, scaler
    torch.cuda.empty_cache()
    return iters * data[0][0].shape[0] / dt, peak


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbones", nargs="+", default=["resnet50", "resnet101"])
    p.add_argument("--crop", type=int, default=513)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--os", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--iters", type=int, default=16)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = p.parse_args()
    device = torch.device("cuda")
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}, "
        f"crop {args.crop}, batch {args.batch}, OS {args.os}, {args.iters} timed steps after {args.warmup}"
    )
    data = make_batches(4, args.batch, args.crop, 21)
    print(f"{'backbone':10} {'variant':18} {'loop':6} {'img/s':>8} {'peak GiB':>9}")
    for backbone in args.backbones:
        base = None
        for name in args.variants:
            amp, cl, bench, norm, compile_mode = VARIANTS[name]
            torch.backends.cudnn.benchmark = bench
            cfg = load_job(
                CONF / "train" / "demo.yaml",
                [
                    "data.root=/unused",
                    f"model.backbone={backbone}",
                    f"model.output_stride={args.os}",
                    f"model.norm={norm}",
                    f"train.amp={amp}",
                    f"train.channels_last={str(cl).lower()}",
                    f"train.compile={compile_mode}",
                    "train.lr=0.01",
                ],
            ).run
            plain = norm == "bn" and amp != "fp16" and compile_mode == "off"
            loops = ("bare", "engine") if plain else ("engine",)
            for loop in loops:
                ips, peak = measure(cfg, device, data, args.warmup, args.iters, bare=loop == "bare")
                base = base or ips
                print(
                    f"{backbone:10} {name:18} {loop:6} {ips:8.1f} {peak:9.1f}   ({ips / base:.2f}x fp32 bare)",
                    flush=True,
                )
    print(f"peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
