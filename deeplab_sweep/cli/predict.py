"""`deeplab predict`: colour masks, overlays and class-id PNGs for image files."""

from __future__ import annotations

from pathlib import Path

from deeplab_sweep.cli.common import add_model_factory_arg, command

NAME = "predict"


def add(sub) -> None:
    pr = command(
        sub,
        NAME,
        "write colour masks and overlays for images",
        "Predict segmentation masks with a checkpoint.",
        """
        deeplab predict --checkpoint best/checkpoint.pt photo1.jpg photo2.jpg --out preds/
        deeplab predict --checkpoint best/checkpoint.pt data/voc/VOCdevkit/VOC2012/JPEGImages/*.jpg --out preds/""",
    )
    pr.add_argument("--checkpoint", required=True, type=Path)
    pr.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE")
    pr.add_argument("--out", required=True, type=Path)
    pr.add_argument("--device", default="cpu")
    add_model_factory_arg(pr)


def run(args) -> int:
    from deeplab_sweep.trainable.inference import predict_files

    written = predict_files(args.checkpoint, args.inputs, args.out, args.device, model_factory=args.model_factory)
    print(f"wrote {len(written)} files to {args.out}")
    return 0
