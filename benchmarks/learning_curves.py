"""The learning-curve table of our own model: every configuration of a discrete version of the
demo's search space trained for the full schedule, evaluated after every epoch, one CSV row per
(configuration, training seed, epoch). `search_replay.py` replays sweeps on it.

    python benchmarks/learning_curves.py                  # resumes where it stopped (hours on 2 cores)
    python benchmarks/learning_curves.py --limit 2        # a smoke run
    python benchmarks/learning_curves.py --device cuda    # on a lent GPU (benchmarks/gpu_checks.sh)
    python benchmarks/learning_curves.py --shard 1/2 &    # a second process, on a second core

The grid: lr at 8 log-spaced values x output stride {8, 16} x crop {48, 64} x backbone
{mobilenet_v2, resnet50} x batch {4, 8} = 128 configurations, 12 epochs each, training seed 0;
every fourth configuration again with training seed 1 (the noise between seeds). The data: the
generated VOC layout with more images than the demo's (64 train, 32 val), so that one
evaluation is less of a coin toss. Each configuration trains in this process through the
product's own `fit` (the same loop, model, data pipeline and metrics a trial runs), one torch
thread, no checkpoint kept.

The table is written one configuration at a time (its rows appended once it has trained in
full), so a run that is stopped loses at most the configuration in progress, and the next run
skips what the table holds. Beside it, `<table>.json` records the command, commit, machine,
data and grid that made it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "benchmarks" / "learning_curves" / "demo_space.csv"

# The grid, keyed by config path (what a sweep trial's overrides are keyed by).
LRS = [float(f"{v:.3g}") for v in np.geomspace(0.005, 0.2, 8)]
GRID = {
    "model.backbone": ["mobilenet_v2", "resnet50"],
    "model.output_stride": [8, 16],
    "data.crop_size": [48, 64],
    "data.batch_size": [4, 8],
    "train.lr": LRS,
}
EPOCHS = 12
SECOND_SEED_EVERY = 4  # every 4th configuration is trained again with train.seed=1
DATA = {"n_train": 64, "n_val": 32, "seed": 0}  # datasets.synth.synth_voc arguments
KEYS = list(GRID)
METRICS = [
    "val/mIoU",
    "val/overall_acc",
    "train/loss",
    "train/epoch_time_s",
    "val/time_s",
    "model/params",
    "model/gflops",
    "model/latency_ms",
    "model/peak_mem_mb",
]
COLUMNS = [*KEYS, "train.seed", "epoch", *METRICS]


def runs() -> list[tuple[dict, int]]:
    """Every (configuration, training seed) of the table, in the order they are trained."""
    configs = [dict(zip(KEYS, values, strict=True)) for values in itertools.product(*GRID.values())]
    # A fixed shuffle: a table cut short holds a random sample of the grid, not one corner of it.
    order = np.random.default_rng(0).permutation(len(configs))
    return [(configs[i], 0) for i in order] + [(c, 1) for c in configs[::SECOND_SEED_EVERY]]


def key(config: dict, seed: int) -> tuple:
    return (*(str(config[k]) for k in KEYS), str(seed))


def done(table: Path) -> set[tuple]:
    """The (configuration, seed) pairs the table holds in full."""
    if not table.is_file():
        return set()
    epochs: dict[tuple, set[int]] = {}
    with table.open() as f:
        for row in csv.DictReader(f):
            k = (*(row[c] for c in KEYS), row["train.seed"])
            epochs.setdefault(k, set()).add(int(row["epoch"]))
    return {k for k, e in epochs.items() if e == set(range(1, EPOCHS + 1))}


def run_config(config: dict, seed: int, data_root: Path, device: str):
    from deeplab_sweep.search.compose import compose
    from deeplab_sweep.trainable.run_config import RunConfig

    overrides = [f"{k}={v}" for k, v in config.items()] + [
        f"data.root={data_root}",
        f"train.seed={seed}",
        f"train.epochs={EPOCHS}",
        "train.visuals=0",
        "train.torch_threads=1",
        f"train.use_gpu={'true' if device == 'cuda' else 'false'}",
    ]
    return RunConfig.model_validate(compose(REPO / "conf" / "train" / "demo.yaml", overrides))


def train(cfg, device: str) -> list[dict]:
    import torch

    from deeplab_sweep.trainable.engine import LocalWorker, fit

    class TableWorker(LocalWorker):
        def checkpoint_scratch(self):
            # fit() writes a checkpoint every epoch; the table keeps none: in memory, then gone.
            return tempfile.TemporaryDirectory(prefix="lc-ckpt-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)

    return fit(cfg, TableWorker(device=torch.device(device)))


def metadata(args, data_root: Path) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "data": {"generator": "deeplab_sweep.datasets.synth.synth_voc", **DATA, "root": str(data_root)},
        "grid": GRID,
        "epochs": EPOCHS,
        "second_seed_every": SECOND_SEED_EVERY,
        "base_config": "conf/train/demo.yaml (one torch thread, no visuals)",
        "columns": COLUMNS,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--data", type=Path, default=REPO / "runs" / "data" / "learning_curves")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--limit", type=int, default=None, help="train at most this many configurations, then stop")
    p.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="train only every N-th run from the I-th: N processes, one per core, fill one table",
    )
    args = p.parse_args()
    shard, shards = (int(x) for x in args.shard.split("/"))

    from deeplab_sweep.datasets.synth import synth_voc

    if not (args.data / "VOCdevkit").is_dir():
        synth_voc(args.data, **DATA)
    args.table.parent.mkdir(parents=True, exist_ok=True)
    have = done(args.table)
    todo = [(c, s) for i, (c, s) in enumerate(runs()) if key(c, s) not in have and i % shards == shard]
    print(f"{len(have)} of {len(runs())} runs in {args.table}; {len(todo)} to train", flush=True)
    meta = args.table.with_suffix(".json")
    history = json.loads(meta.read_text()).get("sessions", []) if meta.is_file() else []
    if shard == 0:
        meta.write_text(
            json.dumps({**metadata(args, args.data), "sessions": [*history, time.strftime("%F %T")]}, indent=1)
        )
    for i, (config, seed) in enumerate(todo[: args.limit]):
        start = time.perf_counter()
        reports = train(run_config(config, seed, args.data, args.device), args.device)
        append(
            args.table,
            [
                {**config, "train.seed": seed, **{m: _num(r.get(m)) for m in METRICS}, "epoch": r["epoch"]}
                for r in reports
            ],
        )
        last = reports[-1]["val/mIoU"]
        print(
            f"[{i + 1}/{len(todo)}] {' '.join(f'{k}={v}' for k, v in config.items())} seed={seed}: "
            f"final mIoU {last:.4f} in {time.perf_counter() - start:.0f} s",
            flush=True,
        )


def append(table: Path, rows: list[dict]) -> None:
    """A run's rows at the end of the table, under a lock: shards append to one file."""
    import fcntl

    with table.open("a", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        if f.tell() == 0:
            w.writeheader()
        w.writerows(rows)
        f.flush()


def _num(v):
    with contextlib.suppress(TypeError, ValueError):
        return f"{float(v):.6g}"
    return ""


if __name__ == "__main__":
    main()
