"""`deeplab export`: a checkpoint's model as ONNX or TorchScript, with a sidecar JSON."""

from __future__ import annotations

from pathlib import Path

from deeplab_sweep.cli.common import add_model_factory_arg, command

NAME = "export"


def add(sub) -> None:
    e = command(
        sub,
        NAME,
        "export a checkpoint's model as ONNX or TorchScript (with a sidecar JSON)",
        """\
        Write the checkpoint's model (batch, height and width dynamic) and model.json beside it:
        the input's normalisation, the classes and palette, the output stride. The model takes
        float32 N x 3 x H x W images, RGB in [0, 1] normalised by the sidecar's mean and std, and
        gives logits N x classes x H x W. ONNX runs in ONNX Runtime (pip install
        'deeplab-sweep[onnx]'); TorchScript in torch.jit.load, without this package.""",
        """
        deeplab export --checkpoint best/<run_id>/checkpoint/checkpoint.pt --format onnx --out exported/
        deeplab export --checkpoint best/<run_id>/checkpoint/checkpoint.pt --format torchscript --out exported/""",
    )
    e.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pt or the folder holding it")
    e.add_argument("--format", required=True, help="onnx or torchscript")
    e.add_argument("--out", required=True, type=Path, help="the folder to write the model and model.json in")
    add_model_factory_arg(e)


def run(args) -> int:
    from deeplab_sweep.trainable.export import export

    for path in export(args.checkpoint, args.format, args.out, args.model_factory):
        print(f"wrote {path}")
    return 0
