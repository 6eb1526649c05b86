"""`deeplab train`: one run of N Ray Train workers (DDP), one MLflow run."""

from __future__ import annotations

import json

from deeplab_sweep.cli.common import add_job_args, command, json_safe, load_job

NAME = "train"


def add(sub) -> None:
    t = command(
        sub,
        NAME,
        "train one model with N Ray Train workers, logged to MLflow",
        "One training run (Ray Train, DDP), one MLflow run.",
        """
        deeplab train conf/train/demo.yaml
        deeplab train conf/train/demo.yaml train.epochs=10 train.num_workers=2
        deeplab train conf/train/deeplabv3plus_resnet101_os16_513x513_46ep_voc_aug.yaml data.root=/data/voc
        deeplab train conf/train/demo.yaml storage.name=my-run   # run again: resumes my-run""",
    )
    add_job_args(t)


def run(args) -> int:
    job = load_job(args)
    if job is None:
        return 0
    from deeplab_sweep.search.run_train import run_training

    summary = run_training(job, args.address, verbose=args.verbose)
    print(json.dumps(json_safe(summary), indent=2, default=str))
    return 0
