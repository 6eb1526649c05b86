"""`deeplab eval`: a checkpoint's validation metrics, computed exactly as training did."""

from __future__ import annotations

import json
from pathlib import Path

from deeplab_sweep.cli.common import add_model_factory_arg, command, json_safe

NAME = "eval"


def add(sub) -> None:
    e = command(
        sub,
        NAME,
        "evaluate a checkpoint on its validation set, print JSON metrics",
        "Evaluate a checkpoint exactly as training did.",
        """
        deeplab eval --checkpoint runs/ray/train-.../checkpoint_.../checkpoint.pt
        deeplab eval --checkpoint best/checkpoint.pt --data-root /data/voc""",
    )
    e.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt or the folder holding it")
    e.add_argument("--data-root", default=None, help="dataset root, if not where the checkpoint's config says")
    e.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    add_model_factory_arg(e)


def run(args) -> int:
    from deeplab_sweep.trainable.inference import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.data_root, args.device, args.model_factory)
    print(json.dumps(json_safe(metrics), indent=2))
    return 0
