"""A checkpoint's model for use outside the product: ONNX (torch.export, then the ONNX
program; runs in ONNX Runtime) or TorchScript (traced), with the batch, height and width of
the input dynamic, and beside it a sidecar JSON with what a caller needs to feed it and read
it: the input's normalisation, the classes (and their palette), the output stride. The model
takes float32 images N x 3 x H x W, RGB scaled to [0, 1] and normalised by the sidecar's mean
and std (what `deeplab predict` does), and gives logits N x classes x H x W; the argmax over the
classes is the mask."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from deeplab_sweep.datasets.transforms import MEAN, STD
from deeplab_sweep.errors import ConfigError
from deeplab_sweep.trainable.inference import load_model

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
SIDECAR = "model.json"
MIN_SIDE = 33  # the smallest input side every backbone and stride takes (the stem's stride-2 convolutions)
MAX_SIDE = 4096
EXAMPLE_SIDE = 97  # the example input traced: its sides are none of the dimensions' bounds


def export(checkpoint: str | Path, fmt: str, out: str | Path, model_factory: str | None = None) -> list[Path]:
    """The checkpoint's model in `fmt` under `out`, and its sidecar; the files written."""
    if fmt not in FORMATS:  # before the checkpoint is read
        raise ConfigError(f"--format = {fmt!r}: not one of {', '.join(FORMATS)}")
    model, cfg, ckpt = load_model(checkpoint, "cpu", model_factory)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / FORMATS[fmt]
    example = torch.randn(1, 3, EXAMPLE_SIDE, EXAMPLE_SIDE + 32)
    with torch.no_grad():
        if fmt == "onnx":
            _onnx(model, example, path)
        else:
            with warnings.catch_warnings():  # the tracer's notes on Python values: the sizes stay dynamic
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                torch.jit.trace(model, example).save(str(path))
    spec = cfg.data.spec
    sidecar = {
        "format": fmt,
        "file": path.name,
        "input": {
            "name": "image",
            "shape": ["batch", 3, "height", "width"],
            "dtype": "float32",
            "layout": "RGB, scaled to [0, 1], then (x - mean) / std",
            "mean": list(MEAN),
            "std": list(STD),
            "min_side": MIN_SIDE,
            "max_side": MAX_SIDE,
        },
        "output": {"name": "logits", "shape": ["batch", "classes", "height", "width"], "mask": "argmax over classes"},
        "classes": list(spec.class_names),
        "palette": [list(c) for c in spec.palette],
        "ignore_index": 255,
        "model": {"backbone": cfg.model.backbone, "output_stride": cfg.model.output_stride},
        "checkpoint": {"path": str(checkpoint), "epoch": ckpt.get("epoch"), "metrics": ckpt.get("metrics") or {}},
    }
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2))
    return [path, out / SIDECAR]


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    dims = {
        0: torch.export.Dim("batch", max=256),
        2: torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE),
        3: torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE),
    }
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamo=True,
        dynamic_shapes=(dims,),
        verbose=False,
    )
